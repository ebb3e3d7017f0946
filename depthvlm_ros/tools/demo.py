"""``depthvlm demo``: the whole system live, on a synthetic moving camera, with ground truth.

Two processes, as on a robot: the **node** ``depthvlm`` (``depthvlm node``, the built-in model
unless ``--model``) in its own process, its log in ``--out``/node.log; and this one, with

- a **camera**: a generated scene seen along a smooth trajectory, published as ``image`` +
  ``camera_info`` (frame ``camera_optical_frame``) at ``--rate`` Hz; the exact depth of every
  frame is kept (bounded) to score what comes back;
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
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from depthvlm_ros.errors import InputError
from depthvlm_ros.files import write_text_atomic

FRAME_ID = "camera_optical_frame"
#: Frames whose ground truth is kept for scoring (older ones are dropped).
KEEP_TRUTH = 64
#: Coloured depth PNGs written at most.
MAX_PNGS = 8
RECORDED = ("image", "camera_info", "depth/image", "depth/camera_info", "depth/colored", "/diagnostics")


def add_parser(sub: argparse._SubParsersAction) -> None:
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


class DemoCamera:
    """Renders the trajectory and publishes image + camera_info; keeps recent ground truth."""

    def __init__(self, node: Any, args: argparse.Namespace) -> None:
        from sensor_msgs.msg import CameraInfo, Image

        from depthvlm_ros.geometry import Intrinsics
        from depthvlm_ros.scenes.layouts import nominal_fx, random_pose, random_scene, trajectory

        rng = np.random.default_rng([args.seed, 0])
        width, height = args.size
        self.scene = random_scene(rng, args.kind)
        start = random_pose(rng, self.scene)
        self.intrinsics = Intrinsics.from_fx(width, height, nominal_fx(width))
        self.poses = list(trajectory(self.scene, start, args.seconds, args.rate))
        self.node = node
        # Reliable, deep enough that the recorder never loses a frame to a full history while it writes.
        self.pub_image = node.create_publisher(Image, "image", 10)
        self.pub_info = node.create_publisher(CameraInfo, "camera_info", 10)
        self.truth: OrderedDict[int, Any] = OrderedDict()
        self.lock = threading.Lock()
        self.index = 0
        self.published = 0
        self.latest = None
        self.sent: dict[int, float] = {}  # stamp (ns) -> time.monotonic() when published

    def publish_warmup(self) -> None:
        """The first pose again, not counted and not scored (the node's warm-up)."""
        from std_msgs.msg import Header

        from depthvlm_ros.ros.messages import intrinsics_to_camera_info, rgb_to_image
        from depthvlm_ros.scenes.render import render

        view = render(self.scene, self.intrinsics, self.poses[0], with_labels=False)
        header = Header(frame_id=FRAME_ID)
        header.stamp = self.node.get_clock().now().to_msg()
        self.pub_info.publish(intrinsics_to_camera_info(self.intrinsics, header))
        self.pub_image.publish(rgb_to_image(view.rgb, header))

    def publish_next(self) -> bool:
        """Render and publish the next frame; False when the trajectory is done."""
        from std_msgs.msg import Header

        from depthvlm_ros.ros.messages import intrinsics_to_camera_info, rgb_to_image
        from depthvlm_ros.scenes.render import render

        if self.index >= len(self.poses):
            return False
        view = render(self.scene, self.intrinsics, self.poses[self.index], noise_seed=self.index)
        self.index += 1
        header = Header(frame_id=FRAME_ID)
        header.stamp = self.node.get_clock().now().to_msg()
        stamp_ns = header.stamp.sec * 1_000_000_000 + header.stamp.nanosec
        with self.lock:
            self.truth[stamp_ns] = view
            while len(self.truth) > KEEP_TRUTH:
                self.truth.popitem(last=False)
            self.latest = view
        self.pub_info.publish(intrinsics_to_camera_info(self.intrinsics, header))
        self.pub_image.publish(rgb_to_image(view.rgb, header))
        self.sent[stamp_ns] = time.monotonic()
        self.published += 1
        return True

    def view_at(self, stamp_ns: int) -> Any:
        with self.lock:
            return self.truth.get(stamp_ns)


class DepthScorer:
    """Scores every depth image against the frame it came from; keeps a few PNGs and one cloud."""

    def __init__(self, node: Any, camera: DemoCamera, out: Path) -> None:
        from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
        from sensor_msgs.msg import Image, PointCloud2

        self.camera = camera
        self.out = out
        self.scores: list[dict[str, float]] = []
        self.latencies_ms: list[float] = []
        self.received = 0
        self.stamps: set[int] = set()  # of the depth images received (one per camera frame at most)
        self.pngs: list[str] = []
        self.cloud_written: str | None = None
        self.started = time.monotonic()
        # Its own callback group: scoring, PNG and PLY writing never hold up the recorder's callbacks.
        group = MutuallyExclusiveCallbackGroup()
        import open3d  # noqa: F401 (imported now: a first import in a callback would stall the camera for seconds)

        # Deep enough that no depth image is replaced before it is scored.
        self.subs = [node.create_subscription(Image, "depth/image", self.on_depth, 100, callback_group=group),
                     node.create_subscription(Image, "depth/colored", self.on_colored, 10, callback_group=group),
                     node.create_subscription(PointCloud2, "points", self.on_points, 2, callback_group=group)]
        self.node = node

    def on_depth(self, msg: Any) -> None:
        from depthvlm_ros.evaluation.metrics import score_depths
        from depthvlm_ros.ros.messages import image_to_depth

        stamp_ns = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
        self.received += 1
        self.stamps.add(stamp_ns)
        self.latencies_ms.append((self.node.get_clock().now().nanoseconds - stamp_ns) / 1e6)
        view = self.camera.view_at(stamp_ns)
        if view is None:
            return
        score = score_depths(image_to_depth(msg), view.depth)
        if score.metrics is not None:
            self.scores.append({"delta1": score.metrics["delta1"], "abs_rel": score.metrics["abs_rel"]})

    def on_colored(self, msg: Any) -> None:
        from PIL import Image as PILImage

        from depthvlm_ros.ros.messages import image_to_rgb

        elapsed = time.monotonic() - self.started
        if len(self.pngs) >= MAX_PNGS or elapsed < 2.0 * len(self.pngs):
            return  # one every 2 s
        stamp_ns = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
        view = self.camera.view_at(stamp_ns)
        coloured = image_to_rgb(msg)
        panel = coloured if view is None else np.concatenate([view.rgb, coloured], axis=1)
        path = self.out / f"depth_{len(self.pngs):02d}.png"
        PILImage.fromarray(panel).save(path)
        self.pngs.append(path.name)

    def on_points(self, msg: Any) -> None:
        if self.cloud_written is not None or self.received < 3:
            return
        import open3d as o3d

        from depthvlm_ros.pointcloud import unpack_rgb
        from depthvlm_ros.ros.messages import msg_to_cloud

        cloud = msg_to_cloud(msg).reshape(-1)
        xyz = np.stack([cloud["x"], cloud["y"], cloud["z"]], axis=1).astype(np.float64)
        ok = np.isfinite(xyz).all(axis=1)
        pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(xyz[ok]))
        if "rgb" in cloud.dtype.names:
            pcd.colors = o3d.utility.Vector3dVector(unpack_rgb(cloud["rgb"][ok]).astype(np.float64) / 255.0)
        path = self.out / "cloud.ply"
        o3d.io.write_point_cloud(str(path), pcd)
        self.cloud_written = path.name

    def live(self) -> dict[str, float]:
        recent = self.scores[-10:]
        return {
            "delta1": float(np.mean([s["delta1"] for s in recent])) if recent else math.nan,
            "abs_rel": float(np.mean([s["abs_rel"] for s in recent])) if recent else math.nan,
            "latency_ms": float(np.median(self.latencies_ms[-10:])) if self.latencies_ms else math.nan,
        }


#: The demo's questions in turn (kinds of :mod:`depthvlm_ros.scenes.qa`): how far, where, which is closer.
DEMO_QUESTION_KINDS = ("distance", "where", "closer")


@dataclass
class DemoQuestion:
    """A scripted question about the frame in view when it was asked."""

    kind: str  # one of DEMO_QUESTION_KINDS
    question: str
    objects: list[Any]  # the named objects' ObjectLabels (closer: both)
    view: Any  # the Rendering in view when asked

    @property
    def target(self) -> Any:
        """The object the answer should point at (closer: the nearer one)."""
        return min(self.objects, key=lambda lab: lab.distance_m)


def pick_question(view: Any, number: int) -> DemoQuestion | None:
    """Question ``number`` (0, 1, ...) about the frame ``view``: its kind cycles through
    :data:`DEMO_QUESTION_KINDS`; it names the biggest objects in view (the n-th question of a kind the
    n-th biggest), with the generator's first template of that kind."""
    from depthvlm_ros.scenes.qa import TEMPLATES, askable

    k = view.intrinsics
    objects = sorted(askable(view.labels, k.width, k.height), key=lambda lab: -lab.visible_px)
    kind = DEMO_QUESTION_KINDS[number % len(DEMO_QUESTION_KINDS)]
    turn = number // len(DEMO_QUESTION_KINDS)
    template = TEMPLATES[kind][0]
    if kind != "closer":
        if not objects:
            return None
        a = objects[turn % len(objects)]
        return DemoQuestion(kind, template.format(a=a.label), [a], view)
    pairs = [(a, b) for i, a in enumerate(objects) for b in objects[i + 1:]
             if max(a.distance_m, b.distance_m) >= 1.2 * min(a.distance_m, b.distance_m)]  # clearly closer
    if not pairs:
        return None
    a, b = pairs[turn % len(pairs)]
    return DemoQuestion(kind, template.format(a=a.label, b=b.label), [a, b], view)


def run(args: argparse.Namespace) -> int:
    from rclpy.executors import MultiThreadedExecutor

    from depthvlm_ros.ros.runtime import NodeProcess, NodeStatus, private_ros_environment, short_gil_switch
    from depthvlm_ros.tools.play import ros_node
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
                      and counted("frames_received") + counted("frames_lost_before_node") >= camera.published
                      and status.get()[1].get("frames_pending") == "0"
                      and scorer.received >= counted("frames_processed")
                      and recorder.counts.get("/depth/image", 0) >= scorer.received, SETTLE_TIMEOUT_S,
                      lambda: f"the last frames to be processed (published {camera.published}, recorded "
                              f"{recorder.counts}, node {status.get()[1]}, scored {scorer.received})")
                node_counts = {key: counted(key) for key in baseline}
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


def _wait(condition: Any, timeout_s: float, what: Any) -> None:
    """Until ``condition()`` holds (checked every 20 ms); a clear error after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise InputError(f"demo: waited {timeout_s:g} s for {what() if callable(what) else what}")
        time.sleep(0.02)


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
          f"AbsRel {fmt(s['abs_rel_mean'], '.3f')}")
    for a in s["answers"]:
        print(f"  {a['question']} -> {a['named'] or 'no place'}: {_verdict(a)} ({a['image']})")
    print(f"  wrote {out}/: {s['files']['bag']}, {len(s['files']['pngs'])} depth PNGs, "
          f"{len(s['files']['answer_pngs'])} answer PNGs, "
          f"{s['files']['cloud'] or 'no cloud'}, summary.json", file=sys.stdout)
