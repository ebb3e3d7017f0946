"""DepthVLM = transformers' own Qwen3-VL + a DPT depth head on the LLM backbone.

No modeling code is copied: :class:`DepthVLMForConditionalGeneration` *is* a stock
``Qwen3VLForConditionalGeneration`` (same parameter names ``model.visual.*``,
``model.language_model.*``, ``lm_head.weight``) with one extra module, ``depth_head``. The depth
head reads, at the image-token positions, the three DeepStack visual features (from the vision
tower's output) and the LLM's last hidden state after the final norm (the model output).

Extra config fields, stored in the checkpoint's ``config.json`` next to the Qwen3-VL fields
(released values are the defaults):

==============================  ===========================  ==========================================
field                           default                      meaning
==============================  ===========================  ==========================================
``depth_head_type``             ``"dpt"``                    head type; the release uses ``dpt``
``depth_loss_weight``           ``1.0``                      w in LM loss + w * SILog (stage 2)
``depth_head_features``         ``256``                      fusion width of the DPT head
``depth_head_out_channels``     ``[256, 512, 1024, 1024]``   widths of the four pyramid levels
``depth_head_last_channels``    ``32``                       hidden width of ``output_conv2``
``depth_head_norm_eps``         ``1e-5``                     eps of the shared input LayerNorm
==============================  ===========================  ==========================================
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

from depthvlm_ros.model.dpt_head import DPTDepthHead

DEPTH_HEAD_DEFAULTS: dict[str, Any] = {
    "depth_head_type": "dpt",
    "depth_loss_weight": 1.0,
    "depth_head_features": 256,
    "depth_head_out_channels": [256, 512, 1024, 1024],
    "depth_head_last_channels": 32,
    "depth_head_norm_eps": 1e-5,
}
SUPPORTED_HEAD_TYPES = ("dpt",)


def depth_head_setting(config: Qwen3VLConfig, name: str) -> Any:
    """A depth-head config field, falling back to the released default when absent."""
    return getattr(config, name, DEPTH_HEAD_DEFAULTS[name])


def effective_patch_size(config: Qwen3VLConfig) -> int:
    """Pixels per merged token side: vision patch (16) x spatial merge (2) = 32 for Qwen3-VL."""
    return int(config.vision_config.patch_size) * int(config.vision_config.spatial_merge_size)


@dataclass
class DepthFeatures:
    """The head's four inputs for a batch of same-size images, plus the merged grid."""

    features: list[torch.Tensor]  # four (B, grid_h*grid_w, hidden) tensors
    grid_h: int
    grid_w: int


class DepthVLMForConditionalGeneration(Qwen3VLForConditionalGeneration):
    """Qwen3-VL with DepthVLM's dense depth head (``depth_head.*`` in the state dict)."""

    def __init__(self, config: Qwen3VLConfig) -> None:
        super().__init__(config)
        head_type = depth_head_setting(config, "depth_head_type")
        if head_type not in SUPPORTED_HEAD_TYPES:
            raise ValueError(f"depth_head_type {head_type!r} is not supported (supported: dpt)")
        self.depth_head = DPTDepthHead(
            dim_in=config.text_config.hidden_size,
            patch_size=effective_patch_size(config),
            features=depth_head_setting(config, "depth_head_features"),
            out_channels=depth_head_setting(config, "depth_head_out_channels"),
            last_channels=depth_head_setting(config, "depth_head_last_channels"),
            norm_eps=depth_head_setting(config, "depth_head_norm_eps"),
        )
        self.post_init()

    # -- the depth path, stage by stage (the pipeline times each stage) -----------------------

    def encode_images(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> Any:
        """Vision tower, once: merged image embeddings + DeepStack features (stock output type)."""
        return self.model.get_image_features(pixel_values, image_grid_thw, return_dict=True)

    def run_language_model(
        self,
        input_ids: torch.Tensor,
        image_grid_thw: torch.Tensor,
        mm_token_type_ids: torch.Tensor,
        image_outputs: Any,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """LLM prefill, once, over the prompt with the image embeddings in place; post-norm states."""
        self.model.rope_deltas = None  # stock caches rope deltas between calls; a prefill starts fresh
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            image_grid_thw=image_grid_thw,
            mm_token_type_ids=mm_token_type_ids,
            mm_encoder_outputs={"image": image_outputs},
            use_cache=False,
        )
        return out.last_hidden_state

    def gather_depth_features(
        self,
        input_ids: torch.Tensor,
        image_grid_thw: torch.Tensor,
        deepstack_features: Sequence[Sequence[torch.Tensor] | torch.Tensor],
        last_hidden_state: torch.Tensor,
    ) -> DepthFeatures:
        """Pick the head's inputs at the image tokens: [DeepStack 1, 2, 3, LLM last hidden state].

        All images of the batch must share one grid (one processed size), one image per sample.
        """
        merge = int(self.config.vision_config.spatial_merge_size)
        grids = {tuple(int(v) for v in g) for g in image_grid_thw.tolist()}
        if len(grids) != 1:
            raise ValueError(f"a depth batch needs one image size, got grids {sorted(grids)}")
        (_, gh, gw), = grids
        grid_h, grid_w = gh // merge, gw // merge
        batch = input_ids.shape[0]
        n_tokens = grid_h * grid_w
        image_mask = input_ids == self.config.image_token_id
        if int(image_mask.sum()) != batch * n_tokens:
            raise ValueError(f"expected {n_tokens} image tokens per sample, got {int(image_mask.sum())} in all")
        feats = []
        for level in deepstack_features:
            level = torch.cat(list(level), dim=0) if isinstance(level, (list, tuple)) else level
            feats.append(level.reshape(batch, n_tokens, -1))
        feats.append(last_hidden_state[image_mask].reshape(batch, n_tokens, -1))
        return DepthFeatures(features=feats, grid_h=grid_h, grid_w=grid_w)

    def predict_depth_map(self, depth_features: DepthFeatures) -> torch.Tensor:
        """Depth head: (B, H, W) metres at grid x 32 px."""
        head_dtype = self.depth_head.norm.weight.dtype
        feats = [f.to(head_dtype) for f in depth_features.features]
        return self.depth_head(feats, depth_features.grid_h, depth_features.grid_w)[:, 0]

    def forward_depth(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        image_grid_thw: torch.Tensor,
        mm_token_type_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The whole depth path in one call: pixels + fixed prompt -> (B, H, W) depth in metres."""
        image_outputs = self.encode_images(pixel_values, image_grid_thw)
        deepstack = list(image_outputs.deepstack_features)
        hidden = self.run_language_model(
            input_ids, image_grid_thw, mm_token_type_ids, image_outputs, attention_mask
        )
        return self.predict_depth_map(self.gather_depth_features(input_ids, image_grid_thw, deepstack, hidden))
