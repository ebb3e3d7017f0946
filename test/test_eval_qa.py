"""Scoring spatial answers against generated truth, and the eval-qa command on the built-in model."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from depthvlm_ros.evaluation.qa import score_answer, score_response, summarize
from depthvlm_ros.scenes.dataset import FrameSpec, generate_frame
from depthvlm_ros.scenes.qa import make_qa


def _records(n_frames: int = 10) -> list[tuple[dict, object]]:
    spec = FrameSpec("indoor", 320, 240, 150.0, 500.0)
    out = []
    for i in range(n_frames):
        _, view = generate_frame(21, i, spec)
        for qa in make_qa(view, np.random.default_rng(i), n=6):
            record = {"qa_kind": qa["kind"], "truth": qa["truth"], "original_rgb_size": [320, 240]}
            out.append((record, qa["answer"], view))
    return out


def test_true_answers_measured_on_true_depth_pass():
    scores = [score_answer(r, answer, view.depth, view.intrinsics) for r, answer, view in _records()]
    summary = summarize(scores)
    assert summary["grounded"]["n"] > 10 and summary["grounded"]["rate"] == 1.0
    assert summary["distance_ok"]["n"] > 3 and summary["distance_ok"]["rate"] >= 0.9
    assert summary["label_ok"]["rate"] == 1.0
    assert summary["text_distance_ok"]["rate"] == 1.0


def test_wrong_or_missing_places_fail():
    for record, answer, view in _records(4):
        if record["qa_kind"] not in ("where", "distance"):
            continue
        u0, v0, u1, v1 = record["truth"]["objects"][0]["box_px"]
        outside = (0, 0) if u0 > 40 or v0 > 40 else (1000, 1000)
        wrong = answer.replace(answer[answer.index("["):answer.index("]") + 1], f"[{outside[0]}, {outside[1]}]", 1)
        assert score_answer(record, wrong, view.depth, view.intrinsics).grounded is False
        assert score_answer(record, "no idea", view.depth, view.intrinsics).grounded is False


def test_a_service_response_is_scored_like_the_answer_it_came_from():
    """score_response (what a robot gets: region_px, distance_m) agrees with score_answer (text + depth)."""
    from depthvlm_ros.spatial import answer_measurement

    for record, answer, view in _records(4):
        found = answer_measurement(answer, view.depth, view.intrinsics, (320, 240))
        region = list(found.measurement.region_px) if found is not None else []
        distance = found.measurement.distance_m if found is not None else float("nan")
        assert score_response(record, answer, region, distance) == score_answer(record, answer, view.depth,
                                                                                 view.intrinsics)
        if record["qa_kind"] in ("where", "distance"):
            assert score_response(record, answer, [], float("nan")).grounded is False  # no place: not grounded


@pytest.mark.processes
def test_eval_qa_command_scores_the_builtin_model(tmp_path):
    data = tmp_path / "gen"
    gen = subprocess.run([sys.executable, "-m", "depthvlm_ros", "generate", "--out", str(data), "--n", "3",
                          "--seed", "5", "--kind", "indoor"], capture_output=True, text=True, timeout=120)
    assert gen.returncode == 0, gen.stderr
    run = subprocess.run([sys.executable, "-m", "depthvlm_ros", "eval-qa", "--data", str(data), "--limit", "5",
                          "--json", str(tmp_path / "qa.json")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "grounding point inside the object's box" in run.stdout
    report = json.loads((tmp_path / "qa.json").read_text())
    assert report["summary"]["answers"] == 5 and len(report["answers"]) == 5
    assert all(row["answer"] for row in report["answers"])  # the trained model says something
