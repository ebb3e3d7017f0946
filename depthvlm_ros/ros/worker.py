"""The inference worker: one thread, one model, the cameras in turn (or together).

It takes the next camera's latest frame (:class:`~depthvlm_ros.ros.flow.LatestSlots`, round robin),
decodes it, runs the camera's plan (made once per camera, size and settings) through the model and
hands the depth to that camera's outputs. With ``batch_cameras`` it takes every camera's waiting frame
at once and the frames whose plans share a model-grid size go through the model in one forward
(``DepthVLM.infer_batch``); each camera keeps its own stamps, outputs and counters. Questions share the
model through its lock and the question gate, which gives the depth stream a turn between two questions.
"""

from __future__ import annotations

import functools
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from depthvlm_ros.backends.base import BackendError
from depthvlm_ros.errors import InputError
from depthvlm_ros.ros.context import DepthModel, NodeContext, model_route
from depthvlm_ros.ros.flow import LatestSlots, QuestionGate
from depthvlm_ros.ros.intake import CameraIntake, Decoded, Frame, decode
from depthvlm_ros.ros.outputs import DepthOutputs
from depthvlm_ros.ros.params import depth_scale_for
from depthvlm_ros.ros.settings import Settings

Step = TypeVar("Step")
#: Model stages that are the model's forward (the rest of a frame's time is the node's overhead).
FORWARD_STAGES = ("vision", "llm", "head", "model")


@dataclass
class Camera:
    """One camera of the node: its intake, its outputs and the latest frame the worker decoded."""

    name: str  # "" for the plain topic names
    intake: CameraIntake
    outputs: DepthOutputs
    latest: Decoded | None = None


class InferenceWorker:
    """The thread that turns frames into published depth (see the module docstring)."""

    def __init__(self, ctx: NodeContext, model: DepthModel, cameras: list[Camera], slots: LatestSlots[Frame],
                 gate: QuestionGate) -> None:
        self.model, self.cameras, self.slots, self.gate = model, cameras, slots, gate
        self._settings, self._is_active, self._context_ok = ctx.settings, ctx.is_active, ctx.ok
        #: Set when a new frame was decoded (questions wait on it for their first frame).
        self.frame_ready = threading.Condition()
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="depthvlm-inference", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while self._running:
            try:
                self.next_frame()
            except Exception:  # never let the worker die: the node would look alive and publish nothing
                traceback.print_exc()

    def next_frame(self) -> None:
        """Take the next camera's latest frame (with ``batch_cameras``, every camera's waiting frame; waiting at
        most 0.5 s) and process it; errors are counted and logged on their camera."""
        if self._settings().worker.batch_cameras:
            taken = self.slots.take_all(timeout=0.5)
        else:
            taken = [one] if (one := self.slots.take(timeout=0.5)) is not None else []
        if not taken:
            self.gate.depth_served()  # nothing to do: a depth turn owed to a dropped frame is over
            return
        try:
            if not self._running or not self._is_active() or not self._context_ok():
                return  # deactivated or shutting down: nothing may be published
            s = self._settings()
            rate, ready = s.worker.max_rate_hz, []
            for index, frame in taken:
                camera = self.cameras[index]
                if rate > 0 and time.monotonic() - camera.intake.last_inference < 1.0 / rate:
                    camera.intake.count("skipped_rate")
                else:
                    ready.append((camera, frame))
            self.process_frames(ready, s)
        finally:
            self.slots.done()
            self.gate.depth_served()

    def _counted(self, cameras: Sequence[Camera], step: Callable[[], Step]) -> Step | None:
        """``step()``, or None when it raised: the error is counted and recorded on each of ``cameras``."""
        try:
            return step()
        except BackendError as exc:  # the frame is dropped and counted; the backend says why in problem()
            for camera in cameras:
                camera.intake.count("backend_failed")
                camera.intake.record_error(str(exc), "backend")
        except InputError as exc:
            for camera in cameras:
                camera.intake.record_error(str(exc), exc.kind)
        except Exception as exc:  # a model or backend failure must not kill the stream
            if self._running and self._context_ok():  # else a publish that raced with a stop: not the input's
                for camera in cameras:
                    camera.intake.record_error(f"{exc.__class__.__name__}: {exc}", exc.__class__.__name__)
        return None

    def process(self, camera: Camera, frame: Frame, s: Settings) -> None:
        """One frame's way: decode, the camera's plan (made once), infer, publish."""
        self.process_frames([(camera, frame)], s)

    def process_frames(self, frames: Sequence[tuple[Camera, Frame]], s: Settings) -> None:
        """Frames of different cameras: each decoded and planned, all through the model at once (one forward per
        model-grid size), each published by its camera; a frame's error is counted on its camera (the model's on
        every camera of the call)."""
        start = time.perf_counter()
        prepared = []
        for camera, frame in frames:
            got = self._counted([camera], functools.partial(self._prepare, camera, frame, s))
            if got is not None:
                prepared.append((camera, frame, *got))
        if not prepared:
            return
        results = self._counted([p[0] for p in prepared], functools.partial(
            self.model.infer_batch, [(plan, decoded.rgb) for _, _, decoded, plan in prepared]))
        keys = [plan.batch_key for *_, plan in prepared]
        for (camera, frame, decoded, plan), result in zip(prepared, results or []):
            if keys.count(plan.batch_key) > 1:  # it shared its forward with another camera's frame
                with camera.intake.lock:
                    camera.intake.counters.batched += 1
            self._counted([camera], functools.partial(self._publish, camera, frame, decoded, result, s, start))

    def _prepare(self, camera: Camera, frame: Frame, s: Settings) -> tuple[Decoded, Any]:
        """Decode the frame (the camera's latest, for questions) and find its camera's plan."""
        camera.intake.last_inference = time.monotonic()
        decoded = decode(frame, s.intake.fallback_fx)
        with self.frame_ready:
            camera.latest = decoded
            self.frame_ready.notify_all()
        # exact=False: torch's resize, within 2 grey levels of PIL's (model/preprocess.py)
        return decoded, self.model.plan(decoded.intrinsics, model_route(s.model), exact=False)

    def _publish(self, camera: Camera, frame: Frame, decoded: Decoded, result: Any, s: Settings,
                 start: float) -> None:
        """The frame's depth to its camera's outputs, and its counters (``start``: when its call began)."""
        intake = camera.intake
        if s.outputs.output_grid == "camera":
            depth, k = result.depth, result.intrinsics
        else:
            depth, k = result.depth_model, result.intrinsics_model
        scale = depth_scale_for(camera.name, s.outputs.depth_scale, s.outputs.camera_depth_scales, s.intake.cameras)
        if scale != 1.0:
            depth = depth * np.float32(scale)
        camera.outputs.publish(decoded, depth, k, s.outputs)
        end = time.perf_counter()
        forward = sum(ms for name, ms in result.timings_ms.items() if name in FORWARD_STAGES)
        total = (end - start) * 1000.0
        intake.latency.add((time.monotonic() - frame.received) * 1000.0)
        intake.overhead.add(total - forward)
        intake.ros_overhead.add(total - sum(result.timings_ms.values()))
        intake.forward.add(forward)
        intake.inference_rate.tick()
        with intake.lock:
            intake.counters.processed += 1
            intake.counters.reference_frames += int(result.backend != self.model.backend.name)

    def wait_for_frame(self, camera: Camera, timeout_s: float,
                       should_stop: Callable[[], bool] = lambda: False) -> Decoded | None:
        """The camera's latest decoded frame, waiting up to ``timeout_s`` for a first one (less when
        ``should_stop()``: it is looked at every 0.1 s)."""
        deadline = time.monotonic() + timeout_s
        with self.frame_ready:
            while camera.latest is None and self._running and not should_stop():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.frame_ready.wait(min(left, 0.1))
            return camera.latest

    def wait_idle(self, timeout_s: float) -> bool:
        """Forget the frames waiting and wait until the one in the worker is done; False on timeout."""
        self.slots.clear()
        return self.slots.wait_idle(timeout_s)

    def stop(self, timeout_s: float = 5.0) -> None:
        """End the thread (the frame in progress finishes first)."""
        self._running = False
        self.slots.close()
        with self.frame_ready:
            self.frame_ready.notify_all()
        self._thread.join(timeout=timeout_s)
