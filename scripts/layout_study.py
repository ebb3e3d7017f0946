"""Issue 29's two layout questions, measured on this machine's CPU, each pair side by side in one process:

- ``patch``: the vision tower's patch embedding as the stock ``Conv3d`` (kernel = stride = temporal x patch x
  patch) against the same weights as one ``F.linear`` over each flattened patch;
- ``head``: the DPT head's forward on contiguous (NCHW) tensors against its ``channels_last=True`` (the torch
  backend's: activations and per-call weight copies in ``torch.channels_last`` memory), the largest difference.

Two configurations: the built-in depthvlm-tiny (its own weights; model grid 320x224 = 10x7 tokens, its
``max_pixels``) and DepthVLM-4B's dimensions (random weights, :func:`~depthvlm_ros.model.factory.depthvlm_4b_config`;
a 640x480 camera at fx 525 is the model grid 1216x928 = 38x29 tokens). Timed runs alternate between the two
variants; prints one JSON line per measurement with the medians in ms.

Usage: taskset -c 0 .venv/bin/python scripts/layout_study.py [--part patch|head|both] [--runs N]
       [--head-4b-grid 38x29] [--head-4b-runs N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from depthvlm_ros.model.dpt_head import DPTDepthHead  # noqa: E402
from depthvlm_ros.model.factory import depthvlm_4b_config  # noqa: E402
from depthvlm_ros.model.modeling import DEPTH_HEAD_DEFAULTS, effective_patch_size  # noqa: E402


def side_by_side(variants: dict[str, Callable[[], torch.Tensor]], runs: int, warmup: int = 2) -> dict[str, float]:
    """Median ms of each variant, their timed runs interleaved (one of each in turn)."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(warmup + runs):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            if i >= warmup:
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: round(statistics.median(t), 3) for name, t in times.items()}


def tiny_model() -> torch.nn.Module:
    """The built-in depthvlm-tiny's model, fp32 on the CPU."""
    from depthvlm_ros.model.default import default_model_dir
    from depthvlm_ros.model.loading import load_depthvlm

    return load_depthvlm(default_model_dir()[0], device="cpu", dtype="fp32").model


def patch_case(name: str, weight: torch.Tensor, bias: torch.Tensor, patches: int, runs: int) -> dict:
    """Stock ``Conv3d`` patch embedding (``weight``: (hidden, C, T, P, P)) against ``F.linear``, ``patches`` patches."""
    conv = torch.nn.Conv3d(weight.shape[1], weight.shape[0], kernel_size=tuple(weight.shape[2:]),
                           stride=tuple(weight.shape[2:]))
    with torch.no_grad():
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
    x = torch.randn(patches, weight[0].numel())
    flat = weight.reshape(weight.shape[0], -1)

    def stock() -> torch.Tensor:
        return conv(x.view(-1, *weight.shape[1:])).view(-1, weight.shape[0])

    def linear() -> torch.Tensor:
        return F.linear(x, flat, bias)

    with torch.inference_mode():
        medians = side_by_side({"conv3d": stock, "linear": linear}, runs)
        diff = float((stock() - linear()).abs().max())
    return {"part": "patch", "model": name, "patches": patches, "in": weight[0].numel(), "out": weight.shape[0],
            "runs": runs, "ms": medians, "linear_vs_conv": round(medians["conv3d"] / medians["linear"], 2),
            "max_abs_diff": diff}


def head_case(name: str, head: DPTDepthHead, grid: tuple[int, int], runs: int) -> dict:
    """``head`` on random features at ``grid`` (tokens, height first), contiguous against channels-last."""
    gh, gw = grid
    torch.manual_seed(0)
    feats = [torch.randn(1, gh * gw, head.norm.normalized_shape[0]) for _ in range(4)]
    with torch.inference_mode():
        default = head(feats, gh, gw)
        cl = head(feats, gh, gw, channels_last=True)
        medians = side_by_side({"contiguous": lambda: head(feats, gh, gw),
                                "channels_last": lambda: head(feats, gh, gw, channels_last=True)}, runs, warmup=1)
    output = f"{gw * head.patch_size}x{gh * head.patch_size}"
    return {"part": "head", "model": name, "tokens": f"{gw}x{gh}", "output": output, "runs": runs, "ms": medians,
            "channels_last_vs_contiguous": round(medians["contiguous"] / medians["channels_last"], 2),
            "max_abs_diff": float((default - cl).abs().max()), "max_depth": float(default.abs().max())}


def main() -> None:
    """Measure the parts asked for and print one JSON line per measurement."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("patch", "head", "both"), default="both")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--head-4b-grid", default="38x29", help="4B head's token grid, WxH (38x29: 640x480 fx 525)")
    parser.add_argument("--head-4b-runs", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tiny = tiny_model()
    config = depthvlm_4b_config()
    vision = config.vision_config
    if args.part in ("patch", "both"):
        proj = tiny.model.visual.patch_embed.proj
        print(json.dumps(patch_case("depthvlm-tiny", proj.weight.detach(), proj.bias.detach(), 7 * 10 * 4,
                                    args.runs)))
        torch.manual_seed(0)
        kernel = (vision.temporal_patch_size, vision.patch_size, vision.patch_size)
        weight = torch.randn(vision.hidden_size, vision.in_channels, *kernel) * 0.02
        print(json.dumps(patch_case("4B", weight, torch.zeros(vision.hidden_size), 29 * 38 * 4, args.runs)))
    if args.part in ("head", "both"):
        print(json.dumps(head_case("depthvlm-tiny", tiny.depth_head.eval(), (7, 10), args.runs)))
        torch.manual_seed(0)
        head = DPTDepthHead(config.text_config.hidden_size, effective_patch_size(config),
                            features=DEPTH_HEAD_DEFAULTS["depth_head_features"],
                            out_channels=DEPTH_HEAD_DEFAULTS["depth_head_out_channels"],
                            last_channels=DEPTH_HEAD_DEFAULTS["depth_head_last_channels"]).eval()
        gw, gh = (int(v) for v in args.head_4b_grid.split("x"))
        print(json.dumps(head_case("4B", head, (gh, gw), args.head_4b_runs)))


if __name__ == "__main__":
    main()
