"""Every CUDA and TensorRT check, on the tiny checkpoint: run on an NVIDIA machine by scripts/gpu_check.sh.

Each test skips, with the reason, where its GPU, TensorRT or ONNX Runtime CUDA provider is missing, so
this file passes (all skipped) on a CPU-only machine. Each test records what it measured (maximum
relative error, and median milliseconds of the depth path where it times one) as a JSON line in the
file named by ``DEPTHVLM_GPU_REPORT`` (when set), and prints it. Speed is recorded, never asserted.

The reference is PyTorch fp32 (on CPU, or on CUDA under :func:`~depthvlm_ros.devices.exact_fp32`:
TF32 off, which test (a) shows equals the CPU result); compiled artifacts are checked against it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from depthvlm_ros.backends import TorchBackend
from depthvlm_ros.backends.onnx_export import export_onnx, inputs_for_size
from depthvlm_ros.backends.probe import TOLERANCE, max_relative_error
from depthvlm_ros.devices import exact_fp32
from depthvlm_ros.errors import SetupError
from depthvlm_ros.geometry import Intrinsics

from conftest import scene_image

HAS_CUDA = torch.cuda.is_available()
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def _onnxruntime_has_cuda() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


#: What each test needs, whether this machine has it, and what the skip says when it does not.
HAVE = {
    "cuda": (HAS_CUDA, "needs a CUDA GPU (this torch sees none)"),
    "tensorrt": (HAS_TENSORRT,
                 "needs TensorRT (not installed; JetPack's python3-libnvinfer or NVIDIA's tensorrt wheel)"),
    "ort_cuda": (_onnxruntime_has_cuda(), "needs onnxruntime's CUDAExecutionProvider (onnxruntime-gpu brings it)"),
}


def needs(*what: str) -> pytest.MarkDecorator:
    """Skip unless this machine has all of ``what``; the reason names everything missing."""
    missing = [HAVE[name][1] for name in what if not HAVE[name][0]]
    return pytest.mark.skipif(bool(missing), reason="; ".join(missing))


#: The probe size of the exports: a 320x240 camera at the canonical focal reaches the model at 320x256.
pytestmark = pytest.mark.gpu
SIZE = (320, 256)
CAMERA = Intrinsics.from_fx(320, 240, 1000.0)
RUNS = 20


def record(test: str, **numbers: object) -> None:
    """Print one test's measurements as a JSON line and append it to $DEPTHVLM_GPU_REPORT (if set)."""
    entry = {"test": test, "gpu": torch.cuda.get_device_name() if HAS_CUDA else None, **numbers}
    line = json.dumps(entry, default=str)
    print(line)
    path = os.environ.get("DEPTHVLM_GPU_REPORT")
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as handle:
            handle.write(line + "\n")


def median_ms(run: Callable[[], object], runs: int = RUNS) -> float:
    """Median wall-clock milliseconds of ``run`` over ``runs`` calls after one untimed call, the GPU
    synchronised before and after each."""
    run()
    times = []
    for _ in range(runs):
        torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


@pytest.fixture(scope="module")
def exports(tiny_model, tmp_path_factory) -> dict[str, str]:
    """The tiny model exported at 320x256 in fp32 and fp16 (each export checks itself against PyTorch)."""
    out = tmp_path_factory.mktemp("gpu-onnx")
    return {dtype: export_onnx(tiny_model, *SIZE, out / f"depth_{SIZE[0]}x{SIZE[1]}_{dtype}.onnx", dtype=dtype,
                               check_images=1, progress=lambda _: None).path
            for dtype in ("fp32", "fp16")}


@pytest.fixture(scope="module")
def engines(exports, tmp_path_factory) -> dict[str, Path]:
    """TensorRT engines built on this GPU from the two exports (strongly typed: fp32 and fp16)."""
    from depthvlm_ros.backends.tensorrt_backend import build_engine

    out = tmp_path_factory.mktemp("gpu-engines")
    built = {}
    for dtype, graph in exports.items():
        built[dtype] = out / f"depth_{SIZE[0]}x{SIZE[1]}_{dtype}.engine"
        build_engine(graph, built[dtype], progress=lambda _: None)
    return built


@pytest.fixture(scope="module")
def cuda_model(tiny_checkpoint):
    """The tiny model in fp32 on the GPU (the reference runs it under exact_fp32)."""
    from depthvlm_ros.pipeline import DepthVLM

    return DepthVLM.from_pretrained(tiny_checkpoint, device="cuda", dtype="fp32")


@pytest.fixture(scope="module")
def probe_inputs(tiny_model):
    """Processed inputs at the probe size (320x256 model grid), on the CPU."""
    return inputs_for_size(tiny_model.processor, *SIZE, scene_image(*SIZE, 1000.0))


def cpu_depth(tiny_model) -> np.ndarray:
    """PyTorch fp32 on the CPU: depth on the model grid for the test camera."""
    return tiny_model.predict_depth(scene_image(320, 240, 1000.0), CAMERA).depth_model


def depth_with(model, backend) -> np.ndarray:
    """Depth on the model grid for the test camera through ``backend`` (the same model, another pipeline)."""
    return model.with_backend(backend).predict_depth(scene_image(320, 240, 1000.0), CAMERA).depth_model


def torch_cuda_ms(cuda_model, inputs) -> float:
    """Median ms of PyTorch fp32 on CUDA (TF32 off, as the engines it is compared with) at ``inputs``."""
    reference = TorchBackend(cuda_model.model)
    with exact_fp32():
        return median_ms(lambda: reference.depth(inputs))


@needs("cuda")
def test_torch_cuda_fp32_equals_torch_cpu(cuda_model, tiny_model):
    """(a) The CUDA reference: fp32 without TF32 is fp32 — what compiled artifacts are checked against."""
    with exact_fp32():
        got = cuda_model.predict_depth(scene_image(320, 240, 1000.0), CAMERA).depth_model
    error = max_relative_error(got, cpu_depth(tiny_model))
    record("torch_cuda_fp32_vs_cpu", max_rel_error=error)
    assert np.isfinite(got).all() and error < 1e-3


@needs("cuda", "ort_cuda")
def test_onnxruntime_cuda_matches_torch_cuda(exports, cuda_model, probe_inputs):
    """(b) ONNX Runtime's CUDA provider on the fp32 export (TF32 off) against PyTorch on CUDA."""
    from depthvlm_ros.backends.onnxruntime_backend import OnnxRuntimeBackend

    with exact_fp32():
        want = cuda_model.predict_depth(scene_image(320, 240, 1000.0), CAMERA).depth_model
    backend = OnnxRuntimeBackend([exports["fp32"]], device="cuda")
    error = max_relative_error(depth_with(cuda_model, backend), want)
    record("onnxruntime_cuda_fp32_vs_torch_cuda", max_rel_error=error,
           median_ms=median_ms(lambda: backend.depth(probe_inputs)),
           torch_cuda_ms=torch_cuda_ms(cuda_model, probe_inputs))
    assert error < 1e-3


@needs("cuda", "tensorrt")
def test_tensorrt_fp32_engine_equals_torch_cpu(engines, tiny_model, cuda_model, probe_inputs):
    """(c) The fp32 engine (TF32 cleared at build) on the index-less device "cuda" equals PyTorch fp32."""
    from depthvlm_ros.backends.tensorrt_backend import TensorRTBackend

    backend = TensorRTBackend([engines["fp32"]])  # device="cuda": resolved to the current device's index
    assert backend.precision() == "fp32"
    error = max_relative_error(depth_with(tiny_model, backend), cpu_depth(tiny_model))
    record("tensorrt_fp32_vs_torch_cpu", max_rel_error=error,
           median_ms=median_ms(lambda: backend.depth(probe_inputs)),
           torch_cuda_ms=torch_cuda_ms(cuda_model, probe_inputs))
    assert error < TOLERANCE["fp32"]


@needs("cuda", "tensorrt")
def test_tensorrt_fp16_engine_is_finite_and_near_torch_fp32(engines, tiny_model, cuda_model, probe_inputs):
    """(d) The fp16 engine from the fp16 export (RMSNorm kept in fp32): finite, within the fp16 tolerance."""
    from depthvlm_ros.backends.tensorrt_backend import TensorRTBackend

    backend = TensorRTBackend([engines["fp16"]])
    assert backend.precision() == "fp16"
    got = depth_with(tiny_model, backend)
    error = max_relative_error(got, cpu_depth(tiny_model))
    record("tensorrt_fp16_vs_torch_cpu_fp32", max_rel_error=error,
           median_ms=median_ms(lambda: backend.depth(probe_inputs)),
           torch_cuda_ms=torch_cuda_ms(cuda_model, probe_inputs))
    assert np.isfinite(got).all() and error < TOLERANCE["fp16"]


@needs("cuda")
def test_bf16_on_cuda_follows_the_compute_capability(tiny_checkpoint, tiny_model):
    """(e) bf16 before Ampere (Jetson Xavier, Turing, Volta) is refused naming fp16; from 8.0 it runs."""
    from depthvlm_ros.pipeline import DepthVLM

    capability = torch.cuda.get_device_capability()
    if capability < (8, 0):
        with pytest.raises(SetupError, match="fp16"):
            DepthVLM.from_pretrained(tiny_checkpoint, device="cuda", dtype="bf16")
        record("bf16_on_cuda", capability=list(capability), loaded=False, max_rel_error=None)
        return
    model = DepthVLM.from_pretrained(tiny_checkpoint, device="cuda", dtype="bf16")
    got = model.predict_depth(scene_image(320, 240, 1000.0), CAMERA).depth_model
    error = max_relative_error(got, cpu_depth(tiny_model))  # recorded only: bf16 has an 8-bit mantissa
    record("bf16_on_cuda", capability=list(capability), loaded=True, max_rel_error=error)
    assert model.dtype == torch.bfloat16 and np.isfinite(got).all()


@needs("cuda", "tensorrt")
def test_tensorrt_backend_resolves_the_cuda_index_and_holds_one_engine(engines, tiny_model, probe_inputs):
    """(f) "cuda" and "cuda:0" both load (set_device needs an index); one engine is held by default."""
    from depthvlm_ros.backends.tensorrt_backend import TensorRTBackend

    want = TorchBackend(tiny_model.model).depth(probe_inputs)
    errors = {}
    for device in ("cuda", "cuda:0"):
        backend = TensorRTBackend([engines["fp32"]], device=device)
        expected = f"cuda:{torch.cuda.current_device()}" if device == "cuda" else device
        assert str(backend.device) == expected
        assert backend.held_sizes() == [SIZE] and backend.max_held_sizes() == 1
        errors[device] = max_relative_error(backend.depth(probe_inputs), want)
    record("tensorrt_device_index", max_rel_error=max(errors.values()), per_device=errors)
    assert max(errors.values()) < TOLERANCE["fp32"]


@needs("cuda")
def test_cuda_graphs_replay_the_eager_depth_with_one_host_sync_per_frame(cuda_model):
    """(g) The torch backend's ``compile graphs``: the depth forward captured as a CUDA graph per plan replays the
    eager depth (TF32 off), frame after frame; a profiled frame's host syncs (the depth's copy back, nothing in the
    forward) and the SDPA kernels that ran are recorded."""
    from depthvlm_ros.backends import BackendSpec
    from depthvlm_ros.backends.torch_inspect import profile_frames

    images = [scene_image(320, 240, 1000.0), scene_image(320, 240, 800.0)]
    with exact_fp32():
        eager = [cuda_model.predict_depth(rgb, CAMERA).depth_model for rgb in images]
        graphs = cuda_model.with_backend(BackendSpec(compile="graphs", device="cuda"))
        replayed = [graphs.predict_depth(rgb, CAMERA).depth_model for rgb in images * 2]  # capture, then replays
        errors = [max_relative_error(got, want) for got, want in zip(replayed, eager * 2)]
        plan = graphs.plan(CAMERA)
        inputs = plan.prepare([images[0]])
        profile = profile_frames(lambda: plan.backend.depth(inputs), frames=3)
        ms = median_ms(lambda: plan.backend.depth(inputs))
    record("torch_cuda_graphs_vs_eager", max_rel_error=max(errors), graphs_median_ms=ms,
           host_syncs_per_frame=profile.host_syncs_per_frame, sdpa_backends=profile.sdpa_backends)
    assert max(errors) < 1e-4
    assert not np.allclose(replayed[0], replayed[1], rtol=1e-3)  # each replay computes its own frame


@needs("cuda")
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_sdpa_kernels_per_tower_give_the_eager_math_depth(tiny_checkpoint, dtype):
    """(h) The torch backend's SDPA kernels per tower on CUDA (vision: cuDNN > flash > efficient; LLM: flash >
    efficient; math last) give the depth of the same forward with math attention only (fp32: TF32 off, 1e-4; bf16:
    its 8-bit mantissa, 2e-2); the kernels that ran are recorded."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from depthvlm_ros.backends.torch_inspect import profile_frames
    from depthvlm_ros.pipeline import DepthVLM

    if dtype == "bf16" and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("bf16 needs compute capability 8.0 (test (e) checks the refusal)")
    vlm = DepthVLM.from_pretrained(tiny_checkpoint, device="cuda", dtype=dtype)
    logged: list[str] = []
    backend = TorchBackend(vlm.model, log=logged.append)
    inputs = vlm.plan(CAMERA).prepare([scene_image(320, 240, 1000.0), scene_image(320, 240, 800.0)])
    with exact_fp32():
        chosen = backend.depth(inputs)
        on_gpu = inputs.to("cuda")
        with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):  # the plain prompt: no choice of its own inside
            math_only = vlm.model(pixel_values=on_gpu.pixel_values.to(vlm.model.dtype),
                                  static_prompt=vlm.model.static_prompt(on_gpu)).depth.float().cpu().numpy()
        profile = profile_frames(lambda: backend.depth(inputs), frames=2)
    error = max_relative_error(chosen, math_only)
    record(f"sdpa_kernels_per_tower_{dtype}", max_rel_error=error, sdpa_backends=profile.sdpa_backends, log=logged)
    assert len(logged) == 1 and "SDPA vision tower cudnn > flash > efficient > math" in logged[0]
    assert error < (1e-4 if dtype == "fp32" else 2e-2)
    assert np.isfinite(chosen).all()
