"""DepthVLM end to end: camera image + intrinsics -> metric depth (and answers).

Metric scale comes from the camera: the image is resized so that fx becomes the canonical
1000 px, the Qwen3-VL image processor snaps that to multiples of 32 px, the model predicts depth on
that grid, and the depth is resampled back to the camera's pixels. Both grids carry their own K.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from depthvlm_ros.backends.base import DepthBackend, SizeNotReadyError
from depthvlm_ros.backends.torch_backend import TorchBackend
from depthvlm_ros.devices import check_dtype_on_device
from depthvlm_ros.errors import CheckpointError, InputError
from depthvlm_ros.geometry import (
    CANONICAL_FX,
    Intrinsics,
    canonical_resize,
    canonical_size,
    cap_model_size,
    check_rgb,
    resize_depth,
    resize_rgb,
)
from depthvlm_ros.model.checkpoint import (
    REQUIRED_FILES,
    checkpoint_shapes,
    compare_state,
    expected_state,
    infer_head_widths,
    weight_files,
)
from depthvlm_ros.model.modeling import DepthVLMForConditionalGeneration
from depthvlm_ros.model.processing import DEPTH_PROMPT, ImageTextProcessor, ModelInputs, check_question

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
STAGES = ("preprocess", "vision", "llm", "head", "postprocess")  # torch; compiled backends: "model"


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise InputError(f"unknown dtype {dtype!r} (use fp32, fp16 or bf16)") from None


@dataclass
class DepthResult:
    """Depth of one image, on the model's grid and on the camera's grid, each with its K."""

    depth: np.ndarray  # (H, W) float32 metres on the camera grid, NaN invalid
    intrinsics: Intrinsics  # the camera's K (describes ``depth``)
    depth_model: np.ndarray  # (h, w) float32 metres on the processed (model) grid
    intrinsics_model: Intrinsics  # K of the processed grid (fx ~ 1000 px)
    timings_ms: dict[str, float] = field(default_factory=dict)  # per stage, for the whole batch
    backend: str = "torch"  # the backend that computed it (torch stands in while a compiled size is made)


@dataclass
class Answer:
    """A generated answer and the depth map measured from the same prefill."""

    text: str
    depth: DepthResult
    num_tokens: int
    timings_ms: dict[str, float] = field(default_factory=dict)
    stopped: bool = False  # generation was stopped early by ``should_stop`` (shutdown, timeout)


def snapped_size(processor: ImageTextProcessor, width: int, height: int) -> tuple[int, int]:
    """``width`` x ``height`` rounded to the processor's grid (32 px), ignoring its pixel limits."""
    step = processor.patch_size * processor.merge_size
    return max(step, round(width / step) * step), max(step, round(height / step) * step)


def model_input_size(
    processor: ImageTextProcessor, intrinsics: Intrinsics, canonical_fx: float = CANONICAL_FX,
    match_fy: bool = False, max_side: int = 0, max_tokens: int = 0,
) -> tuple[int, int]:
    """(width, height) pixels at which the model sees this camera's images.

    The canonical size snapped to 32 px, shrunk by the processor's ``max_pixels`` (a model's own
    input limit, from its ``preprocessor_config.json``; the small built-in model uses it) and by
    the caller's caps (``max_side`` px, ``max_tokens`` image tokens; 0 = none). Only the size is
    computed here: no image is ever resized to a canonical size beyond these bounds. A camera with
    a focal length under 1 px is refused (:func:`~depthvlm_ros.geometry.check_focal`).
    """
    natural = processor.processed_size(*canonical_size(intrinsics, canonical_fx, match_fy))
    return cap_model_size(*natural, max_side, max_tokens, processor.patch_size * processor.merge_size)


@dataclass
class ModelView:
    """One image as the model will see it, the K of the model's grid, and the depth scale."""

    image: np.ndarray  # RGB uint8 handed to the processor
    intrinsics: Intrinsics  # K of the model's depth grid
    scale: float  # metres = model output * scale (1 on the canonical route)


def model_view(
    processor: ImageTextProcessor, rgb: np.ndarray, intrinsics: Intrinsics, size: tuple[int, int],
    canonical_fx: float = CANONICAL_FX, match_fy: bool = False,
) -> ModelView:
    """Resize one image for the model (what :meth:`DepthVLM.prepare` does per image; the trainer too).

    If ``size`` is what the processor makes of the canonical size (snapped to 32 px, or enlarged
    to its ``min_pixels``), this is the released protocol: resize so fx becomes ``canonical_fx``
    and let the processor do the rest (depth scale 1). Any smaller size (the processor's
    ``max_pixels``, a cap, a compiled backend's fixed size) resizes straight to ``size``; the
    model then sees focal ``fx'`` and its output is multiplied by ``fx' / canonical_fx`` (the
    canonical-camera transform), so depth stays metric where the stock pipeline would silently
    shrink the image.
    """
    rgb = check_rgb(rgb)
    canon = canonical_size(intrinsics, canonical_fx, match_fy)
    natural = processor.processed_size(*canon)
    snapped = snapped_size(processor, *canon)
    if tuple(size) == natural and natural[0] * natural[1] >= snapped[0] * snapped[1]:
        image, k = canonical_resize(rgb, intrinsics, canonical_fx, match_fy)
        return ModelView(image, k.resized(*size), 1.0)
    if (rgb.shape[1], rgb.shape[0]) != intrinsics.size:
        raise InputError(f"image is {rgb.shape[1]}x{rgb.shape[0]} but intrinsics describe "
                         f"{intrinsics.width}x{intrinsics.height}")
    k = intrinsics.resized(*size)
    return ModelView(resize_rgb(rgb, *size), k, k.fx / canonical_fx)


class _StageClock:
    """Wall-clock per stage; synchronises CUDA so GPU work is charged to its stage."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.ms: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.ms[name] = self.ms.get(name, 0.0) + (time.perf_counter() - start) * 1e3


class DepthVLM:
    """A loaded DepthVLM: processor + model on one device and dtype."""

    def __init__(
        self,
        model: DepthVLMForConditionalGeneration,
        processor: ImageTextProcessor,
        name: str = "depthvlm",
        folder: Path | None = None,
    ) -> None:
        self.model = model.eval()
        self.processor = processor
        self.name = name
        self.folder = folder
        #: What runs the depth path (``predict_depth``); ``ask`` always uses ``self.model``.
        self.backend: DepthBackend = TorchBackend(self.model)
        #: One forward at a time: ``ask`` hooks the shared model and the stock model keeps
        #: per-call state (rope deltas), so threads (a ROS executor) take turns.
        self.lock = threading.RLock()

    @property
    def _torch(self) -> DepthBackend:
        return self.backend if isinstance(self.backend, TorchBackend) else TorchBackend(self.model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32"
    ) -> "DepthVLM":
        """Load a DepthVLM folder (Hugging Face layout) strictly, by key name, safetensors only.

        Raises :class:`CheckpointError` naming what is wrong: a missing file, pickle-only weights,
        a missing, unexpected or wrongly shaped key.
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
            raise InputError("device cuda requested but this torch has no CUDA device")
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
        processor = ImageTextProcessor.from_folder(folder)
        return cls(model.to(device), processor, name=folder.name, folder=folder)

    # -- depth --------------------------------------------------------------------------------

    def prepare(
        self,
        images: Sequence[np.ndarray],
        intrinsics: Sequence[Intrinsics],
        user_text: str,
        canonical_fx: float = CANONICAL_FX,
        match_fy: bool = False,
        max_side: int = 0,
        max_tokens: int = 0,
        size: tuple[int, int] | None = None,
    ) -> tuple[ModelInputs, list[Intrinsics], float]:
        """Resize + process a batch; returns inputs, the model grid's K per image, and a depth scale.

        The released protocol: canonical-focal resize, then the processor's snap to 32 px (depth
        scale 1). A backend compiled for fixed sizes that does not have this size gets the image
        resized straight to its nearest size instead (K adjusted); the model then sees focal
        ``fx'`` instead of ``canonical_fx``, and its depth is multiplied by ``fx' / canonical_fx``
        (the canonical-camera transform) — an approximation the docs name. A size cap
        (``max_side`` px, ``max_tokens`` image tokens; 0 = none) that the canonical size exceeds
        takes the same route, to the capped size. ``size``: the model grid a backend runs (from
        :meth:`route`); None = the reference's, i.e. the capped canonical size (PyTorch runs any size).
        """
        if len(images) != len(intrinsics) or not images:
            raise InputError("need one intrinsics per image, and at least one image")
        sizes = {canonical_size(k, canonical_fx, match_fy) for k in intrinsics}
        if len(sizes) != 1:
            raise InputError(f"a batch must reach the model at one size; canonical sizes {sorted(sizes)}")
        if size is None:
            size = model_input_size(self.processor, intrinsics[0], canonical_fx, match_fy, max_side, max_tokens)
        views = [model_view(self.processor, rgb, k, size, canonical_fx, match_fy)
                 for rgb, k in zip(images, intrinsics)]
        inputs = self.processor([v.image for v in views], user_text)
        if views[0].scale == 1.0:  # the canonical route: the processor's snap decides the grid
            _, gh, gw = (int(v) for v in inputs.image_grid_thw[0])
            width, height = gw * self.processor.patch_size, gh * self.processor.patch_size
            return inputs, [k.resized(width, height) for k in intrinsics], 1.0
        return inputs, [v.intrinsics for v in views], views[0].scale

    def route(
        self, intrinsics: Intrinsics, canonical_fx: float = CANONICAL_FX, match_fy: bool = False,
        max_side: int = 0, max_tokens: int = 0,
    ) -> tuple[DepthBackend, tuple[int, int]]:
        """The backend that runs this camera's depth now, and the model-grid size it runs at.

        The configured backend at its nearest size; PyTorch at the wanted size while a compiled
        backend is still making its first size in the background (:class:`SizeNotReadyError`).
        """
        wanted = model_input_size(self.processor, intrinsics, canonical_fx, match_fy, max_side, max_tokens)
        try:
            return self.backend, self.backend.nearest_size(*wanted)
        except SizeNotReadyError:
            return self._torch, wanted

    @torch.inference_mode()
    def predict_depth_batch(
        self,
        images: Sequence[np.ndarray],
        intrinsics: Sequence[Intrinsics],
        canonical_fx: float = CANONICAL_FX,
        match_fy: bool = False,
        max_side: int = 0,
        max_tokens: int = 0,
    ) -> list[DepthResult]:
        """Depth for several images that reach the model at one size (one forward for all).

        ``max_side``/``max_tokens`` cap the model input size (see :meth:`prepare`); 0 = the protocol's size.
        """
        with self.lock:
            return self._predict_depth_batch(images, intrinsics, canonical_fx, match_fy, max_side, max_tokens)

    def _predict_depth_batch(
        self, images: Sequence[np.ndarray], intrinsics: Sequence[Intrinsics], canonical_fx: float, match_fy: bool,
        max_side: int = 0, max_tokens: int = 0,
    ) -> list[DepthResult]:
        clock = _StageClock(self.device)
        backend, size = self.route(intrinsics[0], canonical_fx, match_fy, max_side, max_tokens)
        with clock.stage("preprocess"):
            inputs, model_k, scale = self.prepare(images, intrinsics, DEPTH_PROMPT, canonical_fx, match_fy,
                                                  size=size)
        try:
            depth = backend.depth(inputs, clock.stage)
        except SizeNotReadyError:  # the size was evicted since it was chosen: PyTorch runs these inputs
            backend = self._torch
            depth = backend.depth(inputs, clock.stage)
        if scale != 1.0:
            depth = depth * np.float32(scale)
        with clock.stage("postprocess"):
            results = self._results(depth, model_k, intrinsics)
        for r in results:
            r.timings_ms = dict(clock.ms)
            r.backend = backend.name
        return results

    def predict_depth(
        self, rgb: np.ndarray, intrinsics: Intrinsics, canonical_fx: float = CANONICAL_FX, match_fy: bool = False,
        max_side: int = 0, max_tokens: int = 0,
    ) -> DepthResult:
        """Metric depth of one RGB uint8 image (H, W, 3) taken with ``intrinsics``."""
        return self.predict_depth_batch([rgb], [intrinsics], canonical_fx, match_fy, max_side, max_tokens)[0]

    @staticmethod
    def _results(
        depth: np.ndarray, model_k: Sequence[Intrinsics], camera_k: Sequence[Intrinsics]
    ) -> list[DepthResult]:
        return [
            DepthResult(
                depth=resize_depth(d, ck.width, ck.height),
                intrinsics=ck,
                depth_model=np.ascontiguousarray(d, dtype=np.float32),
                intrinsics_model=mk,
            )
            for d, mk, ck in zip(depth, model_k, camera_k)
        ]

    # -- questions ----------------------------------------------------------------------------

    @torch.inference_mode()
    def ask(
        self,
        rgb: np.ndarray,
        intrinsics: Intrinsics,
        question: str,
        max_new_tokens: int = 64,
        canonical_fx: float = CANONICAL_FX,
        max_side: int = 0,
        max_tokens: int = 0,
        should_stop: Callable[[], bool] | None = None,
    ) -> Answer:
        """Answer a question about the image (greedy) and return the depth from the same prefill.

        ``generate()`` runs unchanged; two forward hooks keep what its prefill computes anyway (the
        DeepStack features and the LLM's last hidden state), so the vision tower and the prefill
        each run once for both the answer and the depth map. ``should_stop()`` is checked after
        every generated token; when it returns True generation ends there (``Answer.stopped``).
        """
        question = check_question(question)
        if not 1 <= int(max_new_tokens) <= 4096:
            raise InputError(f"max_new_tokens must be in 1..4096, got {max_new_tokens}")
        with self.lock:
            return self._ask(rgb, intrinsics, question, int(max_new_tokens), canonical_fx, max_side, max_tokens,
                             should_stop)

    def _ask(self, rgb: np.ndarray, intrinsics: Intrinsics, question: str, max_new_tokens: int,
             canonical_fx: float, max_side: int = 0, max_tokens: int = 0,
             should_stop: Callable[[], bool] | None = None) -> Answer:
        from transformers import StoppingCriteria, StoppingCriteriaList

        stopped = [False]

        class StopWhenAsked(StoppingCriteria):
            def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
                stopped[0] = stopped[0] or bool(should_stop is not None and should_stop())
                return torch.full((input_ids.shape[0],), stopped[0], dtype=torch.bool, device=input_ids.device)

        clock = _StageClock(self.device)
        with clock.stage("preprocess"):
            inputs, model_k, scale = self.prepare([rgb], [intrinsics], question, canonical_fx,
                                                  max_side=max_side, max_tokens=max_tokens)
            inputs = inputs.to(self.device)
        captured: dict[str, Any] = {}

        def keep_vision(_module: Any, _args: Any, output: Any) -> None:
            captured.setdefault("deepstack", list(output.deepstack_features))

        def keep_prefill(_module: Any, _args: Any, output: Any) -> None:
            captured.setdefault("hidden", output.last_hidden_state)

        hooks = [
            self.model.model.visual.register_forward_hook(keep_vision),
            self.model.model.language_model.register_forward_hook(keep_prefill),
        ]
        try:
            with clock.stage("generate"):
                self.model.model.rope_deltas = None
                out = self.model.generate(
                    input_ids=inputs.input_ids,
                    attention_mask=inputs.attention_mask,
                    pixel_values=inputs.pixel_values.to(self.dtype),
                    image_grid_thw=inputs.image_grid_thw,
                    mm_token_type_ids=inputs.mm_token_type_ids,
                    max_new_tokens=int(max_new_tokens),
                    do_sample=False,
                    pad_token_id=self.processor.tokenizer.pad_token_id,
                    stopping_criteria=StoppingCriteriaList([StopWhenAsked()]) if should_stop else None,
                )
        finally:
            for hook in hooks:
                hook.remove()
        new_tokens = out[0, inputs.input_ids.shape[1]:]
        text = self.processor.tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
        with clock.stage("head"):
            feats = self.model.gather_depth_features(
                inputs.input_ids, inputs.image_grid_thw, captured["deepstack"], captured["hidden"]
            )
            depth = self.model.predict_depth_map(feats).float().cpu().numpy() * np.float32(scale)
        with clock.stage("postprocess"):
            result = self._results(depth, model_k, [intrinsics])[0]
        result.timings_ms = dict(clock.ms)
        return Answer(text=text, depth=result, num_tokens=int(new_tokens.numel()), timings_ms=dict(clock.ms),
                      stopped=stopped[0])
