"""``depthvlm eval``: the DepthVLM-Bench protocol (sparse and dense) on one or more datasets; or, with ``--bag``,
depth scored against a reference depth camera recorded in a bag (:mod:`depthvlm_ros.tools.eval_bag`).

Predictions come from a model (``--model DIR``, batched by the size at which images reach the
model) or from saved files (``--predictions DIR``). Results: JSON (``--json``), a Markdown table
(stdout and ``--markdown``), PNG plots (``--plots``). A bad record is reported and counted, never
fatal; ``--cache DIR`` keeps per-image results so an interrupted or repeated run resumes. A cached
result is keyed by what produced it: the model's fingerprint (config + weights), dtype, backend
and its precision, and the input bound; or, for saved predictions, the content hash of the file.

This module parses the arguments and reports; the evaluator itself (prediction sources, the per-image cache,
the dataset loop) is :mod:`depthvlm_ros.evaluation.evaluator`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from depthvlm_ros.errors import InputError
from depthvlm_ros.evaluation.benchmark_data import (
    DatasetSpec,
    apply_group_overrides,
    parse_dataset_spec,
    parse_group_override,
)
from depthvlm_ros.evaluation.evaluator import (
    DatasetEvaluator,
    PredictionSource,
    ResultCache,
    model_predictor,
    note,
    write_plots,
)
from depthvlm_ros.evaluation.report import (
    DatasetResults,
    build_report,
    format_markdown,
)
from depthvlm_ros.tools import eval_bag
from depthvlm_ros.tools.common import (
    add_backend_args,
    add_input_size_args,
    add_model_args,
    check_max_image_tokens,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``depthvlm eval`` subcommand's options."""
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
    eval_bag.add_arguments(p)
    add_backend_args(p)
    p.set_defaults(func=run)


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
    if args.bag is not None:
        _prepare_outputs(args)
        return eval_bag.run_bag(args)
    if args.reference_depth or args.predicted_depth or args.image:
        raise InputError("--reference-depth, --predicted-depth and --image go with --bag")
    specs = dataset_specs(args)
    dist = process_group(args)
    rank, world = (dist.process_index, dist.num_processes) if dist is not None else (0, 1)
    main = rank == 0
    if main:
        _prepare_outputs(args)
    source = make_source(args)
    for spec in specs:
        if main and not spec.has_range:
            note(f"eval: note: {spec.name}: no preset depth range; scoring GT > 0 and finite only")
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
            note(f"eval: {spec.name}: {len(results.images)} image(s) scored ({results.cache_hits} from cache), "
                  f"{len(results.skipped)} skipped" + (f" by {world} processes" if world > 1 else ""))
        evaluators.append(evaluator)
    if dist is not None:
        # After the last collective, while the interpreter is whole: left to interpreter exit, gloo's worker
        # threads may still need the GIL to free that collective's tensors when it is no longer to be had.
        dist.destroy_process_group()
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
        note(f"eval: wrote {len(written)} plot(s) to {args.plots}")
    sys.stdout.flush()
    return 0
