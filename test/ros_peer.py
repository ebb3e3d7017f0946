"""Peer processes for the node tests: a camera that publishes, a subscriber that records, a flood.

Run as ``python test/ros_peer.py publish|collect ...`` in the test's ROS environment (private
ROS_DOMAIN_ID, localhost discovery, the shipped Fast DDS profile). Each peer is its own process, so
the node is exercised over real Fast DDS exactly as a robot's software would use it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.executors import ExternalShutdownException
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, Image, PointCloud2
from std_msgs.msg import Header

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from depthvlm_ros.geometry import Intrinsics  # noqa: E402
from depthvlm_ros.ros.messages import (  # noqa: E402
    image_to_depth,
    image_to_rgb,
    intrinsics_to_camera_info,
    msg_to_cloud,
    rgb_to_image,
)

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


def publish(args: argparse.Namespace) -> None:
    """Publish ``--count`` frames (image + camera_info with one stamp) at ``--rate`` Hz."""
    node = rclpy.create_node("test_camera")
    qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=args.depth,
                     reliability=ReliabilityPolicy.RELIABLE if args.reliable else ReliabilityPolicy.BEST_EFFORT)
    pub_image = node.create_publisher(Image, "image", qos)
    pub_info = node.create_publisher(CameraInfo, "camera_info", qos)
    deadline = time.monotonic() + 10.0
    while pub_image.get_subscription_count() == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(args.settle)
    k = Intrinsics.from_fx(args.width, args.height, args.fx)
    info_k = Intrinsics.from_fx(args.info_width or args.width, args.info_height or args.height,
                                args.fx * (args.info_width or args.width) / args.width)
    frames: dict[int, np.ndarray] = {}  # frame i shows frame_rgb(i) (long runs cycle through 8)
    sent = []
    start = time.monotonic()
    for i in range(args.start, args.start + args.count):
        header = Header(frame_id=args.frame_id)
        header.stamp.sec, header.stamp.nanosec = 1000 + i // 1000, (i % 1000) * 1_000_000
        index = i if args.count <= 8 else i % 8
        if index not in frames:
            frames[index] = frame_rgb(args.width, args.height, index)
        image = encode(frames[index], args.encoding, header, args.pad)
        if args.bad == "step":
            image.step = image.step - 1
        elif args.bad == "size":
            image.data = bytes(image.data[: len(image.data) // 2])
        info = intrinsics_to_camera_info(info_k if args.info_width else k, header)
        if args.bad == "nan_k":
            info.k = [math.nan] * 9
            info.p = [0.0] * 12
        elif args.bad == "zero_k":
            info.k = [0.0] * 9
            info.p = [0.0] * 12
        if not args.no_info:
            if args.info_first:
                pub_info.publish(info)
                pub_image.publish(image)
            else:
                pub_image.publish(image)
                pub_info.publish(info)
        else:
            pub_image.publish(image)
        sent.append(i)
        next_time = start + (i - args.start + 1) / args.rate
        time.sleep(max(0.0, next_time - time.monotonic()))
    time.sleep(args.linger)
    print(json.dumps({"sent": len(sent), "seconds": time.monotonic() - start}), flush=True)
    node.destroy_node()


def collect(args: argparse.Namespace) -> None:
    """Subscribe to the node's outputs; save what arrived (arrays + metadata) to ``--out``."""
    node = rclpy.create_node("test_listener")
    got: dict[str, dict[str, object]] = {"depth": {}, "info": {}, "colored": {}, "points": {}}
    diagnostics: list[dict[str, object]] = []
    arrival: dict[str, float] = {}

    def key(header: Header) -> str:
        return f"{header.stamp.sec}.{header.stamp.nanosec:09d}|{header.frame_id}"

    def on_depth(msg: Image) -> None:
        arrival.setdefault(key(msg.header), time.monotonic())
        if len(got["depth"]) < args.keep:
            got["depth"][key(msg.header)] = {"encoding": msg.encoding, "data": image_to_depth(msg),
                                             "step": msg.step, "width": msg.width, "height": msg.height}

    def on_info(msg: CameraInfo) -> None:
        if len(got["info"]) < args.keep:
            got["info"][key(msg.header)] = {"k": list(msg.k), "p": list(msg.p), "width": msg.width,
                                            "height": msg.height, "d": list(msg.d)}

    def on_colored(msg: Image) -> None:
        if len(got["colored"]) < args.keep:
            got["colored"][key(msg.header)] = {"encoding": msg.encoding, "data": image_to_rgb(msg)}

    def on_points(msg: PointCloud2) -> None:
        if len(got["points"]) < args.keep:
            got["points"][key(msg.header)] = {
                "height": msg.height, "width": msg.width, "point_step": msg.point_step, "row_step": msg.row_step,
                "is_dense": msg.is_dense, "is_bigendian": msg.is_bigendian,
                "fields": [(f.name, f.offset, f.datatype, f.count) for f in msg.fields],
                "data": np.array(msg_to_cloud(msg)),
            }

    def on_diagnostics(msg: DiagnosticArray) -> None:
        for status in msg.status:
            if status.name.endswith(": depth"):
                diagnostics.append({"level": int.from_bytes(status.level, "little") if isinstance(status.level, bytes)
                                    else int(status.level), "message": status.message,
                                    **{kv.key: kv.value for kv in status.values}})

    node.create_subscription(Image, "depth/image", on_depth, RELIABLE)
    node.create_subscription(CameraInfo, "depth/camera_info", on_info, RELIABLE)
    if not args.no_heavy:
        node.create_subscription(Image, "depth/colored", on_colored, RELIABLE)
        node.create_subscription(PointCloud2, "points", on_points, RELIABLE)
    node.create_subscription(DiagnosticArray, "/diagnostics", on_diagnostics, 10)
    print(json.dumps({"ready": True}), flush=True)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline and len(arrival) < args.count:
        rclpy.spin_once(node, timeout_sec=0.1)
    end = time.monotonic() + args.after
    while time.monotonic() < end:
        rclpy.spin_once(node, timeout_sec=0.1)
    arrays = {}
    meta: dict[str, object] = {"diagnostics": diagnostics, "depth_count": len(arrival)}
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


def call(args: argparse.Namespace) -> None:
    """Call one of the node's services with a JSON request; print the response as JSON."""
    from depthvlm_msgs.srv import DepthAt, SpatialQuery
    from rcl_interfaces.msg import Parameter as ParameterMsg
    from rcl_interfaces.srv import SetParameters
    from rclpy.parameter import Parameter

    node = rclpy.create_node("test_client")
    request = json.loads(args.request)
    if args.service == "set_parameters":
        srv_type = SetParameters
        req = SetParameters.Request(parameters=[
            ParameterMsg(name=k, value=Parameter(k, value=v).get_parameter_value()) for k, v in request.items()
        ])
    else:
        srv_type = {"spatial_query": SpatialQuery, "depth_at": DepthAt}[args.service]
        req = srv_type.Request(**request)
    client = node.create_client(srv_type, f"/depthvlm/{args.service}")
    assert client.wait_for_service(timeout_sec=20.0), "service not available"
    future = client.call_async(req)
    rclpy.spin_until_future_complete(node, future, timeout_sec=args.timeout)
    res = future.result()
    if args.service == "set_parameters":
        out = {"results": [{"successful": r.successful, "reason": r.reason} for r in res.results]}
    elif args.service == "depth_at":
        out = {"success": res.success, "message": res.message, "depth_m": [float(d) for d in res.depth_m],
               "points": [[p.x, p.y, p.z] for p in res.points], "frame_id": res.header.frame_id,
               "stamp": [res.header.stamp.sec, res.header.stamp.nanosec]}
    else:
        p = res.point.point
        out = {"success": res.success, "answer": res.answer, "message": res.message,
               "distance_m": float(res.distance_m), "point": [p.x, p.y, p.z],
               "frame_id": res.point.header.frame_id, "region_px": [float(v) for v in res.region_px]}
    print(json.dumps(out, allow_nan=True), flush=True)
    node.destroy_node()


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("publish")
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--height", type=int, default=240)
    p.add_argument("--fx", type=float, default=300.0)
    p.add_argument("--rate", type=float, default=5.0)
    p.add_argument("--count", type=int, default=5)
    p.add_argument("--start", type=int, default=0, help="index of the first frame (its stamp and content)")
    p.add_argument("--encoding", default="rgb8")
    p.add_argument("--pad", type=int, default=0)
    p.add_argument("--frame-id", default="cam_optical")
    p.add_argument("--bad", choices=["step", "size", "nan_k", "zero_k"])
    p.add_argument("--info-width", type=int, default=0)
    p.add_argument("--info-height", type=int, default=0)
    p.add_argument("--no-info", action="store_true")
    p.add_argument("--info-first", action="store_true")
    p.add_argument("--reliable", action="store_true")
    p.add_argument("--depth", type=int, default=5)
    p.add_argument("--settle", type=float, default=1.0)
    p.add_argument("--linger", type=float, default=0.5)
    c = sub.add_parser("collect")
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--count", type=int, default=5)
    c.add_argument("--keep", type=int, default=5)
    c.add_argument("--timeout", type=float, default=60.0)
    c.add_argument("--after", type=float, default=1.0, help="keep listening this long after --count")
    c.add_argument("--no-heavy", action="store_true", help="do not subscribe to depth/colored and points")
    q = sub.add_parser("call")
    q.add_argument("service", choices=["spatial_query", "depth_at", "set_parameters"])
    q.add_argument("request", help="JSON object: request fields (set_parameters: name -> value)")
    q.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()
    rclpy.init()
    try:
        {"publish": publish, "collect": collect, "call": call}[args.cmd](args)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        rclpy.try_shutdown()


if __name__ == "__main__":
    main()
