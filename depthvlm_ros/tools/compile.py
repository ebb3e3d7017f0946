"""``depthvlm export`` (ONNX, checked against PyTorch) and ``depthvlm build-engine`` (TensorRT)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from depthvlm_ros.tools.common import add_model_args, load_model, parse_size


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export the depth path at one size to ONNX and check it")
    p.add_argument("--size", type=parse_size, required=True,
                   help="model-grid WxH (multiples of 32 px), e.g. the canonical size of your camera")
    p.add_argument("--out", type=Path, required=True, help="output .onnx path (engines/ is git-ignored)")
    p.add_argument("--export-dtype", dest="export_dtype", default="fp32", choices=["fp32", "fp16"],
                   help="dtype of the exported graph (default fp32)")
    p.add_argument("--check-images", type=int, default=2, help="random images for the parity check (default 2)")
    add_model_args(p)
    p.set_defaults(func=run_export)

    b = sub.add_parser("build-engine", help="build a TensorRT engine from an exported ONNX (on the target GPU)",
                       description="Build a strongly typed engine: it computes in the graph's dtype (an fp16 "
                                   "engine comes from depthvlm export --export-dtype fp16).")
    b.add_argument("--onnx", type=Path, required=True, help="graph from depthvlm export")
    b.add_argument("--out", type=Path, required=True, help="engine path, e.g. engines/depthvlm_640x480_fp16.engine")
    precision = b.add_mutually_exclusive_group()
    precision.add_argument("--fp16", dest="precision", action="store_const", const="fp16",
                           help="require an fp16 graph (the engine's precision is always the graph's)")
    precision.add_argument("--fp32", dest="precision", action="store_const", const="fp32",
                           help="require an fp32 graph (built with TF32 off)")
    b.add_argument("--workspace-gb", type=float, default=4.0, help="builder workspace limit (default 4 GB)")
    b.set_defaults(func=run_build_engine, precision=None)


def run_export(args: argparse.Namespace) -> int:
    from depthvlm_ros.backends.onnx_export import export_onnx

    model = load_model(args)
    width, height = args.size

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    report = export_onnx(model, width, height, args.out, dtype=args.export_dtype,
                         check_images=max(1, args.check_images), progress=progress)
    print(f"wrote {report.path} ({width}x{height}, {report.dtype}); ONNX Runtime vs PyTorch max relative "
          f"error {report.max_rel_error:.2e} on {report.checked_images} random images; export {report.export_s:.1f} s")
    return 0


def run_build_engine(args: argparse.Namespace) -> int:
    from depthvlm_ros.backends.tensorrt_backend import build_engine

    sidecar = build_engine(args.onnx, args.out, precision=args.precision, workspace_gb=args.workspace_gb,
                           progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(f"wrote {args.out} for {sidecar['gpu_name']} (TensorRT {sidecar['tensorrt_version']}, "
          f"{sidecar['precision']}, {sidecar['size'][0]}x{sidecar['size'][1]})")
    return 0
