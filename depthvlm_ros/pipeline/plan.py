"""A plan per camera: everything about a frame's way through the model that only the camera decides.

A camera's geometry changes only when its camera_info does, so the model's input size, the K of
every grid, the depth scale of the route, the resizes, the prompt's token ids and the depth
resampling taps are computed once per (camera, settings, backend size) and applied to every frame:

    frame --plan.prepare--> ModelInputs --backend.depth--> depth on the model grid
          --plan.restore--> depth on the camera grid (+ its K) --> messages

Two routes (see :func:`image_plan`): the released protocol (canonical-focal resize, then the
processor's snap to 32 px; depth scale 1), and a direct resize to a smaller size (the model's own
``max_pixels``, a size cap, a compiled backend's nearest size) whose depth is multiplied by
``fx' / canonical_fx`` (the canonical-camera transform).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import numpy as np
import torch

from depthvlm_ros.errors import InputError
from depthvlm_ros.geometry import (
    CANONICAL_FX,
    MAX_IMAGE_SIDE,
    Intrinsics,
    canonical_size,
    cap_model_size,
    check_rgb,
    resize_depth,
)
from depthvlm_ros.model.preprocess import PixelLayout, preprocess_image
from depthvlm_ros.model.processing import DEPTH_PROMPT, ImageTextProcessor, ModelInputs

if TYPE_CHECKING:
    from depthvlm_ros.backends.base import DepthBackend


@dataclass(frozen=True)
class RouteSettings:
    """The node's and tools' settings that shape the model input (0 = no cap)."""

    canonical_fx: float = CANONICAL_FX
    match_fy: bool = False
    max_side: int = 0
    max_tokens: int = 0


#: The released protocol: canonical focal 1000 px, no caps.
DEFAULT_ROUTE = RouteSettings()


def snapped_size(processor: ImageTextProcessor, width: int, height: int) -> tuple[int, int]:
    """``width`` x ``height`` rounded to the processor's grid (32 px), ignoring its pixel limits."""
    step = processor.patch_size * processor.merge_size
    return max(step, round(width / step) * step), max(step, round(height / step) * step)


def model_input_size(
    processor: ImageTextProcessor, intrinsics: Intrinsics, settings: RouteSettings = DEFAULT_ROUTE
) -> tuple[int, int]:
    """(width, height) pixels at which the model sees this camera's images (the reference's size).

    The canonical size snapped to 32 px, shrunk by the processor's ``max_pixels`` (a model's own
    input limit, from its ``preprocessor_config.json``; the small built-in model uses it) and by
    the caps in ``settings``. A camera with a focal length under 1 px is refused
    (:func:`~depthvlm_ros.geometry.check_focal`).
    """
    natural = processor.processed_size(*canonical_size(intrinsics, settings.canonical_fx, settings.match_fy))
    return cap_model_size(*natural, settings.max_side, settings.max_tokens,
                          processor.patch_size * processor.merge_size)


@dataclass(frozen=True)
class ImagePlan:
    """How one camera's images become ``pixel_values`` at one model-grid size (no backend involved)."""

    camera: Intrinsics  # K of the camera grid (the images this plan takes)
    resizes: tuple[tuple[int, int], ...]  # the image's resizes, in order (each (width, height))
    model_k: Intrinsics  # K of the model's depth grid
    scale: float  # metres = model output * scale (1 on the canonical route)
    layout: PixelLayout

    @property
    def size(self) -> tuple[int, int]:
        """The model grid (width, height), pixels."""
        return self.model_k.size

    def metric(self, output: np.ndarray) -> np.ndarray:
        """The model's output (model units) -> metres on the model grid (the route's scale applied)."""
        output = np.asarray(output, dtype=np.float32)
        return output * np.float32(self.scale) if self.scale != 1.0 else output

    def grid_thw(self) -> list[int]:
        """The image's grid in vision patches, as the processor reports it."""
        p = self.layout.patch_size
        return [1, self.size[1] // p, self.size[0] // p]

    def n_tokens(self) -> int:
        """Image tokens in the prompt (merged patches)."""
        m = self.layout.merge_size
        _, gh, gw = self.grid_thw()
        return gh * gw // (m * m)

    def pixel_values(self, rgb: np.ndarray, device: torch.device | str = "cpu", exact: bool = False) -> torch.Tensor:
        """One RGB uint8 (H, W, 3) image of this camera -> ``pixel_values`` on ``device``.

        ``exact``: PIL's resize (the stock processor's pixels, bit for bit) instead of torch's
        (:mod:`~depthvlm_ros.model.preprocess`).
        """
        rgb = check_rgb(rgb)
        if (rgb.shape[1], rgb.shape[0]) != self.camera.size:
            raise InputError(f"image is {rgb.shape[1]}x{rgb.shape[0]} but intrinsics describe "
                             f"{self.camera.width}x{self.camera.height}")
        if not rgb.flags.writeable:  # torch only wraps writable arrays without a warning
            rgb = rgb.copy()
        return preprocess_image(rgb, self.resizes, self.layout, device, exact)


def image_plan(
    processor: ImageTextProcessor, camera: Intrinsics, size: tuple[int, int],
    settings: RouteSettings = DEFAULT_ROUTE,
) -> ImagePlan:
    """The route of this camera's images to a ``size`` model grid (what the trainer uses too).

    If ``size`` is what the processor makes of the canonical size (snapped to 32 px, or enlarged
    to its ``min_pixels``), this is the released protocol: resize so fx becomes ``canonical_fx``,
    then the processor's resize (depth scale 1). Any smaller size resizes straight to ``size``;
    the model then sees focal ``fx'`` and its output is multiplied by ``fx' / canonical_fx``, so
    depth stays metric where the stock pipeline would silently shrink the image.
    """
    canon = canonical_size(camera, settings.canonical_fx, settings.match_fy)
    natural = processor.processed_size(*canon)
    snapped = snapped_size(processor, *canon)
    layout = PixelLayout.from_image_processor(processor.image_processor)
    if tuple(size) == natural and natural[0] * natural[1] >= snapped[0] * snapped[1]:
        if max(canon) > MAX_IMAGE_SIDE:
            raise InputError(f"canonical size {canon[0]}x{canon[1]} (fx={camera.fx:g} -> {settings.canonical_fx:g}) "
                             f"exceeds {MAX_IMAGE_SIDE} pixels: cap the model size (max_side_px)")
        return ImagePlan(camera, (canon, natural), camera.resized(*natural), 1.0, layout)
    final = processor.processed_size(*size)  # the processor's own limits have the last word
    k = camera.resized(*final)
    return ImagePlan(camera, (cast("tuple[int, int]", tuple(size)), final), k, k.fx / settings.canonical_fx, layout)


def prompt_inputs(processor: ImageTextProcessor, image: ImagePlan, user_text: str, pixel_values: torch.Tensor,
                  device: torch.device | str = "cpu") -> ModelInputs:
    """Model inputs for one image of ``image``'s plan (its ``pixel_values``) and a user text."""
    ids = torch.tensor([processor.token_ids(user_text, image.n_tokens())], dtype=torch.long, device=device)
    return ModelInputs(input_ids=ids, attention_mask=torch.ones_like(ids),
                       mm_token_type_ids=(ids == processor.image_token_id).to(torch.int32),
                       pixel_values=pixel_values,
                       image_grid_thw=torch.tensor([image.grid_thw()], dtype=torch.long, device=device))


class CameraPlan:
    """An :class:`ImagePlan` bound to a backend: the prompt's tensors, the device, the way back.

    Made by :meth:`DepthVLM.plan <depthvlm_ros.pipeline.DepthVLM.plan>`; reused for every frame of
    the camera until its camera_info, the settings or the backend's size change.
    """

    def __init__(self, image: ImagePlan, processor: ImageTextProcessor, backend: DepthBackend, device: torch.device,
                 exact: bool = True) -> None:
        self.image = image
        self.exact = exact
        self.backend = backend
        self.device = device
        self._template = prompt_inputs(processor, image, DEPTH_PROMPT, torch.empty(0), device)

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size

    def prepare(self, images: Sequence[np.ndarray], plans: Sequence[CameraPlan] | None = None) -> ModelInputs:
        """Images -> the backend's inputs, on the plan's device.

        ``plans``: one per image when they come from cameras whose plans share this plan's size
        (the evaluator batches such images); default this plan for all.
        """
        plans = [self] * len(images) if plans is None else list(plans)
        if any(p.size != self.size or p.device != self.device for p in plans):
            raise InputError(f"a batch must reach the model at one size; sizes {sorted({p.size for p in plans})}")
        pixels = [p.image.pixel_values(rgb, self.device, self.exact) for p, rgb in zip(plans, images)]
        n, t = len(images), self._template
        cameras = {p.image.camera.size for p in plans}
        return ModelInputs(input_ids=t.input_ids.expand(n, -1), attention_mask=t.attention_mask.expand(n, -1),
                           mm_token_type_ids=t.mm_token_type_ids.expand(n, -1),
                           pixel_values=pixels[0] if n == 1 else torch.cat(pixels),
                           image_grid_thw=t.image_grid_thw.expand(n, -1), prompt_key=self.prompt_key(n),
                           camera_size=cameras.pop() if len(cameras) == 1 else None)

    @property
    def batch_key(self) -> tuple:
        """Plans with equal keys (one backend, one model-grid size, one device) share a forward
        (:meth:`DepthVLM.infer_batch <depthvlm_ros.pipeline.DepthVLM.infer_batch>`)."""
        return id(self.backend), self.size, str(self.device)

    def prompt_key(self, batch: int) -> tuple:
        """What the depth prompt's constants depend on for ``batch`` images of this plan: the fixed depth prompt at
        this model-grid size, the batch and the device (host values: a backend keys its static prompts by it with
        no read of the tensors)."""
        return ("depth", self.size, batch, str(self.device))

    def restore(self, depth_model: np.ndarray) -> np.ndarray:
        """(h, w) metres on the model grid -> (H, W) float32 metres on the camera grid (NaN invalid); a depth
        already on the camera grid (a camera-grid head) is only checked for invalid values.

        :func:`~depthvlm_ros.geometry.resize_depth` (bilinear, pixel centres), on the host: the one
        resampling every caller uses (in torch it ran no faster here; docs/benchmarks.md).
        """
        return resize_depth(depth_model, *self.image.camera.size)
