"""Frame flow of the node, without ROS: stamp pairing, the latest-frame-wins slot, rates and latencies.

Everything here is bounded: the pairing keeps a few images and camera_infos, the slot holds one
frame, and the meters keep fixed-size windows, so no input rate can make the node grow.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

T = TypeVar("T")
I = TypeVar("I")  # noqa: E741  (info type)


class StampSync(Generic[T, I]):
    """Pairs images with camera_infos by header stamp (nanoseconds): exact, or within ``tolerance_ns``.

    ``push_image`` / ``push_info`` return the images that are now decided: ``(image, info)`` when
    paired, ``(image, None)`` when no camera_info can pair with it any more (a newer info beyond the
    tolerance arrived, or the image fell out of the bounded pending queue). Camera drivers publish
    both with the same stamp, usually the image first or the info first by a few microseconds;
    both orders pair.
    """

    def __init__(self, tolerance_ns: int = 0, max_pending_images: int = 4, max_infos: int = 16) -> None:
        self.tolerance_ns = int(tolerance_ns)
        self._images: deque[tuple[int, T]] = deque()
        self._max_images = max_pending_images
        self._infos: deque[tuple[int, I]] = deque(maxlen=max_infos)

    def _match(self, stamp: int) -> I | None:
        best, best_dt = None, None
        for info_stamp, info in reversed(self._infos):  # on ties the newest wins (a restarted camera)
            dt = abs(info_stamp - stamp)
            if dt <= self.tolerance_ns and (best_dt is None or dt < best_dt):
                best, best_dt = info, dt
        return best

    def push_image(self, stamp: int, image: T) -> list[tuple[T, I | None]]:
        info = self._match(stamp)
        if info is not None:
            return [(image, info)]
        if self._infos and self._infos[-1][0] > stamp + self.tolerance_ns:
            return [(image, None)]  # infos arrive in stamp order: none will match this one any more
        self._images.append((stamp, image))
        decided: list[tuple[T, I | None]] = []
        while len(self._images) > self._max_images:
            decided.append((self._images.popleft()[1], None))
        return decided

    def push_info(self, stamp: int, info: I) -> list[tuple[T, I | None]]:
        self._infos.append((stamp, info))
        decided: list[tuple[T, I | None]] = []
        keep: deque[tuple[int, T]] = deque()
        for image_stamp, image in self._images:
            if abs(image_stamp - stamp) <= self.tolerance_ns:
                decided.append((image, info))
            elif image_stamp + self.tolerance_ns < stamp:
                decided.append((image, None))
            else:
                keep.append((image_stamp, image))
        self._images = keep
        return decided

    def clear(self) -> None:
        self._images.clear()
        self._infos.clear()


class LatestSlot(Generic[T]):
    """A one-item hand-off: ``put`` replaces what the worker has not taken yet (counted as dropped)."""

    def __init__(self) -> None:
        self._item: T | None = None
        self._cond = threading.Condition()
        self._closed = False
        self.dropped = 0

    def put(self, item: T) -> bool:
        """Store ``item``; True when it replaced an untaken one (a dropped frame)."""
        with self._cond:
            replaced = self._item is not None
            self.dropped += int(replaced)
            self._item = item
            self._cond.notify()
            return replaced

    def take(self, timeout: float | None = None) -> T | None:
        """The latest item (and empty the slot), or None after ``timeout`` seconds or when closed."""
        with self._cond:
            if self._item is None and not self._closed:
                self._cond.wait(timeout)
            item, self._item = self._item, None
            return item

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class RateMeter:
    """Events per second over the last ``window_s`` seconds (at most ``max_events`` remembered)."""

    def __init__(self, window_s: float = 5.0, max_events: int = 2048,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self._times: deque[float] = deque(maxlen=max_events)
        self._clock = clock
        self.total = 0

    def tick(self) -> None:
        self._times.append(self._clock())
        self.total += 1

    def rate(self) -> float:
        now = self._clock()
        while self._times and now - self._times[0] > self.window_s:
            self._times.popleft()
        if len(self._times) < 2:
            return 0.0
        span = max(now - self._times[0], self._times[-1] - self._times[0])
        return (len(self._times) - 1) / span if span > 0 else 0.0


@dataclass
class Percentiles:
    n: int
    p50: float
    p90: float
    p99: float
    max: float


class LatencyWindow:
    """The last ``size`` samples (milliseconds) and their percentiles."""

    def __init__(self, size: int = 512) -> None:
        self._samples: deque[float] = deque(maxlen=size)

    def add(self, ms: float) -> None:
        if math.isfinite(ms):
            self._samples.append(ms)

    def percentiles(self) -> Percentiles:
        if not self._samples:
            return Percentiles(0, math.nan, math.nan, math.nan, math.nan)
        a = np.fromiter(self._samples, dtype=np.float64)
        p50, p90, p99 = np.percentile(a, [50, 90, 99])
        return Percentiles(a.size, float(p50), float(p90), float(p99), float(a.max()))
