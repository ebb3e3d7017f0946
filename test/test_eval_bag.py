"""``depthvlm eval --bag``: predicted depth scored against a reference depth camera recorded in a bag; TAE."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from depthvlm_ros.evaluation.camera_check import LogRatioHistogram, StampPairer, score_against_reference
from depthvlm_ros.evaluation.metrics import DepthRange, pair_metrics

from conftest import depthvlm


def test_pairer_takes_the_nearest_stamp_within_the_tolerance_and_counts_the_rest():
    pairer = StampPairer(max_dt_ns=5, window=3)
    assert pairer.add(0, 100, "r100") is None
    assert pairer.add(0, 110, "r110") is None
    assert pairer.add(1, 108, "p108") == ("r110", "p108")  # nearest, not first
    assert pairer.add(1, 200, "p200") is None  # 100 ns from anything: waits
    assert pairer.add(0, 203, "r203") == ("r203", "p200")
    for stamp in (300, 400, 500, 600):  # the window holds 3: the oldest (100) and then 300 are dropped
        pairer.add(0, stamp, stamp)
    assert pairer.unpaired() == (5, 0)
    assert pairer.add(1, 601, "p") == (600, "p")


def test_histogram_gives_the_metrics_of_the_scaled_prediction():
    rng = np.random.default_rng(0)
    frames = [(rng.uniform(0.5, 9.0, 500), rng.lognormal(0.1, 0.2, 500)) for _ in range(3)]
    histogram = LogRatioHistogram()
    for gt, factor in frames:
        histogram.add(gt / factor, gt)
    for scale in (1.0, 1.1, 0.8):
        exact = [pair_metrics(gt / factor * scale, gt) for gt, factor in frames]
        got = histogram.metrics(scale)
        for key in ("delta1", "delta2", "delta3", "abs_rel"):
            want = float(np.mean([m[key] for m in exact]))
            assert got[key] == pytest.approx(want, abs=0.005), (scale, key)


def test_a_half_resolution_prediction_is_resampled_to_the_reference_grid():
    reference = np.full((48, 64), 2.0, np.float32)
    reference[:4] = np.nan  # no reference there: not scored
    result = score_against_reference(np.full((24, 32), 1.6, np.float32), reference, DepthRange(), "cam@1")
    assert result["median_ratio"] == pytest.approx(1.25)
    assert result["n_scored"]["dense"] == 44 * 64 and result["sparse"] is None


def _image(depth: np.ndarray, stamp_ns: int, encoding: str):
    from std_msgs.msg import Header

    from depthvlm_ros.ros.messages import depth_to_image

    header = Header(frame_id="camera_optical_frame")
    header.stamp.sec, header.stamp.nanosec = divmod(stamp_ns, 1_000_000_000)
    return depth_to_image(depth, header, encoding)


def write_bag(path: Path, messages: list[tuple[str, object]], log_delay_ns: dict[str, int] | None = None) -> None:
    """A rosbag2 (MCAP) of rclpy messages (Image or CameraInfo), each written at its header stamp plus its topic's
    ``log_delay_ns`` (a recorder receives each topic on its own)."""
    from rclpy.serialization import serialize_message
    from rosbags.rosbag2 import StoragePlugin, Writer

    from depthvlm_ros.tools.record import kilted_typestore

    store = kilted_typestore()
    with Writer(path, version=9, storage_plugin=StoragePlugin.MCAP) as writer:
        connections = {}
        for topic, msg in messages:
            if topic not in connections:
                connections[topic] = writer.add_connection(topic, f"sensor_msgs/msg/{type(msg).__name__}",
                                                           typestore=store)
            stamp = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
            writer.write(connections[topic], stamp + (log_delay_ns or {}).get(topic, 0), serialize_message(msg))


@pytest.mark.processes
def test_bag_of_a_depth_camera_gives_the_scale_that_corrects_the_prediction(tmp_path):
    """A RealSense-like 16UC1 reference and a half-resolution 32FC1 prediction 1.3x too near, 3 ms apart: the report
    says depth_scale 1.3 and what it would give; a reference frame without a partner is counted unpaired."""
    messages = []
    for i in range(6):
        stamp = 1_000_000_000 + i * 100_000_000
        truth = np.full((48, 64), 1.5 + 0.25 * i, np.float32)
        truth[:, :3] = 0  # the camera's holes (16UC1 0): not scored
        messages.append(("/camera/aligned_depth_to_color/image_raw", _image(truth, stamp, "16UC1")))
        if i != 4:
            messages.append(("/depthvlm/depth/image", _image(np.full((24, 32), (1.5 + 0.25 * i) / 1.3, np.float32),
                                                             stamp + 3_000_000, "32FC1")))
    bag = tmp_path / "camera.mcap"
    write_bag(bag, messages)
    out = tmp_path / "r.json"
    run = depthvlm("eval", "--bag", str(bag), "--reference-depth", "/camera/aligned_depth_to_color/image_raw",
                   "--predicted-depth", "/depthvlm/depth/image", "--json", str(out))
    assert run.returncode == 0, run.stderr
    report = json.loads(out.read_text())
    camera = report["datasets"]["/camera/aligned_depth_to_color/image_raw"]
    assert camera["n_images"] == 5 and camera["sparse"] is None
    assert camera["dense"]["delta1"] == 0.0 and camera["dense"]["abs_rel"] == pytest.approx(1 - 1 / 1.3, abs=1e-3)
    scale = camera["scale"]
    assert scale["depth_scale"] == pytest.approx(1.3, rel=1e-3) and scale["n_frames"] == 5
    assert scale["dense_scaled"]["delta1"] == 1.0 and scale["dense_scaled"]["abs_rel"] < 2e-3
    assert scale["unpaired"] == {"reference": 1, "predicted": 0}
    assert set(report) == {"datasets", "groups", "overall", "run"}  # the layout of depthvlm eval
    assert "depth_scale 1.3" in run.stdout


@pytest.mark.processes
def test_model_run_on_a_bag_scores_the_first_image_even_when_its_camera_info_was_logged_after_it(tmp_path):
    """The demo's recorder logs /image and /camera_info as each arrives: the first image can come before any
    camera_info. Every frame is still scored, each with the camera_info of its stamp, paired as the node pairs them
    (CI caught 15 of 16)."""
    from depthvlm_ros.ros.messages import intrinsics_to_camera_info, rgb_to_image
    from depthvlm_ros.scenes.dataset import FrameSpec, generate_frame

    spec = FrameSpec("indoor", 96, 72, 60.0, 100.0)
    messages = []
    for i in range(3):
        view = generate_frame(5, i, spec)[1]
        header = _image(view.depth, 1_000_000_000 + i * 100_000_000, "32FC1").header
        messages += [("/camera/image", rgb_to_image(view.rgb, header)),
                     ("/camera/camera_info", intrinsics_to_camera_info(view.intrinsics, header)),
                     ("/truth", _image(view.depth, 1_000_000_000 + i * 100_000_000, "32FC1"))]
    bag = tmp_path / "late_info.mcap"
    write_bag(bag, messages, log_delay_ns={"/camera/camera_info": 5_000_000})
    out = tmp_path / "r.json"
    run = depthvlm("eval", "--bag", str(bag), "--reference-depth", "/truth", "--json", str(out))
    assert run.returncode == 0, run.stderr
    camera = json.loads(out.read_text())["datasets"]["/truth"]
    assert (camera["n_images"], camera["n_skipped"]) == (3, 0), camera
    assert camera["scale"]["unpaired"] == {"reference": 0, "predicted": 0}


@pytest.mark.processes
@pytest.mark.parametrize("args, message", [
    (["--reference-depth", "/nope"], "topic /nope is not in the bag"),
    ([], "needs at least one --reference-depth"),
    (["--reference-depth", "/d", "--predicted-depth", "/a", "--predicted-depth", "/b"], "one --predicted-depth per"),
    (["--reference-depth", "/d", "--max-stamp-diff", "nan"], "--max-stamp-diff must be"),
])
def test_bad_bag_arguments_are_one_line_and_exit_code_2(tmp_path, args, message):
    bag = tmp_path / "b.mcap"
    write_bag(bag, [("/d", _image(np.ones((4, 4), np.float32), 1, "32FC1"))])
    run = depthvlm("eval", "--bag", str(bag), *args)
    assert run.returncode == 2 and message in run.stderr, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1


# -- TAE ------------------------------------------------------------------------------------------------------------


def _sequence(tmp_path: Path, n: int = 4):
    from depthvlm_ros.scenes.dataset import FrameSpec, generate_frame

    spec = FrameSpec("indoor", 96, 72, 60.0, 100.0, sequence_length=n, rate_hz=5.0)
    return [generate_frame(3, i, spec)[1] for i in range(n)]


def test_tae_is_zero_for_the_truth_without_motion_and_small_with_it(tmp_path):
    from depthvlm_ros.evaluation.temporal import pair_tae, sequence_tae

    views = _sequence(tmp_path)
    first = views[0]
    pose = first.pose.world_from_camera()
    assert pair_tae(first.depth, first.depth, first.intrinsics, pose, pose) == pytest.approx(0.0, abs=1e-9)
    truth = sequence_tae([v.depth for v in views], first.intrinsics, [v.pose.world_from_camera() for v in views])
    assert truth is not None and truth < 1.5  # occlusions and the pixel grid only
    # a depth map that flickers by 10 % every other frame: about 10 % on every pair
    flicker = [v.depth * (1.1 if i % 2 else 1.0) for i, v in enumerate(views)]
    tae = sequence_tae(flicker, first.intrinsics, [v.pose.world_from_camera() for v in views])
    assert 8.0 < tae < 12.0


@pytest.mark.processes
def test_generate_sequence_and_eval_reports_tae(tmp_path):
    """Frames of a generated sequence carry their poses; eval reports TAE, and saved predictions equal to the truth
    score the truth's own TAE."""
    data = tmp_path / "seq"
    run = depthvlm("generate", "--out", str(data), "--n", "6", "--seed", "3", "--kind", "indoor", "--size", "96x72",
                   "--sequence", "3", "--qa-per-frame", "0")
    assert run.returncode == 0, run.stderr
    records = [json.loads(line) for line in (data / "depth.jsonl").read_text().splitlines()]
    assert [r["frame_index"] for r in records] == [0, 1, 2, 0, 1, 2]
    assert len({r["sequence"] for r in records}) == 2 and np.asarray(records[0]["world_from_camera"]).shape == (4, 4)
    preds = tmp_path / "preds"
    from depthvlm_ros.evaluation.benchmark_data import read_depth_file

    for r in records:
        target = preds / r["image"].replace(".png", ".npy")
        target.parent.mkdir(parents=True, exist_ok=True)
        np.save(target, read_depth_file(data / r["depth_path"], 1000.0))
    out = tmp_path / "r.json"
    run = depthvlm("eval", "--dataset", f"seq={data}/depth.jsonl,{data},{data}", "--predictions", str(preds),
                   "--json", str(out))
    assert run.returncode == 0, run.stderr
    temporal = json.loads(out.read_text())["datasets"]["seq"]["temporal"]
    assert temporal["n_pairs"] == 4  # two per sequence of three, none across sequences
    assert math.isfinite(temporal["tae"]) and temporal["tae"] == pytest.approx(temporal["tae_gt"])
    assert "TAE" in run.stdout
