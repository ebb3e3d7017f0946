"""``depthvlm bench``: per-stage latency of the depth path (median, p90) per backend, table and JSON.

Several backends (``--backends torch,onnxruntime``) are measured in one run with their timed runs
interleaved (torch, onnxruntime, torch, ...), so a noisy machine slows them alike and the ratio
between them holds.

``--compile default|graphs`` compiles the torch backend and measures eager PyTorch beside it
(``torch_eager``, interleaved): the JSON's ``compile`` has the compile time, torch._dynamo's graph
breaks and graphs, and the compiled depth's largest relative difference from eager; every torch
entry has ``host_syncs_per_frame`` (a profiler count on CUDA; null with ``host_syncs_reason`` on CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from depthvlm_ros.files import write_text_atomic
from depthvlm_ros.geometry import Intrinsics
from depthvlm_ros.tools.common import (
    add_backend_args,
    add_input_size_args,
    add_model_args,
    backend_spec,
    check_max_image_tokens,
    load_model,
    note,
    parse_size,
)

#: The eager PyTorch entry measured beside a compiled torch backend.
EAGER = "torch_eager"


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``depthvlm bench`` subcommand's options."""
    p = sub.add_parser("bench", help="time the depth path stage by stage")
    p.add_argument("--size", type=parse_size, default=(640, 480), help="input image WxH (default 640x480)")
    p.add_argument("--fx", type=float, default=None,
                   help="focal length in pixels (default: 1000, the canonical focal: no canonical resize)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs first (default 2)")
    p.add_argument("--runs", type=int, default=10, help="timed runs (default 10)")
    p.add_argument("--json", type=Path, help="also write the JSON result to this file")
    p.add_argument("--head-output", choices=("model_grid", "camera_grid"), default="model_grid",
                   help="the torch backend's depth head: the model grid resampled to the camera (default), or the "
                        "camera's grid directly (docs/model.md)")
    p.add_argument("--backends", default="torch", help="comma-separated: torch,onnxruntime,tensorrt (default torch)")
    add_input_size_args(p)
    add_model_args(p)
    add_backend_args(p)
    p.set_defaults(func=run)


def synthetic_image(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A deterministic textured RGB image (gradients + noise), uint8."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([xx / width, yy / height, 0.5 + 0.5 * np.sin(xx / 17.0 + yy / 23.0)], axis=-1)
    return np.clip(base * 200 + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8)


def host_syncs(pipeline: Any, rgb: np.ndarray, k: Intrinsics, route: Any) -> dict[str, Any]:
    """``host_syncs_per_frame`` of one profiled frame (CUDA: the backend's depth call, its forward and the copy
    back, without the bench's per-stage clock, which waits for the GPU by design), or None with
    ``host_syncs_reason`` (CPU)."""
    from depthvlm_ros.backends.torch_inspect import NO_SYNC_COUNT_ON_CPU, profile_frames

    if pipeline.device.type != "cuda":
        return {"host_syncs_per_frame": None, "host_syncs_reason": NO_SYNC_COUNT_ON_CPU}
    plan = pipeline.plan(k, route)
    inputs = plan.prepare([rgb])
    profile = profile_frames(lambda: plan.backend.depth(inputs))  # the forward and the copy back, no stage clock
    return {"host_syncs_per_frame": profile.host_syncs_per_frame, "sdpa_backends": profile.sdpa_backends}


def summarize(samples: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Each stage's median and 90th percentile (milliseconds) and number of samples."""
    return {
        name: {"median_ms": float(np.median(v)), "p90_ms": float(np.percentile(v, 90)), "n": len(v)}
        for name, v in samples.items()
    }


def run(args: argparse.Namespace) -> int:
    """Run ``depthvlm bench``: the depth path timed stage by stage on a synthetic image for each of --backends (runs
    interleaved), printed as a table and JSON, also to --json (exit code 0, 2 bad input, 3 setup)."""
    import torch

    from depthvlm_ros.backends import BACKENDS
    from depthvlm_ros.backends.torch_inspect import compiled_graphs, graph_breaks, reset_counts
    from depthvlm_ros.errors import InputError
    from depthvlm_ros.pipeline.plan import RouteSettings

    names = [n.strip() for n in args.backends.split(",") if n.strip()]
    unknown = [n for n in names if n not in BACKENDS]
    if not names or unknown:
        raise InputError(f"--backends takes a comma-separated list of {', '.join(BACKENDS)}; got {args.backends!r}")
    width, height = args.size
    max_tokens = check_max_image_tokens(args)
    args.backend_fallback = False  # measure exactly the backends named: a fallback would mislabel them
    compiled = args.compile != "none" and "torch" in names
    model = load_model(args, backend="torch")
    # one pipeline per backend, sharing the loaded model (nothing is reloaded or patched); a compiled torch
    # backend is measured beside eager PyTorch
    specs = {name: backend_spec(args, name) for name in names}
    if compiled:
        specs[EAGER] = dataclasses.replace(specs["torch"], compile="none")
    reset_counts()
    pipelines = {name: model.with_backend(spec, log=note) for name, spec in specs.items()}
    k = Intrinsics.from_fx(width, height, args.fx if args.fx is not None else 1000.0)
    rgb = synthetic_image(width, height)
    route = RouteSettings(max_tokens=max_tokens)
    first_ms: dict[str, float] = {}
    for name, pipeline in pipelines.items():
        for _ in range(max(1, args.warmup)):
            start = time.perf_counter()
            pipeline.predict_depth(rgb, k, route)
            first_ms.setdefault(name, (time.perf_counter() - start) * 1e3)
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in pipelines}
    for _ in range(max(1, args.runs)):
        for name, pipeline in pipelines.items():
            start = time.perf_counter()
            result = pipeline.predict_depth(rgb, k, route)
            total = (time.perf_counter() - start) * 1e3
            for stage, ms in {**result.timings_ms, "total": total}.items():
                samples[name].setdefault(stage, []).append(ms)
    stats = {name: summarize(s) for name, s in samples.items()}
    model_size = pipelines[names[0]].plan(k, route).size
    import resource

    report = {
        "model": model.name,
        "device": str(model.device),
        "dtype": str(model.dtype).replace("torch.", ""),
        "input_size": [width, height],
        "model_size": list(model_size),  # the model's grid (a camera-grid head's depth is the camera's)
        "runs": max(1, args.runs),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "backends": {name: {"describe": pipelines[name].backend.describe(), "stages": stats[name],
                            "frames_per_s": 1000.0 / stats[name]["total"]["median_ms"],
                            **({"first_frame_ms": first_ms[name]} if name in ("torch", EAGER) else {}),
                            **(host_syncs(pipelines[name], rgb, k, route) if name in ("torch", EAGER) else {})}
                     for name in pipelines},
        # Peak resident memory of this process (all backends loaded at once), MiB; Linux reports KiB.
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    }
    if compiled:
        eager = pipelines[EAGER].predict_depth(rgb, k, route).depth_model
        ours = pipelines["torch"].predict_depth(rgb, k, route).depth_model
        report["compile"] = {
            "mode": args.compile, "graph_breaks": graph_breaks(), "graphs": compiled_graphs(),
            "first_frame_ms": first_ms["torch"],  # the compile, with one eager-speed frame
            "depth_max_rel_vs_eager": float(np.max(np.abs(ours - eager) / np.abs(eager))),
            "speedup_vs_eager": stats[EAGER]["total"]["median_ms"] / stats["torch"]["total"]["median_ms"],
        }
    else:
        report["compile"] = {"mode": "none"}
    if "torch" in stats:
        ref = stats["torch"]["total"]["median_ms"]
        report["speedup_vs_torch"] = {n: ref / s["total"]["median_ms"] for n, s in stats.items()
                                      if n not in ("torch", EAGER)}
    print(f"depth path, {model.name} ({report['dtype']}), input {width}x{height} -> model grid "
          f"{model_size[0]}x{model_size[1]}, {report['runs']} interleaved runs")
    print(f"{'backend':<13}{'stage':<12}{'median ms':>12}{'p90 ms':>12}")
    for name, per_stage in stats.items():
        for stage, s in per_stage.items():
            print(f"{name:<13}{stage:<12}{s['median_ms']:>12.1f}{s['p90_ms']:>12.1f}")
    if compiled:
        c = report["compile"]
        print(f"torch.compile ({args.compile}): {c['graph_breaks']} graph breaks, {c['graphs']} graphs, first frame "
              f"{c['first_frame_ms'] / 1e3:.1f} s, depth within {c['depth_max_rel_vs_eager']:.1e} of eager (relative), "
              f"{c['speedup_vs_eager']:.2f}x the speed of eager (median total)")
    for name, ratio in report.get("speedup_vs_torch", {}).items():
        print(f"{name} is {ratio:.2f}x the speed of torch (median total)")
    for name, entry in report["backends"].items():
        print(f"{name}: {entry['frames_per_s']:.1f} frames/s (median total)")
    print(f"peak RSS of this process: {report['peak_rss_mb']:.0f} MiB")
    text = json.dumps(report)
    print(text)
    if args.json:
        write_text_atomic(args.json, text + "\n")
    sys.stdout.flush()
    return 0
