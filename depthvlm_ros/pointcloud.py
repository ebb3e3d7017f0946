"""Organized point clouds as numpy structured arrays (the layout of ``sensor_msgs/PointCloud2``).

Pure numpy: the ROS layer only wraps the bytes (:func:`depthvlm_ros.ros.messages.cloud_to_msg`).
Points are in the image's optical frame (x right, y down, z forward), in metres.
"""

from __future__ import annotations

import math

import numpy as np

from depthvlm_ros.errors import InputError
from depthvlm_ros.geometry import Intrinsics


def cloud_dtype(color: bool) -> np.dtype:
    """The record layout of the node's clouds: x, y, z float32 (+ rgb packed in a float32), 16 bytes."""
    names = ["x", "y", "z"] + (["rgb"] if color else [])
    return np.dtype({"names": names, "formats": [np.float32] * len(names),
                     "offsets": [0, 4, 8, 12][: len(names)], "itemsize": 16 if color else 12})


def pack_rgb(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 RGB packed as float32 the way PCL and RViz read ``rgb`` (0x00RRGGBB bits)."""
    rgb = np.asarray(rgb, dtype=np.uint8)
    packed = (rgb[..., 0].astype(np.uint32) << 16) | (rgb[..., 1].astype(np.uint32) << 8) | rgb[..., 2]
    return packed.view(np.float32)


def unpack_rgb(packed: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack_rgb`: float32 ``rgb`` field -> (..., 3) uint8."""
    bits = np.asarray(packed, dtype=np.float32).view(np.uint32)
    return np.stack([(bits >> 16) & 255, (bits >> 8) & 255, bits & 255], axis=-1).astype(np.uint8)


def organized_cloud(
    depth: np.ndarray,
    intrinsics: Intrinsics,
    rgb: np.ndarray | None = None,
    stride: int = 1,
    max_range_m: float = math.inf,
    out: np.ndarray | None = None,
    outlier_radius_m: float = 0.0,
    outlier_min_neighbors: int = 2,
) -> np.ndarray:
    """An organized cloud (rows x cols structured array, :func:`cloud_dtype`) from z-depth in metres.

    Pixel (row i, col j) of the cloud is camera pixel ``(u, v) = (stride j, stride i)`` back-projected
    through ``intrinsics`` (which describe ``depth``). Invalid depth, and points farther than
    ``max_range_m`` from the optical centre, are NaN (REP 117: the cloud stays organized).
    ``rgb`` (H, W, 3) uint8 of the same grid adds the packed ``rgb`` field. ``out``: a
    C-contiguous (rows, cols, 3 or 4) float32 array to build the cloud in (a message's buffer).
    ``outlier_radius_m`` > 0 also makes NaN the points with fewer than ``outlier_min_neighbors`` of their 8 grid
    neighbours within that radius (:func:`radius_outliers`).
    """
    depth = np.asarray(depth, dtype=np.float32)
    if depth.shape != (intrinsics.height, intrinsics.width):
        raise InputError(f"depth {depth.shape[1]}x{depth.shape[0]} does not match K's "
                         f"{intrinsics.width}x{intrinsics.height}")
    if stride < 1:
        raise InputError(f"point-cloud stride must be >= 1, got {stride}")
    u = np.arange(0, intrinsics.width, stride, dtype=np.float32)
    v = np.arange(0, intrinsics.height, stride, dtype=np.float32)
    xn = (u - np.float32(intrinsics.cx)) / np.float32(intrinsics.fx)
    yn = (v - np.float32(intrinsics.cy)) / np.float32(intrinsics.fy)
    z = depth[::stride, ::stride]
    rows, cols = z.shape
    shape = (rows, cols, 4 if rgb is not None else 3)
    if rgb is not None and rgb.shape[:2] != depth.shape:
        raise InputError(f"colour image {rgb.shape[1]}x{rgb.shape[0]} does not match the depth grid")
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    elif out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise InputError(f"cloud buffer must be C-contiguous float32 {shape}, got {out.dtype} {out.shape}")
    valid = (z > 0) & (z < np.inf)  # NaN compares False
    if math.isfinite(max_range_m):  # range = z * |(xn, yn, 1)|
        valid &= z * np.sqrt(1.0 + xn[None, :] ** 2 + yn[:, None] ** 2) <= np.float32(max_range_m)
    if not valid.all():
        z = np.where(valid, z, np.float32(np.nan))
    np.multiply(z, xn[None, :], out=out[..., 0])
    np.multiply(z, yn[:, None], out=out[..., 1])
    out[..., 2] = z
    if outlier_radius_m > 0:
        out[radius_outliers(out[..., :3], outlier_radius_m, outlier_min_neighbors), :3] = np.float32(np.nan)
    if rgb is not None:
        src = rgb[::stride, ::stride]
        if np.little_endian:  # the rgb float's bytes are B, G, R, 0: gather them, then one 4-byte copy
            bgrx = np.zeros((rows, cols, 4), dtype=np.uint8)
            for channel in range(3):
                bgrx[..., 2 - channel] = src[..., channel]
            out[..., 3] = bgrx.view(np.float32)[..., 0]
        else:
            out[..., 3] = pack_rgb(src)
    return out.view(cloud_dtype(rgb is not None))[..., 0]


def radius_outliers(xyz: np.ndarray, radius_m: float, min_neighbors: int) -> np.ndarray:
    """Radius outlier removal on an organized cloud: True where a valid point has fewer than ``min_neighbors`` of
    its 8 grid neighbours (the 3x3 window of the organized grid, a cheap stand-in for PCL's search of the whole
    cloud) within ``radius_m`` metres in 3D.

    ``xyz``: (rows, cols, 3) float32 metres, NaN invalid. Points in a region whose grid spacing (z x stride / fx)
    exceeds the radius have no neighbour within it and are all removed: choose the radius above the spacing at
    the farthest range you keep. Cost: 8 shifted differences of the cloud.
    """
    rows, cols, _ = xyz.shape
    planes = [np.ascontiguousarray(xyz[..., c]) for c in range(3)]
    near = np.zeros((rows, cols), dtype=np.int8)
    limit = np.float32(radius_m) ** 2
    gap = np.empty((rows, cols), dtype=np.float32)
    square = np.empty((rows, cols), dtype=np.float32)
    for di, dj in ((0, 1), (1, -1), (1, 0), (1, 1)):  # each pair once; both points count it
        here = (slice(0, rows - di), slice(max(0, -dj), cols - max(0, dj)))
        there = (slice(di, rows), slice(max(0, dj), cols - max(0, -dj)))
        dist = square[here]
        dist.fill(0.0)
        for plane in planes:
            np.subtract(plane[here], plane[there], out=gap[here])
            dist += gap[here] * gap[here]
        with np.errstate(invalid="ignore"):
            close = dist <= limit  # NaN: not close
        near[here] += close
        near[there] += close
    return np.isfinite(xyz[..., 2]) & (near < min_neighbors)
