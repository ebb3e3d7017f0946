"""PyTorch backend: the reference. Runs the model's own forward on its device and dtype, any size."""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from depthvlm_ros.backends.base import DepthBackend, Stage, _no_stage

if TYPE_CHECKING:
    from depthvlm_ros.model.modeling import DepthVLMForConditionalGeneration

#: Static prompts kept (one per model-grid size and batch size; a few MB each for the 4B model).
MAX_PROMPTS = 8
#: The model's submodules timed as the stages of the depth path.
STAGE_MODULES = (("vision", ("model", "visual")), ("llm", ("model", "language_model")), ("head", ("depth_head",)))


@contextlib.contextmanager
def timed_stages(model: torch.nn.Module, stage: Stage) -> Iterator[None]:
    """Charge the vision tower, the LLM and the depth head to ``stage("vision" | "llm" | "head")``.

    Forward hooks open and close each stage around its module's call: the forward itself stays
    the model's one forward.
    """
    if stage is _no_stage:
        yield
        return
    open_stages: dict[str, Any] = {}
    handles = []
    for name, path in STAGE_MODULES:
        module = model
        for attr in path:
            module = getattr(module, attr)

        def enter(_module: Any, _args: Any, name: str = name) -> None:
            open_stages[name] = stage(name)
            open_stages[name].__enter__()

        def leave(_module: Any, _args: Any, _output: Any, name: str = name) -> None:
            open_stages.pop(name).__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class TorchBackend(DepthBackend):
    """The model's forward with the depth prompt precomputed per size (a :class:`StaticPrompt`).

    ``compile``: ``torch.compile`` the forward (first call per size is slow; on CUDA,
    ``compile_mode="reduce-overhead"`` replays it as a CUDA graph). Stage times (vision, LLM,
    head) are reported when not compiled; a compiled forward is one ``model`` stage.
    """

    name = "torch"

    def __init__(self, model: DepthVLMForConditionalGeneration, compile: bool = False,
                 compile_mode: str | None = None) -> None:
        self.model = model
        #: The model's forward, or its ``torch.compile`` wrapper.
        self._forward: Callable[..., Any] = model.forward
        if compile:
            self._forward = torch.compile(model.forward, dynamic=False, mode=compile_mode)
        self.compiled = compile
        self._prompts: OrderedDict[tuple, Any] = OrderedDict()

    def sizes(self) -> None:
        return None

    def input_device(self) -> str:
        return str(next(self.model.parameters()).device)

    def precision(self) -> str:
        dtype = next(self.model.parameters()).dtype
        return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")

    def describe(self) -> str:
        p = next(self.model.parameters())
        extra = ", compiled" if self.compiled else ""
        return f"torch ({p.device.type}, {str(p.dtype).replace('torch.', '')}{extra})"

    def static_prompt(self, inputs: Any) -> Any:
        """The depth prompt's constants for this batch's size (cached, at most :data:`MAX_PROMPTS`)."""
        key = (inputs.input_ids.shape, inputs.input_ids[0].cpu().numpy().tobytes(),
               tuple(inputs.image_grid_thw[0].tolist()), str(inputs.input_ids.device))
        prompt = self._prompts.get(key)
        if prompt is None:
            prompt = self.model.static_prompt(inputs)
            if len(self._prompts) >= MAX_PROMPTS:
                self._prompts.popitem(last=False)
            self._prompts[key] = prompt
        self._prompts.move_to_end(key)
        return prompt

    @torch.inference_mode()
    def depth(self, inputs, stage: Stage = _no_stage) -> np.ndarray:
        p = next(self.model.parameters())
        inputs = inputs.to(p.device)
        prompt = self.static_prompt(inputs)
        if self.compiled:
            with stage("model"):
                depth = self._forward(pixel_values=inputs.pixel_values.to(p.dtype), static_prompt=prompt,
                                      return_logits=False).depth
                return depth.float().cpu().numpy()
        with timed_stages(self.model, stage):
            depth = self._forward(pixel_values=inputs.pixel_values.to(p.dtype), static_prompt=prompt,
                                  return_logits=False).depth
        with stage("head"):  # the copy back is charged to the head, the stage that made it
            return depth.float().cpu().numpy()
