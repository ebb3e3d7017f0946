"""DepthVLM end to end: camera image + intrinsics -> metric depth (and answers).

Metric scale comes from the camera: the image is resized so that fx becomes the canonical
1000 px, the Qwen3-VL image processor snaps that to multiples of 32 px, the model predicts depth on
that grid, and the depth is resampled back to the camera's pixels. Both grids carry their own K.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from depthvlm_ros.backends.base import DepthBackend, SizeNotReadyError
from depthvlm_ros.backends.torch_backend import TorchBackend
from depthvlm_ros.errors import InputError
from depthvlm_ros.geometry import CANONICAL_FX, Intrinsics, resize_depth
from depthvlm_ros.model.loading import load_depthvlm
from depthvlm_ros.model.modeling import DepthVLMForConditionalGeneration
from depthvlm_ros.model.processing import ImageTextProcessor, check_question
from depthvlm_ros.pipeline.plan import (
    DEFAULT_ROUTE,
    CameraPlan,
    RouteSettings,
    image_plan,
    model_input_size,
    prompt_inputs,
)

STAGES = ("preprocess", "vision", "llm", "head", "postprocess")  # torch; compiled backends: "model"
#: Camera plans kept (one per camera, settings and backend size; a robot has a few cameras).
MAX_PLANS = 16


@dataclass
class DepthResult:
    """Depth of one image, on the model's grid and on the camera's grid, each with its K."""

    depth: np.ndarray  # (H, W) float32 metres on the camera grid, NaN invalid
    intrinsics: Intrinsics  # the camera's K (describes ``depth``)
    depth_model: np.ndarray  # (h, w) float32 metres on the processed (model) grid
    intrinsics_model: Intrinsics  # K of the processed grid (fx ~ 1000 px)
    timings_ms: dict[str, float] = field(default_factory=dict)  # per stage, for the whole batch
    backend: str = "torch"  # the backend that computed it (torch stands in while a compiled size is made)


@dataclass
class Answer:
    """A generated answer and the depth map measured from the same prefill."""

    text: str
    depth: DepthResult
    num_tokens: int
    timings_ms: dict[str, float] = field(default_factory=dict)
    stopped: bool = False  # generation was stopped early by ``should_stop`` (shutdown, timeout)


class _StageClock:
    """Wall-clock per stage; synchronises CUDA so GPU work is charged to its stage."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.ms: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.ms[name] = self.ms.get(name, 0.0) + (time.perf_counter() - start) * 1e3


class DepthVLM:
    """A loaded DepthVLM: processor + model on one device and dtype."""

    def __init__(
        self,
        model: DepthVLMForConditionalGeneration,
        processor: ImageTextProcessor,
        name: str = "depthvlm",
        folder: Path | None = None,
    ) -> None:
        self.model = model.eval()
        self.processor = processor
        self.name = name
        self.folder = folder
        #: What runs the depth path (``predict_depth``); ``ask`` always uses ``self.model``.
        self.backend: DepthBackend = TorchBackend(self.model)
        #: One forward at a time: ``ask`` hooks the shared model and the stock model keeps
        #: per-call state (rope deltas), so threads (a ROS executor) take turns.
        self.lock = threading.RLock()
        self._reference: TorchBackend | None = None
        self._wanted: OrderedDict[tuple, tuple[int, int]] = OrderedDict()
        self._plans: OrderedDict[tuple, CameraPlan] = OrderedDict()

    @property
    def has_weights(self) -> bool:
        """False for a model loaded with ``weights=False`` (on ``meta``): only a remote backend serves it."""
        return self.device.type != "meta"

    def require_weights(self, what: str) -> None:
        """InputError saying why ``what`` cannot run when the model was loaded without its weights."""
        if not self.has_weights:
            raise InputError(f"{what} needs the model's weights, and this {self.name} was loaded without them "
                             "(the node's answers: false; the depth path runs on a Triton server)")

    @property
    def _torch(self) -> DepthBackend:
        """PyTorch: the backend itself, or the one reference that stands in for a compiled backend
        (kept, so its static prompts and the plans that name it are made once)."""
        self.require_weights("PyTorch depth")
        if isinstance(self.backend, TorchBackend):
            return self.backend
        if self._reference is None:
            self._reference = TorchBackend(self.model)
        return self._reference

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32",
        weights: bool = True,
    ) -> "DepthVLM":
        """Load a DepthVLM folder strictly, by key name, safetensors only (:func:`load_depthvlm`;
        ``weights=False``: config, processor and key checks only, for a remote depth path)."""
        loaded = load_depthvlm(folder, device, dtype, weights)
        return cls(loaded.model, loaded.processor, name=loaded.name, folder=loaded.folder)

    # -- depth ----------------------------------------------------------------------------------

    def plan(self, intrinsics: Intrinsics, settings: RouteSettings = DEFAULT_ROUTE, exact: bool = True) -> CameraPlan:
        """This camera's plan with the backend that serves it now (cached; see :mod:`~depthvlm_ros.pipeline.plan`).

        The configured backend at its nearest size; PyTorch at the wanted size while a compiled
        backend is still making its first size in the background (:class:`SizeNotReadyError`).
        A new plan is made only when the camera, the settings or the backend's size change.
        ``exact``: PIL's resize (True: the stock processor's pixels, bit for bit; the library,
        ``predict``, ``eval``) or torch's (False: the node's per-frame path, within 2 grey levels;
        :mod:`~depthvlm_ros.model.preprocess`).
        """
        key = (intrinsics, settings)
        wanted = self._wanted.get(key)
        if wanted is None:
            wanted = model_input_size(self.processor, intrinsics, settings)
            self._remember(self._wanted, key, wanted)
        try:
            backend, size = self.backend, self.backend.nearest_size(*wanted)
        except SizeNotReadyError:
            backend, size = self._torch, wanted
        if isinstance(backend, TorchBackend):
            self.require_weights("PyTorch depth")
        plan_key = (intrinsics, settings, id(backend), size, exact)
        plan = self._plans.get(plan_key)
        if plan is None:
            image = image_plan(self.processor, intrinsics, size, settings)
            plan = CameraPlan(image, self.processor, backend, torch.device(backend.input_device()), exact)
            self._remember(self._plans, plan_key, plan)
        return plan

    @staticmethod
    def _remember(cache: OrderedDict, key: Any, value: Any) -> None:
        if len(cache) >= MAX_PLANS:
            cache.popitem(last=False)
        cache[key] = value

    @torch.inference_mode()
    def predict_depth_batch(
        self,
        images: Sequence[np.ndarray],
        intrinsics: Sequence[Intrinsics],
        canonical_fx: float = CANONICAL_FX,
        match_fy: bool = False,
        max_side: int = 0,
        max_tokens: int = 0,
    ) -> list[DepthResult]:
        """Depth for several images of one camera (one forward for all).

        ``max_side``/``max_tokens`` cap the model input size (0 = the protocol's size).
        """
        if len(images) != len(intrinsics) or not images:
            raise InputError("need one intrinsics per image, and at least one image")
        settings = RouteSettings(canonical_fx, match_fy, max_side, max_tokens)
        with self.lock:
            return self.infer([self.plan(k, settings) for k in intrinsics], images)

    def predict_depth(
        self, rgb: np.ndarray, intrinsics: Intrinsics, canonical_fx: float = CANONICAL_FX, match_fy: bool = False,
        max_side: int = 0, max_tokens: int = 0,
    ) -> DepthResult:
        """Metric depth of one RGB uint8 image (H, W, 3) taken with ``intrinsics``."""
        return self.predict_depth_batch([rgb], [intrinsics], canonical_fx, match_fy, max_side, max_tokens)[0]

    @torch.inference_mode()
    def infer(self, plan: CameraPlan | Sequence[CameraPlan], images: Sequence[np.ndarray]) -> list[DepthResult]:
        """A frame's way, in one line: ``plan.prepare -> backend.depth -> plan.image.metric -> plan.restore``.

        ``plan``: the camera's plan, or one plan per image (equal sizes: one forward for all).
        """
        plans = [plan] * len(images) if isinstance(plan, CameraPlan) else list(plan)
        # The model's lock guards the local model; a remote backend's call waits on a network and never
        # holds it (a question keeps the model meanwhile; a stalled server never stalls answers).
        with contextlib.nullcontext() if plans[0].backend.remote else self.lock:
            clock = _StageClock(self.device)
            with clock.stage("preprocess"):
                inputs = plans[0].prepare(images, plans)
            backend = plans[0].backend
            try:
                output = backend.depth(inputs, clock.stage)
            except SizeNotReadyError:  # the size was evicted since it was planned: PyTorch runs these inputs
                backend = self._torch
                output = backend.depth(inputs, clock.stage)
            with clock.stage("postprocess"):
                results = []
                for p, raw in zip(plans, output):
                    depth_model = p.image.metric(raw)
                    results.append(DepthResult(p.restore(depth_model), p.image.camera, depth_model, p.image.model_k,
                                               backend=backend.name))
        for r in results:
            r.timings_ms = dict(clock.ms)
        return results

    # -- questions ----------------------------------------------------------------------------

    @torch.inference_mode()
    def ask(
        self,
        rgb: np.ndarray,
        intrinsics: Intrinsics,
        question: str,
        max_new_tokens: int = 64,
        canonical_fx: float = CANONICAL_FX,
        max_side: int = 0,
        max_tokens: int = 0,
        should_stop: Callable[[], bool] | None = None,
        on_text: Callable[[str, int], None] | None = None,
    ) -> Answer:
        """Answer a question about the image (greedy) and return the depth from the same prefill.

        ``generate()`` runs unchanged over the model's one forward, whose prefill returns the depth
        map with the first token's logits (a forward hook keeps it): the vision tower and the prefill
        each run once for both the answer and the depth map. ``should_stop()`` is checked after
        every generated token; when it returns True generation ends there (``Answer.stopped``).
        ``on_text(text, num_tokens)`` is called after every generated token with the answer so far.
        """
        question = check_question(question)
        self.require_weights("answering a question")
        if not 1 <= int(max_new_tokens) <= 4096:
            raise InputError(f"max_new_tokens must be in 1..4096, got {max_new_tokens}")
        with self.lock:
            return self._ask(rgb, intrinsics, question, int(max_new_tokens), canonical_fx, max_side, max_tokens,
                             should_stop, on_text)

    def _ask(self, rgb: np.ndarray, intrinsics: Intrinsics, question: str, max_new_tokens: int,
             canonical_fx: float, max_side: int = 0, max_tokens: int = 0,
             should_stop: Callable[[], bool] | None = None,
             on_text: Callable[[str, int], None] | None = None) -> Answer:
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        tokenizer = self.processor.tokenizer

        stopped = [False]

        class StopWhenAsked(StoppingCriteria):
            def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
                stopped[0] = stopped[0] or bool(should_stop is not None and should_stop())
                return torch.full((input_ids.shape[0],), stopped[0], dtype=torch.bool, device=input_ids.device)

        class TextSoFar(BaseStreamer):
            """``generate`` hands it the prompt, then each new token: ``on_text`` gets the answer so far."""

            def __init__(self) -> None:
                self.prompt_seen = False
                self.ids: list[int] = []

            def put(self, value: torch.Tensor) -> None:
                if not self.prompt_seen:
                    self.prompt_seen = True
                    return
                self.ids += [int(t) for t in value.reshape(-1).tolist()]
                on_text(tokenizer.decode(self.ids, skip_special_tokens=True).strip(), len(self.ids))

            def end(self) -> None:
                pass

        clock = _StageClock(self.device)
        with clock.stage("preprocess"):
            settings = RouteSettings(canonical_fx, False, max_side, max_tokens)
            image = image_plan(self.processor, intrinsics, model_input_size(self.processor, intrinsics, settings),
                               settings)
            pixels = image.pixel_values(rgb, self.device, exact=True)  # not per frame: the stock pixels
            inputs = prompt_inputs(self.processor, image, question, pixels, self.device)
        captured: dict[str, Any] = {}

        def keep_depth(_module: Any, _args: Any, output: Any) -> None:  # the prefill's depth (decoding has none)
            if output.depth is not None:
                captured.setdefault("depth", output.depth)

        hook = self.model.register_forward_hook(keep_depth)
        try:
            with clock.stage("generate"):
                out = self.model.generate(
                    **inputs.model_kwargs(self.dtype),
                    max_new_tokens=int(max_new_tokens),
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    stopping_criteria=StoppingCriteriaList([StopWhenAsked()]) if should_stop else None,
                    streamer=TextSoFar() if on_text is not None else None,
                )
        finally:
            hook.remove()
        new_tokens = out[0, inputs.input_ids.shape[1]:]
        text = tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
        with clock.stage("postprocess"):
            depth_model = image.metric(captured["depth"][0].float().cpu().numpy())
            result = DepthResult(resize_depth(depth_model, *intrinsics.size), intrinsics, depth_model, image.model_k,
                                 backend="torch")
        result.timings_ms = dict(clock.ms)
        return Answer(text=text, depth=result, num_tokens=int(new_tokens.numel()), timings_ms=dict(clock.ms),
                      stopped=stopped[0])
