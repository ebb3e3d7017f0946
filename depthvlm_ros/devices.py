"""Which device and number format a model or engine runs on: small pure rules, testable without a GPU.

- :func:`cuda_device` turns what a user writes (``cuda``, ``cuda:1``, or ``cpu`` for a backend that
  only runs on a GPU) into the indexed device that ``torch.cuda.set_device`` accepts.
- :func:`check_dtype_on_device` refuses bf16 on a GPU without it (compute capability < 8.0: Jetson
  Xavier, Turing, Volta) with the dtype that works there.
- :func:`exact_fp32` turns TF32 off for a block: PyTorch's cuDNN convolutions use TF32 by default on
  Ampere and newer (Orin included), which moves fp32 results by ~3e-3 relative — beyond an fp32
  parity limit of 1e-3. References that compiled artifacts are checked against run inside it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from depthvlm_ros.errors import InputError, SetupError

#: Compute capability from which NVIDIA GPUs compute in bf16 (Ampere; Orin is 8.7).
BF16_MIN_CAPABILITY = (8, 0)


def cuda_device(device: str, current_index: int) -> str:
    """``cuda:N`` for ``device``: ``cuda:N`` as given, ``cuda`` (or ``cpu``, for a GPU-only backend) as the
    current CUDA device ``current_index``. InputError for anything else."""
    kind, colon, index = str(device).partition(":")
    if kind == "cuda" and colon:
        if not index.isdigit():
            raise InputError(f"device {device!r}: the CUDA index must be a number (cuda:0, cuda:1, ...)")
        return f"cuda:{int(index)}"
    if kind in ("cuda", "cpu") and not colon:
        return f"cuda:{int(current_index)}"
    raise InputError(f"device {device!r} is not a CUDA device (use cuda or cuda:N)")


def check_dtype_on_device(dtype: str, device_type: str, capability: tuple[int, int] | None, gpu_name: str = "") -> None:
    """SetupError when ``dtype`` (fp32, fp16, bf16) cannot run on the device; ``capability`` is the GPU's
    compute capability (None on CPU, where every dtype runs, bf16 slowly)."""
    if dtype == "bf16" and device_type == "cuda" and capability is not None and capability < BF16_MIN_CAPABILITY:
        raise SetupError(
            f"{gpu_name or 'this GPU'} (compute capability {capability[0]}.{capability[1]}) has no bf16; "
            "use fp16 (--dtype fp16, node parameter precision: fp16) or fp32"
        )


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """TF32 off for matmuls and cuDNN inside the block (restored after): fp32 computed as fp32."""
    import torch

    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
