"""``depthvlm play``: publish images, a video or a recorded bag as a camera (``image`` + ``camera_info``).

Sources:

- a folder of images (``.png``/``.jpg``/``.jpeg``/..., sorted by name), or one image file;
- a video file, read with PyAV (``pip install av``; not a dependency of this package);
- a rosbag2 (a folder with ``metadata.yaml``, or an ``.mcap``/``.db3`` file), read with ``rosbags``:
  its ``sensor_msgs/Image`` and ``CameraInfo`` messages are republished (topics ending in
  ``image_rect``/``image``/``image_raw`` and the ``camera_info`` next to it, or ``--image-topic`` /
  ``--info-topic``).

Every frame goes out as an rgb8 ``sensor_msgs/Image`` on ``image`` (and a JPEG
``sensor_msgs/CompressedImage`` on ``image/compressed`` with ``--compressed``) plus a ``CameraInfo``
on ``camera_info``, all with the same header: the current ROS time (or, with ``--bag-stamps``, the
bag's stamp) and ``--frame-id``. ``--count``/``--duration`` imply looping the source until reached;
without them (and without ``--loop``) the source plays once.

Publishers are reliable, keep-last 5 (``--best-effort`` for sensor-data QoS). A reliable publisher
reaches reliable and best-effort subscribers alike; best-effort only reaches best-effort ones.
"""

from __future__ import annotations

import argparse
import math
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from depthvlm_ros.errors import InputError, SetupError
from depthvlm_ros.geometry import Intrinsics, check_rgb, intrinsics_for_image
from depthvlm_ros.ros.runtime import StatusLine, ros_node

#: Still-image files a folder source may hold (matched case-insensitively).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
#: Files read as video (with PyAV).
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".ts", ".wmv", ".flv")
#: Single-file rosbag2 storages rosbags reads.
BAG_SUFFIXES = (".mcap", ".db3")
#: Image topic names picked from a bag, best first (last name segment).
BAG_IMAGE_NAMES = ("image_rect", "image_rect_color", "image", "image_color", "image_raw")
IMAGE_TYPE = "sensor_msgs/msg/Image"
INFO_TYPE = "sensor_msgs/msg/CameraInfo"
DEFAULT_FRAME_ID = "camera_optical_frame"


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``depthvlm play`` subcommand's options."""
    p = sub.add_parser(
        "play", help="publish images / a video / a rosbag2 as image + camera_info topics",
        description="Publish a folder of images, an image, a video (PyAV) or a rosbag2 (folder or .mcap) "
                    "as sensor_msgs/Image (rgb8) on 'image' and CameraInfo on 'camera_info'.",
    )
    p.add_argument("source", type=Path, help="image folder, image file, video file, or rosbag2 (folder or .mcap)")
    intr = p.add_argument_group("intrinsics (files and videos need one; a bag's camera_info is used otherwise)")
    intr.add_argument("--camera-info", type=Path, help="camera-info YAML (scaled to a proportional image size)")
    intr.add_argument("--fx", type=float, help="focal length in pixels (fy = fx, principal point at the centre)")
    p.add_argument("--rate", type=float, default=10.0, help="frames per second (default 10)")
    p.add_argument("--loop", action="store_true", help="repeat the source until stopped")
    p.add_argument("--count", type=int, help="stop after N frames (the source repeats until then)")
    p.add_argument("--duration", type=float, help="stop after S seconds (the source repeats until then)")
    p.add_argument("--frame-id", help=f"header frame_id (default {DEFAULT_FRAME_ID}; a bag's own for bags)")
    p.add_argument("--topic-prefix", default="", help="namespace for the topics, e.g. 'camera' -> camera/image")
    p.add_argument("--compressed", action="store_true", help="also publish JPEG on image/compressed")
    p.add_argument("--compressed-only", action="store_true",
                   help="publish JPEG on image/compressed instead of raw images on image")
    p.add_argument("--best-effort", action="store_true", help="best-effort publishers (default reliable)")
    p.add_argument("--qos-depth", type=int, default=5, help="publisher history depth (default 5)")
    p.add_argument("--wait-subscribers", type=int, default=0, metavar="N",
                   help="before the first frame, wait for N subscribers on every topic played (default 0)")
    p.add_argument("--wait-timeout", type=float, default=10.0,
                   help="longest wait for --wait-subscribers, seconds (default 10; then play anyway)")
    bag = p.add_argument_group("rosbag2 sources")
    bag.add_argument("--image-topic", help="the bag's image topic (default: picked by name)")
    bag.add_argument("--info-topic", help="the bag's camera_info topic (default: next to the image topic)")
    bag.add_argument("--bag-stamps", action="store_true", help="keep the bag's header stamps (default: now)")
    p.set_defaults(func=run)


# -- sources -------------------------------------------------------------------------------------------

@dataclass
class SourceImage:
    """One image a source yields to publish: RGB pixels, and from a bag its CameraInfo and header."""

    rgb: np.ndarray
    info: Any = None        # sensor_msgs/CameraInfo from a bag
    stamp: Any = None       # builtin_interfaces/Time from a bag
    frame_id: str = ""      # the bag's frame_id


class Source:
    """Frames of one pass over the input; ``frames()`` may be called again for the next pass."""

    description = ""
    #: (width, height) of the first frame, read cheaply before ROS starts (to check intrinsics early).
    first_size: tuple[int, int] | None = None
    has_camera_info = False

    def frames(self) -> Iterator[SourceImage]:
        raise NotImplementedError


class ImageFiles(Source):
    """A source of image files (a folder's, sorted by name, or one); a single image is decoded once."""

    def __init__(self, paths: list[Path], description: str) -> None:
        from depthvlm_ros.tools.common import image_size

        self.paths = paths
        self.description = description
        self.first_size = image_size(paths[0])
        self._cache: tuple[Path, np.ndarray] | None = None

    def frames(self) -> Iterator[SourceImage]:
        from depthvlm_ros.tools.common import read_rgb

        for path in self.paths:
            if self._cache is not None and self._cache[0] == path:
                rgb = self._cache[1]
            else:
                rgb = check_rgb(read_rgb(path))
                if len(self.paths) == 1:
                    self._cache = (path, rgb)  # a single image replayed: decode it once
            yield SourceImage(rgb)


class VideoFile(Source):
    """A source of a video file's frames as RGB, read with PyAV (its first video stream)."""

    def __init__(self, path: Path) -> None:
        self.av = import_av()
        self.path = path
        self.description = f"video {path.name}"
        with self._open() as container:
            stream = container.streams.video[0]
            self.first_size = (int(stream.codec_context.width), int(stream.codec_context.height))

    def _open(self):
        try:
            container = self.av.open(str(self.path))
        except Exception as exc:  # PyAV raises its own FFmpegError subclasses (OSError in older versions)
            raise InputError(f"{self.path}: cannot open video ({exc.__class__.__name__}: {exc})") from None
        if not container.streams.video:
            container.close()
            raise InputError(f"{self.path}: no video stream")
        return container

    def frames(self) -> Iterator[SourceImage]:
        with self._open() as container:
            try:
                for frame in container.decode(video=0):
                    yield SourceImage(check_rgb(frame.to_ndarray(format="rgb24")))
            except InputError:
                raise
            except Exception as exc:
                raise InputError(f"{self.path}: cannot decode video ({exc.__class__.__name__}: {exc})") from None


def import_av():
    """The ``av`` module (PyAV); SetupError when it is not installed."""
    try:
        import av
    except ImportError:
        raise SetupError("reading a video needs PyAV, which is not installed: pip install av") from None
    return av


def _last_segment(topic: str) -> str:
    return topic.rstrip("/").rsplit("/", 1)[-1]


def _namespace(topic: str) -> str:
    return topic.rstrip("/").rsplit("/", 1)[0]


def pick_bag_topics(types: dict[str, str], image_topic: str | None, info_topic: str | None,
                    need_info: bool) -> tuple[str, str | None]:
    """(image topic, camera_info topic or None) among a bag's ``{topic: type}``."""
    def check(topic: str, kind: str) -> str:
        name = topic if topic.startswith("/") else f"/{topic}"
        if name not in types:
            raise InputError(f"bag has no topic {name} (topics: {', '.join(sorted(types)) or 'none'})")
        if types[name] != kind:
            raise InputError(f"bag topic {name} is {types[name]}, not {kind}")
        return name

    if image_topic:
        image = check(image_topic, IMAGE_TYPE)
    else:
        images = [t for t, ty in types.items() if ty == IMAGE_TYPE and _last_segment(t) in BAG_IMAGE_NAMES
                  and "depth" not in t.split("/")]
        if not images:
            raise InputError("bag has no sensor_msgs/Image topic named .../image_rect, .../image or .../image_raw "
                             f"(topics: {', '.join(sorted(types)) or 'none'}); name one with --image-topic")
        best = min(BAG_IMAGE_NAMES.index(_last_segment(t)) for t in images)
        images = sorted(t for t in images if BAG_IMAGE_NAMES.index(_last_segment(t)) == best)
        if len(images) > 1:
            raise InputError(f"bag has several image topics ({', '.join(images)}); choose one with --image-topic")
        image = images[0]
    if info_topic:
        return image, check(info_topic, INFO_TYPE)
    infos = [t for t, ty in types.items() if ty == INFO_TYPE]
    beside = f"{_namespace(image)}/camera_info"
    if beside in infos:
        return image, beside
    others = [t for t in infos if "depth" not in t.split("/")]
    if len(others) == 1:
        return image, others[0]
    if need_info:
        found = f" ({', '.join(sorted(infos))})" if infos else ""
        raise InputError(f"bag has no camera_info for {image}{found}: name one with --info-topic, "
                         "or give --camera-info YAML / --fx")
    return image, None


def bag_topics(path: Path) -> tuple[dict[str, str], dict[str, int]]:
    """A rosbag2's ``{topic: type}`` and ``{topic: message count}``; InputError for what rosbags cannot read."""
    from rosbags.rosbag2 import Reader

    try:
        with Reader(path) as reader:
            types = {c.topic: c.msgtype for c in reader.connections}
            counts = {c.topic: 0 for c in reader.connections}
            for c in reader.connections:
                counts[c.topic] += c.msgcount
    except Exception as exc:  # rosbags raises ReaderError, FileNotFoundError, KeyError... on bad bags
        raise InputError(f"{path}: cannot read as rosbag2 ({exc.__class__.__name__}: {exc})") from None
    return types, counts


def bag_messages(path: Path, topics: list[str]) -> Iterator[tuple[str, Any]]:
    """``(topic, message)`` of a rosbag2's ``topics`` (Image or CameraInfo) in recorded order; the CDR bytes are
    deserialized straight into rclpy types. InputError for a message that cannot be read."""
    from rclpy.serialization import deserialize_message
    from rosbags.rosbag2 import Reader
    from sensor_msgs.msg import CameraInfo, Image

    classes = {IMAGE_TYPE: Image, INFO_TYPE: CameraInfo}
    try:
        with Reader(path) as reader:
            conns = [c for c in reader.connections if c.topic in topics]
            for conn, _, raw in reader.messages(connections=conns):
                yield conn.topic, deserialize_message(bytes(raw), classes[conn.msgtype])
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{path}: cannot read message ({exc.__class__.__name__}: {str(exc)[:200]})") from None


def first_message(path: Path, topic: str) -> Any | None:
    """The first message on ``topic`` in a rosbag2, or None. A recorder logs each topic as it receives it, so an
    image can precede the camera_info stamped with it; ``play`` starts with this one (a camera_info that changes
    later takes over from where it was recorded; ``eval --bag`` pairs them by stamp instead, as the node does)."""
    for _, msg in bag_messages(path, [topic]):
        return msg
    return None


class BagFile(Source):
    """A rosbag2 read with rosbags; messages are CDR and deserialized straight into rclpy types."""

    def __init__(self, path: Path, image_topic: str | None, info_topic: str | None, need_info: bool) -> None:
        self.path = path
        types, counts = bag_topics(path)
        self.image_topic, self.info_topic = pick_bag_topics(types, image_topic, info_topic, need_info)
        self.has_camera_info = self.info_topic is not None
        if counts[self.image_topic] == 0:
            raise InputError(f"{path}: no messages on {self.image_topic}")
        self.description = f"bag {path.name} ({self.image_topic}, {counts[self.image_topic]} images)"
        self.first_info = first_message(path, self.info_topic) if self.info_topic is not None else None

    def _messages(self, topics: list[str]) -> Iterator[tuple[str, Any]]:
        return bag_messages(self.path, topics)

    def frames(self) -> Iterator[SourceImage]:
        from depthvlm_ros.ros.messages import image_to_rgb

        info = self.first_info
        topics = [self.image_topic] + ([self.info_topic] if self.info_topic else [])
        for topic, msg in self._messages(topics):
            if topic == self.info_topic:
                info = msg
                continue
            yield SourceImage(image_to_rgb(msg), info=info, stamp=msg.header.stamp, frame_id=msg.header.frame_id)


def open_source(args: argparse.Namespace) -> Source:
    """The source ``args.source`` names (images, a video or a rosbag2); InputError when it is missing or of an
    unknown type, or when bag options are given for another source."""
    path: Path = args.source
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    source = _open_source(args, path)
    if not isinstance(source, BagFile):
        for option in ("image_topic", "info_topic", "bag_stamps"):
            if getattr(args, option):
                raise InputError(f"--{option.replace('_', '-')} applies to rosbag2 sources only")
    return source


def _open_source(args: argparse.Namespace, path: Path) -> Source:
    suffix = path.suffix.lower()
    if path.is_dir() and (path / "metadata.yaml").exists():
        return BagFile(path, args.image_topic, args.info_topic, need_info=not user_intrinsics(args))
    if path.is_dir():
        files = sorted((p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
                       key=lambda p: p.name)
        if not files:
            raise InputError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) and no rosbag2 metadata.yaml")
        return ImageFiles(files, f"{len(files)} images in {path}")
    if suffix in BAG_SUFFIXES:
        return BagFile(path, args.image_topic, args.info_topic, need_info=not user_intrinsics(args))
    if suffix in VIDEO_SUFFIXES:
        return VideoFile(path)
    if suffix in IMAGE_SUFFIXES:
        return ImageFiles([path], f"image {path.name}")
    raise InputError(f"{path}: unknown source type {suffix or '(no suffix)'} (give an image folder, an image "
                     f"{'/'.join(IMAGE_SUFFIXES)}, a video {'/'.join(VIDEO_SUFFIXES)} or a rosbag2)")


def user_intrinsics(args: argparse.Namespace) -> bool:
    """Whether the user gave intrinsics (``--camera-info`` or ``--fx``)."""
    return args.camera_info is not None or args.fx is not None


class IntrinsicsFor:
    """The intrinsics for each image size, from --camera-info (scaled when proportional) or --fx."""

    def __init__(self, args: argparse.Namespace) -> None:
        if args.camera_info is not None and args.fx is not None:
            raise InputError("give either --camera-info or --fx, not both")
        if args.fx is not None and not (math.isfinite(args.fx) and args.fx > 0):
            raise InputError(f"--fx must be a positive number of pixels, got {args.fx}")
        self.base = Intrinsics.from_yaml(args.camera_info) if args.camera_info is not None else None
        self.fx = args.fx
        self.cache: dict[tuple[int, int], Intrinsics] = {}

    def __call__(self, width: int, height: int) -> Intrinsics:
        if (width, height) not in self.cache:
            if self.base is not None:
                self.cache[(width, height)] = intrinsics_for_image(self.base, width, height)
            else:
                self.cache[(width, height)] = Intrinsics.from_fx(width, height, self.fx)
        return self.cache[(width, height)]


def check_args(args: argparse.Namespace) -> None:
    """Check the rate, count, duration, wait and QoS-depth options; InputError (exit code 2) for one out of range."""
    if not (math.isfinite(args.rate) and 0 < args.rate <= 1000):
        raise InputError(f"--rate must be in (0, 1000] frames per second, got {args.rate}")
    if args.count is not None and args.count < 1:
        raise InputError(f"--count must be at least 1, got {args.count}")
    if args.duration is not None and not (math.isfinite(args.duration) and args.duration > 0):
        raise InputError(f"--duration must be a positive number of seconds, got {args.duration}")
    if args.wait_subscribers < 0 or not (math.isfinite(args.wait_timeout) and args.wait_timeout >= 0):
        raise InputError("--wait-subscribers and --wait-timeout must not be negative")
    if not 1 <= args.qos_depth <= 1000:
        raise InputError(f"--qos-depth must be in 1..1000, got {args.qos_depth}")


def frame_stream(source: Source, repeat: bool) -> Iterator[SourceImage]:
    """The source's frames, one pass or (``repeat``) pass after pass; ends after a pass that yields none."""
    while True:
        sent = False
        for frame in source.frames():
            sent = True
            yield frame
        if not repeat or not sent:
            return


# -- the command ---------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    """Run ``depthvlm play``: options, source and intrinsics checked before ROS starts, then the source published as
    a camera (exit code 0, 2 bad input, 3 a video without PyAV)."""
    check_args(args)
    source = open_source(args)
    intrinsics_for: Callable[[int, int], Intrinsics] | None = None
    if user_intrinsics(args):
        intrinsics_for = IntrinsicsFor(args)
        if source.first_size is not None:
            intrinsics_for(*source.first_size)  # a non-proportional calibration fails here, before ROS starts
    elif not source.has_camera_info:
        raise InputError("give the camera's intrinsics: --camera-info YAML or --fx F (pixels)")
    if source.has_camera_info and intrinsics_for is None and getattr(source, "first_info", None) is not None:
        from depthvlm_ros.ros.messages import camera_info_to_intrinsics

        camera_info_to_intrinsics(source.first_info)  # a zero or NaN calibration: fail before starting

    with ros_node("depthvlm_play", getattr(args, "ros_args", None)) as (node, stop):
        return publish(node, stop, args, source, intrinsics_for)


def subscribers(pubs: list[Any]) -> int:
    """Matched subscribers of the camera: the fewest of any topic played."""
    return min(p.get_subscription_count() for p in pubs)


def publish(node, stop: threading.Event, args: argparse.Namespace, source: Source,
            intrinsics_for: Callable[[int, int], Intrinsics] | None) -> int:
    """Publish ``source``'s frames as image (and/or image/compressed) + camera_info at --rate Hz until the source,
    --count or --duration ends or ``stop`` is set; the exit code (0)."""
    from rclpy.duration import Duration
    from rclpy.executors import ExternalShutdownException
    from sensor_msgs.msg import CameraInfo, CompressedImage, Image
    from std_msgs.msg import Header

    from depthvlm_ros.ros.intake import qos as intake_qos
    from depthvlm_ros.ros.intake import topic
    from depthvlm_ros.ros.messages import (
        camera_info_to_intrinsics,
        intrinsics_to_camera_info,
        rgb_to_compressed,
        rgb_to_image,
    )

    prefix = args.topic_prefix.strip().rstrip("/")  # the node's topic names under it (none: the plain names)
    qos = intake_qos("best_effort" if args.best_effort else "reliable", args.qos_depth)
    image_pub = (node.create_publisher(Image, topic(prefix, "image"), qos)
                 if not args.compressed_only else None)
    info_pub = node.create_publisher(CameraInfo, topic(prefix, "camera_info"), qos)
    jpeg_pub = (node.create_publisher(CompressedImage, topic(prefix, "image/compressed"), qos)
                if args.compressed or args.compressed_only else None)
    pubs = [p for p in (image_pub, info_pub, jpeg_pub) if p is not None]
    log = node.get_logger()
    print(f"play: {source.description} -> {(image_pub or jpeg_pub).topic_name} at {args.rate:g} Hz", file=sys.stderr,
          flush=True)

    sent = 0
    started = time.monotonic()
    try:
        if args.wait_subscribers:
            deadline = time.monotonic() + args.wait_timeout
            while subscribers(pubs) < args.wait_subscribers and not stop.is_set():
                if time.monotonic() > deadline:
                    log.warning(f"{subscribers(pubs)} of {args.wait_subscribers} subscribers after "
                                f"{args.wait_timeout:g} s; playing anyway")
                    break
                stop.wait(0.05)
        period = 1.0 / args.rate
        repeat = args.loop or args.count is not None or args.duration is not None
        status = StatusLine()
        started = next_time = time.monotonic()
        window_start, window_sent = started, 0
        for frame in frame_stream(source, repeat):
            if stop.is_set():
                break
            now = time.monotonic()
            if args.duration is not None and now - started >= args.duration:
                break
            if next_time > now and stop.wait(next_time - now):
                break
            header = Header(frame_id=args.frame_id or frame.frame_id or DEFAULT_FRAME_ID)
            header.stamp = frame.stamp if (args.bag_stamps and frame.stamp is not None) else \
                node.get_clock().now().to_msg()
            height, width = frame.rgb.shape[:2]
            if intrinsics_for is not None:
                info = intrinsics_to_camera_info(intrinsics_for(width, height), header)
            elif frame.info is not None:
                camera_info_to_intrinsics(frame.info, width, height)  # checks: proportional, positive focals
                info = frame.info
                info.header = header
            else:
                raise InputError("the bag has no camera_info before its first image; give --camera-info or --fx")
            if image_pub is not None:
                image_pub.publish(rgb_to_image(frame.rgb, header))
            info_pub.publish(info)
            if jpeg_pub is not None:
                jpeg_pub.publish(rgb_to_compressed(frame.rgb, header, "jpeg"))
            sent += 1
            window_sent += 1
            next_time = max(next_time + period, time.monotonic() - period)  # late: no burst to catch up
            if status.due():
                now = time.monotonic()
                print(f"play: {sent} frames sent, {window_sent / (now - window_start):.1f} Hz, "
                      f"{subscribers(pubs)} subscribers", file=sys.stderr, flush=True)
                window_start, window_sent = now, 0
            if args.count is not None and sent >= args.count:
                break
        if not args.best_effort and not stop.is_set():
            for pub in pubs:  # let reliable subscribers get the last frames before the writers go away
                pub.wait_for_all_acked(Duration(seconds=2))
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    elapsed = time.monotonic() - started
    print(f"play: sent {sent} frames in {elapsed:.1f} s", file=sys.stderr, flush=True)
    return 0
