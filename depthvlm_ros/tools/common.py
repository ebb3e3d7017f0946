"""Pieces every offline tool shares: model and intrinsics arguments, image reading."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from depthvlm_ros.errors import InputError
from depthvlm_ros.geometry import DEFAULT_MAX_IMAGE_TOKENS, MAX_IMAGE_SIDE, Intrinsics, intrinsics_for_image


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--device`` and ``--dtype``: which model folder, on which device, in which weights dtype."""
    parser.add_argument("--model", type=Path, help="DepthVLM folder (default: the built-in model)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="weights dtype")


def add_input_size_args(parser: argparse.ArgumentParser, default: int = DEFAULT_MAX_IMAGE_TOKENS) -> None:
    """``--max-image-tokens``: the bound on the model input (as the node's ``max_image_tokens``)."""
    parser.add_argument(
        "--max-image-tokens", type=int, default=default, metavar="N",
        help=f"at most N image tokens (32x32 px each) reach the model (default {default}; 0 = only the model's own "
             "max_pixels); larger canonical sizes take the canonical-camera route (depth x fx'/1000)")


def check_max_image_tokens(args: argparse.Namespace) -> int:
    """The --max-image-tokens value, checked (InputError: exit code 2)."""
    if not 0 <= args.max_image_tokens <= 65536:
        raise InputError(f"--max-image-tokens must be in 0..65536, got {args.max_image_tokens}")
    return args.max_image_tokens


def add_backend_args(parser: argparse.ArgumentParser) -> None:
    """The "depth backend" options: ``--backend`` and its settings (the Triton server, ONNX graphs, TensorRT
    engines, fallback, torch.compile)."""
    from depthvlm_ros.backends.base import BACKENDS, TRITON
    from depthvlm_ros.backends.triton_backend import DEFAULT_URL, REQUEST_TIMEOUT_S
    from depthvlm_ros.backends.triton_repo import DEFAULT_PREFIX

    group = parser.add_argument_group("depth backend")
    group.add_argument("--backend", default="torch", choices=("auto", *BACKENDS, TRITON),
                       help="what runs the depth path (default torch, the reference the parity tests hold; auto: "
                            "tensorrt with an --engine and CUDA, torch on --device cuda, else onnxruntime on the CPU; "
                            "triton: a Triton server at --triton-url)")
    group.add_argument("--triton-url", default=DEFAULT_URL, help=f"Triton gRPC address (default {DEFAULT_URL})")
    group.add_argument("--triton-model", default=DEFAULT_PREFIX,
                       help=f"served models are named NAME_WxH (default {DEFAULT_PREFIX})")
    group.add_argument("--triton-token-file", default="", metavar="FILE",
                       help="the server's access token (first line; mode 600); default $DEPTHVLM_TRITON_TOKEN, else "
                            "the file depthvlm serve writes")
    group.add_argument("--triton-timeout", type=float, default=REQUEST_TIMEOUT_S, metavar="S",
                       help=f"longest one request may take (default {REQUEST_TIMEOUT_S:g} s)")
    group.add_argument("--triton-tls-root-cert", default="", metavar="PEM", help="server's root certificate: TLS")
    group.add_argument("--triton-tls-cert", default="", metavar="PEM", help="client certificate (mutual TLS)")
    group.add_argument("--triton-tls-key", default="", metavar="PEM", help="client key (mutual TLS)")
    group.add_argument("--onnx", type=Path, action="append", default=[],
                       help="exported graph for onnxruntime (repeatable; default: export each size once, cached)")
    group.add_argument("--engine", type=Path, action="append", default=[], help="TensorRT engine (repeatable)")
    group.add_argument("--backend-fallback", action="store_true",
                       help="if the backend is refused, fall back to the next (tensorrt -> onnxruntime -> torch)")
    group.add_argument("--compile", nargs="?", const="default", default="none", choices=("none", "default", "graphs"),
                       help="the torch backend's depth forward: none (eager, the default), default "
                            "(torch.compile, fullgraph; --compile alone), graphs (that, replayed as CUDA graphs; CUDA "
                            "only)")


def parse_size(text: str) -> tuple[int, int]:
    """'640x480' -> (640, 480); argparse type for --size."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 640x480, got {text!r}") from None
    if not (32 <= w <= MAX_IMAGE_SIDE and 32 <= h <= MAX_IMAGE_SIDE):
        raise argparse.ArgumentTypeError(f"size {w}x{h} outside 32..{MAX_IMAGE_SIDE}")
    return w, h


def add_intrinsics_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """The intrinsics options (pixels): ``--fx``/``--fy``/``--cx``/``--cy`` or ``--camera-info``;
    ``required`` is kept as the parser's ``_intrinsics_required`` default."""
    group = parser.add_argument_group("intrinsics (pixels; --fx or --camera-info)")
    group.add_argument("--fx", type=float, help="focal length x in pixels")
    group.add_argument("--fy", type=float, help="focal length y (default: fx)")
    group.add_argument("--cx", type=float, help="principal point x (default: image centre)")
    group.add_argument("--cy", type=float, help="principal point y (default: image centre)")
    group.add_argument("--camera-info", type=Path, help="camera-info YAML (ROS calibration format)")
    parser.set_defaults(_intrinsics_required=required)


def intrinsics_from_args(args: argparse.Namespace, width: int, height: int) -> Intrinsics:
    """Intrinsics for a ``width`` x ``height`` image from --camera-info or --fx/--fy/--cx/--cy."""
    if args.camera_info is not None:
        return intrinsics_for_image(Intrinsics.from_yaml(args.camera_info), width, height)
    if args.fx is None:
        raise InputError("give the camera's focal length: --fx F (pixels) or --camera-info YAML")
    return Intrinsics.from_fx(width, height, args.fx, args.fy, args.cx, args.cy)


def announce_model(folder: Path | None) -> Path:
    """The folder ``--model`` means (None: the built-in default); its one-line note, if it has one (the
    built-in model's limits, or that the initialised model means nothing), goes to stderr once."""
    from depthvlm_ros.model.default import resolve_model

    folder, note = resolve_model(folder)
    if note:
        print(f"note: {note}", file=sys.stderr, flush=True)
    return folder


def note(line: str) -> None:
    """A tool's note on stderr (the model it serves, the backend's choice, a fallback)."""
    print(f"note: {line}", file=sys.stderr, flush=True)


def load_model(args: argparse.Namespace, backend: str | None = None):
    """The finished model: --model (or the built-in default, telling the user which) on --device/--dtype, with
    the depth backend the backend arguments name (``backend`` overrides --backend)."""
    from depthvlm_ros.pipeline import DepthVLM

    spec = backend_spec(args, backend or getattr(args, "backend", "torch"))
    return DepthVLM.from_pretrained(announce_model(args.model), device=args.device, dtype=args.dtype, backend=spec,
                                    log=note)


def backend_spec(args: argparse.Namespace, name: str):
    """The :class:`~depthvlm_ros.backends.BackendSpec` of the backend arguments (``name``: which backend)."""
    from depthvlm_ros.backends import BackendSpec

    triton = None
    if name == "triton":
        from depthvlm_ros.backends.triton_backend import TritonConnection

        if not 0.05 <= args.triton_timeout <= 600:
            raise InputError(f"--triton-timeout must be in 0.05..600 s, got {args.triton_timeout:g}")
        triton = TritonConnection.from_settings(args.triton_url, args.triton_model, args.triton_token_file,
                                                args.triton_timeout, args.triton_tls_root_cert, args.triton_tls_cert,
                                                args.triton_tls_key)
    # Every graph or engine given is held (the tools have no max_compiled_sizes); without any, the
    # backend's default: sizes exported on demand share 4 places, least recently used first.
    onnx, engines = tuple(getattr(args, "onnx", ())), tuple(getattr(args, "engine", ()))
    return BackendSpec(name=name, device=args.device, onnx=onnx, engines=engines,
                       compile=getattr(args, "compile", "none"), head_output=getattr(args, "head_output", "model_grid"),
                       fallback=getattr(args, "backend_fallback", False),
                       max_sizes=max(len(onnx), len(engines)), triton=triton)


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image file from its header; InputError if missing, corrupt, too large or not in a
    format the package reads (:mod:`depthvlm_ros.imageio`)."""
    from depthvlm_ros.imageio import image_size as read_size

    return read_size(path)


def read_rgb(path: Path) -> np.ndarray:
    """Read an 8-bit image file as RGB uint8 (H, W, 3); InputError if missing, corrupt, too large, 16-bit or
    not in a format the package reads (:mod:`depthvlm_ros.imageio`)."""
    from depthvlm_ros.imageio import read_rgb as read

    return read(path, str(path))


def add_batching_args(p: argparse.ArgumentParser) -> None:
    """Triton's dynamic batching options: --max-batch (images per execution) and --queue-delay-us
    (microseconds the batcher waits to fill a batch)."""
    from depthvlm_ros.backends.triton_repo import DEFAULT_MAX_BATCH, DEFAULT_QUEUE_DELAY_US

    p.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH,
                   help=f"largest batch of one execution (default {DEFAULT_MAX_BATCH})")
    p.add_argument("--queue-delay-us", type=int, default=DEFAULT_QUEUE_DELAY_US,
                   help=f"how long the dynamic batcher waits to fill a batch (default {DEFAULT_QUEUE_DELAY_US} us)")
