"""Depth backends behind one interface (:class:`DepthBackend`), and choosing one.

``create_backend(vlm, "onnxruntime", ...)`` returns a ready backend or raises
:class:`BackendError` with the reason; with ``fallback=True`` a refused backend (TensorRT missing,
an engine built for another GPU, ...) is reported through ``log`` and the next one in
:data:`BACKENDS` order is tried, ending at ``torch``, which always works.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from depthvlm_ros.backends.base import BACKENDS, TRITON, BackendError, DepthBackend, SizeNotReadyError
from depthvlm_ros.backends.export_cache import export_cache_path

__all__ = ["AUTO", "BACKENDS", "TRITON", "BackendError", "DepthBackend", "SizeNotReadyError", "TorchBackend",
           "choose_backend", "create_backend", "export_cache_path"]

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


def _onnxruntime(vlm: object, device: str, onnx: Sequence[Path], export_missing: bool, max_sizes: int,
                 background: bool, idle_s: float, log: Callable[[str], None]) -> DepthBackend:
    from depthvlm_ros.backends.export_cache import InProcessExporter, SubprocessExporter
    from depthvlm_ros.backends.onnxruntime_backend import DEFAULT_SESSIONS, OnnxRuntimeBackend
    from depthvlm_ros.model.checkpoint import model_fingerprint

    exporter = None
    if export_missing or not onnx:
        exporter = SubprocessExporter(vlm, log=log) if background else InProcessExporter(vlm, log=log)
    fingerprint = model_fingerprint(vlm.folder) if vlm.folder is not None else None
    return OnnxRuntimeBackend(onnx, device=device, expected_fingerprint=fingerprint, exporter=exporter,
                              max_sizes=max_sizes or DEFAULT_SESSIONS, background=background and exporter is not None,
                              log=log, idle_before_replaced_s=idle_s)


def _tensorrt(vlm: object, engines: Sequence[Path], device: str, max_sizes: int) -> DepthBackend:
    from depthvlm_ros.backends.tensorrt_backend import TensorRTBackend
    from depthvlm_ros.model.checkpoint import model_fingerprint

    if not engines:
        raise BackendError("tensorrt needs --engine FILE (build one with depthvlm build-engine)")
    fingerprint = model_fingerprint(vlm.folder) if vlm.folder is not None else None
    from depthvlm_ros.backends.tensorrt_backend import DEFAULT_ENGINES

    return TensorRTBackend(engines, expected_fingerprint=fingerprint, device=device,
                           max_engines=max_sizes or DEFAULT_ENGINES)


def create_backend(
    vlm: object,
    name: str,
    device: str = "cpu",
    onnx: Sequence[str | Path] = (),
    engines: Sequence[str | Path] = (),
    export_missing: bool = False,
    compile: bool = False,
    fallback: bool = False,
    log: Callable[[str], None] = print,
    max_sizes: int = 0,
    background: bool = False,
    idle_before_replaced_s: float = 30.0,
    triton: object | None = None,
) -> DepthBackend:
    """A backend for ``vlm`` (a loaded :class:`DepthVLM`) by name; see the module docstring.

    ``onnx``: exported graphs for onnxruntime; without any, sizes are exported on first use into
    the cache (``export_missing`` also allows that next to given files): in the caller's thread, or
    with ``background`` in a separate process while the nearest held size (or PyTorch) serves; a
    full set of held sizes is changed only by replacing one unused for ``idle_before_replaced_s``.
    ``engines``: TensorRT engine files with their sidecars. ``name`` ``auto``: :func:`choose_backend`
    picks one from ``device`` and the files given (its reason is logged and kept in
    ``choice_reason``). ``max_sizes``: compiled sizes held at once; 0 = the backend's default (4 ONNX
    Runtime sessions, 1 TensorRT engine: each engine holds all the weights). ``compile``:
    torch.compile for the torch backend. A backend chosen by fallback carries the reason in
    ``fallback_reason`` (shown in the node's diagnostics).

    ``triton``: the server a :class:`~depthvlm_ros.backends.triton_backend.TritonConnection` names (address,
    models ``<prefix>_WxH``, token, timeout, TLS; default: localhost:8001); never part of a fallback.
    Unreachable: BackendError, or with ``background`` (the node) a backend that says so in ``problem()`` and
    connects when the server comes.
    """
    if name == TRITON:
        from depthvlm_ros.backends.triton_backend import TritonBackend, TritonConnection
        from depthvlm_ros.model.checkpoint import model_fingerprint

        fingerprint = model_fingerprint(vlm.folder) if vlm.folder is not None else None
        backend = TritonBackend(triton if isinstance(triton, TritonConnection) else TritonConnection(), fingerprint,
                                connect_now=not background, log=log)
        backend.choice_reason = f"{TRITON} (asked for)"
        return backend
    choice = ""
    if name == AUTO:
        name, choice = choose_backend(device, [*onnx, *engines])
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
                from depthvlm_ros.backends.torch_backend import TorchBackend

                backend: DepthBackend = TorchBackend(vlm.model, compile=compile)
            elif candidate == "onnxruntime":
                backend = _onnxruntime(vlm, device, [Path(p) for p in onnx], export_missing, max_sizes, background,
                                       idle_before_replaced_s, log)
            else:
                backend = _tensorrt(vlm, [Path(p) for p in engines], device, max_sizes)
            backend.fallback_reason = reason
            backend.choice_reason = choice or f"{name} (asked for)"
            return backend
        except BackendError as exc:
            if candidate == order[-1]:
                raise
            reason = f"{candidate} refused: {exc}"
            log(f"backend {candidate} unavailable ({exc}); falling back to {order[order.index(candidate) + 1]}")
    raise AssertionError("unreachable")
