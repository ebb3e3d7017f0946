"""Diagnostics: one ``/diagnostics`` status per camera, every ``diagnostics_period_s``.

The status of the camera on the plain topic names is ``<node>: depth``; a named camera's is
``<node>: <camera>: depth``. Each says what became of that camera's frames (received, processed,
dropped, ...), its rates and latencies, and the state shared by all cameras: the lifecycle state, the
backend, and the questions (they share the one model).
"""

from __future__ import annotations

import math
import time
from typing import Any

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue

from depthvlm_ros.ros.intake import NO_INFO_AFTER_S
from depthvlm_ros.ros.questions import QuestionInterface
from depthvlm_ros.ros.worker import Camera

#: An error this recent makes diagnostics WARN.
RECENT_ERROR_S = 10.0


def status_name(node_name: str, camera: str) -> str:
    """A camera's diagnostic status name: ``<node>: <camera>: depth``, or ``<node>: depth`` for the camera on the
    plain topic names (``camera`` "")."""
    return f"{node_name}: {camera}: depth" if camera else f"{node_name}: depth"


def camera_status(node_name: str, camera: Camera, model: Any, questions: QuestionInterface, state: str,
                  fallback_fx: float) -> DiagnosticStatus:
    """The camera's status now (``state``: the node's lifecycle state label)."""
    intake = camera.intake
    c, q = intake.snapshot(), questions.snapshot()
    lat, ovh = intake.latency.percentiles(), intake.overhead.percentiles()
    ros, fwd = intake.ros_overhead.percentiles(), intake.forward.percentiles()
    now = time.monotonic()
    last_error, last_error_time = max((c.last_error_time, c.last_error), (q.last_error_time, q.last_error))[::-1]
    in_rate, out_rate = intake.input_rate.rate(), intake.inference_rate.rate()
    since_image, since_info = now - intake.last_image_time, now - intake.last_info_time
    images_for = now - intake.first_image_time
    problem = model.backend.problem()
    if state != "active":
        level, summary = DiagnosticStatus.OK, f"{state}: frames are ignored and nothing is published"
    elif problem:
        level, summary = DiagnosticStatus.ERROR, f"backend cannot serve, frames are dropped: {problem}"
    elif c.frames_in == 0 or in_rate == 0.0:
        ago = f" for {since_image:.0f} s" if math.isfinite(since_image) else " yet"
        level, summary = DiagnosticStatus.WARN, f"no input images{ago}"
    elif fallback_fx == 0 and since_info > NO_INFO_AFTER_S and images_for > NO_INFO_AFTER_S:
        ago = f"for {since_info:.0f} s" if math.isfinite(since_info) else "at all"
        level, summary = DiagnosticStatus.WARN, (
            f"images arrive but no camera_info {ago}: frames are skipped (check the camera_info topic, "
            "or set fallback_fx)")
    elif now - last_error_time < RECENT_ERROR_S:
        level, summary = DiagnosticStatus.WARN, f"recent error: {last_error}"
    elif out_rate == 0.0:
        level, summary = DiagnosticStatus.WARN, "input arrives but no depth is published"
    else:
        level, summary = DiagnosticStatus.OK, f"publishing depth at {out_rate:.1f} Hz"
    backend = model.backend
    values = {
        "lifecycle_state": state,
        "camera": camera.name,
        "input_topic": intake.image_topic,
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
        "frames_waiting_for_camera_info": str(intake.waiting_for_info),
        "frames_ignored_inactive": str(c.ignored_inactive),
        "errors": str(c.errors),
        # a frame of this camera waits for or is in the worker
        "frames_pending": str(int(intake.waiting_for_info > 0 or questions.worker.slots.pending(intake.index))),
        "frames_on_reference": str(c.reference_frames),  # PyTorch stood in: no compiled size ready yet
        "frames_batched": str(c.batched),  # in one forward with another camera's frame (batch_cameras)
        "frames_failed_backend": str(c.backend_failed),  # dropped: the backend could not serve (Triton lost)
        "queries": str(q.queries),
        "query_errors": str(q.query_errors),
        "queries_busy": str(q.queries_busy),
        "queries_canceled": str(q.canceled),
        "goals_rejected": str(q.goals_rejected),
        "query_active": str(questions.gate.active).lower(),
        "queries_waiting": str(questions.gate.waiting),
        "questions_waited_for_depth": str(questions.gate.depth_turns),  # a frame went before the next question
        "backend": backend.describe(),
        "backend_fallback": backend.fallback_reason,
        "backend_problem": problem,
        "backend_choice": backend.choice_reason or f"{backend.name} (asked for)",
        "compiled_sizes_held": str(len(backend.held_sizes())),
        "max_compiled_sizes": str(backend.max_held_sizes()),  # the parameter, or the backend's default
        "compiled_size_after_frames": str(backend.size_persistence()),  # wanted this often before it is made
        "model": model.name,
        "last_error": last_error,
    }
    return DiagnosticStatus(
        level=level, name=status_name(node_name, camera.name), message=summary, hardware_id=model.name,
        values=[KeyValue(key=k, value=v) for k, v in values.items()],
    )


def diagnostic_array(node_name: str, cameras: list[Camera], model: Any, questions: QuestionInterface,
                     state: str, fallback_fx: float, stamp: Any) -> DiagnosticArray:
    """Every camera's status in one message (``stamp``: the node clock's now)."""
    msg = DiagnosticArray(status=[camera_status(node_name, camera, model, questions, state, fallback_fx)
                                  for camera in cameras])
    msg.header.stamp = stamp
    return msg
