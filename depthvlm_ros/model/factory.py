"""Models the project makes itself: tiny configs, an offline tokenizer, deterministic weights.

Nothing here downloads anything. :func:`write_checkpoint` lays a model out exactly like the
published DepthVLM-4B folder (config.json of model_type ``qwen3_vl`` with ``depth_head_type``,
``model.safetensors``, tokenizer files, chat template, ``preprocessor_config.json``,
``generation_config.json``), so tests and the default model go through the same strict loader as
the real checkpoint.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from depthvlm_ros.model.processing import DEPTH_ANSWER, DEPTH_PROMPT, SYSTEM_PROMPT

#: Qwen3-VL's 26 special tokens, in id order (151643..151668 in the official vocabulary).
QWEN3_VL_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
)

#: Qwen chat format for system/user/assistant turns with images (what Qwen3-VL's template renders
#: for these messages). A real checkpoint folder brings its own template.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "<|im_start|>{{ message.role }}\n"
    "{%- if message.content is string -%}{{ message.content }}"
    "{%- else -%}{%- for c in message.content -%}"
    "{%- if c.type == 'image' -%}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif c.type == 'text' -%}{{ c.text }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "<|im_end|>\n"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant\n{%- endif -%}"
)

#: The image processor settings of Qwen3-VL (preprocessor_config.json).
QWEN3_VL_PREPROCESSOR = {
    "image_processor_type": "Qwen2VLImageProcessor",
    "size": {"shortest_edge": 65536, "longest_edge": 16777216},
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "do_resize": True,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "do_convert_rgb": True,
}

_OBJECTS = ("chair", "table", "door", "box", "ball", "car", "pole", "wall", "floor", "lamp", "person",
            "building", "road", "sofa", "shelf", "window", "bed", "tree", "sign", "cup")
_COLOURS = ("red", "green", "blue", "yellow", "white", "black", "orange", "purple", "grey", "brown")


def tokenizer_corpus() -> list[str]:
    """Deterministic text the small BPE is trained on: prompts, spatial QA templates, numbers."""
    lines = [SYSTEM_PROMPT, DEPTH_PROMPT, DEPTH_ANSWER]
    for obj in _OBJECTS:
        for colour in _COLOURS:
            lines += [
                f"How far is the {colour} {obj}?",
                f"The {colour} {obj} is 2.45 meters away.",
                f"Which is closer, the {colour} {obj} or the {obj}?",
                f"Where is the {colour} {obj}? It is at (512, 384).",
                f"What is the distance between the {colour} {obj} and the {obj}?",
                f"How tall is the {colour} {obj}? About 1.20 meters.",
                f"What is at pixel (320, 240)? A {colour} {obj}.",
            ]
    lines += [f"{i / 100:.2f} meters" for i in range(0, 2000, 7)]
    lines += [f"({i}, {(i * 37) % 1000})" for i in range(0, 1000, 13)]
    return lines


def build_tokenizer(vocab_size: int = 1024, corpus: list[str] | None = None) -> Any:
    """A small byte-level BPE (no unknown tokens) + Qwen3-VL's special tokens + chat template.

    ``corpus``: the text to learn merges from (default :func:`tokenizer_corpus`). Digit runs stay
    together (GPT-2's pre-tokenizing rule), so a number in the corpus can become one token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(QWEN3_VL_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(tokenizer_corpus() if corpus is None else corpus, trainer=trainer)
    bpe.add_special_tokens(list(QWEN3_VL_SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=32768,
    )


def _token_ids(tokenizer: Any) -> dict[str, int]:
    ids = tokenizer.convert_tokens_to_ids
    return {
        "image_token_id": ids("<|image_pad|>"),
        "video_token_id": ids("<|video_pad|>"),
        "vision_start_token_id": ids("<|vision_start|>"),
        "vision_end_token_id": ids("<|vision_end|>"),
    }


def tiny_config(tokenizer: Any, vocab_rows: int = 0, **overrides: Any) -> Any:
    """A tiny Qwen3-VL config (hidden 64, 4 LLM layers, 3 ViT layers) with a narrow DPT head.

    ``overrides`` replace top-level fields (e.g. ``depth_head_features=256`` for a full-width head).
    ``vocab_rows``: rows of the (tied) embedding, at least the tokenizer's; 0 = the tokenizer's,
    rounded up to 64. More rows make a model of a chosen size (4 B x 64 per row) at no compute cost:
    the depth path never applies the LM head.
    """
    from transformers import Qwen3VLConfig

    hidden = 64
    vocab = max(int(math.ceil(len(tokenizer) / 64) * 64), int(vocab_rows))
    fields: dict[str, Any] = {
        "text_config": {
            "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": 192,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
            "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
            "rope_parameters": {"rope_type": "default", "rope_theta": 5_000_000.0,
                                "mrope_section": [4, 2, 2], "mrope_interleaved": True},
        },
        "vision_config": {
            "depth": 3, "hidden_size": 64, "intermediate_size": 128, "num_heads": 4,
            "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
            "out_hidden_size": hidden, "num_position_embeddings": 1024,
            "deepstack_visual_indexes": [0, 1, 2],
        },
        "tie_word_embeddings": True,
        "depth_head_type": "dpt",
        "depth_loss_weight": 1.0,
        "depth_head_features": 32,
        "depth_head_out_channels": [16, 32, 64, 64],
        "depth_head_last_channels": 16,
        "depth_head_norm_eps": 1e-5,
        **_token_ids(tokenizer),
    }
    fields.update(overrides)
    config = Qwen3VLConfig(**fields)
    config.architectures = ["Qwen3VLForConditionalGeneration"]
    return config


#: depthvlm-tiny's input limit: at most 320 x 240 pixels reach the model (70 image tokens at
#: 4:3). Qwen's own ``max_pixels`` setting; larger canonical sizes take the canonical-camera route.
TINY_MAX_PIXELS = 320 * 240


def depthvlm_tiny_config(tokenizer: Any) -> Any:
    """The shipped depthvlm-tiny: hidden 128 in the ViT (3 layers) and the LLM (4 layers), narrow DPT head."""
    hidden = 128
    text = {
        "vocab_size": int(math.ceil(len(tokenizer) / 64) * 64), "hidden_size": hidden, "intermediate_size": 384,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": 5_000_000.0,
                            "mrope_section": [8, 4, 4], "mrope_interleaved": True},
    }
    vision = {
        "depth": 3, "hidden_size": hidden, "intermediate_size": 256, "num_heads": 4, "patch_size": 16,
        "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": hidden,
        "num_position_embeddings": 1024, "deepstack_visual_indexes": [0, 1, 2],
    }
    return tiny_config(tokenizer, text_config=text, vision_config=vision)


def tiny_preprocessor() -> dict[str, Any]:
    """depthvlm-tiny's preprocessor_config.json: Qwen3-VL's with ``max_pixels`` = :data:`TINY_MAX_PIXELS`."""
    return {**QWEN3_VL_PREPROCESSOR, "size": {"shortest_edge": 32 * 32, "longest_edge": TINY_MAX_PIXELS}}


def depthvlm_4b_config(vocab_size: int = 151936) -> Any:
    """DepthVLM-4B's dimensions (Qwen3-VL-4B-Instruct + the released DPT head), for benchmarks."""
    from transformers import Qwen3VLConfig

    config = Qwen3VLConfig(
        text_config={
            "vocab_size": vocab_size, "hidden_size": 2560, "intermediate_size": 9728,
            "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
            "head_dim": 128, "max_position_embeddings": 262144, "rms_norm_eps": 1e-6,
            "tie_word_embeddings": True,
            "rope_parameters": {"rope_type": "default", "rope_theta": 5_000_000.0,
                                "mrope_section": [24, 20, 20], "mrope_interleaved": True},
        },
        vision_config={
            "depth": 24, "hidden_size": 1024, "intermediate_size": 4096, "num_heads": 16,
            "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
            "out_hidden_size": 2560, "num_position_embeddings": 2304,
            "deepstack_visual_indexes": [5, 11, 17],
        },
        tie_word_embeddings=True,
        depth_head_type="dpt",
        depth_loss_weight=1.0,
    )
    config.architectures = ["Qwen3VLForConditionalGeneration"]
    return config


def init_weights(model: nn.Module, seed: int = 0, mean_depth_m: float = 2.0) -> None:
    """Deterministic weights whose depth output varies with the image.

    Hugging Face's init (normal, std 0.02) for the VLM. The head's convolutions get Kaiming-normal
    weights (fan-in, ReLU gain) and zero biases, which keep spatial variation alive through the
    pyramid (with std 0.02 the head outputs an almost constant ~ln 2, with PyTorch's default the
    variation shrinks ~100x by the output). The last 1x1 conv is scaled to 0.1 of unit gain and its
    bias set to softplus^-1(mean_depth_m): outputs then span roughly 0.25-5 m around ~2 m.
    """
    torch.manual_seed(seed)
    model.init_weights()
    head = model.depth_head
    for module in head.modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            module.reset_parameters()
    last = head.scratch.output_conv2[2]
    with torch.no_grad():
        nn.init.kaiming_normal_(last.weight, mode="fan_in", nonlinearity="linear")
        last.weight.mul_(0.1)
        last.bias.fill_(math.log(math.expm1(mean_depth_m)))  # softplus^-1(mean depth)


def write_checkpoint(model: nn.Module, tokenizer: Any, folder: str | Path,
                     preprocessor: dict[str, Any] | None = None,
                     state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Save a model in the published folder layout (safetensors, tied lm_head omitted).

    ``preprocessor``: image-processor settings (default Qwen3-VL's, :data:`QWEN3_VL_PREPROCESSOR`).
    ``state_dict``: the weights to write instead of ``model``'s own (a sharded model's gathered weights).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(str(folder))
    settings = QWEN3_VL_PREPROCESSOR if preprocessor is None else preprocessor
    (folder / "preprocessor_config.json").write_text(json.dumps(settings, indent=2) + "\n")
    if not (folder / "chat_template.jinja").exists():
        (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    generation = {
        "eos_token_id": [tokenizer.convert_tokens_to_ids("<|im_end|>"),
                         tokenizer.convert_tokens_to_ids("<|endoftext|>")],
        "pad_token_id": tokenizer.pad_token_id,
        "do_sample": False,
    }
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return folder


def make_tiny_checkpoint(folder: str | Path, seed: int = 0, **config_overrides: Any) -> Path:
    """Build, initialise (deterministically) and save a tiny DepthVLM folder; return its path."""
    from transformers.utils import logging as hf_logging

    from depthvlm_ros.model.modeling import DepthVLMForConditionalGeneration

    tokenizer = build_tokenizer()
    config = tiny_config(tokenizer, **config_overrides)
    with torch.random.fork_rng():  # the caller's RNG state is left as it was
        torch.manual_seed(seed)  # Hugging Face initialises the VLM while constructing it
        model = DepthVLMForConditionalGeneration(config)
        init_weights(model, seed=seed)
    hf_logging.disable_progress_bar()
    try:
        return write_checkpoint(model, tokenizer, folder)
    finally:
        hf_logging.enable_progress_bar()
