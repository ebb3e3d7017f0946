"""``depthvlm eval --bag BAG --reference-depth TOPIC``: depth scored against a depth camera recorded in a bag.

For each camera (one ``--reference-depth`` each):

- predictions are the model's, run on the bag's ``--image`` topic and the ``camera_info`` beside it (default: the
  bag's one image topic, picked like ``depthvlm play``), or a recorded depth topic given with
  ``--predicted-depth`` (what a node published);
- frames pair with the reference by header stamp: the nearest within ``--max-stamp-diff`` seconds;
- each pair is scored like ``depthvlm eval``'s dense protocol (the reference's valid pixels; ``--min-depth`` /
  ``--max-depth`` bound them), and the camera gets the median ratio reference / predicted and the node's
  ``depth_scale`` that would correct it (:mod:`depthvlm_ros.evaluation.camera_check`).

The JSON (``--json``) has ``depthvlm eval``'s layout, one dataset per camera named by its reference topic, with
``scale`` added: ``{"median_ratio", "depth_scale", "n_frames", "dense_scaled", "unpaired", "topics"}``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from depthvlm_ros.errors import InputError
from depthvlm_ros.evaluation.benchmark_data import BadRecord, DatasetSpec
from depthvlm_ros.evaluation.camera_check import (
    LogRatioHistogram,
    StampPairer,
    scale_summary,
    score_against_reference,
)
from depthvlm_ros.evaluation.metrics import DepthRange
from depthvlm_ros.evaluation.report import DatasetResults, build_report, format_markdown

#: Cameras one run scores at most (each is one pass over the bag).
MAX_CAMERAS = 16
#: Images of the model's topic that wait for the camera_info with their stamp (older ones are skipped unpaired).
INFO_WAIT = 8


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``--bag`` options of ``depthvlm eval``."""
    bag = p.add_argument_group("a bag with a reference depth camera (instead of --dataset)")
    bag.add_argument("--bag", type=Path, metavar="BAG", help="rosbag2 (folder or .mcap) to score")
    bag.add_argument("--reference-depth", action="append", default=[], metavar="TOPIC",
                     help="the reference depth topic (16UC1 mm or 32FC1 m, aligned to the colour image); repeatable, "
                          "one per camera")
    bag.add_argument("--predicted-depth", action="append", default=[], metavar="TOPIC",
                     help="score this recorded depth topic instead of running the model (one per --reference-depth)")
    bag.add_argument("--image", action="append", default=[], metavar="TOPIC",
                     help="the camera's image topic the model runs on (one per --reference-depth; default: the bag's "
                          "one image topic); its camera_info is the one beside it")
    bag.add_argument("--max-stamp-diff", type=float, default=0.02, metavar="S",
                     help="pair frames whose header stamps differ by at most S seconds (default 0.02)")
    bag.add_argument("--min-depth", type=float, metavar="M", help="reference depth below M metres is not scored")
    bag.add_argument("--max-depth", type=float, metavar="M", help="reference depth above M metres is not scored")


def check_arguments(args: argparse.Namespace) -> DepthRange:
    """The bag options, checked (InputError, exit code 2); the valid reference range."""
    refs = args.reference_depth
    if args.dataset:
        raise InputError("give --dataset or --bag, not both")
    if not refs:
        raise InputError("--bag needs at least one --reference-depth TOPIC")
    if len(refs) > MAX_CAMERAS:
        raise InputError(f"at most {MAX_CAMERAS} --reference-depth topics per run")
    if args.predicted_depth and len(args.predicted_depth) != len(refs):
        raise InputError("give one --predicted-depth per --reference-depth")
    if args.image and len(args.image) != len(refs):
        raise InputError("give one --image per --reference-depth")
    if args.predicted_depth and args.image:
        raise InputError("give --predicted-depth (a recorded depth) or --image (run the model), not both")
    if args.predicted_depth and args.model is not None:
        raise InputError("--predicted-depth scores a recorded topic: --model is not used with it")
    if not (math.isfinite(args.max_stamp_diff) and 0 <= args.max_stamp_diff <= 10):
        raise InputError(f"--max-stamp-diff must be in 0..10 seconds, got {args.max_stamp_diff}")
    for name in ("min_depth", "max_depth"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise InputError(f"--{name.replace('_', '-')} must be a number of metres >= 0, got {value}")
    if (args.min_depth is None) != (args.max_depth is None):
        raise InputError("give --min-depth and --max-depth together")
    if args.min_depth is not None and args.min_depth >= args.max_depth:
        raise InputError("--min-depth must be below --max-depth")
    if not args.bag.exists():
        raise InputError(f"{args.bag}: no such file or folder")
    return DepthRange(args.min_depth, args.max_depth)


def _topic(name: str) -> str:
    return name if name.startswith("/") else f"/{name}"


class CameraScore:
    """One camera's pairs, scored as they complete (bounded memory: the pairer's window and one histogram)."""

    def __init__(self, spec: DatasetSpec, max_dt_ns: int) -> None:
        self.spec = spec
        self.pairer = StampPairer(max_dt_ns)
        self.results = DatasetResults(spec)
        self.histogram = LogRatioHistogram()
        self.ratios: list[float] = []

    def skip(self, label: str, reason: str) -> None:
        self.results.skipped.append(BadRecord(label, reason))
        self.results.skipped_order.append(len(self.results.images) + len(self.results.skipped))

    def add_pair(self, reference: tuple[int, np.ndarray], pred: np.ndarray) -> None:
        stamp, ref = reference
        label = f"{self.spec.name}@{stamp}"
        try:
            result = score_against_reference(pred, ref, self.spec.depth_range, label, self.histogram)
        except InputError as exc:
            self.skip(label, str(exc))
            return
        if result["dense"] is None:
            self.skip(label, "no valid reference pixel with a valid prediction")
            return
        self.results.images.append(result)
        self.results.order.append(len(self.results.images) + len(self.results.skipped))
        self.ratios.append(result["median_ratio"])

    def summary(self, topics: dict[str, str]) -> dict[str, Any]:
        out = scale_summary(self.ratios, self.histogram)
        ref_left, pred_left = self.pairer.unpaired()
        out["unpaired"] = {"reference": ref_left, "predicted": pred_left}
        out["topics"] = topics
        return out


def score_camera(bag: Path, reference: str, source: str, depth_range: DepthRange, max_dt_ns: int,
                 predict: Callable[[np.ndarray, Any], np.ndarray] | None, info: str | None) -> tuple[CameraScore, dict]:
    """One pass over the bag for one camera: ``reference`` against ``source`` (a depth topic when ``predict`` is
    None, else the image topic the model runs on with the camera_info topic ``info``)."""
    from depthvlm_ros.ros.flow import StampSync
    from depthvlm_ros.ros.intake import stamp_ns
    from depthvlm_ros.ros.messages import camera_info_to_intrinsics, image_to_depth, image_to_rgb
    from depthvlm_ros.tools.play import bag_messages

    spec = DatasetSpec(reference, bag, bag, bag, depth_range,
                       "--min-depth/--max-depth" if depth_range.min_m is not None
                       else "none: gt > 0 and finite only", None)
    camera = CameraScore(spec, max_dt_ns)
    # The model's images meet their camera_info as in the node: equal stamps, in either order (a recorder logs
    # each topic as it arrives, so an image can come before its camera_info); at most INFO_WAIT images wait.
    sync: StampSync[Any, Any] = StampSync(0, max_pending_images=INFO_WAIT)

    def offer(topic: str, msg: Any, info_msg: Any = None) -> None:
        stamp = stamp_ns(msg.header)
        try:
            if topic == reference:
                pair = camera.pairer.add(0, stamp, (stamp, image_to_depth(msg)))
            elif predict is None:
                pair = camera.pairer.add(1, stamp, image_to_depth(msg))
            elif info_msg is None:
                raise InputError(f"no camera_info on {info} with this image's stamp")
            else:
                rgb = image_to_rgb(msg)
                pair = camera.pairer.add(1, stamp, (rgb, camera_info_to_intrinsics(info_msg, rgb.shape[1],
                                                                                   rgb.shape[0])))
        except InputError as exc:
            camera.skip(f"{topic}@{stamp}", str(exc))
            return
        if pair is None:
            return
        ref_item, pred_item = pair
        if predict is not None:
            try:
                pred_item = predict(*pred_item)
            except InputError as exc:
                camera.skip(f"{source}@{ref_item[0]}", f"prediction failed: {exc}")
                return
        camera.add_pair(ref_item, pred_item)

    topics = [reference, source] + ([info] if info else [])
    for topic, msg in bag_messages(bag, topics):
        if predict is None or topic == reference:
            offer(topic, msg)
            continue
        push = sync.push_info if topic == info else sync.push_image
        for image_msg, info_msg in push(stamp_ns(msg.header), msg):
            offer(source, image_msg, info_msg)
    for image_msg, _ in sync.flush():
        offer(source, image_msg)
    names = {"reference": reference, ("predicted" if predict is None else "image"): source}
    if info:
        names["camera_info"] = info
    return camera, names


def run_bag(args: argparse.Namespace) -> int:
    """``depthvlm eval --bag``: every camera scored; the report printed and written (exit code 0; 2 bad input)."""
    from depthvlm_ros.evaluation.evaluator import note
    from depthvlm_ros.files import write_text_atomic
    from depthvlm_ros.tools.play import IMAGE_TYPE, bag_topics, pick_bag_topics

    depth_range = check_arguments(args)
    types, counts = bag_topics(args.bag)
    references = [_topic(t) for t in args.reference_depth]
    for topic in references + [_topic(t) for t in args.predicted_depth]:
        if types.get(topic) != IMAGE_TYPE:
            found = types.get(topic)
            raise InputError(f"{args.bag}: topic {topic} is {found or 'not in the bag'}, not a depth "
                             f"{IMAGE_TYPE} (topics: {', '.join(sorted(types)) or 'none'})")
    predict = None
    source_id = "recorded:" + ",".join(_topic(t) for t in args.predicted_depth)
    if not args.predicted_depth:
        from depthvlm_ros.evaluation.evaluator import model_predictor
        from depthvlm_ros.tools.common import check_max_image_tokens, load_model

        max_tokens = check_max_image_tokens(args)
        model = load_model(args)
        run_model = model_predictor(model, max_tokens)
        predict = lambda rgb, k: run_model([rgb], [k])[0]  # noqa: E731
        source_id = f"model:{model.name}:{args.dtype}:{model.backend.name}:tokens{max_tokens}"
    cameras = []
    for i, reference in enumerate(references):
        if predict is None:
            source, info = _topic(args.predicted_depth[i]), None
        else:
            source, info = pick_bag_topics(types, args.image[i] if args.image else None, None, need_info=True)
        if counts.get(reference, 0) == 0:
            raise InputError(f"{args.bag}: no messages on {reference}")
        camera, names = score_camera(args.bag, reference, source, depth_range, round(args.max_stamp_diff * 1e9),
                                     predict, info)
        note(f"eval: {reference}: {len(camera.results.images)} frame pair(s) scored, "
             f"{len(camera.results.skipped)} skipped")
        cameras.append((camera, names))
    report = build_report([camera.results for camera, _ in cameras], source_id)
    for camera, names in cameras:
        report["datasets"][camera.spec.name]["scale"] = camera.summary(names)
    markdown = format_markdown(report) + scale_markdown(report)
    print(markdown, end="")
    if args.markdown is not None:
        write_text_atomic(args.markdown, markdown)
    if args.json is not None:
        write_text_atomic(args.json, json.dumps(report, indent=2) + "\n")
    sys.stdout.flush()
    return 0


def scale_markdown(report: dict[str, Any]) -> str:
    """One line per camera: its median ratio, the ``depth_scale`` that corrects it and what that would give."""
    lines = ["## scale on your camera", ""]
    for name, d in report["datasets"].items():
        scale = d.get("scale") or {}
        if scale.get("median_ratio") is None:
            lines.append(f"- {name}: no frame pair scored (unpaired: {scale.get('unpaired')}).")
            continue
        scaled = scale["dense_scaled"] or {}
        dense = d["dense"] or {}
        lines.append(
            f"- {name}: median reference/predicted {scale['median_ratio']:.4f} over {scale['n_frames']} frames; "
            f"depth_scale {scale['depth_scale']:.4f} would give δ1 {scaled.get('delta1', math.nan):.3f} "
            f"AbsRel {scaled.get('abs_rel', math.nan):.4f} (now δ1 {dense.get('delta1', math.nan):.3f} AbsRel "
            f"{dense.get('abs_rel', math.nan):.4f}); unpaired frames: {scale['unpaired']}.")
    return "\n".join(lines) + "\n"
