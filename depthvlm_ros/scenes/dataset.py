"""Generated datasets on disk, in DepthVLM-Bench format.

``write_dataset(out, ...)`` writes::

    out/rgb/000000.png        RGB, uint8
    out/depth/000000.png      z-depth, 16-bit millimetres, 0 = invalid (sky, beyond max depth)
    out/mask/000000.png       object index + 1 per pixel, 8-bit, 0 = background (``mask_path``)
    out/depth.jsonl           one DepthVLM-Bench record per image (+ ``intrinsics``, ``kind``,
                              ``objects``: the labels of every visible object, ``mask_path``)
    out/qa.jsonl              spatial questions (``qa_kind``, ``question``, ``answer``, ``places``,
                              ``truth``) with the same ``image``/``depth_path``/``mask_path``/size/focal
                              fields; ``places``: the object index (in the mask) of each point the
                              answer names
    out/info.json             the arguments, for reproducibility

Frame ``i`` of seed ``s`` depends only on ``(s, i)``: any subset, any worker count, same bytes.

Sequences (``FrameSpec.sequence_length`` L > 0, ``depthvlm generate --sequence L``): frames ``jL .. jL+L-1``
are one camera (one lens) moving through one scene along the demo's smooth path
(:func:`~depthvlm_ros.scenes.layouts.trajectory`) at ``rate_hz`` frames per second. Their records add
``sequence`` (its name), ``frame_index`` (0 .. L-1) and ``world_from_camera`` (the 4x4 pose of the camera's
optical frame, metres), from which ``depthvlm eval`` scores temporal consistency (TAE).
The evaluator reads it as ``--dataset NAME=out/depth.jsonl,out,out``.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from depthvlm_ros.errors import InputError
from depthvlm_ros.geometry import CANONICAL_FX, canonical_size, depth_to_16uc1
from depthvlm_ros.scenes.layouts import nominal_fx, random_intrinsics, random_pose, random_scene, trajectory
from depthvlm_ros.scenes.qa import make_qa
from depthvlm_ros.scenes.render import Rendering, Scene, render

#: Sparse ground-truth points per record (the Bench's ``pixel_coords``/``depth`` lists).
SPARSE_POINTS = 64
#: Most frames one call writes.
MAX_FRAMES = 1_000_000
#: Longest sequence (frames).
MAX_SEQUENCE = 10_000
#: The random stream of a sequence's scene, lens and path (apart from the single frames' ``[seed, index]``).
SEQUENCE_STREAM = 7
KINDS = ("indoor", "outdoor", "mixed")


@dataclass(frozen=True)
class FrameSpec:
    """What to generate: scene kind, image size (pixels) and the focal-length range (pixels)."""

    kind: str
    width: int
    height: int
    fx_min: float
    fx_max: float
    qa_per_frame: int = 4
    qa_mix: str = "uniform"  # weights of the question kinds (scenes.qa.QA_MIXES)
    sequence_length: int = 0  # > 0: frames come in sequences of this many along a camera path
    rate_hz: float = 5.0  # frames per second along a sequence's path

    def check(self) -> None:
        from depthvlm_ros.scenes.qa import QA_MIXES

        if self.kind not in KINDS:
            raise InputError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.qa_mix not in QA_MIXES:
            raise InputError(f"qa mix must be one of {', '.join(QA_MIXES)}, got {self.qa_mix!r}")
        if not (0 < self.fx_min <= self.fx_max):
            raise InputError(f"need 0 < fx-min <= fx-max, got {self.fx_min:g}, {self.fx_max:g}")
        if not 0 <= self.sequence_length <= MAX_SEQUENCE:
            raise InputError(f"sequence length must be in 0..{MAX_SEQUENCE}, got {self.sequence_length}")
        if not 0.5 <= self.rate_hz <= 60:
            raise InputError(f"sequence rate must be in 0.5..60 frames per second, got {self.rate_hz:g}")


def default_fx_range(width: int) -> tuple[float, float]:
    """0.5x-2x of the nominal focal length (60-degree horizontal field of view)."""
    f = nominal_fx(width)
    return 0.5 * f, 2.0 * f


def generate_frame(seed: int, index: int, spec: FrameSpec) -> tuple[Scene, Rendering]:
    """Scene + rendering of frame ``index`` (deterministic in ``(seed, index)``; in a sequence, the scene, lens
    and path are the sequence's)."""
    if spec.sequence_length <= 0:
        rng = np.random.default_rng([seed, index])
        scene = random_scene(rng, spec.kind)
        k = random_intrinsics(rng, spec.width, spec.height, spec.fx_min, spec.fx_max)
        pose = random_pose(rng, scene)
        return scene, render(scene, k, pose, noise_seed=int(rng.integers(2**31)))
    sequence, step = divmod(index, spec.sequence_length)
    rng = np.random.default_rng([seed, sequence, SEQUENCE_STREAM])
    scene = random_scene(rng, spec.kind)
    k = random_intrinsics(rng, spec.width, spec.height, spec.fx_min, spec.fx_max)
    start = random_pose(rng, scene)
    path = trajectory(scene, start, spec.sequence_length / spec.rate_hz, spec.rate_hz)
    pose = next(itertools.islice(path, step, None))
    return scene, render(scene, k, pose, noise_seed=int(np.random.default_rng([seed, index]).integers(2**31)))


def frame_records(seed: int, index: int, spec: FrameSpec) -> tuple[Rendering, dict[str, Any], list[dict[str, Any]]]:
    """Frame ``index`` of a dataset: its rendering, its Bench depth record and its QA records."""
    from depthvlm_ros.model.processing import DEPTH_PROMPT  # (imports torch: only where a record is made)

    scene, view = generate_frame(seed, index, spec)
    k = view.intrinsics
    name = f"{index:06d}.png"
    rng = np.random.default_rng([seed, index, 1])
    rows, cols = np.nonzero(np.isfinite(view.depth))
    pick = rng.choice(len(rows), size=min(SPARSE_POINTS, len(rows)), replace=False) if len(rows) else []
    common = {
        "image": f"rgb/{name}", "depth_path": f"depth/{name}", "mask_path": f"mask/{name}", "depth_scale": 1000.0,
        "original_rgb_size": [k.width, k.height], "original_depth_size": [k.width, k.height],
        "original_fx": round(k.fx, 4), "canonical_fx": CANONICAL_FX,
        "canonical_size": list(canonical_size(k)), "scene_id": f"{spec.kind}-{seed}-{index}",
    }
    if spec.sequence_length > 0:
        sequence, step = divmod(index, spec.sequence_length)
        common["scene_id"] = f"{scene.kind}-{seed}-sequence-{sequence}"
        timing = {"sequence": common["scene_id"], "frame_index": step,
                  "world_from_camera": np.round(view.pose.world_from_camera(), 6).tolist()}
    else:
        timing = {}
    record = {
        **common, **timing,
        "pixel_coords": [[int(cols[i]), int(rows[i])] for i in pick],
        "depth": [round(float(view.depth[rows[i], cols[i]]), 4) for i in pick],
        "depth_type": "z_depth", "prompt": DEPTH_PROMPT, "solution": "",
        "kind": scene.kind, "intrinsics": {"fx": k.fx, "fy": k.fy, "cx": k.cx, "cy": k.cy},
        "camera": {"height_m": round(view.pose.position[2], 4), "pitch_rad": round(view.pose.pitch, 4),
                   "roll_rad": round(view.pose.roll, 4)},
        "objects": [lab.to_dict() for lab in view.labels],
    }
    qa = [{**common, "scene_kind": scene.kind, "qa_kind": q["kind"], "question": q["question"],
           "answer": q["answer"], "places": q["places"], "truth": q["truth"]}
          for q in make_qa(view, rng, spec.qa_per_frame, spec.qa_mix)]
    return view, record, qa


def object_mask_png(object_index: np.ndarray) -> np.ndarray:
    """The object index map (-1 background) as the 8-bit mask written to ``mask/``: index + 1, 0 = none."""
    if int(object_index.max(initial=-1)) > 254:
        raise ValueError(f"object index {int(object_index.max())} does not fit the 8-bit mask")
    return (object_index.astype(np.int16) + 1).astype(np.uint8)


def read_object_mask(path: Path) -> np.ndarray:
    """A ``mask/`` PNG -> (H, W) int16 object indices, -1 = background."""
    from depthvlm_ros.imageio import read_integer_png

    return read_integer_png(path, str(path)).astype(np.int16) - 1


def _write_one(job: tuple[Path, int, int, FrameSpec]) -> tuple[int, dict[str, Any], list[dict[str, Any]]]:
    from PIL import Image

    out, seed, index, spec = job
    view, record, qa = frame_records(seed, index, spec)
    Image.fromarray(view.rgb).save(out / record["image"], compress_level=1)
    Image.fromarray(depth_to_16uc1(view.depth)).save(out / record["depth_path"], compress_level=1)
    Image.fromarray(object_mask_png(view.object_index)).save(out / record["mask_path"], compress_level=1)
    return index, record, qa


def iter_written(out: Path, n: int, seed: int, spec: FrameSpec,
                 workers: int = 1) -> Iterator[tuple[int, dict[str, Any], list[dict[str, Any]]]]:
    """Write frames ``0 .. n-1`` (images only), yielding their records in index order."""
    jobs = [(out, seed, i, spec) for i in range(n)]
    if workers <= 1:
        yield from map(_write_one, jobs)
        return
    with get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(_write_one, jobs, chunksize=8)


def write_dataset(out: Path, n: int, seed: int, spec: FrameSpec, workers: int = 1,
                  progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Generate ``n`` frames into ``out`` (see the module docstring); returns the info written."""
    spec.check()
    if not 1 <= n <= MAX_FRAMES:
        raise InputError(f"--n must be in 1..{MAX_FRAMES}, got {n}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "rgb").mkdir(exist_ok=True)
    (out / "depth").mkdir(exist_ok=True)
    (out / "mask").mkdir(exist_ok=True)
    start = time.perf_counter()
    n_qa = 0
    with open(out / "depth.jsonl", "w") as depth_file, open(out / "qa.jsonl", "w") as qa_file:
        for _, record, qa in iter_written(out, n, seed, spec, workers):
            depth_file.write(json.dumps(record) + "\n")
            for q in qa:
                qa_file.write(json.dumps(q) + "\n")
            n_qa += len(qa)
            if progress is not None:
                progress(1)
    info = {
        "generator": "depthvlm_ros.scenes", "n": n, "seed": seed, "kind": spec.kind,
        "size": [spec.width, spec.height], "fx_range": [spec.fx_min, spec.fx_max],
        "qa_per_frame": spec.qa_per_frame, "qa_mix": spec.qa_mix, "qa_records": n_qa,
        "sequence_length": spec.sequence_length, "rate_hz": spec.rate_hz,
        "seconds": round(time.perf_counter() - start, 2),
    }
    (out / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    return info
