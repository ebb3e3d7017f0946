"""Export the depth path to ONNX: processed pixels of one size -> depth on the model grid.

Because the depth prompt is fixed, everything but the pixels is a constant of the size: the
vision tower's position ids and position-embedding interpolation taps, ``cu_seqlens``, the LLM's
M-RoPE position ids, the prompt's token embeddings around the image-token span. They are computed
once here with stock transformers helpers and held as buffers, and the stock modules are called
with them (transformers' vision encoders accept precomputed ``cu_seqlens``, ``position_ids``,
``interp_indices``/``interp_weights``), so the traced graph has no data-dependent control flow.

The export checks itself: ``onnx.checker``, then ONNX Runtime against PyTorch on random images
(maximum relative error; fp32 fails above 1e-3). The first of them, with its PyTorch output, is
kept beside the graph as its probe (:mod:`depthvlm_ros.backends.probe`), which every backend that
loads the graph (or an engine built from it) runs before serving.

``python -m depthvlm_ros.backends.onnx_export MODEL_DIR WxH OUT`` is the export worker: the node
runs it as a separate, lower-priority process, so an export never runs on its frame path.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, cast

import numpy as np
import torch
from torch import nn

from depthvlm_ros import __version__
from depthvlm_ros.backends.base import INPUT_NAME, OUTPUT_NAME, BackendError
from depthvlm_ros.backends.probe import max_relative_error, write_probe
from depthvlm_ros.devices import exact_fp32
from depthvlm_ros.errors import DepthVLMError, InputError
from depthvlm_ros.model.processing import DEPTH_PROMPT, ImageTextProcessor, ModelInputs

if TYPE_CHECKING:
    from depthvlm_ros.model.modeling import DepthVLMForConditionalGeneration

__all__ = ["ExportError", "ExportReport", "export_onnx", "inputs_for_size", "max_relative_error", "read_metadata"]

#: Parity thresholds (max relative error vs PyTorch) by export dtype.
PARITY_LIMITS = {"fp32": 1e-3, "fp16": 3e-2}
#: Models with more parameter bytes than this are saved with external data (ONNX's 2 GB limit).
EXTERNAL_DATA_BYTES = 1_500_000_000
OPSET = 18


class ExportError(BackendError):
    """The export did not produce a graph that matches PyTorch."""


class ExportSource(Protocol):
    """What an export reads of a ``DepthVLM`` or a ``LoadedModel``."""

    @property
    def model(self) -> DepthVLMForConditionalGeneration: ...

    @property
    def processor(self) -> ImageTextProcessor: ...

    @property
    def name(self) -> str: ...

    @property
    def folder(self) -> Path | None: ...


def inputs_for_size(
    processor: ImageTextProcessor, width: int, height: int, image: np.ndarray | None = None
) -> ModelInputs:
    """Model inputs for a ``width`` x ``height`` model grid (multiples of the 32 px patch)."""
    step = processor.patch_size * processor.merge_size
    if width % step or height % step:
        raise InputError(f"export size {width}x{height} must be a multiple of {step} px on both sides")
    if processor.processed_size(width, height) != (width, height):
        raise BackendError(
            f"the image processor does not keep {width}x{height} (outside its min/max pixels); "
            f"it would run at {processor.processed_size(width, height)}"
        )
    if image is None:
        image = np.zeros((height, width, 3), np.uint8)
    return processor([image], DEPTH_PROMPT)


class DepthExportModule(nn.Module):
    """The model's own forward with the depth prompt precomputed for one size (what is traced).

    The :class:`~depthvlm_ros.model.modeling.StaticPrompt`'s tensors are registered as buffers so
    they follow the module's device and trace as constants; the forward is the model's.
    """

    def __init__(self, model: DepthVLMForConditionalGeneration, inputs: ModelInputs) -> None:
        super().__init__()
        self.model = model
        try:
            self.prompt = model.static_prompt(inputs)
        except ValueError as exc:
            raise BackendError(str(exc)) from None
        for name, value in self.prompt.tensors().items():
            self.register_buffer(name, value.detach().clone(), persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(patches, C*T*P*P) processed pixels of one image -> (1, H, W) depth in metres."""
        prompt = self.prompt.with_tensors({name: getattr(self, name) for name in self.prompt.tensors()})
        return self.model(pixel_values=pixel_values, static_prompt=prompt, return_logits=False).depth


@dataclass
class ExportReport:
    """What an ONNX export wrote: the file, its model-grid [width, height] (pixels) and dtype, the largest relative
    error against PyTorch on ``checked_images`` random images, the export time (seconds), whether the weights are
    stored as external data, and the model fingerprint."""

    path: str
    size: list[int]
    dtype: str
    max_rel_error: float
    checked_images: int
    export_s: float
    external_data: bool
    model_fingerprint: str


def read_metadata(path: str | Path) -> dict[str, str]:
    """depthvlm metadata stored in an exported ONNX file (size, dtype, model fingerprint, ...)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises protobuf's DecodeError and others for a corrupt file
        raise BackendError(f"{path}: not a readable ONNX file ({exc.__class__.__name__})") from None
    return {p.key: p.value for p in model.metadata_props}


def export_size(meta: dict[str, str], path: str | Path) -> tuple[int, int]:
    """Model-grid (width, height) an export was made for, from its metadata; BackendError if absent."""
    try:
        width, height = (int(v) for v in meta["depthvlm.size"].lower().split("x"))
    except KeyError:
        raise BackendError(f"{path}: not a depthvlm export (no depthvlm.size metadata)") from None
    except ValueError:
        raise BackendError(f"{path}: malformed depthvlm.size {meta['depthvlm.size']!r}; re-export it") from None
    return width, height


def _export_copy(vlm: ExportSource, torch_dtype: torch.dtype) -> DepthVLMForConditionalGeneration:
    """The model to trace: on CPU in the export dtype, never the caller's live model changed.

    The live model is used as is when it already is a CPU model of that dtype; otherwise a copy is
    reloaded from the model folder (no extra GPU memory), or deep-copied for an in-memory model.
    """
    import copy

    from depthvlm_ros.model.modeling import DepthVLMForConditionalGeneration

    live = vlm.model
    p = next(live.parameters())
    if p.dtype == torch_dtype and p.device.type == "cpu":
        return live
    if vlm.folder is not None:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        try:
            copy_ = DepthVLMForConditionalGeneration.from_pretrained(
                str(vlm.folder), dtype=torch_dtype, use_safetensors=True, local_files_only=True)
        finally:
            hf_logging.enable_progress_bar()
        return copy_.eval()
    copied: nn.Module = copy.deepcopy(live)  # a Module to mypy: transformers' @wraps(Module.to) hides its signature
    return cast("DepthVLMForConditionalGeneration", copied.to(device="cpu", dtype=torch_dtype).eval())


def export_onnx(
    vlm: ExportSource,
    width: int,
    height: int,
    out_path: str | Path,
    dtype: str = "fp32",
    check_images: int = 2,
    progress: Callable[[str], None] = print,
) -> ExportReport:
    """Export ``vlm`` (a ``DepthVLM`` or a ``LoadedModel``) for a ``width`` x ``height`` model grid; check it.

    The graph is traced from a CPU model of the export dtype (the caller's model is not changed)
    and checked against the model's forward on the processor's inputs (not the static prompt)
    of the fp32 model on ``check_images`` random images (seeded: the same images every time); the
    first becomes the graph's probe. It is written under a temporary folder and moved to
    ``out_path`` only once it passed, so a failed or interrupted export never leaves a graph that
    looks usable.
    """
    import shutil

    import onnx

    from depthvlm_ros.backends.onnxruntime_backend import OnnxRuntimeBackend
    from depthvlm_ros.model.checkpoint import model_fingerprint

    if dtype not in PARITY_LIMITS:
        raise InputError(f"export dtype must be one of {sorted(PARITY_LIMITS)}, got {dtype}")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
    model = _export_copy(vlm, torch_dtype)
    inputs = inputs_for_size(vlm.processor, width, height)
    wrapper = DepthExportModule(model, inputs).eval()
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    external = n_bytes > EXTERNAL_DATA_BYTES
    staging = out_path.parent / f".{out_path.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    staged = staging / out_path.name
    try:
        progress(f"[1/4] tracing and converting the depth path at {width}x{height} ({dtype}, "
                 f"{n_bytes / 1e6:.0f} MB of weights{', external data' if external else ''})")
        start = time.perf_counter()
        with torch.no_grad():
            program = torch.onnx.export(
                wrapper, (inputs.pixel_values.to(torch_dtype),), input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME], opset_version=OPSET, dynamo=True, external_data=external,
                verbose=False,
            )
        assert program is not None  # dynamo=True: torch.onnx.export returns the ONNXProgram
        program.save(str(staged), external_data=external)
        export_s = time.perf_counter() - start
        del program, wrapper
        fingerprint = model_fingerprint(vlm.folder) if vlm.folder is not None else ""
        meta = {
            "depthvlm.size": f"{width}x{height}",
            "depthvlm.dtype": dtype,
            "depthvlm.vision_patch": str(vlm.processor.patch_size),
            "depthvlm.model_fingerprint": fingerprint,
            "depthvlm.model_name": vlm.name,
            "depthvlm.prompt": DEPTH_PROMPT,
            "depthvlm.version": __version__,
            "depthvlm.input_layout": "Qwen2-VL processor pixel_values for one image: (patches, C*T*P*P)",
        }
        proto = onnx.load(str(staged), load_external_data=False)
        del proto.metadata_props[:]
        for key, value in meta.items():
            proto.metadata_props.add(key=key, value=value)
        onnx.save(proto, str(staged))

        progress("[2/4] onnx.checker")
        onnx.checker.check_model(str(staged), full_check=False)

        progress("[3/4] loading in ONNX Runtime")
        ort_backend = OnnxRuntimeBackend([staged], providers=["CPUExecutionProvider"], verify=False)
        reference = vlm.model if next(vlm.model.parameters()).dtype == torch.float32 else model
        ref_device = next(reference.parameters()).device
        rng = np.random.default_rng([width, height])
        worst = 0.0
        for i in range(check_images):
            image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            check_inputs = inputs_for_size(vlm.processor, width, height, image)
            with torch.inference_mode(), exact_fp32():  # no TF32 on a GPU: the reference is fp32
                r = check_inputs.to(ref_device)
                want = reference(**r.model_kwargs(next(reference.parameters()).dtype),
                                 return_logits=False).depth.float().cpu().numpy()
            if i == 0:  # the probe: what every backend that loads this graph must reproduce
                write_probe(staged, check_inputs.pixel_values.numpy(), want, (width, height))
            got = ort_backend.depth(check_inputs)
            worst = max(worst, max_relative_error(got, want))
            progress(f"[4/4] parity vs PyTorch on random image {i + 1}/{check_images}: max rel error {worst:.2e}")
        del ort_backend
        report = ExportReport(str(out_path), [width, height], dtype, worst, check_images, round(export_s, 2),
                              external, fingerprint)
        if worst > PARITY_LIMITS[dtype]:
            failed = out_path.parent / f"{out_path.stem}.failed"
            shutil.rmtree(failed, ignore_errors=True)
            staging.rename(failed)
            raise ExportError(
                f"ONNX Runtime differs from PyTorch by {worst:.2e} (limit {PARITY_LIMITS[dtype]:.0e} for {dtype}); "
                f"the graph is kept for inspection in {failed}"
            )
        Path(str(staged) + ".json").write_text(json.dumps(asdict(report), indent=2) + "\n")
        for item in staging.iterdir():  # the .onnx last, so a visible .onnx always has its data
            if item.name != out_path.name:
                os.replace(item, out_path.parent / item.name)
        os.replace(staged, out_path)
        return report
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _end_with_parent(parent: int) -> None:
    """Get SIGTERM when the parent dies (Linux prctl PR_SET_PDEATHSIG), so a killed node leaves no export."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        sys.exit(143)


def main(argv: list[str] | None = None) -> int:
    """The export worker (see the module docstring): exit 0 with the graph in place, 2 with one line."""
    parser = argparse.ArgumentParser(prog="python -m depthvlm_ros.backends.onnx_export",
                                     description="export a DepthVLM folder's depth path at one size (worker)")
    parser.add_argument("model", type=Path, help="DepthVLM folder")
    parser.add_argument("size", help="model-grid WxH, multiples of 32 px")
    parser.add_argument("out", type=Path, help="output .onnx path")
    parser.add_argument("--nice", type=int, default=10, help="lower this process's priority by N (default 10)")
    parser.add_argument("--parent", type=int, default=0, help="end when this process (the node) ends")
    args = parser.parse_args(argv)
    if args.nice > 0:
        os.nice(args.nice)
    # SIGTERM (the node cancelling) unwinds normally, so export_onnx removes its staging folder.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.parent:
        _end_with_parent(args.parent)
    try:
        width, height = (int(v) for v in args.size.lower().split("x"))
        from depthvlm_ros.model.loading import load_depthvlm

        vlm = load_depthvlm(args.model)
        report = export_onnx(vlm, width, height, args.out, check_images=1,
                             progress=lambda line: print(line, flush=True))
    except (DepthVLMError, ValueError) as exc:
        print(f"export failed: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code if isinstance(exc, DepthVLMError) else 2
    print(json.dumps(asdict(report)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
