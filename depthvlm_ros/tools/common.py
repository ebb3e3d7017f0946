"""Pieces every offline tool shares: model and intrinsics arguments, image reading."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from depthvlm_ros.errors import InputError
from depthvlm_ros.geometry import MAX_IMAGE_SIDE, Intrinsics, intrinsics_for_image


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, help="DepthVLM folder (default: the built-in model)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="weights dtype")


def add_intrinsics_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
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


def load_model(args: argparse.Namespace):
    """Load --model (or the built-in default, telling the user which) on --device/--dtype."""
    from depthvlm_ros.model.default import default_model_dir
    from depthvlm_ros.model.pipeline import DepthVLM

    folder, note = (args.model, None) if args.model is not None else default_model_dir()
    if note:
        print(f"note: {note}", file=sys.stderr)
    return DepthVLM.from_pretrained(folder, device=args.device, dtype=args.dtype)


def read_rgb(path: Path) -> np.ndarray:
    """Read an image file as RGB uint8 (H, W, 3); InputError if missing, corrupt or too large."""
    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_SIDE * MAX_IMAGE_SIDE
    try:
        with Image.open(path) as img:
            if max(img.size) > MAX_IMAGE_SIDE:
                raise InputError(f"{path}: image {img.size[0]}x{img.size[1]} exceeds {MAX_IMAGE_SIDE} px")
            return np.asarray(img.convert("RGB"))
    except FileNotFoundError:
        raise InputError(f"{path}: no such image") from None
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise InputError(f"{path}: cannot read image ({exc.__class__.__name__})") from None
