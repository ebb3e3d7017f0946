"""Peer processes for the node tests: a camera that publishes, a subscriber that records, a diagnostics
watcher and a service client.

Run as ``python test/ros_peer.py publish|collect|watch|call|ask_scenes|lifecycle|ask|graph ...`` in the test's ROS
environment (private ROS_DOMAIN_ID, localhost discovery, the shipped Fast DDS profile). Each peer is its own
process, so the node is exercised over real Fast DDS exactly as a robot's software would use it.
Peers never wait a fixed time: they wait for matched endpoints, acknowledged messages, message
counts and diagnostics values, each with a generous timeout that fails loudly (exit 1).
"""

from __future__ import annotations

import argparse
import json
import math
import select
import sys
import time
from pathlib import Path

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.duration import Duration
from rclpy.executors import ExternalShutdownException
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2
from std_msgs.msg import Header

from depthvlm_ros.geometry import Intrinsics
from depthvlm_ros.ros.messages import (
    image_to_depth,
    image_to_rgb,
    intrinsics_to_camera_info,
    msg_to_cloud,
    rgb_to_image,
)

#: Ceilings of every wait here (s): only a failing run ever waits this long, so they are generous enough for
#: a machine several times slower than usual (each wait ends on its event, not on the clock).
MATCH_TIMEOUT = 60.0
EVENT_TIMEOUT = 120.0

RELIABLE = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE)


def frame_rgb(width: int, height: int, index: int) -> np.ndarray:
    """A textured frame that changes with ``index`` (so consecutive frames differ)."""
    u = np.arange(width, dtype=np.float32)[None, :] / width
    v = np.arange(height, dtype=np.float32)[:, None] / height
    r = 0.5 + 0.5 * np.sin(9.0 * u + 3.0 * v + 0.3 * index)
    g = 0.5 + 0.5 * np.cos(7.0 * v - 2.0 * u)
    b = np.clip(0.2 + 0.8 * (((u - 0.5) ** 2 + (v - 0.55) ** 2) < 0.04), 0.0, 1.0) + 0 * u
    return np.rint(np.stack([r + 0 * v, g + 0 * u, b], axis=-1) * 255).astype(np.uint8)


def encode(rgb: np.ndarray, encoding: str, header: Header, pad: int = 0) -> Image:
    """An Image in ``encoding`` with ``pad`` extra bytes per row (step > width x channels)."""
    if encoding == "mono8":
        pixels = rgb[..., :1]
    elif encoding == "bgr8":
        pixels = rgb[..., ::-1]
    elif encoding == "rgba8":
        pixels = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=-1)
    elif encoding == "bgra8":
        pixels = np.concatenate([rgb[..., ::-1], np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=-1)
    elif encoding == "rgb8":
        return rgb_to_image(rgb, header) if pad == 0 else encode_padded(rgb, header, pad)
    else:  # an encoding the node does not take: 2 bytes per pixel, labelled as asked
        h, w, _ = rgb.shape
        return Image(header=header, height=h, width=w, encoding=encoding, step=w * 2, data=bytes(h * w * 2))
    h, w, c = pixels.shape
    rows = np.zeros((h, w * c + pad), np.uint8)
    rows[:, : w * c] = pixels.reshape(h, w * c)
    return Image(header=header, height=h, width=w, encoding=encoding, step=w * c + pad, data=rows.tobytes())


def encode_padded(rgb: np.ndarray, header: Header, pad: int) -> Image:
    h, w, _ = rgb.shape
    rows = np.zeros((h, w * 3 + pad), np.uint8)
    rows[:, : w * 3] = rgb.reshape(h, w * 3)
    return Image(header=header, height=h, width=w, encoding="rgb8", step=w * 3 + pad, data=rows.tobytes())


#: Diagnostics counters that together say what became of every frame the node received.
OUTCOMES = ("frames_processed", "errors", "frames_dropped", "frames_skipped_rate_limit", "frames_without_camera_info")
BAD_KINDS = ("step", "size", "nan_k", "zero_k", "encoding", "aspect", "huge", "cx")


def parse_condition(text: str):
    """'KEY>=N' (also <=, >, <), 'KEY==V', 'KEY!=V' or 'KEY~TEXT' (contains) on a diagnostics status -> predicate.

    V may name another key (``handled==frames_received``); ``handled`` is the sum of :data:`OUTCOMES`.
    """
    for op in (">=", "<=", "==", "!=", ">", "<", "~"):
        if op in text:
            key, value = text.split(op, 1)
            break
    else:
        raise SystemExit(f"bad condition {text!r}")

    def holds(status: dict) -> bool:
        got = status.get(key)
        if got is None:
            return False
        if op == "~":
            return value in str(got)
        want = status.get(value, value)  # the value may name another key: handled==frames_received
        try:
            a, b = float(got), float(want)
        except ValueError:
            a, b = str(got), str(want)
        return {">=": a >= b, "<=": a <= b, "==": a == b, "!=": a != b, ">": a > b, "<": a < b}[op]

    return holds


class Diagnostics:
    """The node's /diagnostics as seen by this peer: the latest ``<node>: depth`` status as a dict (or the
    status called ``name``: ``depthvlm: left: depth`` for camera ``left``)."""

    def __init__(self, node, name: str | None = None) -> None:
        self.node = node
        self.name = name
        self.latest: dict | None = None
        self.count = 0
        node.create_subscription(DiagnosticArray, "/diagnostics", self._on, 10)

    def _on(self, msg: DiagnosticArray) -> None:
        for status in msg.status:
            if status.name == self.name if self.name else status.name.endswith(": depth"):
                level = status.level
                self.latest = {"level": int.from_bytes(level, "little") if isinstance(level, bytes) else int(level),
                               "message": status.message, **{kv.key: kv.value for kv in status.values}}
                self.latest["handled"] = str(handled(self.latest))
                self.count += 1

    def wait(self, predicate, timeout: float, what: str) -> dict:
        """Spin until a status after now satisfies ``predicate``; exit 1 (with the last status) on timeout."""
        seen = self.count
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rclpy.spin_once(self.node, timeout_sec=0.05)
            if self.count > seen and predicate(self.latest):
                return self.latest
        print(json.dumps({"timeout": what, "last": self.latest}), flush=True)
        raise SystemExit(1)


def handled(status: dict) -> int:
    return sum(int(status.get(key, 0)) for key in OUTCOMES)


def wait_matched(node, endpoints, timeout: float, what: str) -> None:
    """Spin until every publisher has a subscriber / every subscription a publisher (this side's view)."""
    def matched(e) -> bool:
        count = e.get_subscription_count() if hasattr(e, "get_subscription_count") else e.get_publisher_count()
        return count > 0

    deadline = time.monotonic() + timeout
    while not all(matched(e) for e in endpoints):
        if time.monotonic() > deadline:
            print(json.dumps({"timeout": f"matching {what}"}), flush=True)
            raise SystemExit(1)
        rclpy.spin_once(node, timeout_sec=0.05)


def spin_until(node, done, what: str, timeout: float, report: object = None) -> None:
    """Spin until ``done()``; after ``timeout`` s print what was awaited (and ``report``) and exit 1."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            print(json.dumps({"timeout": what, "report": report() if callable(report) else report}), flush=True)
            raise SystemExit(1)
        rclpy.spin_once(node, timeout_sec=0.01)


def stdin_closed() -> bool:
    """Whether this process's standard input has reached its end (the test closed it); never blocks."""
    return bool(select.select([sys.stdin], [], [], 0)[0]) and not sys.stdin.read(1)


def publish(args: argparse.Namespace) -> None:
    """Publish ``--count`` frames (image + camera_info with one stamp) at ``--rate`` Hz.

    Starts once both publishers are matched. With ``--await`` each frame is published only after the
    node's diagnostics account for the previous one (processed, refused, dropped or unmatched), so no
    frame is replaced in the node's one-frame slot and every frame's outcome is known. Reliable
    publishers wait until every subscriber acknowledged the last frame. ``--until`` conditions are
    then waited for on the diagnostics.

    With ``--until-stdin-closes`` the camera streams at ``--rate`` until the test closes this process's
    standard input (once its listener has what it waits for, however long that takes on this machine);
    ``--count`` is then only a ceiling, and reaching it is a failure (exit 1) that says how many were sent.
    """
    node = rclpy.create_node("test_camera", namespace=args.ns)
    qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=args.depth,
                     reliability=ReliabilityPolicy.RELIABLE if args.reliable else ReliabilityPolicy.BEST_EFFORT)
    pub_image = node.create_publisher(Image, "image", qos)
    pub_info = node.create_publisher(CameraInfo, "camera_info", qos)
    diagnostics = Diagnostics(node, args.status) if (args.await_each or args.until or args.await_all) else None
    wait_matched(node, [pub_image] if args.no_info else [pub_image, pub_info], MATCH_TIMEOUT, "the node's inputs")
    status = first = diagnostics.wait(lambda _s: True, EVENT_TIMEOUT, "first diagnostics") if diagnostics else None
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")] if args.sizes else [
        (args.width, args.height)]
    bad = args.bad.split(",") if args.bad else []
    assert all(b in BAD_KINDS for b in bad), f"--bad takes {BAD_KINDS}"
    frames: dict[tuple, np.ndarray] = {}  # frame i shows frame_rgb(i) (long runs cycle through 8)
    tracked: dict[str, float] = {}  # --track: the largest value of a key in any status seen
    sent = []
    rng = np.random.default_rng(args.start)
    start = time.monotonic()
    for n, i in enumerate(range(args.start, args.start + args.count)):
        if args.until_stdin_closes and stdin_closed():
            break
        width, height = sizes[n % len(sizes)]
        header = Header(frame_id=args.frame_id)
        header.stamp.sec, header.stamp.nanosec = 1000 + i // 1000, (i % 1000) * 1_000_000
        index = (i if args.count <= 8 and not args.until_stdin_closes else i % 8, width, height)
        if index not in frames:
            frames[index] = frame_rgb(width, height, index[0])
        kind = bad[n % len(bad)] if bad else None
        image = encode(frames[index], "16UC1" if kind == "encoding" else args.encoding, header, args.pad)
        if args.random_encoding:  # an encoding no one knows: random printable text of that length
            image.encoding = "".join(chr(c) for c in rng.integers(33, 127, args.random_encoding))
        if kind == "step":
            image.step = image.step - 1
        elif kind == "size":
            image.data = bytes(image.data[: len(image.data) // 2])
        elif kind == "huge":  # declares 8192x8192 rgba8 (268 MB) and carries a few bytes
            image = Image(header=header, height=8192, width=8192, encoding="rgba8", step=8192 * 4, data=bytes(64))
        k = Intrinsics.from_fx(width, height, args.fx)
        info_k = Intrinsics.from_fx(args.info_width or width, args.info_height or height,
                                    args.fx * (args.info_width or width) / width)
        if kind == "aspect":
            info_k = Intrinsics.from_fx(300, 300, args.fx)
        info = intrinsics_to_camera_info(info_k if (args.info_width or kind == "aspect") else k, header)
        if kind == "nan_k":
            info.k = [math.nan] * 9
            info.p = [0.0] * 12
        elif kind == "zero_k":
            info.k = [0.0] * 9
            info.p = [0.0] * 12
        elif kind == "cx":  # a principal point 1e30 px off the image: finite, and absurd
            info.k[2] = info.p[2] = 1e30
        before = handled(status) if args.await_each else 0
        if args.no_info:
            pub_image.publish(image)
        elif args.info_first:
            pub_info.publish(info)
            pub_image.publish(image)
        else:
            pub_image.publish(image)
            pub_info.publish(info)
        sent.append(i)
        if args.await_each:
            status = diagnostics.wait(lambda s, b=before: handled(s) > b, EVENT_TIMEOUT, f"frame {i} handled")
            for key in args.track:
                tracked[key] = max(tracked.get(key, -math.inf), float(status[key]))
        else:
            next_time = start + (n + 1) / args.rate
            time.sleep(max(0.0, next_time - time.monotonic()))  # the camera's frame rate
    else:
        if args.until_stdin_closes:  # the ceiling, not the test, ended the stream
            print(json.dumps({"timeout": f"published the ceiling of {len(sent)} frames (--count) and the test "
                                         "never closed stdin"}), flush=True)
            raise SystemExit(1)
    if args.reliable:
        for pub in (pub_image, pub_info):
            pub.wait_for_all_acked(Duration(seconds=30))
    if args.await_all:  # every frame sent is accounted for by the node (processed, refused, dropped, lost, ...)
        due = handled(first) + int(first["frames_lost_before_node"]) + len(sent)
        status = diagnostics.wait(lambda s: handled(s) + int(s["frames_lost_before_node"]) >= due, EVENT_TIMEOUT,
                                  f"all {len(sent)} frames accounted for")
    for text in args.until:
        status = diagnostics.wait(parse_condition(text), EVENT_TIMEOUT, text)
    print(json.dumps({"sent": len(sent), "seconds": time.monotonic() - start, "first": first,
                      "diagnostics": status, "max": tracked}), flush=True)
    node.destroy_node()


def collect(args: argparse.Namespace) -> None:
    """Subscribe to the node's outputs; save what arrived (arrays + metadata) to ``--out``.

    Prints ``ready`` once its subscriptions are matched. Ends when ``--count`` messages arrived on every
    topic it subscribes to and every ``--until`` condition holds on a diagnostics status received after
    that, or with ``--until-stdin-closes`` when its standard input is closed (the test says when; or at
    ``--timeout``).
    """
    node = rclpy.create_node("test_listener", namespace=args.ns)
    got: dict[str, dict[str, object]] = {"depth": {}, "info": {}, "colored": {}, "points": {}}
    diagnostics: list[dict[str, object]] = []
    arrival: dict[str, float] = {}
    seen = {topic: 0 for topic in (("depth", "info") if args.no_heavy else got)}  # messages per topic
    if args.compressed_depth:
        got["compressed"], seen["compressed"] = {}, 0

    def key(header: Header) -> str:
        return f"{header.stamp.sec}.{header.stamp.nanosec:09d}|{header.frame_id}"

    def on_depth(msg: Image) -> None:
        arrival.setdefault(key(msg.header), time.monotonic())
        seen["depth"] += 1
        if len(got["depth"]) < args.keep:
            got["depth"][key(msg.header)] = {"encoding": msg.encoding, "data": image_to_depth(msg),
                                             "step": msg.step, "width": msg.width, "height": msg.height}

    def on_info(msg: CameraInfo) -> None:
        seen["info"] += 1
        if len(got["info"]) < args.keep:
            got["info"][key(msg.header)] = {"k": list(msg.k), "p": list(msg.p), "width": msg.width,
                                            "height": msg.height, "d": list(msg.d)}

    def on_colored(msg: Image) -> None:
        seen["colored"] += 1
        if len(got["colored"]) < args.keep:
            got["colored"][key(msg.header)] = {"encoding": msg.encoding, "data": image_to_rgb(msg)}

    def on_points(msg: PointCloud2) -> None:
        seen["points"] += 1
        if len(got["points"]) < args.keep:
            got["points"][key(msg.header)] = {
                "height": msg.height, "width": msg.width, "point_step": msg.point_step, "row_step": msg.row_step,
                "is_dense": msg.is_dense, "is_bigendian": msg.is_bigendian,
                "fields": [(f.name, f.offset, f.datatype, f.count) for f in msg.fields],
                "data": np.array(msg_to_cloud(msg)),
            }

    def on_compressed(msg: CompressedImage) -> None:  # kept as sent: the test decodes it
        seen["compressed"] += 1
        if len(got["compressed"]) < args.keep:
            got["compressed"][key(msg.header)] = {"format": msg.format,
                                                  "data": np.frombuffer(bytes(msg.data), np.uint8)}

    subs = [node.create_subscription(Image, "depth/image", on_depth, RELIABLE),
            node.create_subscription(CameraInfo, "depth/camera_info", on_info, RELIABLE)]
    if args.compressed_depth:
        subs.append(node.create_subscription(CompressedImage, "depth/image/compressedDepth", on_compressed,
                                             RELIABLE))
    if not args.no_heavy:
        subs.append(node.create_subscription(Image, "depth/colored", on_colored, RELIABLE))
        subs.append(node.create_subscription(PointCloud2, "points", on_points, RELIABLE))
    watch = Diagnostics(node, args.status)
    wait_matched(node, subs, MATCH_TIMEOUT, "the node's outputs")
    print(json.dumps({"ready": True}), flush=True)
    conditions = [parse_condition(text) for text in args.until]
    deadline = time.monotonic() + args.timeout
    last = -1
    while time.monotonic() < deadline:
        rclpy.spin_once(node, timeout_sec=0.05)
        if args.until_stdin_closes and stdin_closed():
            break  # EOF: the test closed our stdin
        if watch.count != last and watch.latest is not None:
            last = watch.count
            diagnostics.append(watch.latest)
            if not args.until_stdin_closes and min(seen.values()) >= args.count and all(
                    c(watch.latest) for c in conditions):
                break
    arrays = {}
    meta: dict[str, object] = {"diagnostics": diagnostics, "depth_count": len(arrival),
                               "arrivals": sorted(arrival.values())}  # time.monotonic(): one clock for all processes
    for topic, items in got.items():
        meta[topic] = {}
        for k, item in items.items():
            data = item.pop("data", None)
            if data is not None:
                arrays[f"{topic}|{k}"] = data
            meta[topic][k] = item
    np.savez(args.out, **arrays)
    Path(str(args.out) + ".json").write_text(json.dumps(meta))
    print(json.dumps({"depth_count": len(arrival)}), flush=True)
    node.destroy_node()


def answers(args: argparse.Namespace) -> None:
    """Subscribe to ``~/answers`` as a late subscriber would (reliable, transient-local) and print the first
    ``--count`` answers it gets (those the node kept, then new ones) as JSON; a ceiling fails."""
    from depthvlm_msgs.msg import Answer
    from rclpy.qos import DurabilityPolicy

    node = rclpy.create_node("test_answers")
    got: list[dict[str, object]] = []

    def on_answer(msg: Answer) -> None:
        got.append({"via": msg.via, "camera": msg.camera, "question": msg.question, "success": msg.success,
                    "answer": msg.answer, "message": msg.message, "distance_m": msg.distance_m,
                    "point": [msg.point.x, msg.point.y, msg.point.z], "region_px": list(msg.region_px),
                    "frame_id": msg.header.frame_id, "stamp": [msg.header.stamp.sec, msg.header.stamp.nanosec]})

    latched = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.TRANSIENT_LOCAL)
    node.create_subscription(Answer, "/depthvlm/answers", on_answer, latched)
    deadline = time.monotonic() + args.timeout
    while len(got) < args.count:
        if time.monotonic() > deadline:
            raise SystemExit(f"answers: {len(got)} of {args.count} answers within {args.timeout:g} s")
        rclpy.spin_once(node, timeout_sec=0.05)
    print(json.dumps(got), flush=True)
    node.destroy_node()


def watch(args: argparse.Namespace) -> None:
    """Exit 0 with the first diagnostics status (from now on) on which every ``--until`` condition holds."""
    node = rclpy.create_node("test_watch")
    conditions = [parse_condition(text) for text in args.until]
    status = Diagnostics(node).wait(lambda s: all(c(s) for c in conditions), args.timeout, " and ".join(args.until))
    print(json.dumps(status), flush=True)
    node.destroy_node()


def call(args: argparse.Namespace) -> None:
    """Call one of the node's services with a JSON request; print the response as JSON.

    ``--repeat N`` sends N identical requests at once and prints a list, in the order they completed.
    """
    from depthvlm_msgs.srv import DepthAt, SpatialQuery
    from rcl_interfaces.msg import Parameter as ParameterMsg
    from rcl_interfaces.srv import SetParameters
    from rclpy.parameter import Parameter

    node = rclpy.create_node("test_client")
    request = json.loads(sys.stdin.read() if args.request == "-" else args.request)
    if args.service == "set_parameters":
        srv_type = SetParameters
        req = SetParameters.Request(parameters=[
            ParameterMsg(name=k, value=Parameter(k, value=v).get_parameter_value()) for k, v in request.items()
        ])
    else:
        srv_type = {"spatial_query": SpatialQuery, "depth_at": DepthAt}[args.service]
        req = srv_type.Request(**request)
    client = node.create_client(srv_type, f"/depthvlm/{args.service}")
    assert client.wait_for_service(timeout_sec=MATCH_TIMEOUT), "service not available"
    futures = [client.call_async(req) for _ in range(args.repeat)]
    done: list[tuple[int, float]] = []
    start = time.monotonic()
    deadline = start + args.timeout
    while len(done) < len(futures) and time.monotonic() < deadline:
        rclpy.spin_once(node, timeout_sec=0.05)
        done += [(i, time.monotonic()) for i, f in enumerate(futures) if f.done() and i not in dict(done)]
    assert len(done) == len(futures), f"{len(futures) - len(done)} of {len(futures)} calls got no response"

    def response(res) -> dict:
        if args.service == "set_parameters":
            return {"results": [{"successful": r.successful, "reason": r.reason} for r in res.results]}
        if args.service == "depth_at":
            return {"success": res.success, "message": res.message, "depth_m": [float(d) for d in res.depth_m],
                    "points": [[p.x, p.y, p.z] for p in res.points], "frame_id": res.header.frame_id,
                    "stamp": [res.header.stamp.sec, res.header.stamp.nanosec]}
        p = res.point.point
        return {"success": res.success, "answer": res.answer, "message": res.message,
                "distance_m": float(res.distance_m), "point": [p.x, p.y, p.z],
                "frame_id": res.point.header.frame_id, "region_px": [float(v) for v in res.region_px]}

    results = [{**response(futures[i].result()), "completed_at": t} for i, t in done]  # time.monotonic()
    print(json.dumps(results if args.repeat > 1 else results[0], allow_nan=True), flush=True)
    node.destroy_node()


def ask_scenes(args: argparse.Namespace) -> None:
    """Publish generated frames one at a time and ask each frame's own questions about it.

    Frame ``i`` of ``depthvlm generate --seed SEED --kind KIND`` (320x240, the default focal range) is
    published (image + camera_info, stamp 2000 s + i ms); once the node's depth image of that stamp
    arrives, its questions of the ``--kinds`` kinds are asked through ``~/spatial_query`` one by one.
    Prints a list: each generated QA record with the response's answer, region_px, distance_m and stamp.
    """
    from depthvlm_msgs.srv import SpatialQuery

    from depthvlm_ros.scenes.dataset import FrameSpec, default_fx_range, frame_records

    node = rclpy.create_node("test_scene_camera")
    pub_image = node.create_publisher(Image, "image", RELIABLE)
    pub_info = node.create_publisher(CameraInfo, "camera_info", RELIABLE)
    depth_stamps: set[tuple[int, int]] = set()
    sub = node.create_subscription(Image, "depth/image",
                                   lambda m: depth_stamps.add((m.header.stamp.sec, m.header.stamp.nanosec)), RELIABLE)
    client = node.create_client(SpatialQuery, "/depthvlm/spatial_query")
    wait_matched(node, [pub_image, pub_info, sub], MATCH_TIMEOUT, "the node's camera topics and depth")
    assert client.wait_for_service(timeout_sec=MATCH_TIMEOUT), "spatial_query not available"

    def until(done, what: str) -> None:
        spin_until(node, done, what, args.timeout)

    kinds = set(args.kinds.split(","))
    spec = FrameSpec(args.kind, 320, 240, *default_fx_range(320))
    out = []
    for index in range(args.first, args.first + args.frames):
        view, _, records = frame_records(args.seed, index, spec)
        records = [r for r in records if r["qa_kind"] in kinds]
        if not records:
            continue
        header = Header(frame_id="cam_optical")
        header.stamp.sec, header.stamp.nanosec = 2000, index * 1_000_000
        pub_info.publish(intrinsics_to_camera_info(view.intrinsics, header))
        pub_image.publish(rgb_to_image(view.rgb, header))
        stamp = (2000, index * 1_000_000)
        until(lambda stamp=stamp: stamp in depth_stamps, f"depth of frame {index}")
        for record in records:
            future = client.call_async(SpatialQuery.Request(question=record["question"]))
            until(future.done, f"an answer to {record['question']!r}")
            res = future.result()
            out.append({"record": record, "index": index, "success": res.success, "answer": res.answer,
                        "message": res.message, "distance_m": float(res.distance_m),
                        "region_px": [float(v) for v in res.region_px],
                        "stamp": [res.point.header.stamp.sec, res.point.header.stamp.nanosec]})
    print(json.dumps(out, allow_nan=True), flush=True)
    node.destroy_node()


def graph(args: argparse.Namespace) -> None:
    """Print the topics and services node ``--node`` has on the graph, once its ``--expect`` services are seen:
    {"publish": [...], "subscribe": [...], "service": [...]} (fully qualified names)."""
    node = rclpy.create_node("test_graph")

    def seen() -> dict[str, list[str]]:
        ns = "/"
        if (args.node, ns) not in node.get_node_names_and_namespaces():
            return {"publish": [], "subscribe": [], "service": []}
        return {"publish": sorted(n for n, _ in node.get_publisher_names_and_types_by_node(args.node, ns)),
                "subscribe": sorted(n for n, _ in node.get_subscriber_names_and_types_by_node(args.node, ns)),
                "service": sorted(n for n, _ in node.get_service_names_and_types_by_node(args.node, ns))}

    def complete() -> bool:
        now = seen()
        return all(name in now["service"] + now["publish"] + now["subscribe"] for name in args.expect)

    spin_until(node, complete, f"{args.node}'s names on the graph", EVENT_TIMEOUT, report=seen)
    print(json.dumps(seen()), flush=True)
    node.destroy_node()


def rss_mb(pid: int) -> float:
    """Resident memory of process ``pid`` (MiB), from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise SystemExit(f"no VmRSS for {pid}")


def lifecycle(args: argparse.Namespace) -> None:
    """Drive the node through its lifecycle from here, as a lifecycle manager does, while a camera in this
    process publishes at ``--rate`` Hz the whole time.

    configure -> activate (depth flows; one question) -> deactivate (no depth while frames keep arriving: the node's
    ``frames_ignored_inactive`` grows by ``--ignored`` frames and at least 2 s pass) -> activate (flows
    again) -> deactivate while a question is answered -> cleanup (the node's RSS before and after) ->
    shutdown (the process ends). Prints what it saw at each step.
    """
    from depthvlm_msgs.action import Ask
    from depthvlm_msgs.srv import SpatialQuery
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState, GetState
    from rclpy.action import ActionClient

    node = rclpy.create_node("test_lifecycle_manager")
    pub_image = node.create_publisher(Image, "image", RELIABLE)
    pub_info = node.create_publisher(CameraInfo, "camera_info", RELIABLE)
    depth: list[float] = []  # arrival times of depth images
    sub = node.create_subscription(Image, "depth/image", lambda _m: depth.append(time.monotonic()), RELIABLE)
    asker = node.create_client(SpatialQuery, "/depthvlm/spatial_query")
    ask_client = ActionClient(node, Ask, "/depthvlm/ask")
    change = node.create_client(ChangeState, "/depthvlm/change_state")
    get = node.create_client(GetState, "/depthvlm/get_state")
    diagnostics = Diagnostics(node)
    frames = [frame_rgb(160, 120, i) for i in range(4)]
    sent = [0]

    def camera() -> None:
        i = sent[0]
        header = Header(frame_id="cam_optical")
        header.stamp.sec, header.stamp.nanosec = 3000 + i // 1000, (i % 1000) * 1_000_000
        pub_image.publish(rgb_to_image(frames[i % 4], header))
        pub_info.publish(intrinsics_to_camera_info(Intrinsics.from_fx(160, 120, 150.0), header))
        sent[0] += 1

    def until(done, what: str) -> None:
        spin_until(node, done, what, EVENT_TIMEOUT, report)

    def alive() -> bool:
        return Path(f"/proc/{args.pid}").exists() and "zombie" not in Path(f"/proc/{args.pid}/status").read_text()

    def state() -> str:
        future = get.call_async(GetState.Request())
        until(future.done, "get_state")
        return future.result().current_state.label

    def transition(transition_id: int) -> bool | None:
        future = change.call_async(ChangeState.Request(transition=Transition(id=transition_id)))
        until(lambda: future.done() or not alive(), f"transition {transition_id}")
        return future.result().success if future.done() else None

    report: dict[str, object] = {}
    assert change.wait_for_service(timeout_sec=MATCH_TIMEOUT) and get.wait_for_service(timeout_sec=MATCH_TIMEOUT)
    report["initial"] = state()
    report["rss_unconfigured"] = rss_mb(args.pid)
    report["configure"] = transition(Transition.TRANSITION_CONFIGURE)
    report["after_configure"] = state()
    report["rss_configured"] = rss_mb(args.pid)
    wait_matched(node, [pub_image, pub_info, sub], MATCH_TIMEOUT, "the node's camera topics and depth")
    node.create_timer(1.0 / args.rate, camera)
    report["activate"] = transition(Transition.TRANSITION_ACTIVATE)
    until(lambda: len(depth) >= 3, "depth after activate")
    answer = asker.call_async(SpatialQuery.Request(question="How far is it?"))
    until(answer.done, "an answer")  # the answer's LM head reads every weight of the tied embedding
    report["answered"] = answer.result().success
    report["rss_answered"] = rss_mb(args.pid)
    report["deactivate"] = transition(Transition.TRANSITION_DEACTIVATE)
    before, started = len(depth), time.monotonic()
    ignored = diagnostics.wait(lambda st: True, EVENT_TIMEOUT, "diagnostics")["frames_ignored_inactive"]
    until(lambda: diagnostics.latest is not None
          and int(diagnostics.latest["frames_ignored_inactive"]) >= int(ignored) + args.ignored
          and time.monotonic() - started >= 2.0, "frames ignored while inactive")
    report["inactive_status"] = diagnostics.latest
    report["depth_while_inactive"] = len(depth) - before
    report["inactive_seconds"] = time.monotonic() - started
    report["reactivate"] = transition(Transition.TRANSITION_ACTIVATE)
    before = len(depth)
    until(lambda: len(depth) >= before + 3, "depth after the second activate")
    # a question being answered when the node is deactivated: it stops and its client gets the result
    feedback: list[int] = []
    goal = ask_client.send_goal_async(Ask.Goal(question="How far is it?", max_new_tokens=64),
                                      feedback_callback=lambda fb: feedback.append(fb.feedback.tokens))
    until(goal.done, "the goal's acceptance")
    result = goal.result().get_result_async()
    until(lambda: feedback or result.done(), "the answer to start")
    report["deactivate_again"] = transition(Transition.TRANSITION_DEACTIVATE)
    until(result.done, "the result of the question the deactivation stopped")
    report["stopped_question"] = {"success": result.result().result.success,
                                  "message": result.result().result.message, "tokens_seen": len(feedback)}
    report["rss_before_cleanup"] = rss_mb(args.pid)
    report["cleanup"] = transition(Transition.TRANSITION_CLEANUP)
    report["after_cleanup"] = state()
    report["rss_after_cleanup"] = rss_mb(args.pid)
    report["shutdown"] = transition(Transition.TRANSITION_UNCONFIGURED_SHUTDOWN)
    until(lambda: not alive(), "the node's process to end after shutdown")
    report["frames_sent"] = sent[0]
    print(json.dumps(report), flush=True)
    node.destroy_node()


def ask(args: argparse.Namespace) -> None:
    """Publish one frame, wait for its depth, then ask about it through the ``~/ask`` action (feedback and
    result, with the time each arrived) and the same question through ``~/spatial_query``; with
    ``--cancel-after N`` the goal is canceled once N feedback messages arrived. ``--markers``: also
    record ``~/answer_markers``. Prints all of it."""
    from action_msgs.msg import GoalStatus
    from depthvlm_msgs.action import Ask
    from depthvlm_msgs.srv import SpatialQuery
    from rclpy.action import ActionClient
    from visualization_msgs.msg import MarkerArray

    node = rclpy.create_node("test_asker")
    pub_image = node.create_publisher(Image, "image", RELIABLE)
    pub_info = node.create_publisher(CameraInfo, "camera_info", RELIABLE)
    depth_stamps: list[tuple[int, int]] = []
    sub = node.create_subscription(Image, "depth/image",
                                   lambda m: depth_stamps.append((m.header.stamp.sec, m.header.stamp.nanosec)),
                                   RELIABLE)
    markers: list[dict] = []

    def on_markers(msg: MarkerArray) -> None:
        markers.append({"markers": [{"type": m.type, "ns": m.ns, "frame_id": m.header.frame_id,
                                     "stamp": [m.header.stamp.sec, m.header.stamp.nanosec], "text": m.text,
                                     "position": [m.pose.position.x, m.pose.position.y, m.pose.position.z],
                                     "lifetime": m.lifetime.sec + m.lifetime.nanosec * 1e-9}
                                    for m in msg.markers]})

    marker_sub = node.create_subscription(MarkerArray, "/depthvlm/answer_markers", on_markers, RELIABLE)
    client = ActionClient(node, Ask, "/depthvlm/ask")
    service = node.create_client(SpatialQuery, "/depthvlm/spatial_query")
    wait_matched(node, [pub_image, pub_info, sub] + ([marker_sub] if args.markers else []), MATCH_TIMEOUT,
                 "the node's topics")
    assert client.wait_for_server(timeout_sec=MATCH_TIMEOUT) and service.wait_for_service(timeout_sec=MATCH_TIMEOUT)

    def until(done, what: str) -> None:
        spin_until(node, done, what, args.timeout)

    header = Header(frame_id="cam_optical")
    header.stamp.sec, header.stamp.nanosec = 4000, 0
    k = Intrinsics.from_fx(args.width, args.height, args.fx)
    pub_info.publish(intrinsics_to_camera_info(k, header))
    pub_image.publish(rgb_to_image(frame_rgb(args.width, args.height, 0), header))
    until(lambda: (4000, 0) in depth_stamps, "the frame's depth")

    feedback: list[dict] = []
    goal = Ask.Goal(question=args.question, camera=args.camera, max_new_tokens=args.max_new_tokens)
    sent = client.send_goal_async(goal, feedback_callback=lambda fb: feedback.append(
        {"answer": fb.feedback.answer, "tokens": fb.feedback.tokens, "at": time.monotonic()}))
    until(sent.done, "the goal's acceptance")
    handle = sent.result()
    if not handle.accepted:  # rejected by the node's goal callback: there is no result to wait for
        print(json.dumps({"status": "rejected", "feedback": feedback}), flush=True)
        node.destroy_node()
        return
    result_future = handle.get_result_async()
    canceled_at = None
    if args.cancel_after:
        until(lambda: len(feedback) >= args.cancel_after or result_future.done(), "feedback before cancelling")
        if not result_future.done():
            canceled_at = {"tokens": feedback[-1]["tokens"], "at": time.monotonic()}
            cancel = handle.cancel_goal_async()
            until(cancel.done, "the cancel's response")
    until(result_future.done, "the action's result")
    result_at = time.monotonic()
    wrapped = result_future.result()
    res = wrapped.result
    p = res.point.point
    out = {"status": {GoalStatus.STATUS_SUCCEEDED: "succeeded", GoalStatus.STATUS_CANCELED: "canceled",
                      GoalStatus.STATUS_ABORTED: "aborted"}.get(wrapped.status, str(wrapped.status)),
           "feedback": feedback, "result_at": result_at, "canceled_at": canceled_at,
           "result": {"success": res.success, "answer": res.answer, "message": res.message,
                      "distance_m": float(res.distance_m), "point": [p.x, p.y, p.z],
                      "frame_id": res.point.header.frame_id,
                      "stamp": [res.point.header.stamp.sec, res.point.header.stamp.nanosec],
                      "region_px": [float(v) for v in res.region_px]}}
    if args.compare_service:
        future = service.call_async(SpatialQuery.Request(question=args.question, camera=args.camera))
        until(future.done, "the service's answer")
        r = future.result()
        q = r.point.point
        out["service"] = {"success": r.success, "answer": r.answer, "message": r.message,
                          "distance_m": float(r.distance_m), "point": [q.x, q.y, q.z],
                          "frame_id": r.point.header.frame_id,
                          "stamp": [r.point.header.stamp.sec, r.point.header.stamp.nanosec],
                          "region_px": [float(v) for v in r.region_px]}
    if args.markers:
        until(lambda: len(markers) >= args.markers, "the answer markers")
        out["markers"] = markers
    print(json.dumps(out, allow_nan=True), flush=True)
    node.destroy_node()


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("publish")
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--height", type=int, default=240)
    p.add_argument("--sizes", help="WxH,WxH,...: frame n has the n-th size (cycling), all at --fx")
    p.add_argument("--fx", type=float, default=300.0)
    p.add_argument("--rate", type=float, default=5.0)
    p.add_argument("--count", type=int, default=5)
    p.add_argument("--start", type=int, default=0, help="index of the first frame (its stamp and content)")
    p.add_argument("--encoding", default="rgb8")
    p.add_argument("--pad", type=int, default=0)
    p.add_argument("--frame-id", default="cam_optical")
    p.add_argument("--bad", help=f"comma list of {','.join(BAD_KINDS)}: frame n is broken the n-th way (cycling)")
    p.add_argument("--info-width", type=int, default=0)
    p.add_argument("--info-height", type=int, default=0)
    p.add_argument("--no-info", action="store_true")
    p.add_argument("--info-first", action="store_true")
    p.add_argument("--reliable", action="store_true")
    p.add_argument("--await", dest="await_each", action="store_true",
                   help="publish each frame once the node accounted for the previous one (needs --reliable)")
    p.add_argument("--until", action="append", default=[], help="then wait for this diagnostics condition")
    p.add_argument("--await-all", action="store_true",
                   help="then wait until the node accounted for every frame sent (reliable, deep enough --depth)")
    p.add_argument("--random-encoding", type=int, default=0, metavar="N",
                   help="each frame's encoding is N random printable characters")
    p.add_argument("--track", action="append", default=[], help="with --await: report the largest value of KEY")
    p.add_argument("--depth", type=int, default=5)
    p.add_argument("--until-stdin-closes", action="store_true",
                   help="stream at --rate until stdin is closed; --count is a ceiling that fails")
    c = sub.add_parser("collect")
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--count", type=int, default=5)
    c.add_argument("--keep", type=int, default=5)
    c.add_argument("--timeout", type=float, default=240.0, help="ceiling: end with what arrived by then")
    c.add_argument("--until", action="append", default=[], help="also wait for this diagnostics condition")
    c.add_argument("--no-heavy", action="store_true", help="do not subscribe to depth/colored and points")
    c.add_argument("--compressed-depth", action="store_true", help="also subscribe to depth/image/compressedDepth")
    c.add_argument("--until-stdin-closes", action="store_true", help="end when stdin is closed (not on --count)")
    for parser_ in (p, c):
        parser_.add_argument("--ns", default="", help="namespace of this peer's topics (a camera of the node)")
        parser_.add_argument("--status", help="the diagnostics status to follow (default: the one '...: depth')")
    w = sub.add_parser("watch")
    w.add_argument("--until", action="append", default=[], required=True)
    w.add_argument("--timeout", type=float, default=EVENT_TIMEOUT)
    q = sub.add_parser("call")
    q.add_argument("service", choices=["spatial_query", "depth_at", "set_parameters"])
    q.add_argument("request", help="JSON object: request fields (set_parameters: name -> value); - reads it from "
                                   "stdin (requests too long for a command line)")
    q.add_argument("--repeat", type=int, default=1, help="send this many identical requests at once")
    q.add_argument("--timeout", type=float, default=EVENT_TIMEOUT)
    a = sub.add_parser("ask_scenes")
    a.add_argument("--seed", type=int, required=True)
    a.add_argument("--kind", choices=["indoor", "outdoor"], required=True)
    a.add_argument("--first", type=int, default=0)
    a.add_argument("--frames", type=int, default=4)
    a.add_argument("--kinds", default="distance,where", help="comma list of QA kinds to ask")
    a.add_argument("--timeout", type=float, default=120.0)
    a.add_argument("--markers", action="store_true", help="also record ~/answer_markers")
    lc = sub.add_parser("lifecycle")
    lc.add_argument("--pid", type=int, required=True, help="the node's process (its RSS is read from /proc)")
    lc.add_argument("--rate", type=float, default=10.0)
    lc.add_argument("--ignored", type=int, default=10, help="frames the inactive node must have ignored")
    n = sub.add_parser("answers")
    n.add_argument("--count", type=int, default=1)
    n.add_argument("--timeout", type=float, default=EVENT_TIMEOUT)
    g = sub.add_parser("graph")
    g.add_argument("--node", default="depthvlm")
    g.add_argument("--expect", action="append", default=[], help="wait until this name is on the graph")
    k = sub.add_parser("ask")
    k.add_argument("question")
    k.add_argument("--camera", default="")
    k.add_argument("--max-new-tokens", type=int, default=0)
    k.add_argument("--cancel-after", type=int, default=0, help="cancel once this many feedback messages arrived")
    k.add_argument("--compare-service", action="store_true", help="then ask ~/spatial_query the same question")
    k.add_argument("--markers", type=int, default=0, help="wait for this many ~/answer_markers messages")
    k.add_argument("--width", type=int, default=320)
    k.add_argument("--height", type=int, default=240)
    k.add_argument("--fx", type=float, default=300.0)
    k.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()
    rclpy.init()
    try:
        {"publish": publish, "collect": collect, "watch": watch, "call": call, "ask_scenes": ask_scenes,
         "lifecycle": lifecycle, "ask": ask, "graph": graph, "answers": answers}[args.cmd](args)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        rclpy.try_shutdown()


if __name__ == "__main__":
    main()
