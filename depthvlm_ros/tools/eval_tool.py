"""``depthvlm eval``: the DepthVLM-Bench protocol (sparse and dense) on one or more datasets.

Predictions come from a model (``--model DIR``, batched by the size at which images reach the
model) or from saved files (``--predictions DIR``). Results: JSON (``--json``), a Markdown table
(stdout and ``--markdown``), PNG plots (``--plots``). A bad record is reported and counted, never
fatal; ``--cache DIR`` keeps per-image results so an interrupted or repeated run resumes. A cached
result is keyed by what produced it: the model's fingerprint (config + weights), dtype, backend
and its precision, and the input bound; or, for saved predictions, the content hash of the file.

Scoring conventions are in :mod:`depthvlm_ros.evaluation.metrics`; file and record conventions in
:mod:`depthvlm_ros.evaluation.bench_data`.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import itertools
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from depthvlm_ros.errors import InputError
from depthvlm_ros.evaluation.bench_data import (
    BadRecord,
    BenchRecord,
    DatasetSpec,
    apply_group_overrides,
    check_ground_truth,
    count_records,
    find_prediction_file,
    iter_records,
    load_ground_truth,
    parse_dataset_spec,
    parse_group_override,
    read_prediction_file,
    rgb_intrinsics,
    score_record,
)
from depthvlm_ros.evaluation.report import (
    DatasetResults,
    WorstPanel,
    build_report,
    format_markdown,
    plot_abs_rel_by_depth,
    plot_delta1_bars,
    plot_worst_images,
    slug,
)
from depthvlm_ros.geometry import CANONICAL_FX, Intrinsics, canonical_size, resize_depth, resize_rgb
from depthvlm_ros.hashing import sha256_of_files
from depthvlm_ros.tools.common import (
    add_backend_args,
    add_input_size_args,
    add_model_args,
    check_max_image_tokens,
    read_rgb,
)

#: ``predict(images, intrinsics) -> depths``: RGB uint8 (H, W, 3) images that reach the model at one
#: size and their K's -> one float32 depth map (metres, NaN invalid) per image on its own RGB grid.
Predictor = Callable[[Sequence[np.ndarray], Sequence[Intrinsics]], list[np.ndarray]]

#: Bump when the per-image result format or the scoring changes (invalidates old cache entries).
CACHE_VERSION = 2
#: Bad-record lines printed per dataset before going quiet (all are counted and in the JSON).
MAX_PRINTED_SKIPS = 20
#: Worst-image panels are kept at most this wide (pixels) in memory.
PANEL_MAX_WIDTH = 480


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="score depth on DepthVLM-Bench (sparse + dense protocols)",
                       description="Score metric depth on DepthVLM-Bench datasets (sparse and dense protocols) "
                                   "from a model (--model) or saved predictions (--predictions).")
    p.add_argument("--dataset", action="append", default=[], metavar="NAME=JSONL,RGB_ROOT,DEPTH_ROOT[,MIN,MAX]",
                   help="a benchmark dataset (repeatable); MIN,MAX = valid GT depth in metres (default: the "
                        "preset of a known NAME, else gt > 0)")
    p.add_argument("--group", action="append", default=[], metavar="NAME=indoor|outdoor|mixed",
                   help="put a dataset in a group (repeatable; presets have one)")
    p.add_argument("--predictions", type=Path, metavar="DIR",
                   help="score saved predictions: DIR/<image path without extension>.npy (float metres) or "
                        ".png (16-bit mm); also DIR/<dataset>/..., DIR/<image stem>.npy/.png")
    p.add_argument("--batch-size", type=int, default=4, metavar="N", help="images per model forward (default 4)")
    p.add_argument("--limit", type=int, metavar="N",
                   help="only the first N records (non-blank JSONL lines) of each dataset")
    p.add_argument("--cache", type=Path, metavar="DIR", help="folder of per-image results; a rerun reuses them")
    p.add_argument("--json", type=Path, metavar="FILE", help="write the JSON report here")
    p.add_argument("--markdown", type=Path, metavar="FILE", help="also write the Markdown table here")
    p.add_argument("--plots", type=Path, metavar="DIR", help="write PNG plots into this folder")
    p.add_argument("--worst", type=int, default=4, metavar="K",
                   help="worst images per dataset in the plots (default 4)")
    add_input_size_args(p, default=0)  # the benchmark protocol: only the model's own max_pixels
    add_model_args(p)
    add_backend_args(p)
    p.set_defaults(func=run)


# -- prediction sources -------------------------------------------------------------------------


def model_predictor(model: Any, max_tokens: int = 0) -> Predictor:
    """A :data:`Predictor` around a loaded :class:`~depthvlm_ros.pipeline.DepthVLM`."""

    def predict(images: Sequence[np.ndarray], intrinsics: Sequence[Intrinsics]) -> list[np.ndarray]:
        return [r.depth for r in model.predict_depth_batch(images, intrinsics, max_tokens=max_tokens)]

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


def make_source(args: argparse.Namespace) -> PredictionSource:
    """The prediction source the arguments ask for: --predictions, or a model (--model, else the
    built-in default model, announced like every tool does).

    With ``--model``, the depth path runs on ``--backend`` (torch, onnxruntime, tensorrt); the
    cache key names the weights' fingerprint, the backend and its precision, so results of other
    weights or backends are never mixed.
    """
    if args.model is not None and args.predictions is not None:
        raise InputError("give one of --model DIR (run a model) or --predictions DIR (saved outputs), not both")
    if args.predictions is not None:
        if not args.predictions.is_dir():
            raise InputError(f"--predictions {args.predictions} is not a folder")
        return PredictionSource(f"predictions:{args.predictions.resolve()}", pred_root=args.predictions)
    from depthvlm_ros.model.checkpoint import model_fingerprint
    from depthvlm_ros.tools.common import load_model

    max_tokens = check_max_image_tokens(args)
    model = load_model(args)
    weights = model_fingerprint(model.folder) if model.folder is not None else model.name
    backend = model.backend
    source = f"model:{weights}:{args.dtype}:{backend.name}:{backend.precision()}:tokens{max_tokens}"
    return PredictionSource(source, predict=model_predictor(model, max_tokens), batch_size=args.batch_size)


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

    # bookkeeping

    def skip(self, label: str, reason: str, index: int) -> None:
        self.results.skipped.append(BadRecord(label, reason))
        self.results.skipped_order.append(index)
        if self._printed < MAX_PRINTED_SKIPS:
            _note(f"eval: {self.spec.name}: skipped {label}: {reason}")
            self._printed += 1
            if self._printed == MAX_PRINTED_SKIPS:
                _note(f"eval: {self.spec.name}: further skipped records are counted, not printed")

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
        if self.cache is not None and key:
            self.cache.put(key, result)
        self._add(index, record, result, (gt, aligned) if self.worst.k > 0 else None)

    # prediction

    def _load_saved_prediction(self, record: BenchRecord) -> np.ndarray:
        assert self.source.pred_root is not None
        return read_prediction_file(find_prediction_file(self.source.pred_root, self.spec.name, record.image))

    def _read_rgb_and_k(self, record: BenchRecord) -> tuple[np.ndarray, Intrinsics]:
        if record.canonical_fx != CANONICAL_FX:
            raise InputError(f"canonical_fx {record.canonical_fx:g} differs from the model's {CANONICAL_FX:g} px")
        rgb = read_rgb(self.spec.rgb_root / record.image)
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
                _note(f"eval: {self.spec.name}: no worst-image panel for {record.image}: {exc}")
                continue
            gt, pred = maps
            try:
                rgb = resize_rgb(read_rgb(self.spec.rgb_root / record.image), gt.shape[1], gt.shape[0])
            except InputError:
                rgb = None
            panels.append(WorstPanel(image=record.image, abs_rel=abs_rel, gt=gt, pred=pred, rgb=rgb))
        return panels


def _note(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


# -- the command --------------------------------------------------------------------------------


def dataset_specs(args: argparse.Namespace) -> list[DatasetSpec]:
    """Datasets from --dataset/--group; InputError for a malformed or duplicate spec."""
    if not args.dataset:
        raise InputError("give at least one --dataset NAME=JSONL,RGB_ROOT,DEPTH_ROOT[,MIN,MAX]")
    specs = [parse_dataset_spec(text) for text in args.dataset]
    names = [s.name for s in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InputError(f"--dataset: name {duplicates[0]!r} given twice")
    return apply_group_overrides(specs, [parse_group_override(text) for text in args.group])


def _check_counts(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit must be >= 1, got {args.limit}")
    if args.worst < 0:
        raise InputError(f"--worst must be >= 0, got {args.worst}")


def _prepare_outputs(args: argparse.Namespace) -> None:
    """Create the output folders now, so a long run cannot fail at its very end."""
    folders = [p.parent for p in (args.json, args.markdown) if p is not None]
    folders += [p for p in (args.plots,) if p is not None]
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"cannot create output folder {folder} ({exc.strerror or exc})") from None


def _write_text(path: Path, text: str) -> None:
    from depthvlm_ros.files import write_text_atomic

    write_text_atomic(path, text)


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


def process_group(args: argparse.Namespace) -> Any | None:
    """Accelerate's ``PartialState`` when this process is one of several (``accelerate launch``, ``torchrun``:
    ``WORLD_SIZE`` > 1); None for a plain run. On CUDA each process takes its own GPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    on_cpu = not str(getattr(args, "device", "cpu")).startswith("cuda")
    state = PartialState(cpu=on_cpu)
    if not on_cpu:
        args.device = str(state.device)
    return state if state.num_processes > 1 else None


def run(args: argparse.Namespace) -> int:
    """Score every dataset and report. Under several processes each scores every world-th record, the main
    process merges the results in record order (the same numbers as one process) and reports."""
    _check_counts(args)
    specs = dataset_specs(args)
    dist = process_group(args)
    rank, world = (dist.process_index, dist.num_processes) if dist is not None else (0, 1)
    main = rank == 0
    if main:
        _prepare_outputs(args)
    source = make_source(args)
    for spec in specs:
        if main and not spec.has_range:
            _note(f"eval: note: {spec.name}: no preset depth range; scoring GT > 0 and finite only")
    cache = ResultCache(args.cache) if args.cache is not None else None
    evaluators = []
    for spec in specs:
        evaluator = DatasetEvaluator(spec, source, cache, args.worst if args.plots is not None and main else 0)
        results = evaluator.run(args.limit, (rank, world))
        if dist is not None:
            from accelerate.utils import gather_object

            parts = gather_object([results.to_json()])  # every process's, in process order
            results = DatasetResults(spec)
            for text in parts:
                results.merge_json(text)
            results.in_record_order()
            evaluator.results = results
            if main and args.plots is not None:
                evaluator.offer_worst_again(args.limit)
        if main:
            _note(f"eval: {spec.name}: {len(results.images)} image(s) scored ({results.cache_hits} from cache), "
                  f"{len(results.skipped)} skipped" + (f" by {world} processes" if world > 1 else ""))
        evaluators.append(evaluator)
    if not main:
        return 0
    report = build_report([ev.results for ev in evaluators], source.source_id)
    markdown = format_markdown(report)
    print(markdown, end="")
    if args.markdown is not None:
        _write_text(args.markdown, markdown)
    if args.json is not None:
        _write_text(args.json, json.dumps(report, indent=2) + "\n")
    if args.plots is not None:
        written = write_plots(args.plots, report, evaluators)
        _note(f"eval: wrote {len(written)} plot(s) to {args.plots}")
    sys.stdout.flush()
    return 0
