"""Spatial questions and answers from the generator's labels (templated, with true values).

Answers are Qwen-style: the place first, as JSON with a point on the 0-1000 relative scale
(``{"point_2d": [x, y], "label": "red chair"}``), then a sentence with metres. Points are rounded
to multiples of :data:`POINT_STEP` (a coarser target the tiny model learns faster; still a visible
pixel of the object at the image sizes the generator makes). Each record keeps the truth it was
made from, so answers can be scored (see :mod:`depthvlm_ros.evaluation.qa`).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from depthvlm_ros.scenes.render import SURFACES, ObjectLabel, Rendering

#: Relative-coordinate step of answer points (0-1000 scale).
POINT_STEP = 10
#: Smallest visible part (pixels, and fraction of the image) an object needs to be asked about.
MIN_QA_PIXELS = 150
MIN_QA_FRACTION = 0.003

QA_KINDS = ("distance", "closer", "between", "size", "at_pixel", "where")
#: Mixes of question kinds (relative weights, in :data:`QA_KINDS` order). ``binding`` favours the kinds whose
#: answer must find the named object in the image (where, how far, how tall, which is closer): what teaches a
#: model to bind a question's words to image regions (the built-in model's training, scripts/train_tiny.sh).
QA_MIXES: dict[str, tuple[float, ...]] = {
    "uniform": (1.0, 1.0, 1.0, 1.0, 1.0, 1.0),
    "binding": (3.0, 2.0, 1.0, 2.0, 1.0, 3.0),
}
TEMPLATES: dict[str, tuple[str, ...]] = {
    "distance": ("How far is the {a}?", "How far away is the {a}?", "What is the distance to the {a}?"),
    "closer": ("Which is closer, the {a} or the {b}?", "Is the {a} or the {b} closer to the camera?"),
    "between": ("What is the distance between the {a} and the {b}?", "How far apart are the {a} and the {b}?"),
    "size": ("How tall is the {a}?", "What is the height of the {a}?"),
    "at_pixel": ("What is at ({x}, {y})?", "What is at point ({x}, {y})?"),
    "where": ("Where is the {a}?", "Point to the {a}."),
}


def relative_point(u: float, v: float, width: int, height: int, step: int = POINT_STEP) -> tuple[int, int]:
    """Pixel centre (u, v) -> 0-1000 relative coordinates (edge-based, x first), rounded to ``step``."""
    x = (u + 0.5) / width * 1000.0
    y = (v + 0.5) / height * 1000.0
    return (int(min(1000, max(0, step * round(x / step)))), int(min(1000, max(0, step * round(y / step)))))


def pixel_of_relative(x: float, y: float, width: int, height: int) -> tuple[int, int]:
    """0-1000 relative coordinates -> the pixel (column, row) that contains them."""
    return (min(width - 1, max(0, int(x / 1000.0 * width))), min(height - 1, max(0, int(y / 1000.0 * height))))


def _place(label: str, point: tuple[int, int]) -> dict[str, Any]:
    return {"point_2d": [point[0], point[1]], "label": label}


def _json(value: Any) -> str:
    return json.dumps(value, separators=(", ", ": "))


def askable(labels: Sequence[ObjectLabel], width: int, height: int) -> list[ObjectLabel]:
    """Objects a question can name: big enough to ask about, and the only visible object with their label.

    A street repeats building colours (:mod:`~depthvlm_ros.scenes.layouts`), so two grey buildings can be in
    view; "where is the grey building?" then has two right answers and its truth would be one of them at random.
    Such labels are not asked about (any visible pixel of another object with the label counts)."""
    least = max(MIN_QA_PIXELS, MIN_QA_FRACTION * width * height)
    seen = Counter(lab.label for lab in labels)
    out = []
    for lab in labels:
        u0, v0, u1, v1 = lab.box_px
        if lab.visible_px >= least and u1 - u0 >= 3 and v1 - v0 >= 3 and seen[lab.label] == 1:
            out.append(lab)
    return out


def _answer_point(lab: ObjectLabel, view: Rendering) -> tuple[int, int] | None:
    """The label's point in relative coordinates, if its rounded pixel is still on the object."""
    k = view.intrinsics
    point = relative_point(*lab.point_px, k.width, k.height)
    u, v = pixel_of_relative(*point, k.width, k.height)
    return point if view.object_index[v, u] == lab.index else None


def _surface_point(lab: ObjectLabel, view: Rendering) -> np.ndarray:
    """3D point (optical frame, metres) of the label's answer pixel."""
    k = view.intrinsics
    u, v = lab.point_px
    z = float(view.depth[v, u])
    return np.array([(u - k.cx) / k.fx * z, (v - k.cy) / k.fy * z, z])


def make_qa(view: Rendering, rng: np.random.Generator, n: int = 4, mix: str = "uniform") -> list[dict[str, Any]]:
    """Up to ``n`` question/answer records about one view (kinds drawn at random, weighted by :data:`QA_MIXES`
    ``mix``; "uniform" draws exactly as before the mixes existed).

    Each record: ``kind``, ``question``, ``answer`` (the training target), ``places`` (the scene object index
    of each ``point_2d`` of the answer, in order; empty for "what is at (x, y)", whose point is the question's)
    and ``truth`` — the object(s) with their pixel boxes and scene indices, the true distance in metres for
    ``distance``/``between``, the true label for ``closer``/``at_pixel``, the true height for ``size``.
    """
    k = view.intrinsics
    objects = [(lab, p) for lab in askable(view.labels, k.width, k.height)
               if (p := _answer_point(lab, view)) is not None]
    weights = np.asarray(QA_MIXES[mix], dtype=np.float64)
    out: list[dict[str, Any]] = []
    for _ in range(4 * n):
        if len(out) >= n:
            break
        kind = (QA_KINDS[int(rng.integers(len(QA_KINDS)))] if mix == "uniform"
                else QA_KINDS[int(rng.choice(len(QA_KINDS), p=weights / weights.sum()))])
        record = _one(kind, objects, view, rng)
        if record is not None and all(r["question"] != record["question"] for r in out):
            out.append(record)
    return out


def _truth_object(lab: ObjectLabel) -> dict[str, Any]:
    return {"label": lab.label, "index": lab.index, "box_px": list(lab.box_px), "distance_m": round(lab.distance_m, 4),
            "depth_m": round(lab.depth_m, 4)}


def _one(kind: str, objects: list[tuple[ObjectLabel, tuple[int, int]]], view: Rendering,
         rng: np.random.Generator) -> dict[str, Any] | None:
    template = TEMPLATES[kind][int(rng.integers(len(TEMPLATES[kind])))]
    if kind == "at_pixel":
        return _at_pixel(template, view, rng)
    if not objects or (kind in ("closer", "between") and len(objects) < 2):
        return None
    i, j = (int(v) for v in rng.permutation(len(objects))[:2]) if len(objects) > 1 else (0, 0)
    (a, pa), (b, pb) = objects[i], objects[j]
    question = template.format(a=a.label, b=b.label)
    places = [a.index]
    if kind == "distance":
        answer = f"{_json(_place(a.label, pa))} The {a.label} is {a.distance_m:.1f} meters away."
        truth = {"objects": [_truth_object(a)], "distance_m": round(a.distance_m, 4)}
    elif kind == "where":
        answer = _json(_place(a.label, pa))
        truth = {"objects": [_truth_object(a)]}
    elif kind == "size":
        answer = f"{_json(_place(a.label, pa))} The {a.label} is {a.height_m:.1f} meters tall."
        truth = {"objects": [_truth_object(a)], "height_m": round(a.height_m, 4)}
    elif kind == "closer":
        if max(a.distance_m, b.distance_m) < 1.2 * min(a.distance_m, b.distance_m):
            return None  # too close to call
        near, p_near = (a, pa) if a.distance_m < b.distance_m else (b, pb)
        answer = f"{_json(_place(near.label, p_near))} The {near.label} is closer."
        truth = {"objects": [_truth_object(a), _truth_object(b)], "label": near.label}
        places = [near.index]
    else:  # between: straight-line distance of the two answer points on the objects' surfaces
        apart = float(np.linalg.norm(_surface_point(a, view) - _surface_point(b, view)))
        answer = (f"{_json([_place(a.label, pa), _place(b.label, pb)])} "
                  f"They are {apart:.1f} meters apart.")
        truth = {"objects": [_truth_object(a), _truth_object(b)], "distance_m": round(apart, 4)}
        places = [a.index, b.index]
    return {"kind": kind, "question": question, "answer": answer, "places": places, "truth": truth}


def _at_pixel(template: str, view: Rendering, rng: np.random.Generator) -> dict[str, Any] | None:
    k = view.intrinsics
    x, y = (int(v) for v in rng.integers(5, 100, size=2) * POINT_STEP)
    u, v = pixel_of_relative(x, y, k.width, k.height)
    index = int(view.object_index[v, u])
    if index >= 0:
        name = next((lab.label for lab in view.labels if lab.index == index), None)
        if name is None:
            return None
    else:
        name = SURFACES.get(int(view.surface[v, u]) if view.surface is not None else 0, "sky")
    z = float(view.depth[v, u])
    if math.isfinite(z):
        dist = z * math.sqrt(((u - k.cx) / k.fx) ** 2 + ((v - k.cy) / k.fy) ** 2 + 1.0)
        answer = f"{_json(_place(name, (x, y)))} The {name}, {dist:.1f} meters away."
        truth = {"label": name, "distance_m": round(dist, 4)}
    else:
        answer = f"{_json(_place(name, (x, y)))} The {name}."
        truth = {"label": name}
    return {"kind": "at_pixel", "question": template.format(x=x, y=y), "answer": answer, "places": [],
            "truth": truth}


def tokenizer_corpus() -> list[str]:
    """Every word and number the generated questions and answers use, for the tiny model's tokenizer."""
    from depthvlm_ros.model.processing import DEPTH_ANSWER, DEPTH_PROMPT, SYSTEM_PROMPT
    from depthvlm_ros.scenes.layouts import COLOURS, INDOOR_NAMES, OUTDOOR_NAMES

    lines = [SYSTEM_PROMPT, DEPTH_PROMPT, DEPTH_ANSWER]
    names = sorted(set(INDOOR_NAMES + OUTDOOR_NAMES))
    surfaces = sorted(set(SURFACES.values()))
    for colour in COLOURS:
        for name in names:
            label = f"{colour} {name}"
            for templates in TEMPLATES.values():
                for template in templates:
                    lines.append(template.format(a=label, b=f"{colour} {names[0]}", x=500, y=250))
            lines.append(f'{{"point_2d": [120, 340], "label": "{label}"}} The {label} is 2.4 meters away.')
            lines.append(f"The {label} is closer. The {label} is 1.2 meters tall. They are 3.5 meters apart.")
    for surface in surfaces:
        lines.append(f'{{"point_2d": [500, 900], "label": "{surface}"}} The {surface}, 1.5 meters away.')
    # Every number an answer writes, as a word of its own: coordinates (0-1000 in POINT_STEP) and
    # the whole metres of distances (0-99). The tokenizer keeps digit runs together, so each one
    # becomes a single token (a coordinate is one prediction, not three digits).
    numbers = sorted(set(range(0, 1001, POINT_STEP)) | set(range(100)))
    lines += [f"[{n}, {n}] {n}.5 meters" for n in numbers for _ in range(2)]
    return lines
