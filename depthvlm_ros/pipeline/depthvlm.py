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
from typing import Any, cast

import numpy as np
import torch

from depthvlm_ros.backends import BackendSpec, create_backend
from depthvlm_ros.backends.base import DepthBackend, SizeNotReadyError
from depthvlm_ros.backends.torch_backend import TorchBackend
from depthvlm_ros.errors import InputError
from depthvlm_ros.geometry import Intrinsics, resize_depth
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
    depth_model: np.ndarray  # (h, w) float32 metres on the processed (model) grid (a camera-grid head: the camera's)
    intrinsics_model: Intrinsics  # K of ``depth_model``'s grid (fx ~ 1000 px; a camera-grid head: the camera's K)
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
        backend: DepthBackend | BackendSpec | None = None,
        log: Callable[[str], None] = print,
    ) -> None:
        """``backend``: what runs the depth path, a ready :class:`DepthBackend` or a :class:`BackendSpec` to
        build (default PyTorch on the model); ``log`` gets the backend's notes (auto's choice, a fallback)."""
        self.model = model.eval()
        self.processor = processor
        self.name = name
        self.folder = folder
        #: One forward at a time: ``ask`` hooks the shared model and the stock model keeps
        #: per-call state (rope deltas), so threads (a ROS executor) take turns.
        self.lock = threading.RLock()
        self._reference: TorchBackend | None = None
        self._wanted: OrderedDict[tuple, tuple[int, int]] = OrderedDict()
        self._plans: OrderedDict[tuple, CameraPlan] = OrderedDict()
        self._fingerprint: str | None = None
        if isinstance(backend, BackendSpec):
            compiled = backend.name != "torch"  # (PyTorch needs no fingerprint: reading one writes the cache)
            backend = create_backend(backend, model=self.model, fingerprint=self.fingerprint if compiled else None,
                                     exporter=self.exporter(backend.background, log)
                                     if compiled and backend.needs_exporter else None, log=log)
        self._backend: DepthBackend = backend if backend is not None else TorchBackend(self.model)

    @property
    def backend(self) -> DepthBackend:
        """What runs the depth path (``predict_depth``, ``infer``); ``ask`` always uses ``self.model``."""
        return self._backend

    def with_backend(self, backend: DepthBackend | BackendSpec, log: Callable[[str], None] = print) -> DepthVLM:
        """The same model and processor (shared, not copied) with another backend: a new pipeline."""
        return DepthVLM(self.model, self.processor, self.name, self.folder, backend, log)

    @property
    def fingerprint(self) -> str | None:
        """The weights' fingerprint (compiled artefacts and served models of other weights are refused);
        None for a model that was not loaded from a folder."""
        if self._fingerprint is None and self.folder is not None:
            from depthvlm_ros.model.checkpoint import model_fingerprint

            self._fingerprint = model_fingerprint(self.folder)
        return self._fingerprint

    def export_path(self, width: int, height: int, dtype: str = "fp32") -> Path:
        """Where this model's on-demand ONNX export of one size is cached."""
        from depthvlm_ros.backends.export_cache import export_cache_path

        return export_cache_path(self.name, self.fingerprint, width, height, dtype)

    def exporter(self, background: bool, log: Callable[[str], None] = print) -> Callable[[int, int, bool], Path]:
        """What makes a missing ONNX size for a backend: in this process (the tools), or with ``background`` a
        worker process that loads the folder itself (the node)."""
        from depthvlm_ros.backends.export_cache import InProcessExporter, SubprocessExporter

        if background:
            return SubprocessExporter(self.export_path, self.folder, log=log)

        def export(width: int, height: int, path: Path, progress: Callable[[str], None]) -> None:
            from depthvlm_ros.backends.onnx_export import export_onnx

            export_onnx(self, width, height, path, check_images=1, progress=progress)

        return InProcessExporter(self.export_path, export, log=log)

    def exported_graphs(self, sizes: Sequence[tuple[int, int]], dtype: str = "fp32",
                        progress: Callable[[str], None] = print) -> list[Path]:
        """Checked single-image exports of this model at ``sizes``: from the export cache, made once when absent
        (what a Triton repository is written from)."""
        from depthvlm_ros.backends.onnx_export import export_onnx

        graphs = []
        for width, height in sizes:
            path = self.export_path(width, height, dtype)
            if not path.is_file():
                progress(f"exporting the depth path at {width}x{height} ({dtype}, once) -> {path}")
                export_onnx(self, width, height, path, dtype=dtype, check_images=1, progress=progress)
            graphs.append(path)
        return graphs

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
        weights: bool = True, backend: BackendSpec | None = None, log: Callable[[str], None] = print,
    ) -> "DepthVLM":
        """The finished model: a DepthVLM folder loaded strictly, by key name, safetensors only
        (:func:`load_depthvlm`; ``weights=False``: config, processor and key checks only, for a remote depth
        path), with the depth path ``backend`` describes (default PyTorch) built and ready."""
        loaded = load_depthvlm(folder, device, dtype, weights)
        return cls(loaded.model, loaded.processor, name=loaded.name, folder=loaded.folder, backend=backend, log=log)

    # -- depth ----------------------------------------------------------------------------------

    def plan(self, intrinsics: Intrinsics, route: RouteSettings = DEFAULT_ROUTE, exact: bool = True) -> CameraPlan:
        """This camera's plan with the backend that serves it now (cached; see :mod:`~depthvlm_ros.pipeline.plan`).

        The configured backend at its nearest size; PyTorch at the wanted size while a compiled
        backend is still making its first size in the background (:class:`SizeNotReadyError`).
        A new plan is made only when the camera, the route or the backend's size change.
        ``exact``: PIL's resize (True: the stock processor's pixels, bit for bit; the library,
        ``predict``, ``eval``) or torch's (False: the node's per-frame path, within 2 grey levels;
        :mod:`~depthvlm_ros.model.preprocess`).
        """
        key = (intrinsics, route)
        wanted = self._wanted.get(key)
        if wanted is None:
            wanted = model_input_size(self.processor, intrinsics, route)
            self._remember(self._wanted, key, wanted)
        try:
            backend, size = self.backend, self.backend.nearest_size(*wanted)
        except SizeNotReadyError:
            backend, size = self._torch, wanted
        if isinstance(backend, TorchBackend):
            self.require_weights("PyTorch depth")
        plan_key = (intrinsics, route, id(backend), size, exact)
        plan = self._plans.get(plan_key)
        if plan is None:
            image = image_plan(self.processor, intrinsics, size, route)
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
        self, images: Sequence[np.ndarray], intrinsics: Sequence[Intrinsics], route: RouteSettings = DEFAULT_ROUTE,
    ) -> list[DepthResult]:
        """Depth for several RGB uint8 images (one forward for all): each image's camera is planned with
        ``route`` (canonical focal, size caps; default the released protocol) and run through :meth:`infer`."""
        if len(images) != len(intrinsics) or not images:
            raise InputError("need one intrinsics per image, and at least one image")
        with self.lock:
            return self.infer([self.plan(k, route) for k in intrinsics], images)

    def predict_depth(
        self, rgb: np.ndarray, intrinsics: Intrinsics, route: RouteSettings = DEFAULT_ROUTE,
    ) -> DepthResult:
        """Metric depth of one RGB uint8 image (H, W, 3) taken with ``intrinsics`` (:meth:`predict_depth_batch`)."""
        return self.predict_depth_batch([rgb], [intrinsics], route)[0]

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
                    depth_model = p.image.metric(raw)  # the model grid, or the camera's from a camera-grid head
                    grid_k = p.image.model_k if depth_model.shape[::-1] == p.size else p.image.camera
                    results.append(DepthResult(p.restore(depth_model), p.image.camera, depth_model, grid_k,
                                               backend=backend.name))
        for r in results:
            r.timings_ms = dict(clock.ms)
        return results

    def infer_batch(self, frames: Sequence[tuple[CameraPlan, np.ndarray]]) -> list[DepthResult]:
        """Frames of several cameras, each ``(its plan, its RGB image)``: those whose plans reach one backend at one
        model-grid size go through the model in one :meth:`infer` call (one forward), the others in a call per
        size; results in the order of ``frames``, each with its own camera's grid and K. Each result's
        ``timings_ms`` are its call's (the whole batch's).
        """
        groups: OrderedDict[tuple, list[int]] = OrderedDict()
        for i, (plan, _rgb) in enumerate(frames):
            groups.setdefault(plan.batch_key, []).append(i)
        results: list[DepthResult | None] = [None] * len(frames)
        for members in groups.values():
            batch = self.infer([frames[i][0] for i in members], [frames[i][1] for i in members])
            for i, result in zip(members, batch):
                results[i] = result
        return cast("list[DepthResult]", results)

    # -- questions ----------------------------------------------------------------------------

    @torch.inference_mode()
    def ask(
        self,
        rgb: np.ndarray,
        intrinsics: Intrinsics,
        question: str,
        max_new_tokens: int = 64,
        route: RouteSettings = DEFAULT_ROUTE,
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
            return self._ask(rgb, intrinsics, question, int(max_new_tokens), route, should_stop, on_text)

    def _ask(self, rgb: np.ndarray, intrinsics: Intrinsics, question: str, max_new_tokens: int,
             route: RouteSettings, should_stop: Callable[[], bool] | None = None,
             on_text: Callable[[str, int], None] | None = None) -> Answer:
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        tokenizer = self.processor.tokenizer

        stopped = [False]

        class StopWhenAsked(StoppingCriteria):
            def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
                stopped[0] = stopped[0] or bool(should_stop is not None and should_stop())
                return cast("torch.BoolTensor", torch.full((input_ids.shape[0],), stopped[0], dtype=torch.bool,
                                                          device=input_ids.device))

        class TextSoFar(BaseStreamer):
            """``generate`` hands it the prompt, then each new token: ``on_text`` gets the answer so far."""

            def __init__(self, on_text: Callable[[str, int], None]) -> None:
                self.on_text = on_text
                self.prompt_seen = False
                self.ids: list[int] = []

            def put(self, value: torch.Tensor) -> None:
                if not self.prompt_seen:
                    self.prompt_seen = True
                    return
                self.ids += [int(t) for t in value.reshape(-1).tolist()]
                self.on_text(tokenizer.decode(self.ids, skip_special_tokens=True).strip(), len(self.ids))

            def end(self) -> None:
                pass

        clock = _StageClock(self.device)
        with clock.stage("preprocess"):
            image = image_plan(self.processor, intrinsics, model_input_size(self.processor, intrinsics, route), route)
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
                    streamer=TextSoFar(on_text) if on_text is not None else None,
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
