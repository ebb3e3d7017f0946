"""DepthVLM-Bench scoring on plain numpy arrays: per-image metrics and their averages.

Conventions (the paper's protocol):

- Depth is z-depth in metres. A pixel is *GT-valid* when the ground truth is finite and > 0 and,
  when the dataset has a valid range, ``min_m <= gt <= max_m`` (both ends inclusive). A pixel is
  *scored* when it is GT-valid **and** the prediction there is finite and > 0: non-positive or NaN
  predictions are excluded from the mask (they do not count as errors). How many GT-valid pixels
  lacked a valid prediction is reported separately per image as ``pred_missing`` (a fraction in
  0..1), so a model that leaves holes cannot hide them.
- Metrics over the scored pixels ``p`` (prediction) and ``g`` (ground truth), both in metres:

  ========== ==========================================================================
  delta1     fraction with ``max(p/g, g/p) < 1.25`` (delta2: ``< 1.25**2``, delta3: ``< 1.25**3``)
  abs_rel    ``mean(|p - g| / g)``
  sq_rel     ``mean((p - g)**2 / g)`` (metres)
  rmse       ``sqrt(mean((p - g)**2))`` (metres)
  rmse_log   ``sqrt(mean((ln p - ln g)**2))``
  log10      ``mean(|log10 p - log10 g|)``
  silog      ``sqrt(mean(d**2) - mean(d)**2) * 100`` with ``d = ln p - ln g``: the KITTI benchmark
             convention (variance weight lambda = 1, natural log, times 100); not the lambda = 0.85
             training loss.
  ========== ==========================================================================

- Averaging: metrics are computed per image, then the plain mean over a dataset's images, then
  the plain mean over datasets (for a group such as "indoor", and for "overall"). Every dataset
  weighs the same, whatever its size.
- Sparse protocol: ``pixel_coords`` are ``[col, row]`` (u, v) in depth-map pixels, pixel centres
  at integer coordinates; the prediction (already on the GT depth grid) is read at the nearest
  pixel, ``floor(u + 0.5)``, ``floor(v + 0.5)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from depthvlm_ros.errors import InputError

#: The nine metric keys, in report order.
METRIC_KEYS: tuple[str, ...] = (
    "delta1", "delta2", "delta3", "abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog",
)
#: Metrics where higher is better (the rest: lower is better).
HIGHER_IS_BETTER: frozenset[str] = frozenset({"delta1", "delta2", "delta3"})
#: Edges (metres) of the GT-depth bins used for "error vs depth" (last bin is open-ended).
DEPTH_BIN_EDGES_M: tuple[float, ...] = (
    0.0, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 50.0, 80.0, 120.0, math.inf,
)


@dataclass(frozen=True)
class DepthRange:
    """Valid ground-truth range in metres (inclusive); ``None`` bounds mean "gt > 0 and finite"."""

    min_m: float | None = None
    max_m: float | None = None


@dataclass(frozen=True)
class ImageScore:
    """Scores of one image under one protocol.

    ``metrics`` is None when no pixel could be scored (no GT-valid pixel, or no valid prediction
    at any of them). ``pred_missing`` = fraction of GT-valid pixels without a valid prediction
    (NaN when there is no GT-valid pixel).
    """

    metrics: dict[str, float] | None
    n_gt_valid: int
    n_scored: int
    pred_missing: float


def gt_valid_mask(gt: np.ndarray, depth_range: DepthRange = DepthRange()) -> np.ndarray:
    """Boolean mask of usable ground truth (metres): finite, > 0 and inside ``depth_range``."""
    gt = np.asarray(gt, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        mask = np.isfinite(gt) & (gt > 0)
        if depth_range.min_m is not None:
            mask &= gt >= depth_range.min_m
        if depth_range.max_m is not None:
            mask &= gt <= depth_range.max_m
    return mask


def pred_valid_mask(pred: np.ndarray) -> np.ndarray:
    """Boolean mask of usable predictions (metres): finite and > 0."""
    pred = np.asarray(pred, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return np.isfinite(pred) & (pred > 0)


def pair_metrics(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """The nine metrics of matched positive depths (metres, same shape, at least one element).

    No masking here: every element must already be finite and > 0 (see :func:`score_depths`).
    Computed in float64.
    """
    p = np.asarray(pred, dtype=np.float64).ravel()
    g = np.asarray(gt, dtype=np.float64).ravel()
    if p.shape != g.shape or p.size == 0:
        raise ValueError(f"need matched non-empty arrays, got {p.shape} and {g.shape}")
    ratio = np.maximum(p / g, g / p)
    diff = p - g
    log_diff = np.log(p) - np.log(g)
    silog_var = max(0.0, float(np.mean(log_diff**2) - np.mean(log_diff) ** 2))  # >= 0 up to rounding
    return {
        "delta1": float(np.mean(ratio < 1.25)),
        "delta2": float(np.mean(ratio < 1.25**2)),
        "delta3": float(np.mean(ratio < 1.25**3)),
        "abs_rel": float(np.mean(np.abs(diff) / g)),
        "sq_rel": float(np.mean(diff**2 / g)),
        "rmse": float(np.sqrt(np.mean(diff**2))),
        "rmse_log": float(np.sqrt(np.mean(log_diff**2))),
        "log10": float(np.mean(np.abs(np.log10(p) - np.log10(g)))),
        "silog": float(np.sqrt(silog_var) * 100.0),
    }


def score_depths(pred: np.ndarray, gt: np.ndarray, depth_range: DepthRange = DepthRange()) -> ImageScore:
    """Score predictions against ground truth of the same shape (metres), with the paper's mask."""
    pred = np.asarray(pred, dtype=np.float64)
    gt = np.asarray(gt, dtype=np.float64)
    if pred.shape != gt.shape:
        raise InputError(f"prediction shape {pred.shape} does not match ground truth {gt.shape}")
    gt_ok = gt_valid_mask(gt, depth_range)
    scored = gt_ok & pred_valid_mask(pred)
    n_gt, n_scored = int(gt_ok.sum()), int(scored.sum())
    missing = (n_gt - n_scored) / n_gt if n_gt else math.nan
    metrics = pair_metrics(pred[scored], gt[scored]) if n_scored else None
    return ImageScore(metrics=metrics, n_gt_valid=n_gt, n_scored=n_scored, pred_missing=missing)


def nearest_pixel_indices(pixel_coords: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of the nearest pixels to ``[col, row]`` coordinates on a ``width`` x ``height`` grid.

    Pixel centres are at integer coordinates, so the nearest pixel of ``u`` is ``floor(u + 0.5)``.
    Raises InputError for non-finite coordinates or ones whose nearest pixel is off the grid.
    """
    coords = np.asarray(pixel_coords, dtype=np.float64)
    if coords.size == 0:
        return np.zeros(0, dtype=np.intp), np.zeros(0, dtype=np.intp)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise InputError(f"pixel_coords must be a list of [col, row] pairs, got shape {coords.shape}")
    if not np.isfinite(coords).all():
        raise InputError("pixel_coords contain non-finite values")
    cols = np.floor(coords[:, 0] + 0.5).astype(np.intp)
    rows = np.floor(coords[:, 1] + 0.5).astype(np.intp)
    outside = (cols < 0) | (cols >= width) | (rows < 0) | (rows >= height)
    if outside.any():
        i = int(np.argmax(outside))
        raise InputError(
            f"{int(outside.sum())} pixel_coords outside the {width}x{height} depth map "
            f"(first: [col, row] = [{coords[i, 0]:g}, {coords[i, 1]:g}])"
        )
    return rows, cols


def sample_nearest(depth_map: np.ndarray, pixel_coords: np.ndarray) -> np.ndarray:
    """Values of an (H, W) map at ``[col, row]`` coordinates (nearest pixel; see module docstring)."""
    depth_map = np.asarray(depth_map)
    rows, cols = nearest_pixel_indices(pixel_coords, depth_map.shape[1], depth_map.shape[0])
    return depth_map[rows, cols]


def score_sparse(
    pred_on_gt_grid: np.ndarray,
    pixel_coords: np.ndarray,
    gt_values: Sequence[float] | np.ndarray,
    depth_range: DepthRange = DepthRange(),
) -> ImageScore:
    """Sparse protocol: the prediction (on the GT depth grid, metres) at ``[col, row]`` points vs
    the points' ground-truth depths (metres)."""
    gt_values = np.asarray(gt_values, dtype=np.float64).ravel()
    coords = np.asarray(pixel_coords, dtype=np.float64).reshape(-1, 2)
    if len(coords) != len(gt_values):
        raise InputError(f"{len(coords)} pixel_coords but {len(gt_values)} depth values")
    return score_depths(sample_nearest(pred_on_gt_grid, coords), gt_values, depth_range)


def score_dense(
    pred_on_gt_grid: np.ndarray, gt_map: np.ndarray, depth_range: DepthRange = DepthRange()
) -> ImageScore:
    """Dense protocol: the whole GT map vs the prediction resampled to the GT grid (metres)."""
    return score_depths(pred_on_gt_grid, gt_map, depth_range)


def abs_rel_by_depth_bin(
    pred: np.ndarray,
    gt: np.ndarray,
    depth_range: DepthRange = DepthRange(),
    edges_m: Sequence[float] = DEPTH_BIN_EDGES_M,
) -> tuple[list[float], list[int]]:
    """Per GT-depth bin: the sum of ``|p - g| / g`` over scored pixels and their count.

    Sums (not means) so that images pool by adding; bin ``i`` holds ``edges[i] <= g < edges[i+1]``.
    """
    pred = np.asarray(pred, dtype=np.float64)
    gt = np.asarray(gt, dtype=np.float64)
    scored = gt_valid_mask(gt, depth_range) & pred_valid_mask(pred)
    p, g = pred[scored], gt[scored]
    index = np.searchsorted(np.asarray(edges_m, dtype=np.float64), g, side="right") - 1
    n_bins = len(edges_m) - 1
    index = np.clip(index, 0, n_bins - 1)
    sums = np.bincount(index, weights=np.abs(p - g) / g, minlength=n_bins)
    counts = np.bincount(index, minlength=n_bins)
    return [float(v) for v in sums], [int(v) for v in counts]


def mean_metrics(per_item: Iterable[Mapping[str, float] | None]) -> dict[str, float] | None:
    """Plain mean of each metric over items (images, or datasets); None items are left out.

    Returns None when no item has metrics.
    """
    items = [m for m in per_item if m is not None]
    if not items:
        return None
    return {key: float(np.mean([m[key] for m in items])) for key in METRIC_KEYS}
