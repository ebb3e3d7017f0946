"""TensorRT: build an engine from the exported ONNX on the target GPU, and run it.

Written against the documented TensorRT 10/11 Python API (``Builder``, ``OnnxParser``,
``IBuilderConfig.set_memory_pool_limit``, ``IProgressMonitor``, ``build_serialized_network``,
``Runtime.deserialize_cuda_engine``, named I/O tensors with ``set_tensor_address`` and
``execute_async_v3``). I/O buffers are PyTorch CUDA tensors on one CUDA stream (no pycuda).

TensorRT cannot be installed in this project's development workplace, so this module is exercised
only on real NVIDIA hardware (a desktop GPU or a Jetson with JetPack's TensorRT). Everything before
it — the export, ``onnx.checker``, ONNX Runtime parity on the very graph TensorRT compiles, and the
sidecar checks below — is tested on CPU.

An engine is specific to the GPU model, TensorRT version, weights and input size; the JSON sidecar
written next to it records all four, and :func:`check_sidecar` refuses a mismatch with the command
that rebuilds it. Beside it, the ONNX export's probe (an input and its PyTorch fp32 output) is
copied at build, and :class:`TensorRTBackend` runs it when it loads the engine: NaN/Inf or drift
beyond the engine precision's tolerance refuses the engine (:mod:`depthvlm_ros.backends.probe`).
"""

from __future__ import annotations

import datetime
import json
import mmap
import os
import shutil
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from depthvlm_ros import __version__
from depthvlm_ros.backends.base import BackendError, DepthBackend, LoadedSizes, Stage, _no_stage
from depthvlm_ros.backends.onnx_export import INPUT_NAME, OUTPUT_NAME, export_size, read_metadata
from depthvlm_ros.backends.probe import probe_path, prove_artifact
from depthvlm_ros.devices import cuda_device
from depthvlm_ros.files import write_text_atomic
from depthvlm_ros.hashing import sha256_of_files

PRECISIONS = ("fp32", "fp16", "bf16")
#: Engines held at once by default: each holds all weights (about 8 GB for the 4B model in fp16).
DEFAULT_ENGINES = 1


def import_tensorrt() -> Any:
    """The ``tensorrt`` module; BackendError, saying how to install it, when it is not installed."""
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendError(
            "TensorRT is not installed: on a Jetson it comes with JetPack (python3-libnvinfer); on a desktop "
            "GPU install NVIDIA's tensorrt wheel. Use --backend onnxruntime or torch meanwhile."
        ) from None
    return trt


_LOGGER: Any = None


def trt_logger() -> Any:
    """The process's one ``trt.Logger`` (TensorRT keeps the first logger it sees and warns about others)."""
    global _LOGGER
    if _LOGGER is None:
        trt = import_tensorrt()
        _LOGGER = trt.Logger(trt.Logger.WARNING)
    return _LOGGER


@dataclass(frozen=True)
class EngineRecipe:
    """How an engine is built from a graph: always strongly typed (the graph's own types, Casts kept),
    so the precision is the graph's: the fp16 export keeps RMSNorm's fp32 Casts, which a weakly typed
    fp16 build of the fp32 graph would drop (TensorRT 11 has no weak typing at all)."""

    precision: str  # what the engine computes in: the graph's dtype
    strongly_typed: bool


def engine_recipe(onnx_dtype: str, requested: str | None, strongly_typed_available: bool = True) -> EngineRecipe:
    """The build of a ``onnx_dtype`` graph (fp32/fp16) when ``requested`` (None: the graph's precision)
    is asked for; BackendError, naming the export that makes the right graph, when they differ."""
    if onnx_dtype not in ("fp32", "fp16"):
        raise BackendError(f"graph dtype {onnx_dtype!r} is not one depthvlm export writes (fp32, fp16); export again")
    precision = requested or onnx_dtype
    if precision not in PRECISIONS:
        raise BackendError(f"precision must be one of {PRECISIONS}")
    if precision == "bf16":
        raise BackendError(
            "bf16 engines are not built: the exporter writes fp32 and fp16 graphs only. For a reduced-precision "
            "engine, export an fp16 graph (depthvlm export --export-dtype fp16 --size WxH --out GRAPH) and build "
            "that (depthvlm build-engine --onnx GRAPH --out ENGINE)"
        )
    if precision != onnx_dtype:
        raise BackendError(
            f"a {precision} engine is built from a {precision} graph (precision follows the graph; a weakly typed "
            f"fp16 build of the fp32 graph runs RMSNorm in fp16 and can overflow): export it with depthvlm "
            f"export --export-dtype {precision} --size WxH --out GRAPH, then depthvlm build-engine --onnx GRAPH "
            "--out ENGINE"
        )
    if not strongly_typed_available:
        raise BackendError("this TensorRT has no strongly typed networks (TensorRT 10 or newer is needed)")
    return EngineRecipe(precision, True)


def sidecar_path(engine_path: str | Path) -> Path:
    """The JSON sidecar beside an engine (``ENGINE.json``): what the engine was built for and from."""
    return Path(str(engine_path) + ".json")


def current_gpu() -> dict[str, str]:
    """Name and compute capability of the current CUDA device (via PyTorch)."""
    import torch

    if not torch.cuda.is_available():
        raise BackendError("TensorRT needs a CUDA GPU, and this torch sees none")
    major, minor = torch.cuda.get_device_capability()
    return {"gpu_name": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}


def check_sidecar(
    sidecar: dict[str, Any],
    engine_path: str | Path,
    gpu_name: str,
    compute_capability: str,
    tensorrt_version: str,
    model_fingerprint: str | None = None,
    size: tuple[int, int] | None = None,
) -> None:
    """Raise BackendError if an engine was built for another GPU, TensorRT, model or size.

    The message names the mismatch and the command that rebuilds the engine here.
    """
    onnx_hint = sidecar.get("onnx", "model.onnx")
    rebuild = rebuild_command(sidecar, engine_path)
    checks: list[tuple[str, object, object]] = [
        ("GPU", sidecar.get("gpu_name"), gpu_name),
        ("compute capability", sidecar.get("compute_capability"), compute_capability),
        ("TensorRT version", sidecar.get("tensorrt_version"), tensorrt_version),
    ]
    if model_fingerprint is not None:
        checks.append(("model", sidecar.get("model_fingerprint"), model_fingerprint))
    if size is not None:
        checks.append(("input size", tuple(sidecar.get("size", ())), tuple(size)))
    for what, built_for, here in checks:
        if built_for != here:
            if what == "model":
                rebuild = (f"export the current model and rebuild: depthvlm export --model DIR --size "
                           f"{'x'.join(map(str, sidecar.get('size', ['W', 'H'])))} --out {onnx_hint}, then {rebuild}")
            raise BackendError(f"engine {engine_path} was built for {what} {built_for!r}, this is {here!r}; {rebuild}")


def verify_engine_file(engine_path: str | Path, sidecar: dict[str, Any]) -> None:
    """Prove an engine file is the one its sidecar describes before it is deserialized (a TensorRT engine is
    code for the GPU; a swapped or edited file must never run): neither it nor its sidecar may be writable by
    group or others, and its sha256 must be the sidecar's ``engine_sha256``. BackendError otherwise."""
    engine_path = Path(engine_path)
    for path in (engine_path, sidecar_path(engine_path)):
        try:
            mode = path.stat().st_mode
        except OSError as exc:
            raise BackendError(f"{path}: {exc.strerror or exc}") from None
        if mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise BackendError(f"{path}: writable by others (mode {stat.S_IMODE(mode):o}); refused: chmod go-w it, "
                               "or rebuild the engine")
    want = sidecar.get("engine_sha256")
    if not isinstance(want, str) or len(want) != 64:
        raise BackendError(f"{engine_path}: its sidecar records no engine_sha256 (built by an older version); "
                           f"{rebuild_command(sidecar, engine_path)}")
    try:
        got = sha256_of_files([engine_path], digits=64)
    except OSError as exc:
        raise BackendError(f"{engine_path}: unreadable ({exc.strerror or exc})") from None
    if got != want:
        raise BackendError(f"{engine_path}: its sha256 is not the one its sidecar records: the file changed after it "
                           f"was built; refused. {rebuild_command(sidecar, engine_path)}")


def rebuild_command(sidecar: dict[str, Any], engine_path: str | Path) -> str:
    """The advice that rebuilds an engine from its sidecar's ONNX and precision."""
    precision = sidecar.get("precision", "fp16")
    flag = "" if precision == "fp32" else f" --{precision}"
    return (f"rebuild it on this machine: depthvlm build-engine --onnx {sidecar.get('onnx', 'model.onnx')} "
            f"--out {engine_path}{flag}")


def read_sidecar(engine_path: str | Path) -> dict[str, Any]:
    """An engine's sidecar as a dict; BackendError when it is missing or not valid JSON."""
    path = sidecar_path(engine_path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise BackendError(f"{engine_path}: no sidecar {path.name}; rebuild it with depthvlm build-engine") from None
    except json.JSONDecodeError:
        raise BackendError(f"{path}: sidecar is not valid JSON; rebuild the engine") from None


def build_engine(
    onnx_path: str | Path,
    out_path: str | Path,
    precision: str | None = None,
    workspace_gb: float = 4.0,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Parse an exported ONNX, build a serialized engine for this GPU, write it and its sidecar.

    The engine is strongly typed: it computes in the graph's dtype (:func:`engine_recipe`);
    ``precision``, when given, must match it. fp32 engines are built with TF32 off.
    """
    trt = import_tensorrt()
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    meta = read_metadata(onnx_path)
    size = export_size(meta, onnx_path)
    recipe = engine_recipe(meta.get("depthvlm.dtype", "fp32"), precision,
                       hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"))
    if not probe_path(onnx_path).is_file():
        raise BackendError(f"{onnx_path} has no probe ({probe_path(onnx_path).name}) for the engine to prove its "
                           "output with; export it again with depthvlm export")
    gpu = current_gpu()
    builder = trt.Builder(trt_logger())
    # explicit batch is the only mode since TensorRT 10; strongly typed: the graph's types and Casts hold
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, trt_logger())
    progress(f"parsing {onnx_path}")
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if recipe.precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # on by default since Ampere; fp32 means fp32 (probe tolerance)

    monitor_base: Any = trt.IProgressMonitor  # a base class from a module imported at run time (Any to mypy)

    class Monitor(monitor_base):
        """Prints TensorRT's build phases (the build takes minutes on a Jetson)."""

        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name, parent_phase, num_steps):
            progress(f"  {phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name, step):
            return True  # keep building

        def phase_finish(self, phase_name):
            pass

    config.progress_monitor = Monitor()
    progress(f"building a {recipe.precision} engine for {gpu['gpu_name']} (sm {gpu['compute_capability']})")
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendError("TensorRT failed to build the engine (see its log above)")
    build_s = time.perf_counter() - start
    del parser, network, builder  # the builder's memory goes before the engine is written
    out_path.parent.mkdir(parents=True, exist_ok=True)
    staged = out_path.with_name(f".{out_path.name}.partial")
    with open(staged, "wb") as handle:
        handle.write(memoryview(serialized))  # IHostMemory is a buffer: written without a bytes copy
        handle.flush()
        os.fsync(handle.fileno())
    del serialized
    os.chmod(staged, 0o644)  # nobody else may write it: a changed engine is refused at load
    os.replace(staged, out_path)
    sidecar = {
        "engine": out_path.name,
        "engine_sha256": sha256_of_files([out_path], digits=64),  # checked before it is ever deserialized
        "onnx": str(onnx_path),
        "onnx_sha256": sha256_of_files([onnx_path]),
        "model_fingerprint": meta.get("depthvlm.model_fingerprint", ""),
        "model_name": meta.get("depthvlm.model_name", ""),
        "size": list(size),
        "vision_patch": int(meta.get("depthvlm.vision_patch", 16)),
        "onnx_dtype": meta.get("depthvlm.dtype", "fp32"),
        "precision": recipe.precision,  # what the engine computes in
        "strongly_typed": recipe.strongly_typed,
        "tensorrt_version": trt.__version__,
        **gpu,
        "build_s": round(build_s, 1),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "depthvlm_version": __version__,
    }
    shutil.copyfile(probe_path(onnx_path), probe_path(out_path))
    write_text_atomic(sidecar_path(out_path), json.dumps(sidecar, indent=2) + "\n")
    progress(f"wrote {out_path} ({out_path.stat().st_size / 1e6:.0f} MB) in {build_s:.0f} s")
    return sidecar


class TensorRTBackend(DepthBackend):
    """Engines keyed by model-grid size; one execution context and one CUDA stream each."""

    name = "tensorrt"

    def __init__(self, engine_paths: Sequence[str | Path], expected_fingerprint: str | None = None,
                 max_engines: int = DEFAULT_ENGINES, device: str = "cuda") -> None:
        import torch

        self._trt = import_tensorrt()
        self._torch = torch
        if not torch.cuda.is_available():
            raise BackendError("TensorRT needs a CUDA GPU, and this torch sees none")
        # set_device needs an index: "cuda" (or the tools' "cpu") means the current device
        self.device = torch.device(cuda_device(device, torch.cuda.current_device()))
        torch.cuda.set_device(self.device)  # engines, buffers and the stream live on this GPU
        self.gpu = current_gpu()
        self.expected_fingerprint = expected_fingerprint
        self.max_engines = max_engines
        self._runtime = self._trt.Runtime(trt_logger())
        self._stream = torch.cuda.Stream(device=self.device)
        self._engines: LoadedSizes[dict[str, Any]] = LoadedSizes(max_engines)
        self.vision_patch = 16
        if len(engine_paths) > max_engines:
            raise BackendError(f"{len(engine_paths)} engines given; at most {max_engines} are kept loaded")
        for path in engine_paths:
            self.add(path)
        if not self._engines:
            raise BackendError("tensorrt backend needs at least one engine (--engine FILE)")

    def add(self, engine_path: str | Path) -> None:
        engine_path = Path(engine_path)
        if not engine_path.is_file():
            raise BackendError(f"{engine_path}: no such engine (build one with depthvlm build-engine)")
        sidecar = read_sidecar(engine_path)
        check_sidecar(sidecar, engine_path, self.gpu["gpu_name"], self.gpu["compute_capability"],
                      self._trt.__version__, self.expected_fingerprint)
        verify_engine_file(engine_path, sidecar)  # before TensorRT reads a byte of it
        # Deserialised from a read-only map of the file: its pages are the page cache's, not a second
        # copy of the engine in this process's memory (on a Jetson that memory is the GPU's too).
        try:
            with open(engine_path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                engine = self._runtime.deserialize_cuda_engine(mapped)
        except (OSError, ValueError) as exc:  # mmap refuses an empty file with ValueError
            raise BackendError(f"{engine_path}: unreadable ({exc}); rebuild the engine") from None
        if engine is None:
            raise BackendError(f"{engine_path}: TensorRT could not deserialize it; rebuild the engine")
        context = engine.create_execution_context()
        torch, trt = self._torch, self._trt
        buffers = {}
        dtypes = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
                  trt.DataType.BF16: torch.bfloat16}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            dtype = dtypes.get(engine.get_tensor_dtype(name))
            if dtype is None:
                raise BackendError(f"{engine_path}: tensor {name} has unsupported type {engine.get_tensor_dtype(name)}")
            buffers[name] = torch.empty(tuple(engine.get_tensor_shape(name)), dtype=dtype, device=self.device)
            if not context.set_tensor_address(name, buffers[name].data_ptr()):
                raise BackendError(f"{engine_path}: TensorRT refused the buffer of {name}; rebuild the engine")
        if set(buffers) != {INPUT_NAME, OUTPUT_NAME}:
            raise BackendError(f"{engine_path}: expected I/O {INPUT_NAME}/{OUTPUT_NAME}, got {sorted(buffers)}")
        self.vision_patch = int(sidecar.get("vision_patch", 16))
        try:
            size = (int(sidecar["size"][0]), int(sidecar["size"][1]))
        except (KeyError, IndexError, TypeError, ValueError):
            raise BackendError(f"{engine_path}: sidecar has no valid size; rebuild the engine") from None
        # Pinned host staging buffers, allocated once per engine (not per frame) for async copies.
        host_in = torch.empty(buffers[INPUT_NAME].shape, dtype=buffers[INPUT_NAME].dtype).pin_memory()
        host_out = torch.empty(buffers[OUTPUT_NAME].shape, dtype=torch.float32).pin_memory()
        slot = {"engine": engine, "context": context, "buffers": buffers, "path": engine_path,
                "host_in": host_in, "host_out": host_out, "precision": sidecar.get("precision", "fp16")}
        rebuild = rebuild_command(sidecar, engine_path)
        prove_artifact(engine_path, tuple(buffers[INPUT_NAME].shape),
                       lambda pixels: self._execute(slot, torch.from_numpy(pixels)), slot["precision"], rebuild)
        self._engines.hold(size, slot)

    def sizes(self) -> list[tuple[int, int]]:
        return self._engines.sizes()

    def describe(self) -> str:
        sizes = ", ".join(f"{w}x{h}" for w, h in self.sizes())
        return f"tensorrt {self._trt.__version__} ({self.gpu['gpu_name']}, sizes {sizes})"

    def depth(self, inputs, stage: Stage = _no_stage) -> np.ndarray:
        _, gh, gw = (int(v) for v in inputs.image_grid_thw[0])
        size = (gw * self.vision_patch, gh * self.vision_patch)
        slot = self._engines.get(size)
        if slot is None:
            raise BackendError(f"no engine for {size[0]}x{size[1]} (have {self.sizes()})")
        pixels = inputs.pixel_values
        n_images = inputs.image_grid_thw.shape[0]
        per_image = pixels.shape[0] // n_images
        with stage("model"):
            outputs = [self._execute(slot, pixels[i * per_image : (i + 1) * per_image]) for i in range(n_images)]
        return np.concatenate(outputs, axis=0).astype(np.float32)

    def _execute(self, slot: dict[str, Any], pixels: Any) -> np.ndarray:
        """One image's processed pixels (a CPU tensor) through one engine -> (1, H, W) float32 depth."""
        torch = self._torch
        with torch.cuda.device(self.device), torch.cuda.stream(self._stream):
            if pixels.is_cuda:  # preprocessed on this GPU: no trip through the host
                self._stream.wait_stream(torch.cuda.default_stream(self.device))  # made on the default stream
                slot["buffers"][INPUT_NAME].copy_(pixels)
            else:
                slot["host_in"].copy_(pixels)  # converts dtype on the CPU
                slot["buffers"][INPUT_NAME].copy_(slot["host_in"], non_blocking=True)
            if not slot["context"].execute_async_v3(self._stream.cuda_stream):
                raise BackendError(f"TensorRT execution failed for {slot['path']}")
            slot["host_out"].copy_(slot["buffers"][OUTPUT_NAME], non_blocking=True)
            self._stream.synchronize()
            return slot["host_out"].numpy().copy()

    def held_sizes(self) -> list[tuple[int, int]]:
        return self.sizes()

    def input_device(self) -> str:
        return str(self.device)

    def max_held_sizes(self) -> int:
        return self.max_engines

    def precision(self) -> str:
        return "+".join(sorted({slot["precision"] for slot in self._engines.values()})) or "fp16"
