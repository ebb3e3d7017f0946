"""The DepthVLM-Bench evaluator as a library: predictions from a model or saved files, scored per image
(sparse and dense), cached per image, worst images kept for the report's panels.

``depthvlm eval`` (:mod:`depthvlm_ros.tools.eval_tool`) parses its arguments and calls this. A bad record is
reported and counted, never fatal. A cached result is keyed by what produced it: the model's fingerprint
(config + weights), dtype, backend and its precision, and the input bound; or, for saved predictions, the
content hash of the file. Scoring conventions are in :mod:`depthvlm_ros.evaluation.metrics`; file and record
conventions in :mod:`depthvlm_ros.evaluation.benchmark_data`.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import json
import os
import sys
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from depthvlm_ros.errors import InputError
from depthvlm_ros.evaluation.benchmark_data import (
    BadRecord,
    BenchRecord,
    DatasetSpec,
    bench_intrinsics,
    check_ground_truth,
    count_records,
    find_prediction_file,
    iter_records,
    load_ground_truth,
    read_prediction_file,
    rgb_intrinsics,
    score_record,
)
from depthvlm_ros.evaluation.report import (
    DatasetResults,
    WorstPanel,
    plot_abs_rel_by_depth,
    plot_delta1_bars,
    plot_worst_images,
    slug,
)
from depthvlm_ros.geometry import CANONICAL_FX, Intrinsics, canonical_size, resize_depth, resize_rgb
from depthvlm_ros.hashing import sha256_of_files
from depthvlm_ros.imageio import read_rgb

#: ``predict(images, intrinsics) -> depths``: RGB uint8 (H, W, 3) images that reach the model at one
#: size and their K's -> one float32 depth map (metres, NaN invalid) per image on its own RGB grid.
Predictor = Callable[[Sequence[np.ndarray], Sequence[Intrinsics]], list[np.ndarray]]

#: Bump when the per-image result format or the scoring changes (invalidates old cache entries).
CACHE_VERSION = 3
#: Bad-record lines printed per dataset before going quiet (all are counted and in the JSON).
MAX_PRINTED_SKIPS = 20
#: Worst-image panels are kept at most this wide (pixels) in memory.
PANEL_MAX_WIDTH = 480
#: Sequences whose last frame is kept for the TAE of the next (a sequence's frames come one after another).
MAX_OPEN_SEQUENCES = 8


# -- prediction sources -------------------------------------------------------------------------


def model_predictor(model: Any, max_tokens: int = 0) -> Predictor:
    """A :data:`Predictor` around a loaded :class:`~depthvlm_ros.pipeline.DepthVLM`."""
    from depthvlm_ros.pipeline.plan import RouteSettings


    def predict(images: Sequence[np.ndarray], intrinsics: Sequence[Intrinsics]) -> list[np.ndarray]:
        return [r.depth for r in model.predict_depth_batch(images, intrinsics, RouteSettings(max_tokens=max_tokens))]

    return predict


@dataclass
class PredictionSource:
    """Where predictions come from: a :data:`Predictor` (batched) or a folder of saved depth maps.

    ``source_id`` names the source in cache keys and the report (two runs with the same id reuse
    each other's cached results): for a model, what produced the numbers (weights fingerprint, dtype,
    backend and precision, input bound), so retraining in place never returns old scores.
    """

    source_id: str
    predict: Predictor | None = None
    pred_root: Path | None = None
    batch_size: int = 1


# -- per-image cache ----------------------------------------------------------------------------


class ResultCache:
    """Per-image results as JSON files, keyed by dataset + image + prediction source (+ range).

    One file per image (written atomically), so an interrupted run keeps what it finished.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"--cache {root}: cannot create folder ({exc.strerror or exc})") from None

    @staticmethod
    def key(spec: DatasetSpec, record: BenchRecord, source_id: str, prediction: Path | None = None) -> dict[str, Any]:
        """What a cached result depends on: every field of the record (calibration, scale, sparse points),
        the ground truth's bytes, the source, the range, and the input's bytes: the saved prediction
        file's, or (for a model) the RGB image's."""
        fields = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in vars(record).items()
                  if k != "line_no"}
        key = {
            "version": CACHE_VERSION,
            "dataset": spec.name,
            "record_sha256": hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16],
            "image": record.image,
            "depth_sha256": _content_hash(spec.depth_root / record.depth_path),
            "source": source_id,
            "range_m": [spec.depth_range.min_m, spec.depth_range.max_m],
        }
        if prediction is not None:
            key["prediction_sha256"] = _content_hash(prediction)
        else:
            key["rgb_sha256"] = _content_hash(spec.rgb_root / record.image)
        return key

    def _path(self, key: dict[str, Any]) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        return self.root / f"{digest[:32]}.json"

    def get(self, key: dict[str, Any]) -> dict[str, Any] | None:
        try:
            entry = json.loads(self._path(key).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(entry, dict) or entry.get("key") != key or not isinstance(entry.get("result"), dict):
            return None
        return entry["result"]

    def put(self, key: dict[str, Any], result: dict[str, Any]) -> None:
        path = self._path(key)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "result": result}))
        os.replace(tmp, path)


def _content_hash(path: Path) -> str:
    """sha256 of a file's bytes (first 16 hex digits); "" when it cannot be read (the record is then
    refused with its reason where it is loaded, and nothing is cached for it)."""
    try:
        return sha256_of_files([path])
    except OSError:
        return ""


# -- one dataset --------------------------------------------------------------------------------


@dataclass
class _Pending:
    index: int  # the record's position in the JSONL
    record: BenchRecord
    gt: np.ndarray
    rgb: np.ndarray
    intrinsics: Intrinsics
    cache_key: dict[str, Any]


@dataclass
class _SequenceFrame:
    """The last scored frame of a sequence, kept for the next frame's TAE term (maps on the GT grid)."""

    index: int
    pose: np.ndarray
    gt: np.ndarray
    pred: np.ndarray
    valid: np.ndarray


@dataclass
class _WorstTracker:
    """The ``k`` images with the highest dense AbsRel, with display copies of their maps when known."""

    k: int
    heap: list[tuple[float, int, BenchRecord, tuple[np.ndarray, np.ndarray] | None]] = field(default_factory=list)
    counter: itertools.count = field(default_factory=itertools.count)

    def offer(self, abs_rel: float, record: BenchRecord, maps: tuple[np.ndarray, np.ndarray] | None) -> None:
        if self.k <= 0:
            return
        if maps is not None:
            maps = tuple(_display_copy(m) for m in maps)
        item = (abs_rel, next(self.counter), record, maps)
        if len(self.heap) < self.k:
            heapq.heappush(self.heap, item)
        elif abs_rel > self.heap[0][0]:
            heapq.heapreplace(self.heap, item)

    def worst_first(self) -> list[tuple[float, int, BenchRecord, tuple[np.ndarray, np.ndarray] | None]]:
        return sorted(self.heap, key=lambda item: (-item[0], item[1]))


def _display_copy(depth: np.ndarray) -> np.ndarray:
    height, width = depth.shape
    if width <= PANEL_MAX_WIDTH:
        return depth
    return resize_depth(depth, PANEL_MAX_WIDTH, max(1, round(height * PANEL_MAX_WIDTH / width)))


class DatasetEvaluator:
    """Scores one dataset's records against one prediction source."""

    def __init__(self, spec: DatasetSpec, source: PredictionSource, cache: ResultCache | None, worst: int) -> None:
        self.spec = spec
        self.source = source
        self.cache = cache
        self.results = DatasetResults(spec)
        self.worst = _WorstTracker(worst)
        self._pending: dict[tuple[int, int], list[_Pending]] = {}
        self._printed = 0
        self._previous: OrderedDict[str, _SequenceFrame] = OrderedDict()  # the last frame scored per sequence

    # bookkeeping

    def skip(self, label: str, reason: str, index: int) -> None:
        self.results.skipped.append(BadRecord(label, reason))
        self.results.skipped_order.append(index)
        if self._printed < MAX_PRINTED_SKIPS:
            note(f"eval: {self.spec.name}: skipped {label}: {reason}")
            self._printed += 1
            if self._printed == MAX_PRINTED_SKIPS:
                note(f"eval: {self.spec.name}: further skipped records are counted, not printed")

    def _add(self, index: int, record: BenchRecord, result: dict[str, Any],
             maps: tuple[np.ndarray, np.ndarray] | None) -> None:
        self.results.images.append(result)
        self.results.order.append(index)
        self.worst.offer(result["dense"]["abs_rel"], record, maps)

    def _finish(self, index: int, record: BenchRecord, gt: np.ndarray, pred: np.ndarray, key: dict[str, Any]) -> None:
        try:
            result, aligned = score_record(record, gt, pred, self.spec.depth_range)
        except InputError as exc:
            self.skip(record.image, str(exc), index)
            return
        if record.sequence is not None:
            result["temporal"] = self._temporal_term(record, gt, aligned)
        if self.cache is not None and key:
            self.cache.put(key, result)
        self._add(index, record, result, (gt, aligned) if self.worst.k > 0 else None)

    # prediction

    def _temporal_term(self, record: BenchRecord, gt: np.ndarray, aligned: np.ndarray) -> dict[str, Any] | None:
        """TAE (percent) of this frame and the previous frame of its sequence, of the prediction and of the ground
        truth (the occlusion floor), on the pixels where both frames' ground truth is valid; None when the previous
        frame was not scored in this process just before (a cache hit, a skipped record, another process's)."""
        from depthvlm_ros.evaluation.metrics import gt_valid_mask
        from depthvlm_ros.evaluation.temporal import pair_tae

        assert record.sequence is not None and record.world_from_camera is not None
        valid = gt_valid_mask(gt, self.spec.depth_range)
        previous = self._previous.pop(record.sequence, None)
        self._previous[record.sequence] = _SequenceFrame(record.frame_index or 0, record.world_from_camera, gt,
                                                         aligned, valid)
        while len(self._previous) > MAX_OPEN_SEQUENCES:
            self._previous.popitem(last=False)
        if previous is None or previous.index + 1 != record.frame_index or previous.gt.shape != gt.shape:
            return None
        k = bench_intrinsics(record.rgb_size, record.fx, gt.shape[1], gt.shape[0])
        tae = pair_tae(previous.pred, aligned, k, previous.pose, record.world_from_camera, previous.valid, valid)
        floor = pair_tae(previous.gt, gt, k, previous.pose, record.world_from_camera, previous.valid, valid)
        if tae is None or floor is None:
            return None
        return {"tae": tae, "tae_gt": floor, "after_frame": previous.index}

    def _load_saved_prediction(self, record: BenchRecord) -> np.ndarray:
        assert self.source.pred_root is not None
        return read_prediction_file(find_prediction_file(self.source.pred_root, self.spec.name, record.image))

    def _read_rgb_and_k(self, record: BenchRecord) -> tuple[np.ndarray, Intrinsics]:
        if record.canonical_fx != CANONICAL_FX:
            raise InputError(f"canonical_fx {record.canonical_fx:g} differs from the model's {CANONICAL_FX:g} px")
        path = self.spec.rgb_root / record.image
        rgb = read_rgb(path, str(path))
        return rgb, rgb_intrinsics(record, rgb.shape[1], rgb.shape[0])

    def _run_batch(self, items: list[_Pending]) -> None:
        assert self.source.predict is not None
        try:
            preds = self.source.predict([i.rgb for i in items], [i.intrinsics for i in items])
        except InputError as exc:
            if len(items) > 1:  # find the culprit: one at a time
                for item in items:
                    self._run_batch([item])
            else:
                self.skip(items[0].record.image, f"prediction failed: {exc}", items[0].index)
            return
        for item, pred in zip(items, preds):
            self._finish(item.index, item.record, item.gt, pred, item.cache_key)

    def flush(self) -> None:
        """Run the model on every record still waiting for a full batch."""
        for size in list(self._pending):
            self._run_batch(self._pending.pop(size))

    def add_record(self, record: BenchRecord, index: int = 0) -> None:
        """Score a record (``index``: its position in the JSONL) now (cache, saved prediction) or queue it for
        a model batch."""
        key: dict[str, Any] = {}
        if self.cache is not None:
            try:
                prediction = (find_prediction_file(self.source.pred_root, self.spec.name, record.image)
                              if self.source.pred_root is not None else None)
                key = ResultCache.key(self.spec, record, self.source.source_id, prediction)
            except InputError:
                pass  # no prediction file: nothing is cached for it; the record is refused below with its reason
            cached = self.cache.get(key) if key else None
            if cached is not None:
                self.results.cache_hits += 1
                self._add(index, record, cached, None)
                return
        try:
            gt = load_ground_truth(record, self.spec.depth_root)
            check_ground_truth(record, gt, self.spec.depth_range)
            if self.source.pred_root is not None:
                pred = self._load_saved_prediction(record)
            else:
                rgb, k = self._read_rgb_and_k(record)
                size = canonical_size(k)  # images batch together when they reach the model at one size
        except InputError as exc:
            self.skip(record.image, str(exc), index)
            return
        if self.source.pred_root is not None:
            self._finish(index, record, gt, pred, key)
            return
        bucket = self._pending.setdefault(size, [])
        bucket.append(_Pending(index, record, gt, rgb, k, key))
        if len(bucket) >= max(1, self.source.batch_size):
            self._run_batch(self._pending.pop(size))

    def run(self, limit: int | None, shard: tuple[int, int] = (0, 1)) -> DatasetResults:
        """Score the records (the first ``limit``); ``shard = (rank, world)``: only every world-th record from
        ``rank`` on (the others are another process's). Results come in record order."""
        from tqdm import tqdm

        rank, world = shard
        total = count_records(self.spec.jsonl)
        total = min(total, limit) if limit is not None else total
        mine = len(range(rank, total, world))
        with tqdm(total=mine, desc=self.spec.name, unit="img", file=sys.stderr, disable=None) as bar:
            for index, item in enumerate(iter_records(self.spec.jsonl, limit)):
                if index % world != rank:
                    continue
                if isinstance(item, BadRecord):
                    self.skip(item.label, item.reason, index)
                else:
                    self.add_record(item, index)
                bar.update(1)
            self.flush()
        self.results.in_record_order()
        return self.results

    def offer_worst_again(self, limit: int | None) -> None:
        """Offer every result to the worst-images tracker (after merging other processes' results: their
        maps are recomputed for the panels)."""
        records = dict(enumerate(iter_records(self.spec.jsonl, limit)))
        self.worst = _WorstTracker(self.worst.k)
        for index, result in zip(self.results.order, self.results.images):
            record = records[index]
            if not isinstance(record, BadRecord):
                self.worst.offer(result["dense"]["abs_rel"], record, None)

    # worst images

    def worst_panels(self) -> list[WorstPanel]:
        """Panels of the worst images; maps not kept in memory (cache hits) are loaded again."""
        panels = []
        for abs_rel, _, record, maps in self.worst.worst_first():
            try:
                if maps is None:
                    gt = load_ground_truth(record, self.spec.depth_root)
                    if self.source.pred_root is not None:
                        pred = self._load_saved_prediction(record)
                    else:
                        rgb, k = self._read_rgb_and_k(record)
                        pred = self.source.predict([rgb], [k])[0]
                    _, aligned = score_record(record, gt, pred, self.spec.depth_range)
                    maps = (_display_copy(gt), _display_copy(aligned))
            except InputError as exc:
                note(f"eval: {self.spec.name}: no worst-image panel for {record.image}: {exc}")
                continue
            gt, pred = maps
            try:
                path = self.spec.rgb_root / record.image
                rgb = resize_rgb(read_rgb(path, str(path)), gt.shape[1], gt.shape[0])
            except InputError:
                rgb = None
            panels.append(WorstPanel(image=record.image, abs_rel=abs_rel, gt=gt, pred=pred, rgb=rgb))
        return panels


def note(message: str) -> None:
    """Print a progress note on stderr without breaking a progress bar."""
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


def write_plots(folder: Path, report: dict[str, Any], evaluators: Sequence[DatasetEvaluator]) -> list[Path]:
    """delta1 bars, AbsRel-vs-depth per dataset and worst images per dataset, as PNGs in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    written = [plot_delta1_bars(report, folder / "delta1_by_dataset.png")]
    for ev in evaluators:
        name = ev.spec.name
        written.append(plot_abs_rel_by_depth(name, ev.results.images, folder / f"abs_rel_vs_depth_{slug(name)}.png"))
        panels = ev.worst_panels()
        if panels:
            written.append(plot_worst_images(name, panels, folder / f"worst_{slug(name)}.png"))
    return written
