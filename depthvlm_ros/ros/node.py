"""The ``depthvlm`` node: cameras in, metric depth, organized clouds and spatial answers out.

A managed (lifecycle) node. Each job lives in its own module, and this one only wires them to the
lifecycle:

- ``ros/intake.py``: per camera, ``image`` (rgb8, bgr8, rgba8, bgra8, mono8) or ``image/compressed``
  (``use_compressed``) and ``camera_info``, paired by stamp (exact, or within ``sync_tolerance_s``) and
  dropped into the camera's one-frame slot (latest wins; the replaced frame is counted as dropped);
- ``ros/worker.py``: one thread and one model serve the cameras in turn: decode, the camera's plan,
  infer;
- ``ros/outputs.py``: per camera ``depth/image`` (REP 118), ``depth/camera_info`` (describes the depth
  grid exactly), ``depth/colored`` (rgb8), ``points`` (organized PointCloud2), with the input's frame_id
  and stamp;
- ``ros/questions.py``: ``~/spatial_query`` (service), ``~/ask`` (action: the answer streams as feedback,
  cancel stops it), ``~/depth_at`` (service), ``~/answer_markers`` (MarkerArray);
- ``ros/diagnostics.py``: ``/diagnostics``, one status per camera;
- ``ros/params.py``: the parameters, grouped by these parts.

Topics are relative, so namespaces and remaps work as for any camera driver; with ``cameras: [front,
left]`` each camera's topics live under its namespace (``front/image`` ... ``front/points``). The
model is loaded once for all cameras.

Lifecycle (``~/change_state``, ``~/get_state``): configure loads the model and creates the parts
(exports for compiled sizes start in the background); activate starts publishing and processing;
deactivate stops both (frames are counted and dropped in their callback, an answer being generated
stops within one token); cleanup frees the model (its memory returns to the system); shutdown works
from any state and ends ``depthvlm node`` with exit code 0. With ``autostart`` (default true) the node
configures and activates itself at start, as a plain node.

Bad input never stops the node: it is counted, logged (at most once per ``LOG_PERIOD_S`` per kind, a
fixed code, and at most a dozen lines a minute per camera and for the questions; untrusted text quoted
short) and shown in diagnostics.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import rclpy
from rcl_interfaces.msg import (
    FloatingPointRange,
    IntegerRange,
    ParameterDescriptor,
    ParameterType,
    SetParametersResult,
)
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.exceptions import ParameterUninitializedException
from rclpy.impl.implementation_singleton import rclpy_implementation
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.publisher import Publisher
from rclpy.task import Future
from rclpy.timer import Timer

from depthvlm_ros.errors import InputError
from depthvlm_ros.ros.context import DepthModel, NodeContext
from depthvlm_ros.ros.diagnostics import diagnostic_array
from depthvlm_ros.ros.flow import MAX_ERROR_CHARS, KindThrottle, LatestSlots, LogBudget, QuestionGate, error_kind
from depthvlm_ros.ros.intake import CameraIntake, Frame, topic
from depthvlm_ros.ros.outputs import DepthOutputs
from depthvlm_ros.ros.params import (
    BY_NAME,
    PARAMS,
    Param,
    camera_depth_scales,
    check_cameras,
    check_settings,
    check_value,
)
from depthvlm_ros.ros.questions import QuestionInterface
from depthvlm_ros.ros.settings import ModelSettings, Settings
from depthvlm_ros.ros.worker import Camera, InferenceWorker

NODE_NAME = "depthvlm"
#: rclpy's error for a failed rcl call (also what an executor raises when shutdown races its wait set).
RCLError = rclpy_implementation.RCLError
#: Each kind of bad input is logged at most once per this many seconds (kinds are independent).
LOG_PERIOD_S = 5.0
#: Executor threads besides the cameras' and the questions': depth_at, diagnostics, parameter and
#: lifecycle services, the action's goal/cancel/result services, a refusal.
BASE_THREADS = 6
#: Longest a deactivation waits for the frame in the worker to finish (seconds).
DEACTIVATE_WAIT_S = 30.0


def executor_threads(cameras: int = 1) -> int:
    """Threads the node's executor needs: two per camera (images and camera_infos), the questions that
    may wait for their turn (each holds one: reentrant service or action), the one answered, and
    BASE_THREADS for everything else."""
    pending = BY_NAME["max_pending_queries"].range
    assert pending is not None  # declared with a range (params.PARAMS)
    return BASE_THREADS + 2 * cameras + 1 + int(pending[1])


def release_memory() -> None:
    """Give freed memory back: PyTorch's CUDA cache (when CUDA was used) and the heap (glibc keeps it
    otherwise; a no-op elsewhere)."""
    import sys

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


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


class DepthVLMNode(LifecycleNode):
    """See the module docstring. ``model`` may be given (tests, tools): then it is the caller's, kept
    across cleanup; otherwise configure loads it from ``model_path`` and cleanup frees it."""

    def __init__(self, model: Any | None = None, **kwargs: Any) -> None:
        super().__init__(NODE_NAME, **kwargs)
        for param in PARAMS:
            default = Parameter.Type.STRING_ARRAY if param.default == [] else param.default
            self.declare_parameter(param.name, default, _descriptor(param))
        self._settings_lock = threading.Lock()
        self._settings = Settings.from_values({p.name: self._param_value(p.name) for p in PARAMS})
        self.add_on_set_parameters_callback(self._validate_parameters)
        self.add_post_set_parameters_callback(self._apply_parameters)
        try:
            self.camera_names = check_cameras(list(self._settings.intake.cameras))
            camera_depth_scales(self._settings.outputs.camera_depth_scales, self._settings.intake.cameras)
        except ValueError as exc:
            raise InputError(str(exc)) from None
        self._given_model = model
        self._log_throttle = KindThrottle(LOG_PERIOD_S)
        self._stopping = False  # SIGINT/SIGTERM: nothing more is processed (the lifecycle state is rclpy's)
        self.ctx = NodeContext(node=self, settings=self.settings, is_active=self.is_active, log=self._log,
                               ok=self.context.ok)
        #: Done when the node reached its final state (shutdown): ``main`` then exits 0.
        self.finalized: Future[bool] = Future()
        #: Why the last configure failed (``main`` raises it under autostart: exit 3 with one line).
        self.configure_error: Exception | None = None
        self.model: Any | None = None
        self.cameras: list[Camera] = []
        self.worker: InferenceWorker | None = None
        self.questions: QuestionInterface | None = None
        self._diagnostics_pub: Publisher | None = None
        self._diagnostics_timer: Timer | None = None
        if self._settings.lifecycle.autostart:
            if self.trigger_configure() != TransitionCallbackReturn.SUCCESS:
                raise self.configure_error or RuntimeError("configure failed")
            self.trigger_activate()
        else:
            self.get_logger().info("unconfigured (autostart false): waiting for configure on ~/change_state")

    # -- parameters ---------------------------------------------------------------------------

    def _param_value(self, name: str) -> Any:
        try:
            value = self.get_parameter(name).value
        except ParameterUninitializedException:  # a string array declared without a value
            value = None
        return [] if value is None and BY_NAME[name].default == [] else value

    def _validate_parameters(self, params: list[Parameter]) -> SetParametersResult:
        with self._settings_lock:
            values = self._settings.values()
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
        """A new Settings with the changed values (already validated as a whole by the on-set callback)."""
        with self._settings_lock:
            self._settings = self._settings.with_values(
                {p.name: self._param_value(p.name) for p in params if p.name in BY_NAME})
            current = self._settings
        if self.questions is not None:
            self.questions.gate.max_waiting = current.questions.max_pending_queries
        for camera in self.cameras:
            camera.intake.set_tolerance(current.intake.sync_tolerance_s)

    def settings(self) -> Settings:
        """The current settings (immutable: read once per frame or request)."""
        with self._settings_lock:
            return self._settings

    def is_active(self) -> bool:
        """Frames are processed and outputs published: rclpy's lifecycle state is ``active``."""
        return not self._stopping and self.state == "active"

    @property
    def state(self) -> str:
        """The lifecycle state's label, as rclpy's state machine has it (``unconfigured``, ``inactive``,
        ``active``, ``finalized``, or a transition's: ``configuring``, ``deactivating``, ...)."""
        return str(self._state_machine.current_state[1])

    def _log(self, level: str, message: str, kind: str | None = None, budget: LogBudget | None = None) -> None:
        """Log ``message`` unless its kind (a fixed code; or :func:`error_kind`) was logged less than
        LOG_PERIOD_S ago (kinds independent) or its source's ``budget`` is spent. Never more than
        MAX_ERROR_CHARS characters (untrusted parts are quoted shorter where the message is made).

        One call site per severity: rclpy raises if one call site logs at two severities.
        """
        if not self._log_throttle.allow(kind or error_kind(message)):
            return
        message = message[:MAX_ERROR_CHARS]
        if budget is not None:
            allowed, left_out = budget.take()
            if not allowed:
                return
            if left_out:
                message += f" ({left_out} more lines from this source were left out)"
        logger = self.get_logger()
        if level == "error":
            logger.error(message)
        else:
            logger.warning(message)

    # -- lifecycle ----------------------------------------------------------------------------

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Load the model (unless given), make the cameras, the worker, the questions and diagnostics."""
        self.configure_error = None
        try:
            s = self.settings()
            self.model = self._given_model if self._given_model is not None else self._load_model(s.model)
            slots: LatestSlots[Frame] = LatestSlots(len(self.camera_names))
            for index, name in enumerate(self.camera_names):
                intake = CameraIntake(self.ctx, index, name, slots)
                self.cameras.append(Camera(name, intake, DepthOutputs(self.ctx, name)))
            gate = QuestionGate(s.questions.max_pending_queries, slots.pending)
            self.worker = InferenceWorker(self.ctx, self.model, self.cameras, slots, gate)
            self.questions = QuestionInterface(self.ctx, self.model, self.cameras, self.worker, gate)
            from diagnostic_msgs.msg import DiagnosticArray

            self._diagnostics_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
            self._diagnostics_timer = self.create_timer(s.diagnostics.diagnostics_period_s, self.publish_diagnostics,
                                                        callback_group=MutuallyExclusiveCallbackGroup())
        except Exception as exc:  # rclpy would swallow it: keep it, say it once, stay unconfigured
            import traceback

            traceback.clear_frames(exc.__traceback__)  # its frames would keep a half-loaded model alive
            self.configure_error = exc.with_traceback(None)
            if not s.lifecycle.autostart:  # under autostart main raises it (the CLI's one line, exit 3)
                self.get_logger().error(f"configure failed: {exc.__class__.__name__}: {exc}")
            self._release()
            return TransitionCallbackReturn.FAILURE
        weights = "" if self.model.has_weights else " (no weights loaded: answers off)"
        self.get_logger().info(f"configured: model {self.model.name}{weights}, backend {self.model.backend.describe()}")
        return super().on_configure(state)

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        result = super().on_activate(state)  # the lifecycle publishers publish from now on
        inputs = ", ".join(f"{c.intake.image_topic} + {topic(c.name, 'camera_info')}" for c in self.cameras)
        model = self.model
        assert model is not None  # activate follows a successful configure (the lifecycle's inactive state)
        self.get_logger().info(f"ready: model {model.name}, backend {model.backend.describe()}, "
                               f"input {inputs}")
        return result

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        # (the state is "deactivating" from here: callbacks and the worker stop taking frames)
        self._wait_for_work()  # questions waiting for their turn or a frame see the state within 0.1 s
        for camera in self.cameras:
            camera.intake.forget_pending()
        self.get_logger().info("inactive: frames are ignored and nothing is published")
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release()
        self.get_logger().info("unconfigured: the model is freed")
        return super().on_cleanup(state)

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release()
        if not self.finalized.done():
            self.finalized.set_result(True)
        return super().on_shutdown(state)

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.get_logger().error(f"error in a transition from {state.label}: freeing everything (unconfigured)")
        self._release()
        return TransitionCallbackReturn.SUCCESS

    def _load_model(self, m: ModelSettings) -> DepthModel:
        """The model ``m`` names, with its backend built (the one factory: ``DepthVLM.from_pretrained``)."""
        from depthvlm_ros.backends import BackendSpec
        from depthvlm_ros.model.default import resolve_model
        from depthvlm_ros.pipeline import DepthVLM

        folder, note = resolve_model(m.model_path)
        if note:
            self.get_logger().warning(note)
        if not m.answers and m.backend != "triton":
            raise InputError(f"answers: false needs backend triton (the depth path on a server); backend is "
                             f"{m.backend!r}")
        paths = tuple(Path(p) for p in m.engine_paths if p)
        # auto: TensorRT with an engine and CUDA, else ONNX Runtime, else PyTorch. Missing ONNX sizes are
        # exported by a separate process while the nearest held size (or PyTorch, before the first) serves: an
        # export never runs on the frame path.
        spec = BackendSpec(
            name=m.backend, device=m.device, onnx=paths if m.backend in ("onnxruntime", "auto") else (),
            engines=paths if m.backend in ("tensorrt", "auto") else (), fallback=m.backend_fallback, compile=m.compile,
            head_output=m.head_output,
            max_sizes=m.max_compiled_sizes, background=True, idle_before_replaced_s=m.compiled_size_idle_s,
            triton=self._triton_connection(m) if m.backend == "triton" else None)
        return DepthVLM.from_pretrained(folder, device=m.answer_device or m.device, dtype=m.precision,
                                        weights=m.answers, backend=spec,  # (the logger's bool result is unused)
                                        log=cast("Callable[[str], None]", self.get_logger().warning))

    @staticmethod
    def _triton_connection(m: ModelSettings) -> Any:
        from depthvlm_ros.backends.triton_backend import TritonConnection

        return TritonConnection.from_settings(m.triton_url, m.triton_model, m.triton_token_file, m.triton_timeout_s,
                                              m.triton_tls_root_cert, m.triton_tls_cert, m.triton_tls_key)

    def _wait_for_work(self) -> None:
        """Until the frame in the worker and the questions in flight are done (both stop early once the
        node is inactive); a warning after DEACTIVATE_WAIT_S."""
        if self.worker is not None and not self.worker.wait_idle(DEACTIVATE_WAIT_S):
            self.get_logger().warning(f"the frame in the worker did not finish within {DEACTIVATE_WAIT_S:.0f} s")
        if self.questions is not None and not self.questions.wait_idle(DEACTIVATE_WAIT_S):
            self.get_logger().warning(f"a question did not finish within {DEACTIVATE_WAIT_S:.0f} s")

    def _release(self) -> None:
        """Stop and destroy the parts (after the work in flight is done); free the model unless it is the
        caller's (its memory returns)."""
        questions, worker, cameras = self.questions, self.worker, self.cameras
        timer, pub, model = self._diagnostics_timer, self._diagnostics_pub, self.model
        # Detach first: a diagnostics callback running now sees None and does nothing.
        self.questions = self.worker = self._diagnostics_pub = self._diagnostics_timer = self.model = None
        self.cameras = []
        if timer is not None:
            self.destroy_timer(timer)
        if questions is not None:
            questions.stop()
        if worker is not None:
            worker.wait_idle(DEACTIVATE_WAIT_S)
            worker.stop()
        if questions is not None:
            questions.destroy(DEACTIVATE_WAIT_S)  # the questions in flight answer first
        for camera in cameras:
            for sub in camera.intake.subscriptions:
                self.destroy_subscription(sub)
            camera.outputs.destroy()
        if pub is not None:
            self.destroy_publisher(pub)
        if model is not None and model is not self._given_model:
            model.backend.close()
        del questions, worker, cameras, model
        release_memory()

    # -- diagnostics --------------------------------------------------------------------------

    def publish_diagnostics(self) -> None:
        model, questions, cameras, pub = self.model, self.questions, list(self.cameras), self._diagnostics_pub
        if model is None or questions is None or pub is None:
            return  # cleaned up meanwhile
        try:
            pub.publish(diagnostic_array(self.get_name(), cameras, model, questions, self.state,
                                         self.settings().intake.fallback_fx, self.get_clock().now().to_msg()))
        except Exception as exc:  # an exception here would end the executor's spin
            if self._diagnostics_pub is pub:  # (else a cleanup destroyed the publisher meanwhile)
                self._log("error", f"diagnostics: {exc.__class__.__name__}: {exc}")

    def stop(self) -> None:
        """Stop work (SIGINT/SIGTERM): an answer being generated stops within one token, questions waiting
        for their turn or a frame are refused at once, the worker ends, exports are cancelled."""
        self._stopping = True
        if self.questions is not None:
            self.questions.stop()
        if self.worker is not None:
            self.worker.stop()
        if self.model is not None and self.model is not self._given_model:
            self.model.backend.close()

    def destroy_node(self) -> None:
        self.stop()
        super().destroy_node()


def main(args: list[str] | None = None) -> int:
    """Run the node until SIGINT/SIGTERM or the shutdown transition (exit code 0). ``args``: ROS
    arguments (``--ros-args ...``).

    On SIGINT/SIGTERM an answer being generated stops within one token and the process exits 0
    within seconds. Under autostart a model folder that cannot be loaded raises :class:`CheckpointError`
    (the CLI prints one line and exits 3); without it, configure fails and the node stays unconfigured.
    """
    from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor

    from depthvlm_ros.ros.runtime import short_gil_switch, use_large_data_profile

    use_large_data_profile()
    short_gil_switch()
    rclpy.init(args=args)
    node = executor = None
    try:
        node = DepthVLMNode()
        executor = MultiThreadedExecutor(num_threads=executor_threads(len(node.camera_names)))
        executor.add_node(node)
        executor.spin_until_future_complete(node.finalized)
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
            executor.shutdown(timeout_sec=5.0)  # callbacks in flight finish (the shutdown's response)
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    return 0
