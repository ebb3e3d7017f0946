"""``depthvlm demo``: the node in its own process; camera, recorder and queries in the demo's, scored against truth."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.processes]


def test_demo_runs_and_writes_bag_pngs_cloud_and_summary(tmp_path, ros_env):
    out = tmp_path / "demo"
    run = subprocess.run([sys.executable, "-m", "depthvlm_ros", "demo", "--seconds", "4", "--rate", "4",
                          "--queries", "3", "--out", str(out)], capture_output=True, text=True, timeout=420,
                         env=ros_env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "live δ1" in run.stdout and "demo summary" in run.stdout
    s = json.loads((out / "summary.json").read_text())
    assert s["frames_published"] == 16
    node = s["node"]
    # every frame reached the node and was processed or replaced by a newer one (latest wins); every
    # processed frame's depth came back and was scored against the generator's exact depth
    assert node["frames_received"] == 16 == node["frames_processed"] + node["frames_dropped"] and node["errors"] == 0
    assert node["frames_lost_before_node"] == 0
    assert s["depth_received"] == s["depth_scored"] == node["frames_processed"] >= 1
    assert s["delta1_mean"] > 0.6, s  # the shipped model measures the room (its card: live δ1 ~0.9)
    assert s["tae_pairs"] == s["depth_received"] - 1 and 0 < s["tae_ground_truth_percent"] < s["tae_percent"]
    assert "TAE" in run.stdout
    # the three kinds of question, each answered and drawn on the frame it was measured on
    kinds = [a["kind"] for a in s["answers"]]
    assert kinds[:2] == ["distance", "where"] and kinds[2:] in ([], ["closer"]), kinds
    assert s["answers"][0]["question"].startswith("How far is the ")
    from PIL import Image

    for n, answer in enumerate(s["answers"]):
        assert answer["success"] and np.isfinite(answer["distance_m"]) and answer["true_distance_m"] > 0
        assert answer["image"] == f"answer_{n}.png" == s["files"]["answer_pngs"][n]
        with Image.open(out / answer["image"]) as image:
            assert image.size[0] == 640 and image.size[1] > 480  # the frame at 2x and the text below
        assert f"answer_{n}.png" in run.stdout

    from rosbags.highlevel import AnyReader

    with AnyReader([out / "demo.mcap"]) as reader:
        counts = {c.topic: c.msgcount for c in reader.connections}
    assert counts["/image"] == counts["/camera_info"] == counts["/ground_truth/depth"] == 16
    assert counts["/depth/image"] == counts["/depth/camera_info"] == s["depth_received"]
    assert counts["/depth/colored"] == s["depth_received"]  # the recorder subscribes: the view is built

    import open3d as o3d

    assert (out / "depth_00.png").is_file()
    cloud = o3d.io.read_point_cloud(str(out / "cloud.ply"))
    points = np.asarray(cloud.points)
    assert len(points) > 1000 and cloud.has_colors()

    # the bag scores itself: its truth topic against what the node published, and against the model run again on
    # the recorded images; both give the demo's δ1 (issue 28: within 0.02)
    for extra in (["--predicted-depth", "/depth/image"], []):
        run = subprocess.run([sys.executable, "-m", "depthvlm_ros", "eval", "--bag", str(out / "demo.mcap"),
                              "--reference-depth", "/ground_truth/depth", "--json", str(out / "bag.json"), *extra],
                             capture_output=True, text=True, timeout=420, env=ros_env)
        assert run.returncode == 0, run.stderr[-3000:]
        camera = json.loads((out / "bag.json").read_text())["datasets"]["/ground_truth/depth"]
        assert camera["n_images"] == (s["depth_scored"] if extra else 16), camera
        assert abs(camera["dense"]["delta1"] - s["delta1_mean"]) <= 0.02, (extra, camera["dense"], s["delta1_mean"])
        assert camera["scale"]["depth_scale"] > 0
