"""Temporal consistency of depth along a moving camera: TAE, as Video Depth Anything defines it (pure numpy).

TAE (temporal alignment error, Chen et al. 2025, "Video Depth Anything", section 4.1) projects frame k's depth
into frame k+1 with the known camera motion and intrinsics, and takes the AbsRel between the projected depth and
frame k+1's depth at the pixels it lands on; and the same from k+1 back to k. The mean of both directions over
all consecutive pairs is the TAE. A depth map that is consistent with the camera's motion scores 0.

Conventions here:

- depth: z-depth in metres on the image grid, NaN (or <= 0) where invalid;
- poses: 4x4 ``world_from_camera`` matrices of the camera's optical frame (x right, y down, z forward; REP 103),
  metres; frame k+1 sees a point ``X_k`` of frame k at ``inv(world_from_{k+1}) @ world_from_k @ X_k``;
- a projected point lands on the nearest pixel; it is compared when it lands inside the image in front of the
  camera and both depths there are valid;
- the metric models here predict metric depth, so nothing is aligned first (VDA aligns its affine-invariant
  predictions to the ground truth before scoring);
- reported as a percentage (AbsRel x 100), the unit of VDA's tables.

Occlusions are not masked (as in VDA): a point hidden in the other frame is compared with what hides it. That
floor is measured by scoring the ground truth itself (:func:`sequence_tae` on the true depths): a perfect
prediction scores the ground truth's TAE, not 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from depthvlm_ros.geometry import Intrinsics, depth_to_points


def reprojection_abs_rel(depth_a: np.ndarray, depth_b: np.ndarray, intrinsics: Intrinsics,
                         b_from_a: np.ndarray) -> tuple[float, int]:
    """(sum of |z_ab - d_b| / d_b, count) of frame a's depth projected into frame b.

    ``depth_a``, ``depth_b``: z-depth maps (metres) of one camera (``intrinsics``) at two poses; ``b_from_a``:
    the 4x4 transform taking points of a's optical frame to b's. ``z_ab`` is the depth of a's point in frame b,
    ``d_b`` frame b's depth at the nearest pixel it lands on.
    """
    points = depth_to_points(depth_a, intrinsics).reshape(-1, 3).astype(np.float64)
    points = points[np.isfinite(points).all(axis=1)]
    moved = points @ b_from_a[:3, :3].T + b_from_a[:3, 3]
    z = moved[:, 2]
    ahead = z > 1e-6
    moved, z = moved[ahead], z[ahead]
    cols = np.rint(moved[:, 0] / z * intrinsics.fx + intrinsics.cx)
    rows = np.rint(moved[:, 1] / z * intrinsics.fy + intrinsics.cy)
    inside = (cols >= 0) & (cols < intrinsics.width) & (rows >= 0) & (rows < intrinsics.height)
    cols, rows, z = cols[inside].astype(np.intp), rows[inside].astype(np.intp), z[inside]
    target = np.asarray(depth_b, dtype=np.float64)[rows, cols]
    with np.errstate(invalid="ignore"):
        valid = np.isfinite(target) & (target > 0)
    errors = np.abs(z[valid] - target[valid]) / target[valid]
    return float(errors.sum()), int(errors.size)


def pair_tae(depth_a: np.ndarray, depth_b: np.ndarray, intrinsics: Intrinsics, world_from_a: np.ndarray,
             world_from_b: np.ndarray, valid_a: np.ndarray | None = None,
             valid_b: np.ndarray | None = None) -> float | None:
    """TAE of one consecutive pair (percent): the mean of both directions' AbsRel; None when a direction has no
    pixel to compare. ``valid_a``/``valid_b`` (boolean maps, optional) restrict both frames to the pixels where
    the ground truth is valid, so that a prediction and the ground truth are scored on the same pixels."""
    if valid_a is not None:
        depth_a = np.where(valid_a, depth_a, np.nan)
    if valid_b is not None:
        depth_b = np.where(valid_b, depth_b, np.nan)
    b_from_a = np.linalg.inv(np.asarray(world_from_b, dtype=np.float64)) @ np.asarray(world_from_a, dtype=np.float64)
    total_ab, n_ab = reprojection_abs_rel(depth_a, depth_b, intrinsics, b_from_a)
    total_ba, n_ba = reprojection_abs_rel(depth_b, depth_a, intrinsics, np.linalg.inv(b_from_a))
    if n_ab == 0 or n_ba == 0:
        return None
    return 50.0 * (total_ab / n_ab + total_ba / n_ba)


def sequence_tae(depths: Sequence[np.ndarray], intrinsics: Intrinsics,
                 world_from_camera: Sequence[np.ndarray]) -> float | None:
    """TAE of a sequence (percent): the mean of :func:`pair_tae` over its consecutive frames; None when no pair
    could be scored."""
    if len(depths) != len(world_from_camera):
        raise ValueError(f"{len(depths)} depth maps but {len(world_from_camera)} poses")
    terms = [pair_tae(depths[i], depths[i + 1], intrinsics, world_from_camera[i], world_from_camera[i + 1])
             for i in range(len(depths) - 1)]
    scored = [t for t in terms if t is not None]
    return float(np.mean(scored)) if scored else None
