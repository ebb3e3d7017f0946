"""The live demo's camera and scorer (``depthvlm demo``): a generated scene published as a camera, and every
depth image the node sends back scored against the frame it came from.

- :class:`DemoCamera` renders a scene along a smooth trajectory and publishes ``image`` + ``camera_info``
  (frame ``camera_optical_frame``) and the generator's exact depth of the same frame on ``ground_truth/depth``
  (32FC1 metres, NaN where nothing is in range, the image's header), so a bag of the demo carries its own truth;
  it keeps the recent frames' exact depth (bounded) to score what comes back;
- :class:`DepthScorer` subscribes to ``depth/image`` (δ1, AbsRel against that truth; TAE between successive depth
  images, with the camera's poses), ``depth/colored`` (a few PNGs beside the frame) and ``points`` (one PLY).
"""

from __future__ import annotations

import argparse
import math
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from depthvlm_ros.scenes.render import Rendering

FRAME_ID = "camera_optical_frame"
#: The generator's exact depth of each camera frame (32FC1 metres, the image's header).
TRUTH_TOPIC = "ground_truth/depth"
#: Frames whose ground truth is kept for scoring (older ones are dropped).
KEEP_TRUTH = 64
#: Coloured depth PNGs written at most.
MAX_PNGS = 8


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
        self.pub_truth = node.create_publisher(Image, TRUTH_TOPIC, 10)
        self.truth: OrderedDict[int, Any] = OrderedDict()
        self.lock = threading.Lock()
        self.index = 0
        self.published = 0
        self.latest: Rendering | None = None
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

        from depthvlm_ros.ros.messages import depth_to_image, intrinsics_to_camera_info, rgb_to_image
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
        self.pub_truth.publish(depth_to_image(view.depth, header))
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
        self.tae: list[tuple[float, float]] = []  # (prediction, ground truth) TAE of successive depth images, %
        self.previous: tuple[Any, np.ndarray] | None = None  # the last scored (view, depth)
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
        depth = image_to_depth(msg)
        score = score_depths(depth, view.depth)
        if score.metrics is not None:
            self.scores.append({"delta1": score.metrics["delta1"], "abs_rel": score.metrics["abs_rel"]})
        self.score_motion(view, depth)

    def score_motion(self, view: Any, depth: np.ndarray) -> None:
        """TAE of this depth image and the previous one received (their camera poses are known), and of the truth
        on the same pixels; frames the node skipped are skipped here too."""
        from depthvlm_ros.evaluation.temporal import pair_tae

        previous, self.previous = self.previous, (view, depth)
        if previous is None or depth.shape != view.depth.shape:
            return
        before, before_depth = previous
        valid = np.isfinite(view.depth) & (view.depth > 0)
        valid_before = np.isfinite(before.depth) & (before.depth > 0)
        poses = (before.pose.world_from_camera(), view.pose.world_from_camera())
        tae = pair_tae(before_depth, depth, view.intrinsics, *poses, valid_before, valid)
        floor = pair_tae(before.depth, view.depth, view.intrinsics, *poses, valid_before, valid)
        if tae is not None and floor is not None:
            self.tae.append((tae, floor))

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
        if "rgb" in (cloud.dtype.names or ()):  # msg_to_cloud: always a structured array
            pcd.colors = o3d.utility.Vector3dVector(unpack_rgb(cloud["rgb"][ok]).astype(np.float64) / 255.0)
        path = self.out / "cloud.ply"
        o3d.io.write_point_cloud(str(path), pcd)  # type: ignore[arg-type]  # open3d's stub: PathLike; str works
        self.cloud_written = path.name

    def live(self) -> dict[str, float]:
        recent = self.scores[-10:]
        return {
            "delta1": float(np.mean([s["delta1"] for s in recent])) if recent else math.nan,
            "abs_rel": float(np.mean([s["abs_rel"] for s in recent])) if recent else math.nan,
            "latency_ms": float(np.median(self.latencies_ms[-10:])) if self.latencies_ms else math.nan,
        }
