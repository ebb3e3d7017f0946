"""``depthvlm generate``: procedural indoor/outdoor scenes in DepthVLM-Bench format (+ spatial QA)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from depthvlm_ros.tools.common import parse_size


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``depthvlm generate`` subcommand's options."""
    p = sub.add_parser("generate", help="write generated scenes: RGB, 16-bit depth, Bench JSONL, QA JSONL",
                       description="Ray-cast random rooms or streets with exact z-depth and object labels. "
                                   "Frame i of seed S is the same on every machine and for any --workers.")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder (created)")
    p.add_argument("--n", type=int, required=True, metavar="N", help="number of frames")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="dataset seed (default 0)")
    p.add_argument("--kind", default="mixed", choices=["indoor", "outdoor", "mixed"], help="scene kind (default mixed)")
    p.add_argument("--size", type=parse_size, default=(320, 240), metavar="WxH", help="image size (default 320x240)")
    p.add_argument("--fx-min", type=float, metavar="F",
                   help="smallest fx in pixels (default 0.5x the nominal 60-degree fx)")
    p.add_argument("--fx-max", type=float, metavar="F", help="largest fx in pixels (default 2x nominal)")
    p.add_argument("--qa-per-frame", type=int, default=4, metavar="K", help="questions per frame (default 4)")
    p.add_argument("--qa-mix", default="uniform", choices=["uniform", "binding"],
                   help="weights of the question kinds: uniform (default), or binding (more where / how far / "
                        "which is closer: questions that must find the named object)")
    p.add_argument("--sequence", type=int, default=0, metavar="L",
                   help="frames in sequences of L: one camera moving through one scene, each record with its pose "
                        "(world_from_camera), so that eval scores temporal consistency (TAE); default 0: "
                        "independent frames")
    p.add_argument("--rate", type=float, default=5.0, metavar="HZ",
                   help="frames per second along a --sequence path (default 5, as the demo)")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="processes (default 1)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``depthvlm generate``: --n generated frames (RGB, 16-bit depth, Bench JSONL, QA JSONL) written to --out
    (exit code 0, 2 bad input)."""
    from tqdm import tqdm

    from depthvlm_ros.errors import InputError
    from depthvlm_ros.scenes.dataset import FrameSpec, default_fx_range, write_dataset

    width, height = args.size
    lo, hi = default_fx_range(width)
    if not 0 <= args.qa_per_frame <= 64:
        raise InputError(f"--qa-per-frame must be in 0..64, got {args.qa_per_frame}")
    if not 1 <= args.workers <= 64:
        raise InputError(f"--workers must be in 1..64, got {args.workers}")
    spec = FrameSpec(args.kind, width, height, args.fx_min or lo, args.fx_max or hi, args.qa_per_frame, args.qa_mix,
                     args.sequence, args.rate)
    with tqdm(total=args.n, unit="frame", file=sys.stderr, disable=None) as bar:
        info = write_dataset(args.out, args.n, args.seed, spec, args.workers, bar.update)
    print(f"wrote {info['n']} frames ({info['qa_records']} questions) to {args.out} in {info['seconds']:.1f} s; "
          f"evaluate with --dataset NAME={args.out}/depth.jsonl,{args.out},{args.out}")
    return 0
