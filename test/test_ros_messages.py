"""Message conversions, the organized cloud, stamp pairing and the parameter table (no running node)."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import yaml
from PIL import Image as PILImage
from sensor_msgs.msg import CameraInfo, CompressedImage, Image
from std_msgs.msg import Header

from depthvlm_ros.errors import InputError
from depthvlm_ros.geometry import MAX_IMAGE_SIDE, Intrinsics, depth_to_points
from depthvlm_ros.pointcloud import organized_cloud, pack_rgb, unpack_rgb
from depthvlm_ros.ros import messages as M
from depthvlm_ros.ros.flow import KindThrottle, LatestSlots, QuestionGate, StampSync, error_kind
from depthvlm_ros.ros.params import PARAMS, check_settings

from conftest import REPO

RGB = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8", "mono8"])
def test_every_input_encoding_decodes_to_rgb_with_padded_rows(encoding):
    channels = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1}[encoding]
    pixels = {"rgb8": RGB, "bgr8": RGB[..., ::-1], "mono8": RGB[..., :1],
              "rgba8": np.dstack([RGB, np.full((5, 7), 9, np.uint8)]),
              "bgra8": np.dstack([RGB[..., ::-1], np.full((5, 7), 9, np.uint8)])}[encoding]
    step = 7 * channels + 3
    rows = np.zeros((5, step), np.uint8)
    rows[:, : 7 * channels] = pixels.reshape(5, -1)
    rgb = M.image_to_rgb(Image(height=5, width=7, encoding=encoding, step=step, data=rows.tobytes()))
    expected = np.repeat(RGB[..., :1], 3, axis=-1) if encoding == "mono8" else RGB
    np.testing.assert_array_equal(rgb, expected)


@pytest.mark.parametrize(("fields", "message"), [
    ({"encoding": "16UC1"}, "unsupported encoding '16UC1'"),
    ({"step": 20}, "step 20 < width 7 x 3"),
    ({"data": bytes(10)}, "data has 10 bytes, expected step 21 x height 5"),
    ({"width": 0, "step": 0, "data": b""}, "size 0x5 outside"),
    ({"width": MAX_IMAGE_SIDE + 1}, f"outside 1..{MAX_IMAGE_SIDE}"),
])
def test_malformed_images_are_refused_with_the_reason(fields, message):
    msg = M.rgb_to_image(RGB, Header())
    for key, value in fields.items():
        setattr(msg, key, value)
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(".", r"\.")):
        M.image_to_rgb(msg)


def test_compressed_images_decode_and_bombs_are_refused_before_decoding():
    for fmt in ("png", "jpeg"):
        msg = M.rgb_to_compressed(RGB, Header(), fmt, quality=100)
        rgb = M.compressed_to_rgb(msg)
        assert rgb.shape == RGB.shape
        if fmt == "png":
            np.testing.assert_array_equal(rgb, RGB)
    buf = io.BytesIO()
    PILImage.new("L", (MAX_IMAGE_SIDE + 10, 2)).save(buf, "PNG")  # small file, too wide an image
    with pytest.raises(InputError, match="outside"):
        M.compressed_to_rgb(CompressedImage(format="png", data=buf.getvalue()))
    with pytest.raises(InputError, match="cannot decode"):
        M.compressed_to_rgb(CompressedImage(format="jpeg", data=b"\xff\xd8 not really"))


def test_camera_info_prefers_p_scales_proportional_sizes_and_rejects_bad_k():
    info = CameraInfo(width=640, height=480, k=[500.0, 0, 320, 0, 500, 240, 0, 0, 1],
                      p=[480.0, 0, 318, 0, 0, 480, 238, 0, 0, 0, 1, 0])
    k = M.camera_info_to_intrinsics(info, 640, 480)
    assert (k.fx, k.cx, k.cy) == (480.0, 318.0, 238.0)
    half = M.camera_info_to_intrinsics(info, 320, 240)
    assert half.fx == 240.0 and half.cx == pytest.approx((318 + 0.5) / 2 - 0.5)
    with pytest.raises(InputError, match="not proportional"):
        M.camera_info_to_intrinsics(info, 640, 360)
    info.p = [0.0] * 12
    info.k = [math.nan] * 9
    with pytest.raises(InputError, match="NaN"):
        M.camera_info_to_intrinsics(info, 640, 480)
    info.k = [0.0] * 9
    with pytest.raises(InputError, match="positive"):
        M.camera_info_to_intrinsics(info, 640, 480)
    with pytest.raises(InputError, match="uncalibrated"):
        M.camera_info_to_intrinsics(CameraInfo(), 640, 480)


def test_published_camera_info_describes_the_depth_grid_exactly():
    k = Intrinsics(fx=510.5, fy=509.0, cx=319.2, cy=241.7, width=640, height=480)
    info = M.intrinsics_to_camera_info(k, Header(frame_id="cam"))
    assert M.camera_info_to_intrinsics(info) == k
    assert list(info.d) == [0.0] * 5 and info.header.frame_id == "cam"


@pytest.mark.parametrize("encoding", ["32FC1", "16UC1"])
def test_depth_images_follow_rep118(encoding):
    depth = np.array([[0.5, np.nan, 2.25], [0.0, -1.0, 70.0]], np.float32)
    msg = M.depth_to_image(depth, Header(), encoding)
    assert msg.encoding == encoding and msg.step == 3 * (4 if encoding == "32FC1" else 2)
    back = M.image_to_depth(msg)
    assert back[0, 0] == pytest.approx(0.5) and back[0, 2] == pytest.approx(2.25)
    invalid = np.isnan(back)
    assert invalid[0, 1] and invalid[1, 0] and invalid[1, 1]
    assert invalid[1, 2] == (encoding == "16UC1")  # 70 m does not fit in 16-bit millimetres: invalid, not 65.5 m


def test_organized_cloud_is_the_back_projection_with_stride_range_and_colour():
    k = Intrinsics.from_fx(64, 48, 50.0)
    depth = np.random.default_rng(1).uniform(0.5, 6.0, (48, 64)).astype(np.float32)
    depth[3, 5] = np.nan
    rgb = np.random.default_rng(2).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    cloud = organized_cloud(depth, k, rgb, stride=2, max_range_m=4.0)
    assert cloud.shape == (24, 32) and cloud.dtype.itemsize == 16
    full = depth_to_points(depth, k)[::2, ::2]
    xyz = np.stack([cloud["x"], cloud["y"], cloud["z"]], axis=-1)
    keep = np.linalg.norm(full, axis=-1) <= 4.0
    np.testing.assert_allclose(xyz[keep], full[keep], rtol=1e-6)
    assert np.isnan(xyz[~keep]).all() and (~keep).sum() > 10
    np.testing.assert_array_equal(unpack_rgb(cloud["rgb"]), rgb[::2, ::2])
    assert pack_rgb(np.array([1, 2, 3], np.uint8)).view(np.uint32) == 0x010203
    msg = M.cloud_to_msg(cloud, Header())
    np.testing.assert_array_equal(M.msg_to_cloud(msg).view(np.uint8), cloud.view(np.uint8))


def test_stamp_sync_pairs_either_order_and_stays_bounded():
    sync: StampSync[str, str] = StampSync(tolerance_ns=0, max_pending_images=2)
    assert sync.push_image(10, "img10") == []
    assert sync.push_info(10, "info10") == [("img10", "info10")]
    assert sync.push_image(10, "again") == [("again", "info10")]  # info first
    assert sync.push_image(5, "old") == [("old", None)]  # an older stamp can never pair now
    for stamp in (20, 21, 22):
        decided = sync.push_image(stamp, f"img{stamp}")
    assert decided == [("img20", None)]  # bounded: the oldest unpaired image is given up
    assert sync.push_info(22, "info22") == [("img21", None), ("img22", "info22")]
    assert sync.push_image(30, "img30") == [] and sync.pending == 1
    assert sync.flush() == [("img30", None)] and sync.pending == 0  # the stream ended: decided unpaired
    near: StampSync[str, str] = StampSync(tolerance_ns=5)
    near.push_info(100, "a")
    near.push_info(108, "b")
    assert near.push_image(106, "x") == [("x", "b")]  # the closest within tolerance


def test_stamp_sync_forgets_camera_infos_when_time_goes_back():
    """A camera restarted with an earlier clock (or a looping bag) pairs again at once."""
    sync: StampSync[str, str] = StampSync()
    sync.push_info(1000, "old")
    assert sync.push_image(1000, "a") == [("a", "old")]
    assert sync.push_info(10, "new") == []  # earlier than every info held: they are forgotten
    assert sync.push_image(10, "b") == [("b", "new")]
    assert sync.push_image(11, "c") == [] and sync.pending == 1  # waits for its info, not refused as too old


def test_latest_slots_keep_one_frame_per_camera_and_count_the_replaced():
    slots: LatestSlots[int] = LatestSlots(1)
    assert slots.put(0, 1) is False
    assert slots.put(0, 2) is True
    assert slots.pending()
    assert slots.take(0.0) == (0, 2) and slots.pending()  # taken, not done yet: still the worker's
    slots.done()
    assert not slots.pending() and slots.take(0.0) is None
    assert slots.dropped == [1]


def test_latest_slots_serve_cameras_in_turn():
    """A camera that always has a frame waiting cannot starve the other one."""
    slots: LatestSlots[str] = LatestSlots(3)
    slots.put(0, "a0")
    slots.put(2, "c0")
    assert slots.pending(0) and not slots.pending(1) and slots.pending(2)
    assert slots.take(0.0) == (0, "a0")
    assert slots.pending(0) and not slots.pending(1)  # in the worker
    slots.done()
    slots.put(0, "a1")  # camera 0 again, before camera 2 was served
    assert slots.take(0.0) == (2, "c0")
    slots.done()
    assert slots.take(0.0) == (0, "a1")


def test_latest_slots_hand_every_waiting_frame_to_a_batching_worker_in_turn():
    """take_all (batch_cameras): every camera's waiting frame at once, from the camera after the one served last;
    each is the worker's until done."""
    slots: LatestSlots[str] = LatestSlots(3)
    slots.put(1, "b0")
    assert slots.take(0.0) == (1, "b0")
    slots.done()
    for camera, frame in ((0, "a0"), (2, "c0"), (1, "b1")):
        slots.put(camera, frame)
    assert slots.take_all(0.0) == [(2, "c0"), (0, "a0"), (1, "b1")]
    assert all(slots.pending(camera) for camera in range(3)) and slots.take_all(0.0) == []
    slots.done()
    assert not slots.pending() and slots.wait_idle(0.0)
    slots.put(0, "a1")
    assert slots.take_all(0.0) == [(0, "a1")] and slots.pending(0) and not slots.pending(2)
    slots.done()
    slots.put(1, "b0")
    slots.put(2, "c1")
    assert slots.clear() == 2 and not slots.pending() and slots.take(0.0) is None
    assert slots.dropped == [0, 0, 0]


def test_question_gate_admits_one_lets_one_wait_and_refuses_the_rest_at_once():
    import threading

    frame_waiting = [False]
    gate = QuestionGate(max_waiting=1, depth_waiting=lambda: frame_waiting[0])
    assert gate.enter(timeout_s=1.0) is None and gate.active
    admitted = threading.Event()
    second = threading.Thread(target=lambda: gate.enter(timeout_s=30.0) is None and admitted.set())
    second.start()
    for _ in range(10_000):  # until the second question is queued (a thread start), at most ~10 s
        if gate.waiting:
            break
        second.join(0.001)
    assert gate.waiting == 1
    refused = gate.enter(timeout_s=30.0)  # a third: nobody else may wait, so "busy" at once
    assert refused is not None and refused.startswith("busy")
    frame_waiting[0] = True  # a depth frame waits for the model when the first question ends
    gate.leave()
    assert gate.waiting == 1 and not gate.active and not admitted.is_set()  # it waits for depth's turn ...
    gate.depth_served()
    assert admitted.wait(5.0)  # ... and goes once a frame was served
    second.join()
    frame_waiting[0] = False
    gate.leave()
    assert gate.enter(timeout_s=1.0) is None  # nothing waiting for depth: the next goes at once
    assert gate.enter(timeout_s=0.05).startswith("busy: no turn within")  # a wait has a timeout too
    gate.leave()


def test_log_throttle_is_per_kind():
    now = [0.0]
    throttle = KindThrottle(period_s=5.0, max_kinds=2, clock=lambda: now[0])
    step = error_kind("image: step 959 < width 320")
    assert step == error_kind("image: step 10 < width 12")  # numbers do not make a new kind
    assert throttle.allow(step) and throttle.allow(error_kind("camera_info: K has NaN"))  # independent kinds
    assert not throttle.allow(step)
    now[0] = 5.0
    assert throttle.allow(step)
    now[0] = 6.0
    throttle.allow("third kind")  # bounded at 2: the least recently seen kind (the NaN one) is forgotten ...
    assert throttle.allow(error_kind("camera_info: K has NaN"))  # ... so it logs again within its period
    assert not throttle.allow("third kind")  # while a remembered kind stays quiet


def test_shipped_parameter_file_matches_the_declared_parameters():
    from depthvlm_ros.ros.params import GROUPS, parameter_file

    text = (REPO / "config" / "depthvlm.yaml").read_text()
    assert text == parameter_file(), "regenerate: python -m depthvlm_ros.ros.params > config/depthvlm.yaml"
    assert [p.group for p in PARAMS] == sorted((p.group for p in PARAMS), key=GROUPS.index)  # grouped, in order
    data = yaml.safe_load(text)
    values = data["/**/depthvlm"]["ros__parameters"]
    declared = {p.name: p.default for p in PARAMS if p.default != []}
    assert values == declared
    assert check_settings(values) is None
    assert check_settings({**values, "max_depth_m": 1.0, "min_depth_m": 2.0}) is not None


@pytest.mark.parametrize("entries, problem", [
    (["front=1.25", "left=0.9"], None),
    (["front=1.25", "front=1.3"], "given twice"),
    (["back=1.25"], "not one of the cameras"),
    (["front"], "not CAMERA=SCALE"),
    (["front=nan"], "not CAMERA=SCALE"),
    (["front=500"], "not CAMERA=SCALE"),
])
def test_camera_depth_scales_name_cameras_with_a_scale_each(entries, problem):
    from depthvlm_ros.ros.params import depth_scale_for

    values = {p.name: p.default for p in PARAMS}
    found = check_settings({**values, "cameras": ["front", "left"], "camera_depth_scales": entries})
    assert (found is None) if problem is None else (problem in found), found
    if problem is None:
        assert depth_scale_for("front", 1.1, entries, ["front", "left"]) == 1.25
        assert depth_scale_for("right", 1.1, entries, ["front", "left", "right"]) == 1.1  # not listed: depth_scale


def test_typed_settings_are_generated_from_the_parameter_table():
    """ros/settings.py is what the table generates (a field per parameter, a frozen group each); a settings
    object is made from values as a whole, and a misspelt field is an error where it is read."""
    import dataclasses

    from depthvlm_ros.ros.params import settings_module
    from depthvlm_ros.ros.settings import Settings

    text = (REPO / "depthvlm_ros" / "ros" / "settings.py").read_text()
    assert text == settings_module(), \
        "regenerate: python -m depthvlm_ros.ros.params --settings > depthvlm_ros/ros/settings.py"
    values = {p.name: p.default for p in PARAMS}
    settings = Settings.from_values(values)
    groups = [getattr(settings, group.name) for group in dataclasses.fields(settings)]
    fields = {f.name for group in groups for f in dataclasses.fields(group)}
    assert fields == set(values)
    assert settings.model.backend == values["backend"]
    assert Settings.from_values(settings.values()) == settings  # a parameter change rebuilds the whole object
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.model.backend = "onnxruntime"
    with pytest.raises(AttributeError):
        _ = settings.model.bakend


def test_sequence_gaps_count_what_never_arrived():
    from depthvlm_ros.ros.flow import SequenceGaps

    gaps = SequenceGaps(max_publishers=2)
    assert gaps.seen("camera", 1) == 0 and gaps.seen("camera", 2) == 0
    assert gaps.seen("camera", 6) == 3  # 3, 4 and 5 never arrived
    assert gaps.seen("other", 40) == 0  # a new publisher starts its own count
    assert gaps.seen("camera", 5) == 0  # late or restarted: nothing counted twice
    assert gaps.seen("camera", None) == 0  # a middleware without sequence numbers


def test_camera_names_are_relative_namespaces_given_once():
    from depthvlm_ros.ros.params import MAX_CAMERAS, check_cameras

    assert check_cameras([]) == [""]  # one camera on the plain topic names
    assert check_cameras(["front", "rear/left_1"]) == ["front", "rear/left_1"]
    for bad, why in ((["/front"], "relative namespace"), (["front", "front"], "each name once"),
                     (["a b"], "relative namespace"), ([""], "relative namespace"),
                     ([f"c{i}" for i in range(MAX_CAMERAS + 1)], f"at most {MAX_CAMERAS}")):
        with pytest.raises(ValueError, match=why):
            check_cameras(bad)


@pytest.mark.parametrize("encoding", ["32FC1", "16UC1"])
def test_compressed_depth_round_trips_within_its_quantisation(encoding):
    """Both encodings of ``compressedDepth``: near depth comes back within its step, invalid and far depth
    (at or beyond depth_max) come back invalid."""
    from depthvlm_ros.ros.messages import depth_to_compressed_depth

    from test_ros_node import decode_compressed_depth

    depth = np.array([[0.3, 1.0, 4.25], [9.5, np.nan, 12.0]], np.float32)
    msg = depth_to_compressed_depth(depth, Header(frame_id="cam"), encoding, depth_max_m=10.0)
    assert msg.format == f"{encoding}; compressedDepth png" and msg.header.frame_id == "cam"
    decoded = decode_compressed_depth(msg.format, bytes(msg.data))
    near = np.isfinite(depth) & (depth < 10.0)
    step = depth[near] / (100.0 * 101.0) if encoding == "32FC1" else 0.0005 / depth[near]  # relative
    np.testing.assert_array_less(np.abs(decoded[near] - depth[near]), depth[near] * step * 1.01 + 1e-6)
    assert np.isnan(decoded[~near]).all()


def test_radius_outlier_removal_drops_lone_points_and_keeps_surfaces():
    """A wall at 2 m with three flying points at 1 m in it: with the filter on, exactly those three become NaN
    (wall points, corners included, have 3-8 neighbours 4 cm away); off, the cloud is unchanged."""
    from depthvlm_ros.pointcloud import radius_outliers

    k = Intrinsics.from_fx(64, 48, 50.0)
    depth = np.full((48, 64), 2.0, np.float32)
    lone = [(10, 10), (30, 40), (0, 63)]
    for row, col in lone:
        depth[row, col] = 1.0
    depth[20, 20] = np.nan
    plain = organized_cloud(depth, k)
    filtered = organized_cloud(depth, k, outlier_radius_m=0.1, outlier_min_neighbors=2)
    removed = np.isfinite(plain["z"]) & ~np.isfinite(filtered["z"])
    assert sorted(zip(*np.nonzero(removed))) == sorted(lone)
    assert np.array_equal(np.isnan(plain["z"]), np.isnan(organized_cloud(depth, k, outlier_radius_m=0.0)["z"]))
    # the 3x3 rule, checked against a direct count on a random cloud
    xyz = np.random.default_rng(0).normal(size=(12, 15, 3)).astype(np.float32)
    xyz[3, 4] = np.nan
    want = np.zeros((12, 15), bool)
    for i, j in np.ndindex(12, 15):
        if np.isfinite(xyz[i, j, 2]):
            near = sum(1 for di in (-1, 0, 1) for dj in (-1, 0, 1) if (di or dj) and 0 <= i + di < 12
                       and 0 <= j + dj < 15 and np.sum((xyz[i + di, j + dj] - xyz[i, j]) ** 2) <= 0.81)
            want[i, j] = near < 3
    assert np.array_equal(radius_outliers(xyz, 0.9, 3), want)
