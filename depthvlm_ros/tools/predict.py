"""``depthvlm predict``: depth, 16-bit PNG, coloured view, point cloud and a JSON per image."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from depthvlm_ros.files import write_text_atomic
from depthvlm_ros.geometry import depth_to_16uc1, depth_to_points
from depthvlm_ros.tools.common import (
    add_backend_args,
    add_input_size_args,
    add_intrinsics_args,
    add_model_args,
    check_max_image_tokens,
    image_size,
    intrinsics_from_args,
    load_model,
    read_rgb,
)
from depthvlm_ros.visualize import add_scale_bar, colorize_depth, depth_range

if TYPE_CHECKING:
    from depthvlm_ros.pipeline import DepthResult


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``depthvlm predict`` subcommand's options."""
    p = sub.add_parser("predict", help="metric depth + point cloud for image files")
    p.add_argument("images", nargs="+", type=Path, help="image files (PNG, JPEG, ...)")
    p.add_argument("--out", type=Path, default=Path("outputs"), help="output folder (default: outputs)")
    add_intrinsics_args(p)
    add_input_size_args(p)
    add_model_args(p)
    add_backend_args(p)
    p.set_defaults(func=run)


def depth_stats(depth: np.ndarray) -> dict[str, float | int]:
    """The number of finite pixels of a depth map and their min, median, mean and max (metres); only the
    number when there are none."""
    valid = depth[np.isfinite(depth)]
    if valid.size == 0:
        return {"valid_pixels": 0}
    return {
        "valid_pixels": int(valid.size),
        "min_m": float(valid.min()),
        "median_m": float(np.median(valid)),
        "mean_m": float(valid.mean()),
        "max_m": float(valid.max()),
    }


def write_point_cloud(path: Path, points: np.ndarray, rgb: np.ndarray) -> int:
    """Write the valid points of an organized cloud, coloured, as binary PLY (Open3D)."""
    import open3d as o3d

    valid = np.isfinite(points[..., 2])
    cloud = o3d.geometry.PointCloud()
    cloud.points = o3d.utility.Vector3dVector(points[valid].astype(np.float64))
    cloud.colors = o3d.utility.Vector3dVector(rgb[valid].astype(np.float64) / 255.0)
    if not o3d.io.write_point_cloud(str(path), cloud, write_ascii=False):
        raise OSError(f"open3d could not write {path}")
    return int(valid.sum())


def write_outputs(
    out_dir: Path, name: str, rgb: np.ndarray, result: DepthResult, model_name: str, backend: str = "torch"
) -> list[Path]:
    """The five files of one prediction; returns their paths."""
    from PIL import Image

    depth = result.depth
    suffixes = ("_depth.npy", "_depth.png", "_depth_color.png", ".ply", ".json")
    paths = [out_dir / f"{name}{suffix}" for suffix in suffixes]
    np.save(paths[0], depth.astype(np.float32))
    Image.fromarray(depth_to_16uc1(depth)).save(paths[1])
    lo, hi = depth_range(depth)
    Image.fromarray(add_scale_bar(colorize_depth(depth, lo, hi), lo, hi)).save(paths[2])
    n_points = write_point_cloud(paths[3], depth_to_points(depth, result.intrinsics), rgb)
    summary = {
        "model": model_name,
        "backend": backend,
        "camera": {"size": list(result.intrinsics.size), "K": result.intrinsics.k.tolist()},
        "model_grid": {"size": list(result.intrinsics_model.size), "K": result.intrinsics_model.k.tolist()},
        "depth": depth_stats(depth),
        "points": n_points,
        "timings_ms": {k: round(v, 3) for k, v in result.timings_ms.items()},
        "files": [p.name for p in paths[:4]],
        "depth_png": "16UC1 millimetres, 0 = invalid",
    }
    write_text_atomic(paths[4], json.dumps(summary, indent=2) + "\n")
    return paths


def run(args: argparse.Namespace) -> int:
    """Run ``depthvlm predict``: per image, depth (.npy, 16-bit PNG in mm, coloured PNG), a PLY cloud and a JSON
    summary in --out; every input is checked before the model loads (exit code 0, 2 bad input, 3 setup)."""
    from tqdm import tqdm

    from depthvlm_ros.pipeline.plan import RouteSettings

    # Every input is checked (header only: memory stays one image) before the model loads.
    intrinsics = [intrinsics_from_args(args, *image_size(path)) for path in args.images]
    max_tokens = check_max_image_tokens(args)
    model = load_model(args)
    args.out.mkdir(parents=True, exist_ok=True)
    for path, k in tqdm(list(zip(args.images, intrinsics)), desc="predict", unit="img",
                        disable=len(args.images) < 2 or None, file=sys.stderr):
        rgb = read_rgb(path)
        result = model.predict_depth(rgb, k, RouteSettings(max_tokens=max_tokens))
        written = write_outputs(args.out, path.stem, rgb, result, model.name, model.backend.describe())
        stats = depth_stats(result.depth)
        print(f"{path}: depth {stats.get('min_m', float('nan')):.2f}-{stats.get('max_m', float('nan')):.2f} m, "
              f"{sum(result.timings_ms.values()):.0f} ms -> {written[0].parent}/{path.stem}_*")
    print(f"wrote {len(args.images) * 5} files to {args.out.resolve()}")
    return 0
