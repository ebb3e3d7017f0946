"""The node's parameters: one table of names, defaults, ranges and descriptions, grouped by the part of
the node that reads them (:data:`GROUPS`: the parts of the node, see ``ros/node.py``).

``config/depthvlm.yaml`` carries the same names and defaults in the same groups (a test keeps them in
step). Read-only parameters (lifecycle, model, backend, cameras, QoS) are fixed at start-up; the others
change at run time and are validated by the node's on-set callback.
"""

from __future__ import annotations

import functools
import math
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from depthvlm_ros.errors import shown
from depthvlm_ros.geometry import DEFAULT_MAX_IMAGE_TOKENS
from depthvlm_ros.model.processing import MAX_QUESTION_CHARS

Value = bool | int | float | str | list


@dataclass(frozen=True)
class Param:
    """One node parameter: its name, default and description, whether it is read-only (fixed at start-up), the
    inclusive range of a number or the choices of a string, and the part of the node that reads it (:data:`GROUPS`)."""

    name: str
    default: Value
    description: str
    read_only: bool = False
    range: tuple[float, float] | None = None  # inclusive, numbers
    choices: tuple[str, ...] | None = None  # strings
    group: str = ""  # the part of the node that reads it (GROUPS)


#: The node's parts, in the order of the table: each parameter belongs to exactly one.
GROUPS = ("lifecycle", "model", "intake", "worker", "outputs", "questions", "diagnostics")


def _group(group: str, *params: Param) -> tuple[Param, ...]:
    return tuple(replace(p, group=group) for p in params)


PARAMS: tuple[Param, ...] = (
    *_group("lifecycle",
        Param("autostart", True, "configure and activate at start (a plain node); false: wait in unconfigured for a "
              "lifecycle manager (~/change_state)", read_only=True),
    ),
    *_group("model",
        Param("model_path", "", "DepthVLM folder (Hugging Face layout, safetensors); empty = the built-in model",
              read_only=True),
        Param("backend", "auto", "what runs the depth path; auto = tensorrt with an engine in engine_paths and CUDA, "
              "torch when device is cuda, else onnxruntime on the CPU, else torch; triton = a Triton server at "
              "triton_url", read_only=True, choices=("auto", "torch", "onnxruntime", "tensorrt", "triton")),
        Param("backend_fallback", True, "if the backend is refused, fall back (tensorrt -> onnxruntime -> torch)",
              read_only=True),
        Param("answers", True, "load the PyTorch weights, to answer questions; false (only with backend triton): no "
              "weights are read (the depth path runs on the server), ~/spatial_query and ~/ask are refused",
              read_only=True),
        Param("triton_url", "localhost:8001", "backend triton: the server's gRPC address (host:port); unreachable = "
              "diagnostics ERROR and frames dropped until it answers (tried again at most every second)",
              read_only=True),
        Param("triton_model", "depthvlm_depth", "backend triton: served models are named <triton_model>_WxH, one per "
              "size (depthvlm export --triton-repo, depthvlm serve)", read_only=True),
        Param("triton_token_file", "", "backend triton: a file (mode 600) whose first line is the server's access "
              "token; empty = $DEPTHVLM_TRITON_TOKEN, else the file depthvlm serve writes in the cache",
              read_only=True),
        Param("triton_timeout_s", 1.0, "backend triton: longest a frame's request may take; a slower answer fails "
              "that frame (counted in frames_failed_backend)", read_only=True, range=(0.05, 60.0)),
        Param("triton_tls_root_cert", "", "backend triton: PEM root certificate of the server (set: gRPC over TLS)",
              read_only=True),
        Param("triton_tls_cert", "", "backend triton: PEM client certificate chain (mutual TLS; with triton_tls_key)",
              read_only=True),
        Param("triton_tls_key", "", "backend triton: PEM client private key (mutual TLS)", read_only=True),
        Param("device", "cpu", "cpu, cuda or cuda:N", read_only=True),
        Param("answer_device", "", "where the PyTorch model (answers, and depth when backend is torch) lives; empty = "
              "device. With backend tensorrt, cpu keeps the GPU for the engine (answers then run on the CPU)",
              read_only=True),
        Param("precision", "fp32", "weights dtype of the PyTorch model", read_only=True,
              choices=("fp32", "fp16", "bf16")),
        Param("engine_paths", [], "ONNX graphs (onnxruntime) or TensorRT engines (tensorrt); empty = export/cache",
              read_only=True),
        Param("compile", "none", "backend torch: the depth forward eager (none), torch.compile'd in one graph "
              "(default; a plan's first frame compiles it) or that replayed as CUDA graphs (graphs; CUDA only); "
              "max_compiled_sizes plans compiled at once (0 = 2)", read_only=True,
              choices=("none", "default", "graphs")),
        Param("head_output", "model_grid", "backend torch: the depth head outputs the model grid, resampled to the "
              "camera (model_grid, the released way), or the camera's grid directly (camera_grid: less work, within "
              "the tolerance docs/model.md states)", read_only=True, choices=("model_grid", "camera_grid")),
        Param("max_compiled_sizes", 0, "compiled sizes held at once; 0 = the backend's default: 4 ONNX Runtime "
              "sessions (a new size is exported in the background while the nearest held size serves), 1 TensorRT "
              "engine (each holds all the weights), 2 compiled torch plans", read_only=True, range=(0, 16)),
        Param("compiled_size_idle_s", 30.0, "once max_compiled_sizes are held, a new size replaces a held one only "
              "when that one was unused this long (sizes in use are never swapped out)", read_only=True,
              range=(0.0, 3600.0)),
        Param("canonical_fx", 1000.0, "the model's canonical focal length in pixels (1000 for DepthVLM)",
              read_only=True, range=(100.0, 5000.0)),
        Param("match_fy", False, "scale rows by canonical_fx / fy instead of / fx (non-square pixels)"),
        Param("max_side_px", 0, "cap on the model input's longer side in pixels (0 = none); a cap rescales the "
              "depth by the focal ratio (approximation); it bounds memory", range=(0, 8192), read_only=True),
        Param("max_image_tokens", DEFAULT_MAX_IMAGE_TOKENS, "cap on the model's image tokens, one per 32x32 px (0 = "
              "only the model's own max_pixels); 1280 keeps the released protocol for a 640x480 camera with fx >= 485 "
              "px, larger canonical sizes take the canonical-camera route; it bounds memory",
              range=(0, 65536), read_only=True),
    ),
    *_group("intake",
        Param("cameras", [], "camera namespaces, each with its own image, camera_info, depth/*, points (e.g. [front, "
              "left]); empty = one camera on the plain topic names. The model is loaded once", read_only=True),
        Param("use_compressed", False, "subscribe to image/compressed (JPEG/PNG) instead of image", read_only=True),
        Param("sync_tolerance_s", 0.0, "pair image and camera_info stamps within this many seconds (0 = exact)",
              range=(0.0, 1.0)),
        Param("fallback_fx", 0.0, "focal length (px) for frames without matching camera_info (0 = skip them)",
              range=(0.0, 100000.0)),
        Param("input_reliability", "best_effort", "QoS reliability of image/camera_info subscriptions",
              read_only=True, choices=("best_effort", "reliable")),
        Param("input_depth", 2, "QoS history depth of the input subscriptions", read_only=True, range=(1, 100)),
    ),
    *_group("worker",
        Param("max_rate_hz", 0.0, "upper bound on inferences per second (0 = as fast as the model runs)",
              range=(0.0, 1000.0)),
        Param("batch_cameras", False, "take every camera's waiting frame at once: those whose plans reach one "
              "model-grid size go through the model in one forward (each camera keeps its own outputs); false = "
              "one camera's frame at a time, in turn"),
    ),
    *_group("outputs",
        Param("output_grid", "camera", "publish depth on the camera's pixel grid or the model's (fx ~ canonical_fx)",
              choices=("camera", "model")),
        Param("depth_encoding", "32FC1", "REP 118: 32FC1 metres (NaN invalid) or 16UC1 millimetres (0 invalid)",
              choices=("32FC1", "16UC1")),
        Param("depth_scale", 1.0, "multiplies the model's depth before anything is published or measured: depth, "
              "cloud, depth_at and the answers' measured distances (a correction measured on your camera, "
              "e.g. with a depth camera; 1.0: the model's own scale)", range=(0.01, 100.0)),
        Param("camera_depth_scales", [], "depth_scale per camera, as CAMERA=SCALE entries naming cameras of the "
              "cameras parameter (e.g. [front=1.25]); a camera not listed uses depth_scale"),
        Param("compressed_depth_max_m", 10.0, "depth/image/compressedDepth: depth at or beyond this is sent invalid "
              "(metres; image_transport's depth_max; the inverse-depth steps grow with it)", range=(0.1, 1000.0)),
        Param("min_depth_m", 0.0, "depth below this is published invalid (metres)", range=(0.0, 1000.0)),
        Param("max_depth_m", 0.0, "depth beyond this is published invalid (metres; 0 = no limit)", range=(0.0, 1000.0)),
        Param("colormap_min_m", 0.0, "near end of depth/colored (metres; min=max=0: per-frame 2..98 percentiles)",
              range=(0.0, 1000.0)),
        Param("colormap_max_m", 0.0, "far end of depth/colored (metres)", range=(0.0, 1000.0)),
        Param("publish_pointcloud", True, "publish the organized cloud on points"),
        Param("pointcloud_color", True, "add the packed rgb field from the image"),
        Param("pointcloud_stride", 1, "keep every Nth pixel in rows and columns", range=(1, 64)),
        Param("max_range_m", 0.0, "points farther than this from the optical centre become NaN (0 = no limit)",
              range=(0.0, 1000.0)),
        Param("cloud_outlier_radius_m", 0.0, "radius outlier removal on points: a point with fewer than "
              "cloud_outlier_min_neighbors of its 8 grid neighbours within this radius becomes NaN (metres; 0 = off; "
              "choose it above the point spacing, depth x stride / fx, at the farthest range you keep)",
              range=(0.0, 100.0)),
        Param("cloud_outlier_min_neighbors", 2, "neighbours within cloud_outlier_radius_m a point needs to stay",
              range=(1, 8)),
        Param("output_reliability", "reliable", "QoS reliability of the published topics", read_only=True,
              choices=("best_effort", "reliable")),
        Param("output_depth", 2, "QoS history depth of the published topics", read_only=True, range=(1, 100)),
    ),
    *_group("questions",
        Param("max_question_chars", 500, "longest question ~/spatial_query accepts", range=(1, MAX_QUESTION_CHARS)),
        Param("max_answer_tokens", 64, "most tokens an answer may have", range=(1, 1024)),
        Param("query_wait_s", 2.0, "how long ~/spatial_query waits for a first frame", range=(0.0, 60.0)),
        Param("max_pending_queries", 1, "questions that may wait while one is answered; more are refused (busy) at "
              "once", range=(0, 8)),
        Param("query_timeout_s", 30.0, "longest a question waits for its turn before it is refused (busy)",
              range=(0.1, 600.0)),
        Param("max_query_pixels", 10000, "most pixels one ~/depth_at request may list; it bounds memory",
              range=(1, 1000000), read_only=True),
        Param("marker_lifetime_s", 10.0, "how long an answer's markers stay in RViz (0 = until replaced)",
              range=(0.0, 3600.0)),
    ),
    *_group("diagnostics",
        Param("diagnostics_period_s", 1.0, "period of /diagnostics", read_only=True, range=(0.1, 60.0)),
    ),
)

BY_NAME = {p.name: p for p in PARAMS}


def check_value(param: Param, value: Any) -> str | None:
    """Why ``value`` is not acceptable for ``param`` (None when it is). Ranges are checked by rclpy too."""
    if param.choices is not None and value not in param.choices:
        return f"{param.name} must be one of {', '.join(param.choices)}, got {value!r}"
    if param.range is not None and not (param.range[0] <= value <= param.range[1]):
        return f"{param.name} must be in [{param.range[0]}, {param.range[1]}], got {value}"
    return None


def check_settings(values: dict[str, Any]) -> str | None:
    """Cross-parameter rules on a full set of values (None when consistent)."""
    try:
        camera_depth_scales(values.get("camera_depth_scales", ()), values.get("cameras", ()))
    except ValueError as exc:
        return str(exc)
    if values["max_depth_m"] and values["min_depth_m"] >= values["max_depth_m"]:
        return f"min_depth_m ({values['min_depth_m']}) must be below max_depth_m ({values['max_depth_m']})"
    if (values["colormap_min_m"] or values["colormap_max_m"]) and values["colormap_min_m"] >= values["colormap_max_m"]:
        return "colormap_min_m must be below colormap_max_m (or both 0 for automatic)"
    return None


#: A camera name: a relative ROS namespace (letters, digits, underscores; ``/`` between parts).
_CAMERA_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*(/[A-Za-z][A-Za-z0-9_]*)*")
#: Most cameras one node serves.
MAX_CAMERAS = 16


def check_cameras(names: list[str]) -> list[str]:
    """The camera names of the ``cameras`` parameter, checked: ``[""]`` (one camera on the plain topic names)
    when empty; else distinct relative namespaces. ValueError says which name is wrong."""
    if not names:
        return [""]
    if len(names) > MAX_CAMERAS:
        raise ValueError(f"cameras: at most {MAX_CAMERAS}, got {len(names)}")
    for name in names:
        if not _CAMERA_NAME.fullmatch(name):
            raise ValueError(f"cameras: {name!r} is not a relative namespace (letters, digits, _; parts joined by /)")
    if len(set(names)) != len(names):
        raise ValueError(f"cameras: each name once, got {names}")
    return list(names)


def camera_depth_scales(entries: Sequence[str], cameras: Sequence[str]) -> dict[str, float]:
    """``{camera: scale}`` of the ``camera_depth_scales`` entries (``CAMERA=SCALE``, cameras of ``cameras``, each
    once, scales in depth_scale's range). ValueError says which entry is wrong."""
    low, high = BY_NAME["depth_scale"].range or (0.0, math.inf)
    out: dict[str, float] = {}
    for entry in entries:
        name, sep, text = str(entry).partition("=")
        name = name.strip()
        try:
            scale = float(text)
        except ValueError:
            scale = math.nan
        if not sep or not math.isfinite(scale) or not low <= scale <= high:
            raise ValueError(f"camera_depth_scales: {shown(entry, 60)} is not CAMERA=SCALE with SCALE in "
                             f"{low:g}..{high:g}")
        if name not in cameras:
            raise ValueError(f"camera_depth_scales: {shown(name, 60)} is not one of the cameras "
                             f"({', '.join(cameras) or 'none: one camera, use depth_scale'})")
        if name in out:
            raise ValueError(f"camera_depth_scales: {name!r} given twice")
        out[name] = scale
    return out


def depth_scale_for(camera: str, depth_scale: float, entries: Sequence[str], cameras: Sequence[str]) -> float:
    """The depth scale of ``camera``: its ``camera_depth_scales`` entry, else ``depth_scale`` (the entries were
    checked when set; parsed once per distinct setting, not per frame)."""
    return _parsed_scales(tuple(entries), tuple(cameras)).get(camera, depth_scale) if entries else depth_scale


@functools.lru_cache(maxsize=8)
def _parsed_scales(entries: tuple[str, ...], cameras: tuple[str, ...]) -> dict[str, float]:
    return camera_depth_scales(entries, cameras)


#: What each group of the parameter file is about (its heading).
GROUP_TITLES = {
    "lifecycle": "lifecycle (ros/node.py)",
    "model": "model, backend and inference size (ros/node.py configure; pipeline/plan.py)",
    "intake": "cameras and their inputs (ros/intake.py)",
    "worker": "the inference worker (ros/worker.py)",
    "outputs": "depth outputs per camera (ros/outputs.py)",
    "questions": "questions: ~/spatial_query, ~/ask, ~/depth_at, ~/answer_markers (ros/questions.py)",
    "diagnostics": "diagnostics (ros/diagnostics.py)",
}
#: Examples shown (commented out) for the list parameters, whose default is empty.
LIST_EXAMPLES = {"engine_paths": "[engines/d_640x480.onnx]", "cameras": "[front, left]",
                 "camera_depth_scales": "[front=1.25, left=0.97]"}


def _yaml_value(value: Value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def parameter_file() -> str:
    """``config/depthvlm.yaml``: every parameter with its default and description, in its group
    (``python -m depthvlm_ros.ros.params > config/depthvlm.yaml`` writes it; a test keeps it in step)."""
    lines = [
        "# Parameters of the depthvlm node (names, defaults and ranges: depthvlm_ros/ros/params.py; this file is",
        "# written by `python -m depthvlm_ros.ros.params > config/depthvlm.yaml`).",
        "#   depthvlm node --params-file config/depthvlm.yaml            (PyPI rclpy)",
        "#   ros2 launch depthvlm_ros depthvlm.launch.py params_file:=... (full ROS install)",
        "# (read-only) = fixed at start-up; the others can be changed at run time (ros2 param set).",
        "/**/depthvlm:",
        "  ros__parameters:",
    ]
    for group in GROUPS:
        lines.append(f"    # -- {GROUP_TITLES[group]} --")
        for p in (p for p in PARAMS if p.group == group):
            notes = []
            if p.choices:
                notes.append("|".join(p.choices))
            elif p.range is not None and not isinstance(p.default, bool):
                notes.append(f"[{p.range[0]:g}, {p.range[1]:g}]")
            if p.read_only:
                notes.append("read-only")
            about = p.description + (f" ({'; '.join(notes)})" if notes else "")
            if p.default == []:
                lines.append(f"    # {p.name}: {LIST_EXAMPLES[p.name]}   # {about}")
            else:
                lines.append(f"    # {about}")
                lines.append(f"    {p.name}: {_yaml_value(p.default)}")
    return "\n".join(lines) + "\n"


#: The typed settings' class of each group (ros/settings.py, generated by :func:`settings_module`).
SETTINGS_CLASSES = {"lifecycle": "LifecycleSettings", "model": "ModelSettings", "intake": "IntakeSettings",
                    "worker": "WorkerSettings", "outputs": "OutputSettings", "questions": "QuestionSettings",
                    "diagnostics": "DiagnosticsSettings"}


def _python_type(param: Param) -> str:
    if param.default == []:
        return "tuple[str, ...]"
    return type(param.default).__name__


def _python_default(param: Param) -> str:
    return "()" if param.default == [] else repr(param.default)


def settings_module() -> str:
    """The source of ``depthvlm_ros/ros/settings.py``: one frozen dataclass per group, a field per parameter
    (``python -m depthvlm_ros.ros.params --settings > depthvlm_ros/ros/settings.py``; a test keeps it equal)."""
    lines = [
        '"""The node\'s settings, typed: one frozen dataclass per parameter group and :class:`Settings` holding them.',
        "",
        "Generated from the parameter table (``depthvlm_ros/ros/params.py``) by",
        "``python -m depthvlm_ros.ros.params --settings > depthvlm_ros/ros/settings.py``; a test keeps them equal.",
        "The node's parts read ``settings.<group>.<name>``: a misspelt name is an error where it is written, not a",
        "``KeyError`` at run time. A run-time parameter change makes a new :class:`Settings`, validated as a whole.",
        '"""',
        "",
        "from __future__ import annotations",
        "",
        "import dataclasses",
        "from collections.abc import Mapping",
        "from dataclasses import dataclass",
        "from typing import Any",
        "",
    ]
    for group in GROUPS:
        lines += ["", "@dataclass(frozen=True)", f"class {SETTINGS_CLASSES[group]}:",
                  f'    """{GROUP_TITLES[group][0].upper() + GROUP_TITLES[group][1:]}."""', ""]
        for p in (p for p in PARAMS if p.group == group):
            note = " (read-only)" if p.read_only else ""
            lines += textwrap.wrap(p.description + note, width=112, initial_indent="    #: ",
                                   subsequent_indent="    #: ")
            lines.append(f"    {p.name}: {_python_type(p)} = {_python_default(p)}")
    lines += ["", "", "@dataclass(frozen=True)", "class Settings:",
              '    """Every parameter of the node, by group (the defaults: ``Settings()``)."""', ""]
    lines += [f"    {group}: {SETTINGS_CLASSES[group]} = dataclasses.field(default_factory={SETTINGS_CLASSES[group]})"
              for group in GROUPS]
    lines += [
        "",
        "    @classmethod",
        "    def from_values(cls, values: Mapping[str, Any]) -> Settings:",
        '        """Settings from parameter values by name (every name of the table; lists become tuples)."""',
        "        groups = {}",
        "        for field in dataclasses.fields(cls):",
        "            group_cls = globals()[str(field.type)] if isinstance(field.type, str) else field.type",
        "            names = [f.name for f in dataclasses.fields(group_cls)]",
        "            groups[field.name] = group_cls(**{",
        "                n: tuple(values[n]) if isinstance(values[n], list) else values[n] for n in names})",
        "        return cls(**groups)",
        "",
        "    def values(self) -> dict[str, Any]:",
        '        """The parameter values by name (what :meth:`from_values` takes)."""',
        "        return {k: v for group in dataclasses.fields(self) for k, v in",
        "                dataclasses.asdict(getattr(self, group.name)).items()}",
        "",
        "    def with_values(self, changes: Mapping[str, Any]) -> Settings:",
        '        """A new Settings with ``changes`` (parameter name -> value) applied."""',
        "        return Settings.from_values({**self.values(), **changes})",
    ]
    return "\n".join(lines) + "\n"


#: The lines around the generated parameter table in docs/node.md.
TABLE_BEGIN = "<!-- parameters: generated by `python -m depthvlm_ros.ros.params --markdown`; a test keeps it equal -->"
TABLE_END = "<!-- end of the generated parameters -->"


def parameter_table() -> str:
    """The parameter table of docs/node.md (Markdown): per group, each parameter's default, range or choices,
    whether it changes at run time, and its description."""
    lines = [TABLE_BEGIN]
    for group in GROUPS:
        lines += ["", f"**{GROUP_TITLES[group]}**", "",
                  "| parameter | default | range / choices | run time | description |", "|---|---|---|---|---|"]
        for p in (p for p in PARAMS if p.group == group):
            if p.choices:
                allowed = ", ".join(f"`{c}`" for c in p.choices)
            elif p.range is not None and not isinstance(p.default, bool):
                allowed = f"{p.range[0]:g} .. {p.range[1]:g}"
            else:
                allowed = ""
            default = f"`{_yaml_value(p.default)}`" if p.default != [] else "`[]`"
            lines.append(f"| `{p.name}` | {default} | {allowed} | {'read-only' if p.read_only else 'yes'} | "
                         f"{p.description.replace('|', '/')} |")
    return "\n".join(lines + ["", TABLE_END])


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--markdown"]:
        print(parameter_table())
    elif sys.argv[1:2] == ["--docs"]:  # --docs docs/node.md: the table in that page, rewritten in place
        from pathlib import Path

        page = Path(sys.argv[2])
        text = page.read_text()
        start, end = text.index(TABLE_BEGIN), text.index(TABLE_END) + len(TABLE_END)
        page.write_text(text[:start] + parameter_table() + text[end:])
    elif sys.argv[1:] == ["--settings"]:
        print(settings_module(), end="")
    else:
        print(parameter_file(), end="")
