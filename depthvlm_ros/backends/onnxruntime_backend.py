"""ONNX Runtime backend: exported depth graphs on CPU or CUDA, a bounded set of sessions keyed by size."""

from __future__ import annotations

import collections
import ctypes
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from depthvlm_ros.backends.base import (
    BackendError,
    DepthBackend,
    LoadedSizes,
    SizeNotReadyError,
    Stage,
    _no_stage,
    nearest,
)
from depthvlm_ros.backends.onnx_export import INPUT_NAME, export_size, read_metadata
from depthvlm_ros.backends.probe import prove_artifact

#: Sessions held at once by default (sizes a camera set needs; each holds its own weights).
DEFAULT_SESSIONS = 4
PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}
#: Sizes whose making failed, remembered so they are not tried on every frame (bounded), for this long.
MAX_FAILED = 64
FAILED_RETRY_S = 600.0
#: Provider options: fp32 graphs compute in fp32 on CUDA too (TF32 is on by default on Ampere and newer,
#: and its ~3e-3 relative error would fail the fp32 probe).
PROVIDER_OPTIONS = {"CUDAExecutionProvider": {"use_tf32": "0"}}
#: In the background, a full set of held sizes makes room for a newly wanted size only by replacing
#: one unused for this long: sizes in use are never swapped out, so cameras of more sizes than can be
#: held never make the worker load sessions over and over.
IDLE_BEFORE_REPLACED_S = 30.0
#: In the background, a size not held is made only once it was wanted in this many of the last
#: PERSIST_WINDOW frames: a camera_info that changes every frame (a new fx each time) makes nothing, a
#: camera that settles on a size (or two cameras taking turns) gets it after a few frames.
PERSIST_FRAMES = 5
PERSIST_WINDOW = 16

Size = tuple[int, int]
#: ``exporter(width, height, replace) -> path``: an exported graph of that model-grid size (from a cache,
#: or made now); ``replace=True`` makes it again even when a cached file exists.
Exporter = Callable[[int, int, bool], Path]


class OrtInput(Protocol):
    """One input of an ONNX Runtime session (an ``onnxruntime.NodeArg``), as read here."""

    @property
    def shape(self) -> list[Any]: ...

    @property
    def type(self) -> str: ...


class OrtSession(Protocol):
    """An ``onnxruntime.InferenceSession`` (an optional dependency), as used here."""

    def get_inputs(self) -> list[OrtInput]: ...

    def run(self, output_names: list[str] | None, input_feed: dict[str, np.ndarray]) -> list[Any]: ...


class OnnxRuntimeBackend(DepthBackend):
    """Sessions for exported graphs keyed by model-grid size; at most ``max_sizes`` are held (least
    recently used goes first).

    Where graphs come from:

    - ``onnx_paths``: graphs given at start, a fixed set (more than ``max_sizes`` is refused);
    - ``exporter``: makes a missing size (export, or the on-disk cache). In the foreground (the
      tools) the call that needs a size waits for it. In the background (``background=True``, the
      node), :meth:`nearest_size` asks a worker thread for the size and answers with the nearest size
      already held meanwhile (:class:`SizeNotReadyError` while none is held: the caller runs PyTorch), so
      an export never runs on the frame path. A size is asked for only once it was wanted in
      ``persist_frames`` of the last :data:`PERSIST_WINDOW` frames (camera_infos that keep changing start
      no exports). The worker makes one size at a time; a newer request replaces an older one still
      waiting; a size that failed is not tried again. Once ``max_sizes`` are held, a new size is made
      only to replace one unused for ``idle_before_replaced_s``.

    Every graph proves its output before it serves: its probe runs when its session is made, and a
    graph whose output is NaN/Inf or off its PyTorch reference is refused with the re-export command.
    """

    name = "onnxruntime"

    def __init__(
        self,
        onnx_paths: Sequence[str | Path] = (),
        providers: Sequence[str] | None = None,
        device: str = "cpu",
        expected_fingerprint: str | None = None,
        exporter: Exporter | None = None,
        threads: int | None = None,
        max_sizes: int = DEFAULT_SESSIONS,
        background: bool = False,
        verify: bool = True,
        log: Callable[[str], None] = print,
        idle_before_replaced_s: float = IDLE_BEFORE_REPLACED_S,
        persist_frames: int = PERSIST_FRAMES,
    ) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendError("onnxruntime is not installed (pip install onnxruntime or onnxruntime-gpu)") from None
        self._ort = ort
        requested = list(providers) if providers else PROVIDERS.get(device.split(":")[0], PROVIDERS["cpu"])
        available = set(ort.get_available_providers())
        if requested[0] not in available:
            have = ", ".join(sorted(available))
            raise BackendError(f"onnxruntime has no {requested[0]} here (available: {have})")
        if len(onnx_paths) > max_sizes:
            raise BackendError(f"{len(onnx_paths)} ONNX graphs given; at most {max_sizes} are held "
                               "(raise max_compiled_sizes)")
        if background and exporter is None:
            raise BackendError("background needs an exporter")
        self.providers = [p for p in requested if p in available]
        self.expected_fingerprint = expected_fingerprint
        self.exporter = exporter
        self.threads = threads or len(os.sched_getaffinity(0))
        self.max_sizes = max_sizes
        self.background = background
        self.verify = verify
        self.log = log
        self.idle_before_replaced_s = idle_before_replaced_s
        self.persist_frames = max(1, min(int(persist_frames), PERSIST_WINDOW))
        self._recent: collections.deque[Size] = collections.deque(maxlen=PERSIST_WINDOW)  # sizes wanted, newest last
        self.vision_patch = 16  # pixels per vision patch (Qwen3-VL); read from each export's metadata
        self._given: dict[Size, Path] = {}
        self._dtypes = {"fp32"} if exporter is not None else set()  # on-demand exports are fp32
        self._sessions: LoadedSizes[OrtSession] = LoadedSizes(max_sizes, idle_before_replaced_s)
        self._failed: collections.OrderedDict[Size, float] = collections.OrderedDict()  # -> time.monotonic()
        self._lock = threading.Condition()
        self._wanted: Size | None = None
        self._making: Size | None = None
        self._closed = False
        for path in onnx_paths:
            self.add(path)
        if background:
            threading.Thread(target=self._make_loop, name="depthvlm-onnx-sizes", daemon=True).start()

    # -- loading ------------------------------------------------------------------------------

    def load(self, path: str | Path) -> tuple[Size, OrtSession]:
        """Open an exported graph: check its metadata and model, make its session, run its probe."""
        path = Path(path)
        if not path.is_file():
            raise BackendError(f"{path}: no such ONNX file (make one with: depthvlm export --size WxH)")
        meta = read_metadata(path)
        size = export_size(meta, path)
        fingerprint = meta.get("depthvlm.model_fingerprint", "")
        rebuild = f"re-export it: depthvlm export --model DIR --size {size[0]}x{size[1]} --out {path}"
        if self.expected_fingerprint and fingerprint != self.expected_fingerprint:
            raise BackendError(
                f"{path} was exported from other weights (model {fingerprint or 'unknown'}, this model "
                f"{self.expected_fingerprint}); {rebuild}"
            )
        self.vision_patch = int(meta.get("depthvlm.vision_patch", self.vision_patch))
        self._dtypes.add(meta.get("depthvlm.dtype", "fp32"))
        session = self._new_session(path)
        if self.verify:
            prove_artifact(path, session.get_inputs()[0].shape,
                           lambda pixels: self._run(session, pixels, [len(pixels)]), meta.get("depthvlm.dtype", "fp32"),
                           rebuild)
        return size, session

    def add(self, path: str | Path) -> Size:
        """Load a graph (see :meth:`load`) and hold it; refuses other weights and failed probes."""
        size, session = self.load(path)
        self._given[size] = Path(path)
        self._hold(size, session)
        return size

    def _new_session(self, path: Path) -> OrtSession:
        options = self._ort.SessionOptions()
        options.graph_optimization_level = self._ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = self.threads
        options.log_severity_level = 3
        # No busy-waiting between runs: spinning workers would steal the cores from the rest of the
        # process (ROS callbacks, postprocessing, the torch model answering questions).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # No CPU memory arena: a held session then costs its weights, not the peak activations of its
        # last run kept forever (~20 MB per session for the tiny models at 320 px; same speed, measured).
        options.enable_cpu_mem_arena = False
        try:
            return self._ort.InferenceSession(str(path), options, providers=self.providers, provider_options=[
                PROVIDER_OPTIONS.get(p, {}) for p in self.providers])
        except Exception as exc:  # onnxruntime raises its own error types (a truncated or corrupt graph)
            raise BackendError(f"{path}: ONNX Runtime cannot load it ({exc.__class__.__name__}); "
                               "re-export it") from None

    def _hold(self, size: Size, session: OrtSession, only_replacing_idle: bool = False) -> None:
        """Hold a session (evicting the least recently used beyond max_sizes). ``only_replacing_idle``
        (the background worker): when full, hold it only if a held size has been idle long enough."""
        with self._lock:
            if self._closed:
                return
            refused = only_replacing_idle and size not in self._sessions and not self._sessions.has_room()
            evicted = [] if refused else self._sessions.hold(size, session)
            self._lock.notify_all()
        if refused:
            self.log(f"onnxruntime: size {size[0]}x{size[1]} made but not held: every held size is in use")
        if evicted:
            _return_freed_memory()

    def wait_for_size(self, size: Size, timeout_s: float) -> bool:
        """Until ``size`` is held (True), or it failed, or ``timeout_s`` passed (False)."""
        with self._lock:
            return self._lock.wait_for(lambda: size in self._sessions or size in self._failed, timeout_s) and \
                size in self._sessions

    def _make(self, size: Size) -> OrtSession:
        """A session for ``size``: a given graph, else the exporter's (made again once if refused)."""
        if size in self._given:
            return self.load(self._given[size])[1]
        if self.exporter is None:
            have = ", ".join(f"{w}x{h}" for w, h in sorted(self._given)) or "none"
            raise BackendError(f"no ONNX graph for {size[0]}x{size[1]} (have: {have})")
        path = self.exporter(*size, False)
        try:
            return self.load(path)[1]
        except BackendError as exc:  # a cached graph refused (an older version's, a changed runtime)
            self.log(f"{exc}: exporting {size[0]}x{size[1]} again")
            return self.load(self.exporter(*size, True))[1]

    # -- background sizes ---------------------------------------------------------------------

    def _make_loop(self) -> None:
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._wanted is not None or self._closed)
                if self._closed:
                    return
                size = self._wanted
                assert size is not None  # the wait ends on a wanted size, or closed (returned above)
                self._wanted, self._making = None, size
            try:
                session = self._make(size)
            except Exception as exc:  # a failed export or a refused graph: that size stays unavailable a while
                with self._lock:
                    self._failed[size] = time.monotonic()
                    while len(self._failed) > MAX_FAILED:
                        self._failed.popitem(last=False)
                    self._lock.notify_all()
                self.log(f"onnxruntime: size {size[0]}x{size[1]} unavailable for {FAILED_RETRY_S:g} s: {exc}")
            else:
                self._hold(size, session, only_replacing_idle=True)
                if size in self.held_sizes():
                    self.log(f"onnxruntime: size {size[0]}x{size[1]} ready")
            finally:
                with self._lock:
                    self._making = None

    def _request(self, size: Size) -> None:
        """Ask the worker for ``size`` (latest wins) if there is room for it; called with the lock held."""
        if size == self._making or self._closed:
            return
        failed = self._failed.get(size)
        if failed is not None and time.monotonic() - failed < FAILED_RETRY_S:
            return
        if not self._sessions.has_room():
            return  # every held size is in use: the nearest one serves
        self._wanted = size
        self._lock.notify_all()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._sessions.clear()
            self._lock.notify_all()
        cancel = getattr(self.exporter, "cancel", None)
        if cancel is not None:
            cancel()

    # -- the interface ------------------------------------------------------------------------

    def sizes(self) -> list[Size] | None:
        if self.exporter is None:
            return sorted(self._given)
        return self.held_sizes() if self.background else None

    def precision(self) -> str:
        return "+".join(sorted(self._dtypes)) or "fp32"

    def max_held_sizes(self) -> int:
        return self.max_sizes

    def size_persistence(self) -> int:
        return self.persist_frames if self.background else 0

    def held_sizes(self) -> list[Size]:
        with self._lock:
            return self._sessions.sizes()

    def nearest_size(self, width: int, height: int) -> Size:
        if not self.background:
            return super().nearest_size(width, height)
        with self._lock:
            self._recent.append((width, height))
            if (width, height) not in self._sessions and self._recent.count((width, height)) >= self.persist_frames:
                self._request((width, height))
            if not self._sessions:
                raise SizeNotReadyError(f"onnxruntime: no size held yet ({width}x{height} is being made)")
            size = nearest(self._sessions.sizes(), width, height)
            self._sessions.touch(size)  # in use: the last to be replaced
            return size

    def describe(self) -> str:
        with self._lock:
            sizes = ", ".join(f"{w}x{h}" for w, h in self._sessions.sizes()) or "none yet"
            making = f"; making {self._making[0]}x{self._making[1]}" if self._making else ""
        return f"onnxruntime ({self.providers[0]}, sizes {sizes}{making})"

    def _session(self, size: Size) -> OrtSession:
        with self._lock:
            session = self._sessions.get(size)
            if session is not None:
                return session
        if self.background:  # evicted since nearest_size chose it: the caller runs PyTorch this time
            raise SizeNotReadyError(f"onnxruntime: {size[0]}x{size[1]} is not held")
        session = self._make(size)
        self._hold(size, session)
        return session

    def _run(self, session: OrtSession, pixels: np.ndarray, per_image: list[int]) -> np.ndarray:
        dtype = np.float16 if session.get_inputs()[0].type == "tensor(float16)" else np.float32
        outputs, start = [], 0
        for n in per_image:
            chunk = np.ascontiguousarray(pixels[start : start + n], dtype=dtype)
            outputs.append(session.run(None, {INPUT_NAME: chunk})[0].astype(np.float32))
            start += n
        return np.concatenate(outputs, axis=0)

    def depth(self, inputs, stage: Stage = _no_stage) -> np.ndarray:
        grid = inputs.image_grid_thw
        _, gh, gw = (int(v) for v in grid[0])
        session = self._session((gw * self.vision_patch, gh * self.vision_patch))
        pixels = inputs.pixel_values.numpy() if hasattr(inputs.pixel_values, "numpy") else inputs.pixel_values
        with stage("model"):
            return self._run(session, pixels, [pixels.shape[0] // grid.shape[0]] * grid.shape[0])


def _return_freed_memory() -> None:
    """Hand memory freed by an evicted session back to the OS (glibc keeps it otherwise); no-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
