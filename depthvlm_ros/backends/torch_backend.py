"""PyTorch backend: the reference. Runs the model's own forward on its device and dtype, any size."""

from __future__ import annotations

import contextlib
import dataclasses
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.nn.attention import SDPBackend

from depthvlm_ros.backends.base import BackendError, DepthBackend, Stage, _no_stage

if TYPE_CHECKING:
    from depthvlm_ros.model.modeling import DepthVLMForConditionalGeneration

#: Static prompts kept (one per model-grid size and batch size; a few MB each for the 4B model).
MAX_PROMPTS = 8
#: The ``compile`` setting's values: eager; ``torch.compile(fullgraph=True)``; that, replayed as CUDA graphs.
COMPILE_MODES = ("none", "default", "graphs")
#: The ``head_output`` setting's values: depth on the model grid (resampled to the camera on the host, the released
#: way) or on the camera's grid straight from the head (docs/model.md has its tolerance).
HEAD_OUTPUTS = ("model_grid", "camera_grid")
#: Plans (model-grid size and batch) compiled at once unless told (each a graph; with ``graphs``, a CUDA graph
#: and its memory pool).
DEFAULT_COMPILED_PLANS = 2
#: Devices where the depth head convolves in channels-last memory (``StaticPrompt.channels_last``): measured
#: faster on the CPU (1.65x the head of depthvlm-tiny, 1.17x the 4B head; docs/benchmarks.md), and NHWC is the
#: layout of cuDNN's tensor-core convolutions (unmeasured on a GPU here). The same depth within float rounding.
CHANNELS_LAST_DEVICES = ("cpu", "cuda")
#: SDPA kernels per tower on CUDA, by priority (``torch.nn.attention.sdpa_kernel``). The vision tower (non-causal,
#: one image per sequence): cuDNN's fused attention, then flash, then memory-efficient. The LLM (causal, grouped-query):
#: flash, then memory-efficient. Math (the eager computation) last in both, for inputs none of them takes (flash and
#: cuDNN need fp16/bf16). Elsewhere torch's own choice is kept.
VISION_SDPA_CUDA = (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                    SDPBackend.MATH)
LLM_SDPA_CUDA = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)
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


def execution_settings(model: DepthVLMForConditionalGeneration, device: torch.device) -> dict[str, Any]:
    """How the torch backend runs the depth path on ``device``: ``StaticPrompt``'s execution fields (a tower's
    kernels are chosen only where it runs ``sdpa`` attention on CUDA)."""
    config = model.config

    def sdpa(tower: Any) -> bool:
        return device.type == "cuda" and tower._attn_implementation == "sdpa"

    return {"channels_last": device.type in CHANNELS_LAST_DEVICES,
            "vision_attention": VISION_SDPA_CUDA if sdpa(config.vision_config) else (),
            "llm_attention": LLM_SDPA_CUDA if sdpa(config.text_config) else ()}


def describe_execution(settings: dict[str, Any]) -> str:
    """One line: the SDPA kernels per tower by priority, and the head's memory format."""
    def names(kernels: tuple[SDPBackend, ...]) -> str:
        return " > ".join(k.name.lower().removesuffix("_attention") for k in kernels) or "torch's choice"

    head = "channels-last" if settings["channels_last"] else "contiguous"
    return (f"SDPA vision tower {names(settings['vision_attention'])}; LLM {names(settings['llm_attention'])}; "
            f"depth head {head}")


class TorchBackend(DepthBackend):
    """The model's forward with the depth prompt precomputed per plan (a :class:`StaticPrompt`).

    ``compile`` (:data:`COMPILE_MODES`): ``none`` runs eager; ``default`` runs
    ``torch.compile(fullgraph=True)`` of the depth forward (the first frame of a plan compiles it);
    ``graphs`` compiles it with mode ``reduce-overhead``, which replays it as a CUDA graph (CUDA only;
    refused elsewhere). At most ``max_compiled`` plans (size and batch) are compiled at once: a plan
    beyond them clears the compiled graphs (``torch._dynamo.reset``, which also frees CUDA graphs'
    memory), and the plans still in use compile again on their next frame. Stage times (vision, LLM,
    head) are reported eager; a compiled forward is one ``model`` stage.

    ``head_output`` (:data:`HEAD_OUTPUTS`): ``camera_grid`` has the head make the depth at the cameras' grid
    (the official head's ``output_size``) when all images of a call come from cameras of one size, instead of
    the model grid that the pipeline then resamples; not bit-equal (docs/model.md states the tolerance).

    How it runs, by device: the head's convolutions in channels-last memory (:data:`CHANNELS_LAST_DEVICES`) and, on
    CUDA under ``sdpa`` attention, the SDPA kernels of each tower (:data:`VISION_SDPA_CUDA`, :data:`LLM_SDPA_CUDA`),
    said once through ``log``. On the CPU torch chooses the attention kernels as before.
    """

    name = "torch"

    def __init__(self, model: DepthVLMForConditionalGeneration, compile: str = "none",
                 max_compiled: int = DEFAULT_COMPILED_PLANS, head_output: str = "model_grid",
                 log: Callable[[str], None] | None = None) -> None:
        if compile not in COMPILE_MODES:
            raise BackendError(f"compile must be one of {', '.join(COMPILE_MODES)}, got {compile!r}")
        if head_output not in HEAD_OUTPUTS:
            raise BackendError(f"head_output must be one of {', '.join(HEAD_OUTPUTS)}, got {head_output!r}")
        device = next(model.parameters()).device
        if compile == "graphs" and device.type != "cuda":
            raise BackendError(f"compile graphs (CUDA graphs) needs a CUDA device, the model is on {device}: "
                               "use compile default or none")
        if max_compiled < 1:
            raise BackendError(f"max_compiled must be at least 1, got {max_compiled}")
        self.model = model
        self.head_output = head_output
        #: The static prompts' execution settings on this device (see the class docstring).
        self.execution = execution_settings(model, device)
        if log is not None and device.type == "cuda":
            log(f"torch backend on {device}: " + describe_execution(self.execution))
        self.compile = compile
        self.max_compiled = max_compiled
        #: The model's forward, or its ``torch.compile`` wrapper (one for all plans; dynamo keeps a graph per plan).
        self._forward: Callable[..., Any] = model.forward
        if compile != "none":
            self._forward = torch.compile(model.forward, fullgraph=True, dynamic=False,
                                          mode="reduce-overhead" if compile == "graphs" else None)
        self._compiled_plans: OrderedDict[tuple, None] = OrderedDict()  # least recently used first
        self._prompts: OrderedDict[tuple, Any] = OrderedDict()
        self._host: dict[tuple[int, ...], torch.Tensor] = {}  # pinned host buffers for the depth, by shape (CUDA)

    @property
    def compiled(self) -> bool:
        return self.compile != "none"

    def sizes(self) -> None:
        return None

    def input_device(self) -> str:
        return str(next(self.model.parameters()).device)

    def precision(self) -> str:
        dtype = next(self.model.parameters()).dtype
        return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")

    def describe(self) -> str:
        p = next(self.model.parameters())
        extra = {"none": "", "default": ", compiled", "graphs": ", compiled, CUDA graphs"}[self.compile]
        extra += ", camera-grid head" if self.head_output == "camera_grid" else ""
        return f"torch ({p.device.type}, {str(p.dtype).replace('torch.', '')}{extra})"

    def static_prompt(self, inputs: Any) -> Any:
        """The depth prompt's constants for this batch's plan (cached, at most :data:`MAX_PROMPTS`).

        Keyed by ``inputs.prompt_key`` (a camera plan's host values: no read of the tensors); inputs made
        without a plan are keyed by their prompt's tokens and grid (read to the host once per call).
        """
        key = inputs.prompt_key
        if key is None:
            key = (inputs.input_ids.shape, inputs.input_ids[0].cpu().numpy().tobytes(),
                   tuple(inputs.image_grid_thw[0].tolist()), str(inputs.input_ids.device))
        output_size = None
        if self.head_output == "camera_grid" and inputs.camera_size is not None:
            output_size = (inputs.camera_size[1], inputs.camera_size[0])
        key = (*key, output_size)
        prompt = self._prompts.get(key)
        if prompt is None:
            prompt = dataclasses.replace(self.model.static_prompt(inputs, output_size=output_size), **self.execution)
            if len(self._prompts) >= MAX_PROMPTS:
                self._prompts.popitem(last=False)
            self._prompts[key] = prompt
        self._prompts.move_to_end(key)
        return prompt

    def _hold_compiled(self, prompt: Any) -> None:
        """Count ``prompt``'s plan among the compiled ones; past ``max_compiled``, clear the compiled graphs."""
        key = (prompt.position_ids.shape, prompt.grid_h, prompt.grid_w, prompt.output_size,
               str(prompt.position_ids.device))
        if key not in self._compiled_plans and len(self._compiled_plans) >= self.max_compiled:
            torch._dynamo.reset()
            self._compiled_plans.clear()
        self._compiled_plans[key] = None
        self._compiled_plans.move_to_end(key)

    def _to_host(self, depth: torch.Tensor) -> np.ndarray:
        """(B, H, W) depth -> float32 numpy. On CUDA through a pinned buffer (one per shape, reused), copied
        non-blocking, then one wait on the stream; elsewhere the tensor itself."""
        depth = depth.float()
        if depth.device.type != "cuda":
            return depth.cpu().numpy()
        host = self._host.get(tuple(depth.shape))
        if host is None:
            host = self._host[tuple(depth.shape)] = torch.empty(depth.shape, dtype=torch.float32, pin_memory=True)
        host.copy_(depth, non_blocking=True)
        torch.cuda.current_stream(depth.device).synchronize()
        return host.numpy().copy()  # the buffer is the next frame's: the caller keeps its own

    @torch.inference_mode()
    def depth(self, inputs, stage: Stage = _no_stage) -> np.ndarray:
        p = next(self.model.parameters())
        inputs = inputs.to(p.device)
        prompt = self.static_prompt(inputs)
        pixels = inputs.pixel_values.to(p.dtype)
        if self.compiled:
            self._hold_compiled(prompt)
            with stage("model"):
                return self._to_host(self._forward(pixel_values=pixels, static_prompt=prompt,
                                                   return_logits=False).depth)
        with timed_stages(self.model, stage):
            depth = self._forward(pixel_values=pixels, static_prompt=prompt, return_logits=False).depth
        with stage("head"):  # the copy back is charged to the head, the stage that made it
            return self._to_host(depth)
