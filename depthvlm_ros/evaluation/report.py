"""DepthVLM-Bench results for people and programs: the JSON report, a Markdown table, PNG plots.

JSON layout (metric dicts have exactly the keys of :data:`METRIC_KEYS`; null where nothing was
scored)::

    {"datasets": {NAME: {"sparse": {...}, "dense": {...}, "n_images": N, "n_skipped": N,
                         "skipped": [{"image": ..., "reason": ...}, ...at most 50],
                         "group": "indoor"|"outdoor"|"mixed"|null, "valid_range_m": [MIN, MAX]|null,
                         "range_source": ..., "pred_missing": {"sparse": F, "dense": F},
                         "temporal": {"tae": F, "tae_gt": F, "n_pairs": N} | null}},
     "groups": {GROUP: {"sparse": {...}, "dense": {...}, "datasets": [NAME, ...]}},
     "overall": {"sparse": {...}, "dense": {...}, "datasets": [NAME, ...]},
     "run": {"source": ..., "cache_hits": N, "computed": N}}

Dataset metrics are means over its images; group and overall metrics are means over the datasets
that scored at least one image (each dataset weighs the same). A dataset without a group (an
unknown name and no ``--group``) counts in "overall" only. ``pred_missing`` is the mean over
images of the fraction of GT-valid pixels that had no valid prediction (excluded from the metrics).
``temporal`` is set for datasets of sequences (records with poses): the mean TAE (percent, see
:mod:`depthvlm_ros.evaluation.temporal`) over the consecutive pairs scored, and the ground truth's own TAE on
the same pairs (the floor set by occlusions and the pixel grid).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from depthvlm_ros.evaluation.benchmark_data import GROUPS, BadRecord, DatasetSpec
from depthvlm_ros.evaluation.metrics import DEPTH_BIN_EDGES_M, HIGHER_IS_BETTER, METRIC_KEYS, mean_metrics

#: At most this many skipped records are listed per dataset in the JSON (all are counted).
MAX_LISTED_SKIPS = 50
PROTOCOLS: tuple[str, ...] = ("sparse", "dense")


@dataclass
class DatasetResults:
    """What a run produced for one dataset: per-image results (see ``score_record``) and skips, each with
    the position of its record in the JSONL (``order``, ``skipped_order``)."""

    spec: DatasetSpec
    images: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[BadRecord] = field(default_factory=list)
    cache_hits: int = 0
    order: list[int] = field(default_factory=list)
    skipped_order: list[int] = field(default_factory=list)

    def in_record_order(self) -> None:
        """Sort images and skips by record position: the report then does not depend on how records were
        batched or split between processes (means add up in one order)."""
        pairs = sorted(zip(self.order, self.images), key=lambda pair: pair[0])
        self.order, self.images = [i for i, _ in pairs], [r for _, r in pairs]
        skips = sorted(zip(self.skipped_order, self.skipped), key=lambda pair: pair[0])
        self.skipped_order, self.skipped = [i for i, _ in skips], [b for _, b in skips]

    def to_json(self) -> str:
        """What another process needs to merge these results (floats round-trip exactly)."""
        return json.dumps({"images": self.images, "order": self.order, "cache_hits": self.cache_hits,
                           "skipped": [[b.label, b.reason] for b in self.skipped],
                           "skipped_order": self.skipped_order})

    def merge_json(self, text: str) -> None:
        """Add the results another process sent (:meth:`to_json`); call :meth:`in_record_order` after."""
        data = json.loads(text)
        self.images += data["images"]
        self.order += data["order"]
        self.cache_hits += data["cache_hits"]
        self.skipped += [BadRecord(label, reason) for label, reason in data["skipped"]]
        self.skipped_order += data["skipped_order"]


@dataclass
class WorstPanel:
    """One row of a worst-images figure; depths in metres on the GT grid (or a display-size copy)."""

    image: str
    abs_rel: float
    gt: np.ndarray
    pred: np.ndarray
    rgb: np.ndarray | None = None  # uint8 (H, W, 3) on the same grid as gt, if readable


def _mean_or_none(values: Sequence[float]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def dataset_summary(results: DatasetResults) -> dict[str, Any]:
    """The JSON entry of one dataset (see the module docstring)."""
    spec = results.spec
    summary: dict[str, Any] = {p: mean_metrics(r[p] for r in results.images) for p in PROTOCOLS}
    summary.update({
        "n_images": len(results.images),
        "n_skipped": len(results.skipped),
        "skipped": [{"image": b.label, "reason": b.reason} for b in results.skipped[:MAX_LISTED_SKIPS]],
        "group": spec.group,
        "valid_range_m": None if not spec.has_range else [spec.depth_range.min_m, spec.depth_range.max_m],
        "range_source": spec.range_source,
        "pred_missing": {p: _mean_or_none([r["pred_missing"][p] for r in results.images]) for p in PROTOCOLS},
        "temporal": temporal_summary(results.images),
    })
    return summary


def temporal_summary(images: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Mean TAE and ground-truth TAE (percent) over the images that carry a temporal term; None if none does."""
    terms = [r["temporal"] for r in images if r.get("temporal")]
    if not terms:
        return None
    return {"tae": float(np.mean([t["tae"] for t in terms])), "tae_gt": float(np.mean([t["tae_gt"] for t in terms])),
            "n_pairs": len(terms)}


def _mean_over(datasets: dict[str, dict[str, Any]], names: list[str]) -> dict[str, Any]:
    scored = [n for n in names if datasets[n]["n_images"] > 0]
    out: dict[str, Any] = {p: mean_metrics(datasets[n][p] for n in scored) for p in PROTOCOLS}
    out["datasets"] = scored
    return out


def build_report(all_results: Sequence[DatasetResults], source: str) -> dict[str, Any]:
    """The JSON report of a run (layout in the module docstring)."""
    datasets = {r.spec.name: dataset_summary(r) for r in all_results}
    groups = {}
    for group in GROUPS:
        members = [name for name, d in datasets.items() if d["group"] == group]
        if members:
            groups[group] = _mean_over(datasets, members)
    return {
        "datasets": datasets,
        "groups": groups,
        "overall": _mean_over(datasets, list(datasets)),
        "run": {
            "source": source,
            "cache_hits": sum(r.cache_hits for r in all_results),
            "computed": sum(len(r.images) for r in all_results) - sum(r.cache_hits for r in all_results),
        },
    }


# -- Markdown -----------------------------------------------------------------------------------


def _fmt(value: float | None, key: str) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.3f}" if key in HIGHER_IS_BETTER or key == "silog" else f"{value:.4f}"


def _row(label: str, group: str, n: str, skipped: str, metrics: dict[str, float] | None) -> str:
    cells = [label, group, n, skipped] + [_fmt(None if metrics is None else metrics[k], k) for k in METRIC_KEYS]
    return "| " + " | ".join(cells) + " |"


def format_markdown(report: dict[str, Any]) -> str:
    """Two tables (sparse, dense): datasets, group means, overall mean; then notes."""
    header = "| dataset | group | images | skipped | " + " | ".join(METRIC_KEYS) + " |"
    rule = "|" + "---|" * (4 + len(METRIC_KEYS))
    lines = ["# DepthVLM-Bench", ""]
    for protocol in PROTOCOLS:
        lines += [f"## {protocol} protocol", "", header, rule]
        for name, d in report["datasets"].items():
            lines.append(_row(name, d["group"] or "-", str(d["n_images"]), str(d["n_skipped"]), d[protocol]))
        for group, g in report["groups"].items():
            lines.append(_row(f"**{group}**", f"mean of {len(g['datasets'])}", "", "", g[protocol]))
        overall = report["overall"]
        lines.append(_row("**overall**", f"mean of {len(overall['datasets'])}", "", "", overall[protocol]))
        lines.append("")
    lines += ["delta1-3: higher is better; the rest: lower is better. rmse and sq_rel in metres; silog = "
              "100 * std(ln pred - ln gt) (KITTI). Per image, then mean over images, then over datasets.", ""]
    for name, d in report["datasets"].items():
        temporal = d.get("temporal")
        if temporal:
            lines.append(f"- {name}: TAE {temporal['tae']:.2f} % over {temporal['n_pairs']} consecutive pairs "
                         f"(the ground truth's own: {temporal['tae_gt']:.2f} %; lower is better).")
        if d["valid_range_m"] is None:
            lines.append(f"- note: {name}: no preset depth range; scored GT > 0 and finite only "
                         "(give MIN,MAX in --dataset, or --min-depth and --max-depth with --bag, to set one).")
        if d["n_skipped"]:
            first = d["skipped"][0]
            lines.append(f"- {name}: {d['n_skipped']} record(s) skipped, listed in the JSON "
                         f"(first: {first['image']}: {first['reason']}).")
    return "\n".join(lines) + "\n"


# -- plots --------------------------------------------------------------------------------------


def slug(name: str) -> str:
    """A file-name-safe form of a dataset name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "dataset"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_delta1_bars(report: dict[str, Any], path: Path) -> Path:
    """Grouped bars of delta1 per dataset (sparse and dense), plus the overall mean."""
    plt = _pyplot()
    names = list(report["datasets"])
    entries = [(n, report["datasets"][n]) for n in names] + [("overall", report["overall"])]
    x = np.arange(len(entries))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(entries) + 2), 3.8))
    for i, protocol in enumerate(PROTOCOLS):
        values = [np.nan if e[protocol] is None else e[protocol]["delta1"] for _, e in entries]
        bars = ax.bar(x + (i - 0.5) * 0.38, values, width=0.38, label=protocol)
        ax.bar_label(bars, labels=["-" if not np.isfinite(v) else f"{v:.2f}" for v in values], fontsize=7)
    ax.set_xticks(x, [n for n, _ in entries], rotation=30, ha="right")
    ax.set_ylim(0, 1.25)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("delta1 (fraction < 1.25)")
    ax.set_title("DepthVLM-Bench: delta1 per dataset")
    ax.legend(loc="upper right", ncols=2, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def abs_rel_by_depth(images: Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """Dense AbsRel per GT-depth bin pooled over images (pixel-weighted), and the pixel counts."""
    n_bins = len(DEPTH_BIN_EDGES_M) - 1
    sums, counts = np.zeros(n_bins), np.zeros(n_bins, dtype=np.int64)
    for r in images:
        sums += np.asarray(r["abs_rel_by_depth"]["sum"], dtype=np.float64)
        counts += np.asarray(r["abs_rel_by_depth"]["count"], dtype=np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan), counts


def plot_abs_rel_by_depth(name: str, images: Sequence[dict[str, Any]], path: Path) -> Path:
    """Bars of dense AbsRel per GT-depth bin for one dataset (bins with pixels only)."""
    plt = _pyplot()
    values, counts = abs_rel_by_depth(images)
    edges = DEPTH_BIN_EDGES_M
    keep = np.flatnonzero(counts > 0)
    labels = [f"{edges[i]:g}-{edges[i + 1]:g}" if math.isfinite(edges[i + 1]) else f">{edges[i]:g}" for i in keep]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.7 * len(keep) + 2), 3.6))
    if len(keep):
        bars = ax.bar(np.arange(len(keep)), values[keep], color="tab:orange")
        ax.bar_label(bars, labels=[f"{c / counts.sum():.0%}" for c in counts[keep]], fontsize=7)
        ax.set_xticks(np.arange(len(keep)), labels, rotation=30, ha="right")
    else:
        ax.text(0.5, 0.5, "no scored pixels", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("GT depth bin (m); label: share of pixels")
    ax.set_ylabel("AbsRel (dense)")
    ax.set_title(f"{name}: AbsRel vs GT depth ({len(images)} images)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_worst_images(name: str, panels: Sequence[WorstPanel], path: Path) -> Path:
    """One row per image: RGB | GT | prediction (same colour range as GT) | AbsRel error (0..0.5)."""
    from depthvlm_ros.visualize import colorize_depth, depth_range

    plt = _pyplot()
    fig, axes = plt.subplots(len(panels), 4, figsize=(12, 2.6 * len(panels) + 0.3), squeeze=False)
    for row, panel in zip(axes, panels):
        lo, hi = depth_range(panel.gt)
        valid = np.isfinite(panel.gt) & (panel.gt > 0) & np.isfinite(panel.pred) & (panel.pred > 0)
        error = np.full(panel.gt.shape, np.nan, dtype=np.float32)
        error[valid] = np.abs(panel.pred[valid] - panel.gt[valid]) / panel.gt[valid]
        rgb = panel.rgb if panel.rgb is not None else np.full((*panel.gt.shape, 3), 128, dtype=np.uint8)
        row[0].imshow(rgb)
        row[0].set_title(f"{panel.image}" if panel.rgb is not None else f"{panel.image} (RGB unreadable)", fontsize=8)
        row[1].imshow(colorize_depth(panel.gt, lo, hi))
        row[1].set_title(f"GT {lo:.2f}-{hi:.2f} m (red near)", fontsize=8)
        row[2].imshow(colorize_depth(panel.pred, lo, hi))
        row[2].set_title("prediction (GT colour range)", fontsize=8)
        shown = row[3].imshow(np.ma.masked_invalid(error), cmap="magma", vmin=0.0, vmax=0.5)
        row[3].set_title(f"AbsRel {panel.abs_rel:.3f} (0..0.5)", fontsize=8)
        fig.colorbar(shown, ax=row[3], fraction=0.046, pad=0.02)
        for ax in row:
            ax.set_axis_off()
    fig.suptitle(f"{name}: worst {len(panels)} image(s) by dense AbsRel", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
