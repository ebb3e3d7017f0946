"""Frame flow of the node, without ROS: stamp pairing, the latest-frame-wins slot, the question gate,
per-kind log throttling, rates and latencies.

Everything here is bounded: the pairing keeps a few images and camera_infos, the slots hold one
frame per camera, the gate admits one question and a fixed number waiting, the throttle remembers a fixed number
of kinds, and the meters keep fixed-size windows, so no input rate can make the node grow.
"""

from __future__ import annotations

import math
import re
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
        if self._infos and stamp < self._infos[-1][0]:
            # Time went backwards (a camera restarted with an earlier clock, a bag looped): the old
            # infos would make every new image look too old to pair, so forget them.
            self._infos.clear()
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

    @property
    def pending(self) -> int:
        """Images waiting for their camera_info."""
        return len(self._images)

    def flush(self) -> list[tuple[T, None]]:
        """The images still waiting, decided unpaired (the stream ended: no camera_info will come)."""
        decided: list[tuple[T, None]] = [(image, None) for _, image in self._images]
        self._images.clear()
        return decided

    def clear(self) -> None:
        self._images.clear()
        self._infos.clear()


class LatestSlots(Generic[T]):
    """One latest-wins slot per camera and one worker that serves the cameras in turn.

    ``put(camera, item)`` replaces what the worker has not taken yet from that camera (counted as
    dropped). ``take`` returns the next camera's item after the one served last (round robin), so a
    fast camera cannot starve a slow one; ``take_all`` returns every camera's waiting item at once (in
    that order; the worker batches them). The worker calls :meth:`done` when it finished what it took;
    :meth:`pending` is True from ``put`` until then, so others can tell whether a frame is waiting for
    (or in) the worker.
    """

    def __init__(self, cameras: int = 1) -> None:
        self._items: list[T | None] = [None] * cameras
        self._taken: set[int] = set()  # the cameras whose items are in the worker
        self._next = 0
        self._cond = threading.Condition()
        self._closed = False
        self.dropped = [0] * cameras

    def put(self, camera: int, item: T) -> bool:
        """Store ``item`` for ``camera``; True when it replaced an untaken one (a dropped frame)."""
        with self._cond:
            replaced = self._items[camera] is not None
            self.dropped[camera] += int(replaced)
            self._items[camera] = item
            self._cond.notify_all()
            return replaced

    def pending(self, camera: int | None = None) -> bool:
        """True while an item (of ``camera``, or of any) waits to be taken or is in the worker."""
        with self._cond:
            if camera is None:
                return bool(self._taken) or any(item is not None for item in self._items)
            return self._items[camera] is not None or camera in self._taken

    def take(self, timeout: float | None = None) -> tuple[int, T] | None:
        """``(camera, item)``: the next waiting item in turn (its slot emptied), or None after ``timeout``
        seconds or when closed."""
        taken = self._take(timeout, every=False)
        return taken[0] if taken else None

    def take_all(self, timeout: float | None = None) -> list[tuple[int, T]]:
        """Every waiting ``(camera, item)``, in turn from the next camera (their slots emptied); none after
        ``timeout`` seconds or when closed."""
        return self._take(timeout, every=True)

    def _take(self, timeout: float | None, every: bool) -> list[tuple[int, T]]:
        with self._cond:
            if not any(item is not None for item in self._items) and not self._closed:
                self._cond.wait(timeout)
            n, taken = len(self._items), []
            for step in range(n):
                camera = (self._next + step) % n
                item = self._items[camera]
                if item is not None:
                    self._items[camera] = None
                    taken.append((camera, item))
                    if not every:
                        break
            if taken:
                self._taken, self._next = {camera for camera, _ in taken}, (taken[-1][0] + 1) % n
            return taken

    def done(self) -> None:
        """The worker finished the item it took."""
        with self._cond:
            self._taken = set()
            self._cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Until the worker holds no item (call :meth:`clear` first); False after ``timeout`` seconds."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._taken, timeout)

    def clear(self) -> int:
        """Forget every waiting item (the node was deactivated); how many there were."""
        with self._cond:
            waiting = sum(item is not None for item in self._items)
            self._items = [None] * len(self._items)
            return waiting

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class QuestionGate:
    """Admission for questions that share one model with the depth stream.

    One question runs at a time; at most ``max_waiting`` wait for their turn (first come, first
    served); any more are refused at once ("busy"). When a question ends while a depth frame is
    waiting for the model (``depth_waiting()``), the next question waits until the depth stream has
    had the model for one frame (:meth:`depth_served`), so a stream of questions cannot starve depth.
    Every wait has a timeout; :meth:`close` (shutdown) ends every wait at once.
    """

    def __init__(self, max_waiting: int = 1, depth_waiting: Callable[[], bool] = lambda: False) -> None:
        self.max_waiting = max_waiting
        self._depth_waiting = depth_waiting
        self._cond = threading.Condition()
        self._active = False
        self._depth_owed = False
        self._served = 0  # frames the depth stream finished (or found none to do)
        self._queue: deque[int] = deque()
        self._tickets = 0
        self._closed = False
        #: Times a question waited for the depth stream's frame before its turn.
        self.depth_turns = 0

    def enter(self, timeout_s: float, should_stop: Callable[[], bool] = lambda: False) -> str | None:
        """Wait for this question's turn: None when admitted (then call :meth:`leave`), else why not.
        ``should_stop`` (a cancel) is looked at every 0.1 s while waiting."""
        with self._cond:
            if self._closed:
                return "busy: the node is shutting down"
            refused = self._busy()
            if refused is not None:
                return refused
            self._tickets += 1
            ticket = self._tickets
            self._queue.append(ticket)
            deadline = time.monotonic() + timeout_s
            stopped = admitted = False
            while not admitted and not stopped and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                admitted = self._cond.wait_for(
                    lambda: self._closed or (self._queue[0] == ticket and not self._active and not self._depth_owed),
                    timeout=min(left, 0.1))
                stopped = not admitted and should_stop()
            self._queue.remove(ticket)
            self._cond.notify_all()
            if self._closed:
                return "busy: the node is shutting down"
            if stopped:
                return "stopped while waiting for its turn"
            if not admitted:
                return f"busy: no turn within {timeout_s:g} s (another question is being answered)"
            self._active = True
            return None

    def would_refuse(self) -> str | None:
        """Why :meth:`enter` would refuse a question now ("busy: ..."), or None (an action goal is rejected
        with it before it is accepted; the answer itself still goes through :meth:`enter`)."""
        with self._cond:
            if self._closed:
                return "busy: the node is shutting down"
            return self._busy()

    def _busy(self) -> str | None:
        """Why a new question would be refused now (called with the lock held)."""
        busy = self._active or self._depth_owed or bool(self._queue)
        if busy and len(self._queue) >= self.max_waiting:
            ahead = int(self._active) + len(self._queue)
            return f"busy: {ahead} question(s) ahead and at most {self.max_waiting} may wait; ask again later"
        return None

    def leave(self) -> None:
        """The admitted question is done; depth gets a frame first if one is waiting."""
        with self._cond:
            served = self._served
        depth_waiting = self._depth_waiting()  # outside the lock: it takes the frame slot's lock
        with self._cond:
            self._active = False
            # owed only if no frame was served since: the waiting one may have finished meanwhile
            self._depth_owed = depth_waiting and self._served == served
            self._cond.notify_all()

    def depth_served(self) -> None:
        """The depth stream finished a frame (or found none to do): waiting questions may go."""
        with self._cond:
            self._served += 1
            if self._depth_owed:
                self._depth_owed = False
                self.depth_turns += int(bool(self._queue))
                self._cond.notify_all()

    def close(self) -> None:
        """Refuse new questions and end every wait (shutdown)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def active(self) -> bool:
        return self._active

    @property
    def waiting(self) -> int:
        return len(self._queue)


class SequenceGaps:
    """Messages a publisher sent that never reached us: gaps in its publication sequence numbers.

    ``seen(publisher, seq)`` returns how many messages of that publisher were skipped since the last
    one seen (lost in transport, or replaced in the subscription's history before they were taken).
    A gap shows only when a later message arrives. At most ``max_publishers`` are remembered.
    """

    def __init__(self, max_publishers: int = 16) -> None:
        self.max_publishers = max_publishers
        self._last: dict[object, int] = {}

    def seen(self, publisher: object, seq: int | None) -> int:
        if seq is None:  # the middleware does not number messages
            return 0
        last = self._last.pop(publisher, None)
        self._last[publisher] = seq
        while len(self._last) > self.max_publishers:
            self._last.pop(next(iter(self._last)))
        return max(0, seq - last - 1) if last is not None and seq > last else 0


#: Numbers in a message (so "step 959 < width 320" and "step 10 < width 12" are one kind of error).
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|\bnan\b|\binf\b", re.IGNORECASE)


#: Longest error text kept for diagnostics and logs (the untrusted parts are cut shorter where they are
#: quoted: errors.shown); a last guard, so no input makes a line long.
MAX_ERROR_CHARS = 300


def error_kind(message: str) -> str:
    """The kind of an error message that has no fixed code: its first words with numbers blanked out.

    Errors about input carry a fixed ``kind`` (:class:`~depthvlm_ros.errors.InputError`); this is for the
    rest (an exception's text), cut before a quote so that nothing an input wrote becomes part of the key.
    """
    head = re.split(r"['\"(]", message, maxsplit=1)[0]
    return _NUMBER.sub("#", head)[:80]


class LogBudget:
    """At most ``lines`` log lines per ``period_s`` seconds (a token bucket), for one source (a camera, the
    questions): however many kinds of bad input arrive, one source cannot flood the log. Lines over the
    budget are counted; the next line allowed says how many were left out."""

    def __init__(self, lines: int = 12, period_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.lines, self.period_s, self._clock = lines, period_s, clock
        self._tokens = float(lines)
        self._last = clock()
        self.suppressed = 0
        self._lock = threading.Lock()

    def take(self) -> tuple[bool, int]:
        """(allowed, lines suppressed since the last allowed one)."""
        now = self._clock()
        with self._lock:
            self._tokens = min(float(self.lines), self._tokens + (now - self._last) * self.lines / self.period_s)
            self._last = now
            if self._tokens < 1.0:
                self.suppressed += 1
                return False, 0
            self._tokens -= 1.0
            left_out, self.suppressed = self.suppressed, 0
            return True, left_out


class KindThrottle:
    """Allows one event per kind per ``period_s`` seconds, each kind on its own clock.

    rclpy's ``throttle_duration_sec`` throttles per call site, so one kind of bad input would
    silence every other kind logged from the same line; this keeps a clock per kind instead. At most
    ``max_kinds`` kinds are remembered (the least recently seen is forgotten first).
    """

    def __init__(self, period_s: float = 5.0, max_kinds: int = 64, clock: Callable[[], float] = time.monotonic) -> None:
        self.period_s = period_s
        self.max_kinds = max_kinds
        self._clock = clock
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def allow(self, kind: str) -> bool:
        now = self._clock()
        with self._lock:
            last = self._last.pop(kind, None)
            allowed = last is None or now - last >= self.period_s
            if allowed or last is None:
                last = now
            self._last[kind] = last  # re-inserted: most recently seen last
            while len(self._last) > self.max_kinds:
                self._last.pop(next(iter(self._last)))
            return allowed


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
    """A :class:`LatencyWindow`'s summary: the number of samples, their 50th, 90th and 99th percentiles and their
    maximum (milliseconds; NaN when there are no samples)."""

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
