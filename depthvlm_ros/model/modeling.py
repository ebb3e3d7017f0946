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

import contextlib
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen3_vl.modeling_qwen3_vl import (
    Qwen3VLTextModel,
    Qwen3VLVisionAttention,
    Qwen3VLVisionPatchEmbed,
    apply_rotary_pos_emb_vision,
    eager_attention_forward,
)
from transformers.utils import ModelOutput
from transformers.utils.generic import is_flash_attention_requested

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


def sdpa_kernels(kernels: tuple[SDPBackend, ...]) -> contextlib.AbstractContextManager[Any]:
    """``torch.nn.attention.sdpa_kernel`` over ``kernels`` in that priority; for none, torch's own choice (no context).

    Traceable: ``torch.compile`` records the choice in its graph.
    """
    return sdpa_kernel(list(kernels), set_priority=True) if kernels else contextlib.nullcontext()


@dataclass
class DepthFeatures:
    """The head's four inputs for a batch of same-size images, plus the merged grid."""

    features: list[torch.Tensor]  # four (B, grid_h*grid_w, hidden) tensors
    grid_h: int
    grid_w: int


@dataclass(frozen=True)
class ImageSpan:
    """Where every sample of a static-prompt batch holds its image: the token positions [start, end)."""

    start: int
    end: int


class DepthVLMTextModel(Qwen3VLTextModel):
    """The stock Qwen3-VL text model; its DeepStack injection also takes an :class:`ImageSpan`.

    Stock injection indexes the hidden states with a boolean mask (``nonzero``: a host sync and a
    compile graph break in each DeepStack layer). Given a span, the features are added to that slice
    instead: the same additions, no data-dependent shape. A boolean mask still takes the stock way.
    """

    def _deepstack_process(
        self, hidden_states: torch.Tensor, visual_pos_masks: torch.Tensor | ImageSpan, visual_embeds: torch.Tensor
    ) -> torch.Tensor:
        if not isinstance(visual_pos_masks, ImageSpan):
            return super()._deepstack_process(hidden_states, visual_pos_masks, visual_embeds)
        start, end = visual_pos_masks.start, visual_pos_masks.end
        embeds = visual_embeds.to(hidden_states.device, hidden_states.dtype).reshape(
            hidden_states.shape[0], end - start, -1)
        return torch.cat([hidden_states[:, :start], hidden_states[:, start:end] + embeds, hidden_states[:, end:]], 1)


class DepthVLMVisionAttention(Qwen3VLVisionAttention):
    """The stock vision attention; with ``images_of_one_size`` (an int) it attends over whole images at once.

    Stock attention (sdpa, eager) splits the packed sequence per image with ``lengths.tolist()``: a host
    sync and a compile graph break in every vision block. When the packed hidden states are that many
    images of one size, one after another (the depth path: one plan, one grid), each image is one
    sequence of a batch and one attention call serves them all, with no tolist. Flash attention and
    calls without the argument take the stock way.
    """

    def forward(
        self,
        hidden_states: torch.Tensor,
        cu_seqlens: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        max_seqlen: int | None = None,
        images_of_one_size: int | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if images_of_one_size is None or is_flash_attention_requested(self.config):
            return super().forward(hidden_states, cu_seqlens, position_embeddings, max_seqlen, **kwargs)
        n = hidden_states.shape[0]  # images x patches per image
        query, key, value = self.qkv(hidden_states).reshape(n, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        assert position_embeddings is not None
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb_vision(query, key, cos, sin)
        # (images * patches, heads, dim) -> (images, heads, patches, dim): one sequence per image
        query, key, value = (t.reshape(images_of_one_size, n // images_of_one_size, self.num_heads, -1)
                             .transpose(1, 2) for t in (query, key, value))
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        output, _ = attention(self, query, key, value, attention_mask=None, scaling=self.scaling,
                              dropout=0.0 if not self.training else self.attention_dropout, is_causal=False, **kwargs)
        return self.proj(output.reshape(n, -1))  # (images, patches, heads, dim): image-major, as stock packs


class DepthVLMVisionPatchEmbed(Qwen3VLVisionPatchEmbed):
    """The stock patch embedding, computed as the matrix product it is.

    Its ``Conv3d`` has kernel = stride = (temporal patch, patch, patch) over inputs of exactly that size:
    one dot product per patch and output channel. ``F.linear`` with the weight viewed as (hidden,
    channels x temporal x patch x patch) (the processor's flattening order, and the weight's own) is
    the same sum, without the convolution's reshape to 5-D and its im2col: 3.6-3.8x faster on the CPU
    (docs/benchmarks.md). Same parameter (``proj.weight``, ``proj.bias``): checkpoints load unchanged.
    """

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight
        flat = weight.reshape(weight.shape[0], -1)  # (hidden, in x temporal x patch x patch): a view
        return F.linear(hidden_states.reshape(-1, flat.shape[1]).to(weight.dtype), flat, self.proj.bias)


@dataclass
class StaticPrompt:
    """The depth path's constants for one model-grid size and batch (the fixed prompt, precomputed).

    Built once per size by :meth:`DepthVLMForConditionalGeneration.static_prompt`; with it the
    forward has no data-dependent operation and no host sync (no rope-index search, no boolean-mask
    scatter, no per-image split of the vision attention), so the same code traces for ONNX, compiles
    with ``torch.compile(fullgraph=True)`` and replays as a CUDA graph.
    """

    vision_kwargs: dict[str, torch.Tensor]  # grid, position-embedding interpolation, rotary ids, cu_seqlens
    prefix_embeds: torch.Tensor  # (1, start, hidden) prompt embeddings before the image
    suffix_embeds: torch.Tensor  # (1, L - end, hidden) after it; empty when dropped (see static_prompt)
    position_ids: torch.Tensor  # (3, B, L) M-RoPE positions
    start: int  # first image token
    end: int  # one past the last
    grid_h: int  # merged grid, tokens
    grid_w: int
    output_size: tuple[int, int] | None = None  # (height, width) px the head outputs; None: the model grid
    # How it runs (host values; the same depth within float rounding):
    channels_last: bool = False  # the head's convolutions in channels-last memory (DPTDepthHead)
    vision_attention: tuple[SDPBackend, ...] = ()  # SDPA kernels for the vision tower, by priority; (): torch's choice
    llm_attention: tuple[SDPBackend, ...] = ()  # the same for the LLM

    @property
    def n_tokens(self) -> int:
        return self.end - self.start

    @property
    def batch(self) -> int:
        return int(self.position_ids.shape[1])

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor, by a flat name (an export wrapper registers them as buffers)."""
        named = {f"vision_{k}": v for k, v in self.vision_kwargs.items()}
        named |= {"prefix_embeds": self.prefix_embeds, "position_ids": self.position_ids}
        return named | ({"suffix_embeds": self.suffix_embeds} if self.suffix_embeds.shape[1] else {})

    def with_tensors(self, tensors: dict[str, torch.Tensor]) -> "StaticPrompt":
        """The same prompt holding ``tensors`` (named as :meth:`tensors` names them)."""
        vision = {k: tensors[f"vision_{k}"] for k in self.vision_kwargs}
        return dataclasses.replace(self, vision_kwargs=vision, prefix_embeds=tensors["prefix_embeds"],
                                   suffix_embeds=tensors.get("suffix_embeds", self.suffix_embeds),
                                   position_ids=tensors["position_ids"])

    def to(self, device: torch.device | str) -> "StaticPrompt":
        return self.with_tensors({k: v.to(device) for k, v in self.tensors().items()})


@dataclass
class DepthVLMOutput(ModelOutput):
    """The forward's outputs: transformers' LM fields plus the depth map.

    ``depth``: (B, H, W) metres on the model grid, or None on a call without the image (decoding);
    ``last_hidden_state``: the LLM's post-norm states, (B, L, hidden).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: Any = None  # the KV cache (transformers >= 5.2x names it ``cache``,
    past_key_values: Any = None  # earlier 5.x ``past_key_values``: the stock output's own name is kept)
    depth: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None


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
        # Stock modules with a sync-free or faster path (same parameters and names; see the three classes).
        self.model.language_model.__class__ = DepthVLMTextModel
        self.model.visual.patch_embed.__class__ = DepthVLMVisionPatchEmbed
        for block in self.model.visual.blocks:
            block.attn.__class__ = DepthVLMVisionAttention
        self.post_init()

    # -- the one forward ------------------------------------------------------------------------

    def encode_images(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> Any:
        """Vision tower, once: merged image embeddings + DeepStack features (stock output type)."""
        return self.model.get_image_features(pixel_values, image_grid_thw, return_dict=True)

    def static_prompt(self, inputs: Any, keep_suffix: bool = False,
                      output_size: tuple[int, int] | None = None) -> StaticPrompt:
        """Everything of the depth path that does not depend on the pixels, for ``inputs``' size and batch.

        ``inputs`` (a :class:`~depthvlm_ros.model.processing.ModelInputs`) must hold one prompt per
        image, the same for all, with its image tokens in one contiguous span (the depth prompt).
        The prompt's tokens after the image are dropped unless ``keep_suffix``: under the causal mask the
        image tokens never attend to them and the head reads only image positions, so the depth is the
        same (a test compares both), for fewer tokens through the LLM. ``output_size``: (height, width)
        pixels of the depth the head makes (a camera's grid; default the model grid). The execution settings
        (``channels_last``, the SDPA kernels) are the defaults: a backend replaces them (``dataclasses.replace``).
        """
        from transformers.vision_utils import (
            get_vision_cu_seqlens,
            get_vision_interpolation_indices_and_weights,
            get_vision_position_ids,
        )

        visual = self.model.visual
        grid = inputs.image_grid_thw
        merge = int(visual.spatial_merge_size)
        ids = inputs.input_ids
        if bool((ids != ids[:1]).any()):
            raise ValueError("a static prompt needs the same prompt for every image of the batch")
        image_mask = ids == self.config.image_token_id
        span = image_mask[0].nonzero()[:, 0]
        start, end = int(span[0]), int(span[-1]) + 1
        if int(image_mask[0].sum()) != end - start:
            raise ValueError("the prompt's image tokens are not one contiguous span")
        indices, weights = get_vision_interpolation_indices_and_weights(
            grid, num_grid_per_side=visual.num_grid_per_side, mode=visual.interpolation_mode,
            align_corners=visual.interpolation_align_corners, spatial_merge_size=merge,
        )
        with torch.no_grad():
            embeds = self.model.get_input_embeddings()(ids[:1])
            rope_positions, _ = self.model.get_rope_index(ids, inputs.mm_token_type_ids, image_grid_thw=grid)
        if not keep_suffix:
            rope_positions, embeds = rope_positions[:, :, :end], embeds[:, :end]
        return StaticPrompt(
            vision_kwargs={
                "grid_thw": grid, "interp_indices": indices, "interp_weights": weights,
                "position_ids": get_vision_position_ids(grid, merge), "cu_seqlens": get_vision_cu_seqlens(grid),
            },
            prefix_embeds=embeds[:, :start].detach(), suffix_embeds=embeds[:, end:].detach(),
            position_ids=rope_positions, start=start, end=end,
            grid_h=int(grid[0, 1]) // merge, grid_w=int(grid[0, 2]) // merge, output_size=output_size,
        )

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_logits: bool = True,
        logits_rows: torch.Tensor | None = None,
        static_prompt: StaticPrompt | None = None,
        **kwargs: Any,
    ) -> DepthVLMOutput:
        """The one forward: Qwen3-VL's, plus the depth map whenever the call sees the image.

        Vision tower once, LLM once, then the depth head on the image tokens' features (the three
        DeepStack levels and the post-norm last hidden state). ``generate()`` calls it as the stock
        forward (depth on the prefill, None on decoding steps); the trainer asks for
        ``return_logits=False`` with ``logits_rows`` (a (B,) bool mask): logits of those batch rows only,
        still inside this forward, so a DDP/FSDP-wrapped model applies its LM head itself; the torch backend and
        the ONNX export pass a :class:`StaticPrompt` (the fixed depth prompt precomputed for one
        size: no data-dependent ops, so it traces and compiles), which returns depth only.
        """
        if static_prompt is not None:
            return self._static_depth(pixel_values, static_prompt)
        image_outputs = None
        if pixel_values is not None:
            self.model.rope_deltas = None  # a prefill starts fresh (stock caches rope deltas between calls)
            image_outputs = self.encode_images(pixel_values, image_grid_thw)
            kwargs["mm_encoder_outputs"] = {"image": image_outputs}
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, image_grid_thw=image_grid_thw,
            mm_token_type_ids=mm_token_type_ids, **kwargs,
        )
        hidden = outputs.last_hidden_state
        depth = None
        if image_outputs is not None:
            depth = self._depth_from_features(self._image_token_features(
                input_ids, image_grid_thw, list(image_outputs.deepstack_features), hidden))
        logits = loss = None
        if logits_rows is not None:
            logits = self.lm_head(hidden[logits_rows])
        elif return_logits or labels is not None:
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(hidden[:, keep, :])
            if labels is not None:
                loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size)
        kv_name = next((name for name in ("cache", "past_key_values") if name in outputs), None)
        kv = {kv_name: outputs[kv_name]} if kv_name else {}
        return DepthVLMOutput(loss=loss, logits=logits, depth=depth, last_hidden_state=hidden, **kv)

    def _static_depth(self, pixel_values: torch.Tensor, prompt: StaticPrompt) -> DepthVLMOutput:
        batch = prompt.batch
        with sdpa_kernels(prompt.vision_attention):
            vision = self.model.visual(pixel_values, **prompt.vision_kwargs, images_of_one_size=batch)
        image_embeds = vision.pooler_output.to(prompt.prefix_embeds.dtype).reshape(batch, prompt.n_tokens, -1)
        parts = [prompt.prefix_embeds.expand(batch, -1, -1), image_embeds]
        if prompt.suffix_embeds.shape[1]:  # (a shape: fixed when traced or compiled)
            parts.append(prompt.suffix_embeds.expand(batch, -1, -1))
        embeds = torch.cat(parts, dim=1)
        span = ImageSpan(prompt.start, prompt.end)  # DeepStack adds to this slice: no boolean mask, no sync
        with sdpa_kernels(prompt.llm_attention):
            hidden = self.model.language_model(
                inputs_embeds=embeds, position_ids=prompt.position_ids, use_cache=False,
                visual_pos_masks=span, deepstack_visual_embeds=list(vision.deepstack_features),
            ).last_hidden_state
        features = [f.reshape(batch, prompt.n_tokens, -1) for f in vision.deepstack_features]
        features.append(hidden[:, prompt.start : prompt.end])
        depth = self._depth_from_features(DepthFeatures(features, prompt.grid_h, prompt.grid_w), prompt.output_size,
                                          prompt.channels_last)
        return DepthVLMOutput(depth=depth, last_hidden_state=hidden)

    def _image_token_features(
        self,
        input_ids: torch.Tensor,
        image_grid_thw: torch.Tensor,
        deepstack_features: Sequence[Sequence[torch.Tensor] | torch.Tensor],
        last_hidden_state: torch.Tensor,
    ) -> DepthFeatures:
        """The head's inputs at the image tokens: [DeepStack 1, 2, 3, LLM last hidden state].

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

    def _depth_from_features(self, depth_features: DepthFeatures, output_size: tuple[int, int] | None = None,
                             channels_last: bool = False) -> torch.Tensor:
        """Depth head: (B, H, W) metres at grid x 32 px, or at ``output_size`` (height, width) px."""
        head_dtype = self.depth_head.norm.weight.dtype
        feats = [f.to(head_dtype) for f in depth_features.features]
        return self.depth_head(feats, depth_features.grid_h, depth_features.grid_w, output_size, channels_last)[:, 0]
