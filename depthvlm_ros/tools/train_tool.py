"""``depthvlm train``: one training stage (0, 1 or 2) on DepthVLM-Bench / generated data."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

#: Exit code of a run that an early-stop gate ended (``--gate``): not an error of the input (2).
EXIT_EARLY_STOP = 4


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``depthvlm train`` subcommand's options."""
    p = sub.add_parser("train", help="train a stage: 0 (tiny VLM pretraining), 1 (depth head), 2 (LLM + head)",
                       description="Stage 1: depth head only, VLM frozen, SILog (lambda 0.5). Stage 2: LLM + depth "
                                   "head + LM head, vision frozen, LM loss + w * SILog on depth and QA samples. "
                                   "Stage 0 (small models from random weights): everything, LM + w * SILog. "
                                   "Runs through Accelerate: `accelerate launch -m depthvlm_ros train ...` for "
                                   "multi-GPU/FSDP.")
    p.add_argument("--stage", type=int, required=True, choices=[0, 1, 2])
    p.add_argument("--data", action="append", required=True, metavar="DIR|JSONL,RGB,DEPTH",
                   help="generated folder (depth.jsonl + qa.jsonl) or a Bench JSONL with roots (repeatable)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="checkpoints, logs/ and final/")
    init = p.add_mutually_exclusive_group(required=True)
    init.add_argument("--init", type=Path, metavar="MODEL", help="DepthVLM folder to start from")
    init.add_argument("--init-tiny", action="store_true", help="start from a fresh random depthvlm-tiny (stage 0)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--qa-fraction", type=float, default=0.5, help="share of QA samples per batch (stages 0, 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=500, metavar="STEPS")
    p.add_argument("--eval-data", metavar="DIR", help="held-out generated folder for periodic δ1/AbsRel")
    p.add_argument("--eval-every", type=int, default=250, metavar="STEPS")
    p.add_argument("--eval-limit", type=int, default=64, metavar="N", help="images per periodic evaluation")
    p.add_argument("--workers", type=int, default=1, help="data-loading processes (default 1)")
    p.add_argument("--no-flip", action="store_true", help="no horizontal-flip augmentation")
    p.add_argument("--freeze", action="append", default=[], metavar="PREFIX",
                   help="also keep parameters whose names start with PREFIX frozen (repeatable), "
                        "e.g. model.visual.pos_embed")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--mirror-qa", action="store_true",
                   help="mirror QA samples too, on the flip coin, their points' x rewritten as 1000 - x")
    g = p.add_argument_group("grounding losses (training only; 0 = off; depthvlm_ros/training/grounding.py)")
    g.add_argument("--pointer-weight", type=float, default=0.0,
                   help="attention of --pointer-heads at the positions predicting x and y on the named object")
    g.add_argument("--pointer-heads", default="2.2,2.3,3.2,3.3", metavar="L.H,...")
    g.add_argument("--hop-weight", type=float, default=0.0,
                   help="attention of --hop-heads at those positions on the question's words naming the object")
    g.add_argument("--hop-heads", default="1.1,1.2", metavar="L.H,...")
    g.add_argument("--position-weight", type=float, default=0.0,
                   help="linear readout of each image token's column and row (vision output, LLM layer input)")
    g.add_argument("--position-layer", type=int, default=2, help="the LLM layer whose input is read out (default 2)")
    g.add_argument("--coord-weight", type=float, default=1.0, help="weight of the answers' coordinate tokens")
    g.add_argument("--coord-sigma", type=float, default=0.0,
                   help="soft coordinate targets: a Gaussian of this width (0-1000 units; 0 = one-hot)")
    o = p.add_argument_group("watching a run")
    o.add_argument("--probe-data", metavar="DIR", help="generated folder for the grounding probes")
    o.add_argument("--probe-every", type=int, default=0, metavar="STEPS")
    o.add_argument("--gate", action="append", default=[], metavar="METRIC>=VALUE@STEP",
                   help="stop early (exit 4, checkpoint saved) unless a probe metric holds at STEP, "
                        "e.g. pointer>=0.35@1500 (repeatable)")
    o.add_argument("--eval-qa-data", metavar="DIR", help="generated folder: spatial answers scored during the run")
    o.add_argument("--eval-qa-every", type=int, default=0, metavar="STEPS")
    o.add_argument("--eval-qa-limit", type=int, default=200, metavar="N")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``depthvlm train``: one training stage (``--init-tiny``: from a fresh random depthvlm-tiny in
    --out/init) (exit code 0, 2 bad input, 4 stopped early by a --gate)."""
    from depthvlm_ros.errors import InputError
    from depthvlm_ros.training.trainer import EarlyStopError, TrainConfig, train

    for name in ("steps", "batch_size"):
        if not 1 <= getattr(args, name) <= 10_000_000:
            raise InputError(f"--{name.replace('_', '-')} must be positive")
    if not 0.0 <= args.qa_fraction <= 1.0:
        raise InputError(f"--qa-fraction must be in 0..1, got {args.qa_fraction}")
    init = args.init
    if args.init_tiny:
        from depthvlm_ros.training.tiny import init_tiny_model

        init = args.out / "init"
        if not (init / "model.safetensors").is_file():
            init_tiny_model(init, seed=args.seed)
    cfg = TrainConfig(
        stage=args.stage, data=[str(d) for d in args.data], out=str(args.out), init=str(init), steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps, qa_fraction=args.qa_fraction,
        seed=args.seed, save_every=args.save_every, eval_every=args.eval_every, eval_data=args.eval_data,
        eval_limit=args.eval_limit, flip=not args.no_flip, workers=args.workers, freeze=list(args.freeze),
        mirror_qa=args.mirror_qa, pointer_weight=args.pointer_weight, pointer_heads=args.pointer_heads,
        hop_weight=args.hop_weight, hop_heads=args.hop_heads, position_weight=args.position_weight,
        position_layer=args.position_layer, coord_weight=args.coord_weight, coord_sigma=args.coord_sigma,
        probe_data=args.probe_data, probe_every=args.probe_every, gates=list(args.gate),
        eval_qa_data=args.eval_qa_data, eval_qa_every=args.eval_qa_every, eval_qa_limit=args.eval_qa_limit,
    )
    try:
        final = train(cfg, resume=args.resume)
    except EarlyStopError as exc:
        print(f"depthvlm: stopped early: {exc}", file=sys.stderr)
        return EXIT_EARLY_STOP
    print(f"stage {args.stage} done: {final}")
    return 0
