"""Probes: a compiled artifact proves its output before it serves.

When an artifact is built (an ONNX export, a TensorRT engine), a small probe is stored beside it
(``ARTIFACT.probe.safetensors``): one input — the processed pixels of a fixed image at the artifact's
size — and the PyTorch reference output for it in fp32. Every compiled backend runs the probe when
it loads the artifact and refuses it (:class:`BackendError`, with the command that rebuilds it) when
the output has NaN/Inf or differs from the reference by more than the tolerance of its precision.
This catches what a version check cannot: an engine that builds and then computes something else
after a TensorRT/JetPack change, an fp16 engine that overflows to NaN, a graph whose weights were
altered after export.

Safetensors only (no pickle); numpy only (no torch), so ONNX Runtime users need nothing more.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from depthvlm_ros.backends.base import BackendError

PROBE_SUFFIX = ".probe.safetensors"
#: Largest relative error a probe accepts, by the precision the artifact computes in. fp32 matches the
#: export's parity limit; fp16/bf16 leave room for their 11/8-bit mantissas through ~40 layers.
TOLERANCE = {"fp32": 1e-3, "fp16": 3e-2, "bf16": 6e-2}


@dataclass
class Probe:
    """An artifact's probe: the processed pixels of one image and the PyTorch fp32 reference depth (metres) for them."""

    pixel_values: np.ndarray  # (patches, C*T*P*P) float32: the processed pixels of one image
    depth: np.ndarray  # (1, H, W) float32 metres: the PyTorch fp32 reference for them
    size: str  # "WxH" model grid


def probe_path(artifact: str | Path) -> Path:
    """Where ``artifact``'s probe is stored: beside it, as ``ARTIFACT.probe.safetensors``."""
    return Path(str(artifact) + PROBE_SUFFIX)


def max_relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / |want| over all pixels (depth is positive); inf for a shape mismatch."""
    if got.shape != want.shape:
        return float("inf")
    return float(np.max(np.abs(got.astype(np.float64) - want) / np.maximum(np.abs(want), 1e-6)))


def write_probe(artifact: str | Path, pixel_values: np.ndarray, depth: np.ndarray, size: tuple[int, int]) -> Path:
    """Store ``artifact``'s probe (input pixels and the fp32 reference depth) beside it."""
    from safetensors.numpy import save_file

    path = probe_path(artifact)
    save_file({"pixel_values": np.ascontiguousarray(pixel_values, np.float32),
               "depth": np.ascontiguousarray(depth, np.float32)}, str(path),
              metadata={"size": f"{size[0]}x{size[1]}", "format": "depthvlm-probe-1"})
    return path


def read_probe(artifact: str | Path, rebuild: str) -> Probe:
    """The probe stored beside ``artifact``; BackendError (naming ``rebuild``) if missing or unreadable."""
    from safetensors import safe_open

    path = probe_path(artifact)
    if not path.is_file():
        raise BackendError(f"{artifact} has no probe ({path.name}) to prove its output (made by an older "
                           f"version?); {rebuild}")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            return Probe(f.get_tensor("pixel_values"), f.get_tensor("depth"), meta.get("size", "?"))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise BackendError(f"{path}: unreadable probe ({exc.__class__.__name__}); {rebuild}") from None


def check_probe_input(artifact: str | Path, probe: Probe, input_shape: tuple | list, rebuild: str) -> None:
    """BackendError when the probe's pixels do not fit the artifact's input (a probe of another size)."""
    want = tuple(int(d) if isinstance(d, (int, np.integer)) else -1 for d in input_shape)
    got = tuple(probe.pixel_values.shape)
    if len(want) != len(got) or any(w not in (-1, g) for w, g in zip(want, got)):
        raise BackendError(f"{artifact}: its probe ({probe.size}, pixels {list(got)}) does not fit the input "
                           f"{list(input_shape)}; {rebuild}")


def check_probe(artifact: str | Path, got: np.ndarray, probe: Probe, precision: str, rebuild: str) -> float:
    """Compare an artifact's output on its probe with the reference; the error, or BackendError."""
    tolerance = TOLERANCE.get(precision, TOLERANCE["fp32"])
    got = np.asarray(got, np.float32)
    if not np.isfinite(got).all():
        bad = int((~np.isfinite(got)).sum())
        raise BackendError(f"{artifact} computes NaN/Inf on its probe ({bad} of {got.size} pixels, {precision}); "
                           f"refused; {rebuild}")
    error = max_relative_error(got, probe.depth)
    if not error <= tolerance:
        raise BackendError(f"{artifact} differs from its PyTorch reference by {error:.2e} on its probe (limit "
                           f"{tolerance:.0e} for {precision}); refused; {rebuild}")
    return error


def prove_artifact(artifact: str | Path, input_shape: tuple | list, run: Callable[[np.ndarray], np.ndarray],
                   precision: str, rebuild: str) -> float:
    """Run ``artifact``'s probe through ``run`` (its backend's execution of processed pixels) and check
    the output: the error, or BackendError naming ``rebuild`` (no probe, a probe of another size, a
    failed run, NaN/Inf, drift beyond the tolerance of ``precision``)."""
    probe = read_probe(artifact, rebuild)
    check_probe_input(artifact, probe, input_shape, rebuild)
    try:
        got = run(probe.pixel_values)
    except BackendError:
        raise
    except Exception as exc:  # the runtime's own errors (ONNX Runtime, CUDA, TensorRT)
        first = (str(exc).strip().splitlines() or [""])[0][:200]  # runtime errors can span pages
        raise BackendError(f"{artifact} fails on its probe ({exc.__class__.__name__}: {first}); {rebuild}") from None
    return check_probe(artifact, got, probe, precision, rebuild)
