"""The scene generator: exact depth, labels, QA truth, determinism, and the dataset on disk."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from depthvlm_ros.geometry import Intrinsics
from depthvlm_ros.scenes.dataset import FrameSpec, generate_frame
from depthvlm_ros.scenes.layouts import COLOURS, random_intrinsics
from depthvlm_ros.scenes.qa import make_qa, pixel_of_relative
from depthvlm_ros.scenes.render import CameraPose, Primitive, Scene, SceneObject, render
from depthvlm_ros.spatial import grounding_to_pixels, parse_grounding


def test_ground_plane_depth_is_exact_and_sky_is_invalid():
    k = Intrinsics.from_fx(160, 120, 100.0)
    height = 1.5
    view = render(Scene(kind="outdoor", objects=[], max_depth_m=1000.0), k, CameraPose((0.0, 0.0, height), 0.0))
    rows = np.arange(k.height)
    below = rows > k.cy
    expected = height * k.fy / (rows[below] - k.cy)  # z-depth of the plane z = 0 seen at row v
    np.testing.assert_allclose(view.depth[below], np.repeat(expected[:, None], k.width, axis=1), rtol=1e-5)
    assert np.isnan(view.depth[~below]).all()  # horizon and above: sky
    assert (view.surface[~below] == 0).all()


def test_box_sphere_and_cylinder_fronts_are_at_their_distance():
    k = Intrinsics.from_fx(161, 121, 120.0)  # odd sizes: the centre pixel looks straight ahead
    pose = CameraPose((0.0, 0.0, 1.0), 0.0)
    for prim, front in (
        (Primitive("box", (5.0, 0.0, 1.0), (1.0, 2.0, 2.0)), 4.5),
        (Primitive("sphere", (4.0, 0.0, 1.0), (0.5, 0.5, 0.5)), 3.5),
        (Primitive("cylinder", (3.0, 0.0, 1.0), (0.4, 0.4, 2.0)), 2.6),
    ):
        scene = Scene(kind="outdoor", objects=[SceneObject("thing", "red", COLOURS["red"], (prim,))])
        view = render(scene, k, pose)
        assert view.depth[60, 80] == pytest.approx(front, rel=1e-5)
        assert view.object_index[60, 80] == 0
        (label,) = view.labels
        u0, v0, u1, v1 = label.box_px
        rows, cols = np.nonzero(view.object_index == 0)
        assert (u0, v0, u1, v1) == (cols.min(), rows.min(), cols.max(), rows.max())
        assert view.object_index[label.point_px[1], label.point_px[0]] == 0
        assert label.centre_m[2] == pytest.approx(prim.centre[0], abs=1e-6)  # optical z = world x here


def test_pitch_and_roll_turn_the_view():
    k = Intrinsics.from_fx(64, 48, 50.0)
    scene = Scene(kind="outdoor", objects=[], max_depth_m=1000.0)
    level = render(scene, k, CameraPose((0.0, 0.0, 1.5), 0.0))
    down = render(scene, k, CameraPose((0.0, 0.0, 1.5), 0.0, pitch=-0.3))
    rolled = render(scene, k, CameraPose((0.0, 0.0, 1.5), 0.0, roll=0.2))
    assert np.isfinite(down.depth).sum() > np.isfinite(level.depth).sum()  # looking down: more ground
    left, right = np.isfinite(rolled.depth[:, :8]).sum(), np.isfinite(rolled.depth[:, -8:]).sum()
    assert left != right  # a rolled horizon is tilted


def test_frames_are_deterministic_per_seed_and_index():
    spec = FrameSpec("mixed", 96, 72, 40.0, 160.0)
    a1, a2, b = (generate_frame(5, 3, spec)[1], generate_frame(5, 3, spec)[1], generate_frame(6, 3, spec)[1])
    assert np.array_equal(a1.rgb, a2.rgb) and np.array_equal(a1.depth, a2.depth, equal_nan=True)
    assert not np.array_equal(a1.rgb, b.rgb)


def test_intrinsics_cover_the_requested_focal_range():
    rng = np.random.default_rng(0)
    fx = np.array([random_intrinsics(rng, 320, 240, 138.6, 554.3).fx for _ in range(400)])
    assert fx.min() >= 138.6 and fx.max() <= 554.3
    assert fx.min() < 150 and fx.max() > 500  # spans the whole 0.5x-2x range


@pytest.mark.parametrize("kind", ["indoor", "outdoor"])
def test_qa_answers_point_inside_the_named_object(kind):
    spec = FrameSpec(kind, 320, 240, 140.0, 550.0)
    kinds, checked = set(), 0
    for index in range(12):
        _, view = generate_frame(11, index, spec)
        for qa in make_qa(view, np.random.default_rng(index), n=6):
            kinds.add(qa["kind"])
            places = parse_grounding(qa["answer"])
            assert places, qa["answer"]
            u, v, _, _ = grounding_to_pixels(places[0], 320, 240)
            col, row = pixel_of_relative(*places[0].coords, 320, 240)
            if qa["kind"] == "at_pixel":
                continue
            box = qa["truth"]["objects"][0]["box_px"] if qa["kind"] != "closer" else None
            if box is not None:
                assert box[0] - 0.5 <= u <= box[2] + 0.5 and box[1] - 0.5 <= v <= box[3] + 0.5, qa
                assert view.object_index[row, col] >= 0
                checked += 1
            if qa["kind"] == "distance":
                said = float(qa["answer"].split(" is ")[-1].split(" meters")[0])
                assert said == pytest.approx(qa["truth"]["distance_m"], abs=0.051)
    assert checked > 10 and {"distance", "where"} <= kinds


def test_questions_name_only_objects_whose_label_is_unique_in_the_view():
    """Streets repeat building colours: a question about "the grey building" with two in view has two right
    answers, so the generator does not ask it; every label a question names belongs to one visible object."""
    from collections import Counter

    spec = FrameSpec("outdoor", 320, 240, 140.0, 550.0)
    repeated, asked = 0, 0
    for index in range(12):
        _, view = generate_frame(11, index, spec)
        seen = Counter(lab.label for lab in view.labels)
        repeated += any(n > 1 for n in seen.values())
        for qa in make_qa(view, np.random.default_rng(index), n=6):
            if qa["kind"] != "at_pixel":
                asked += 1
                assert all(seen[o["label"]] == 1 for o in qa["truth"]["objects"]), (qa["question"], seen)
    assert repeated >= 3 and asked >= 30  # the streets did repeat labels, and questions were still asked


@pytest.mark.processes
def test_generate_cli_writes_a_benchmark_dataset(tmp_path):
    from depthvlm_ros.evaluation.benchmark_data import BadRecord, iter_records, load_ground_truth

    out = tmp_path / "gen"
    run = subprocess.run([sys.executable, "-m", "depthvlm_ros", "generate", "--out", str(out), "--n", "6",
                          "--seed", "4", "--kind", "outdoor", "--size", "160x120", "--workers", "2"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    records = list(iter_records(out / "depth.jsonl"))
    assert len(records) == 6 and not any(isinstance(r, BadRecord) for r in records)
    spec = FrameSpec("outdoor", 160, 120, 0.5 * 160 / 2 / math.tan(math.radians(30)),
                     2.0 * 160 / 2 / math.tan(math.radians(30)))
    for i, record in enumerate(records):
        gt = load_ground_truth(record, out)
        _, view = generate_frame(4, i, spec)
        ok = np.isfinite(view.depth) & (view.depth < 65.0)
        np.testing.assert_allclose(gt[ok], view.depth[ok], atol=6e-4)  # millimetre PNG
        assert np.isnan(gt[~np.isfinite(view.depth)]).all()
        assert record.fx == pytest.approx(view.intrinsics.fx, rel=1e-6)
        sparse = view.depth[record.pixel_coords[:, 1].astype(int), record.pixel_coords[:, 0].astype(int)]
        np.testing.assert_allclose(record.depth_values, sparse, atol=1e-4)
    qa = [json.loads(line) for line in (out / "qa.jsonl").read_text().splitlines()]
    assert qa and all({"question", "answer", "truth", "qa_kind", "image"} <= set(q) for q in qa)
    info = json.loads((out / "info.json").read_text())
    assert info["n"] == 6 and info["seed"] == 4


@pytest.mark.processes
def test_generate_cli_rejects_a_bad_focal_range(tmp_path):
    run = subprocess.run([sys.executable, "-m", "depthvlm_ros", "generate", "--out", str(tmp_path / "g"), "--n", "2",
                          "--fx-min", "300", "--fx-max", "100"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith("depthvlm: error: need 0 < fx-min <= fx-max")
