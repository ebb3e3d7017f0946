"""The question interface: ``~/spatial_query`` (service), ``~/ask`` (action), ``~/depth_at`` (service) and
``~/answer_markers`` (visualization_msgs/MarkerArray).

A question names a camera (``""`` = the first) and is answered on that camera's latest frame. The
service and the action share one answer path (:meth:`QuestionInterface.answer`) and the same fields:
the answer, and where it names a place, the distance, the 3D point (optical frame, the frame's header)
and the pixel region measured on the depth map of the same prefill. The action streams the answer as
feedback and stops generating within one decoding step of a cancel. Every answer that names a place
is drawn on ``~/answer_markers``: a sphere at the point and a label ("red chair 2.41 m"). Every answer,
refusals included, is published on ``~/answers`` (depthvlm_msgs/Answer; reliable, transient-local, the last
10 kept) for whoever else wants to see what was asked and answered.

Questions share the model with the depth stream through :class:`~depthvlm_ros.ros.flow.QuestionGate`:
one answered at a time, at most ``max_pending_queries`` waiting, the rest refused "busy" at once.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from builtin_interfaces.msg import Duration as DurationMsg
from depthvlm_msgs.action import Ask
from depthvlm_msgs.msg import Answer
from depthvlm_msgs.srv import DepthAt, SpatialQuery
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from std_msgs.msg import Header
from visualization_msgs.msg import Marker, MarkerArray

from depthvlm_ros import spatial
from depthvlm_ros.errors import DepthVLMError, InputError, shown
from depthvlm_ros.model.processing import check_question
from depthvlm_ros.ros import messages
from depthvlm_ros.ros.context import DepthModel, NodeContext, model_route
from depthvlm_ros.ros.flow import MAX_ERROR_CHARS, LogBudget, QuestionGate, error_kind
from depthvlm_ros.ros.params import depth_scale_for
from depthvlm_ros.ros.worker import Camera, InferenceWorker

#: ``~/answers``: reliable and transient-local, so a subscriber that comes late still gets the last few.
ANSWERS_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.TRANSIENT_LOCAL)
#: Characters of the request's camera name that ``~/answers`` repeats.
ANSWER_CAMERA_CHARS = 100

#: Marker namespace of the answers on ``~/answer_markers``.
MARKER_NS = "depthvlm_answer"
#: Longest label drawn next to an answer's point (characters).
MAX_LABEL_CHARS = 60


@dataclass
class QuestionCounters:
    """What the question interface counts (questions, errors, busy refusals, cancels, rejected goals) and its
    latest error (text, and its time.monotonic() time); diagnostics report a snapshot."""

    queries: int = 0
    query_errors: int = 0
    queries_busy: int = 0  # refused at once: too many questions waiting
    canceled: int = 0  # actions canceled by their client
    goals_rejected: int = 0  # ~/ask goals rejected before they started (inactive, too many tokens, busy)
    last_error: str = ""
    last_error_time: float = field(default=-math.inf)


@dataclass
class Outcome:
    """What a question got: the fields of ``SpatialQuery.Response`` and ``Ask.Result`` (same names)."""

    success: bool = False
    answer: str = ""
    message: str = ""
    distance_m: float = math.nan
    point: tuple[float, float, float] = (math.nan, math.nan, math.nan)
    header: Header | None = None  # the frame the answer is about
    region_px: list[float] = field(default_factory=list)
    label: str = ""  # what the answer's place is called (markers)

    def fill(self, target: Any) -> Any:
        """Copy into a ``SpatialQuery.Response`` or an ``Ask.Result``."""
        target.success, target.answer, target.message = self.success, self.answer, self.message
        target.distance_m = float(self.distance_m)
        target.point.point.x, target.point.point.y, target.point.point.z = (float(v) for v in self.point)
        if self.header is not None:
            target.point.header = self.header
        target.region_px = [float(v) for v in self.region_px]
        return target

    def answer_msg(self, via: str, camera: str, question: str, max_question_chars: int) -> Answer:
        """The ``~/answers`` message of this outcome; the request's strings cut short (they come from outside)."""
        msg = Answer(via=via, camera=camera[:ANSWER_CAMERA_CHARS], question=question[:max_question_chars],
                     success=self.success, answer=self.answer, message=self.message,
                     distance_m=float(self.distance_m), region_px=[float(v) for v in self.region_px])
        if self.header is not None:
            msg.header = self.header
        msg.point.x, msg.point.y, msg.point.z = (float(v) for v in self.point)
        return msg


def answer_markers(outcome: Outcome, lifetime_s: float) -> MarkerArray:
    """A sphere at the answer's point and a text label above it, in the frame the answer is about.

    The sphere's diameter grows with the distance (2 % of it, at least 5 cm) so it stays visible far
    away; "above" is -y, the optical frame's up. ``lifetime_s`` 0: until replaced.
    """
    x, y, z = outcome.point
    size = max(0.05, 0.02 * outcome.distance_m)
    lifetime = DurationMsg(sec=int(lifetime_s), nanosec=int(round((lifetime_s % 1.0) * 1e9)))
    sphere = Marker(header=outcome.header, ns=MARKER_NS, id=0, type=Marker.SPHERE, action=Marker.ADD,
                    lifetime=lifetime)
    sphere.pose.position.x, sphere.pose.position.y, sphere.pose.position.z = x, y, z
    sphere.pose.orientation.w = 1.0
    sphere.scale.x = sphere.scale.y = sphere.scale.z = size
    sphere.color.r, sphere.color.g, sphere.color.b, sphere.color.a = 1.0, 0.2, 0.2, 0.9
    text = Marker(header=outcome.header, ns=MARKER_NS, id=1, type=Marker.TEXT_VIEW_FACING, action=Marker.ADD,
                  lifetime=lifetime)
    text.pose.position.x, text.pose.position.y, text.pose.position.z = x, y - 1.5 * size, z
    text.pose.orientation.w = 1.0
    text.scale.z = max(0.08, 1.5 * size)  # text height, metres
    text.color.r = text.color.g = text.color.b = text.color.a = 1.0
    text.text = f"{outcome.label[:MAX_LABEL_CHARS]} {outcome.distance_m:.2f} m".strip()
    return MarkerArray(markers=[sphere, text])


class QuestionInterface:
    """The node's services, action and markers for questions (see the module docstring)."""

    def __init__(self, ctx: NodeContext, model: DepthModel, cameras: list[Camera], worker: InferenceWorker,
                 gate: QuestionGate) -> None:
        node = ctx.node
        self._node, self.model, self.cameras, self.worker, self.gate = node, model, cameras, worker, gate
        self._settings, self._is_active, self._log = ctx.settings, ctx.is_active, ctx.log
        self.log_budget = LogBudget()  # the questions' share of the log, however many arrive
        self.counters = QuestionCounters()
        self._lock = threading.Lock()
        self._running = True
        self._in_flight = 0  # questions between answer()'s start and end (cleanup waits for them)
        self._idle = threading.Condition(self._lock)
        # Reentrant: while one question is answered, others reach the gate and get "busy" at once.
        questions = ReentrantCallbackGroup()
        self.services = [
            node.create_service(SpatialQuery, "~/spatial_query", self._on_spatial_query, callback_group=questions),
            node.create_service(DepthAt, "~/depth_at", self._on_depth_at,
                                callback_group=MutuallyExclusiveCallbackGroup()),
        ]
        self.action = ActionServer(node, Ask, "~/ask", execute_callback=self._execute_ask,
                                   goal_callback=self._admit_goal,
                                   cancel_callback=lambda _goal: CancelResponse.ACCEPT, callback_group=questions)
        self.markers = node.create_lifecycle_publisher(MarkerArray, "~/answer_markers", 10)
        self.answers = node.create_lifecycle_publisher(Answer, "~/answers", ANSWERS_QOS)

    def camera(self, name: str) -> Camera:
        """The camera a question names ("" = the first); InputError names the cameras there are."""
        if not name:
            return self.cameras[0]
        for camera in self.cameras:
            if camera.name == name:
                return camera
        names = ", ".join(repr(c.name) for c in self.cameras)
        raise InputError(f"no camera {shown(name)} here; cameras: {names}", "question.camera")

    # -- the answer path (service and action) ----------------------------------------------------

    def answer(self, question: str, camera_name: str, max_new_tokens: int,
               should_stop: Callable[[], bool] = lambda: False,
               on_text: Callable[[str, int], None] | None = None, via: str = "spatial_query") -> Outcome:
        """Answer ``question`` on the camera's latest frame and measure the place it names (``via``: the
        interface that asked, for the log)."""
        with self._lock:
            self.counters.queries += 1
            self._in_flight += 1
        try:
            outcome = self._answer(question, camera_name, max_new_tokens, should_stop, on_text, via)
            if self._is_active():  # (a deactivated lifecycle publisher would only complain)
                self.answers.publish(outcome.answer_msg(via, camera_name, question,
                                                        self._settings().questions.max_question_chars))
            return outcome
        finally:
            with self._lock:
                self._in_flight -= 1
                self._idle.notify_all()

    def _answer(self, question: str, camera_name: str, max_new_tokens: int, should_stop: Callable[[], bool],
                on_text: Callable[[str, int], None] | None, via: str) -> Outcome:
        s = self._settings()

        def stop() -> bool:
            return not self._running or not self._is_active() or should_stop()

        try:
            if not self._is_active():
                raise InputError("the node is not active: activate it (~/change_state) first")
            question = check_question(question, s.questions.max_question_chars)
            self.model.require_weights("answering a question")
            camera = self.camera(camera_name)
            tokens = int(max_new_tokens) or s.questions.max_answer_tokens
            if tokens > s.questions.max_answer_tokens:
                raise InputError(f"max_new_tokens {tokens} is more than the node's max_answer_tokens "
                                 f"{s.questions.max_answer_tokens}", "question.tokens")
        except DepthVLMError as exc:  # bad input, or what this machine cannot do: the message says which
            return self._failed(str(exc), exc.kind)
        refused = self.gate.enter(s.questions.query_timeout_s, stop)
        if refused is not None and stop():
            return Outcome(message=f"stopped before answering: {self._why_stopped(should_stop)}")
        if refused is not None:  # load shedding, not an error of the input: counted, not logged
            with self._lock:
                self.counters.queries_busy += 1
            return Outcome(message=refused)
        try:
            frame = self.worker.wait_for_frame(camera, s.questions.query_wait_s, stop)
            if stop():
                raise InputError(f"stopped before answering: {self._why_stopped(should_stop)}")
            if frame is None:
                raise InputError(f"no camera frame received within query_wait_s={s.questions.query_wait_s} s",
                                 "question.no_frame")
            self._node.get_logger().info(f"{via}: answering {shown(question, 80)} (at most {tokens} tokens)")
            answer = self.model.ask(frame.rgb, frame.intrinsics, question, max_new_tokens=tokens,
                                    route=model_route(s.model), should_stop=stop, on_text=on_text)
        except DepthVLMError as exc:  # bad input, or what this machine cannot do: the message says which
            return self._failed(str(exc), exc.kind)
        except Exception as exc:
            return self._failed(f"{exc.__class__.__name__}: {exc}", exc.__class__.__name__)
        finally:
            self.gate.leave()
        if answer.stopped:  # a cancel is the client's wish; shutdown and deactivation are refusals
            why = self._why_stopped(should_stop)
            stopped = f"stopped after {answer.num_tokens} tokens: {why}"
            outcome = Outcome(message=stopped) if why == "canceled" else self._failed(stopped, "stopped")
            outcome.answer, outcome.header = answer.text, frame.header
            return outcome
        outcome = Outcome(answer=answer.text, header=frame.header)
        outcome.success = True
        depth = answer.depth.depth  # the published depth's scale (depth_scale), so answers and depth_at agree
        scale = depth_scale_for(camera.name, s.outputs.depth_scale, s.outputs.camera_depth_scales, s.intake.cameras)
        if scale != 1.0:
            depth = depth * np.float32(scale)
        found = spatial.answer_measurement(answer.text, depth, answer.depth.intrinsics,
                                           (frame.intrinsics.width, frame.intrinsics.height))
        if found is None:
            outcome.message = "the answer names no place in the image (no point or box): no distance measured"
            return outcome
        outcome.message = found.message
        outcome.distance_m = float(found.measurement.distance_m)
        px, py, pz = found.measurement.point
        outcome.point = (float(px), float(py), float(pz))
        outcome.region_px = [float(v) for v in found.measurement.region_px]
        outcome.label = found.grounding.label or question
        if math.isfinite(outcome.distance_m):
            self.markers.publish(answer_markers(outcome, s.questions.marker_lifetime_s))
        return outcome

    def _why_stopped(self, should_stop: Callable[[], bool]) -> str:
        if should_stop():
            return "canceled"
        return "the node is shutting down" if not self._running else "the node was deactivated"

    def _failed(self, message: str, kind: str = "") -> Outcome:
        """A refused question: counted, shown in diagnostics, logged (throttled by ``kind``, a fixed code)."""
        with self._lock:
            self.counters.query_errors += 1
            self.counters.last_error = f"question: {message}"[:MAX_ERROR_CHARS]
            self.counters.last_error_time = time.monotonic()
        # (the service's and the action's alike)
        self._log("warning", f"question refused: {message}", f"question:{kind or error_kind(message)}",
                  self.log_budget)
        return Outcome(message=message)

    def snapshot(self) -> QuestionCounters:
        with self._lock:
            return QuestionCounters(**vars(self.counters))

    # -- ROS callbacks -----------------------------------------------------------------------------

    def _on_spatial_query(self, request: SpatialQuery.Request, response: SpatialQuery.Response):
        s = self._settings()
        return self.answer(request.question, request.camera, s.questions.max_answer_tokens).fill(response)

    def _admit_goal(self, goal: Ask.Goal) -> GoalResponse:
        """A goal the node cannot take now is rejected here (its client sees REJECTED at once): the node is not
        active, the goal asks for more tokens than ``max_answer_tokens``, or questions are already waiting.
        A goal that passes may still be stopped later (deactivation, shutdown); its result then says why."""
        s = self._settings().questions
        reason = None
        if not self._is_active():
            reason = "the node is not active"
        elif int(goal.max_new_tokens) > s.max_answer_tokens:
            reason = f"max_new_tokens {int(goal.max_new_tokens)} is more than max_answer_tokens {s.max_answer_tokens}"
        else:
            reason = self.gate.would_refuse()
        if reason is None:
            return GoalResponse.ACCEPT
        with self._lock:
            self.counters.queries_busy += int(reason.startswith("busy"))
            self.counters.goals_rejected += 1
        self._log("warning", f"~/ask goal rejected: {reason}", "question:goal_rejected", self.log_budget)
        return GoalResponse.REJECT

    def _execute_ask(self, goal_handle: Any) -> Ask.Result:
        goal = goal_handle.request

        def feedback(text: str, tokens: int) -> None:
            goal_handle.publish_feedback(Ask.Feedback(answer=text, tokens=tokens))

        outcome = self.answer(goal.question, goal.camera, int(goal.max_new_tokens),
                              should_stop=lambda: goal_handle.is_cancel_requested, on_text=feedback, via="ask")
        if goal_handle.is_cancel_requested:
            with self._lock:
                self.counters.canceled += 1
            goal_handle.canceled()
        elif outcome.success:
            goal_handle.succeed()
        else:
            goal_handle.abort()
        return outcome.fill(Ask.Result())

    def _on_depth_at(self, request: DepthAt.Request, response: DepthAt.Response) -> DepthAt.Response:
        s = self._settings()
        try:
            latest = self.camera(request.camera).outputs.latest()
            if latest is None:
                raise InputError("no depth published yet")
            depth_m, points = spatial.depth_at_pixels(latest.depth, latest.intrinsics, list(request.u),
                                                      list(request.v), latest.image_size,
                                                      s.questions.max_query_pixels)
        except InputError as exc:
            response.success = False
            response.message = str(exc)
            return response
        response.success = True
        response.header = latest.header
        response.depth_m = [float(d) for d in depth_m]
        response.points = messages.points_to_msgs(points)
        return response

    # -- life ---------------------------------------------------------------------------------------

    def stop(self) -> None:
        """An answer being generated stops within one token; questions waiting are refused at once."""
        self._running = False
        self.gate.close()
        with self.worker.frame_ready:
            self.worker.frame_ready.notify_all()

    def wait_idle(self, timeout_s: float) -> bool:
        """Until no question is being handled (they stop within a token once the node is inactive or
        stopping); False after ``timeout_s``."""
        with self._lock:
            return self._idle.wait_for(lambda: self._in_flight == 0, timeout=timeout_s)

    def destroy(self, timeout_s: float = 30.0) -> None:
        """Stop, let the questions in flight send their responses, then remove the services and the action."""
        self.stop()
        self.wait_idle(timeout_s)
        for service in self.services:
            self._node.destroy_service(service)
        self.action.destroy()
        self._node.destroy_lifecycle_publisher(self.markers)
        self._node.destroy_lifecycle_publisher(self.answers)
