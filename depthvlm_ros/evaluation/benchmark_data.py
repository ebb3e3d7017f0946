"""DepthVLM-Bench data: dataset specs and presets, JSONL records, ground truth and prediction files.

A benchmark dataset is a JSONL file (one record per image) plus an RGB root and a depth root.
Record fields (``image`` and ``depth_path`` are relative to the roots):

- ``image``, ``depth_path``; ``depth_scale`` = raw depth units per metre (1000 for 16-bit
  millimetre PNG). ``.npy`` depth files are divided by ``depth_scale`` too (use 1 for float metres).
- ``original_rgb_size`` / ``original_depth_size``: [W, H] pixels; ``original_fx`` (pixels, of the
  RGB at ``original_rgb_size``); ``canonical_fx`` (1000) and ``canonical_size`` [W, H].
- ``pixel_coords``: list of [col, row] in depth-map pixels; ``depth``: metres at those points.
- ``depth_type``: "z_depth" (the only kind supported); ``prompt``, ``solution``, ``scene_id``: kept
  but not used for scoring.

Everything that can be wrong with one record raises :class:`InputError` with a short reason; the
evaluator counts such records as skipped and goes on.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from depthvlm_ros.errors import InputError, shown
from depthvlm_ros.evaluation.metrics import (
    DepthRange,
    abs_rel_by_depth_bin,
    gt_valid_mask,
    nearest_pixel_indices,
    score_dense,
    score_sparse,
)
from depthvlm_ros.geometry import MAX_IMAGE_SIDE, Intrinsics, depth_from_16uc1, resize_depth

#: Relative tolerance when deciding that two grids have "the same aspect ratio".
ASPECT_TOLERANCE = 0.01
#: Groups a dataset can belong to (ETH3D, indoor and outdoor scenes, is "mixed").
GROUPS: tuple[str, ...] = ("indoor", "outdoor", "mixed")


@dataclass(frozen=True)
class DatasetPreset:
    """A benchmark dataset's valid GT range (metres, inclusive) and its scene group."""

    name: str
    min_m: float
    max_m: float
    group: str
    aliases: tuple[str, ...] = ()


#: The paper's valid depth ranges. ETH3D has indoor and outdoor scenes: group "mixed" (it counts in
#: "overall" but in neither "indoor" nor "outdoor"; ``--group ETH3D=outdoor`` changes that).
PRESETS: tuple[DatasetPreset, ...] = (
    DatasetPreset("Argoverse2", 0.05, 120.0, "outdoor", ("argo2", "av2", "argoverse", "argoverse20")),
    DatasetPreset("Waymo", 0.05, 70.0, "outdoor", ("waymoopen", "waymoopendataset", "wod")),
    DatasetPreset("DDAD", 0.05, 120.0, "outdoor"),
    DatasetPreset("nuScenes", 0.05, 80.0, "outdoor", ("nusc",)),
    DatasetPreset("ETH3D", 0.01, 50.0, "mixed"),
    DatasetPreset("ScanNet++", 0.001, 10.0, "indoor", ("scannetplusplus", "scannetpp")),
    DatasetPreset("SUN RGB-D", 0.005, 8.0, "indoor", ("sunrgbd", "sun")),
    DatasetPreset("iBims-1", 0.005, 25.0, "indoor", ("ibims", "ibims1")),
    DatasetPreset("NYUv2", 0.005, 10.0, "indoor", ("nyu", "nyud", "nyudv2", "nyudepthv2", "nyuv2")),
)


def normalize_dataset_name(name: str) -> str:
    """Key for matching preset names: lower case, "+" -> "p" (ScanNet++ -> scannetpp), only [a-z0-9]."""
    return re.sub(r"[^a-z0-9]", "", name.lower().replace("+", "p"))


_PRESET_INDEX: dict[str, DatasetPreset] = {}
for _preset in PRESETS:
    for _key in (_preset.name, *_preset.aliases):
        _PRESET_INDEX[normalize_dataset_name(_key)] = _preset


def find_preset(name: str) -> DatasetPreset | None:
    """The preset for a dataset name (case- and punctuation-insensitive), or None."""
    return _PRESET_INDEX.get(normalize_dataset_name(name))


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset of a run: where its files are, its valid range (metres) and group."""

    name: str
    jsonl: Path
    rgb_root: Path
    depth_root: Path
    depth_range: DepthRange
    range_source: str  # "preset <Name>", "--dataset" or "none: gt > 0 and finite only"
    group: str | None  # "indoor", "outdoor", "mixed" or None (counts in "overall" only)

    @property
    def has_range(self) -> bool:
        return self.depth_range.min_m is not None


def _parse_metres(text: str, what: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise InputError(f"--dataset {spec!r}: {what} must be a number of metres, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise InputError(f"--dataset {spec!r}: {what} must be a finite number >= 0 of metres, got {text!r}")
    return value


def parse_dataset_spec(spec: str) -> DatasetSpec:
    """Parse ``NAME=JSONL,RGB_ROOT,DEPTH_ROOT[,MIN,MAX]`` (MIN/MAX in metres; paths without commas).

    Without MIN,MAX the preset range of a known name is used; an unknown name gets "gt > 0 and
    finite" only. Checks that the JSONL file and both roots exist; raises InputError otherwise.
    """
    name, sep, rest = spec.partition("=")
    name = name.strip()
    if not sep or not name:
        raise InputError(f"--dataset {spec!r}: expected NAME=JSONL,RGB_ROOT,DEPTH_ROOT[,MIN,MAX]")
    parts = [p.strip() for p in rest.split(",")]
    if len(parts) not in (3, 5) or not all(parts):
        raise InputError(
            f"--dataset {spec!r}: expected NAME=JSONL,RGB_ROOT,DEPTH_ROOT[,MIN,MAX] "
            f"(3 or 5 comma-separated fields, got {len(parts)})"
        )
    jsonl, rgb_root, depth_root = (Path(p).expanduser() for p in parts[:3])
    preset = find_preset(name)
    if len(parts) == 5:
        min_m, max_m = _parse_metres(parts[3], "MIN", spec), _parse_metres(parts[4], "MAX", spec)
        if not max_m > min_m:
            raise InputError(f"--dataset {spec!r}: need 0 <= MIN < MAX, got MIN={min_m:g}, MAX={max_m:g}")
        depth_range, source = DepthRange(min_m, max_m), "--dataset"
    elif preset is not None:
        depth_range, source = DepthRange(preset.min_m, preset.max_m), f"preset {preset.name}"
    else:
        depth_range, source = DepthRange(), "none: gt > 0 and finite only"
    if not jsonl.is_file():
        raise InputError(f"--dataset {name}: JSONL file {jsonl} does not exist")
    for label, root in (("RGB_ROOT", rgb_root), ("DEPTH_ROOT", depth_root)):
        if not root.is_dir():
            raise InputError(f"--dataset {name}: {label} {root} is not a folder")
    return DatasetSpec(
        name=name, jsonl=jsonl, rgb_root=rgb_root, depth_root=depth_root, depth_range=depth_range,
        range_source=source, group=preset.group if preset is not None else None,
    )


def parse_group_override(text: str) -> tuple[str, str]:
    """Parse ``NAME=indoor|outdoor|mixed`` -> (NAME, group)."""
    name, sep, group = text.partition("=")
    name, group = name.strip(), group.strip().lower()
    if not sep or not name or group not in GROUPS:
        raise InputError(f"--group {text!r}: expected NAME=indoor, NAME=outdoor or NAME=mixed")
    return name, group


def apply_group_overrides(specs: list[DatasetSpec], overrides: list[tuple[str, str]]) -> list[DatasetSpec]:
    """Specs with ``--group`` overrides applied; a NAME matches a dataset exactly or by normalized name."""
    out = list(specs)
    for name, group in overrides:
        hits = [i for i, s in enumerate(out) if s.name == name] or [
            i for i, s in enumerate(out) if normalize_dataset_name(s.name) == normalize_dataset_name(name)
        ]
        if not hits:
            raise InputError(f"--group {name}={group}: no --dataset named {name!r}")
        for i in hits:
            out[i] = replace(out[i], group=group)
    return out


# -- records ------------------------------------------------------------------------------------

#: Fields a record must have (``canonical_fx`` defaults to 1000, ``depth_type`` to "z_depth").
REQUIRED_FIELDS: tuple[str, ...] = (
    "image", "depth_path", "depth_scale", "original_rgb_size", "original_depth_size", "original_fx",
    "pixel_coords", "depth",
)


@dataclass(frozen=True)
class BenchRecord:
    """One benchmark image, validated. Sizes are (width, height) pixels; depths metres."""

    line_no: int
    image: str  # relative to the RGB root
    depth_path: str  # relative to the depth root
    depth_scale: float  # raw depth units per metre
    rgb_size: tuple[int, int]
    depth_size: tuple[int, int]
    fx: float  # pixels, of the RGB at rgb_size
    canonical_fx: float
    pixel_coords: np.ndarray  # (N, 2) float64 [col, row] in depth-map pixels
    depth_values: np.ndarray  # (N,) float64 metres (NaN where the record had null)
    scene_id: str | None = None
    # A frame of a sequence (``depthvlm generate --sequence``): its sequence's name, its place in it, and the
    # 4x4 pose of its optical frame in the world (metres); all three or none.
    sequence: str | None = None
    frame_index: int | None = None
    world_from_camera: np.ndarray | None = None


@dataclass(frozen=True)
class BadRecord:
    """A record that could not be used: a label (its image, or "line N") and why."""

    label: str
    reason: str


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _size(record: Mapping[str, Any], key: str) -> tuple[int, int]:
    value = record.get(key)
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(_is_number(v) and math.isfinite(v) and float(v).is_integer() for v in value)):
        raise InputError(f"{key} must be [W, H] integers, got {value!r}")
    w, h = int(value[0]), int(value[1])
    if not (1 <= w <= MAX_IMAGE_SIDE and 1 <= h <= MAX_IMAGE_SIDE):
        raise InputError(f"{key} {w}x{h} outside 1..{MAX_IMAGE_SIDE} pixels")
    return w, h


def _positive(record: Mapping[str, Any], key: str, default: float | None = None) -> float:
    value = record.get(key, default)
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise InputError(f"{key} must be a positive number, got {value!r}")
    return float(value)


def _relative_path(record: Mapping[str, Any], key: str) -> str:
    """A record's path, which must stay inside its root: relative, without ``..`` (a hostile record cannot
    make the evaluator read elsewhere)."""
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{key} must be a non-empty path string, got {shown(value)}", "record.path")
    parts = Path(value).parts
    if Path(value).is_absolute() or ".." in parts or "\x00" in value:
        raise InputError(f"{key} {shown(value)} leaves the dataset root (absolute, or with ..)", "record.path")
    return value


def parse_record(record: Any, line_no: int) -> BenchRecord:
    """Validate one decoded JSONL record; raise InputError naming the first problem."""
    if not isinstance(record, Mapping):
        raise InputError(f"record is a {type(record).__name__}, not an object")
    missing = [key for key in REQUIRED_FIELDS if key not in record]
    if missing:
        raise InputError(f"missing field{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    image = _relative_path(record, "image")
    depth_path = _relative_path(record, "depth_path")
    depth_type = record.get("depth_type", "z_depth")
    if depth_type != "z_depth":
        raise InputError(f"depth_type {depth_type!r} is not supported (only 'z_depth')")
    coords_raw, depth_raw = record["pixel_coords"], record["depth"]
    if not isinstance(coords_raw, list) or not isinstance(depth_raw, list):
        raise InputError("pixel_coords and depth must be lists")
    if not all(isinstance(c, list) and len(c) == 2 and all(_is_number(v) for v in c) for c in coords_raw):
        raise InputError("pixel_coords must be a list of [col, row] number pairs")
    if not all(v is None or _is_number(v) for v in depth_raw):
        raise InputError("depth must be a list of numbers (metres)")
    coords = np.asarray(coords_raw, dtype=np.float64).reshape(-1, 2)
    values = np.asarray([math.nan if v is None else v for v in depth_raw], dtype=np.float64)
    if len(coords) != len(values):
        raise InputError(f"{len(coords)} pixel_coords but {len(values)} depth values")
    scene = record.get("scene_id")
    sequence, frame_index, pose = _sequence_fields(record)
    return BenchRecord(
        line_no=line_no,
        image=image,
        depth_path=depth_path,
        depth_scale=_positive(record, "depth_scale"),
        rgb_size=_size(record, "original_rgb_size"),
        depth_size=_size(record, "original_depth_size"),
        fx=_positive(record, "original_fx"),
        canonical_fx=_positive(record, "canonical_fx", 1000.0),
        pixel_coords=coords,
        depth_values=values,
        scene_id=None if scene is None else str(scene),
        sequence=sequence,
        frame_index=frame_index,
        world_from_camera=pose,
    )


#: Longest sequence name accepted in a record.
MAX_SEQUENCE_NAME = 200


def _sequence_fields(record: Mapping[str, Any]) -> tuple[str | None, int | None, np.ndarray | None]:
    """A record's ``sequence``, ``frame_index`` and ``world_from_camera`` (all three or none), checked."""
    present = [key for key in ("sequence", "frame_index", "world_from_camera") if record.get(key) is not None]
    if not present:
        return None, None, None
    if len(present) != 3:
        raise InputError("sequence, frame_index and world_from_camera go together (got only "
                         f"{', '.join(present)})")
    name, index, pose = record["sequence"], record["frame_index"], record["world_from_camera"]
    if not isinstance(name, str) or not 0 < len(name) <= MAX_SEQUENCE_NAME:
        raise InputError(f"sequence must be a name of 1..{MAX_SEQUENCE_NAME} characters, got {shown(name)}")
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise InputError(f"frame_index must be an integer >= 0, got {shown(index)}")
    if (not isinstance(pose, list) or len(pose) != 4
            or not all(isinstance(row, list) and len(row) == 4 and all(_is_number(v) for v in row) for row in pose)):
        raise InputError("world_from_camera must be a 4x4 list of numbers")
    matrix = np.asarray(pose, dtype=np.float64)
    if not np.isfinite(matrix).all() or not np.allclose(matrix[3], [0.0, 0.0, 0.0, 1.0]):
        raise InputError("world_from_camera must be finite with a last row of 0 0 0 1")
    return name, index, matrix


def count_records(path: Path) -> int:
    """Number of non-blank lines of a JSONL file (for the progress bar)."""
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def iter_records(path: Path, limit: int | None = None) -> Iterator[BenchRecord | BadRecord]:
    """Records of a JSONL file in order (blank lines ignored), the first ``limit`` if given.

    Malformed lines and invalid records come out as :class:`BadRecord`; nothing here raises for
    a bad line.
    """
    count = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if limit is not None and count >= limit:
                return
            count += 1
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                yield BadRecord(f"line {line_no}", f"malformed JSON ({exc.msg})")
                continue
            label = obj.get("image") if isinstance(obj, dict) and isinstance(obj.get("image"), str) else None
            try:
                yield parse_record(obj, line_no)
            except InputError as exc:
                yield BadRecord(label or f"line {line_no}", str(exc))


# -- files --------------------------------------------------------------------------------------


def _read_png_integer(path: Path, allow_8bit: bool = True) -> np.ndarray:
    """A single-channel integer PNG as a 2-D integer array; InputError if missing or not one."""
    from depthvlm_ros.imageio import read_integer_png

    return read_integer_png(path, path.name, allow_8bit)


def _read_npy_2d(path: Path) -> np.ndarray:
    """A .npy numeric array, squeezed to 2-D; InputError if missing, unreadable, not 2-D or too large.

    The file is memory-mapped and its shape (from the header) checked before anything is read: a header
    that declares a (100000, 100000) array costs nothing.
    """
    try:
        array = np.load(path, allow_pickle=False, mmap_mode="r")
    except FileNotFoundError:
        raise InputError(f"missing file {path}") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{path.name}: cannot read .npy ({exc.__class__.__name__})") from None
    if array.ndim == 3 and 1 in (array.shape[0], array.shape[-1]):
        array = array.reshape(array.shape[1:] if array.shape[0] == 1 else array.shape[:2])
    if array.ndim != 2 or not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise InputError(f"{path.name}: expected a 2-D numeric array, got {array.dtype} {array.shape}")
    if max(array.shape) > MAX_IMAGE_SIDE or min(array.shape) < 1:
        raise InputError(f"{path.name}: shape {array.shape} outside 1..{MAX_IMAGE_SIDE} pixels")
    try:
        return np.array(array)  # read now, within the bound just checked
    except (OSError, ValueError) as exc:  # a header that promises more bytes than the file holds
        raise InputError(f"{path.name}: cannot read .npy ({exc.__class__.__name__})") from None


def read_depth_file(path: Path, scale: float, allow_8bit: bool = True) -> np.ndarray:
    """Depth in metres (float32, NaN invalid) from a 16-bit PNG or a ``.npy``: raw / ``scale``.

    ``scale`` is raw units per metre (1000 for millimetre PNG, 1 for .npy in metres). Zero,
    negative and non-finite raw values are invalid (NaN).
    """
    if path.suffix.lower() == ".npy":
        raw = _read_npy_2d(path).astype(np.float32)
        depth = raw / np.float32(scale)
    else:
        depth = depth_from_16uc1(_read_png_integer(path, allow_8bit), scale)
    return np.where(np.isfinite(depth) & (depth > 0), depth, np.float32(np.nan)).astype(np.float32, copy=False)


def load_ground_truth(record: BenchRecord, depth_root: Path) -> np.ndarray:
    """The record's GT depth map (metres, NaN invalid), checked against ``original_depth_size``."""
    depth = read_depth_file(depth_root / record.depth_path, record.depth_scale)
    size = (depth.shape[1], depth.shape[0])
    if size != record.depth_size:
        raise InputError(
            f"depth map is {size[0]}x{size[1]} but original_depth_size is {record.depth_size[0]}x{record.depth_size[1]}"
        )
    return depth


def prediction_candidates(pred_root: Path, dataset: str, image: str) -> list[Path]:
    """Where a saved prediction for ``image`` may be, in the order tried.

    For image ``scene1/000123.jpg`` of dataset ``D``: ``D/scene1/000123``, ``scene1/000123``,
    ``D/000123``, ``000123`` under ``pred_root``, each as ``.npy`` then ``.png``. The dataset
    folder lets one prediction root serve several datasets whose image paths collide.
    """
    rel = Path(image).with_suffix("")
    stems = [Path(dataset) / rel, rel, Path(dataset) / rel.name, Path(rel.name)]
    seen: list[Path] = []
    for stem in stems:
        for ext in (".npy", ".png"):
            path = pred_root / stem.parent / (stem.name + ext)
            if path not in seen:
                seen.append(path)
    return seen


def find_prediction_file(pred_root: Path, dataset: str, image: str) -> Path:
    """The first existing candidate of :func:`prediction_candidates`; InputError if none."""
    for path in prediction_candidates(pred_root, dataset, image):
        if path.is_file():
            return path
    stem = Path(image).with_suffix("")
    raise InputError(f"no prediction file {stem}.npy/.png (nor {stem.name}.npy/.png) under {pred_root}")


def read_prediction_file(path: Path) -> np.ndarray:
    """A saved prediction in metres (float32, NaN invalid): ``.npy`` float metres or 16-bit mm PNG."""
    if path.suffix.lower() == ".npy":
        return read_depth_file(path, 1.0)
    return read_depth_file(path, 1000.0, allow_8bit=False)


def same_aspect(size_a: tuple[int, int], size_b: tuple[int, int], tolerance: float = ASPECT_TOLERANCE) -> bool:
    """Whether two (W, H) grids have the same aspect ratio.

    Same within a relative ``tolerance``, or one grid is the other scaled with one side rounded
    to whole pixels (e.g. 640x480 and 213x160), which matters for small grids.
    """
    (wa, ha), (wb, hb) = size_a, size_b
    if abs((wa * hb) / (ha * wb) - 1.0) <= tolerance:
        return True
    rounding = 0.5 + 1e-9
    return (abs(hb - ha * wb / wa) <= rounding or abs(wb - wa * hb / ha) <= rounding
            or abs(ha - hb * wa / wb) <= rounding or abs(wa - wb * ha / hb) <= rounding)


def align_to_grid(pred: np.ndarray, width: int, height: int) -> np.ndarray:
    """A prediction (metres) on the ``width`` x ``height`` GT grid: bilinear, NaN-aware resize.

    Accepts any grid of the same aspect ratio (see :func:`same_aspect`); another aspect raises
    InputError (the prediction cannot be aligned with the ground truth).
    """
    pred = np.asarray(pred, dtype=np.float32)
    size = (pred.shape[1], pred.shape[0])
    if size != (width, height) and not same_aspect(size, (width, height)):
        raise InputError(
            f"prediction is {size[0]}x{size[1]}, GT is {width}x{height}: different aspect ratio"
        )
    return resize_depth(pred, width, height)


def rgb_intrinsics(record: BenchRecord, width: int, height: int) -> Intrinsics:
    """K of the loaded RGB (``width`` x ``height``): fx from the record, scaled if the image was resized.

    fy = fx and the principal point is the image centre (the benchmark's convention). An image
    whose aspect ratio differs from ``original_rgb_size`` raises InputError.
    """
    return bench_intrinsics(record.rgb_size, record.fx, width, height)


def bench_intrinsics(rgb_size: tuple[int, int], fx: float, width: int, height: int) -> Intrinsics:
    """:func:`rgb_intrinsics` from the two record fields it uses (``original_rgb_size``, ``original_fx``)."""
    if (width, height) != rgb_size and not same_aspect((width, height), rgb_size):
        raise InputError(
            f"RGB is {width}x{height} but original_rgb_size is {rgb_size[0]}x{rgb_size[1]} (different aspect ratio)"
        )
    return Intrinsics.from_fx(width, height, fx * width / rgb_size[0])


# -- scoring one record -------------------------------------------------------------------------


def check_ground_truth(record: BenchRecord, gt_map: np.ndarray, depth_range: DepthRange) -> None:
    """Raise InputError if the record cannot be scored whatever the prediction.

    Its ``pixel_coords`` must land on the depth map, and both protocols need at least one GT value
    in the valid range.
    """
    height, width = gt_map.shape
    nearest_pixel_indices(record.pixel_coords, width, height)
    if not gt_valid_mask(gt_map, depth_range).any():
        raise InputError(f"no valid GT pixel in the depth range ({_range_text(depth_range)})")
    if not gt_valid_mask(record.depth_values, depth_range).any():
        raise InputError(f"no sparse point with GT depth in the range ({_range_text(depth_range)})")


def _range_text(depth_range: DepthRange) -> str:
    if depth_range.min_m is None:
        return "gt > 0"
    return f"{depth_range.min_m:g}-{depth_range.max_m:g} m"


def score_record(
    record: BenchRecord, gt_map: np.ndarray, pred: np.ndarray, depth_range: DepthRange
) -> tuple[dict[str, Any], np.ndarray]:
    """Both protocols for one record: its per-image result (JSON-ready) and the aligned prediction.

    ``gt_map`` is the GT depth (metres) on the depth grid; ``pred`` a prediction (metres) on any
    grid of the same aspect ratio. The result holds ``sparse`` and ``dense`` (the nine metrics),
    ``pred_missing`` and ``n_scored`` per protocol, and the dense AbsRel sums/counts per GT-depth
    bin (:data:`~depthvlm_ros.evaluation.metrics.DEPTH_BIN_EDGES_M`). Raises InputError when a
    protocol has nothing to score.
    """
    height, width = gt_map.shape
    aligned = align_to_grid(pred, width, height)
    scores = {
        "sparse": score_sparse(aligned, record.pixel_coords, record.depth_values, depth_range),
        "dense": score_dense(aligned, gt_map, depth_range),
    }
    for protocol, score in scores.items():
        if score.n_gt_valid == 0:
            raise InputError(f"{protocol}: no valid GT in the depth range ({_range_text(depth_range)})")
        if score.metrics is None:
            raise InputError(f"{protocol}: the prediction is invalid (NaN or <= 0) wherever the GT is valid")
    sums, counts = abs_rel_by_depth_bin(aligned, gt_map, depth_range)
    result = {
        "image": record.image,
        "sparse": scores["sparse"].metrics,
        "dense": scores["dense"].metrics,
        "pred_missing": {p: s.pred_missing for p, s in scores.items()},
        "n_scored": {p: s.n_scored for p, s in scores.items()},
        "abs_rel_by_depth": {"sum": sums, "count": counts},
    }
    return result, aligned
