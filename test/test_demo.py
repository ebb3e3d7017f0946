"""``depthvlm demo``: camera, node, recorder and queries in one process, scored against truth."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np


def test_demo_runs_and_writes_bag_pngs_cloud_and_summary(tmp_path, ros_env):
    out = tmp_path / "demo"
    run = subprocess.run([sys.executable, "-m", "depthvlm_ros", "demo", "--seconds", "4", "--rate", "4",
                          "--queries", "1", "--out", str(out)], capture_output=True, text=True, timeout=420,
                         env=ros_env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "live δ1" in run.stdout and "demo summary" in run.stdout
    s = json.loads((out / "summary.json").read_text())
    assert s["frames_published"] == 16
    assert s["depth_received"] >= 4 and s["depth_scored"] >= 4
    assert 0.0 <= s["delta1_mean"] <= 1.0 and s["abs_rel_mean"] > 0
    assert s["latency_ms_median"] > 0
    (answer,) = s["answers"]
    assert answer["success"] and np.isfinite(answer["distance_m"]) and answer["true_distance_m"] > 0
    assert answer["question"].startswith("How far is the ")

    from rosbags.highlevel import AnyReader

    with AnyReader([out / "demo.mcap"]) as reader:
        counts = {c.topic: c.msgcount for c in reader.connections}
    assert counts["/image"] == 16 and counts["/camera_info"] == 16
    assert counts["/depth/image"] >= 4 and counts["/depth/colored"] >= 1

    import open3d as o3d

    assert (out / "depth_00.png").is_file()
    cloud = o3d.io.read_point_cloud(str(out / "cloud.ply"))
    points = np.asarray(cloud.points)
    assert len(points) > 1000 and cloud.has_colors() and (points[:, 2] > 0).all()
