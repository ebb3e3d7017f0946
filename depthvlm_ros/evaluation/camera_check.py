"""Scale checked on your own camera: predicted depth scored against a reference depth camera (pure numpy).

``depthvlm eval --bag`` (:mod:`depthvlm_ros.tools.eval_bag`) reads a bag and hands the frames here:

- :class:`StampPairer` pairs reference and predicted frames by header stamp (nearest within a tolerance), in a
  bounded window, so a bag of any length is read in one pass with bounded memory;
- :func:`score_against_reference` scores one pair in the per-image layout of ``depthvlm eval`` (dense protocol
  only: a depth camera gives a map, not the Bench's sparse points) and adds the frame's median ratio
  reference / predicted;
- :func:`scale_summary` gives the camera's median ratio (the median of the frames' ratios) and the metrics the
  prediction would get multiplied by it (from a :class:`LogRatioHistogram`), which is what the node's
  ``depth_scale`` parameter does.

The reference is a depth camera aligned to the colour image (a RealSense ``aligned_depth_to_color``, a ZED
``depth``): 16UC1 millimetres or 32FC1 metres, 0 or NaN invalid. A prediction of another size is resampled to
the reference's grid (bilinear, NaN-aware; the aspect ratio must match).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from depthvlm_ros.evaluation.benchmark_data import align_to_grid
from depthvlm_ros.evaluation.metrics import (
    DepthRange,
    abs_rel_by_depth_bin,
    gt_valid_mask,
    pred_valid_mask,
    score_dense,
)

#: Frames of each side waiting for their partner (older ones are counted unpaired and dropped).
PAIR_WINDOW = 64


@dataclass
class StampPairer:
    """Pairs two streams by stamp (nanoseconds): each frame with the other side's nearest frame within
    ``max_dt_ns``, first come first served; unpaired frames wait in a window of :data:`PAIR_WINDOW` per side."""

    max_dt_ns: int
    window: int = PAIR_WINDOW
    waiting: tuple[OrderedDict[int, Any], OrderedDict[int, Any]] = field(
        default_factory=lambda: (OrderedDict(), OrderedDict()))
    dropped: list[int] = field(default_factory=lambda: [0, 0])

    def add(self, side: int, stamp_ns: int, item: Any) -> tuple[Any, Any] | None:
        """Offer a frame of ``side`` (0 reference, 1 predicted); the pair ``(reference item, predicted item)``
        when it completes one."""
        other = self.waiting[1 - side]
        best = min(other, key=lambda stamp: abs(stamp - stamp_ns), default=None)
        if best is not None and abs(best - stamp_ns) <= self.max_dt_ns:
            partner = other.pop(best)
            return (item, partner) if side == 0 else (partner, item)
        mine = self.waiting[side]
        if stamp_ns in mine:
            self.dropped[side] += 1  # a second frame with the same stamp: the first one is kept
            return None
        mine[stamp_ns] = item
        while len(mine) > self.window:
            mine.popitem(last=False)
            self.dropped[side] += 1
        return None

    def unpaired(self) -> tuple[int, int]:
        """Frames of each side (reference, predicted) that found no partner (so far)."""
        return self.dropped[0] + len(self.waiting[0]), self.dropped[1] + len(self.waiting[1])


def score_against_reference(pred: np.ndarray, reference: np.ndarray, depth_range: DepthRange, label: str,
                            histogram: LogRatioHistogram | None = None) -> dict[str, Any]:
    """One frame's result in ``depthvlm eval``'s per-image layout (dense only; ``sparse`` is None), plus
    ``median_ratio``: the median over the scored pixels of reference / predicted.

    ``pred``, ``reference``: depth in metres (NaN invalid); ``pred`` on any grid of the reference's aspect ratio.
    Raises InputError when the aspect ratios differ; a frame with nothing to score has ``dense`` None. The scored
    pixels go into ``histogram`` when one is given.
    """
    height, width = reference.shape
    aligned = align_to_grid(pred, width, height)
    score = score_dense(aligned, reference, depth_range)
    scored = gt_valid_mask(reference, depth_range) & pred_valid_mask(aligned)
    ratio = float(np.median(reference[scored] / aligned[scored])) if scored.any() else math.nan
    if histogram is not None and scored.any():
        histogram.add(aligned[scored], reference[scored])
    sums, counts = abs_rel_by_depth_bin(aligned, reference, depth_range)
    return {"image": label, "sparse": None, "dense": score.metrics,
            "pred_missing": {"sparse": None, "dense": score.pred_missing},
            "n_scored": {"sparse": 0, "dense": score.n_scored}, "abs_rel_by_depth": {"sum": sums, "count": counts},
            "median_ratio": ratio}


#: Bins of ln(reference / predicted) kept per camera: this width over +-LOG_RATIO_LIMIT (beyond: the end bins).
LOG_RATIO_BIN = 1e-3
LOG_RATIO_LIMIT = 4.0


class LogRatioHistogram:
    """What the metrics of ``depth_scale`` x prediction need, in bounded memory: per frame, the distribution of
    x = ln(reference / predicted) over its scored pixels (bins of :data:`LOG_RATIO_BIN`), weighted 1 / pixels so
    that the camera's sums are means over frames of per-frame means, as everywhere in ``eval``. δ1-3 and AbsRel
    of the prediction times any scale s depend on x alone: s p / g = s e^-x."""

    def __init__(self) -> None:
        self.edges = np.arange(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT + LOG_RATIO_BIN / 2, LOG_RATIO_BIN)
        self.centres = (self.edges[:-1] + self.edges[1:]) / 2
        self.weights = np.zeros(len(self.centres))
        self.frames = 0

    def add(self, pred: np.ndarray, reference: np.ndarray) -> None:
        """One frame's scored pixels (matched, finite, > 0; metres)."""
        x = np.clip(np.log(reference.astype(np.float64) / pred.astype(np.float64)), self.centres[0], self.centres[-1])
        counts, _ = np.histogram(x, bins=self.edges)
        self.weights += counts / max(1, x.size)
        self.frames += 1

    def metrics(self, scale: float) -> dict[str, float] | None:
        """Mean δ1, δ2, δ3 and AbsRel over the frames of the prediction times ``scale`` (to the bin width)."""
        if self.frames == 0:
            return None
        shifted = np.abs(self.centres - math.log(scale))  # |ln(g / (s p))|
        out = {f"delta{k}": float(self.weights[shifted < k * math.log(1.25)].sum() / self.frames) for k in (1, 2, 3)}
        out["abs_rel"] = float((self.weights * np.abs(scale * np.exp(-self.centres) - 1.0)).sum() / self.frames)
        return out


def scale_summary(ratios: list[float], histogram: LogRatioHistogram) -> dict[str, Any]:
    """The camera's scale: ``median_ratio`` (median over frames of their reference / predicted), the
    ``depth_scale`` that corrects it (the same number: the node multiplies depth by it), and ``dense_scaled``: δ1-3
    and AbsRel of the predictions multiplied by it (means over frames; ln-ratio bins of 0.001)."""
    finite = [r for r in ratios if math.isfinite(r)]
    median = float(np.median(finite)) if finite else None
    return {"median_ratio": median, "depth_scale": median, "n_frames": len(finite),
            "dense_scaled": histogram.metrics(median) if median is not None else None}
