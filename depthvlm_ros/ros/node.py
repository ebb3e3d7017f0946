"""The ``depthvlm`` node: a camera in, metric depth, an organized cloud and spatial answers out.

Topics (relative, so namespaces and remaps work as for any camera driver):

- subscribes ``image`` (rgb8, bgr8, rgba8, bgra8, mono8) or ``image/compressed`` (``use_compressed``),
  and ``camera_info``; they pair by stamp (exact, or within ``sync_tolerance_s``);
- publishes ``depth/image`` (REP 118), ``depth/camera_info`` (describes the depth grid exactly),
  ``depth/colored`` (rgb8), ``points`` (organized PointCloud2) with the input's frame_id and stamp,
  and ``/diagnostics``;
- services ``~/spatial_query`` and ``~/depth_at`` (``depthvlm_msgs``).

Threading: subscription callbacks only pair stamps and drop the frame into a one-frame slot (latest
wins, the replaced frame is counted as dropped); one worker thread decodes, runs the model and
publishes. Services run in their own callback groups on the executor's threads. Frames and
questions share the model through its lock; a gate admits one question at a time (at most
``max_pending_queries`` wait, more are answered "busy" at once) and gives the depth stream a frame
between two questions, so questions delay the stream by at most one answer and cannot starve it.
Bad input never stops the node: it is counted, logged (at most once per ``LOG_PERIOD_S`` per kind)
and shown in diagnostics.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import rclpy
from depthvlm_msgs.srv import DepthAt, SpatialQuery
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import (
    FloatingPointRange,
    IntegerRange,
    ParameterDescriptor,
    ParameterType,
    SetParametersResult,
)
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.exceptions import ParameterUninitializedException
from rclpy.impl.implementation_singleton import rclpy_implementation
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2
from std_msgs.msg import Header

from depthvlm_ros import spatial
from depthvlm_ros.errors import InputError
from depthvlm_ros.geometry import Intrinsics, depth_from_16uc1, depth_to_16uc1, resize_rgb
from depthvlm_ros.model.processing import check_question
from depthvlm_ros.pipeline.plan import RouteSettings
from depthvlm_ros.pointcloud import organized_cloud
from depthvlm_ros.ros import messages
from depthvlm_ros.ros.flow import (
    KindThrottle,
    LatencyWindow,
    LatestSlot,
    QuestionGate,
    RateMeter,
    SequenceGaps,
    StampSync,
    error_kind,
)
from depthvlm_ros.ros.params import BY_NAME, PARAMS, Param, check_settings, check_value
from depthvlm_ros.visualize import colorize_depth

NODE_NAME = "depthvlm"
#: rclpy's error for a failed rcl call (also what an executor raises when shutdown races its wait set).
RCLError = rclpy_implementation.RCLError
#: Model stages that are the model's forward (the rest of a frame's time is the node's overhead).
FORWARD_STAGES = ("vision", "llm", "head", "model")
#: Without any camera_info for this long, ``fallback_fx`` frames go straight through (no pairing wait),
#: and (without ``fallback_fx``) diagnostics say that camera_info stopped.
NO_INFO_AFTER_S = 2.0
#: Each kind of bad input is logged at most once per this many seconds (kinds are independent).
LOG_PERIOD_S = 5.0
#: An error this recent makes diagnostics WARN.
RECENT_ERROR_S = 10.0
#: Executor threads besides the questions': images, camera_infos, depth_at, diagnostics, parameter
#: services, a refusal.
BASE_THREADS = 5


def executor_threads() -> int:
    """Threads the node's executor needs: a question waiting for its turn holds one (reentrant service), so
    the most that may wait, plus the one answered, plus BASE_THREADS for everything else."""
    return BASE_THREADS + 1 + int(BY_NAME["max_pending_queries"].range[1])


@dataclass
class Frame:
    """An input frame as received: messages are decoded on the worker, not in the callback."""

    image: Image | CompressedImage
    info: CameraInfo | None
    received: float  # time.monotonic() at arrival


@dataclass
class Decoded:
    """The latest decoded frame (what ``~/spatial_query`` asks about)."""

    header: Header
    rgb: np.ndarray
    intrinsics: Intrinsics


@dataclass
class LatestDepth:
    """The latest published depth (what ``~/depth_at`` reads)."""

    header: Header
    depth: np.ndarray
    intrinsics: Intrinsics
    image_size: tuple[int, int]


@dataclass
class Counters:
    frames_in: int = 0
    processed: int = 0
    dropped: int = 0  # replaced in the slot before the worker took them
    skipped_rate: int = 0  # over max_rate_hz
    unmatched: int = 0  # no camera_info pairs with them
    lost: int = 0  # sent by the camera but never taken here (transport, or replaced in the QoS history)
    errors: int = 0
    reference_frames: int = 0  # run on PyTorch while the compiled backend had no size ready
    queries: int = 0
    query_errors: int = 0
    queries_busy: int = 0  # refused at once: too many questions waiting
    last_error: str = ""
    last_error_time: float = field(default=-math.inf)


def _descriptor(param: Param) -> ParameterDescriptor:
    desc = ParameterDescriptor(description=param.description, read_only=param.read_only)
    if param.choices:
        desc.additional_constraints = "one of: " + ", ".join(param.choices)
    if param.range is not None and not isinstance(param.default, bool):
        if isinstance(param.default, int):
            desc.integer_range = [IntegerRange(from_value=int(param.range[0]), to_value=int(param.range[1]), step=0)]
        elif isinstance(param.default, float):
            desc.floating_point_range = [
                FloatingPointRange(from_value=float(param.range[0]), to_value=float(param.range[1]), step=0.0)
            ]
    if param.default == []:
        desc.type = ParameterType.PARAMETER_STRING_ARRAY
    return desc


def _qos(reliability: str, depth: int) -> QoSProfile:
    return QoSProfile(
        history=HistoryPolicy.KEEP_LAST, depth=int(depth),
        reliability=ReliabilityPolicy.BEST_EFFORT if reliability == "best_effort" else ReliabilityPolicy.RELIABLE,
    )


def _stamp_ns(header: Header) -> int:
    return int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)


class DepthVLMNode(Node):
    """See the module docstring. ``model`` may be given (tests, tools); otherwise it is loaded."""

    def __init__(self, model: Any | None = None, **kwargs: Any) -> None:
        super().__init__(NODE_NAME, **kwargs)
        for param in PARAMS:
            default = Parameter.Type.STRING_ARRAY if param.default == [] else param.default
            self.declare_parameter(param.name, default, _descriptor(param))
        self._settings_lock = threading.Lock()
        self._settings = {p.name: self._param_value(p.name) for p in PARAMS}
        self.add_on_set_parameters_callback(self._validate_parameters)
        self.add_post_set_parameters_callback(self._apply_parameters)
        s = self._settings

        self._owns_model = model is None  # a model given by the caller (tests, the demo) is the caller's to close
        self.model = model if model is not None else self._load_model()
        self.model_name = self.model.name

        self.counters = Counters()
        self._counter_lock = threading.Lock()
        self._sync: StampSync[Image | CompressedImage, CameraInfo] = StampSync(
            int(s["sync_tolerance_s"] * 1e9)
        )
        self._sync_lock = threading.Lock()
        self._last_info_time = -math.inf
        self._slot: LatestSlot[Frame] = LatestSlot()
        self.input_rate = RateMeter()
        self.inference_rate = RateMeter()
        self.latency = LatencyWindow()  # receive -> depth published, ms
        self.overhead = LatencyWindow()  # everything but the model forward, ms
        self.ros_overhead = LatencyWindow()  # everything but predict_depth (decode, outputs, cloud, publish), ms
        self.forward = LatencyWindow()  # the model forward (vision + LLM + head, or a compiled graph), ms
        self._decoded: Decoded | None = None
        self._depth: LatestDepth | None = None
        self._latest_cond = threading.Condition()
        self._last_inference = -math.inf
        self._last_image_time = self._first_image_time = -math.inf
        self._log_throttle = KindThrottle(LOG_PERIOD_S)
        self._gaps = SequenceGaps()
        self._gate = QuestionGate(s["max_pending_queries"], self._slot.pending)

        qos_in = _qos(s["input_reliability"], s["input_depth"])
        qos_out = _qos(s["output_reliability"], s["output_depth"])
        # Images and camera_infos in groups of their own: a camera_info that arrives while an image's
        # callback runs is taken at once, instead of leaving the executor looping over a ready entity
        # it may not run (the pairing state is under _sync_lock).
        images, infos = MutuallyExclusiveCallbackGroup(), MutuallyExclusiveCallbackGroup()
        if s["use_compressed"]:
            self.create_subscription(CompressedImage, "image/compressed", self._on_image, qos_in,
                                     callback_group=images)
        else:
            self.create_subscription(Image, "image", self._on_image, qos_in, callback_group=images)
        self.create_subscription(CameraInfo, "camera_info", self._on_info, qos_in, callback_group=infos)
        self.pub_depth = self.create_publisher(Image, "depth/image", qos_out)
        self.pub_depth_info = self.create_publisher(CameraInfo, "depth/camera_info", qos_out)
        self.pub_colored = self.create_publisher(Image, "depth/colored", qos_out)
        self.pub_points = self.create_publisher(PointCloud2, "points", qos_out)
        self.pub_diagnostics = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        # Reentrant: while one question is answered, others reach the gate and get "busy" at once.
        self.create_service(SpatialQuery, "~/spatial_query", self._on_spatial_query,
                            callback_group=ReentrantCallbackGroup())
        self.create_service(DepthAt, "~/depth_at", self._on_depth_at, callback_group=MutuallyExclusiveCallbackGroup())
        self.create_timer(s["diagnostics_period_s"], self.publish_diagnostics,
                          callback_group=MutuallyExclusiveCallbackGroup())

        # The worker's reusable message payloads (rclpy copies them when publishing).
        self._depth_buffer = messages.MessageBuffer()
        self._colored_buffer = messages.MessageBuffer()
        self._cloud_buffer = messages.MessageBuffer()
        self._running = True
        self._worker = threading.Thread(target=self._inference_loop, name="depthvlm-inference", daemon=True)
        self._worker.start()
        self.get_logger().info(
            f"ready: model {self.model_name}, backend {self.model.backend.describe()}, "
            f"input {'image/compressed' if s['use_compressed'] else 'image'} + camera_info"
        )

    # -- parameters ---------------------------------------------------------------------------

    def _param_value(self, name: str) -> Any:
        try:
            value = self.get_parameter(name).value
        except ParameterUninitializedException:  # a string array declared without a value
            value = None
        return [] if value is None and BY_NAME[name].default == [] else value

    def _validate_parameters(self, params: list[Parameter]) -> SetParametersResult:
        with self._settings_lock:
            values = dict(self._settings)
        for p in params:
            spec = BY_NAME.get(p.name)
            if spec is None:
                continue
            value = float(p.value) if isinstance(spec.default, float) and isinstance(p.value, int) else p.value
            problem = check_value(spec, value)
            if problem:
                return SetParametersResult(successful=False, reason=problem)
            values[p.name] = value
        problem = check_settings(values)
        return SetParametersResult(successful=problem is None, reason=problem or "")

    def _apply_parameters(self, params: list[Parameter]) -> None:
        with self._settings_lock:
            for p in params:
                if p.name in BY_NAME:
                    self._settings[p.name] = self._param_value(p.name)
            tolerance = self._settings["sync_tolerance_s"]
            self._gate.max_waiting = self._settings["max_pending_queries"]
        with self._sync_lock:
            self._sync.tolerance_ns = int(tolerance * 1e9)

    def settings(self) -> dict[str, Any]:
        """A consistent snapshot of the parameters (read once per frame or request)."""
        with self._settings_lock:
            return dict(self._settings)

    def _load_model(self) -> Any:
        from depthvlm_ros.backends import create_backend
        from depthvlm_ros.model.default import resolve_model
        from depthvlm_ros.pipeline import DepthVLM

        s = self._settings
        folder, note = resolve_model(s["model_path"])
        if note:
            self.get_logger().warning(note)
        model = DepthVLM.from_pretrained(folder, device=s["answer_device"] or s["device"], dtype=s["precision"])
        if s["backend"] != "torch":  # auto: TensorRT with an engine and CUDA, else ONNX Runtime, else PyTorch
            paths = [p for p in s["engine_paths"] if p]
            # Missing ONNX sizes are exported by a separate process while the nearest held size (or
            # PyTorch, before the first) serves: an export never runs on the frame path.
            model.backend = create_backend(
                model, s["backend"], device=s["device"],
                onnx=paths if s["backend"] in ("onnxruntime", "auto") else (),
                engines=paths if s["backend"] in ("tensorrt", "auto") else (),
                fallback=s["backend_fallback"], log=self.get_logger().warning,
                max_sizes=s["max_compiled_sizes"], background=True,
                idle_before_replaced_s=s["compiled_size_idle_s"],
            )
        return model

    # -- input callbacks (never block) -------------------------------------------------------

    def _on_info(self, msg: CameraInfo) -> None:
        try:
            self._pair_info(msg)
        except Exception as exc:  # an exception here would end the executor's spin: never let it out
            self._record_error(f"camera_info callback: {exc.__class__.__name__}: {exc}")

    def _on_image(self, msg: Image | CompressedImage, info: dict) -> None:
        """An image and its MessageInfo (rclpy passes it to a two-argument callback)."""
        try:
            gid = info.get("publisher_gid")
            lost = self._gaps.seen(bytes(gid["data"]) if gid else None, info.get("publication_sequence_number"))
            if lost:
                with self._counter_lock:
                    self.counters.lost += lost
            self._pair_image(msg)
        except Exception as exc:
            self._record_error(f"image callback: {exc.__class__.__name__}: {exc}")

    def _pair_info(self, msg: CameraInfo) -> None:
        self._last_info_time = time.monotonic()
        with self._sync_lock:
            decided = self._sync.push_info(_stamp_ns(msg.header), msg)
        self._hand_over(decided)

    def _pair_image(self, msg: Image | CompressedImage) -> None:
        self.input_rate.tick()
        self._last_image_time = time.monotonic()
        if self._first_image_time == -math.inf:
            self._first_image_time = self._last_image_time
        with self._counter_lock:
            self.counters.frames_in += 1
        s = self._settings
        if s["fallback_fx"] > 0 and time.monotonic() - self._last_info_time > NO_INFO_AFTER_S:
            self._hand_over([(msg, None)])
            return
        with self._sync_lock:
            decided = self._sync.push_image(_stamp_ns(msg.header), msg)
        self._hand_over(decided)

    def _hand_over(self, decided: list[tuple[Image | CompressedImage, CameraInfo | None]]) -> None:
        now = time.monotonic()
        for image, info in decided:
            if info is None and not self._settings["fallback_fx"] > 0:
                with self._counter_lock:
                    self.counters.unmatched += 1
                self._log("warning", "frames without matching camera_info are skipped (same stamp expected, or "
                          "within sync_tolerance_s; set fallback_fx to process them anyway)")
                continue
            if self._slot.put(Frame(image, info, now)):
                with self._counter_lock:
                    self.counters.dropped += 1

    # -- the worker ---------------------------------------------------------------------------

    def _inference_loop(self) -> None:
        while self._running:
            try:
                self._next_frame()
            except Exception:  # never let the worker die: the node would look alive and publish nothing
                import traceback

                traceback.print_exc()

    def _next_frame(self) -> None:
        """Take the latest frame (waiting at most 0.5 s) and process it; errors are counted and logged."""
        frame = self._slot.take(timeout=0.5)
        if frame is None:
            return
        try:
            if not self._running or not self.context.ok():  # shutting down: nothing can be published any more
                return
            s = self.settings()
            if s["max_rate_hz"] > 0 and time.monotonic() - self._last_inference < 1.0 / s["max_rate_hz"]:
                with self._counter_lock:
                    self.counters.skipped_rate += 1
                return
            self.process(frame, s)
        except InputError as exc:
            self._record_error(str(exc))
        except Exception as exc:  # a model or backend failure must not kill the stream
            self._record_error(f"{exc.__class__.__name__}: {exc}")
        finally:
            self._slot.done()
            self._gate.depth_served()

    def _log(self, level: str, message: str, kind: str | None = None) -> None:
        """Log ``message`` unless its kind was logged less than LOG_PERIOD_S ago (kinds independent).

        One call site per severity: rclpy raises if one call site logs at two severities.
        """
        if not self._log_throttle.allow(kind or error_kind(message)):
            return
        logger = self.get_logger()
        if level == "error":
            logger.error(message)
        else:
            logger.warning(message)

    def _record_error(self, message: str) -> None:
        if not self.context.ok():
            return  # a publish that raced with shutdown: not an error of the input
        with self._counter_lock:
            self.counters.errors += 1
            self.counters.last_error = message
            self.counters.last_error_time = time.monotonic()
        self._log("error", f"frame skipped: {message}")

    def decode(self, frame: Frame, s: dict[str, Any]) -> Decoded:
        """RGB pixels and the intrinsics that describe them (InputError for anything malformed)."""
        msg = frame.image
        rgb = messages.compressed_to_rgb(msg) if isinstance(msg, CompressedImage) else messages.image_to_rgb(msg)
        height, width = rgb.shape[:2]
        if frame.info is not None:
            k = messages.camera_info_to_intrinsics(frame.info, width, height)
        else:
            k = Intrinsics.from_fx(width, height, s["fallback_fx"])
        return Decoded(msg.header, rgb, k)

    def process(self, frame: Frame, s: dict[str, Any]) -> None:
        """One frame's way: decode, the camera's plan (made once), infer, publish."""
        start = time.perf_counter()
        self._last_inference = time.monotonic()
        decoded = self.decode(frame, s)
        with self._latest_cond:
            self._decoded = decoded
            self._latest_cond.notify_all()
        route = RouteSettings(s["canonical_fx"], s["match_fy"], s["max_side_px"], s["max_image_tokens"])
        plan = self.model.plan(decoded.intrinsics, route, exact=False)  # torch's resize: model/preprocess.py
        result = self.model.infer(plan, [decoded.rgb])[0]
        if s["output_grid"] == "camera":
            depth, k = result.depth, result.intrinsics
        else:
            depth, k = result.depth_model, result.intrinsics_model
        self.publish_depth(decoded, depth, k, s)
        end = time.perf_counter()
        forward = sum(ms for name, ms in result.timings_ms.items() if name in FORWARD_STAGES)
        total = (end - start) * 1000.0
        self.latency.add((time.monotonic() - frame.received) * 1000.0)
        self.overhead.add(total - forward)
        self.ros_overhead.add(total - sum(result.timings_ms.values()))
        self.forward.add(forward)
        self.inference_rate.tick()
        with self._counter_lock:
            self.counters.processed += 1
            self.counters.reference_frames += int(result.backend != self.model.backend.name)

    def publish_depth(self, decoded: Decoded, depth: np.ndarray, k: Intrinsics, s: dict[str, Any]) -> None:
        """Publish depth, its camera_info, the coloured view and the cloud (outputs nobody reads are skipped)."""
        header = decoded.header
        depth = np.asarray(depth, dtype=np.float32)
        if s["min_depth_m"] > 0 or s["max_depth_m"] > 0:
            far = s["max_depth_m"] if s["max_depth_m"] > 0 else np.inf
            depth = np.where((depth >= s["min_depth_m"]) & (depth <= far), depth, np.float32(np.nan))
        if s["depth_encoding"] == "16UC1":  # the cloud and ~/depth_at use exactly the published millimetres
            depth = depth_from_16uc1(depth_to_16uc1(depth))
        self.pub_depth.publish(messages.depth_to_image(depth, header, s["depth_encoding"], self._depth_buffer))
        self.pub_depth_info.publish(messages.intrinsics_to_camera_info(k, header))
        with self._latest_cond:
            self._depth = LatestDepth(header, depth, k, (decoded.intrinsics.width, decoded.intrinsics.height))
        rgb = None
        if self.pub_colored.get_subscription_count() > 0:
            auto = s["colormap_min_m"] == 0 and s["colormap_max_m"] == 0
            color = colorize_depth(depth, None if auto else s["colormap_min_m"], None if auto else s["colormap_max_m"])
            self.pub_colored.publish(messages.rgb_to_image(color, header, self._colored_buffer))
        if s["publish_pointcloud"] and self.pub_points.get_subscription_count() > 0:
            if s["pointcloud_color"]:
                rgb = decoded.rgb if k.size == decoded.intrinsics.size else resize_rgb(decoded.rgb, *k.size)
            stride = s["pointcloud_stride"]
            shape = (-(-k.height // stride), -(-k.width // stride), 4 if rgb is not None else 3)
            cloud = organized_cloud(depth, k, rgb, stride, s["max_range_m"] if s["max_range_m"] > 0 else math.inf,
                                    out=self._cloud_buffer.array(np.float32, shape))
            self.pub_points.publish(messages.cloud_to_msg(cloud, header, self._cloud_buffer))

    # -- services -----------------------------------------------------------------------------

    def _wait_for_frame(self, timeout_s: float) -> Decoded | None:
        with self._latest_cond:
            if self._decoded is None:
                self._latest_cond.wait_for(lambda: self._decoded is not None or not self._running, timeout=timeout_s)
            return self._decoded

    def _on_spatial_query(self, request: SpatialQuery.Request, response: SpatialQuery.Response):
        s = self.settings()
        response.distance_m = math.nan
        response.point.point.x = response.point.point.y = response.point.point.z = math.nan
        with self._counter_lock:
            self.counters.queries += 1
        try:
            question = check_question(request.question, s["max_question_chars"])
        except InputError as exc:
            return self._query_failed(response, str(exc))
        refused = self._gate.enter(s["query_timeout_s"])
        if refused is not None:  # load shedding, not an error of the input: counted, not logged
            with self._counter_lock:
                self.counters.queries_busy += 1
            response.success = False
            response.message = refused
            return response
        try:
            frame = self._wait_for_frame(s["query_wait_s"])
            if frame is None:
                raise InputError(f"no camera frame received within query_wait_s={s['query_wait_s']} s")
            self.get_logger().info(f"spatial_query: answering {question!r} (at most {s['max_answer_tokens']} tokens)")
            answer = self.model.ask(frame.rgb, frame.intrinsics, question, s["max_answer_tokens"], s["canonical_fx"],
                                    s["max_side_px"], s["max_image_tokens"], should_stop=lambda: not self._running)
        except InputError as exc:
            return self._query_failed(response, str(exc))
        except Exception as exc:
            return self._query_failed(response, f"{exc.__class__.__name__}: {exc}")
        finally:
            self._gate.leave()
        if answer.stopped:
            return self._query_failed(response, f"stopped after {answer.num_tokens} tokens: the node is shutting down")
        response.success = True
        response.answer = answer.text
        response.point.header = frame.header
        found = spatial.answer_measurement(answer.text, answer.depth.depth, answer.depth.intrinsics,
                                           (frame.intrinsics.width, frame.intrinsics.height))
        if found is None:
            response.message = "the answer names no place in the image (no point or box): no distance measured"
            return response
        response.message = found.message
        response.distance_m = float(found.measurement.distance_m)
        x, y, z = (float(v) for v in found.measurement.point)
        response.point.point.x, response.point.point.y, response.point.point.z = x, y, z
        response.region_px = [float(v) for v in found.measurement.region_px]
        return response

    def _query_failed(self, response: SpatialQuery.Response, message: str) -> SpatialQuery.Response:
        with self._counter_lock:
            self.counters.query_errors += 1
            self.counters.last_error = f"spatial_query: {message}"
            self.counters.last_error_time = time.monotonic()
        self._log("warning", f"spatial_query refused: {message}")
        response.success = False
        response.message = message
        return response

    def _on_depth_at(self, request: DepthAt.Request, response: DepthAt.Response) -> DepthAt.Response:
        s = self.settings()
        with self._latest_cond:
            latest = self._depth
        if latest is None:
            response.success = False
            response.message = "no depth published yet"
            return response
        try:
            depth_m, points = spatial.depth_at_pixels(latest.depth, latest.intrinsics, list(request.u),
                                                      list(request.v), latest.image_size, s["max_query_pixels"])
        except InputError as exc:
            response.success = False
            response.message = str(exc)
            return response
        response.success = True
        response.header = latest.header
        response.depth_m = [float(d) for d in depth_m]
        response.points = messages.points_to_msgs(points)
        return response

    # -- diagnostics --------------------------------------------------------------------------

    def diagnostic_status(self) -> DiagnosticStatus:
        with self._counter_lock:
            c = Counters(**vars(self.counters))
        lat, ovh = self.latency.percentiles(), self.overhead.percentiles()
        ros, fwd = self.ros_overhead.percentiles(), self.forward.percentiles()
        now = time.monotonic()
        recent_error = now - c.last_error_time < RECENT_ERROR_S
        in_rate, out_rate = self.input_rate.rate(), self.inference_rate.rate()
        since_image, since_info = now - self._last_image_time, now - self._last_info_time
        images_for = now - self._first_image_time
        if c.frames_in == 0 or in_rate == 0.0:
            ago = f" for {since_image:.0f} s" if math.isfinite(since_image) else " yet"
            level, summary = DiagnosticStatus.WARN, f"no input images{ago}"
        elif self.settings()["fallback_fx"] == 0 and since_info > NO_INFO_AFTER_S and images_for > NO_INFO_AFTER_S:
            ago = f"for {since_info:.0f} s" if math.isfinite(since_info) else "at all"
            level, summary = DiagnosticStatus.WARN, (
                f"images arrive but no camera_info {ago}: frames are skipped (check the camera_info topic, "
                "or set fallback_fx)")
        elif recent_error:
            level, summary = DiagnosticStatus.WARN, f"recent error: {c.last_error}"
        elif out_rate == 0.0:
            level, summary = DiagnosticStatus.WARN, "input arrives but no depth is published"
        else:
            level, summary = DiagnosticStatus.OK, f"publishing depth at {out_rate:.1f} Hz"
        backend = self.model.backend
        values = {
            "input_rate_hz": f"{in_rate:.2f}",
            "inference_rate_hz": f"{out_rate:.2f}",
            "latency_p50_ms": f"{lat.p50:.1f}",
            "latency_p90_ms": f"{lat.p90:.1f}",
            "latency_p99_ms": f"{lat.p99:.1f}",
            "forward_p50_ms": f"{fwd.p50:.2f}",
            "overhead_p50_ms": f"{ovh.p50:.2f}",  # everything but the forward, preprocessing included
            "ros_overhead_p50_ms": f"{ros.p50:.2f}",  # decode + outputs + cloud + publish
            "ros_overhead_p90_ms": f"{ros.p90:.2f}",
            "frames_received": str(c.frames_in),
            "frames_lost_before_node": str(c.lost),  # the camera's sequence numbers skipped
            "frames_processed": str(c.processed),
            "frames_dropped": str(c.dropped),
            "frames_skipped_rate_limit": str(c.skipped_rate),
            "frames_without_camera_info": str(c.unmatched),
            "frames_waiting_for_camera_info": str(self._sync.pending),
            "errors": str(c.errors),
            "frames_pending": str(int(self.busy())),  # a frame waits for or is in the worker
            "frames_on_reference": str(c.reference_frames),  # PyTorch stood in: no compiled size ready yet
            "queries": str(c.queries),
            "query_errors": str(c.query_errors),
            "queries_busy": str(c.queries_busy),
            "query_active": str(self._gate.active).lower(),
            "queries_waiting": str(self._gate.waiting),
            "questions_waited_for_depth": str(self._gate.depth_turns),  # a frame went before the next question
            "backend": backend.describe(),
            "backend_fallback": backend.fallback_reason,
            "backend_choice": backend.choice_reason or f"{backend.name} (asked for)",
            "compiled_sizes_held": str(len(backend.held_sizes())),
            "max_compiled_sizes": str(backend.max_held_sizes()),  # the parameter, or the backend's default
            "model": self.model_name,
            "last_error": c.last_error,
        }
        return DiagnosticStatus(
            level=level, name=f"{self.get_name()}: depth", message=summary, hardware_id=self.model_name,
            values=[KeyValue(key=k, value=v) for k, v in values.items()],
        )

    def publish_diagnostics(self) -> None:
        msg = DiagnosticArray(status=[self.diagnostic_status()])
        msg.header.stamp = self.get_clock().now().to_msg()
        self.pub_diagnostics.publish(msg)

    def busy(self) -> bool:
        """A frame waits in the pairing or the slot, or the worker is on one."""
        with self._sync_lock:
            waiting = self._sync.pending > 0
        return waiting or self._slot.pending()

    def stop(self) -> None:
        """Stop work: the worker ends, an answer being generated stops within one token, questions waiting
        for their turn or a frame are refused at once, exports are cancelled."""
        self._running = False
        if hasattr(self, "_gate"):
            self._gate.close()
            with self._latest_cond:
                self._latest_cond.notify_all()
        if hasattr(self, "_worker"):
            self._slot.close()
            self._worker.join(timeout=5.0)
        if getattr(self, "_owns_model", False) and hasattr(self, "model"):
            self.model.backend.close()

    def destroy_node(self) -> None:
        self.stop()
        super().destroy_node()


def main(args: list[str] | None = None) -> int:
    """Run the node until SIGINT/SIGTERM (exit code 0). ``args``: ROS arguments (``--ros-args ...``).

    On SIGINT/SIGTERM an answer being generated stops within one token and the process exits 0
    within seconds. A model folder that cannot be loaded raises :class:`CheckpointError` (the CLI
    prints one line and exits 2).
    """
    from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor

    from depthvlm_ros.ros.runtime import short_gil_switch, use_large_data_profile

    use_large_data_profile()
    short_gil_switch()
    rclpy.init(args=args)
    node = executor = None
    try:
        node = DepthVLMNode()
        executor = MultiThreadedExecutor(num_threads=executor_threads())
        executor.add_node(node)
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except RCLError:
        if rclpy.ok():
            raise
        # SIGINT/SIGTERM shut the context down while the executor was building its wait set (rclpy
        # raises this instead of ExternalShutdownException in that window): a normal shutdown.
    finally:
        if node is not None:
            node.stop()
        if executor is not None:
            executor.shutdown(timeout_sec=5.0)
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    return 0
