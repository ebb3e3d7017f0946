"""Image-only Qwen3-VL processor: the folder's tokenizer, chat template and image processor.

The stock ``Qwen3VLProcessor`` also builds a video processor, which needs torchvision (no CPU wheel
here). This class does the image half of that processor's job, with the same pieces: the stock
PIL image processor (``Qwen2VLImageProcessorPil``: smart resize to multiples of 32 px, rescale,
normalise, patchify) configured from the folder's ``preprocessor_config.json``, the folder's own
tokenizer and chat template, and the same ``<|image_pad|>`` expansion (one pad per merged token)
and ``mm_token_type_ids`` (1 on image tokens).

Note: a checkpoint whose ``preprocessor_config.json`` names the torchvision ("Fast") image
processor gets the PIL one with the same settings; the two resample with slightly different
bicubic kernels (sub-grey-level differences).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from depthvlm_ros.errors import CheckpointError, InputError

#: The system message of DepthVLM's chat (inference protocol).
SYSTEM_PROMPT = "You are a helpful assistant."
#: The fixed depth prompt (inference protocol). Fixed, so the depth path is a static function.
DEPTH_PROMPT = (
    "Given this image, estimate the metric depth (in meters, rounded to two decimal places) "
    "for every pixel of the image."
)
#: Training's LM target for the depth prompt.
DEPTH_ANSWER = "OK, I will estimate the depth map of this image."
#: Where the chat template puts the user's text while the prompt is built (a private-use character no
#: tokenizer gives meaning to): the text itself is tokenized apart, with special tokens split.
USER_TEXT_SLOT = "\ue000"
#: Longest question we accept, in characters (bounds tokens and memory per query).
MAX_QUESTION_CHARS = 1000

#: Keys of preprocessor_config.json that configure the PIL image processor.
_IMAGE_PROCESSOR_KEYS = (
    "size", "min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size",
    "image_mean", "image_std", "do_resize", "do_rescale", "rescale_factor", "do_normalize",
    "do_convert_rgb", "resample",
)


def read_chat_template(folder: Path, tokenizer: Any) -> str:
    """The folder's chat template: chat_template.jinja, chat_template.json, or the tokenizer's.

    A folder with none gets Qwen3-VL's chat format for system/user/assistant turns with images
    (:data:`depthvlm_ros.model.factory.CHAT_TEMPLATE`), which is what DepthVLM's prompts need.
    """
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    as_json = folder / "chat_template.json"
    if as_json.is_file():
        template = json.loads(as_json.read_text()).get("chat_template")
        if isinstance(template, str):
            return template
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        return template
    from depthvlm_ros.model.factory import CHAT_TEMPLATE

    return CHAT_TEMPLATE


def check_question(question: str, max_chars: int = MAX_QUESTION_CHARS) -> str:
    """Strip a question and bound its length; raise InputError if empty or too long."""
    if not isinstance(question, str):
        raise InputError("question must be a string")
    question = question.strip()
    if not question:
        raise InputError("question is empty")
    if len(question) > max_chars:
        raise InputError(f"question is {len(question)} characters; the limit is {max_chars}")
    return question


@dataclass
class ModelInputs:
    """Tensors for one batch of same-size images with one prompt each."""

    input_ids: torch.Tensor  # (B, L) int64
    attention_mask: torch.Tensor  # (B, L) int64
    mm_token_type_ids: torch.Tensor  # (B, L) int32, 1 on image tokens
    pixel_values: torch.Tensor  # (B * patches, C * T * P * P) float32
    image_grid_thw: torch.Tensor  # (B, 3) int64, in vision patches
    #: What the tensors' static prompt depends on, from host values (a camera plan's size and the batch): the
    #: key of a backend's static-prompt cache with no read of the tensors; None: the tensors are the key.
    prompt_key: tuple | None = None
    #: (width, height) px of the cameras' grid when every image's camera has it (a camera-grid head's output
    #: size); None otherwise.
    camera_size: tuple[int, int] | None = None

    def model_kwargs(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Keyword arguments of the model's forward (``pixel_values`` cast to ``dtype`` if given)."""
        pixels = self.pixel_values if dtype is None else self.pixel_values.to(dtype)
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "pixel_values": pixels,
                "image_grid_thw": self.image_grid_thw, "mm_token_type_ids": self.mm_token_type_ids}

    def to(self, device: torch.device | str) -> "ModelInputs":
        return ModelInputs(*(t.to(device) for t in (
            self.input_ids, self.attention_mask, self.mm_token_type_ids, self.pixel_values, self.image_grid_thw
        )), prompt_key=self.prompt_key, camera_size=self.camera_size)


class ImageTextProcessor:
    """Turns RGB images + a user text into DepthVLM's inputs (see module docstring)."""

    def __init__(self, tokenizer: Any, image_processor: Any, chat_template: str) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_template = chat_template
        self.image_token = "<|image_pad|>"
        self.image_token_id = self._token_id(self.image_token)
        self.merge_size = int(image_processor.merge_size)
        self.patch_size = int(image_processor.patch_size)
        self._prompt_cache: dict[tuple[str, int], list[int]] = {}

    def _token_id(self, token: str) -> int:
        ids = self.tokenizer.convert_tokens_to_ids([token])
        if not ids or ids[0] is None or ids[0] == self.tokenizer.unk_token_id:
            raise CheckpointError(f"tokenizer has no {token} token")
        return int(ids[0])

    @classmethod
    def from_folder(cls, folder: str | Path) -> "ImageTextProcessor":
        """Load the tokenizer, image processor settings and chat template from a model folder."""
        from transformers import AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        folder = Path(folder)
        config_path = folder / "preprocessor_config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{folder}: missing preprocessor_config.json")
        try:
            settings = json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{config_path}: not valid JSON ({exc.msg})") from None
        kwargs = {k: settings[k] for k in _IMAGE_PROCESSOR_KEYS if k in settings}
        size = kwargs.get("size")
        if isinstance(size, dict) and ("min_pixels" in size or "max_pixels" in size):  # older layout
            kwargs["size"] = {"shortest_edge": size.get("min_pixels", 56 * 56),
                              "longest_edge": size.get("max_pixels", 28 * 28 * 1280)}
        try:
            image_processor = Qwen2VLImageProcessorPil(**kwargs)
            tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
        except (OSError, ValueError, TypeError) as exc:
            raise CheckpointError(f"{folder}: cannot load tokenizer/processor ({exc})") from None
        return cls(tokenizer, image_processor, read_chat_template(folder, tokenizer))

    def prompt_text(self, user_text: str, answer: str | None = None) -> str:
        """The chat (system + user [image, text]) as text with one ``<|image_pad|>`` placeholder.

        Without ``answer`` it ends with the generation prompt; with it, the assistant turn holds it
        (training targets).
        """
        messages: list[dict[str, Any]] = [
            {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": user_text}]},
        ]
        if answer is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=answer is None
        )

    def token_ids(self, user_text: str, n_image_tokens: int, answer: str | None = None) -> list[int]:
        """Prompt token ids with the image placeholder expanded to ``n_image_tokens`` pads.

        The user's text is tokenized as text only: a special token written in it (``<|im_end|>``,
        ``<|image_pad|>``, ...) becomes the characters it is written with, never a control token, so a
        question cannot forge a turn of the conversation or an image. The chat template's own parts are
        tokenized as before (special tokens delimit the user text, so ordinary questions get exactly the
        ids of the whole prompt tokenized at once).
        """
        key = (user_text if answer is None else f"{user_text}\x00{answer}", n_image_tokens)
        cached = self._prompt_cache.get(key)
        if cached is None:
            text = self.prompt_text(USER_TEXT_SLOT, answer)
            if text.count(self.image_token) != 1 or text.count(USER_TEXT_SLOT) != 1:
                raise CheckpointError("chat template must place exactly one image placeholder and one user text")
            before, after = text.replace(self.image_token, self.image_token * n_image_tokens).split(USER_TEXT_SLOT)
            tokenize = self.tokenizer
            cached = (list(tokenize(before, add_special_tokens=False)["input_ids"])
                      + list(tokenize(user_text, add_special_tokens=False, split_special_tokens=True)["input_ids"])
                      + list(tokenize(after, add_special_tokens=False)["input_ids"]))
            if len(self._prompt_cache) > 64:  # bounded: questions vary, sizes rarely do
                self._prompt_cache.clear()
            self._prompt_cache[key] = cached
        return cached

    def processed_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) the image processor resizes a ``width`` x ``height`` image to."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        size = self.image_processor.size
        try:
            h, w = smart_resize(
                height, width, factor=self.patch_size * self.merge_size,
                min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"],
            )
        except ValueError as exc:  # e.g. an aspect ratio over 200
            raise InputError(f"image {width}x{height} cannot be processed: {exc}") from None
        return w, h

    def __call__(
        self, images: Sequence[np.ndarray], user_text: str, answers: Sequence[str] | None = None
    ) -> ModelInputs:
        """Process RGB uint8 images (same size) with one user text each (optionally answers)."""
        if not images:
            raise InputError("no images")
        self.processed_size(images[0].shape[1], images[0].shape[0])  # raises InputError if impossible
        pixels = self.image_processor(images=list(images), return_tensors="pt")
        grid = pixels["image_grid_thw"]
        n_tokens = int(grid[0].prod()) // (self.merge_size**2)
        rows = [
            self.token_ids(user_text, n_tokens, None if answers is None else answers[i])
            for i in range(len(images))
        ]
        if len({len(r) for r in rows}) != 1:
            raise InputError("samples of one batch must tokenize to the same length")
        input_ids = torch.tensor(rows, dtype=torch.long)
        return ModelInputs(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            mm_token_type_ids=(input_ids == self.image_token_id).to(torch.int32),
            pixel_values=pixels["pixel_values"],
            image_grid_thw=grid,
        )
