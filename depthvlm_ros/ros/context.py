"""What the node's parts (intake, worker, outputs, questions, diagnostics) need of the node, in one object."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from depthvlm_ros.backends.base import DepthBackend
from depthvlm_ros.geometry import Intrinsics
from depthvlm_ros.pipeline.plan import CameraPlan, RouteSettings
from depthvlm_ros.ros.flow import LogBudget
from depthvlm_ros.ros.settings import ModelSettings, Settings

#: ``log(level, message, kind, budget)``: the node's throttled log ("error" or "warning"; ``kind`` a fixed code).
Log = Callable[[str, str, "str | None", "LogBudget | None"], None]


@dataclass(frozen=True)
class NodeContext:
    """The node as its parts see it.

    ``node`` makes their subscriptions, publishers, services, timers and logs; ``settings()`` is the
    current :class:`~depthvlm_ros.ros.settings.Settings` (immutable: read it once per frame or request);
    ``is_active()`` says whether frames are processed (rclpy's lifecycle state); ``log`` is the node's
    throttled log; ``ok()`` is False once the ROS context is shutting down.
    """

    node: Any
    settings: Callable[[], Settings]
    is_active: Callable[[], bool]
    log: Log
    ok: Callable[[], bool]


def model_route(m: ModelSettings) -> RouteSettings:
    """The node's model settings as the pipeline's route: canonical focal (pixels), fy matching, size caps."""
    return RouteSettings(canonical_fx=m.canonical_fx, match_fy=m.match_fy, max_side=m.max_side_px,
                         max_tokens=m.max_image_tokens)


class DepthModel(Protocol):
    """What the ROS layer uses of the model (a :class:`~depthvlm_ros.pipeline.DepthVLM`): its name, backend and
    lock, a camera's plan, a frame's depth, and answers. Tests may give the node any object that has these."""

    name: str
    lock: threading.RLock

    @property
    def backend(self) -> DepthBackend: ...

    @property
    def has_weights(self) -> bool: ...

    def require_weights(self, what: str) -> None: ...

    def plan(self, intrinsics: Intrinsics, route: RouteSettings = ..., exact: bool = ...) -> CameraPlan: ...

    def infer(self, plan: CameraPlan | Sequence[CameraPlan], images: Sequence[np.ndarray]) -> list[Any]: ...

    def infer_batch(self, frames: Sequence[tuple[CameraPlan, np.ndarray]]) -> list[Any]: ...

    def ask(self, rgb: np.ndarray, intrinsics: Intrinsics, question: str, max_new_tokens: int = ...,
            route: RouteSettings = ..., should_stop: Callable[[], bool] | None = ...,
            on_text: Callable[[str, int], None] | None = ...) -> Any: ...
