"""``depthvlm demo``: the whole system live, on a synthetic moving camera, with ground truth.

One process, one ROS context, three parts on one executor:

- a **camera**: a generated scene seen along a smooth trajectory, published as ``image`` +
  ``camera_info`` (frame ``camera_optical_frame``) at ``--rate`` Hz; the exact depth of every
  frame is kept (bounded) to score what comes back;
- the **node** ``depthvlm`` (the same class ``depthvlm node`` runs) with the built-in model;
- a **recorder** writing the topics to an MCAP bag, and a **client** asking scripted spatial
  questions through ``~/spatial_query`` about objects in view.

Prints once a second: rates, latency, live δ1/AbsRel against the generator's depth. Writes
``demo.mcap`` (a rosbag2 folder), coloured depth PNGs, ``cloud.ply`` (one frame's organized cloud)
and ``summary.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from depthvlm_ros.errors import InputError

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
    add_model_args(p)
    add_backend_args(p)
    p.set_defaults(func=run, backend="onnxruntime", backend_fallback=True)


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
        self.pngs: list[str] = []
        self.cloud_written: str | None = None
        self.started = time.monotonic()
        # Its own callback group: scoring, PNG and PLY writing never hold up the recorder's callbacks.
        group = MutuallyExclusiveCallbackGroup()
        self.subs = [node.create_subscription(Image, "depth/image", self.on_depth, 10, callback_group=group),
                     node.create_subscription(Image, "depth/colored", self.on_colored, 10, callback_group=group),
                     node.create_subscription(PointCloud2, "points", self.on_points, 2, callback_group=group)]
        self.node = node

    def on_depth(self, msg: Any) -> None:
        from depthvlm_ros.evaluation.metrics import score_depths
        from depthvlm_ros.ros.messages import image_to_depth

        stamp_ns = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
        self.received += 1
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


def pick_questions(view: Any, n: int) -> list[tuple[str, Any]]:
    """Questions about the biggest objects in view: "How far is the <colour> <name>?"."""
    from depthvlm_ros.scenes.qa import askable

    k = view.intrinsics
    objects = sorted(askable(view.labels, k.width, k.height), key=lambda lab: -lab.visible_px)
    return [(f"How far is the {lab.label}?", lab) for lab in objects[:n]]


def run(args: argparse.Namespace) -> int:
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.parameter import Parameter

    from depthvlm_ros.ros.node import DepthVLMNode
    from depthvlm_ros.tools.common import load_model
    from depthvlm_ros.tools.play import ros_node
    from depthvlm_ros.tools.record import TOPIC_TYPES, Recorder, final_path, move_into_place

    if not (0.5 <= args.seconds <= 3600 and 0.5 <= args.rate <= 60):
        raise InputError("--seconds must be in 0.5..3600 and --rate in 0.5..60")
    if not 0 <= args.queries <= 20:
        raise InputError("--queries must be in 0..20")
    args.out.mkdir(parents=True, exist_ok=True)
    model = load_model(args)
    print(f"demo: model {model.name}, backend {model.backend.describe()}, {args.kind} scene seed {args.seed}, "
          f"{args.size[0]}x{args.size[1]} at {args.rate:g} Hz for {args.seconds:g} s", flush=True)
    bag = args.out / "demo.mcap"
    if bag.is_file():
        bag.unlink()  # the previous run's
    bag_dir, tmp = final_path(bag)
    with ros_node("depthvlm_demo") as (demo, stop):
        from depthvlm_msgs.srv import SpatialQuery
        from rosbags.rosbag2 import StoragePlugin, Writer

        node = DepthVLMNode(model=model, context=demo.context, parameter_overrides=[
            # reliable and deep enough that no camera frame is replaced in the subscription's history
            # while this busy process takes it (the node's own slot still keeps only the latest)
            Parameter("input_reliability", value="reliable"), Parameter("input_depth", value=10)])
        camera = DemoCamera(demo, args)
        # One forward before the clock starts: a first run exports the ONNX graph (cached) here,
        # not while frames are arriving.
        from depthvlm_ros.scenes.render import render

        first = render(camera.scene, camera.intrinsics, camera.poses[0], with_labels=False)
        warm = time.perf_counter()
        model.predict_depth(first.rgb, camera.intrinsics, max_tokens=node.settings()["max_image_tokens"])
        print(f"demo: model ready ({(time.perf_counter() - warm):.1f} s warm-up)", flush=True)
        scorer = DepthScorer(demo, camera, args.out)
        writer = Writer(bag_dir, version=9, storage_plugin=StoragePlugin.MCAP)
        writer.open()
        topics = list(RECORDED) + (["points"] if args.record_points else [])
        recorder = Recorder(demo, writer, [(t, TOPIC_TYPES[t]) for t in topics],
                            argparse.Namespace(count=None, best_effort=False, qos_depth=100))  # never full
        client = demo.create_client(SpatialQuery, "/depthvlm/spatial_query")
        executor = MultiThreadedExecutor(num_threads=4, context=demo.context)
        executor.add_node(node)
        executor.add_node(demo)
        spinner = threading.Thread(target=executor.spin, daemon=True)
        spinner.start()
        answers: list[dict[str, Any]] = []
        try:
            # Matched both ways: camera -> node + recorder; depth -> scorer + recorder; depth/camera_info ->
            # recorder (the publishers' view), and every recording and scoring subscription (theirs).
            _wait(lambda: min(p.get_subscription_count() for p in (camera.pub_image, camera.pub_info, node.pub_depth))
                  >= 2 and node.pub_depth_info.get_subscription_count() >= 1 and client.service_is_ready()
                  and all(sub.get_publisher_count() >= 1 for sub in [*recorder.subs.values(), *scorer.subs]), 30.0,
                  "the node, the scorer and the recorder to subscribe")
            answers = _drive(args, camera, scorer, client, stop)
            # Every frame: recorded, taken by the node, and (if processed) its depth scored here.
            _wait(lambda: recorder.counts.get("/image", 0) >= camera.published
                  and recorder.counts.get("/camera_info", 0) >= camera.published
                  and node.counters.frames_in + node.counters.lost >= camera.published and not node.busy()
                  and scorer.received >= node.counters.processed
                  and recorder.counts.get("/depth/image", 0) >= node.counters.processed
                  and recorder.counts.get("/depth/camera_info", 0) >= node.counters.processed, 30.0,
                  lambda: f"the last frames to be processed (published {camera.published}, recorded "
                          f"{recorder.counts}, node {node.counters}, busy {node.busy()}, scored {scorer.received})")
        finally:
            executor.shutdown(timeout_sec=2.0)
            node.destroy_node()
            writer.close()
        move_into_place(bag_dir, tmp, bag)
        summary = _summary(args, model, node, camera, scorer, recorder, answers)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _print_summary(summary, args.out)
    return 0


def _wait(condition: Any, timeout_s: float, what: Any) -> None:
    """Until ``condition()`` holds (checked every 20 ms); a clear error after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise InputError(f"demo: waited {timeout_s:g} s for {what() if callable(what) else what}")
        time.sleep(0.02)


def _drive(args: argparse.Namespace, camera: DemoCamera, scorer: DepthScorer, client: Any,
           stop: threading.Event) -> list[dict[str, Any]]:
    """Publish frames on time, print live lines, ask questions at evenly spaced moments."""
    from depthvlm_msgs.srv import SpatialQuery

    period = 1.0 / args.rate
    total = len(camera.poses)
    ask_at = {int(total * (i + 1) / (args.queries + 1)) for i in range(args.queries)}
    pending: list[tuple[Any, str, Any, float]] = []
    answers: list[dict[str, Any]] = []
    asked = 0
    started = next_frame = last_print = time.monotonic()
    while not stop.is_set() and camera.index < total:
        now = time.monotonic()
        if now >= next_frame:
            camera.publish_next()
            next_frame += period
            if camera.index in ask_at and camera.latest is not None:
                choices = pick_questions(camera.latest, args.queries)
                if choices:  # the n-th question is about the n-th biggest object in view
                    question, label = choices[asked % len(choices)]
                    pending.append((client.call_async(SpatialQuery.Request(question=question)), question, label, now))
                    asked += 1
        _collect(pending, answers)
        if now - last_print >= 1.0:
            last_print = now
            live = scorer.live()
            print(f"t={now - started:4.1f}s camera {camera.published} frames, depth {scorer.received}, "
                  f"latency {live['latency_ms']:.0f} ms, live δ1 {live['delta1']:.3f} AbsRel {live['abs_rel']:.3f}",
                  flush=True)
        time.sleep(max(0.0, min(next_frame - time.monotonic(), 0.02)))
    deadline = time.monotonic() + 30.0
    while pending and time.monotonic() < deadline:
        _collect(pending, answers)
        time.sleep(0.05)
    return answers


def _collect(pending: list[tuple[Any, str, Any, float]], answers: list[dict[str, Any]]) -> None:
    """Move finished service calls from ``pending`` to ``answers`` and print them."""
    for item in list(pending):
        future, question, label, asked = item
        if future.done():
            pending.remove(item)
            row = _answer_row(future.result(), question, label, time.monotonic() - asked)
            answers.append(row)
            print(f"  Q: {question}\n  A: {row['answer']!r}\n     measured {row['distance_m']:.2f} m, "
                  f"true {label.distance_m:.2f} m ({row['message']})", flush=True)


def _answer_row(result: Any, question: str, label: Any, seconds: float) -> dict[str, Any]:
    measured = float(result.distance_m) if result.success else math.nan
    true = float(label.distance_m)
    return {"question": question, "answer": result.answer, "success": bool(result.success),
            "message": result.message, "distance_m": measured, "true_distance_m": round(true, 3),
            "rel_err": abs(measured - true) / true if math.isfinite(measured) else None,
            "seconds": round(seconds, 3)}


def _summary(args: argparse.Namespace, model: Any, node: Any, camera: DemoCamera, scorer: DepthScorer,
             recorder: Any, answers: list[dict[str, Any]]) -> dict[str, Any]:
    d1 = [s["delta1"] for s in scorer.scores]
    rel = [s["abs_rel"] for s in scorer.scores]
    lat = scorer.latencies_ms
    return {
        "model": model.name, "backend": model.backend.describe(), "scene": {"kind": args.kind, "seed": args.seed},
        "camera": {"size": list(args.size), "fx": camera.intrinsics.fx, "rate_hz": args.rate, "seconds": args.seconds},
        "frames_published": camera.published, "depth_received": scorer.received, "depth_scored": len(scorer.scores),
        "node": {"frames_received": node.counters.frames_in, "frames_processed": node.counters.processed,
                 "frames_dropped": node.counters.dropped, "frames_lost_before_node": node.counters.lost,
                 "errors": node.counters.errors},
        "depth_rate_hz": scorer.received / args.seconds,
        "delta1_mean": float(np.mean(d1)) if d1 else None, "abs_rel_mean": float(np.mean(rel)) if rel else None,
        "latency_ms_median": float(np.median(lat)) if lat else None,
        "latency_ms_p90": float(np.percentile(lat, 90)) if lat else None,
        "answers": answers,
        "files": {"bag": "demo.mcap", "pngs": scorer.pngs, "cloud": scorer.cloud_written, "summary": "summary.json"},
        "recorded": {topic: count for topic, count in recorder.counts.items()},
    }


def _print_summary(s: dict[str, Any], out: Path) -> None:
    fmt = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731
    print(f"\ndemo summary ({s['model']}, {s['backend']}):")
    print(f"  camera frames {s['frames_published']}, depth images {s['depth_received']} "
          f"({s['depth_rate_hz']:.1f} Hz), latency median {fmt(s['latency_ms_median'], '.0f')} ms "
          f"p90 {fmt(s['latency_ms_p90'], '.0f')} ms")
    print(f"  depth vs ground truth over {s['depth_scored']} frames: δ1 {fmt(s['delta1_mean'], '.3f')}, "
          f"AbsRel {fmt(s['abs_rel_mean'], '.3f')}")
    for a in s["answers"]:
        print(f"  {a['question']} -> measured {a['distance_m']:.2f} m, true {a['true_distance_m']:.2f} m")
    print(f"  wrote {out}/: {s['files']['bag']}, {len(s['files']['pngs'])} depth PNGs, "
          f"{s['files']['cloud'] or 'no cloud'}, summary.json", file=sys.stdout)
