"""Spatial queries: turn a grounded answer (boxes / points) plus a depth map into metres.

Pure numpy + stdlib. Conventions (those of :mod:`depthvlm_ros.geometry`):

- Qwen3-VL grounds places in coordinates RELATIVE to the image on a 0-1000 scale, x first.
  0 is the left/top edge of the image and 1000 the right/bottom edge.
- Pixel coordinates ``(u, v)`` are continuous with the centre of the top-left pixel at (0, 0), so an
  image of ``W`` x ``H`` pixels spans ``[-0.5, W - 0.5] x [-0.5, H - 0.5]``.
- Depth is z-depth in metres (NaN, inf or <= 0 = invalid); points are in the camera's optical frame
  (x right, y down, z forward), back-projected through the depth map's intrinsics.
- The depth map may have another resolution than the input image, with the same field of view:
  ``u_depth = (u + 0.5) * w / W - 0.5`` (the convention of :meth:`Intrinsics.resized`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from depthvlm_ros.errors import InputError
from depthvlm_ros.geometry import MAX_IMAGE_SIDE, Intrinsics

#: Characters of an answer that are searched for groundings (the rest is ignored).
MAX_ANSWER_CHARS = 20000
#: Most groundings returned by :func:`parse_grounding`.
MAX_GROUNDINGS = 16
#: Default most pixels per :func:`depth_at_pixels` call.
MAX_DEPTH_AT_PIXELS = 10000
#: Side of the depth-grid window (pixels) whose median is a point's depth.
POINT_WINDOW = 5
#: Most depth pixels a box statistic looks at (larger regions are subsampled on a regular grid).
MAX_BOX_SAMPLES = 65536

_BOX_KEYS = ("bbox_2d", "bbox", "box_2d", "box")
_POINT_KEYS = ("point_2d", "point")
_NUM = r"[-+]?(?:\d{1,12}(?:\.\d{0,12})?|\.\d{1,12})(?:[eE][-+]?\d{1,4})?"
_KEY_RE = re.compile(r'["\']?(bbox_2d|point_2d)["\']?\s*:\s*\[([^\[\]]{0,200})\]')
_NUM_RE = re.compile(_NUM)
_LABEL_RE = re.compile(r'["\']label["\']\s*:\s*(?:"([^"\n]{0,100})"|\'([^\'\n]{0,100})\')')
_TOKEN_RE = re.compile(
    r"(?:<\|object_ref_start\|>([^<]{0,200})<\|object_ref_end\|>\s*)?<\|box_start\|>\s*"
    rf"\(\s*({_NUM})\s*,\s*({_NUM})\s*\)\s*,\s*\(\s*({_NUM})\s*,\s*({_NUM})\s*\)\s*<\|box_end\|>"
)


@dataclass(frozen=True)
class Grounding:
    """A place named by the model: ``coords`` on the 0-1000 relative scale (x first)."""

    kind: Literal["box", "point"]
    coords: tuple[float, ...]  # box: (x1, y1, x2, y2) with x1 <= x2, y1 <= y2; point: (x, y)
    label: str | None = None


@dataclass(frozen=True)
class Measurement:
    """Depth of an image region. Lengths in metres, pixels of the input image, optical frame."""

    depth_m: float  # z-depth of the region (NaN if none)
    point: tuple[float, float, float]  # (x, y, z) at the region's representative pixel
    distance_m: float  # |point|: straight-line distance from the optical centre, not z
    n_valid: int  # depth pixels the statistic used
    region_px: tuple[float, float, float, float]  # [u_min, v_min, u_max, v_max]; a point is [u, v, u, v]
    method: str  # how depth_m was obtained, or why there is none


@dataclass(frozen=True)
class QueryMeasurement:
    """The measurement of the first place an answer names."""

    grounding: Grounding
    measurement: Measurement
    n_groundings: int
    message: str


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        number = float(value)
    except (ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def _make(kind: str, values: Sequence[Any], label: Any) -> Grounding | None:
    """A Grounding from raw values, or None if they are not 4 (box) / 2 (point) finite numbers."""
    if kind == "box" and len(values) == 2 and all(isinstance(p, list) and len(p) == 2 for p in values):
        values = [*values[0], *values[1]]  # [[x1, y1], [x2, y2]]
    if len(values) != (4 if kind == "box" else 2):
        return None
    nums = [_number(x) for x in values]
    if any(x is None for x in nums):
        return None
    c = [min(max(x, 0.0), 1000.0) for x in nums]
    if kind == "box":
        c = [min(c[0], c[2]), min(c[1], c[3]), max(c[0], c[2]), max(c[1], c[3])]
    name = (label.strip()[:100] or None) if isinstance(label, str) else None
    return Grounding(kind, tuple(c), name)  # type: ignore[arg-type]


def _walk(obj: Any, out: list[Grounding], depth: int = 0) -> None:
    if len(out) >= MAX_GROUNDINGS or depth > 8:
        return
    if isinstance(obj, dict):
        for kind, keys in (("box", _BOX_KEYS), ("point", _POINT_KEYS)):
            key = next((k for k in keys if isinstance(obj.get(k), list)), None)
            if key is not None:
                g = _make(kind, obj[key], obj.get("label"))
                if g is not None:
                    out.append(g)
                    return
        children = list(obj.values())
    elif isinstance(obj, list):
        children = obj
    else:
        return
    for child in children[: 4 * MAX_GROUNDINGS]:
        _walk(child, out, depth + 1)


def _from_json(text: str) -> list[Grounding]:
    decoder, out, end = json.JSONDecoder(), [], 0
    starts = [m.start() for m in re.finditer(r"[\[{]", text)][:64]
    for start in starts:
        if start < end:
            continue  # inside a value already decoded
        try:
            obj, end = decoder.raw_decode(text, start)
        except (ValueError, RecursionError):
            continue
        _walk(obj, out)
        if len(out) >= MAX_GROUNDINGS:
            break
    return out


def _from_patterns(text: str) -> list[Grounding]:
    found: list[tuple[int, Grounding]] = []
    for m in _KEY_RE.finditer(text):
        lo, hi = text.rfind("{", max(0, m.start() - 300), m.start()), text.find("}", m.end(), m.end() + 300)
        window = text[lo if lo >= 0 else m.start(): hi if hi >= 0 else m.end() + 300]
        label = _LABEL_RE.search(window)
        g = _make("box" if m.group(1) == "bbox_2d" else "point", _NUM_RE.findall(m.group(2)),
                  (label.group(1) or label.group(2)) if label else None)
        if g is not None:
            found.append((m.start(), g))
        if len(found) >= MAX_GROUNDINGS:
            break
    for m in _TOKEN_RE.finditer(text):
        g = _make("box", m.groups()[1:], m.group(1))
        if g is not None:
            found.append((m.start(), g))
        if len(found) >= 2 * MAX_GROUNDINGS:
            break
    return [g for _, g in sorted(found, key=lambda item: item[0])][:MAX_GROUNDINGS]


def parse_grounding(text: str) -> list[Grounding]:
    """Places (boxes, points) named in a model answer, in order of appearance; never raises.

    Reads Qwen3-VL JSON (``[{"bbox_2d": [x1, y1, x2, y2], "label": ...}]``, ``{"point_2d": [x, y]}``,
    a single dict, a ```json fenced block, JSON embedded in prose). If no JSON yields a place, falls
    back to regular expressions for ``"bbox_2d": [4 numbers]`` / ``"point_2d": [2 numbers]`` (broken
    JSON) and the Qwen-VL box tokens ``<|object_ref_start|>l<|object_ref_end|><|box_start|>(x1,y1),
    (x2,y2)<|box_end|>``. Coordinates are clamped to [0, 1000], box corners ordered, places with
    non-finite numbers dropped. Only the first :data:`MAX_ANSWER_CHARS` characters are read and at
    most :data:`MAX_GROUNDINGS` places returned.
    """
    if not isinstance(text, str):
        return []
    text = text[:MAX_ANSWER_CHARS]
    return (_from_json(text) or _from_patterns(text))[:MAX_GROUNDINGS]


def grounding_to_pixels(g: Grounding, width: int, height: int) -> tuple[float, float, float, float]:
    """A grounding's region ``[u_min, v_min, u_max, v_max]`` in pixels of a ``width`` x ``height`` image.

    Relative coordinates are edge-based (``x/1000 * width`` from the left edge); the result uses the
    pixel-centre convention, ``u = x/1000 * width - 0.5``: a box from 0 to 1000 becomes
    ``[-0.5, -0.5, width - 0.5, height - 0.5]`` (the whole image). A point is clamped to the pixel
    centres ``[0, width - 1] x [0, height - 1]`` and returned as ``[u, v, u, v]``.
    """
    width, height = _check_size((width, height))
    us = [c / 1000.0 * width - 0.5 for c in g.coords[0::2]]
    vs = [c / 1000.0 * height - 0.5 for c in g.coords[1::2]]
    if g.kind == "point":
        u, v = min(max(us[0], 0.0), width - 1.0), min(max(vs[0], 0.0), height - 1.0)
        return (u, v, u, v)
    return (us[0], vs[0], us[1], vs[1])


def _check_size(image_size: Sequence[int]) -> tuple[int, int]:
    try:
        w, h = (int(s) for s in image_size)
    except (TypeError, ValueError):
        raise InputError(f"image size must be (width, height), got {image_size!r}") from None
    if not (1 <= w <= MAX_IMAGE_SIDE and 1 <= h <= MAX_IMAGE_SIDE):
        raise InputError(f"image size {w}x{h} outside 1..{MAX_IMAGE_SIDE} pixels")
    return w, h


def _check_depth(depth: np.ndarray, intrinsics: Intrinsics) -> np.ndarray:
    depth = np.asarray(depth, dtype=np.float32)
    if depth.shape != (intrinsics.height, intrinsics.width):
        raise InputError(f"depth has shape {depth.shape} but its intrinsics describe "
                         f"{intrinsics.width}x{intrinsics.height}")
    return depth


def _to_grid(coord: Any, n_in: int, n_out: int) -> Any:
    """Continuous pixel coordinate in an image of n_in pixels -> one of n_out pixels, same field of view."""
    return (np.asarray(coord, dtype=np.float64) + 0.5) * (n_out / n_in) - 0.5


def _valid(values: np.ndarray) -> np.ndarray:
    values = values.ravel()
    return values[np.isfinite(values) & (values > 0)].astype(np.float64)


def _near_surface(z: np.ndarray) -> tuple[float, int, str]:
    """Robust depth of an object seen in front of background: (depth, pixels used, description).

    Otsu's split of log-depth into a near and a far class. When the split is clear (between-class
    variance >= 80 % of the total, far class >= 10 % farther, near class >= 15 % of the pixels) the
    region holds two surfaces and the median of the near one is returned; otherwise the median of all.
    """
    x = np.sort(np.log(z))
    n = x.size
    if n >= 8 and x[-1] - x[0] > 1e-6:
        cs = np.cumsum(x)
        k = np.arange(1, n)
        mu0, mu1 = cs[:-1] / k, (cs[-1] - cs[:-1]) / (n - k)
        between = (k / n) * (1 - k / n) * (mu0 - mu1) ** 2
        best = int(np.argmax(between))
        near = best + 1
        if between[best] >= 0.8 * x.var() and mu1[best] - mu0[best] >= math.log(1.1) and near >= 0.15 * n:
            return float(np.exp(np.median(x[:near]))), near, f"median of the nearest surface, {near} of {n} pixels"
    return float(np.exp(np.median(x))), n, f"median of {n} pixels"


def measure_region(
    depth: np.ndarray,
    depth_intrinsics: Intrinsics,
    region_px: Sequence[float],
    image_size: Sequence[int],
) -> Measurement:
    """Depth and 3-D position of a region ``[u_min, v_min, u_max, v_max]`` (pixels of the input image).

    ``depth`` is an (h, w) z-depth map in metres described by ``depth_intrinsics``; the input image is
    ``image_size = (W, H)`` pixels with the same field of view. A point (``u_min == u_max`` and
    ``v_min == v_max``): median of the valid depths in a :data:`POINT_WINDOW` square window of the
    depth grid around it. A box: the depth pixels whose centres lie in it (at most
    :data:`MAX_BOX_SAMPLES`, subsampled on a regular grid) are split by Otsu's two-class threshold on
    log-depth; when the box clearly holds a near object and farther background, the median of the
    near class is returned, else the median of all (see :func:`_near_surface`). A box is tight around
    its object but also holds background (a wall, the floor seen between chair legs): the near class
    is the object, and a median of it ignores edge pixels and noise.
    The point is back-projected at the box centre (or the point) through ``depth_intrinsics``, in the
    optical frame; ``distance_m`` is its norm. No valid depth: NaN depth, point and distance.
    """
    depth = _check_depth(depth, depth_intrinsics)
    width, height = _check_size(image_size)
    try:
        if isinstance(region_px, str):
            raise TypeError
        r = tuple(float(c) for c in region_px)
    except (TypeError, ValueError):
        raise InputError(f"region must be 4 numbers, got {region_px!r}") from None
    if len(r) != 4 or not all(math.isfinite(c) for c in r):
        raise InputError(f"region must be 4 finite numbers [u_min, v_min, u_max, v_max], got {r}")
    r = (min(r[0], r[2]), min(r[1], r[3]), max(r[0], r[2]), max(r[1], r[3]))
    h, w = depth.shape
    u0, u1 = _to_grid([r[0], r[2]], width, w)
    v0, v1 = _to_grid([r[1], r[3]], height, h)
    uc, vc = float(u0 + u1) / 2, float(v0 + v1) / 2
    nan3 = (math.nan,) * 3
    if uc < -0.5 or uc > w - 0.5 or vc < -0.5 or vc > h - 0.5:
        return Measurement(math.nan, nan3, math.nan, 0, r, "the region's centre is outside the image")

    def window(a0: float, a1: float, b0: float, b1: float) -> np.ndarray:
        i0, i1 = max(math.ceil(a0), 0), min(math.floor(a1), w - 1)
        j0, j1 = max(math.ceil(b0), 0), min(math.floor(b1), h - 1)
        if i0 > i1:
            i0 = i1 = min(max(math.floor(uc + 0.5), 0), w - 1)
        if j0 > j1:
            j0 = j1 = min(max(math.floor(vc + 0.5), 0), h - 1)
        step = max(1, math.ceil(math.sqrt((i1 - i0 + 1) * (j1 - j0 + 1) / MAX_BOX_SAMPLES)))
        return _valid(depth[j0: j1 + 1: step, i0: i1 + 1: step])

    if r[0] == r[2] and r[1] == r[3]:
        half = POINT_WINDOW // 2
        iu, iv = math.floor(uc + 0.5), math.floor(vc + 0.5)
        z = window(iu - half, iu + half, iv - half, iv + half)
        z_m, n, how = (float(np.median(z)) if z.size else math.nan), z.size, f"median of {z.size} pixels"
    else:
        z = window(u0, u1, v0, v1)
        z_m, n, how = _near_surface(z) if z.size else (math.nan, 0, "")
    if not math.isfinite(z_m):
        return Measurement(math.nan, nan3, math.nan, 0, r, "no valid depth in the region")
    k = depth_intrinsics
    point = ((uc - k.cx) * z_m / k.fx, (vc - k.cy) * z_m / k.fy, z_m)
    return Measurement(z_m, point, math.sqrt(sum(c * c for c in point)), n, r, how)


def answer_measurement(
    text: str, depth: np.ndarray, depth_intrinsics: Intrinsics, image_size: Sequence[int]
) -> QueryMeasurement | None:
    """Measure the FIRST place the answer names (the model's primary referent); None if it names none.

    ``image_size = (W, H)`` is the input image the model saw (its 0-1000 coordinates refer to it);
    ``depth`` and ``depth_intrinsics`` as in :func:`measure_region`. Metres, optical frame.
    """
    places = parse_grounding(text)
    if not places:
        return None
    g = places[0]
    width, height = _check_size(image_size)
    m = measure_region(depth, depth_intrinsics, grounding_to_pixels(g, width, height), (width, height))
    shown = m.region_px[:2] if g.kind == "point" else m.region_px
    where = f"{g.kind} [{', '.join(f'{c:.1f}' for c in shown)}] px"
    about = f" (label '{g.label}')" if g.label else ""
    extra = f"; first of {len(places)} places named" if len(places) > 1 else ""
    if math.isfinite(m.distance_m):
        message = (f"measured on the depth map at {where}{about}: {m.distance_m:.2f} m away, "
                   f"z {m.depth_m:.2f} m ({m.method}){extra}")
    else:
        message = f"could not measure {where}{about}: {m.method}{extra}"
    return QueryMeasurement(g, m, len(places), message)


def _pixel_list(name: str, values: Any) -> np.ndarray:
    try:
        arr = np.asarray(values)
    except (TypeError, ValueError, OverflowError):
        arr = np.empty((0, 0))
    if arr.ndim != 1 or not (arr.dtype.kind in "iuf" or arr.size == 0):
        raise InputError(f"{name} must be a list of integer pixels")
    return arr


def _check_pixels(name: str, arr: np.ndarray, limit: int) -> np.ndarray:
    for i, x in enumerate(arr.tolist()):
        if isinstance(x, float) and not (math.isfinite(x) and x.is_integer()):
            raise InputError(f"{name}[{i}] = {x} is not an integer pixel")
        if not 0 <= x < limit:
            raise InputError(f"{name}[{i}] = {x:g} is outside the image (0 <= {name} < {limit})")
    return arr.astype(np.int64)


def depth_at_pixels(
    depth: np.ndarray,
    depth_intrinsics: Intrinsics,
    u: Sequence[int],
    v: Sequence[int],
    image_size: Sequence[int],
    max_pixels: int = MAX_DEPTH_AT_PIXELS,
) -> tuple[np.ndarray, np.ndarray]:
    """Depth (metres, float32 (N,)) and optical-frame points (float64 (N, 3)) at input-image pixels.

    ``u`` (columns) and ``v`` (rows) are integer pixels of the ``image_size = (W, H)`` input image:
    equal length, 1..``max_pixels`` entries, ``0 <= u < W``, ``0 <= v < H`` (else InputError naming
    the first bad entry). Each reads the nearest depth-grid pixel; its point lies on the ray through
    the input pixel's centre, back-projected through ``depth_intrinsics``. Invalid depth gives NaN.
    """
    depth = _check_depth(depth, depth_intrinsics)
    width, height = _check_size(image_size)
    uu, vv = _pixel_list("u", u), _pixel_list("v", v)
    n_u, n_v = uu.size, vv.size
    if n_u != n_v:
        raise InputError(f"u and v must have the same length, got {n_u} and {n_v}")
    if not 1 <= n_u <= max_pixels:
        raise InputError(f"need 1..{max_pixels} pixels, got {n_u}")
    uu, vv = _check_pixels("u", uu, width), _check_pixels("v", vv, height)
    h, w = depth.shape
    ug, vg = _to_grid(uu, width, w), _to_grid(vv, height, h)
    iu = np.clip(np.floor(ug + 0.5), 0, w - 1).astype(np.intp)
    iv = np.clip(np.floor(vg + 0.5), 0, h - 1).astype(np.intp)
    z = depth[iv, iu]
    z = np.where(np.isfinite(z) & (z > 0), z, np.float32(np.nan)).astype(np.float32)
    zz = z.astype(np.float64)
    k = depth_intrinsics
    points = np.stack([(ug - k.cx) * zz / k.fx, (vg - k.cy) * zz / k.fy, zz], axis=1)
    return z, points
