"""``depthvlm bench``: per-stage latency of the depth path (median, p90), table and JSON."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

from depthvlm_ros.geometry import Intrinsics
from depthvlm_ros.model.pipeline import STAGES
from depthvlm_ros.tools.common import add_model_args, load_model


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 640x480, got {text!r}") from None
    if not (32 <= w <= 8192 and 32 <= h <= 8192):
        raise argparse.ArgumentTypeError(f"size {w}x{h} outside 32..8192")
    return w, h


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="time the depth path stage by stage")
    p.add_argument("--size", type=parse_size, default=(640, 480), help="input image WxH (default 640x480)")
    p.add_argument("--fx", type=float, default=None,
                   help="focal length in pixels (default: 1000, the canonical focal: no canonical resize)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs first (default 2)")
    p.add_argument("--runs", type=int, default=10, help="timed runs (default 10)")
    p.add_argument("--json", type=Path, help="also write the JSON result to this file")
    add_model_args(p)
    p.set_defaults(func=run)


def synthetic_image(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A deterministic textured RGB image (gradients + noise), uint8."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([xx / width, yy / height, 0.5 + 0.5 * np.sin(xx / 17.0 + yy / 23.0)], axis=-1)
    return np.clip(base * 200 + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8)


def summarize(samples: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    return {
        name: {"median_ms": float(np.median(v)), "p90_ms": float(np.percentile(v, 90)), "n": len(v)}
        for name, v in samples.items()
    }


def run(args: argparse.Namespace) -> int:
    import torch

    width, height = args.size
    model = load_model(args)
    k = Intrinsics.from_fx(width, height, args.fx if args.fx is not None else 1000.0)
    rgb = synthetic_image(width, height)
    for _ in range(max(0, args.warmup)):
        model.predict_depth(rgb, k)
    samples: dict[str, list[float]] = {name: [] for name in (*STAGES, "total")}
    for _ in range(max(1, args.runs)):
        start = time.perf_counter()
        result = model.predict_depth(rgb, k)
        total = (time.perf_counter() - start) * 1e3
        for name in STAGES:
            samples[name].append(result.timings_ms.get(name, 0.0))
        samples["total"].append(total)
    stats = summarize(samples)
    report = {
        "model": model.name,
        "device": str(model.device),
        "dtype": str(model.dtype).replace("torch.", ""),
        "input_size": [width, height],
        "model_size": list(result.intrinsics_model.size),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "stages": stats,
    }
    print(f"depth path, {model.name} on {report['device']} ({report['dtype']}), input {width}x{height} "
          f"-> model grid {result.intrinsics_model.width}x{result.intrinsics_model.height}, {args.runs} runs")
    print(f"{'stage':<12}{'median ms':>12}{'p90 ms':>12}")
    for name, s in stats.items():
        print(f"{name:<12}{s['median_ms']:>12.1f}{s['p90_ms']:>12.1f}")
    text = json.dumps(report)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    sys.stdout.flush()
    return 0
