"""``depthvlm demo``: the whole system live, on a synthetic moving camera, with ground truth.

Two processes, as on a robot: the **node** ``depthvlm`` (``depthvlm node``, the built-in model
unless ``--model``) in its own process, its log in ``--out``/node.log; and this one, with

- a **camera**: a generated scene seen along a smooth trajectory, published as ``image`` +
  ``camera_info`` (frame ``camera_optical_frame``) at ``--rate`` Hz, with the generator's exact depth of every
  frame on ``ground_truth/depth`` (recorded, so ``depthvlm eval --bag`` scores the bag on its own); that depth is
  also kept (bounded) to score what comes back: δ1, AbsRel and TAE (between successive depth images);
- a **recorder** writing the topics to an MCAP bag, and a **client** asking scripted spatial
  questions through ``~/spatial_query`` about objects in view, in turn "how far is X", "where is X"
  and "which is closer, X or Y"; each answer is drawn on the frame it was measured on
  (``answer_N.png``: the answer's place, the named objects' true boxes, measured and true metres).

Before the camera starts, its first frame is sent until the node runs the backend it chose (a
first run exports the ONNX graph, cached) and has answered it.

Prints once a second: rates, latency, live δ1/AbsRel against the generator's depth. Writes
``demo.mcap`` (a rosbag2 folder), coloured depth PNGs, the answers' PNGs, ``cloud.ply`` (one frame's
organized cloud) and ``summary.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from depthvlm_ros.errors import InputError
from depthvlm_ros.files import write_text_atomic
from depthvlm_ros.ros.demo import TRUTH_TOPIC, DemoCamera, DepthScorer
from depthvlm_ros.scenes.demo import DemoQuestion, pick_question

RECORDED = ("image", "camera_info", "ground_truth/depth", "depth/image", "depth/camera_info", "depth/colored",
            "/diagnostics")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``depthvlm demo`` subcommand's options."""
    from depthvlm_ros.tools.common import add_backend_args, add_model_args, parse_size

    p = sub.add_parser("demo", help="live demo: synthetic moving camera -> node -> depth, cloud, answers, bag",
                       description=__doc__.split("\n\n")[1] if __doc__ else None)
    p.add_argument("--out", type=Path, default=Path("outputs/demo"), metavar="DIR", help="default outputs/demo")
    p.add_argument("--seconds", type=float, default=20.0, help="how long the camera runs (default 20)")
    p.add_argument("--rate", type=float, default=5.0, help="camera frames per second (default 5)")
    p.add_argument("--size", type=parse_size, default=(320, 240), metavar="WxH", help="camera size (default 320x240)")
    p.add_argument("--kind", default="indoor", choices=["indoor", "outdoor"], help="scene (default indoor)")
    p.add_argument("--seed", type=int, default=5,
                   help="scene seed (default 5: a room with 3-4 objects in view all along the path)")
    p.add_argument("--queries", type=int, default=3, help="spatial questions to ask (default 3)")
    p.add_argument("--record-points", action="store_true", help="also record the point clouds (large)")
    p.add_argument("--startup-timeout", type=float, default=300.0,
                   help="seconds to wait for the node to start and run its backend (default 300)")
    add_model_args(p)
    add_backend_args(p)
    p.set_defaults(func=run, backend="auto")


def run(args: argparse.Namespace) -> int:
    """Run ``depthvlm demo``: the node in its own process; the camera, recorder, depth scorer and scripted questions
    in this one; the bag, images, answers and summary.json written to --out (exit code 0, 2 bad input or a failed
    node)."""
    from rclpy.executors import MultiThreadedExecutor

    from depthvlm_ros.ros.runtime import NodeProcess, NodeStatus, private_ros_environment, ros_node, short_gil_switch
    from depthvlm_ros.tools.record import TOPIC_TYPES, Recorder, final_path, move_into_place

    if not (0.5 <= args.seconds <= 3600 and 0.5 <= args.rate <= 60):
        raise InputError("--seconds must be in 0.5..3600 and --rate in 0.5..60")
    if not 0 <= args.queries <= 20:
        raise InputError("--queries must be in 0..20")
    from depthvlm_ros.tools.common import announce_model

    announce_model(args.model)  # (the node's log, node.log, says it too)
    args.out.mkdir(parents=True, exist_ok=True)
    # Reliable, deep enough that no camera frame is replaced in the subscription's history while the
    # node is busy (the node's own slot still keeps only the latest).
    params: dict[str, object] = {"input_reliability": "reliable", "input_depth": 50, "backend": args.backend,
                                 "device": args.device, "precision": args.dtype}
    if args.model is not None:
        params["model_path"] = str(args.model.resolve())
    paths = [str(path.resolve()) for path in args.onnx + args.engine]
    if paths:  # a ROS string array
        params["engine_paths"] = "[" + ",".join(f'"{p}"' for p in paths) + "]"
    env = private_ros_environment()
    short_gil_switch()  # the camera thread, the recorder and the executor share this process's GIL
    bag = args.out / "demo.mcap"
    if bag.is_file():
        bag.unlink()  # the previous run's
    bag_dir, tmp = final_path(bag)
    node = NodeProcess(params, args.out / "node.log", env)
    print(f"demo: node started in its own process (pid {node.pid}, log {args.out / 'node.log'}); {args.kind} scene "
          f"seed {args.seed}, {args.size[0]}x{args.size[1]} at {args.rate:g} Hz for {args.seconds:g} s", flush=True)
    try:
        with ros_node("depthvlm_demo") as (demo, stop):
            from depthvlm_msgs.srv import SpatialQuery
            from rosbags.rosbag2 import StoragePlugin, Writer

            status = NodeStatus(demo)
            camera = DemoCamera(demo, args)
            client = demo.create_client(SpatialQuery, "/depthvlm/spatial_query")
            executor = MultiThreadedExecutor(num_threads=3, context=demo.context)
            executor.add_node(demo)
            spinner = threading.Thread(target=executor.spin, daemon=True)
            spinner.start()
            writer = None
            answers: list[dict[str, Any]] = []
            try:
                _wait(lambda: _node_alive(node) and min(camera.pub_image.get_subscription_count(),
                                                        camera.pub_info.get_subscription_count()) >= 1
                      and client.service_is_ready() and status.get()[0] > 0, args.startup_timeout,
                      "the node to start (subscribe to the camera, serve questions, publish diagnostics)")
                warm = time.monotonic()
                baseline = _warm_up(camera, status, node, args.startup_timeout)
                _, latest = status.get()
                print(f"demo: node ready on {latest.get('backend', '?')} ({time.monotonic() - warm:.1f} s warm-up; "
                      f"{latest.get('backend_choice', '')})", flush=True)
                scorer = DepthScorer(demo, camera, args.out)
                writer = Writer(bag_dir, version=9, storage_plugin=StoragePlugin.MCAP)
                writer.open()
                topics = list(RECORDED) + (["points"] if args.record_points else [])
                recorder = Recorder(demo, writer, [(t, TOPIC_TYPES[t]) for t in topics],
                                    argparse.Namespace(count=None, best_effort=False, qos_depth=100))  # never full
                # Matched both ways: camera -> node + recorder; every recording and scoring subscription.
                _wait(lambda: min(camera.pub_image.get_subscription_count(),
                                  camera.pub_info.get_subscription_count()) >= 2
                      and all(sub.get_publisher_count() >= 1 for sub in [*recorder.subs.values(), *scorer.subs]),
                      SETTLE_TIMEOUT_S, "the scorer and the recorder to match the node's topics")
                answers = _drive(args, camera, scorer, client, stop)

                def counted(key: str) -> int:
                    return int(status.number(key)) - baseline.get(key, 0)

                # Every frame: recorded, taken by the node, and (if processed) its depth scored here.
                _wait(lambda: _node_alive(node) and recorder.counts.get("/image", 0) >= camera.published
                      and recorder.counts.get("/camera_info", 0) >= camera.published
                      and recorder.counts.get("/ground_truth/depth", 0) >= camera.published
                      and counted("frames_received") + counted("frames_lost_before_node") >= camera.published
                      and status.get()[1].get("frames_pending") == "0"
                      and scorer.received >= counted("frames_processed")
                      and recorder.counts.get("/depth/image", 0) >= scorer.received, SETTLE_TIMEOUT_S,
                      lambda: f"the last frames to be processed (published {camera.published}, recorded "
                              f"{recorder.counts}, node {status.get()[1]}, scored {scorer.received})")
                node_counts = {key: counted(key) for key in baseline}
                # The cloud: under a starved CPU a reliable 1.2 MB cloud can be overwritten in the node's short
                # history before its fragments arrive, for as long as frames keep coming; once the camera stops,
                # the last one arrives whole. Waited for (bounded), never required.
                _settle(lambda: scorer.cloud_written is not None or scorer.received < 3, CLOUD_TIMEOUT_S)
            finally:
                executor.shutdown(timeout_sec=2.0)
                if writer is not None:
                    writer.close()
            _, latest = status.get()
    finally:
        code = node.stop()
    if writer is None:
        raise InputError(f"demo: the node did not get ready; its log ends:\n{node.output_tail()}")
    move_into_place(bag_dir, tmp, bag)
    summary = _summary(args, latest, node_counts, camera, scorer, recorder, answers)
    summary["node"]["exit_code"] = code
    write_text_atomic(args.out / "summary.json", json.dumps(summary, indent=2) + "\n")
    _print_summary(summary, args.out)
    return 0


#: The most the demo waits, once its camera has stopped, for the answers and the last frames' depth (s): only a
#: node that stopped working takes this long (a slow machine just ends later).
SETTLE_TIMEOUT_S = 180.0
#: The most the demo waits, after the last frame's depth, for the organized cloud it writes as cloud.ply (s).
CLOUD_TIMEOUT_S = 60.0
#: The node's counters the demo reads from its diagnostics (relative to the end of the warm-up).
NODE_COUNTERS = ("frames_received", "frames_processed", "frames_dropped", "frames_lost_before_node", "errors")


def _node_alive(node: Any) -> bool:
    if not node.alive():
        raise InputError(f"demo: the node exited; its log ends:\n{node.output_tail()}")
    return True


def _steady(latest: dict[str, str]) -> bool:
    """The node runs the backend it chose: PyTorch, or a compiled size it holds."""
    return latest.get("backend", "").startswith("torch") or int(latest.get("compiled_sizes_held", "0") or 0) >= 1


def _warm_up(camera: DemoCamera, status: Any, node: Any, timeout_s: float) -> dict[str, int]:
    """Send the first frame until the node has answered it on its chosen backend; then, once it is
    idle, its counters (the baseline the demo's counts start from)."""
    deadline = time.monotonic() + timeout_s
    while True:
        _node_alive(node)
        _, latest = status.get()
        if _steady(latest) and int(latest.get("frames_processed", "0")) >= 1:
            break
        if time.monotonic() > deadline:
            raise InputError(f"demo: the node did not run its backend within {timeout_s:g} s ({latest})")
        camera.publish_warmup()
        time.sleep(0.5)
    seen = status.get()[0]
    _wait(lambda: _node_alive(node) and status.get()[0] >= seen + 2 and status.get()[1].get("frames_pending") == "0",
          SETTLE_TIMEOUT_S, "the node to finish the warm-up frames")
    _, latest = status.get()
    return {key: int(latest.get(key, "0")) for key in NODE_COUNTERS}


def _settle(condition: Any, timeout_s: float) -> bool:
    """Until ``condition()`` holds or ``timeout_s`` passes (checked every 20 ms); whether it holds."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _wait(condition: Any, timeout_s: float, what: Any) -> None:
    """Until ``condition()`` holds (checked every 20 ms); a clear error after ``timeout_s``."""
    if not _settle(condition, timeout_s):
        raise InputError(f"demo: waited {timeout_s:g} s for {what() if callable(what) else what}")


def _drive(args: argparse.Namespace, camera: DemoCamera, scorer: DepthScorer, client: Any,
           stop: threading.Event) -> list[dict[str, Any]]:
    """Publish frames on time, print live lines, ask questions at evenly spaced moments.

    A question falls due at its moment and is asked as soon as the one before it has its answer (the node
    answers one question at a time): on a slow machine questions come later, never refused "busy". Those
    still due when the camera stops are asked then, about its last frame.
    """
    from depthvlm_msgs.srv import SpatialQuery

    period = 1.0 / args.rate
    total = len(camera.poses)
    ask_at = {int(total * (i + 1) / (args.queries + 1)) for i in range(args.queries)}
    pending: list[tuple[Any, DemoQuestion, float]] = []
    answers: list[dict[str, Any]] = []
    due = taken = asked = 0  # questions due so far, taken up (asked, or none to ask on that frame), asked

    def ask_due() -> None:
        nonlocal taken, asked
        while taken < due and not pending and camera.latest is not None:
            taken += 1
            question = pick_question(camera.latest, asked)
            if question is not None:
                pending.append((client.call_async(SpatialQuery.Request(question=question.question)), question,
                                time.monotonic()))
                asked += 1

    started = next_frame = last_print = time.monotonic()
    while not stop.is_set() and camera.index < total:
        now = time.monotonic()
        if now >= next_frame:
            camera.publish_next()
            next_frame = max(next_frame + period, time.monotonic() - period)  # late: no burst to catch up
            due += camera.index in ask_at
        _collect(pending, answers, camera, args.out)
        ask_due()
        if now - last_print >= 1.0:
            last_print = now
            live = scorer.live()
            print(f"t={now - started:4.1f}s camera {camera.published} frames, depth {scorer.received}, "
                  f"latency {live['latency_ms']:.0f} ms, live δ1 {live['delta1']:.3f} AbsRel {live['abs_rel']:.3f}",
                  flush=True)
        time.sleep(max(0.0, min(next_frame - time.monotonic(), 0.02)))

    def settled() -> bool:
        left = _collect(pending, answers, camera, args.out)
        ask_due()
        return not left and not pending and (taken == due or stop.is_set())

    _wait(settled, SETTLE_TIMEOUT_S, lambda: f"answers to {len(pending)} question(s) ({due - taken} not yet asked)")
    return answers


def _collect(pending: list[tuple[Any, DemoQuestion, float]], answers: list[dict[str, Any]], camera: DemoCamera,
             out: Path) -> int:
    """Move finished service calls from ``pending`` to ``answers``; print them and draw ``answer_N.png``.
    Returns how many are still pending."""
    for item in list(pending):
        future, question, asked = item
        if future.done():
            pending.remove(item)
            result = future.result()
            stamp = result.point.header.stamp
            view = camera.view_at(stamp.sec * 1_000_000_000 + stamp.nanosec) or question.view
            row = _answer_row(result, question, view, time.monotonic() - asked)
            row["image"] = f"answer_{len(answers)}.png"
            _draw_answer(row, question, view, out / row["image"])
            row["asked_at"] = asked
            answers.append(row)
            print(f"  Q: {question.question}\n  A: {row['answer']!r}\n     {_verdict(row)} ({row['message']}; "
                  f"{row['image']})", flush=True)
    return len(pending)


def _answer_row(result: Any, question: DemoQuestion, view: Any, seconds: float) -> dict[str, Any]:
    """The answer, scored on the frame it was measured on (``view``): is its place on the object it
    should name (the target's visible box there), the measured distance against the target's true one."""
    from depthvlm_ros.evaluation.qa import distance_error, place_on
    from depthvlm_ros.spatial import parse_grounding

    measured = float(result.distance_m) if result.success else math.nan
    in_frame = {lab.label: lab for lab in view.labels}
    target = in_frame.get(question.target.label, question.target)
    true = float(target.distance_m)
    region = [float(v) for v in result.region_px] if result.success else []
    places = parse_grounding(result.answer) if result.success else []
    rel_err, distance_ok = distance_error(measured, true)
    return {"kind": question.kind, "question": question.question, "answer": result.answer,
            "success": bool(result.success), "message": result.message, "region_px": region,
            "named": places[0].label if places and places[0].label else None, "target": target.label,
            "grounded": place_on(target.box_px, region),
            "distance_m": measured, "true_distance_m": round(true, 3), "rel_err": rel_err,
            "distance_ok": distance_ok,
            "seconds": round(seconds, 3)}


def _verdict(row: dict[str, Any]) -> str:
    place = "on" if row["grounded"] else ("not on" if row["region_px"] else "names no place; wanted")
    return (f"place {place} the {row['target']}; measured {row['distance_m']:.2f} m, "
            f"true {row['true_distance_m']:.2f} m")


def _draw_answer(row: dict[str, Any], question: DemoQuestion, view: Any, path: Path) -> None:
    from PIL import Image as PILImage

    from depthvlm_ros.visualize import draw_answer

    in_frame = {lab.label: lab for lab in view.labels}
    boxes = [(list(in_frame[lab.label].box_px), lab.label) for lab in question.objects if lab.label in in_frame]
    answer = " ".join(row["answer"].split())
    lines = [f"Q: {row['question']}", f"A: {answer[:96]}"] + ([f"   {answer[96:192]}"] if len(answer) > 96 else [])
    lines.append(_verdict(row) + (" (within 25 %)" if row["distance_ok"] else ""))
    if row["kind"] == "closer":
        lines.append(f"true: the {question.target.label} is closer; the answer named "
                     f"{row['named'] or 'nothing'}")
    PILImage.fromarray(draw_answer(view.rgb, row["region_px"] or None, boxes, lines)).save(path)


def _summary(args: argparse.Namespace, latest: dict[str, str], node: dict[str, int], camera: DemoCamera,
             scorer: DepthScorer, recorder: Any, answers: list[dict[str, Any]]) -> dict[str, Any]:
    d1 = [s["delta1"] for s in scorer.scores]
    rel = [s["abs_rel"] for s in scorer.scores]
    lat = scorer.latencies_ms
    # Frames published while no question was being answered, and how many of them got depth.
    windows = [(a["asked_at"], a["asked_at"] + a["seconds"]) for a in answers]
    quiet = [stamp for stamp, sent in camera.sent.items() if not any(t0 <= sent <= t1 for t0, t1 in windows)]
    quiet_with_depth = sum(1 for stamp in quiet if stamp in scorer.stamps)
    start = min(camera.sent.values(), default=0.0)
    missed = [round(camera.sent[stamp] - start, 2) for stamp in quiet if stamp not in scorer.stamps][:20]
    for a in answers:
        a.pop("asked_at", None)
    return {
        "model": latest.get("model", ""), "backend": latest.get("backend", ""),
        "backend_choice": latest.get("backend_choice", ""), "scene": {"kind": args.kind, "seed": args.seed},
        "camera": {"size": list(args.size), "fx": camera.intrinsics.fx, "rate_hz": args.rate, "seconds": args.seconds},
        "frames_published": camera.published, "depth_received": scorer.received, "depth_scored": len(scorer.scores),
        "frames_without_question": len(quiet), "depth_without_question": quiet_with_depth,
        "missed_without_question_s": missed,  # when those frames were sent (s after the first; at most 20)
        "question_windows_s": [[round(t0 - start, 2), round(t1 - start, 2)] for t0, t1 in windows],
        "node": {"process": "own", **node, "forward_p50_ms": latest.get("forward_p50_ms"),
                 "overhead_p50_ms": latest.get("overhead_p50_ms")},
        "depth_rate_hz": scorer.received / args.seconds,
        "delta1_mean": float(np.mean(d1)) if d1 else None, "abs_rel_mean": float(np.mean(rel)) if rel else None,
        "tae_percent": float(np.mean([t for t, _ in scorer.tae])) if scorer.tae else None,
        "tae_ground_truth_percent": float(np.mean([f for _, f in scorer.tae])) if scorer.tae else None,
        "tae_pairs": len(scorer.tae), "truth_topic": TRUTH_TOPIC,
        "latency_ms_median": float(np.median(lat)) if lat else None,
        "latency_ms_p90": float(np.percentile(lat, 90)) if lat else None,
        "answers": answers,
        "files": {"bag": "demo.mcap", "pngs": scorer.pngs, "answer_pngs": [a["image"] for a in answers],
                  "cloud": scorer.cloud_written, "summary": "summary.json", "node_log": "node.log"},
        "recorded": {topic: count for topic, count in recorder.counts.items()},
    }


def _print_summary(s: dict[str, Any], out: Path) -> None:
    fmt = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731
    print(f"\ndemo summary ({s['model']}, {s['backend']}):")
    print(f"  camera frames {s['frames_published']}, depth images {s['depth_received']} "
          f"({s['depth_rate_hz']:.1f} Hz), latency median {fmt(s['latency_ms_median'], '.0f')} ms "
          f"p90 {fmt(s['latency_ms_p90'], '.0f')} ms")
    quiet = s["frames_without_question"]
    share = 100.0 * s["depth_without_question"] / quiet if quiet else float("nan")
    print(f"  while no question ran: {s['depth_without_question']} of {quiet} camera frames got depth ({share:.0f} %)")
    print(f"  depth vs ground truth over {s['depth_scored']} frames: δ1 {fmt(s['delta1_mean'], '.3f')}, "
          f"AbsRel {fmt(s['abs_rel_mean'], '.3f')}, TAE {fmt(s['tae_percent'], '.2f')} % over {s['tae_pairs']} "
          f"successive pairs (the ground truth's own {fmt(s['tae_ground_truth_percent'], '.2f')} %)")
    print(f"  the bag carries the truth on /{s['truth_topic']}: depthvlm eval --bag {out}/{s['files']['bag']} "
          f"--reference-depth /{s['truth_topic']} --predicted-depth /depth/image")
    for a in s["answers"]:
        print(f"  {a['question']} -> {a['named'] or 'no place'}: {_verdict(a)} ({a['image']})")
    print(f"  wrote {out}/: {s['files']['bag']}, {len(s['files']['pngs'])} depth PNGs, "
          f"{len(s['files']['answer_pngs'])} answer PNGs, "
          f"{s['files']['cloud'] or 'no cloud'}, summary.json", file=sys.stdout)
