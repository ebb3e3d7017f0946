"""Image preprocessing: what the stock Qwen2-VL image processor does, vectorised, on any device.

The stock processor (:class:`~depthvlm_ros.model.processing.ImageTextProcessor`, PIL) resizes
with PIL's bicubic filter, then rescales, normalises and patchifies one image at a time in numpy
(float64 on the way): 45 ms for a 640x480 camera at the 4B model's canonical size on a 2-core CPU.
Here the four steps are a few torch operations on the device the backend reads from: the CPU for
ONNX Runtime, the GPU for a CUDA model or TensorRT (the camera's uint8 image is copied once).

Two resamplers, chosen per call (``exact``):

- ``exact=True``: PIL's own resize, so the pixels are bit-identical to the stock processor's; the
  evaluator, ``predict`` and ``ask`` use it (the released protocol, the parity tests).
- ``exact=False`` (the node's per-frame path): torch's antialiased bicubic (a = -0.5, PIL's
  support rule). On the CPU it is torch's uint8 kernel, which follows PIL's 8-bit path; on CUDA
  the float kernel run as PIL runs it, horizontal pass then vertical, each rounded and clipped to
  0..255. Both stay within :data:`MAX_GREY_LEVELS` grey levels of PIL per resize, on a few percent of
  the pixels at most (``test/test_preprocess.py`` holds both to it).

Rescale and normalise are one multiply-add per channel (float32); patchify is the processor's own
reshape and transpose.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

#: Largest difference from the stock processor per resize, in grey levels (0..255).
MAX_GREY_LEVELS = 2


def bicubic_resize_like_pil(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Resize (1, 3, H, W) pixels (uint8 on the CPU, float 0..255 elsewhere) as PIL's BICUBIC does.

    Returns the same dtype. A side that keeps its size is not resampled (PIL's rule).
    """
    if image.dtype == torch.uint8:  # torch's uint8 antialiased kernel: PIL's 8-bit algorithm
        if (image.shape[-1], image.shape[-2]) == (width, height):
            return image
        return F.interpolate(image, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    out = image
    if out.shape[-1] != width:
        out = F.interpolate(out, size=(out.shape[-2], width), mode="bicubic", antialias=True, align_corners=False)
        out = out.round_().clamp_(0, 255)
    if out.shape[-2] != height:
        out = F.interpolate(out, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
        out = out.round_().clamp_(0, 255)
    return out


def pil_resize(rgb: np.ndarray, resizes: Sequence[tuple[int, int]]) -> np.ndarray:
    """PIL's own bicubic resizes of an RGB uint8 image, in order (the stock processor's pixels, exactly)."""
    from PIL import Image

    image, changed = Image.fromarray(rgb), False
    for width, height in resizes:
        if image.size != (width, height):
            image, changed = image.resize((width, height), Image.Resampling.BICUBIC), True
    return np.array(image) if changed else rgb


@dataclass(frozen=True)
class PixelLayout:
    """The image processor's settings that turn resized pixels into ``pixel_values``."""

    patch_size: int
    temporal_patch_size: int
    merge_size: int
    scale: tuple[float, float, float]  # per channel: value = pixel * scale + offset (rescale + normalise)
    offset: tuple[float, float, float]

    @classmethod
    def from_image_processor(cls, image_processor: object) -> "PixelLayout":
        """The layout of a stock Qwen2-VL image processor (its rescale/normalise flags and constants)."""
        rescale = float(image_processor.rescale_factor) if image_processor.do_rescale else 1.0
        mean = np.broadcast_to(np.asarray(image_processor.image_mean, np.float64), (3,))
        std = np.broadcast_to(np.asarray(image_processor.image_std, np.float64), (3,))
        if not image_processor.do_normalize:
            mean, std = np.zeros(3), np.ones(3)
        return cls(int(image_processor.patch_size), int(image_processor.temporal_patch_size),
                   int(image_processor.merge_size), tuple(float(v) for v in rescale / std),
                   tuple(float(v) for v in -mean / std))

    def pixel_values(self, image: torch.Tensor) -> torch.Tensor:
        """(1, 3, H, W) resized pixels (0..255) -> (patches, C*T*P*P) float32, the processor's order."""
        _, channels, height, width = image.shape
        p, t, m = self.patch_size, self.temporal_patch_size, self.merge_size
        scale = torch.tensor(self.scale, dtype=torch.float32, device=image.device).view(1, 3, 1, 1)
        offset = torch.tensor(self.offset, dtype=torch.float32, device=image.device).view(1, 3, 1, 1)
        values = torch.addcmul(offset, image, scale)  # one image is repeated over the temporal patch
        grid_h, grid_w = height // p, width // p
        patches = values.expand(t, channels, height, width).reshape(
            1, t, channels, grid_h // m, m, p, grid_w // m, m, p)
        patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return patches.reshape(grid_h * grid_w, channels * t * p * p)


def preprocess_image(
    rgb: np.ndarray, resizes: Sequence[tuple[int, int]], layout: PixelLayout,
    device: torch.device | str = "cpu", exact: bool = False,
) -> torch.Tensor:
    """One RGB uint8 (H, W, 3) image -> ``pixel_values`` (patches, C*T*P*P) float32 on ``device``.

    ``resizes``: the (width, height) sizes the image is resized to, in order (the canonical-focal
    resize, then the processor's snap to 32 px; an unchanged size is skipped). ``exact``: resize
    with PIL (bit-identical pixels) instead of torch (see the module docstring).
    """
    if exact:
        rgb, resizes = pil_resize(rgb, resizes), ()
    device = torch.device(device)
    image = torch.from_numpy(rgb).to(device, non_blocking=True).permute(2, 0, 1)[None]
    if device.type != "cpu" and resizes:
        image = image.to(torch.float32)  # torch's uint8 antialiased kernels are CPU-only
    for width, height in resizes:
        image = bicubic_resize_like_pil(image, width, height)
    return layout.pixel_values(image.to(torch.float32))
