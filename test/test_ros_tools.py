"""``depthvlm play`` / ``depthvlm record`` with real rclpy in separate processes, and the launch/RViz files.

Every ROS process gets the ``ros_env`` fixture (private domain, localhost discovery, large-data
profile). The tools run as ``depthvlm play|record`` (``python -m depthvlm_ros``), as users run them.
"""

from __future__ import annotations

import ast
import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import REPO

pytest.importorskip("rclpy")
pytest.importorskip("rosbags")

LISTENER = Path(__file__).resolve().parent / "peers" / "ros_tools_listener.py"
WIDTH, HEIGHT = 64, 48
#: A calibration at twice the images' resolution (proportional: K is scaled by 0.5).
CAMERA_YAML = """\
image_width: 128
image_height: 96
camera_name: test_camera
camera_matrix:
  rows: 3
  cols: 3
  data: [120.0, 0.0, 63.5, 0.0, 110.0, 47.5, 0.0, 0.0, 1.0]
distortion_model: plumb_bob
distortion_coefficients:
  rows: 1
  cols: 5
  data: [0.0, 0.0, 0.0, 0.0, 0.0]
"""


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "depthvlm_ros", *args]


def tool(name: str, *args: str) -> list[str]:
    return cli(name, *args)


def start_listener(out: Path, count: int, env: dict[str, str], timeout: float = 180.0,
                   compressed: bool = False) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, str(LISTENER), str(out), str(count), str(timeout)]
                            + (["compressed"] if compressed else []),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    return proc


def listener_result(proc: subprocess.Popen, out: Path) -> tuple[np.ndarray, dict]:
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    data = np.load(out)
    return data["images"], json.loads(str(data["meta"]))


def run_ok(cmd: list[str], env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stderr
    return run


@pytest.fixture
def frames(tmp_path: Path) -> tuple[Path, list[np.ndarray]]:
    """A folder of three distinct 64x48 PNGs (names sort as 00, 01, 02) and their pixels."""
    folder = tmp_path / "frames"
    folder.mkdir()
    rng = np.random.default_rng(7)
    pixels = []
    for i in (2, 0, 1):  # written out of order: play must sort by name
        rgb = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
        rgb[0, 0] = (i, i, i)
        Image.fromarray(rgb).save(folder / f"{i:02d}.png")
        pixels.append((i, rgb))
    (folder / "notes.txt").write_text("not an image")
    return folder, [rgb for _, rgb in sorted(pixels, key=lambda p: p[0])]


def which_frame(image: np.ndarray, pngs: list[np.ndarray]) -> int:
    matches = [i for i, png in enumerate(pngs) if np.array_equal(image, png)]
    assert len(matches) == 1, "a received image equals none of the PNGs"
    return matches[0]


def test_play_folder_with_camera_info(tmp_path, frames, ros_env):
    folder, pngs = frames
    camera = tmp_path / "camera.yaml"
    camera.write_text(CAMERA_YAML)
    count = 6
    out = tmp_path / "received.npz"
    listener = start_listener(out, count, ros_env, compressed=True)
    run_ok(cli("play", str(folder), "--camera-info", str(camera), "--rate", "20", "--count", str(count),
               "--compressed", "--wait-subscribers", "1"), ros_env)
    images, meta = listener_result(listener, out)

    assert len(meta["images"]) == count and len(meta["infos"]) == count
    assert {m["encoding"] for m in meta["images"]} == {"rgb8"}
    assert [which_frame(img, pngs) for img in images] == [i % 3 for i in range(count)]  # sorted, looped
    image_stamps = [m["stamp"] for m in meta["images"]]
    assert image_stamps == sorted(set(image_stamps)) and image_stamps[0] > 0  # current time, increasing
    assert [m["stamp"] for m in meta["infos"]] == image_stamps
    assert sorted(m["stamp"] for m in meta["compressed"]) == image_stamps
    assert {m["format"] for m in meta["compressed"]} == {"jpeg"}
    frame_ids = {m["frame_id"] for m in meta["images"] + meta["infos"] + meta["compressed"]}
    assert frame_ids == {"camera_optical_frame"}
    from depthvlm_ros.geometry import Intrinsics

    expected = Intrinsics.from_yaml(camera).resized(WIDTH, HEIGHT)
    assert expected.fx == pytest.approx(60.0) and expected.cx == pytest.approx(31.5)
    for info in meta["infos"]:
        assert (info["width"], info["height"]) == (WIDTH, HEIGHT)
        np.testing.assert_allclose(np.reshape(info["k"], (3, 3)), expected.k, rtol=1e-12)


def test_record_then_replay_the_bag(tmp_path, frames, ros_env):
    from rosbags.highlevel import AnyReader
    from rosbags.typesys import Stores, get_typestore

    folder, pngs = frames
    bag = tmp_path / "session.mcap"
    recorder = subprocess.Popen(tool("record", str(bag), "--duration", "240", "--count", "24"), env=ros_env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    player = subprocess.Popen(tool("play", str(folder), "--fx", "50", "--rate", "20", "--loop",
                                   "--frame-id", "cam", "--wait-subscribers", "1"),
                              env=ros_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        rec_out, rec_err = recorder.communicate(timeout=300)  # ends on its count (--duration: a ceiling)
    finally:
        player.send_signal(signal.SIGINT)  # looping forever: SIGINT is the normal way out, exit 0
        _, play_err = player.communicate(timeout=60)
    assert recorder.returncode == 0, rec_err
    assert player.returncode == 0, play_err
    assert "recorded 24 messages" in rec_out and "/depth/image" in rec_out  # summary lists every topic
    assert bag.is_file() and not list(tmp_path.glob(".session.mcap.*"))  # one file, temp folder gone

    kilted = get_typestore(Stores.ROS2_KILTED)
    with AnyReader([bag]) as reader:
        conns = {c.topic: c for c in reader.connections}
        assert set(conns) == {"/image", "/camera_info"}  # topics without messages are not in the bag
        assert all(c.msgcount > 0 for c in conns.values())
        assert sum(c.msgcount for c in conns.values()) == 24
        for conn in conns.values():  # Kilted definitions (a lone .mcap keeps no rihs01 hash for rosbags)
            assert conn.msgdef.data == kilted.generate_msgdef(conn.msgtype, ros_version=2)[0]
        recorded = []
        for conn, timestamp, raw in reader.messages(connections=[conns["/image"]]):
            msg = reader.deserialize(raw, conn.msgtype)
            assert msg.encoding == "rgb8" and msg.header.frame_id == "cam" and timestamp > 0
            recorded.append((msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec,
                             which_frame(msg.data.reshape(msg.height, msg.width, 3), pngs)))
        conn = conns["/camera_info"]
        info = reader.deserialize(next(reader.messages(connections=[conn]))[2], conn.msgtype)
        assert info.k[0] == pytest.approx(50.0) and (info.width, info.height) == (WIDTH, HEIGHT)

    count = 5
    out = tmp_path / "replayed.npz"
    listener = start_listener(out, count, ros_env)
    run_ok(tool("play", str(bag), "--rate", "20", "--count", str(count), "--bag-stamps",
                "--wait-subscribers", "1"), ros_env)
    images, meta = listener_result(listener, out)
    assert len(images) == count
    assert [(m["stamp"], which_frame(img, pngs)) for m, img in zip(meta["images"], images)] == recorded[:count]
    assert [m["stamp"] for m in meta["infos"]] == [m["stamp"] for m in meta["images"]]
    assert {m["frame_id"] for m in meta["images"]} == {"cam"}  # the bag's frame_id
    assert all(i["k"][0] == pytest.approx(50.0) for i in meta["infos"])  # the bag's camera_info


def test_bad_input_exits_2_with_one_line(tmp_path, frames, ros_env):
    folder, _ = frames
    skewed = tmp_path / "skewed.yaml"
    skewed.write_text(CAMERA_YAML.replace("image_width: 128", "image_width: 100"))  # 100x96 vs 64x48
    existing = tmp_path / "existing.mcap"
    existing.write_bytes(b"keep me")
    cases = {
        "missing": (cli("play", str(tmp_path / "nowhere"), "--fx", "500"), "no such file"),
        "skewed": (cli("play", str(folder), "--camera-info", str(skewed)), "not proportional"),
        "overwrite": (cli("record", str(existing), "--duration", "1"), "not overwriting"),
    }
    procs = {name: subprocess.Popen(cmd, env=ros_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, (cmd, _) in cases.items()}  # in parallel: each pays the CLI's import time
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        lines = [line for line in err.splitlines() if line.strip()]
        assert proc.returncode == 2, (name, err)
        assert len(lines) == 1 and lines[0].startswith("depthvlm: error: "), (name, err)
        assert cases[name][1] in lines[0], (name, lines[0])
    assert existing.read_bytes() == b"keep me"


def test_bag_topic_choice():
    from depthvlm_ros.errors import InputError
    from depthvlm_ros.tools.play import pick_bag_topics

    img, info = "sensor_msgs/msg/Image", "sensor_msgs/msg/CameraInfo"
    recorded = {"/image": img, "/camera_info": info, "/depth/image": img, "/depth/camera_info": info,
                "/depth/colored": img}
    assert pick_bag_topics(recorded, None, None, need_info=True) == ("/image", "/camera_info")
    camera = {"/cam/image_raw": img, "/cam/image_rect": img, "/cam/camera_info": info}
    assert pick_bag_topics(camera, None, None, need_info=True) == ("/cam/image_rect", "/cam/camera_info")
    assert pick_bag_topics(camera, "cam/image_raw", None, need_info=True) == ("/cam/image_raw", "/cam/camera_info")
    with pytest.raises(InputError, match="several image topics"):
        pick_bag_topics({"/a/image": img, "/b/image": img}, None, None, need_info=False)
    with pytest.raises(InputError, match="no camera_info"):
        pick_bag_topics({"/a/image": img}, None, None, need_info=True)
    assert pick_bag_topics({"/a/image": img}, None, None, need_info=False) == ("/a/image", None)
    with pytest.raises(InputError, match="not sensor_msgs/msg/CameraInfo"):
        pick_bag_topics(recorded, None, "/depth/colored", need_info=True)


# -- launch file and RViz config (no launch package here: checked statically) -------------------------------

LAUNCH = REPO / "launch" / "depthvlm.launch.py"


def launch_strings() -> list[str]:
    tree = ast.parse(LAUNCH.read_text(), filename=str(LAUNCH))
    return [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def test_launch_file_structure():
    tree = ast.parse(LAUNCH.read_text(), filename=str(LAUNCH))
    functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert "generate_launch_description" in functions
    top_imports = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top_imports.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            top_imports.add(node.module.split(".")[0])
    assert {"launch", "launch_ros"} <= top_imports <= {"os", "launch", "launch_ros", "ament_index_python"}
    strings = launch_strings()
    for argument in ("params_file", "image", "camera_info", "namespace", "rviz", "use_compressed", "autostart",
                     "model_path"):
        assert argument in strings, argument
    assert {"depthvlm_ros", "depthvlm_node", "depthvlm", "FASTDDS_DEFAULT_PROFILES_FILE"} <= set(strings)


@pytest.mark.parametrize("name", ["config/depthvlm.yaml", "config/fastdds_large_data.xml", "config/depthvlm.rviz"])
def test_launch_file_names_existing_package_files(name):
    named = {s for s in launch_strings() if re.fullmatch(r"(config|launch)/[\w.\-]+", s)}
    assert name in named
    assert (REPO / name).is_file(), f"{name} is named by the launch file but missing from the repository"


def test_launch_executable_is_a_console_script():
    setup = (REPO / "setup.py").read_text()
    scripts = re.findall(r"[\"']\s*([\w\-]+)\s*=\s*[\w.]+:\w+\s*[\"']", setup)
    assert "depthvlm_node" in scripts, f"setup.py console_scripts {scripts} lack depthvlm_node"


def test_rviz_config_shows_the_node_topics():
    config = yaml.safe_load((REPO / "config" / "depthvlm.rviz").read_text())
    manager = config["Visualization Manager"]
    assert manager["Global Options"]["Fixed Frame"] == "camera_optical_frame"
    displays = {d["Topic"]["Value"]: d for d in manager["Displays"] if "Topic" in d}
    assert set(displays) == {"/image", "/depth/image", "/depth/colored", "/points", "/depthvlm/answer_markers"}
    for topic in ("/image", "/depth/image", "/depth/colored"):
        assert displays[topic]["Class"] == "rviz_default_plugins/Image"
    assert displays["/points"]["Class"] == "rviz_default_plugins/PointCloud2"
    assert displays["/points"]["Color Transformer"] == "RGB8"
    from depthvlm_ros.ros.questions import MARKER_NS

    markers = displays["/depthvlm/answer_markers"]  # the node's ~/answer_markers
    assert markers["Class"] == "rviz_default_plugins/MarkerArray" and markers["Namespaces"] == {MARKER_NS: True}
    assert {p["Class"] for p in config["Panels"]} >= {"rviz_common/Displays", "rviz_common/Views"}


def test_bench_node_soak_reports_the_node_memory(tmp_path, ros_env, tiny_checkpoint):
    """``bench-node --soak N``: N measured frames through a node process, its RSS along the way."""
    report_path = tmp_path / "soak.json"
    # backend torch: the soak is about the node's memory, which needs no export first (ONNX Runtime's soak:
    # docs/benchmarks.md)
    run = subprocess.run(cli("bench-node", "--size", "160x120", "--rate", "10", "--soak", "20", "--warmup", "1",
                             "--backend", "torch", "--model", str(tiny_checkpoint), "--json", str(report_path)),
                         env=ros_env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr
    report = json.loads(report_path.read_text())
    assert report["sent"] == 20 and 1 <= report["depth_received"] <= 20
    memory = report["node_rss_mb"]
    assert [n for n, _ in memory["samples"]][0] == 0 and memory["samples"][-1][0] == 20
    assert memory["start"] == memory["samples"][0][1] and memory["end"] == memory["samples"][-1][1] > 100
    assert "node RSS:" in run.stdout
