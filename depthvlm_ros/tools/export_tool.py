"""``depthvlm export`` (ONNX, checked against PyTorch) and ``depthvlm build-engine`` (TensorRT)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from depthvlm_ros.backends.triton_repo import DEFAULT_PREFIX, TRITON_BACKENDS
from depthvlm_ros.errors import InputError
from depthvlm_ros.tools.common import add_batching_args, add_model_args, load_model, parse_size


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """The ``depthvlm export`` and ``depthvlm build-engine`` subcommands' options."""
    p = sub.add_parser("export", help="export the depth path at one size to ONNX and check it (or write a Triton "
                       "model repository of several sizes)")
    p.add_argument("--size", type=parse_size, required=True, action="append",
                   help="model-grid WxH (multiples of 32 px), e.g. the canonical size of your camera; repeatable "
                        "with --triton-repo")
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("--out", type=Path, help="output .onnx path (engines/ is git-ignored)")
    out.add_argument("--triton-repo", type=Path, metavar="DIR",
                     help="write a Triton model repository: one model NAME_WxH per --size (batched graph, fixed "
                          "sizes, dynamic batching, the model fingerprint in its parameters)")
    p.add_argument("--triton-model", default=DEFAULT_PREFIX, help=f"model name prefix (default {DEFAULT_PREFIX})")
    p.add_argument("--triton-backend", default="onnxruntime", choices=TRITON_BACKENDS,
                   help="the Triton backend that runs the graph: onnxruntime (the standard container; default) or "
                        "python (ONNX Runtime inside Triton's Python backend, as depthvlm serve runs it)")
    add_batching_args(p)
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
    """Run ``depthvlm export``: the depth path at --size as an ONNX file checked against PyTorch (--out), or a
    Triton model repository of every --size (--triton-repo) (exit code 0, 2 bad input, 3 setup or a failed check)."""
    from depthvlm_ros.backends.onnx_export import export_onnx
    from depthvlm_ros.backends.triton_repo import check_serving, write_triton_repo

    if args.triton_repo is None and len(args.size) > 1:
        raise InputError("one --size per .onnx file (several sizes go to a --triton-repo)")
    if args.triton_repo is not None:
        check_serving(args.triton_backend, args.max_batch, args.queue_delay_us)
    model = load_model(args)

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    if args.triton_repo is not None:
        graphs = model.exported_graphs(args.size, args.export_dtype, progress)
        names = write_triton_repo(graphs, args.triton_repo, args.triton_model, args.triton_backend, args.max_batch,
                                  args.queue_delay_us, progress)
        print(f"wrote the Triton model repository {args.triton_repo}: {', '.join(names)}")
        return 0
    width, height = args.size[0]
    report = export_onnx(model, width, height, args.out, dtype=args.export_dtype,
                         check_images=max(1, args.check_images), progress=progress)
    print(f"wrote {report.path} ({width}x{height}, {report.dtype}); ONNX Runtime vs PyTorch max relative "
          f"error {report.max_rel_error:.2e} on {report.checked_images} random images; export {report.export_s:.1f} s")
    return 0


def run_build_engine(args: argparse.Namespace) -> int:
    """Run ``depthvlm build-engine``: a TensorRT engine and its sidecar for this GPU from an exported ONNX
    (exit code 0, 3 setup: no TensorRT or GPU, or a graph it cannot build)."""
    from depthvlm_ros.backends.tensorrt_backend import build_engine

    sidecar = build_engine(args.onnx, args.out, precision=args.precision, workspace_gb=args.workspace_gb,
                           progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(f"wrote {args.out} for {sidecar['gpu_name']} (TensorRT {sidecar['tensorrt_version']}, "
          f"{sidecar['precision']}, {sidecar['size'][0]}x{sidecar['size'][1]})")
    return 0
