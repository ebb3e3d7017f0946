"""Loading a DepthVLM folder: strict, by key name, safetensors only, never remote code."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from depthvlm_ros.devices import check_dtype_on_device
from depthvlm_ros.errors import CheckpointError, InputError, SetupError
from depthvlm_ros.model.checkpoint import (
    REQUIRED_FILES,
    checkpoint_shapes,
    compare_state,
    expected_state,
    infer_head_widths,
    weight_files,
)
from depthvlm_ros.model.modeling import DepthVLMForConditionalGeneration
from depthvlm_ros.model.processing import ImageTextProcessor

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """The torch dtype a name means (fp32/float32, fp16/float16, bf16/bfloat16; a torch.dtype as is); InputError
    for any other name."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise InputError(f"unknown dtype {dtype!r} (use fp32, fp16 or bf16)") from None


@dataclass
class LoadedModel:
    """A loaded checkpoint: the model (eval mode, on its device), its processor, and where it came from."""

    model: DepthVLMForConditionalGeneration
    processor: ImageTextProcessor
    name: str
    folder: Path | None


def load_depthvlm(
    folder: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32",
    weights: bool = True,
) -> LoadedModel:
    """Load a DepthVLM folder (Hugging Face layout) strictly, by key name, safetensors only.

    Raises :class:`CheckpointError` naming what is wrong: a missing file, pickle-only weights,
    a missing, unexpected or wrongly shaped key. ``weights=False``: the same checks (keys and shapes
    from the files' headers), then the model is built on PyTorch's ``meta`` device and no weight is
    read: the processor and config serve a remote depth path (``backend: triton``) and nothing runs
    the model here.
    """
    from transformers import Qwen3VLConfig
    from transformers.utils import logging as hf_logging

    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"model folder {folder} does not exist")
    for name in REQUIRED_FILES:
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder}: missing {name}")
    try:
        raw = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{folder}/config.json: not valid JSON ({exc.msg})") from None
    if raw.get("model_type") != "qwen3_vl":
        raise CheckpointError(f"{folder}: model_type is {raw.get('model_type')!r}, expected 'qwen3_vl'")
    if "depth_head_type" not in raw:
        raise CheckpointError(f"{folder}: config.json has no depth_head_type (not a DepthVLM checkpoint)")
    torch_dtype = resolve_dtype(dtype)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SetupError("device cuda requested but this torch has no CUDA device")
    if device.type == "cuda":
        check_dtype_on_device("bf16" if torch_dtype == torch.bfloat16 else "fp32 or fp16", "cuda",
                              torch.cuda.get_device_capability(device), torch.cuda.get_device_name(device))
    config = Qwen3VLConfig.from_pretrained(str(folder), local_files_only=True)
    found = checkpoint_shapes(weight_files(folder))
    for name, value in infer_head_widths(found).items():
        if name not in raw:  # the config is silent: the released format; widths from the weights
            setattr(config, name, value)
    try:
        expected, optional = expected_state(DepthVLMForConditionalGeneration, config)
    except ValueError as exc:
        raise CheckpointError(f"{folder}: {exc}") from None
    compare_state(expected, found, optional)
    processor = ImageTextProcessor.from_folder(folder)
    if not weights:
        with torch.device("meta"):
            empty = DepthVLMForConditionalGeneration(config).to(torch_dtype)
        return LoadedModel(empty.eval(), processor, folder.name, folder)

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model, info = DepthVLMForConditionalGeneration.from_pretrained(
            str(folder), config=config, dtype=torch_dtype, use_safetensors=True,
            local_files_only=True, trust_remote_code=False, output_loading_info=True,
        )
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    leftovers = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v}
    if leftovers or info.get("error_msgs"):
        raise CheckpointError(f"{folder}: loading left {leftovers or info['error_msgs']}")
    return LoadedModel(model.to(device), processor, folder.name, folder)

