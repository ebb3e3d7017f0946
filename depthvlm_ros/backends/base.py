"""The one interface every depth backend implements, and how a backend is chosen.

A backend computes the depth path — pixels of one processed size + the fixed depth prompt ->
depth on the model grid (metres) — and nothing else: preprocessing (canonical-focal resize, the
image processor) and postprocessing (back to the camera grid) are shared, in
:mod:`depthvlm_ros.pipeline` (a camera's plan). Answers (``ask``) always run on PyTorch.

Implementations: ``torch`` (reference; any size), ``onnxruntime`` and ``tensorrt`` (compiled for
fixed sizes; one bounded cache of sessions/engines keyed by size, :class:`LoadedSizes`, each proven by
its probe when loaded:
:mod:`depthvlm_ros.backends.probe`), and ``triton`` (the sizes a Triton Inference Server serves,
over gRPC: :mod:`depthvlm_ros.backends.triton_backend`).
"""

from __future__ import annotations

import abc
import collections
import contextlib
import math
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Generic, TypeVar

import numpy as np

from depthvlm_ros.errors import SetupError

#: The depth graph's input and output names (ONNX exports, TensorRT engines, served Triton models).
INPUT_NAME, OUTPUT_NAME = "pixel_values", "depth"
#: Backend names, in the order ``backend_fallback`` tries them after the requested one.
BACKENDS = ("tensorrt", "onnxruntime", "torch")
#: The remote backend: never a fallback, and none falls back from it (a lost server is reported, and
#: frames wait for it, rather than silently computed by another path).
TRITON = "triton"

Stage = Callable[[str], AbstractContextManager[None]]
#: A model-grid size: (width, height) pixels.
Size = tuple[int, int]
Loaded = TypeVar("Loaded")


class BackendError(SetupError):
    """A backend that cannot run here or refuses its artefact (the message says how to fix it)."""


class SizeNotReadyError(BackendError):
    """A compiled backend holds no size for this input yet (one is being made in the background);
    the caller runs the reference (PyTorch) meanwhile."""


def nearest(sizes: list[tuple[int, int]], width: int, height: int) -> tuple[int, int]:
    """Of ``sizes`` (non-empty), the one closest to ``width`` x ``height`` in aspect ratio, then in area."""
    if (width, height) in sizes:
        return width, height
    aspect, area = width / height, width * height
    return min(sizes, key=lambda s: (round(abs(np.log((s[0] / s[1]) / aspect)), 3), abs(s[0] * s[1] - area)))


class LoadedSizes(Generic[Loaded]):
    """What a compiled backend holds, keyed by model-grid size (ONNX Runtime sessions, TensorRT engines): at
    most ``max_sizes``, the least recently used first to go. A size used within ``idle_before_replaced_s``
    is never replaced by a size made in the background (:meth:`has_room`).

    Not thread-safe: the owning backend calls it with its own lock held (the TensorRT backend is used
    from one thread).
    """

    def __init__(self, max_sizes: int, idle_before_replaced_s: float = math.inf) -> None:
        if max_sizes < 1:
            raise BackendError(f"max_sizes must be at least 1, got {max_sizes}")
        self.max_sizes = max_sizes
        self.idle_before_replaced_s = idle_before_replaced_s
        self._held: collections.OrderedDict[Size, Loaded] = collections.OrderedDict()  # least recently used first
        self._used: dict[Size, float] = {}  # size -> time.monotonic() of its last use

    def __contains__(self, size: object) -> bool:
        return size in self._held

    def __len__(self) -> int:
        return len(self._held)

    def sizes(self) -> list[Size]:
        """The held sizes, sorted."""
        return sorted(self._held)

    def values(self) -> list[Loaded]:
        """What is held, least recently used first."""
        return list(self._held.values())

    def get(self, size: Size) -> Loaded | None:
        """What is held for ``size`` (marked as just used), or None."""
        if size not in self._held:
            return None
        self.touch(size)
        return self._held[size]

    def touch(self, size: Size) -> None:
        """Mark a held size as just used: the last to be evicted."""
        self._held.move_to_end(size)
        self._used[size] = time.monotonic()

    def has_room(self) -> bool:
        """A free place, or a held size unused for ``idle_before_replaced_s``."""
        if len(self._held) < self.max_sizes:
            return True
        oldest = next(iter(self._held))
        return time.monotonic() - self._used.get(oldest, 0.0) >= self.idle_before_replaced_s

    def hold(self, size: Size, loaded: Loaded) -> list[Size]:
        """Hold ``loaded`` for ``size`` (as just used); returns the sizes evicted to make room."""
        self._held[size] = loaded
        self.touch(size)
        evicted = []
        while len(self._held) > self.max_sizes:
            old, _ = self._held.popitem(last=False)
            self._used.pop(old, None)
            evicted.append(old)
        return evicted

    def clear(self) -> None:
        """Drop everything held."""
        self._held.clear()
        self._used.clear()


@contextlib.contextmanager
def _no_stage(_name: str) -> Iterator[None]:
    yield


class DepthBackend(abc.ABC):
    """Depth on the model grid from processed pixels of one size."""

    #: Short name: torch, onnxruntime, tensorrt.
    name: str = ""
    #: Why this backend serves instead of the one asked for ("" when it is the one asked for).
    fallback_reason: str = ""
    #: How this backend was chosen (``auto``'s reason, or "NAME (asked for)").
    choice_reason: str = ""
    #: The depth is computed elsewhere (a server): its calls wait on a network, so callers never hold the
    #: model's lock across them (questions keep the local model meanwhile).
    remote: bool = False

    @abc.abstractmethod
    def sizes(self) -> list[tuple[int, int]] | None:
        """Model-grid sizes (width, height) this backend can run, or None for any size."""

    @abc.abstractmethod
    def depth(self, inputs: object, stage: Stage = _no_stage) -> np.ndarray:
        """(B, H, W) float32 metres for a :class:`ModelInputs` batch of one size.

        ``stage(name)`` is a context manager the caller uses to time stages; backends that can
        separate vision / llm / head time them, compiled ones report one ``model`` stage.
        """

    def input_device(self) -> str:
        """Where this backend wants its ``pixel_values`` (a torch device string): preprocessing runs there."""
        return "cpu"

    def describe(self) -> str:
        """One line for logs and diagnostics."""
        return self.name

    def nearest_size(self, width: int, height: int) -> tuple[int, int]:
        """The size this backend runs that is closest in aspect ratio, then in area."""
        sizes = self.sizes()
        if sizes is None:
            return width, height
        if not sizes:
            raise BackendError(f"{self.name}: no compiled sizes available")
        return nearest(sizes, width, height)

    def problem(self) -> str:
        """Why this backend cannot serve right now ("" when it can): a remote server unreachable, or
        refused. Shown as the node's diagnostics ERROR; frames meanwhile fail with BackendError."""
        return ""

    def precision(self) -> str:
        """What the depth path computes in: fp32, fp16, bf16 ("+"-joined when artifacts differ)."""
        return "fp32"

    def held_sizes(self) -> list[tuple[int, int]]:
        """Compiled sizes loaded right now (sessions, engines); empty for backends that compile nothing."""
        return []

    def max_held_sizes(self) -> int:
        """The most compiled sizes held at once; 0 for backends that compile nothing."""
        return 0

    def size_persistence(self) -> int:
        """Frames a size must be wanted in (of the last few) before it is made; 0: sizes are not made here."""
        return 0

    def close(self) -> None:  # noqa: B027 (most backends hold nothing to stop)
        """Stop background work and free what the backend holds (it is not used afterwards)."""
