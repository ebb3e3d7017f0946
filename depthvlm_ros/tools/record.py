"""``depthvlm record``: write the node's topics to an MCAP rosbag2, the way ``ros2 bag record`` would.

Messages arrive serialized (``raw=True`` subscriptions: no deserialization) and are written at once
with ``rosbags.rosbag2.Writer`` (MCAP storage; the writer buffers at most one ~1 MiB chunk), stamped
with their receive time. Message definitions and type hashes come from rosbags' ROS 2 Kilted
typestore, which matches the hashes rclpy Kilted announces, so ``ros2 bag`` / Foxglove / rosbags
read the bag without extra type information.

``OUT.mcap`` gives one self-contained MCAP file (``ros2 bag play OUT.mcap``, ``depthvlm play
OUT.mcap``); it is written in a hidden folder beside it and moved into place at the end. Any other
name gives a rosbag2 folder (``metadata.yaml`` + one ``.mcap``).

QoS: reliable, keep-last 10, volatile (a reliable subscriber gets every message a reliable
publisher sends, including 5 MB clouds, when the Fast DDS large-data profile is in use). A
best-effort publisher cannot serve a reliable subscriber; when ROS reports that incompatibility the
topic is subscribed again best-effort (or use ``--best-effort`` from the start). Transient-local
publishers are recorded from the moment of subscription (no history).

Types: NAME:pkg/msg/Type if given, else the tables below (the node's topics; then by the name's last
segment), else the ROS graph. A publisher of another type than the one chosen is silently not
matched by ROS, so give the type explicitly for unusual topics.
"""

from __future__ import annotations

import argparse
import importlib
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from depthvlm_ros.errors import InputError
from depthvlm_ros.ros.runtime import StatusLine, ros_node

#: Types of the node's topics (names as the node uses them, relative to the namespace).
TOPIC_TYPES: dict[str, str] = {
    "image": "sensor_msgs/msg/Image",
    "image/compressed": "sensor_msgs/msg/CompressedImage",
    "camera_info": "sensor_msgs/msg/CameraInfo",
    "depth/image": "sensor_msgs/msg/Image",
    "depth/camera_info": "sensor_msgs/msg/CameraInfo",
    "depth/colored": "sensor_msgs/msg/Image",
    "points": "sensor_msgs/msg/PointCloud2",
    "/diagnostics": "diagnostic_msgs/msg/DiagnosticArray",
    "ground_truth/depth": "sensor_msgs/msg/Image",  # the demo camera's exact depth
}
#: Types guessed from a topic's last name segment when it is not in TOPIC_TYPES.
SUFFIX_TYPES: dict[str, str] = {
    "image": "sensor_msgs/msg/Image",
    "image_raw": "sensor_msgs/msg/Image",
    "image_rect": "sensor_msgs/msg/Image",
    "image_rect_color": "sensor_msgs/msg/Image",
    "colored": "sensor_msgs/msg/Image",
    "compressed": "sensor_msgs/msg/CompressedImage",
    "camera_info": "sensor_msgs/msg/CameraInfo",
    "points": "sensor_msgs/msg/PointCloud2",
    "diagnostics": "diagnostic_msgs/msg/DiagnosticArray",
}
DEFAULT_TOPICS = ("image", "camera_info", "depth/image", "depth/camera_info", "depth/colored", "points",
                  "/diagnostics")
#: How long to look in the ROS graph for the type of a topic no table names.
DISCOVERY_TIMEOUT_S = 5.0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``depthvlm record`` subcommand's options."""
    p = sub.add_parser(
        "record", help="record the node's topics to an MCAP rosbag2",
        description="Record topics (serialized, as they arrive) to OUT.mcap (one MCAP file) or to a rosbag2 "
                    "folder. Stops after --duration / --count or on Ctrl-C.",
    )
    p.add_argument("out", type=Path, help="output: OUT.mcap (one file) or a new rosbag2 folder name")
    p.add_argument("--topics", nargs="+", default=list(DEFAULT_TOPICS), metavar="T",
                   help="topics to record; NAME or NAME:pkg/msg/Type (default: "
                        f"{' '.join(DEFAULT_TOPICS)})")
    p.add_argument("--duration", type=float, help="stop after S seconds")
    p.add_argument("--count", type=int, help="stop after N messages (all topics together)")
    p.add_argument("--best-effort", action="store_true", help="best-effort subscriptions (default reliable)")
    p.add_argument("--qos-depth", type=int, default=10, help="subscription history depth (default 10)")
    p.set_defaults(func=run)


def kilted_typestore():
    """rosbags' ROS 2 Kilted typestore: the message definitions and type hashes the bag is written with."""
    from rosbags.typesys import Stores, get_typestore

    return get_typestore(Stores.ROS2_KILTED)


def message_class(type_name: str):
    """The rclpy message class of 'pkg/msg/Type'."""
    parts = type_name.split("/")
    if len(parts) != 3 or parts[1] != "msg":
        raise InputError(f"message type {type_name!r}: expected pkg/msg/Type")
    try:
        return getattr(importlib.import_module(f"{parts[0]}.msg"), parts[2])
    except (ImportError, AttributeError):
        raise InputError(f"message type {type_name}: not importable in this Python (install its package)") from None


def parse_topics(topics: list[str]) -> list[tuple[str, str | None]]:
    """[(topic, type or None)] from NAME or NAME:pkg/msg/Type arguments, without duplicates."""
    out: dict[str, str | None] = {}
    for item in topics:
        name, _, type_name = item.partition(":")
        name = name.strip()
        if not name:
            raise InputError(f"topic {item!r}: empty name")
        out[name] = type_name.strip() or TOPIC_TYPES.get(name) or TOPIC_TYPES.get(name.lstrip("/")) \
            or SUFFIX_TYPES.get(name.rstrip("/").rsplit("/", 1)[-1])
    return list(out.items())


def final_path(out: Path) -> tuple[Path, Path | None]:
    """(the rosbag2 folder rosbags writes, the temporary folder to remove afterwards or None)."""
    if out.exists() or out.is_symlink():
        raise InputError(f"{out} exists already; not overwriting (choose a new name)")
    if not out.parent.is_dir():
        raise InputError(f"{out.parent}: no such folder")
    if out.suffix.lower() != ".mcap":
        return out, None
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".recording", dir=out.parent))
    return tmp / "bag", tmp


def unfinished_recordings(out: Path) -> list[Path]:
    """Temporary folders of earlier recordings to ``out`` that never finished (a kill, a power cut)."""
    if out.suffix.lower() != ".mcap" or not out.parent.is_dir():
        return []
    return sorted(p for p in out.parent.glob(f".{out.name}.*.recording") if p.is_dir())


def _why(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return f"{exc.__class__.__name__}: {str(exc)[:200]}"


def move_into_place(bag_dir: Path, tmp: Path, out: Path) -> None:
    """Move the single MCAP file of ``bag_dir`` to ``out`` (never over an existing file)."""
    files = list(bag_dir.glob("*.mcap"))
    if len(files) != 1:
        raise InputError(f"expected one .mcap in {bag_dir}, found {len(files)}")
    try:
        out.hardlink_to(files[0])
    except FileExistsError:
        raise InputError(f"{out} appeared while recording; the recording is kept in {bag_dir}") from None
    except OSError:
        if out.exists():
            raise InputError(f"{out} appeared while recording; the recording is kept in {bag_dir}") from None
        shutil.move(str(files[0]), str(out))
    shutil.rmtree(tmp, ignore_errors=True)


class Recorder:
    """Subscriptions that write each message to the bag as it arrives."""

    def __init__(self, node, writer, topics: list[tuple[str, str]], args: argparse.Namespace) -> None:
        self.node = node
        self.writer = writer
        self.typestore = kilted_typestore()
        self.args = args
        self.count_limit = args.count
        self.total = 0
        self.counts: dict[str, int] = {}
        self.connections: dict[str, Any] = {}
        self.types: dict[str, str] = {}
        self.subs: dict[str, Any] = {}
        self.downgrade: set[str] = set()
        self.done = False
        for name, type_name in topics:
            resolved = node.resolve_topic_name(name)
            self.types[resolved] = type_name
            self.counts[resolved] = 0
            self.subscribe(resolved, best_effort=args.best_effort)

    def subscribe(self, topic: str, best_effort: bool) -> None:
        from rclpy.event_handler import SubscriptionEventCallbacks

        def on_incompatible(info, topic=topic) -> None:
            if not best_effort:
                self.downgrade.add(topic)

        from depthvlm_ros.ros.intake import qos  # rclpy: only when recording (the CLI runs without ROS)

        self.subs[topic] = self.node.create_subscription(
            message_class(self.types[topic]), topic, lambda data, topic=topic: self.on_message(topic, data),
            qos("best_effort" if best_effort else "reliable", self.args.qos_depth), raw=True,
            event_callbacks=SubscriptionEventCallbacks(incompatible_qos=on_incompatible),
        )

    def apply_downgrades(self) -> None:
        """Subscribe again best-effort where a best-effort publisher refused our reliable subscription."""
        for topic in sorted(self.downgrade):
            self.node.destroy_subscription(self.subs.pop(topic))
            self.subscribe(topic, best_effort=True)
            print(f"record: {topic}: best-effort publisher, subscribed again best-effort", file=sys.stderr,
                  flush=True)
        self.downgrade.clear()

    def on_message(self, topic: str, data: bytes) -> None:
        if self.done:
            return
        conn = self.connections.get(topic)
        if conn is None:  # only topics that carried messages appear in the bag, as with ros2 bag record
            conn = self.writer.add_connection(topic, self.types[topic], typestore=self.typestore)
            self.connections[topic] = conn
        self.writer.write(conn, self.node.get_clock().now().nanoseconds, data)
        self.counts[topic] += 1
        self.total += 1
        if self.count_limit is not None and self.total >= self.count_limit:
            self.done = True


def resolve_types(node, stop, topics: list[tuple[str, str | None]]) -> list[tuple[str, str]]:
    """Fill in types no table knows from the ROS graph (waiting up to DISCOVERY_TIMEOUT_S)."""
    missing = [name for name, type_name in topics if type_name is None]
    found: dict[str, str] = {}
    deadline = time.monotonic() + DISCOVERY_TIMEOUT_S
    while missing and time.monotonic() < deadline and not stop.is_set():
        graph = dict(node.get_topic_names_and_types())
        for name in list(missing):
            types = graph.get(node.resolve_topic_name(name), [])
            if len(types) == 1:
                found[name] = types[0]
                missing.remove(name)
        if missing:
            stop.wait(0.1)
    if missing:
        raise InputError(f"no type known for {', '.join(missing)}: give it as NAME:pkg/msg/Type "
                         f"(none is being published, or with several types)")
    out = [(name, type_name or found[name]) for name, type_name in topics]
    store = kilted_typestore()
    for name, type_name in out:
        if type_name not in store.fielddefs:
            raise InputError(f"{name}: type {type_name} is not in rosbags' ROS 2 Kilted typestore")
        message_class(type_name)
    return out


def check_args(args: argparse.Namespace) -> None:
    """Check ``--duration``, ``--count`` and ``--qos-depth``; InputError (exit code 2) for one out of range."""
    if args.duration is not None and not (math.isfinite(args.duration) and args.duration > 0):
        raise InputError(f"--duration must be a positive number of seconds, got {args.duration}")
    if args.count is not None and args.count < 1:
        raise InputError(f"--count must be at least 1, got {args.count}")
    if not 1 <= args.qos_depth <= 1000:
        raise InputError(f"--qos-depth must be in 1..1000, got {args.qos_depth}")


def run(args: argparse.Namespace) -> int:
    """Run ``depthvlm record``: options and topic types checked, then the topics recorded until --duration, --count
    or SIGINT/SIGTERM (exit code 0, 2 bad input or a recording that failed)."""
    check_args(args)
    topics = parse_topics(args.topics)
    for _, type_name in topics:
        if type_name is not None:
            message_class(type_name)
    if args.out.exists() or args.out.is_symlink():
        raise InputError(f"{args.out} exists already; not overwriting (choose a new name)")
    with ros_node("depthvlm_record", getattr(args, "ros_args", None)) as (node, stop):
        typed = resolve_types(node, stop, topics)
        return record(node, stop, args, typed)


def record(node, stop, args: argparse.Namespace, topics: list[tuple[str, str]]) -> int:
    """Record ``topics`` ([(name, type)]) to ``args.out`` until ``stop``, --duration or --count, then print the
    count per topic; the exit code (0). After an error what was written is kept, and InputError says where."""
    from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
    from rosbags.rosbag2 import StoragePlugin, Writer

    for earlier in unfinished_recordings(args.out):
        print(f"record: an unfinished recording of an earlier run is in {earlier} (kept: remove it, or read it "
              "with rosbags)", file=sys.stderr, flush=True)
    bag_dir, tmp = final_path(args.out)
    writer = Writer(bag_dir, version=9, storage_plugin=StoragePlugin.MCAP)
    writer.open()
    failure: Exception | None = None
    recorder = None
    executor = SingleThreadedExecutor(context=node.context)
    try:
        recorder = Recorder(node, writer, topics, args)
        executor.add_node(node)
        print(f"record: {', '.join(recorder.counts)} -> {args.out}", file=sys.stderr, flush=True)
        status = StatusLine()
        started = time.monotonic()
        try:
            while not stop.is_set() and not recorder.done:
                left = None if args.duration is None else args.duration - (time.monotonic() - started)
                if left is not None and left <= 0:
                    break
                executor.spin_once(timeout_sec=0.1 if left is None else min(0.1, left))
                if recorder.downgrade:
                    recorder.apply_downgrades()
                if status.due():
                    print(f"record: {recorder.total} messages, {time.monotonic() - started:.0f} s",
                          file=sys.stderr, flush=True)
        except (KeyboardInterrupt, ExternalShutdownException):
            pass
    except Exception as exc:  # a full disk, an unwritable folder: what was recorded is kept, never removed
        failure = exc
    finally:
        executor.shutdown(timeout_sec=1.0)
    where = args.out if tmp is not None else bag_dir
    try:
        writer.close()  # finalises the MCAP file with every message written so far
        if tmp is not None:
            move_into_place(bag_dir, tmp, args.out)
    except Exception as exc:
        kept = tmp if tmp is not None else bag_dir
        first = f"{_why(failure)}; " if failure is not None and _why(failure) != _why(exc) else ""
        raise InputError(f"record: {first}could not finish the recording ({_why(exc)}): what was written is kept "
                         f"in {kept}") from None
    if failure is not None or recorder is None:
        total = recorder.total if recorder is not None else 0
        raise InputError(f"record: stopped by an error ({_why(failure)}); the {total} messages recorded before it "
                         f"are kept in {where}")
    width = max(len(t) for t in recorder.counts)
    print(f"recorded {recorder.total} messages to {args.out}")
    for topic, count in recorder.counts.items():
        print(f"  {topic:<{width}}  {count:>7}  {recorder.types[topic]}")
    return 0
