"""The DPT depth head of DepthVLM, with the released checkpoint's parameter names.

Input: four feature sets of shape (batch, tokens, dim_in) at the image-token positions, in the
order [DeepStack 1, DeepStack 2, DeepStack 3, LLM last hidden state (post-norm)], tokens row-major
over the merged patch grid (grid_h x grid_w). Output: (batch, 1, grid_h * P, grid_w * P) metric
depth in metres (Softplus-positive), where P is the effective patch (vision patch x merge = 32 px).

Pyramid: 1x1 projections to ``out_channels``, transposed convs (kernel = stride = 8, 4, 2) bring the
first three to 8x, 4x, 2x the token grid, the fourth stays on it; RefineNet-style fusion upsamples
back to 16x, then ``output_conv1`` -> bilinear to P x -> ``output_conv2`` -> Softplus. Given an
``output_size`` (the official head's argument), the bilinear step goes to that size instead (a camera's
grid: depth there directly, not bit-equal to the P x grid resampled; docs/model.md states by how much).

``channels_last=True`` runs the same convolutions with the activations and the weights in
``torch.channels_last`` memory (copies of the weights made per call, :func:`conv`; the module's parameters stay
as they are, so concurrent callers, training, saving and sharding see the usual layout): faster on the CPU
(docs/benchmarks.md) and the layout of cuDNN's tensor-core convolutions. The torch backend's depth path asks for
it; the depth is the same within float rounding (1e-5 relative, a test).

Released quirk kept on purpose: the residual conv unit applies ReLU in place to its input, so the
skip connection adds relu(x), not x. The released weights were trained with that behaviour.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def conv(layer: nn.Module, x: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """``layer(x)``; with ``channels_last``, a convolution runs over a channels-last copy of its weight (made for this
    call: the parameter itself is never touched, so concurrent callers, training and saving see it as it is)."""
    if not channels_last or not isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
        return layer(x)
    weight = layer.weight.contiguous(memory_format=torch.channels_last)
    if isinstance(layer, nn.ConvTranspose2d):
        return F.conv_transpose2d(x, weight, layer.bias, layer.stride, layer.padding, layer.output_padding,
                                  layer.groups, layer.dilation)
    return layer._conv_forward(x, weight, layer.bias)


class ResidualConvUnit(nn.Module):
    """relu -> conv3x3 -> relu -> conv3x3, plus the skip. Skip adds relu(x) (released behaviour)."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, kernel_size=3, padding=1, bias=True)
        self.conv2 = nn.Conv2d(features, features, kernel_size=3, padding=1, bias=True)

    def forward(self, x: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        x = F.relu(x)  # the release's in-place ReLU rewrote x itself: the skip sees relu(x)
        return conv(self.conv2, F.relu(conv(self.conv1, x, channels_last)), channels_last) + x


class FeatureFusionBlock(nn.Module):
    """Add the (refined) skip, refine, upsample (bilinear, align_corners=True), 1x1 out_conv."""

    def __init__(self, features: int, has_skip: bool) -> None:
        super().__init__()
        if has_skip:
            self.resConfUnit1 = ResidualConvUnit(features)
        self.resConfUnit2 = ResidualConvUnit(features)
        self.out_conv = nn.Conv2d(features, features, kernel_size=1, bias=True)

    def forward(
        self, x: torch.Tensor, skip: torch.Tensor | None = None, size: Sequence[int] | None = None,
        channels_last: bool = False,
    ) -> torch.Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip, channels_last)
        x = self.resConfUnit2(x, channels_last)
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=True)
        else:
            x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)
        return conv(self.out_conv, x, channels_last)


class DepthSoftplus(nn.Softplus):
    """The head's output activation: ``softplus(x) = log(1 + exp(x))`` (metres, always positive).

    Eager PyTorch runs the stock ``F.softplus`` (the released computation, bit for bit). A graph being
    exported gets the same function written so that nothing overflows in fp16:
    ``relu(x) + log(1 + exp(-|x|))`` (exp of a non-positive number is at most 1). The stock op exports
    as ``Softplus`` + ``Where(x > 20)``, whose ``exp(x)`` overflows fp16 past x = 11.09, a range the
    trained heads' pre-activations reach; an fp16 ONNX Runtime or TensorRT graph then says inf metres.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            return torch.relu(x) + torch.log(1.0 + torch.exp(-torch.abs(x)))
        return super().forward(x)


class DPTScratch(nn.Module):
    """Container whose attribute names match the release's ``depth_head.scratch.*`` keys."""

    def __init__(self, out_channels: Sequence[int], features: int, last_channels: int) -> None:
        super().__init__()
        for i, channels in enumerate(out_channels, start=1):
            setattr(self, f"layer{i}_rn", nn.Conv2d(channels, features, kernel_size=3, padding=1, bias=False))
        self.refinenet1 = FeatureFusionBlock(features, has_skip=True)
        self.refinenet2 = FeatureFusionBlock(features, has_skip=True)
        self.refinenet3 = FeatureFusionBlock(features, has_skip=True)
        self.refinenet4 = FeatureFusionBlock(features, has_skip=False)
        self.output_conv1 = nn.Conv2d(features, features // 2, kernel_size=3, padding=1)
        self.output_conv2 = nn.Sequential(
            nn.Conv2d(features // 2, last_channels, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(last_channels, 1, kernel_size=1),
            DepthSoftplus(),
        )


class DPTDepthHead(nn.Module):
    """DepthVLM's dense depth head (released defaults: dim_in 2560, features 256)."""

    #: Upsampling factor of ``resize_layers[i]`` (kernel = stride); the fourth level keeps the grid.
    RESIZE_FACTORS = (8, 4, 2)

    def __init__(
        self,
        dim_in: int,
        patch_size: int,
        features: int = 256,
        out_channels: Sequence[int] = (256, 512, 1024, 1024),
        last_channels: int = 32,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if len(out_channels) != 4:
            raise ValueError(f"DPT head needs 4 out_channels, got {list(out_channels)}")
        self.patch_size = patch_size
        self.norm = nn.LayerNorm(dim_in, eps=norm_eps)
        self.projects = nn.ModuleList(nn.Conv2d(dim_in, c, kernel_size=1) for c in out_channels)
        self.resize_layers = nn.ModuleList(
            nn.ConvTranspose2d(c, c, kernel_size=f, stride=f)
            for c, f in zip(out_channels[:3], self.RESIZE_FACTORS)
        )
        self.scratch = DPTScratch(out_channels, features, last_channels)

    def forward(self, features: Sequence[torch.Tensor], grid_h: int, grid_w: int,
                output_size: tuple[int, int] | None = None, channels_last: bool = False) -> torch.Tensor:
        """``features``: four (B, grid_h*grid_w, dim_in) tensors. Returns (B, 1, H, W) metres, H x W =
        ``output_size`` (pixels, height first) or the model grid, grid x patch size. ``channels_last``: run
        the convolutions in channels-last memory (see the module's docstring)."""
        levels = []
        for i, tokens in enumerate(features):
            x = self.norm(tokens)
            x = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], grid_h, grid_w)
            x = conv(self.projects[i], x, channels_last)
            if i < len(self.resize_layers):
                x = conv(self.resize_layers[i], x, channels_last)
            levels.append(x)
        s = self.scratch
        l1, l2, l3, l4 = (conv(getattr(s, f"layer{i + 1}_rn"), x, channels_last) for i, x in enumerate(levels))
        path = s.refinenet4(l4, size=l3.shape[2:], channels_last=channels_last)
        path = s.refinenet3(path, l3, size=l2.shape[2:], channels_last=channels_last)
        path = s.refinenet2(path, l2, size=l1.shape[2:], channels_last=channels_last)
        path = s.refinenet1(path, l1, channels_last=channels_last)
        out = conv(s.output_conv1, path, channels_last)
        size = output_size if output_size is not None else (grid_h * self.patch_size, grid_w * self.patch_size)
        out = F.interpolate(out, size=size, mode="bilinear", align_corners=True)
        for layer in s.output_conv2:  # conv 3x3, ReLU, conv 1x1, Softplus
            out = conv(layer, out, channels_last)
        return out
