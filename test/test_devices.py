"""Device and number-format rules: what a GPU user's first run depends on, checked without a GPU."""

from __future__ import annotations

import pytest
import torch

from depthvlm_ros.devices import check_dtype_on_device, cuda_device, exact_fp32
from depthvlm_ros.errors import InputError, SetupError


@pytest.mark.parametrize(("device", "current", "want"), [
    ("cuda", 0, "cuda:0"),  # the default and the README's --device cuda
    ("cuda", 2, "cuda:2"),
    ("cuda:1", 0, "cuda:1"),
    ("cpu", 1, "cuda:1"),  # the tools' default device with --backend tensorrt
])
def test_a_gpu_backend_gets_an_indexed_cuda_device(device, current, want):
    resolved = cuda_device(device, current)
    assert resolved == want
    assert torch.device(resolved).index is not None  # torch.cuda.set_device refuses an index-less device


@pytest.mark.parametrize("device", ["cuda:x", "mps", "cuda:", "tpu:0"])
def test_a_device_that_is_no_cuda_device_is_one_clear_error(device):
    with pytest.raises(InputError, match="cuda"):
        cuda_device(device, 0)


def test_bf16_is_refused_on_a_gpu_without_it_and_the_error_names_what_works():
    with pytest.raises(SetupError, match=r"Xavier \(compute capability 7.2\) has no bf16; use fp16"):
        check_dtype_on_device("bf16", "cuda", (7, 2), "Xavier")
    check_dtype_on_device("bf16", "cuda", (8, 7), "Orin")  # Ampere and newer compute bf16
    check_dtype_on_device("fp16", "cuda", (7, 2), "Xavier")
    check_dtype_on_device("bf16", "cpu", None)


def test_exact_fp32_turns_tf32_off_inside_and_restores_the_settings():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # cuDNN's default
    try:
        with exact_fp32():
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        with pytest.raises(RuntimeError), exact_fp32():
            raise RuntimeError("restored on errors too")
        assert torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
