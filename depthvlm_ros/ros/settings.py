"""The node's settings, typed: one frozen dataclass per parameter group and :class:`Settings` holding them.

Generated from the parameter table (``depthvlm_ros/ros/params.py``) by
``python -m depthvlm_ros.ros.params --settings > depthvlm_ros/ros/settings.py``; a test keeps them equal.
The node's parts read ``settings.<group>.<name>``: a misspelt name is an error where it is written, not a
``KeyError`` at run time. A run-time parameter change makes a new :class:`Settings`, validated as a whole.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LifecycleSettings:
    """Lifecycle (ros/node.py)."""

    #: configure and activate at start (a plain node); false: wait in unconfigured for a lifecycle manager
    #: (~/change_state) (read-only)
    autostart: bool = True

@dataclass(frozen=True)
class ModelSettings:
    """Model, backend and inference size (ros/node.py configure; pipeline/plan.py)."""

    #: DepthVLM folder (Hugging Face layout, safetensors); empty = the built-in model (read-only)
    model_path: str = ''
    #: what runs the depth path; auto = tensorrt with an engine in engine_paths and CUDA, torch when device is
    #: cuda, else onnxruntime on the CPU, else torch; triton = a Triton server at triton_url (read-only)
    backend: str = 'auto'
    #: if the backend is refused, fall back (tensorrt -> onnxruntime -> torch) (read-only)
    backend_fallback: bool = True
    #: load the PyTorch weights, to answer questions; false (only with backend triton): no weights are read (the
    #: depth path runs on the server), ~/spatial_query and ~/ask are refused (read-only)
    answers: bool = True
    #: backend triton: the server's gRPC address (host:port); unreachable = diagnostics ERROR and frames dropped
    #: until it answers (tried again at most every second) (read-only)
    triton_url: str = 'localhost:8001'
    #: backend triton: served models are named <triton_model>_WxH, one per size (depthvlm export --triton-repo,
    #: depthvlm serve) (read-only)
    triton_model: str = 'depthvlm_depth'
    #: backend triton: a file (mode 600) whose first line is the server's access token; empty =
    #: $DEPTHVLM_TRITON_TOKEN, else the file depthvlm serve writes in the cache (read-only)
    triton_token_file: str = ''
    #: backend triton: longest a frame's request may take; a slower answer fails that frame (counted in
    #: frames_failed_backend) (read-only)
    triton_timeout_s: float = 1.0
    #: backend triton: PEM root certificate of the server (set: gRPC over TLS) (read-only)
    triton_tls_root_cert: str = ''
    #: backend triton: PEM client certificate chain (mutual TLS; with triton_tls_key) (read-only)
    triton_tls_cert: str = ''
    #: backend triton: PEM client private key (mutual TLS) (read-only)
    triton_tls_key: str = ''
    #: cpu, cuda or cuda:N (read-only)
    device: str = 'cpu'
    #: where the PyTorch model (answers, and depth when backend is torch) lives; empty = device. With backend
    #: tensorrt, cpu keeps the GPU for the engine (answers then run on the CPU) (read-only)
    answer_device: str = ''
    #: weights dtype of the PyTorch model (read-only)
    precision: str = 'fp32'
    #: ONNX graphs (onnxruntime) or TensorRT engines (tensorrt); empty = export/cache (read-only)
    engine_paths: tuple[str, ...] = ()
    #: backend torch: the depth forward eager (none), torch.compile'd in one graph (default; a plan's first
    #: frame compiles it) or that replayed as CUDA graphs (graphs; CUDA only); max_compiled_sizes plans compiled
    #: at once (0 = 2) (read-only)
    compile: str = 'none'
    #: backend torch: the depth head outputs the model grid, resampled to the camera (model_grid, the released
    #: way), or the camera's grid directly (camera_grid: less work, within the tolerance docs/model.md states)
    #: (read-only)
    head_output: str = 'model_grid'
    #: compiled sizes held at once; 0 = the backend's default: 4 ONNX Runtime sessions (a new size is exported
    #: in the background while the nearest held size serves), 1 TensorRT engine (each holds all the weights), 2
    #: compiled torch plans (read-only)
    max_compiled_sizes: int = 0
    #: once max_compiled_sizes are held, a new size replaces a held one only when that one was unused this long
    #: (sizes in use are never swapped out) (read-only)
    compiled_size_idle_s: float = 30.0
    #: the model's canonical focal length in pixels (1000 for DepthVLM) (read-only)
    canonical_fx: float = 1000.0
    #: scale rows by canonical_fx / fy instead of / fx (non-square pixels)
    match_fy: bool = False
    #: cap on the model input's longer side in pixels (0 = none); a cap rescales the depth by the focal ratio
    #: (approximation); it bounds memory (read-only)
    max_side_px: int = 0
    #: cap on the model's image tokens, one per 32x32 px (0 = only the model's own max_pixels); 1280 keeps the
    #: released protocol for a 640x480 camera with fx >= 485 px, larger canonical sizes take the canonical-
    #: camera route; it bounds memory (read-only)
    max_image_tokens: int = 1280

@dataclass(frozen=True)
class IntakeSettings:
    """Cameras and their inputs (ros/intake.py)."""

    #: camera namespaces, each with its own image, camera_info, depth/*, points (e.g. [front, left]); empty =
    #: one camera on the plain topic names. The model is loaded once (read-only)
    cameras: tuple[str, ...] = ()
    #: subscribe to image/compressed (JPEG/PNG) instead of image (read-only)
    use_compressed: bool = False
    #: pair image and camera_info stamps within this many seconds (0 = exact)
    sync_tolerance_s: float = 0.0
    #: focal length (px) for frames without matching camera_info (0 = skip them)
    fallback_fx: float = 0.0
    #: QoS reliability of image/camera_info subscriptions (read-only)
    input_reliability: str = 'best_effort'
    #: QoS history depth of the input subscriptions (read-only)
    input_depth: int = 2

@dataclass(frozen=True)
class WorkerSettings:
    """The inference worker (ros/worker.py)."""

    #: upper bound on inferences per second (0 = as fast as the model runs)
    max_rate_hz: float = 0.0
    #: take every camera's waiting frame at once: those whose plans reach one model-grid size go through the
    #: model in one forward (each camera keeps its own outputs); false = one camera's frame at a time, in turn
    batch_cameras: bool = False

@dataclass(frozen=True)
class OutputSettings:
    """Depth outputs per camera (ros/outputs.py)."""

    #: publish depth on the camera's pixel grid or the model's (fx ~ canonical_fx)
    output_grid: str = 'camera'
    #: REP 118: 32FC1 metres (NaN invalid) or 16UC1 millimetres (0 invalid)
    depth_encoding: str = '32FC1'
    #: multiplies the model's depth before anything is published or measured: depth, cloud, depth_at and the
    #: answers' measured distances (a correction measured on your camera, e.g. with a depth camera; 1.0: the
    #: model's own scale)
    depth_scale: float = 1.0
    #: depth_scale per camera, as CAMERA=SCALE entries naming cameras of the cameras parameter (e.g.
    #: [front=1.25]); a camera not listed uses depth_scale
    camera_depth_scales: tuple[str, ...] = ()
    #: depth/image/compressedDepth: depth at or beyond this is sent invalid (metres; image_transport's
    #: depth_max; the inverse-depth steps grow with it)
    compressed_depth_max_m: float = 10.0
    #: depth below this is published invalid (metres)
    min_depth_m: float = 0.0
    #: depth beyond this is published invalid (metres; 0 = no limit)
    max_depth_m: float = 0.0
    #: near end of depth/colored (metres; min=max=0: per-frame 2..98 percentiles)
    colormap_min_m: float = 0.0
    #: far end of depth/colored (metres)
    colormap_max_m: float = 0.0
    #: publish the organized cloud on points
    publish_pointcloud: bool = True
    #: add the packed rgb field from the image
    pointcloud_color: bool = True
    #: keep every Nth pixel in rows and columns
    pointcloud_stride: int = 1
    #: points farther than this from the optical centre become NaN (0 = no limit)
    max_range_m: float = 0.0
    #: radius outlier removal on points: a point with fewer than cloud_outlier_min_neighbors of its 8 grid
    #: neighbours within this radius becomes NaN (metres; 0 = off; choose it above the point spacing, depth x
    #: stride / fx, at the farthest range you keep)
    cloud_outlier_radius_m: float = 0.0
    #: neighbours within cloud_outlier_radius_m a point needs to stay
    cloud_outlier_min_neighbors: int = 2
    #: QoS reliability of the published topics (read-only)
    output_reliability: str = 'reliable'
    #: QoS history depth of the published topics (read-only)
    output_depth: int = 2

@dataclass(frozen=True)
class QuestionSettings:
    """Questions: ~/spatial_query, ~/ask, ~/depth_at, ~/answer_markers (ros/questions.py)."""

    #: longest question ~/spatial_query accepts
    max_question_chars: int = 500
    #: most tokens an answer may have
    max_answer_tokens: int = 64
    #: how long ~/spatial_query waits for a first frame
    query_wait_s: float = 2.0
    #: questions that may wait while one is answered; more are refused (busy) at once
    max_pending_queries: int = 1
    #: longest a question waits for its turn before it is refused (busy)
    query_timeout_s: float = 30.0
    #: most pixels one ~/depth_at request may list; it bounds memory (read-only)
    max_query_pixels: int = 10000
    #: how long an answer's markers stay in RViz (0 = until replaced)
    marker_lifetime_s: float = 10.0

@dataclass(frozen=True)
class DiagnosticsSettings:
    """Diagnostics (ros/diagnostics.py)."""

    #: period of /diagnostics (read-only)
    diagnostics_period_s: float = 1.0


@dataclass(frozen=True)
class Settings:
    """Every parameter of the node, by group (the defaults: ``Settings()``)."""

    lifecycle: LifecycleSettings = dataclasses.field(default_factory=LifecycleSettings)
    model: ModelSettings = dataclasses.field(default_factory=ModelSettings)
    intake: IntakeSettings = dataclasses.field(default_factory=IntakeSettings)
    worker: WorkerSettings = dataclasses.field(default_factory=WorkerSettings)
    outputs: OutputSettings = dataclasses.field(default_factory=OutputSettings)
    questions: QuestionSettings = dataclasses.field(default_factory=QuestionSettings)
    diagnostics: DiagnosticsSettings = dataclasses.field(default_factory=DiagnosticsSettings)

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> Settings:
        """Settings from parameter values by name (every name of the table; lists become tuples)."""
        groups = {}
        for field in dataclasses.fields(cls):
            group_cls = globals()[str(field.type)] if isinstance(field.type, str) else field.type
            names = [f.name for f in dataclasses.fields(group_cls)]
            groups[field.name] = group_cls(**{
                n: tuple(values[n]) if isinstance(values[n], list) else values[n] for n in names})
        return cls(**groups)

    def values(self) -> dict[str, Any]:
        """The parameter values by name (what :meth:`from_values` takes)."""
        return {k: v for group in dataclasses.fields(self) for k, v in
                dataclasses.asdict(getattr(self, group.name)).items()}

    def with_values(self, changes: Mapping[str, Any]) -> Settings:
        """A new Settings with ``changes`` (parameter name -> value) applied."""
        return Settings.from_values({**self.values(), **changes})
