"""ONNX Runtime backend: the exported depth graph on CPU or CUDA, one session per model size."""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from depthvlm_ros.backends.base import BackendError, DepthBackend, Stage, _no_stage
from depthvlm_ros.backends.onnx_export import INPUT_NAME, export_size, read_metadata

PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


class OnnxRuntimeBackend(DepthBackend):
    """Sessions for exported graphs keyed by model-grid size (at most ``max_sessions`` kept).

    ``exporter(width, height) -> path``, when given, exports a missing size on first use (slow
    once; the file is kept), so a node with a new camera size still runs the compiled path.
    """

    name = "onnxruntime"

    def __init__(
        self,
        onnx_paths: Sequence[str | Path] = (),
        providers: Sequence[str] | None = None,
        device: str = "cpu",
        expected_fingerprint: str | None = None,
        exporter: Callable[[int, int], Path] | None = None,
        threads: int | None = None,
        max_sessions: int = 4,
    ) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendError("onnxruntime is not installed (pip install onnxruntime or onnxruntime-gpu)") from None
        self._ort = ort
        requested = list(providers) if providers else PROVIDERS.get(device.split(":")[0], PROVIDERS["cpu"])
        available = set(ort.get_available_providers())
        if requested[0] not in available:
            have = ", ".join(sorted(available))
            raise BackendError(f"onnxruntime has no {requested[0]} here (available: {have})")
        self.providers = [p for p in requested if p in available]
        self.expected_fingerprint = expected_fingerprint
        self.exporter = exporter
        self.threads = threads or len(os.sched_getaffinity(0))
        self.max_sessions = max_sessions
        self.vision_patch = 16  # pixels per vision patch (Qwen3-VL); read from each export's metadata
        self._paths: dict[tuple[int, int], Path] = {}
        self._sessions: collections.OrderedDict[tuple[int, int], object] = collections.OrderedDict()
        for path in onnx_paths:
            self.add(path)

    def add(self, path: str | Path) -> tuple[int, int]:
        """Register an exported graph; its size comes from its metadata. Refuses other weights."""
        path = Path(path)
        if not path.is_file():
            raise BackendError(f"{path}: no such ONNX file (make one with: depthvlm export --size WxH)")
        meta = read_metadata(path)
        size = export_size(meta, path)
        fingerprint = meta.get("depthvlm.model_fingerprint", "")
        if self.expected_fingerprint and fingerprint != self.expected_fingerprint:
            raise BackendError(
                f"{path} was exported from other weights (model {fingerprint or 'unknown'}, this model "
                f"{self.expected_fingerprint}); re-export it: depthvlm export --model DIR "
                f"--size {meta['depthvlm.size']}"
            )
        self.vision_patch = int(meta.get("depthvlm.vision_patch", self.vision_patch))
        self._paths[size] = path
        return size

    def sizes(self) -> list[tuple[int, int]] | None:
        return None if self.exporter is not None else sorted(self._paths)

    def describe(self) -> str:
        sizes = ", ".join(f"{w}x{h}" for w, h in sorted(self._paths)) or "none yet"
        return f"onnxruntime ({self.providers[0]}, sizes {sizes})"

    def _session(self, size: tuple[int, int]):
        if size in self._sessions:
            self._sessions.move_to_end(size)
            return self._sessions[size]
        if size not in self._paths:
            if self.exporter is None:
                have = ", ".join(f"{w}x{h}" for w, h in sorted(self._paths)) or "none"
                raise BackendError(f"no ONNX graph for {size[0]}x{size[1]} (have: {have})")
            self.add(self.exporter(*size))
        options = self._ort.SessionOptions()
        options.graph_optimization_level = self._ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = self.threads
        options.log_severity_level = 3
        # No busy-waiting between runs: spinning workers would steal the cores from the rest of the
        # process (ROS callbacks, postprocessing, the torch model answering questions).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = self._ort.InferenceSession(str(self._paths[size]), options, providers=self.providers)
        self._sessions[size] = session
        while len(self._sessions) > self.max_sessions:
            self._sessions.popitem(last=False)
        return session

    def depth(self, inputs, stage: Stage = _no_stage) -> np.ndarray:
        grid = inputs.image_grid_thw
        _, gh, gw = (int(v) for v in grid[0])
        session = self._session((gw * self.vision_patch, gh * self.vision_patch))
        dtype = np.float16 if session.get_inputs()[0].type == "tensor(float16)" else np.float32
        pixels = inputs.pixel_values.numpy() if hasattr(inputs.pixel_values, "numpy") else inputs.pixel_values
        per_image = pixels.shape[0] // grid.shape[0]
        outputs = []
        with stage("model"):
            for i in range(grid.shape[0]):
                chunk = np.ascontiguousarray(pixels[i * per_image : (i + 1) * per_image], dtype=dtype)
                outputs.append(session.run(None, {INPUT_NAME: chunk})[0].astype(np.float32))
        return np.concatenate(outputs, axis=0)
