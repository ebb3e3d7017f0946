"""Depth backends behind one interface (:class:`DepthBackend`), and choosing one.

``create_backend(vlm, "onnxruntime", ...)`` returns a ready backend or raises
:class:`BackendError` with the reason; with ``fallback=True`` a refused backend (TensorRT missing,
an engine built for another GPU, ...) is reported through ``log`` and the next one in
:data:`BACKENDS` order is tried, ending at ``torch``, which always works.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from depthvlm_ros.backends.base import BACKENDS, BackendError, DepthBackend

__all__ = ["BACKENDS", "BackendError", "DepthBackend", "TorchBackend", "create_backend", "export_cache_path"]


def __getattr__(name: str) -> object:
    """``TorchBackend`` imports torch: loaded on first use, so the CLI starts without torch."""
    if name == "TorchBackend":
        from depthvlm_ros.backends.torch_backend import TorchBackend

        return TorchBackend
    raise AttributeError(name)


def export_cache_path(vlm: object, width: int, height: int, dtype: str = "fp32") -> Path:
    """Where an on-demand ONNX export of ``vlm`` at one size is kept (per model fingerprint)."""
    from depthvlm_ros.model.checkpoint import model_fingerprint
    from depthvlm_ros.model.default import cache_dir

    tag = model_fingerprint(vlm.folder) if vlm.folder is not None else vlm.name
    return cache_dir() / "exports" / f"{vlm.name}-{tag}" / f"depth_{width}x{height}_{dtype}.onnx"


def _onnxruntime(vlm: object, device: str, onnx: Sequence[Path], export_missing: bool,
                 log: Callable[[str], None]) -> DepthBackend:
    from depthvlm_ros.backends.onnx_export import export_onnx
    from depthvlm_ros.backends.onnxruntime_backend import OnnxRuntimeBackend
    from depthvlm_ros.model.checkpoint import model_fingerprint

    def exporter(width: int, height: int) -> Path:
        path = export_cache_path(vlm, width, height)
        if not path.is_file():
            log(f"exporting the depth path at {width}x{height} for ONNX Runtime (once) -> {path}")
            export_onnx(vlm, width, height, path, check_images=1, progress=log)
        return path

    fingerprint = model_fingerprint(vlm.folder) if vlm.folder is not None else None
    return OnnxRuntimeBackend(onnx, device=device, expected_fingerprint=fingerprint,
                              exporter=exporter if export_missing or not onnx else None)


def _tensorrt(vlm: object, engines: Sequence[Path], device: str) -> DepthBackend:
    from depthvlm_ros.backends.tensorrt_backend import TensorRTBackend
    from depthvlm_ros.model.checkpoint import model_fingerprint

    if not engines:
        raise BackendError("tensorrt needs --engine FILE (build one with depthvlm build-engine)")
    fingerprint = model_fingerprint(vlm.folder) if vlm.folder is not None else None
    return TensorRTBackend(engines, expected_fingerprint=fingerprint, device=device)


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
) -> DepthBackend:
    """A backend for ``vlm`` (a loaded :class:`DepthVLM`) by name; see the module docstring.

    ``onnx``: exported graphs for onnxruntime; without any, sizes are exported on first use into
    the cache (``export_missing`` also allows that next to given files). ``engines``: TensorRT
    engine files with their sidecars. ``compile``: torch.compile for the torch backend.
    """
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r} (choose from {', '.join(BACKENDS)})")
    order = [name] + ([b for b in BACKENDS[BACKENDS.index(name) + 1 :]] if fallback else [])
    for candidate in order:
        try:
            if candidate == "torch":
                from depthvlm_ros.backends.torch_backend import TorchBackend

                return TorchBackend(vlm.model, compile=compile)
            if candidate == "onnxruntime":
                return _onnxruntime(vlm, device, [Path(p) for p in onnx], export_missing, log)
            return _tensorrt(vlm, [Path(p) for p in engines], device)
        except BackendError as exc:
            if candidate == order[-1]:
                raise
            log(f"backend {candidate} unavailable ({exc}); falling back to {order[order.index(candidate) + 1]}")
    raise AssertionError("unreachable")
