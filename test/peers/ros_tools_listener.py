"""Test helper run as its own process: receive ``image`` + ``camera_info`` and save what arrived.

``python ros_tools_listener.py OUT.npz COUNT TIMEOUT_S [compressed]`` subscribes (reliable, deep
queue), stops after COUNT images and COUNT camera_infos (and COUNT image/compressed) or TIMEOUT_S (a ceiling),
and writes OUT.npz: ``images`` (N, H, W, 3) as received (rgb8 only) and ``meta``, a JSON string:
per image stamp, frame_id, encoding, size; per camera_info stamp, frame_id, size, k; per
image/compressed stamp, frame_id, format. Prints ``ready`` once subscribed.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np


def main() -> int:
    out, count, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    want_jpegs = count if sys.argv[4:] == ["compressed"] else 0
    import rclpy
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import CameraInfo, CompressedImage, Image

    rclpy.init()
    node = rclpy.create_node("ros_tools_listener")
    images: list[Image] = []
    infos: list[CameraInfo] = []
    jpegs: list[CompressedImage] = []
    qos = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
    node.create_subscription(Image, "image", images.append, qos)
    node.create_subscription(CameraInfo, "camera_info", infos.append, qos)
    node.create_subscription(CompressedImage, "image/compressed", jpegs.append, qos)
    print("ready", flush=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (len(images) < count or len(infos) < count or len(jpegs) < want_jpegs):
        rclpy.spin_once(node, timeout_sec=0.05)

    def stamp(msg) -> int:
        return msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec

    meta = {
        "images": [{"stamp": stamp(m), "frame_id": m.header.frame_id, "encoding": m.encoding,
                    "width": m.width, "height": m.height, "step": m.step} for m in images],
        "infos": [{"stamp": stamp(m), "frame_id": m.header.frame_id, "width": m.width, "height": m.height,
                   "k": list(m.k)} for m in infos],
        "compressed": [{"stamp": stamp(m), "frame_id": m.header.frame_id, "format": m.format} for m in jpegs],
    }
    pixels = [np.frombuffer(m.data, np.uint8).reshape(m.height, m.width, 3) for m in images if m.encoding == "rgb8"]
    np.savez(out, images=np.stack(pixels) if pixels else np.zeros((0, 1, 1, 3), np.uint8), meta=json.dumps(meta))
    node.destroy_node()
    rclpy.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
