"""Depth outputs of one camera: ``depth/image`` (REP 118), ``depth/image/compressedDepth`` (image_transport's
compressed_depth format), ``depth/camera_info`` (describes the depth grid exactly), ``depth/colored`` (rgb8)
and ``points`` (organized PointCloud2), each with the input's frame_id and stamp, under the camera's namespace.

The publishers are lifecycle publishers: they publish only while the node is active. Outputs nobody
subscribes to (the compressed depth, the coloured view, the cloud) are not computed.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2
from std_msgs.msg import Header

from depthvlm_ros.geometry import Intrinsics, depth_from_16uc1, depth_to_16uc1, resize_rgb
from depthvlm_ros.pointcloud import organized_cloud
from depthvlm_ros.ros import messages
from depthvlm_ros.ros.context import NodeContext
from depthvlm_ros.ros.intake import Decoded, qos, topic
from depthvlm_ros.ros.settings import OutputSettings
from depthvlm_ros.visualize import colorize_depth


@dataclass
class LatestDepth:
    """The latest published depth (what ``~/depth_at`` reads)."""

    header: Header
    depth: np.ndarray  # (h, w) float32 metres, NaN invalid: exactly what was published
    intrinsics: Intrinsics  # K of ``depth``
    image_size: tuple[int, int]  # (W, H) of the input image


class DepthOutputs:
    """One camera's publishers and its latest published depth."""

    def __init__(self, ctx: NodeContext, camera: str) -> None:
        node, o = ctx.node, ctx.settings().outputs
        qos_out = qos(o.output_reliability, o.output_depth)
        self._node = node
        self.depth = node.create_lifecycle_publisher(Image, topic(camera, "depth/image"), qos_out)
        self.compressed_depth = node.create_lifecycle_publisher(
            CompressedImage, topic(camera, "depth/image/compressedDepth"), qos_out)
        self.depth_info = node.create_lifecycle_publisher(CameraInfo, topic(camera, "depth/camera_info"), qos_out)
        self.colored = node.create_lifecycle_publisher(Image, topic(camera, "depth/colored"), qos_out)
        self.points = node.create_lifecycle_publisher(PointCloud2, topic(camera, "points"), qos_out)
        # Reusable message payloads (rclpy copies them when publishing); only the worker publishes.
        self._depth_buffer = messages.MessageBuffer()
        self._colored_buffer = messages.MessageBuffer()
        self._cloud_buffer = messages.MessageBuffer()
        self._latest: LatestDepth | None = None
        self._lock = threading.Lock()

    @property
    def publishers(self) -> list[Any]:
        return [self.depth, self.compressed_depth, self.depth_info, self.colored, self.points]

    def latest(self) -> LatestDepth | None:
        with self._lock:
            return self._latest

    def publish(self, decoded: Decoded, depth: np.ndarray, k: Intrinsics, s: OutputSettings) -> None:
        """Publish depth (metres on the grid ``k`` describes), its camera_info, the coloured view and the cloud."""
        header = decoded.header
        depth = np.asarray(depth, dtype=np.float32)
        if s.min_depth_m > 0 or s.max_depth_m > 0:
            far = s.max_depth_m if s.max_depth_m > 0 else np.inf
            depth = np.where((depth >= s.min_depth_m) & (depth <= far), depth, np.float32(np.nan))
        if s.depth_encoding == "16UC1":  # the cloud and ~/depth_at use exactly the published millimetres
            depth = depth_from_16uc1(depth_to_16uc1(depth))
        self.depth.publish(messages.depth_to_image(depth, header, s.depth_encoding, self._depth_buffer))
        if self.compressed_depth.get_subscription_count() > 0:
            self.compressed_depth.publish(messages.depth_to_compressed_depth(depth, header, s.depth_encoding,
                                                                             s.compressed_depth_max_m))
        self.depth_info.publish(messages.intrinsics_to_camera_info(k, header))
        with self._lock:
            self._latest = LatestDepth(header, depth, k, (decoded.intrinsics.width, decoded.intrinsics.height))
        if self.colored.get_subscription_count() > 0:
            auto = s.colormap_min_m == 0 and s.colormap_max_m == 0
            color = colorize_depth(depth, None if auto else s.colormap_min_m, None if auto else s.colormap_max_m)
            self.colored.publish(messages.rgb_to_image(color, header, self._colored_buffer))
        if s.publish_pointcloud and self.points.get_subscription_count() > 0:
            rgb = None
            if s.pointcloud_color:
                rgb = decoded.rgb if k.size == decoded.intrinsics.size else resize_rgb(decoded.rgb, *k.size)
            stride = s.pointcloud_stride
            shape = (-(-k.height // stride), -(-k.width // stride), 4 if rgb is not None else 3)
            cloud = organized_cloud(depth, k, rgb, stride, s.max_range_m if s.max_range_m > 0 else math.inf,
                                    out=self._cloud_buffer.array(np.float32, shape),
                                    outlier_radius_m=s.cloud_outlier_radius_m,
                                    outlier_min_neighbors=s.cloud_outlier_min_neighbors)
            self.points.publish(messages.cloud_to_msg(cloud, header, self._cloud_buffer))

    def destroy(self) -> None:
        for pub in self.publishers:
            self._node.destroy_lifecycle_publisher(pub)
