"""Frame intake: one camera's subscriptions, stamp pairing and hand-over to the worker.

Each camera (a name of the ``cameras`` parameter, or ``""`` for the plain topic names) subscribes to
``<name>/image`` (or ``<name>/image/compressed``) and ``<name>/camera_info``. Callbacks never block and
never decode: they pair image and camera_info by stamp and put the frame in the camera's slot of
:class:`~depthvlm_ros.ros.flow.LatestSlots` (latest wins). While the node is not active a frame is
counted and dropped at once. Everything a camera counts lives in its :class:`CameraCounters`.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field

import numpy as np
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, CompressedImage, Image
from std_msgs.msg import Header

from depthvlm_ros.errors import InputError
from depthvlm_ros.geometry import Intrinsics
from depthvlm_ros.ros import messages
from depthvlm_ros.ros.context import NodeContext
from depthvlm_ros.ros.flow import (
    MAX_ERROR_CHARS,
    LatencyWindow,
    LatestSlots,
    LogBudget,
    RateMeter,
    SequenceGaps,
    StampSync,
    error_kind,
)

#: Without any camera_info for this long, ``fallback_fx`` frames go straight through (no pairing wait),
#: and (without ``fallback_fx``) diagnostics say that camera_info stopped.
NO_INFO_AFTER_S = 2.0


def qos(reliability: str, depth: int) -> QoSProfile:
    """KEEP_LAST ``depth`` with ``reliability`` ("best_effort" or "reliable")."""
    return QoSProfile(
        history=HistoryPolicy.KEEP_LAST, depth=int(depth),
        reliability=ReliabilityPolicy.BEST_EFFORT if reliability == "best_effort" else ReliabilityPolicy.RELIABLE,
    )


def stamp_ns(header: Header) -> int:
    """A header's stamp in nanoseconds."""
    return int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)


def topic(camera: str, relative: str) -> str:
    """A camera's topic name, relative to the node's namespace (``front/depth/image``; ``depth/image``)."""
    return f"{camera}/{relative}" if camera else relative


@dataclass
class Frame:
    """An input frame as received: messages are decoded on the worker, not in the callback."""

    image: Image | CompressedImage
    info: CameraInfo | None
    received: float  # time.monotonic() at arrival


@dataclass
class Decoded:
    """A decoded frame (what questions ask about): RGB uint8 (H, W, 3) and the K that describes it."""

    header: Header
    rgb: np.ndarray
    intrinsics: Intrinsics


def decode(frame: Frame, fallback_fx: float) -> Decoded:
    """RGB pixels and the intrinsics that describe them (InputError for anything malformed)."""
    msg = frame.image
    rgb = messages.compressed_to_rgb(msg) if isinstance(msg, CompressedImage) else messages.image_to_rgb(msg)
    height, width = rgb.shape[:2]
    if frame.info is not None:
        k = messages.camera_info_to_intrinsics(frame.info, width, height)
    else:
        k = Intrinsics.from_fx(width, height, fallback_fx)
    return Decoded(msg.header, rgb, k)


@dataclass
class CameraCounters:
    """What became of one camera's frames (counts since the start) and its latest error (text, and its
    time.monotonic() time); diagnostics report a snapshot."""

    frames_in: int = 0
    processed: int = 0
    dropped: int = 0  # replaced in the slot before the worker took them
    skipped_rate: int = 0  # over max_rate_hz
    unmatched: int = 0  # no camera_info pairs with them
    lost: int = 0  # sent by the camera but never taken here (transport, or replaced in the QoS history)
    ignored_inactive: int = 0  # arrived while the node was not active
    errors: int = 0
    reference_frames: int = 0  # run on PyTorch while the compiled backend had no size ready
    batched: int = 0  # went through the model in one forward with another camera's frame (batch_cameras)
    backend_failed: int = 0  # not served: the backend could not (a Triton server unreachable or refusing)
    last_error: str = ""
    last_error_time: float = field(default=-math.inf)


class CameraIntake:
    """One camera's inputs: subscriptions, pairing, counters and meters (see the module docstring)."""

    def __init__(self, ctx: NodeContext, index: int, name: str, slots: LatestSlots[Frame]) -> None:
        """Camera ``index`` of the node (``name``: its namespace, "" for the plain names); its frames go to
        ``slots``. Settings that change at run time (``fallback_fx``) are read per frame."""
        s = ctx.settings().intake
        node = ctx.node
        self.index, self.name = index, name
        self._ctx, self._slots, self._is_active, self._log = ctx, slots, ctx.is_active, ctx.log
        self.counters = CameraCounters()
        self.lock = threading.Lock()
        self._sync: StampSync[Image | CompressedImage, CameraInfo] = StampSync(int(s.sync_tolerance_s * 1e9))
        self._sync_lock = threading.Lock()
        self._gaps = SequenceGaps()
        self.last_info_time = -math.inf
        self.last_image_time = self.first_image_time = -math.inf
        self.input_rate = RateMeter()
        self.inference_rate = RateMeter()
        self.latency = LatencyWindow()  # receive -> depth published, ms
        self.overhead = LatencyWindow()  # everything but the model forward, ms
        self.ros_overhead = LatencyWindow()  # everything but the model's infer (decode, outputs, publish), ms
        self.forward = LatencyWindow()  # the model forward (vision + LLM + head, or a compiled graph), ms
        self.last_inference = -math.inf
        self.log_budget = LogBudget()  # this camera's share of the log, whatever its inputs
        qos_in = qos(s.input_reliability, s.input_depth)
        # Images and camera_infos in groups of their own: a camera_info that arrives while an image's
        # callback runs is taken at once, instead of leaving the executor looping over a ready entity
        # it may not run (the pairing state is under _sync_lock).
        images, infos = MutuallyExclusiveCallbackGroup(), MutuallyExclusiveCallbackGroup()
        if s.use_compressed:
            self.image_topic = topic(name, "image/compressed")
            image_sub = node.create_subscription(CompressedImage, self.image_topic, self._on_image, qos_in,
                                                 callback_group=images)
        else:
            self.image_topic = topic(name, "image")
            image_sub = node.create_subscription(Image, self.image_topic, self._on_image, qos_in,
                                                 callback_group=images)
        info_sub = node.create_subscription(CameraInfo, topic(name, "camera_info"), self._on_info, qos_in,
                                            callback_group=infos)
        self.subscriptions = [image_sub, info_sub]

    def set_tolerance(self, seconds: float) -> None:
        with self._sync_lock:
            self._sync.tolerance_ns = int(seconds * 1e9)

    @property
    def waiting_for_info(self) -> int:
        """Images waiting for their camera_info."""
        with self._sync_lock:
            return self._sync.pending

    def record_error(self, message: str, kind: str = "") -> None:
        """A frame refused: counted, shown in diagnostics and logged (throttled by ``kind``, a fixed code, and
        within this camera's log budget)."""
        message = message[:MAX_ERROR_CHARS]
        with self.lock:
            self.counters.errors += 1
            self.counters.last_error = message
            self.counters.last_error_time = time.monotonic()
        where = f" ({self.name})" if self.name else ""
        self._log("error", f"frame skipped{where}: {message}", f"{self.name}:{kind or error_kind(message)}",
                  self.log_budget)

    def count(self, name: str, n: int = 1) -> None:
        with self.lock:
            setattr(self.counters, name, getattr(self.counters, name) + n)

    def snapshot(self) -> CameraCounters:
        with self.lock:
            return CameraCounters(**vars(self.counters))

    # -- callbacks (never block) ----------------------------------------------------------------

    def _on_info(self, msg: CameraInfo) -> None:
        if not self._is_active():
            return
        try:
            self.last_info_time = time.monotonic()
            with self._sync_lock:
                decided = self._sync.push_info(stamp_ns(msg.header), msg)
            self._hand_over(decided)
        except Exception as exc:  # an exception here would end the executor's spin: never let it out
            self.record_error(f"camera_info callback: {exc.__class__.__name__}: {exc}", "camera_info.callback")

    def _on_image(self, msg: Image | CompressedImage, info: dict) -> None:
        """An image and its MessageInfo (rclpy passes it to a two-argument callback)."""
        try:
            gid = info.get("publisher_gid")  # (followed while inactive too: those frames are not lost)
            lost = self._gaps.seen(bytes(gid["data"]) if gid else None, info.get("publication_sequence_number"))
            if not self._is_active():
                self.count("ignored_inactive")
                return
            if lost:
                self.count("lost", lost)
            self.input_rate.tick()
            now = time.monotonic()
            self.last_image_time = now
            if self.first_image_time == -math.inf:
                self.first_image_time = now
            self.count("frames_in")
            messages.check_image(msg)  # what it declares, before it is kept anywhere (an image may be huge)
            if self._ctx.settings().intake.fallback_fx > 0 and now - self.last_info_time > NO_INFO_AFTER_S:
                self._hand_over([(msg, None)])
                return
            with self._sync_lock:
                decided = self._sync.push_image(stamp_ns(msg.header), msg)
            self._hand_over(decided)
        except InputError as exc:
            self.record_error(str(exc), exc.kind)
        except Exception as exc:
            self.record_error(f"image callback: {exc.__class__.__name__}: {exc}", "image.callback")

    def _hand_over(self, decided: list[tuple[Image | CompressedImage, CameraInfo | None]]) -> None:
        now = time.monotonic()
        for image, info in decided:
            if info is None and not self._ctx.settings().intake.fallback_fx > 0:
                self.count("unmatched")
                self._log("warning", "frames without matching camera_info are skipped (same stamp expected, or "
                          "within sync_tolerance_s; set fallback_fx to process them anyway)",
                          f"{self.name}:unmatched", self.log_budget)
                continue
            if self._slots.put(self.index, Frame(image, info, now)):
                self.count("dropped")

    def forget_pending(self) -> None:
        """Drop images waiting for their camera_info (the node was deactivated)."""
        with self._sync_lock:
            self._sync.clear()
