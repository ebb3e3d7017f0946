"""PyTorch backend: the reference. Runs the model module on its device and dtype, any size."""

from __future__ import annotations

import numpy as np
import torch

from depthvlm_ros.backends.base import DepthBackend, Stage, _no_stage


class TorchBackend(DepthBackend):
    """Vision tower once, LLM prefill once, depth head — each timed as its own stage."""

    name = "torch"

    def __init__(self, model: torch.nn.Module, compile: bool = False) -> None:
        self.model = model
        self._vision = model.encode_images
        self._llm = model.run_language_model
        self._head = model.predict_depth_map
        if compile:  # optional: torch.compile the three stages (first call per size is slow)
            self._vision = torch.compile(self._vision, dynamic=False)
            self._llm = torch.compile(self._llm, dynamic=False)
            self._head = torch.compile(self._head, dynamic=False)
        self.compiled = compile

    def sizes(self) -> None:
        return None

    def precision(self) -> str:
        dtype = next(self.model.parameters()).dtype
        return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")

    def describe(self) -> str:
        p = next(self.model.parameters())
        extra = ", compiled" if self.compiled else ""
        return f"torch ({p.device.type}, {str(p.dtype).replace('torch.', '')}{extra})"

    @torch.inference_mode()
    def depth(self, inputs, stage: Stage = _no_stage) -> np.ndarray:
        p = next(self.model.parameters())
        inputs = inputs.to(p.device)
        with stage("vision"):
            vision = self._vision(inputs.pixel_values.to(p.dtype), inputs.image_grid_thw)
            deepstack = list(vision.deepstack_features)
        with stage("llm"):
            hidden = self._llm(
                inputs.input_ids, inputs.image_grid_thw, inputs.mm_token_type_ids, vision, inputs.attention_mask
            )
        with stage("head"):
            feats = self.model.gather_depth_features(inputs.input_ids, inputs.image_grid_thw, deepstack, hidden)
            return self._head(feats).float().cpu().numpy()
