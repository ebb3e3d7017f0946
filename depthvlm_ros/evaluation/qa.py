"""Scoring spatial answers against the generator's truth (``qa.jsonl`` of ``depthvlm generate``).

What a robot gets from ``~/spatial_query`` is scored, not the model's free text alone:

- **grounding** (``where``, ``distance``, ``size`` questions): the answer's first point must fall
  inside the named object's visible pixel box (a box: its centre must).
- **distance** (``distance`` questions): the distance measured on the predicted depth map at the
  answer's first place (:func:`~depthvlm_ros.spatial.answer_measurement`, what the node returns as
  ``distance_m``) must be within :data:`DISTANCE_TOLERANCE` of the true distance.
- **closer** / **at_pixel**: the first place's label must name the right thing.
- The distance written in the answer's text is scored too (``text_distance``), for information.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from depthvlm_ros.geometry import Intrinsics
from depthvlm_ros.spatial import answer_measurement, grounding_to_pixels, parse_grounding

#: Relative error allowed for a distance answer (25 %).
DISTANCE_TOLERANCE = 0.25
_METRES_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(?:m\b|meters?|metres?)")


@dataclass
class QAScore:
    """One answer's checks: None where a check does not apply to the question's kind."""

    kind: str
    grounded: bool | None = None
    distance_ok: bool | None = None
    distance_rel_err: float | None = None
    label_ok: bool | None = None
    text_distance_ok: bool | None = None


def place_on(box_px: Sequence[float], region_px: Sequence[float] | None) -> bool:
    """Whether a place (``[u_min, v_min, u_max, v_max]`` pixels; a point has u_min = u_max; None or
    empty = no place) lies on the inclusive pixel box ``box_px``: its centre must be inside."""
    if region_px is None or len(region_px) != 4:
        return False
    u, v = (region_px[0] + region_px[2]) / 2, (region_px[1] + region_px[3]) / 2
    u0, v0, u1, v1 = box_px
    return u0 - 0.5 <= u <= u1 + 0.5 and v0 - 0.5 <= v <= v1 + 0.5


def distance_error(measured_m: float, true_m: float) -> tuple[float | None, bool]:
    """Relative error of a measured distance (None when there is none: NaN) and whether it is within
    :data:`DISTANCE_TOLERANCE`."""
    if not math.isfinite(measured_m):
        return None, False
    error = abs(measured_m - true_m) / true_m
    return error, error <= DISTANCE_TOLERANCE


def score_answer(record: Mapping[str, Any], answer: str, depth: np.ndarray, depth_k: Intrinsics) -> QAScore:
    """Score one answer to a generated question, measuring on ``depth`` (metres, camera grid) as the
    node does: the answer's first place, and the distance on the depth map there."""
    width, height = (int(v) for v in record["original_rgb_size"])
    places = parse_grounding(answer)
    region = grounding_to_pixels(places[0], width, height) if places else None
    measured = math.nan
    if str(record["qa_kind"]) == "distance":
        found = answer_measurement(answer, depth, depth_k, (width, height))
        measured = found.measurement.distance_m if found is not None else math.nan
    return score_response(record, answer, region, measured)


def score_response(record: Mapping[str, Any], answer: str, region_px: Sequence[float] | None,
                   distance_m: float) -> QAScore:
    """Score what a robot gets for a generated question (``~/spatial_query``'s response): the answer's
    text, the image region its first place names (``[u_min, v_min, u_max, v_max]``, pixels of the
    input image; None or empty = none) and the distance measured there (metres; NaN = none)."""
    kind = str(record["qa_kind"])
    truth = record["truth"]
    score = QAScore(kind)
    if kind in ("where", "distance", "size"):
        score.grounded = place_on(truth["objects"][0]["box_px"], region_px)
    if kind == "distance":
        true = float(truth["distance_m"])
        score.distance_rel_err, score.distance_ok = distance_error(distance_m, true)
        said = _METRES_RE.search(answer)
        score.text_distance_ok = bool(said) and abs(float(said.group(1)) - true) / true <= DISTANCE_TOLERANCE
    if kind in ("closer", "at_pixel"):
        places = parse_grounding(answer)
        score.label_ok = bool(places) and (places[0].label or "").strip().lower() == str(truth["label"]).lower()
    return score


def summarize(scores: Iterable[QAScore]) -> dict[str, Any]:
    """Shares of passed checks (each over the answers it applies to), and counts per kind."""
    scores = list(scores)
    out: dict[str, Any] = {"answers": len(scores), "by_kind": {}}
    for name in ("grounded", "distance_ok", "label_ok", "text_distance_ok"):
        values = [getattr(s, name) for s in scores if getattr(s, name) is not None]
        out[name] = {"rate": (sum(values) / len(values)) if values else None, "n": len(values)}
    errors = [s.distance_rel_err for s in scores if s.distance_rel_err is not None]
    out["distance_median_rel_err"] = float(np.median(errors)) if errors else None
    for s in scores:
        out["by_kind"][s.kind] = out["by_kind"].get(s.kind, 0) + 1
    return out


def evaluate_qa(vlm: Any, data: Any, limit: int | None = None, max_new_tokens: int = 64, max_tokens: int = 0,
                progress: bool = False) -> dict[str, Any]:
    """Ask ``vlm`` (a :class:`~depthvlm_ros.pipeline.DepthVLM`) every question of ``data/qa.jsonl`` (the first
    ``limit``) and score what the node would return: ``{"summary": summarize(...), "answers": rows}``."""
    import json
    import sys
    from pathlib import Path

    from tqdm import tqdm

    from depthvlm_ros.errors import InputError
    from depthvlm_ros.pipeline.plan import RouteSettings
    from depthvlm_ros.training.data import load_sample, read_qa_samples

    path = Path(data) / "qa.jsonl"
    if not path.is_file():
        raise InputError(f"{data}: no qa.jsonl (make one with depthvlm generate)")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    refs = read_qa_samples(path, Path(data))
    if limit is not None:
        records, refs = records[:limit], refs[:limit]
    scores, rows = [], []
    for record, ref in tqdm(list(zip(records, refs)), unit="question", file=sys.stderr, disable=not progress or None):
        rgb, _, k = load_sample(ref)
        answer = vlm.ask(rgb, k, ref.question, max_new_tokens=max_new_tokens,
                         route=RouteSettings(max_tokens=max_tokens))
        score = score_answer(record, answer.text, answer.depth.depth, answer.depth.intrinsics)
        scores.append(score)
        rows.append({"question": ref.question, "answer": answer.text, "expected": ref.answer, **vars(score)})
    return {"summary": summarize(scores), "answers": rows}
