"""Depth backends behind one interface (:class:`DepthBackend`), and choosing one.

A :class:`BackendSpec` says which backend runs the depth path and how; ``create_backend(spec, ...)``
returns a ready backend or raises :class:`BackendError` with the reason; with ``fallback`` a refused
backend (TensorRT missing, an engine built for another GPU, ...) is reported through ``log`` and the
next one in :data:`BACKENDS` order is tried, ending at ``torch``, which always works. A backend gets what
it needs (the PyTorch model for ``torch``, the model's fingerprint, an exporter), never the pipeline:
:meth:`DepthVLM.from_pretrained <depthvlm_ros.pipeline.DepthVLM.from_pretrained>` builds them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from depthvlm_ros.backends.base import BACKENDS, TRITON, BackendError, DepthBackend, SizeNotReadyError
from depthvlm_ros.backends.export_cache import export_cache_path

__all__ = ["AUTO", "BACKENDS", "TRITON", "BackendError", "BackendSpec", "DepthBackend", "SizeNotReadyError",
           "TorchBackend", "choose_backend", "create_backend", "export_cache_path"]

#: The backend name that picks one (:func:`choose_backend`): the default of the node and the tools.
AUTO = "auto"
#: Files TensorRT loads (engine plans); anything else in ``engine_paths`` is an ONNX graph.
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")


def choose_backend(device: str = "cpu", paths: Sequence[str | Path] = ()) -> tuple[str, str]:
    """What ``auto`` runs, and why (one line for logs and diagnostics).

    1. ``tensorrt`` when a TensorRT engine is given and CUDA is available;
    2. ``torch`` on the GPU when ``device`` is a CUDA device and CUDA is available (no engine: the
       GPU's PyTorch beats any CPU path; a decision of ours, named in the README);
    3. ``onnxruntime`` on the CPU when it is installed (the fastest CPU path measured here);
    4. ``torch`` otherwise.
    """
    import importlib.util

    import torch

    engines = [Path(p) for p in paths if Path(p).suffix in ENGINE_SUFFIXES]
    cuda = torch.cuda.is_available()
    if engines and cuda:
        return "tensorrt", f"auto: TensorRT engine {engines[0].name} given and CUDA available"
    no_engine = f"engine given but no CUDA device ({engines[0].name})" if engines else "no TensorRT engine given"
    if str(device).startswith("cuda") and cuda:
        return "torch", f"auto: {no_engine}; device {device}: PyTorch on the GPU"
    if importlib.util.find_spec("onnxruntime") is not None:
        return "onnxruntime", f"auto: {no_engine}; ONNX Runtime on the CPU (the fastest CPU path)"
    return "torch", f"auto: {no_engine}; onnxruntime not installed: PyTorch"



def __getattr__(name: str) -> object:
    """``TorchBackend`` imports torch: loaded on first use, so the CLI starts without torch."""
    if name == "TorchBackend":
        from depthvlm_ros.backends.torch_backend import TorchBackend

        return TorchBackend
    raise AttributeError(name)


@dataclass(frozen=True)
class BackendSpec:
    """Which backend runs the depth path, and how.

    ``name``: ``auto`` (:func:`choose_backend`), ``torch``, ``onnxruntime``, ``tensorrt`` or ``triton``.
    ``onnx``: exported graphs for ONNX Runtime; without any (or with ``export_missing``) sizes are exported
    on first use into the cache, in the caller's thread or, with ``background``, in a separate process while
    the nearest held size (or PyTorch) serves. ``engines``: TensorRT engines with their sidecars.
    ``max_sizes``: compiled sizes held at once (0: the backend's default, 4 ONNX Runtime sessions or 1
    TensorRT engine). ``idle_before_replaced_s``: a full set of held sizes changes only by replacing one
    unused this long. ``compile``: for ``torch``, ``none``, ``default`` (``torch.compile(fullgraph=True)``) or
    ``graphs`` (that, replayed as CUDA graphs; CUDA only), with at most ``max_sizes`` plans compiled at once
    (0: 2); ``head_output``: for ``torch``, ``model_grid`` (the released way) or ``camera_grid`` (the head makes
    the depth at the camera's grid). ``fallback``: a refused backend hands over
    to the next. ``triton``: the server (a :class:`~depthvlm_ros.backends.triton_backend.TritonConnection`);
    never part of a fallback, and unreachable at start it raises, or with ``background`` says so in
    ``problem()`` and connects when the server comes.
    """

    name: str = "torch"
    device: str = "cpu"
    onnx: tuple[Path, ...] = ()
    engines: tuple[Path, ...] = ()
    export_missing: bool = False
    compile: str = "none"
    head_output: str = "model_grid"
    fallback: bool = False
    max_sizes: int = 0
    background: bool = False
    idle_before_replaced_s: float = 30.0
    triton: Any = None

    @property
    def needs_exporter(self) -> bool:
        """Whether ONNX Runtime would export sizes (it may serve: ``onnxruntime`` or ``auto``, or a fallback)."""
        return self.export_missing or not self.onnx


def create_backend(spec: BackendSpec, model: Any = None, fingerprint: str | None = None,
                   exporter: Callable[[int, int, bool], Path] | None = None,
                   log: Callable[[str], None] = print) -> DepthBackend:
    """The backend ``spec`` names, ready (see :class:`BackendSpec`). ``model``: the PyTorch model (the
    ``torch`` backend, and a fallback to it); ``fingerprint``: the weights' (compiled artefacts and servers
    of other weights are refused); ``exporter``: makes a missing ONNX size (``exporter(w, h, replace)``)."""
    if spec.name == TRITON:
        from depthvlm_ros.backends.triton_backend import TritonBackend, TritonConnection

        connection = spec.triton if isinstance(spec.triton, TritonConnection) else TritonConnection()
        remote = TritonBackend(connection, fingerprint, connect_now=not spec.background, log=log)
        remote.choice_reason = f"{TRITON} (asked for)"
        return remote
    name, choice, onnx, engines, fallback = spec.name, "", list(spec.onnx), list(spec.engines), spec.fallback
    if name == AUTO:
        name, choice = choose_backend(spec.device, [*onnx, *engines])
        log(choice)
        fallback = True  # auto always lands on a backend that runs
        onnx = [p for p in onnx if Path(p).suffix not in ENGINE_SUFFIXES]  # graphs for onnxruntime,
        engines = [p for p in engines if Path(p).suffix in ENGINE_SUFFIXES]  # engines for tensorrt
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r} (choose from {AUTO}, {', '.join(BACKENDS)}, {TRITON})")

    order = [name] + ([b for b in BACKENDS[BACKENDS.index(name) + 1 :]] if fallback else [])
    reason = ""
    for candidate in order:
        try:
            if candidate == "torch":
                from depthvlm_ros.backends.torch_backend import DEFAULT_COMPILED_PLANS, TorchBackend

                if model is None:
                    raise BackendError("the torch backend needs the model's weights")
                backend: DepthBackend = TorchBackend(model, compile=spec.compile,
                                                     max_compiled=spec.max_sizes or DEFAULT_COMPILED_PLANS,
                                                     head_output=spec.head_output, log=log)
            elif candidate == "onnxruntime":
                backend = _onnxruntime(spec, [Path(p) for p in onnx], fingerprint, exporter, log)
            else:
                backend = _tensorrt(spec, [Path(p) for p in engines], fingerprint)
            backend.fallback_reason = reason
            backend.choice_reason = choice or f"{name} (asked for)"
            return backend
        except BackendError as exc:
            if candidate == order[-1]:
                raise
            reason = f"{candidate} refused: {exc}"
            log(f"backend {candidate} unavailable ({exc}); falling back to {order[order.index(candidate) + 1]}")
    raise AssertionError("unreachable")


def _onnxruntime(spec: BackendSpec, onnx: Sequence[Path], fingerprint: str | None,
                 exporter: Callable[[int, int, bool], Path] | None, log: Callable[[str], None]) -> DepthBackend:
    from depthvlm_ros.backends.onnxruntime_backend import DEFAULT_SESSIONS, OnnxRuntimeBackend

    exporter = exporter if (spec.export_missing or not onnx) else None
    return OnnxRuntimeBackend(onnx, device=spec.device, expected_fingerprint=fingerprint, exporter=exporter,
                              max_sizes=spec.max_sizes or DEFAULT_SESSIONS,
                              background=spec.background and exporter is not None, log=log,
                              idle_before_replaced_s=spec.idle_before_replaced_s)


def _tensorrt(spec: BackendSpec, engines: Sequence[Path], fingerprint: str | None) -> DepthBackend:
    from depthvlm_ros.backends.tensorrt_backend import DEFAULT_ENGINES, TensorRTBackend

    if not engines:
        raise BackendError("tensorrt needs --engine FILE (build one with depthvlm build-engine)")
    return TensorRTBackend(engines, expected_fingerprint=fingerprint, device=spec.device,
                           max_engines=spec.max_sizes or DEFAULT_ENGINES)
