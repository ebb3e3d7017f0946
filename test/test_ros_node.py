"""The node over real Fast DDS: node, camera, listener and clients are separate processes.

Every test gets a private ROS_DOMAIN_ID with localhost-only discovery (the ``ros_env`` fixture).
The node runs the tiny checkpoint; the test process computes what the node should have published
with the same model and compares.
"""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from std_msgs.msg import Header

from depthvlm_ros.geometry import Intrinsics, depth_to_points

from conftest import REPO
from peers.ros_peer import frame_rgb

PY = sys.executable
PEER = str(REPO / "test" / "peers" / "ros_peer.py")


class ProcessOutput:
    """A command in its own process; its output is collected by a thread (the pipe never fills)."""

    def __init__(self, cmd: list[str], env: dict[str, str], what: str) -> None:
        self.what = what
        self.proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.lines: list[str] = []
        self._new_line = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._new_line:
                self.lines.append(line.rstrip())
                self._new_line.notify_all()
        with self._new_line:
            self._new_line.notify_all()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for_line(self, text: str, timeout: float = 90.0) -> None:
        """Until a line of the output contains ``text`` (fails if the process exits first)."""
        def seen() -> bool:
            return any(text in line for line in self.lines) or not self._reader.is_alive()

        with self._new_line:
            self._new_line.wait_for(seen, timeout=timeout)
        if not any(text in line for line in self.lines):
            raise AssertionError(f"{self.what} never printed {text!r}:\n{self.output[-6000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Signal the process, wait for its exit and for its output to be read to the end."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"{self.what} did not stop on {sig}:\n{self.output[-6000:]}") from None
        self._reader.join(timeout=30)
        return code


class NodeProcess(ProcessOutput):
    """``depthvlm node`` in its own process."""

    def __init__(self, env: dict[str, str], params: dict[str, object], *extra: str) -> None:
        ros = ["--ros-args"]
        for key, value in params.items():
            text = str(value).lower() if isinstance(value, bool) else str(value)
            ros += ["-p", f"{key}:={text}"]
        super().__init__([PY, "-m", "depthvlm_ros", "node", *extra, *ros], env, "node")

    def wait_ready(self, timeout: float = 90.0) -> None:
        self.wait_for_line("ready:", timeout)

    def rss_mb(self) -> float:
        from depthvlm_ros.tools.bench_node import rss_mb

        return rss_mb(self.proc.pid)


def peer(env: dict[str, str], *args: str, timeout: float = 180.0):
    run = subprocess.run([PY, PEER, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stderr + run.stdout
    return json.loads(run.stdout.strip().splitlines()[-1])


def start_peer(env: dict[str, str], *args: str) -> subprocess.Popen:
    proc = subprocess.Popen([PY, PEER, *args], env=env, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert json.loads(proc.stdout.readline()) == {"ready": True}, proc.stderr.read()
    return proc


def finish(proc: subprocess.Popen, timeout: float = 300.0) -> dict:
    """Close the peer's stdin (a streaming peer's signal to end), wait for it; its last line as JSON."""
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err + out
    return json.loads(out.strip().splitlines()[-1])


def start_camera(env: dict[str, str], *args: str, ceiling: int = 3000) -> subprocess.Popen:
    """A camera peer that streams at its ``--rate`` until :func:`finish` closes its stdin: a test stops it
    once its listener has what it waits for, however long this machine takes. ``ceiling`` frames (300 s at
    10 Hz) end it with a failure that says so."""
    return subprocess.Popen([PY, PEER, "publish", "--until-stdin-closes", "--count", str(ceiling), *args], env=env,
                            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stop_all(procs: list[subprocess.Popen]) -> None:
    """Kill peers that a failed test left running (a passing test has finished them)."""
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def load_collected(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    meta = json.loads(Path(str(path) + ".json").read_text())
    arrays = np.load(str(path) + ".npz") if Path(str(path) + ".npz").exists() else np.load(path)
    return meta, {k: arrays[k] for k in arrays.files}


def stamp_key(i: int, frame_id: str = "cam_optical") -> str:
    return f"{1000 + i // 1000}.{(i % 1000) * 1_000_000:09d}|{frame_id}"


#: Node parameters of every test here: reliable input (each published frame reaches the node; the
#: camera peer paces itself on the node's diagnostics with ``--await``) and diagnostics at 5 Hz.
TEST_PARAMS = {"input_reliability": "reliable", "diagnostics_period_s": 0.2, "backend": "torch"}
# (backend torch: the outputs are compared with the PyTorch reference exactly; auto's choice is tested
# in test_backends and test_auto_backend_is_chosen_and_said below.)


def node_depth(model, rgb: np.ndarray, k: Intrinsics) -> np.ndarray:
    """What the node computes for a frame: the camera's plan with torch's resize (its per-frame path)."""
    return model.infer(model.plan(k, exact=False), [rgb])[0].depth


@pytest.fixture(scope="module")
def module_env(private_cache) -> dict[str, str]:
    from conftest import ros_environment

    return ros_environment(private_cache)


@pytest.fixture(scope="module")
def node(module_env, tiny_checkpoint):
    """One node for the stream and service tests (the shipped parameters + the tiny checkpoint).

    Its tests publish increasing stamps (frame indices 0.., 10.., 100.., 200.., ...), as a camera does.
    """
    proc = NodeProcess(module_env, {"model_path": tiny_checkpoint, **TEST_PARAMS},
                       "--params-file", str(REPO / "config" / "depthvlm.yaml"))
    proc.wait_ready()
    yield proc
    code = proc.stop(signal.SIGTERM)
    assert code == 0, f"exit code {code} on SIGTERM:\n{proc.output}"


def test_stream_outputs_match_the_model_and_rep118(node, module_env, tiny_model, tmp_path):
    """bgr8 with padded rows in; depth, camera_info, coloured view and cloud out, all consistent.

    fx = 300 px: the image reaches the model magnified to fx 1000 (the canonical resize) and the
    depth comes back to the camera grid. The camera waits for each frame's outcome, so every frame
    is processed and all four arrive.
    """
    out = tmp_path / "c"
    listener = start_peer(module_env, "collect", "--out", str(out), "--count", "4", "--keep", "4")
    peer(module_env, "publish", "--count", "4", "--encoding", "bgr8", "--pad", "7", "--width", "320",
         "--height", "240", "--fx", "300", "--reliable", "--await")
    assert finish(listener)["depth_count"] == 4
    meta, arrays = load_collected(out)
    k_in = Intrinsics.from_fx(320, 240, 300.0)
    assert set(meta["depth"]) == {stamp_key(i) for i in range(4)}
    for i in range(4):
        key = stamp_key(i)
        assert meta["depth"][key]["encoding"] == "32FC1" and meta["depth"][key]["step"] == 320 * 4
        depth = arrays[f"depth|{key}"]
        assert depth.shape == (240, 320)
        # exactly what the library computes for this image and K
        expected = node_depth(tiny_model, frame_rgb(320, 240, i), k_in)
        np.testing.assert_allclose(depth, expected, rtol=1e-4, atol=1e-5)
        info = meta["info"][key]
        assert (info["width"], info["height"]) == (320, 240)
        assert info["k"] == pytest.approx(list(k_in.k.reshape(-1)))
        assert info["p"][:3] == info["k"][:3] and info["p"][4:7] == info["k"][3:6] and info["d"] == [0.0] * 5
        colored = arrays[f"colored|{key}"]
        assert meta["colored"][key]["encoding"] == "rgb8" and colored.shape == (240, 320, 3)
        cloud_meta = meta["points"][key]
        assert cloud_meta["fields"] == [["x", 0, 7, 1], ["y", 4, 7, 1], ["z", 8, 7, 1], ["rgb", 12, 7, 1]]
        assert (cloud_meta["height"], cloud_meta["width"]) == (240, 320)
        assert cloud_meta["point_step"] == 16 and cloud_meta["row_step"] == 16 * 320
        assert cloud_meta["is_dense"] is False and cloud_meta["is_bigendian"] is False
        cloud = arrays[f"points|{key}"]
        xyz = np.stack([cloud["x"], cloud["y"], cloud["z"]], axis=-1)
        k_depth = Intrinsics.from_k(info["k"], info["width"], info["height"])
        np.testing.assert_allclose(xyz, depth_to_points(depth, k_depth), rtol=1e-6, atol=1e-6)
        from depthvlm_ros.pointcloud import unpack_rgb

        np.testing.assert_array_equal(unpack_rgb(cloud["rgb"]), frame_rgb(320, 240, i))


def test_services_answer_from_another_process(node, module_env, tiny_model, tmp_path):
    from depthvlm_ros.spatial import answer_measurement

    peer(module_env, "publish", "--count", "2", "--start", "10", "--width", "320", "--height", "240",
         "--fx", "300", "--reliable", "--await")
    k_in = Intrinsics.from_fx(320, 240, 300.0)
    last = frame_rgb(320, 240, 11)
    depth = node_depth(tiny_model, last, k_in)

    res = peer(module_env, "call", "depth_at", json.dumps({"u": [0, 160, 319], "v": [0, 120, 239]}))
    assert res["success"], res["message"]
    assert res["frame_id"] == "cam_optical" and res["stamp"] == [1000, 11_000_000]
    assert res["depth_m"] == pytest.approx([depth[0, 0], depth[120, 160], depth[239, 319]], rel=1e-4)
    assert res["points"][1] == pytest.approx(list(depth_to_points(depth, k_in)[120, 160]), rel=1e-4, abs=1e-6)

    question = "How far is the blue disc?"
    res = peer(module_env, "call", "spatial_query", json.dumps({"question": question}))
    assert res["success"], res["message"]
    expected = tiny_model.ask(last, k_in, question, max_new_tokens=64)
    assert res["answer"] == expected.text
    assert res["frame_id"] == "cam_optical"
    found = answer_measurement(expected.text, expected.depth.depth, expected.depth.intrinsics, (320, 240))
    if found is None:  # the answer names no place: the distance is not made up
        assert math.isnan(res["distance_m"]) and "names no place" in res["message"] and res["region_px"] == []
    else:
        assert res["distance_m"] == pytest.approx(found.measurement.distance_m, rel=1e-4)
        assert res["region_px"] == pytest.approx(list(found.measurement.region_px))

    # ~/answers carries the same answer to a subscriber that comes after it (transient-local)
    (seen,) = peer(module_env, "answers", "--count", "1")
    assert (seen["via"], seen["question"], seen["answer"], seen["success"]) == (
        "spatial_query", question, res["answer"], True)
    assert (seen["frame_id"], seen["stamp"], seen["message"]) == ("cam_optical", [1000, 11_000_000], res["message"])
    assert seen["point"] == pytest.approx(res["point"], nan_ok=True)
    assert seen["region_px"] == pytest.approx(res["region_px"])
    assert seen["distance_m"] == pytest.approx(res["distance_m"], nan_ok=True)

    # the command-line client prints the same
    run = subprocess.run([PY, "-m", "depthvlm_ros", "query", "--at", "160,120"], env=module_env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert f"depth_m {depth[120, 160]:.3f}" in run.stdout


@pytest.mark.parametrize(("service", "request_fields", "message"), [
    ("spatial_query", {"question": ""}, "question is empty"),
    ("spatial_query", {"question": "x" * 501}, "limit is 500"),
    ("depth_at", {"u": [1, 2], "v": [1]}, "same length"),
    ("depth_at", {"u": [320], "v": [0]}, "outside the image"),
    ("depth_at", {"u": [-1], "v": [0]}, "outside the image"),
    ("depth_at", {"u": list(range(300)) * 40, "v": [0] * 12000}, "10000"),
    ("depth_at", {"u": [], "v": []}, "1..10000"),
])
def test_bad_requests_get_a_message_and_the_node_keeps_running(node, module_env, service, request_fields, message):
    res = peer(module_env, "call", service, json.dumps(request_fields))
    assert res["success"] is False
    assert message in res["message"]
    assert "\n" not in res["message"]
    assert node.proc.poll() is None


#: The six bad frames of the next test and the reason each is refused with (one kind of error each).
BAD_FRAMES = {
    "step": "image: step 959 < width 320",
    "size": "data has 115200 bytes",
    "nan_k": "K or P has NaN or infinite entries",
    "zero_k": "focal lengths must be positive",
    "encoding": "unsupported encoding '16UC1'",
    "aspect": "not proportional",
}


def test_bad_frames_are_reported_and_good_ones_still_flow(node, module_env, tmp_path):
    bad = peer(module_env, "publish", "--bad", ",".join(BAD_FRAMES), "--count", str(len(BAD_FRAMES)),
               "--start", "100", "--reliable", "--await")
    first, last = bad["first"], bad["diagnostics"]
    # each bad frame refused and counted once; none processed, none dropped
    assert int(last["errors"]) - int(first["errors"]) == len(BAD_FRAMES)
    assert (last["frames_processed"], last["frames_dropped"]) == (first["frames_processed"], first["frames_dropped"])
    assert "not proportional" in last["last_error"] and last["level"] == 1  # WARN
    # logged once per kind, independently: one kind never silences another
    node.wait_for_line(BAD_FRAMES["aspect"])
    for reason in BAD_FRAMES.values():
        assert sum(reason in line for line in node.lines if "frame skipped" in line) == 1, (reason, node.output)

    out = tmp_path / "c"
    listener = start_peer(module_env, "collect", "--out", str(out), "--count", "3", "--no-heavy")
    # proportional camera_info (calibrated at 2x the resolution) is scaled; mono8 is accepted
    good = peer(module_env, "publish", "--count", "3", "--start", "200", "--encoding", "mono8", "--fx", "1000",
                "--info-width", "640", "--info-height", "480", "--reliable", "--await")
    assert finish(listener)["depth_count"] == 3
    assert int(good["diagnostics"]["frames_processed"]) - int(good["first"]["frames_processed"]) == 3
    meta, _ = load_collected(out)
    for info in meta["info"].values():
        assert info["k"] == pytest.approx([1000.0, 0, 159.5, 0, 1000.0, 119.5, 0, 0, 1])
    assert node.proc.poll() is None


def test_parameters_change_at_run_time_and_are_validated(node, module_env, tmp_path):
    bad = peer(module_env, "call", "set_parameters", json.dumps({"pointcloud_stride": 0}))
    assert bad["results"][0]["successful"] is False
    bad = peer(module_env, "call", "set_parameters", json.dumps({"depth_encoding": "8UC1"}))
    assert bad["results"][0]["successful"] is False and "32FC1" in bad["results"][0]["reason"]
    bad = peer(module_env, "call", "set_parameters", json.dumps({"backend": "onnxruntime"}))
    assert bad["results"][0]["successful"] is False  # read-only
    ok = peer(module_env, "call", "set_parameters", json.dumps(
        {"depth_encoding": "16UC1", "pointcloud_stride": 4, "output_grid": "model", "max_range_m": 3.0}))
    assert all(r["successful"] for r in ok["results"]), ok
    try:
        out = tmp_path / "c"
        listener = start_peer(module_env, "collect", "--out", str(out), "--count", "2", "--keep", "2")
        peer(module_env, "publish", "--count", "2", "--start", "300", "--fx", "600", "--reliable", "--await")
        assert finish(listener)["depth_count"] == 2
        meta, arrays = load_collected(out)
        assert set(meta["depth"]) == {stamp_key(300), stamp_key(301)}
        for key in meta["depth"]:
            assert meta["depth"][key]["encoding"] == "16UC1"
            info = meta["info"][key]
            depth = arrays[f"depth|{key}"]
            assert depth.shape == (info["height"], info["width"])
            assert info["k"][0] == pytest.approx(1000.0, rel=0.1)  # the model grid: fx ~ canonical 1000 px
            cloud = arrays[f"points|{key}"]
            assert cloud.shape == ((info["height"] + 3) // 4, (info["width"] + 3) // 4)
            xyz = np.stack([cloud["x"], cloud["y"], cloud["z"]], axis=-1)
            full = depth_to_points(depth, Intrinsics.from_k(info["k"], info["width"], info["height"]))[::4, ::4]
            inside = np.linalg.norm(full, axis=-1) <= 3.0
            np.testing.assert_allclose(xyz[inside], full[inside], rtol=1e-5, atol=2e-3)  # 16UC1: 1 mm steps
            assert np.isnan(xyz[~inside]).all()
    finally:
        peer(module_env, "call", "set_parameters", json.dumps(
            {"depth_encoding": "32FC1", "pointcloud_stride": 1, "output_grid": "camera", "max_range_m": 0.0}))


def test_depth_scale_multiplies_depth_cloud_and_depth_at(node, module_env, tiny_model, tmp_path):
    """``depth_scale`` 1.25 (a correction measured on the user's camera): the published depth is 1.25x what
    the model computes for the same frame, the cloud follows it, and ``~/depth_at`` reads the scaled depth."""
    ok = peer(module_env, "call", "set_parameters", json.dumps({"depth_scale": 1.25}))
    assert all(r["successful"] for r in ok["results"]), ok
    try:
        out = tmp_path / "c"
        listener = start_peer(module_env, "collect", "--out", str(out), "--count", "2", "--keep", "2")
        peer(module_env, "publish", "--count", "2", "--start", "350", "--width", "320", "--height", "240",
             "--fx", "300", "--reliable", "--await")
        assert finish(listener)["depth_count"] == 2
        meta, arrays = load_collected(out)
        k_in = Intrinsics.from_fx(320, 240, 300.0)
        for i in (350, 351):
            key = stamp_key(i)
            depth = arrays[f"depth|{key}"]
            model = node_depth(tiny_model, frame_rgb(320, 240, i), k_in)
            np.testing.assert_allclose(depth, 1.25 * model, rtol=1e-4, atol=1e-5)
            cloud = arrays[f"points|{key}"]
            np.testing.assert_allclose(cloud["z"], depth, rtol=1e-6)
        res = peer(module_env, "call", "depth_at", json.dumps({"u": [160], "v": [120]}))
        assert res["success"] and res["depth_m"][0] == pytest.approx(float(depth[120, 160]), rel=1e-5), res
    finally:
        peer(module_env, "call", "set_parameters", json.dumps({"depth_scale": 1.0}))


def decode_compressed_depth(fmt: str, data: bytes) -> np.ndarray:
    """image_transport's compressed_depth, decoded as its subscriber does (written here from the published
    format, not with the package's encoder): encoding before ';', a 12-byte header (int32 format, float32
    depthQuantA, depthQuantB), then a PNG; 32FC1: depth = A / (value - B), 0 invalid; 16UC1: millimetres."""
    import io
    import struct

    from PIL import Image as PILImage

    encoding, _, rest = fmt.partition(";")
    assert rest.strip() == "compressedDepth png", fmt
    _, quant_a, quant_b = struct.unpack("<iff", data[:12])
    values = np.array(PILImage.open(io.BytesIO(data[12:]))).astype(np.float64)
    if encoding == "16UC1":
        return np.where(values > 0, values / 1000.0, np.nan)
    return np.where(values > 0, quant_a / np.where(values > 0, values - quant_b, 1.0), np.nan)


def test_compressed_depth_decodes_to_the_depth_within_its_quantisation(node, module_env, tmp_path):
    """``depth/image/compressedDepth`` (made because someone subscribes) decodes, with a decoder written from
    image_transport's published format, to ``depth/image`` of the same frame within one step of its inverse
    depth quantisation (relative error <= depth / (q (q + 1)), q = 100); beyond 10 m it is invalid."""
    out = tmp_path / "c"
    listener = start_peer(module_env, "collect", "--out", str(out), "--count", "2", "--keep", "2",
                          "--no-heavy", "--compressed-depth")
    peer(module_env, "publish", "--count", "2", "--start", "360", "--width", "320", "--height", "240",
         "--fx", "300", "--reliable", "--await")
    assert finish(listener)["depth_count"] == 2
    meta, arrays = load_collected(out)
    assert set(meta["compressed"]) == set(meta["depth"]) == {stamp_key(360), stamp_key(361)}
    for key in meta["depth"]:
        assert meta["compressed"][key]["format"] == "32FC1; compressedDepth png"
        depth = arrays[f"depth|{key}"].astype(np.float64)
        decoded = decode_compressed_depth(meta["compressed"][key]["format"], arrays[f"compressed|{key}"].tobytes())
        near = np.isfinite(depth) & (depth < 10.0)
        assert near.mean() > 0.5 and np.isnan(decoded[~near]).all()
        step = depth[near] / (100.0 * 101.0)  # one quantisation step of inverse depth, relative
        assert (np.abs(decoded[near] - depth[near]) <= depth[near] * step * 1.01 + 1e-6).all()


def test_questions_cannot_starve_depth(node, module_env, tmp_path):
    """Eight questions at once while the camera streams: one is answered, one waits its turn, six are
    refused "busy" at once; between the two answers the depth stream gets the model for a frame."""
    ok = peer(module_env, "call", "set_parameters", json.dumps({"max_answer_tokens": 1024}))
    assert all(r["successful"] for r in ok["results"]), ok
    out = tmp_path / "c"
    listener = start_peer(module_env, "collect", "--out", str(out), "--count", "1", "--no-heavy",
                          "--until", "queries_busy>=6", "--until", "query_active==false",
                          "--until", "queries_waiting==0")  # both answers done
    camera = start_camera(module_env, "--start", "400", "--rate", "5", "--reliable")
    try:
        before = peer(module_env, "watch", "--until", "frames_processed>=1", "--until", "inference_rate_hz>0")
        results = peer(module_env, "call", "spatial_query", json.dumps({"question": "How far is the blue disc?"}),
                       "--repeat", "8")
        assert finish(listener)["depth_count"] >= 1
        finish(camera)
    finally:
        stop_all([camera])
        peer(module_env, "call", "set_parameters", json.dumps({"max_answer_tokens": 64}))
    answered = [r for r in results if r["success"]]
    busy = [r for r in results if not r["success"]]
    assert len(results) == 8 and len(answered) == 2 and len(busy) == 6, results
    assert all(r["message"].startswith("busy") for r in busy), busy
    # "at once": every refusal came back before the first answer
    assert max(r["completed_at"] for r in busy) < min(r["completed_at"] for r in answered)
    # between the two answers the waiting question let the camera's frame have the model first, and depth
    # kept being published through the questions
    after = load_collected(out)[0]["diagnostics"][-1]
    assert int(after["questions_waited_for_depth"]) == int(before["questions_waited_for_depth"]) + 1, after
    assert int(after["frames_processed"]) > int(before["frames_processed"])
    assert node.proc.poll() is None


def test_an_ask_action_is_canceled_within_a_decoding_step(node, module_env):
    """~/ask streams the answer as feedback; a cancel stops generation at the next token and the result says
    how many were generated; ``depthvlm query`` streams it too and Ctrl-C cancels it. (The untrained tiny
    model never writes an end token, so without the cancel it would generate all 1024.)"""
    ok = peer(module_env, "call", "set_parameters", json.dumps({"max_answer_tokens": 1024}))
    assert all(r["successful"] for r in ok["results"]), ok
    try:
        out = peer(module_env, "ask", "How far is the blue disc?", "--max-new-tokens", "1024", "--cancel-after", "3")
        refused = peer(module_env, "ask", "How far is the blue disc?", "--max-new-tokens", "1025")
        # depthvlm query: the answer streams to stdout; Ctrl-C cancels the goal and the tool exits 130
        query = subprocess.Popen([PY, "-m", "depthvlm_ros", "query", "How far is the blue disc?", "--max-new-tokens",
                                  "1024"], env=module_env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        streamed = b""
        while len(streamed) < len(b"answer: ") + 10:  # some of the answer has been printed: it is generating
            chunk = query.stdout.read1(64)
            assert chunk, query.stderr.read().decode()
            streamed += chunk
        query.send_signal(signal.SIGINT)
        rest, err = query.communicate(timeout=60)
    finally:
        peer(module_env, "call", "set_parameters", json.dumps({"max_answer_tokens": 64}))
    assert out["status"] == "canceled" and not out["result"]["success"], out["result"]
    stopped = re.fullmatch(r"stopped after (\d+) tokens: canceled", out["result"]["message"])
    assert stopped, out["result"]["message"]
    generated = int(stopped.group(1))
    assert out["canceled_at"]["tokens"] <= generated < 1024
    assert all(f["tokens"] <= generated for f in out["feedback"]) and len(out["feedback"]) >= 3
    assert out["result"]["answer"].startswith(out["feedback"][2]["answer"])  # the same answer, streamed
    assert refused["status"] == "rejected" and not refused["feedback"], refused  # rejected before any decoding
    assert query.returncode == 130, err.decode()
    said = re.search(r"canceled: stopped after (\d+) tokens: canceled", err.decode())
    assert said and int(said.group(1)) < 1024, err.decode()
    assert (streamed + rest).decode().startswith("answer: ")
    status = peer(module_env, "watch", "--until", "queries_canceled>=2")
    assert status["query_active"] == "false" and int(status["goals_rejected"]) >= 1, status
    assert node.proc.poll() is None


def stream_cameras(env: dict[str, str], cams: dict, tmp_path: Path, until: str,
                   rate: int) -> tuple[dict[str, subprocess.Popen], list[subprocess.Popen]]:
    """For each of ``cams`` (name -> (width, height, fx, first frame index)) a listener that collects three depth
    images until its camera's diagnostics say ``until``, then the cameras at ``rate`` Hz, each streaming until its
    listener has them, however long that takes."""
    listeners = {name: start_peer(env, "collect", "--ns", name, "--out", str(tmp_path / name), "--count", "3",
                                  "--keep", "3", "--status", f"depthvlm: {name}: depth", "--until", until)
                 for name in cams}
    cameras = [start_camera(env, "--ns", name, "--width", str(w), "--height", str(h), "--fx", str(fx),
                            "--start", str(start), "--rate", str(rate), "--reliable", "--frame-id", f"{name}_optical")
               for name, (w, h, fx, start) in cams.items()]
    return listeners, cameras


def check_camera_depths(tiny_model, tmp_path: Path, cams: dict, results: dict, sent: list[int],
                        scales: dict[str, float] | None = None) -> dict[str, dict]:
    """Each camera's kept depth images are its own frames' depth computed alone (frame id, stamp, size, K), times the
    camera's depth scale in ``scales`` (default 1); returns each camera's last diagnostics status."""
    statuses = {}
    for name, (width, height, fx, start) in cams.items():
        assert results[name]["depth_count"] >= 3
        meta, arrays = load_collected(tmp_path / name)
        k = Intrinsics.from_fx(width, height, fx)
        assert meta["depth"], meta
        for key, item in meta["depth"].items():
            stamp, frame_id = key.split("|")
            index = round((float(stamp) - 1000.0) * 1000)
            assert frame_id == f"{name}_optical" and start <= index < start + max(sent)
            assert (item["width"], item["height"]) == (width, height)
            assert meta["info"][key]["k"] == pytest.approx(list(k.k.reshape(-1)))
            expected = node_depth(tiny_model, frame_rgb(width, height, index % 8), k) * (scales or {}).get(name, 1.0)
            np.testing.assert_allclose(arrays[f"depth|{key}"], expected, rtol=1e-4, atol=1e-5)
        statuses[name] = meta["diagnostics"][-1]
    return statuses


def test_two_cameras_are_served_by_one_model(ros_env, tiny_checkpoint, tiny_model, tmp_path):
    """cameras [left, right]: two cameras of different sizes and intrinsics at 10 Hz each get their own depth,
    camera_info, frame ids and stamps under their namespaces, the right one scaled by its camera_depth_scales entry;
    questions name a camera; the model is loaded once (its log says so once). (An RSS comparison with the module's
    one-camera node was dropped: it depended on what that node had done before, and a second copy of the 13 MB
    tiny model would hide in its slack.)"""
    cams = {"left": (320, 240, 300.0, 0), "right": (256, 192, 200.0, 100)}  # width, height, fx, first index
    proc = NodeProcess(ros_env, {"model_path": tiny_checkpoint, "cameras": "[left, right]",
                                 "camera_depth_scales": '["right=1.5"]', **TEST_PARAMS})
    try:
        proc.wait_ready()
        assert "left/image + left/camera_info, right/image + right/camera_info" in proc.output
        listeners, cameras = stream_cameras(ros_env, cams, tmp_path, "frames_processed>=3", rate=10)
        try:
            results = {name: finish(listener) for name, listener in listeners.items()}
            question = {"question": "What is this?"}
            answer = peer(ros_env, "call", "spatial_query", json.dumps({**question, "camera": "right"}))
            nowhere = peer(ros_env, "call", "spatial_query", json.dumps({**question, "camera": "top"}))
            depth_at = peer(ros_env, "call", "depth_at", json.dumps({"u": [10], "v": [10], "camera": "left"}))
            sent = [finish(camera)["sent"] for camera in cameras]
        finally:
            stop_all(cameras)
    finally:
        assert proc.stop() == 0, proc.output
    scales = {"right": 1.5}  # camera_depth_scales: the right camera's own
    for name, status in check_camera_depths(tiny_model, tmp_path, cams, results, sent, scales).items():
        assert status["camera"] == name and int(status["frames_processed"]) >= 3, status
    assert answer["success"] and answer["frame_id"] == "right_optical", answer
    assert not nowhere["success"] and nowhere["message"] == "no camera 'top' here; cameras: 'left', 'right'"
    assert depth_at["success"] and depth_at["frame_id"] == "left_optical", depth_at
    assert proc.output.count("configured: model") == 1  # one model for both


def test_without_camera_info_frames_wait_unless_fallback_fx(ros_env, tiny_checkpoint, tmp_path):
    proc = NodeProcess(ros_env, {"model_path": tiny_checkpoint, "fallback_fx": 900.0, **TEST_PARAMS})
    try:
        proc.wait_ready()
        out = tmp_path / "c"
        listener = start_peer(ros_env, "collect", "--out", str(out), "--count", "2", "--no-heavy")
        peer(ros_env, "publish", "--count", "2", "--no-info", "--reliable", "--await")
        assert finish(listener)["depth_count"] == 2
        meta, _ = load_collected(out)
        assert all(info["k"][0] == pytest.approx(900.0) for info in meta["info"].values())
        bad = peer(ros_env, "call", "set_parameters", json.dumps({"fallback_fx": 0.0}))
        assert bad["results"][0]["successful"]
        out2 = tmp_path / "d"
        listener = start_peer(ros_env, "collect", "--out", str(out2), "--count", "0", "--no-heavy",
                              "--until", "frames_received>=8")
        # six images, no camera_info: the node keeps the newest 4 waiting for theirs and gives up on 2
        sent = peer(ros_env, "publish", "--count", "6", "--start", "10", "--rate", "3", "--no-info", "--reliable",
                    "--until", "frames_received>=8", "--until", "message~no camera_info")
        assert finish(listener)["depth_count"] == 0
        status = sent["diagnostics"]
        assert int(status["frames_without_camera_info"]) == 2 and int(status["frames_processed"]) == 2
        assert status["level"] == 1 and "images arrive but no camera_info" in status["message"]
        proc.wait_for_line("without matching camera_info")
    finally:
        assert proc.stop(signal.SIGINT) == 0, proc.output


def test_flood_output_keeps_flowing_memory_stays_bounded(ros_env, tiny_checkpoint, tmp_path):
    """100 Hz best-effort input for 30 s: latest frame wins, every frame is accounted for, memory is flat."""
    # PyTorch: no ONNX session appears mid-flood (the ONNX Runtime soak is in docs/benchmarks.md)
    proc = NodeProcess(ros_env, {"model_path": tiny_checkpoint, "diagnostics_period_s": 0.2, "backend": "torch"})
    try:
        proc.wait_ready()
        out = tmp_path / "c"
        listener = start_peer(ros_env, "collect", "--out", str(out), "--keep", "0", "--no-heavy",
                              "--until-stdin-closes", "--timeout", "300")
        began = time.monotonic()
        camera = subprocess.Popen([PY, PEER, "publish", "--count", "3000", "--rate", "100", "--fx", "1000",
                                   "--width", "320", "--height", "240"], env=ros_env, cwd=REPO,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        rss = []
        while True:  # one RSS sample per second until the camera is done
            try:
                camera.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                rss.append(proc.rss_mb())
        ended = time.monotonic()
        out_cam, err_cam = camera.communicate()
        assert camera.returncode == 0, err_cam
        sent = json.loads(out_cam.strip().splitlines()[-1])
        # the camera is done: once the node's input has been idle for a while, its counters are final
        diag = peer(ros_env, "watch", "--until", "frames_received>=100", "--until", "input_rate_hz==0.00")
        got = finish(listener)  # closes the collector's stdin: it saves what it got and ends
        meta, _ = load_collected(out)
    finally:
        assert proc.stop(signal.SIGTERM) == 0, proc.output
    assert sent["sent"] == 3000
    received, processed, dropped = (int(diag[k]) for k in ("frames_received", "frames_processed", "frames_dropped"))
    # every frame that reached the node is accounted for: processed, replaced by a newer one (dropped) or
    # given up for lack of camera_info; at most 4 may still wait for a camera_info that best effort lost
    assert 0 <= received - int(diag["handled"]) <= 4 and int(diag["errors"]) == 0, diag
    # and the camera's frames that never reached the node are counted too (gaps in its sequence numbers);
    # only frames before the first or after the last one received can go uncounted
    assert 3000 - 50 <= received + int(diag["frames_lost_before_node"]) <= 3000, diag
    # output kept flowing through the flood: depth arrived in its first and its last third
    arrivals = np.array(meta["arrivals"])
    third = (ended - began) / 3
    assert ((arrivals > began) & (arrivals < began + third)).any(), (began, ended, arrivals[:5])
    assert ((arrivals > ended - third) & (arrivals < ended + 10)).any(), (began, ended, arrivals[-5:])
    assert got["depth_count"] == len(arrivals) <= processed
    # bounded memory: after warm-up the node's RSS does not keep growing
    warm, late = np.median(rss[5:10]), np.median(rss[-5:])
    assert late - warm < 60.0, f"RSS grew from {warm:.0f} MB to {late:.0f} MB: {rss}"
    print(f"flood: {processed} processed, {dropped} dropped of {received} received "
          f"({diag['frames_lost_before_node']} lost before the node), RSS {warm:.0f} -> {late:.0f} MB")


def test_compressed_input_from_depthvlm_play(ros_env, tiny_checkpoint, tmp_path):
    from PIL import Image as PILImage

    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(2):
        PILImage.fromarray(frame_rgb(320, 240, i)).save(folder / f"{i:03d}.png")
    proc = NodeProcess(ros_env, {"model_path": tiny_checkpoint, "use_compressed": True, **TEST_PARAMS})
    try:
        proc.wait_ready()
        out = tmp_path / "c"
        listener = start_peer(ros_env, "collect", "--out", str(out), "--count", "1", "--no-heavy")
        play = subprocess.run([PY, "-m", "depthvlm_ros", "play", str(folder), "--fx", "1000", "--rate", "2",
                               "--count", "4", "--compressed-only", "--wait-subscribers", "1", "--wait-timeout", "60"],
                              env=ros_env, capture_output=True, text=True, timeout=120)
        assert play.returncode == 0, play.stderr
        assert "playing anyway" not in play.stderr  # it waited for the node's image/compressed and camera_info
        # latest frame wins: whatever the machine's speed, the last frame is processed
        assert finish(listener)["depth_count"] >= 1
        meta, arrays = load_collected(out)
        key = next(iter(meta["depth"]))
        assert key.endswith("|camera_optical_frame")
        assert arrays[f"depth|{key}"].shape == (240, 320)
        assert meta["info"][key]["k"][0] == pytest.approx(1000.0)
    finally:
        assert proc.stop(signal.SIGTERM) == 0, proc.output


def test_camera_dies_and_comes_back_and_camera_info_stops(ros_env, tiny_checkpoint):
    """Faults a robot meets: diagnostics go WARN while no frames arrive and back to OK when they do;
    images without camera_info get a clear diagnostic; the node never stops."""
    proc = NodeProcess(ros_env, {"model_path": tiny_checkpoint, **TEST_PARAMS})

    def camera(start: int, *extra: str) -> subprocess.Popen:
        return subprocess.Popen([PY, PEER, "publish", "--count", "100000", "--start", str(start), "--rate", "5",
                                 "--reliable", *extra], env=ros_env, cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    try:
        proc.wait_ready()
        first = camera(0)
        ok = peer(ros_env, "watch", "--until", "level==0", "--until", "frames_processed>=1")
        assert ok["message"].startswith("publishing depth")
        first.kill()  # the camera dies (no clean shutdown)
        first.communicate()
        stale = peer(ros_env, "watch", "--until", "message~no input images")
        assert stale["level"] == 1
        second = camera(100000)  # back, with a later clock
        try:
            back = peer(ros_env, "watch", "--until", "level==0",
                        "--until", f"frames_processed>={int(stale['frames_processed']) + 1}")
            assert back["message"].startswith("publishing depth")
        finally:
            second.kill()
            second.communicate()
        blind = camera(200000, "--no-info")  # images keep coming, camera_info stopped
        try:
            missing = peer(ros_env, "watch", "--until", "message~no camera_info")
            assert missing["level"] == 1 and "frames are skipped" in missing["message"]
        finally:
            blind.kill()
            blind.communicate()
        assert proc.proc.poll() is None
    finally:
        assert proc.stop(signal.SIGTERM) == 0, proc.output


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_a_model_folder_that_cannot_load_exits_3_with_one_line(ros_env, tiny_checkpoint, tmp_path, damage):
    import shutil

    folder = tmp_path / "model"
    if damage == "corrupt":
        shutil.copytree(tiny_checkpoint, folder)
        (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    run = subprocess.run([PY, "-m", "depthvlm_ros", "node", "--ros-args", "-p", f"model_path:={folder}"],
                         env=ros_env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 3, run.stdout + run.stderr  # not bad input: the model folder cannot load
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("depthvlm: error:"), run.stderr
    assert str(folder) in lines[0] and (damage == "missing" or "model.safetensors" in lines[0]), lines[0]


def test_sigterm_while_a_question_is_answered_exits_0_at_once(ros_env, tiny_checkpoint):
    proc = NodeProcess(ros_env, {"model_path": tiny_checkpoint, "max_answer_tokens": 1024, **TEST_PARAMS})
    try:
        proc.wait_ready()
        peer(ros_env, "publish", "--count", "1", "--reliable", "--await")
        client = subprocess.Popen([PY, PEER, "call", "spatial_query", json.dumps({"question": "Where is it?"})],
                                  env=ros_env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        proc.wait_for_line("spatial_query: answering")  # 1024 tokens take a second or more: it is answering now
        code = proc.stop(signal.SIGTERM, timeout=15)
        client.kill()
        client.communicate()
    finally:
        if proc.proc.poll() is None:
            proc.stop(signal.SIGKILL)
    assert code == 0, proc.output
    assert "stopped after" in proc.output and "the node is shutting down" in proc.output, proc.output


def test_batched_cameras_get_the_depth_each_would_get_alone(ros_env, tiny_checkpoint, tiny_model, tmp_path):
    """batch_cameras: true: two cameras of one model-grid size at 20 Hz; frames waiting together go through one
    forward (frames_batched on both cameras' diagnostics), and each published depth is that camera's frame's depth
    computed alone, under its own namespace, frame id and stamp."""
    cams = {"left": (320, 240, 300.0, 0), "right": (320, 240, 300.0, 3)}  # width, height, fx, first index
    proc = NodeProcess(ros_env, {"model_path": tiny_checkpoint, "cameras": "[left, right]", "batch_cameras": True,
                                 **TEST_PARAMS})
    try:
        proc.wait_ready()
        listeners, cameras = stream_cameras(ros_env, cams, tmp_path, "frames_batched>=2", rate=20)
        try:
            results = {name: finish(listener) for name, listener in listeners.items()}
            sent = [finish(camera)["sent"] for camera in cameras]
        finally:
            stop_all(cameras)
    finally:
        assert proc.stop() == 0, proc.output
    for status in check_camera_depths(tiny_model, tmp_path, cams, results, sent).values():
        assert int(status["frames_batched"]) >= 2, status


def test_compiled_sizes_stay_bounded_and_depth_keeps_flowing(ros_env, tiny_checkpoint, tiny_model):
    """30 camera sizes into an onnxruntime node: exports run in the background (another process), the frame
    takes the nearest held size or PyTorch meanwhile, at most max_compiled_sizes sessions are held, every
    frame is published and memory stays flat. The cameras reaching one model-grid size come one after
    another, at least 6 frames together: a size is made once it was wanted in 5 of the last 16 frames
    (a camera_info changing every frame makes none: test_faults.py)."""
    from depthvlm_ros.pipeline.plan import model_input_size

    cameras = [(256 + 8 * (i % 10), 256 + 16 * (i // 10)) for i in range(30)]  # 6 model-grid sizes
    groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for w, h in cameras:
        groups.setdefault(model_input_size(tiny_model.processor, Intrinsics.from_fx(w, h, 1000.0)), []).append((w, h))
    runs = [(group * 6)[: max(6, len(group))] for group in groups.values()]
    sizes = ",".join(f"{w}x{h}" for run in runs for w, h in run)
    per_round = sum(len(run) for run in runs)
    proc = NodeProcess(ros_env, {**TEST_PARAMS, "model_path": tiny_checkpoint, "backend": "onnxruntime",
                                 "max_compiled_sizes": 2, "compiled_size_idle_s": 1.0})

    def made() -> int:
        return sum("onnxruntime: size" in line and line.endswith("ready") for line in proc.lines)

    try:
        proc.wait_ready()
        rounds = []
        while len(rounds) < 2 or made() < 3:  # every size at least twice, until 3 sizes were made (one evicted)
            assert len(rounds) < 20, proc.output
            rounds.append(peer(ros_env, "publish", "--sizes", sizes, "--count", str(per_round), "--start",
                               str(per_round * len(rounds)), "--fx", "1000", "--reliable", "--await", "--track",
                               "compiled_sizes_held", timeout=600))
            if len(rounds) == 1:
                rss_start = proc.rss_mb()
        rss_end = proc.rss_mb()
    finally:
        assert proc.stop(signal.SIGTERM) == 0, proc.output
    for r in rounds:
        status = r["diagnostics"]
        assert r["max"]["compiled_sizes_held"] <= 2, r["max"]
        assert int(status["errors"]) == 0 and int(status["frames_dropped"]) == 0, status
        assert int(status["frames_processed"]) - int(r["first"]["frames_processed"]) == per_round  # all published
    assert int(rounds[-1]["diagnostics"]["compiled_sizes_held"]) == 2
    assert rounds[-1]["diagnostics"]["max_compiled_sizes"] == "2"  # the bound in force, as set
    assert rounds[-1]["diagnostics"]["compiled_size_after_frames"] == "5"  # and the wait for a settled size
    assert int(rounds[0]["diagnostics"]["frames_on_reference"]) >= 1  # PyTorch served before the first export
    assert rss_end - rss_start < 100, (rss_start, rss_end)


def test_an_altered_onnx_graph_is_refused_and_pytorch_serves(ros_env, tiny_model, tmp_path):
    """A graph whose weights changed after export fails its probe at load: refused with the re-export
    command; with backend_fallback the node runs on PyTorch and says so in its diagnostics."""
    from depthvlm_ros.backends.onnx_export import export_onnx

    from conftest import alter_onnx_weights

    graph = tmp_path / "d.onnx"
    export_onnx(tiny_model, 320, 256, graph, check_images=1, progress=lambda _: None)
    alter_onnx_weights(graph)
    proc = NodeProcess(ros_env, {**TEST_PARAMS, "model_path": tiny_model.folder, "backend": "onnxruntime",
                                 "engine_paths": f"['{graph}']"})
    try:
        proc.wait_ready()
        peer(ros_env, "publish", "--count", "1", "--fx", "1000", "--reliable", "--await")
        status = peer(ros_env, "watch", "--until", "frames_processed>=1")
    finally:
        assert proc.stop(signal.SIGTERM) == 0, proc.output
    assert status["backend"].startswith("torch") and int(status["errors"]) == 0
    assert "differs from its PyTorch reference" in status["backend_fallback"]
    assert "depthvlm export" in status["backend_fallback"]
    assert "falling back to torch" in proc.output


#: Rows of the lifecycle test model's embedding: 480,000 x 64 float32 = 117 MiB of weights, so that freeing
#: them shows in the process's RSS (everything else of the tiny model is under 2 MiB). The weights are
#: memory-mapped from the safetensors file and become resident as they are read; an answer's LM head (tied
#: to the embedding) reads all of them.
FAT_VOCAB_ROWS = 480_000


def test_a_lifecycle_manager_drives_the_node(ros_env, tmp_path):
    """autostart false: the node waits unconfigured; from another process configure -> activate (depth
    flows, a question is answered) -> deactivate (no depth while frames keep arriving, for at least 2 s)
    -> activate (flows again) -> deactivate while a question is answered (it stops and says so) -> cleanup
    (the weights' memory returns) -> shutdown (the process exits 0)."""
    from depthvlm_ros.model.factory import make_tiny_checkpoint

    model_mb = FAT_VOCAB_ROWS * 64 * 4 / 2**20
    fat = make_tiny_checkpoint(tmp_path / "fat", seed=0, vocab_rows=FAT_VOCAB_ROWS)
    proc = NodeProcess(ros_env, {"model_path": fat, **TEST_PARAMS}, "--no-autostart")
    try:
        proc.wait_for_line("unconfigured (autostart false)")
        report = peer(ros_env, "lifecycle", "--pid", str(proc.proc.pid), timeout=300.0)
        code = proc.proc.wait(timeout=60)
    finally:
        proc.stop()
    assert code == 0, proc.output
    assert report["initial"] == "unconfigured" and report["configure"] and report["after_configure"] == "inactive"
    assert report["activate"] and report["answered"] and report["deactivate"] and report["reactivate"], report
    assert report["rss_answered"] - report["rss_unconfigured"] > 0.8 * model_mb, report  # the weights came in
    assert report["depth_while_inactive"] == 0 and report["inactive_seconds"] >= 2.0, report
    status = report["inactive_status"]
    assert status["lifecycle_state"] == "inactive" and status["message"].startswith("inactive"), status
    stopped = report["stopped_question"]  # answered when deactivated: it ends, and says why
    assert not stopped["success"] and "deactivated" in stopped["message"], stopped
    assert report["cleanup"] and report["after_cleanup"] == "unconfigured", report
    freed = report["rss_before_cleanup"] - report["rss_after_cleanup"]
    assert freed > 0.6 * model_mb, report  # most of the model's memory went back to the system
    assert "unconfigured: the model is freed" in proc.output and "Traceback" not in proc.output, proc.output


def test_a_grounded_answer_is_measured_on_the_depth_map(tiny_model):
    """The service glue: a box in the answer becomes a distance and a 3D point from the depth map.

    The untrained tiny model never writes a box, so its answer text is replaced by a Qwen3-VL
    grounding; the depth map is the real one from the same prefill.
    """
    import rclpy
    from depthvlm_msgs.srv import SpatialQuery

    from depthvlm_ros.pipeline import Answer
    from depthvlm_ros.ros.intake import Frame
    from depthvlm_ros.ros.messages import intrinsics_to_camera_info, rgb_to_image
    from depthvlm_ros.ros.node import DepthVLMNode
    from depthvlm_ros.spatial import answer_measurement

    grounded = '```json\n[{"bbox_2d": [250, 300, 750, 700], "label": "blue disc"}]\n```'

    class GroundedAnswers:
        """The tiny model, whose answers are replaced by a fixed grounding (depth untouched)."""

        def __getattr__(self, name):
            return getattr(tiny_model, name)

        def ask(self, *args, **kwargs) -> Answer:
            answer = tiny_model.ask(*args, **kwargs)
            return Answer(text=grounded, depth=answer.depth, num_tokens=answer.num_tokens)

    context = rclpy.Context()
    rclpy.init(context=context, domain_id=101)
    node = DepthVLMNode(model=GroundedAnswers(), context=context)
    try:
        header = Header(frame_id="cam")
        rgb = frame_rgb(320, 240, 0)
        k = Intrinsics.from_fx(320, 240, 1000.0)
        assert node.state == "active"  # autostart
        node.worker.process(node.cameras[0], Frame(rgb_to_image(rgb, header), intrinsics_to_camera_info(k, header),
                                                   time.monotonic()), node.settings())
        res = node.questions._on_spatial_query(SpatialQuery.Request(question="Where is the blue disc?"),
                                               SpatialQuery.Response())
        assert res.success and res.answer == grounded
        expected = answer_measurement(grounded, tiny_model.ask(rgb, k, "Where is the blue disc?").depth.depth, k,
                                      (320, 240))
        assert res.distance_m == pytest.approx(expected.measurement.distance_m, rel=1e-5)
        p = res.point.point
        assert [p.x, p.y, p.z] == pytest.approx(list(expected.measurement.point), rel=1e-5)
        assert math.isfinite(res.distance_m) and res.distance_m == pytest.approx(math.hypot(p.x, p.y, p.z), rel=1e-5)
        assert list(res.region_px) == pytest.approx([79.5, 71.5, 239.5, 167.5])
        assert res.point.header.frame_id == "cam" and "blue disc" in res.message
    finally:
        node.destroy_node()
        rclpy.shutdown(context=context)


#: Held-out scenes of the grounded-answer tests: seed 4243 (training used seeds 1, 21 and 22), per scene kind.
GROUNDED_SEED, GROUNDED_FRAMES = 4243, 16
#: The bar for answers through the service: below what the shipped depthvlm-tiny meets on these 58 questions (issue
#: 26, fifth session: 90 % grounded, 72 % distances within 25 %; fourth 90 / 69 %, third 81 / 67 %), above a model
#: answering one constant point (the image centre, even measured on the true depth: 16 % grounded, 36 % distances
#: within 25 % here; the test below).
MIN_GROUNDED, MIN_DISTANCE_OK = 0.75, 0.6


@pytest.fixture(scope="module")
def scene_answers(private_cache) -> tuple[list[dict], str]:
    """Generated frames go to the node with the built-in model, their questions go through
    ``~/spatial_query`` from another process; returns the responses and the node's output."""
    from conftest import ros_environment

    env = ros_environment(private_cache)
    proc = NodeProcess(env, TEST_PARAMS)  # no model_path: the built-in model
    proc.wait_ready()
    try:
        rows = []
        for kind in ("indoor", "outdoor"):
            rows += peer(env, "ask_scenes", "--seed", str(GROUNDED_SEED), "--kind", kind,
                         "--frames", str(GROUNDED_FRAMES), timeout=600.0)
        asked = peer(env, "ask", "How far is the red chair?", "--compare-service", "--markers", "2")
        cli = subprocess.run([PY, "-m", "depthvlm_ros", "query", "How far is the red chair?"], env=env, cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    finally:
        assert proc.stop() == 0, proc.output
    SCENE_EXTRAS.update(asked=asked, cli=cli)
    return rows, proc.output


#: What the scene_answers node also answered: the ~/ask action and ``depthvlm query``.
SCENE_EXTRAS: dict[str, object] = {}


def test_the_ask_action_streams_the_services_answer_and_marks_it(scene_answers):
    """The action's feedback arrives before its result and ends in its answer; the result equals the
    service's response for the same frame and question; each answer that names a place is drawn on
    ~/answer_markers: a sphere at the response's point and a label, in the image's frame."""
    asked = SCENE_EXTRAS["asked"]
    result, service = asked["result"], asked["service"]
    assert asked["status"] == "succeeded" and result["success"], asked
    assert asked["feedback"] and asked["feedback"][0]["at"] < asked["result_at"]
    assert asked["feedback"][-1]["answer"] == result["answer"]
    assert [f["tokens"] for f in asked["feedback"]] == sorted(f["tokens"] for f in asked["feedback"])
    assert result == service, (result, service)  # same frame, same question, same code: the same answer
    assert result["frame_id"] == "cam_optical" and result["stamp"] == [4000, 0]
    assert math.isfinite(result["distance_m"]), result  # the built-in model names a place
    for drawn in asked["markers"]:
        sphere, label = drawn["markers"]
        assert sphere["type"] == 2 and label["type"] == 9  # Marker.SPHERE, Marker.TEXT_VIEW_FACING
        assert sphere["frame_id"] == label["frame_id"] == "cam_optical" and sphere["stamp"] == [4000, 0]
        assert sphere["position"] == pytest.approx(result["point"], rel=1e-5)
        assert label["text"] == f"red chair {result['distance_m']:.2f} m", label
        assert sphere["lifetime"] == pytest.approx(10.0)
    cli = SCENE_EXTRAS["cli"]
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.startswith(f"answer: {result['answer']}\n"), cli.stdout
    assert f"distance_m: {result['distance_m']:.3f}" in cli.stdout


def test_the_built_in_model_answers_generated_questions_over_dds(scene_answers):
    """The package's third job end to end, what holds today: every question is answered, about the
    object it names, measured on the depth map of the frame it was asked about."""
    from depthvlm_ros.model.default import BUILTIN_NOTE
    from depthvlm_ros.spatial import parse_grounding

    rows, output = scene_answers
    assert output.count(BUILTIN_NOTE) == 1  # said once, at start
    assert len(rows) >= 20 and all(r["success"] for r in rows), rows
    named = 0
    for r in rows:
        places = parse_grounding(r["answer"])
        asked = r["record"]["truth"]["objects"][0]["label"]
        named += bool(places) and places[0].label == asked
        if places:  # a place was named: measured there, on the frame asked about
            assert len(r["region_px"]) == 4 and math.isfinite(r["distance_m"]) and r["distance_m"] > 0, r
            assert r["stamp"] == [2000, r["index"] * 1_000_000]
        else:
            assert r["region_px"] == [] and math.isnan(r["distance_m"])
    assert named >= 0.9 * len(rows), rows  # the answer's place is labelled with the object asked about


def grounded_questions() -> list[tuple[dict, object]]:
    """The generated distance/where questions the node is asked, with their frames' renderings."""
    from depthvlm_ros.scenes.dataset import FrameSpec, default_fx_range, frame_records

    out = []
    for kind in ("indoor", "outdoor"):
        for index in range(GROUNDED_FRAMES):
            view, _, records = frame_records(GROUNDED_SEED, index, FrameSpec(kind, 320, 240, *default_fx_range(320)))
            out += [(r, view) for r in records if r["qa_kind"] in ("distance", "where")]
    return out


def test_a_constant_point_fails_the_grounding_bar():
    """The bar of the next test is not met by answering the image centre, even measured on the true depth."""
    from depthvlm_ros.evaluation.qa import score_response, summarize

    constant = []
    for record, view in grounded_questions():
        k, z = view.intrinsics, float(view.depth[120, 160])
        distance = z * math.hypot((160 - k.cx) / k.fx, (120 - k.cy) / k.fy, 1.0) if math.isfinite(z) else math.nan
        constant.append(score_response(record, '{"point_2d": [500, 500]}', [160, 120, 160, 120], distance))
    baseline = summarize(constant)
    assert baseline["grounded"]["n"] >= 20 and baseline["distance_ok"]["n"] >= 10
    assert baseline["grounded"]["rate"] < MIN_GROUNDED - 0.2
    assert baseline["distance_ok"]["rate"] < MIN_DISTANCE_OK - 0.15


def test_the_built_in_model_grounds_and_measures_answers_over_dds(scene_answers):
    """Through the service, the answers' places lie on the named objects and the distances measured there are
    right, at a bar the shipped model meets (47 of 58 grounded, 24 of 36 distances within 25 %; the bar needs 38
    and 20; the issue's target, 80 % / 70 %, is met for grounding only). A constant point fails this bar (the test
    above)."""
    from depthvlm_ros.evaluation.qa import score_response, summarize

    rows, _ = scene_answers
    summary = summarize(score_response(r["record"], r["answer"], r["region_px"], r["distance_m"]) for r in rows)
    print("over DDS:", {key: summary[key] for key in ("grounded", "distance_ok")})
    assert summary["grounded"]["rate"] >= MIN_GROUNDED, summary
    assert summary["distance_ok"]["rate"] >= MIN_DISTANCE_OK, summary
