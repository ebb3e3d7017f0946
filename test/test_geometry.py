"""Camera geometry: intrinsics, canonical resize, K scaling, depth resampling, back-projection."""

from __future__ import annotations

import math

import numpy as np
import pytest

from depthvlm_ros.errors import InputError
from depthvlm_ros.geometry import (
    Intrinsics,
    canonical_resize,
    canonical_size,
    depth_from_16uc1,
    depth_to_16uc1,
    depth_to_32fc1,
    depth_to_points,
    intrinsics_for_image,
    pixel_to_point,
    resize_depth,
)


@pytest.mark.parametrize(("bad", "says"), [
    (dict(fx=0.0), "positive"), (dict(fx=-5.0), "positive"), (dict(fy=float("nan")), "fy"),
    (dict(cx=float("inf")), "cx"), (dict(width=0), "image size 0x480"), (dict(height=100000), "640x100000"),
])
def test_invalid_intrinsics_are_rejected_with_a_clear_message(bad, says):
    fields = dict(fx=500.0, fy=500.0, cx=319.5, cy=239.5, width=640, height=480) | bad
    with pytest.raises(InputError, match=says):
        Intrinsics(**fields)


def test_intrinsics_from_camera_info_forms():
    k = [525.0, 0, 319.5, 0, 530.0, 239.5, 0, 0, 1]
    ros_yaml = {"image_width": 640, "image_height": 480, "camera_matrix": {"rows": 3, "cols": 3, "data": k}}
    msg_like = {"width": 640, "height": 480, "k": k}
    plain = {"width": 640, "height": 480, "fx": 525.0, "fy": 530.0, "cx": 319.5, "cy": 239.5}
    for data in (ros_yaml, msg_like, plain):
        intr = Intrinsics.from_mapping(data)
        assert (intr.fx, intr.fy, intr.cx, intr.cy, intr.width, intr.height) == (525, 530, 319.5, 239.5, 640, 480)
    np.testing.assert_array_equal(Intrinsics.from_mapping(msg_like).k, np.array(k).reshape(3, 3))
    with pytest.raises(InputError):
        Intrinsics.from_mapping({"width": 640, "height": 480})


def test_projection_matrix_of_a_rectified_image_wins_over_k():
    k = [525.0, 0, 319.5, 0, 525.0, 239.5, 0, 0, 1]
    p = [500.0, 0, 322.0, 0, 0, 505.0, 241.0, 0, 0, 0, 1, 0]
    ros_yaml = {"image_width": 640, "image_height": 480, "camera_matrix": {"data": k},
                "projection_matrix": {"rows": 3, "cols": 4, "data": p}}
    for data in (ros_yaml, {"width": 640, "height": 480, "k": k, "p": p}):
        intr = Intrinsics.from_mapping(data)
        assert (intr.fx, intr.fy, intr.cx, intr.cy) == (500.0, 505.0, 322.0, 241.0)
    unset = {"width": 640, "height": 480, "k": k, "p": [0.0] * 12}  # an all-zero P means "not set"
    assert Intrinsics.from_mapping(unset).fx == 525.0


def test_intrinsics_from_yaml_file_errors_are_one_line(tmp_path):
    path = tmp_path / "cam.yaml"
    path.write_text("image_width: 64\nimage_height: 48\ncamera_matrix: {data: [50, 0, 31.5, 0, 50, 23.5, 0, 0, 1]}\n")
    assert Intrinsics.from_yaml(path).fx == 50
    with pytest.raises(InputError, match="cam2.yaml"):
        Intrinsics.from_yaml(tmp_path / "cam2.yaml")
    path.write_text("{{{")
    with pytest.raises(InputError, match="YAML"):
        Intrinsics.from_yaml(path)


def test_resized_k_keeps_rays_through_pixel_centres():
    cam = Intrinsics(fx=500.0, fy=480.0, cx=300.2, cy=250.7, width=640, height=480)
    small = cam.resized(320, 240)
    # A pixel edge at u = -0.5 stays the image edge; the ray through an edge is the same ray.
    for u_big, u_small in ((-0.5, -0.5), (639.5, 319.5)):
        assert (u_big - cam.cx) / cam.fx == pytest.approx((u_small - small.cx) / small.fx)
    assert small.fx == 250.0 and small.fy == 240.0
    assert cam.resized(640, 480) == cam


def test_canonical_size_follows_the_benchmark_rounding():
    cam = Intrinsics.from_fx(640, 480, 525.0)
    assert canonical_size(cam) == (round(640 * 1000 / 525), round(480 * 1000 / 525)) == (1219, 914)
    assert canonical_size(Intrinsics.from_fx(320, 240, 1000.0)) == (320, 240)
    # fy is handled explicitly: by default both sides scale by 1000/fx; match_fy scales y by 1000/fy.
    aniso = Intrinsics.from_fx(640, 480, 500.0, fy=400.0)
    assert canonical_size(aniso) == (1280, 960)
    assert canonical_size(aniso, match_fy=True) == (1280, 1200)
    # A wide lens's canonical size is only arithmetic (nothing is resized to it) ...
    assert canonical_size(Intrinsics.from_fx(640, 480, 10.0)) == (64000, 48000)
    # ... the function that would allocate it refuses, and a camera under 1 px focal length has no sane input.
    with pytest.raises(InputError, match="exceeds 8192"):
        canonical_resize(np.zeros((480, 640, 3), np.uint8), Intrinsics.from_fx(640, 480, 10.0))
    with pytest.raises(InputError, match="below 1 px"):
        canonical_size(Intrinsics.from_fx(640, 480, 0.5))


def test_canonical_resize_returns_image_and_k_with_fx_1000():
    rgb = np.zeros((240, 320, 3), np.uint8)
    img, k = canonical_resize(rgb, Intrinsics.from_fx(320, 240, 250.0))
    assert img.shape == (960, 1280, 3) and (k.width, k.height) == (1280, 960)
    assert k.fx == pytest.approx(1000.0) and k.fy == pytest.approx(1000.0)
    with pytest.raises(InputError, match="intrinsics describe"):
        canonical_resize(rgb, Intrinsics.from_fx(640, 480, 250.0))


def test_resize_depth_is_bilinear_and_pixel_centre_aligned():
    depth = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    up = resize_depth(depth, 4, 4)
    # output pixel 0 centre maps to source -0.25 -> clamped to 0; pixel 1 maps to 0.25.
    assert up[0, 0] == pytest.approx(1.0)
    assert up[0, 1] == pytest.approx(1.25)
    assert up[1, 1] == pytest.approx(1.0 + 0.25 * 1 + 0.25 * 2)
    ramp = np.tile(np.arange(8, dtype=np.float32) + 1, (4, 1))
    down = resize_depth(ramp, 4, 2)
    np.testing.assert_allclose(down[0], [1.5, 3.5, 5.5, 7.5])


def test_resize_depth_keeps_invalid_pixels_invalid():
    depth = np.full((6, 6), 2.0, np.float32)
    depth[2, 3] = np.nan
    depth[0, 0] = 0.0  # REP 117: 0 in float depth is not a measurement either
    up = resize_depth(depth, 12, 12)
    assert np.isnan(up[4:7, 6:8]).any()
    assert np.isnan(up[0, 0])
    valid = up[np.isfinite(up)]
    np.testing.assert_allclose(valid, 2.0)  # no invalid value leaked into a valid pixel
    assert np.isfinite(up).sum() > 100
    same = resize_depth(depth, 6, 6)
    assert np.isnan(same[2, 3]) and np.isnan(same[0, 0]) and same[1, 1] == 2.0


def test_points_project_back_to_their_pixels():
    cam = Intrinsics(fx=400.0, fy=420.0, cx=150.3, cy=99.8, width=300, height=200)
    rng = np.random.default_rng(1)
    depth = rng.uniform(0.5, 10, (200, 300)).astype(np.float32)
    depth[5, 7] = np.nan
    pts = depth_to_points(depth, cam)
    assert pts.shape == (200, 300, 3) and pts.dtype == np.float32
    v, u = np.mgrid[0:200, 0:300]
    ok = np.isfinite(depth)
    np.testing.assert_allclose(pts[..., 0][ok] / pts[..., 2][ok] * cam.fx + cam.cx, u[ok], atol=1e-3)
    np.testing.assert_allclose(pts[..., 1][ok] / pts[..., 2][ok] * cam.fy + cam.cy, v[ok], atol=1e-3)
    assert np.isnan(pts[5, 7]).all()
    np.testing.assert_allclose(pixel_to_point(7.0, 9.0, depth[9, 7], cam), pts[9, 7], rtol=1e-5)


def test_depth_encodings_follow_rep_118():
    depth = np.array([[1.2344, np.nan, -1.0, 0.0, 70.0, 65.535]], np.float32)
    mm = depth_to_16uc1(depth)
    assert mm.dtype == np.uint16
    assert mm.tolist() == [[1234, 0, 0, 0, 0, 65535]]  # out of range is invalid (0), not saturated
    back = depth_from_16uc1(mm)
    assert back[0, 0] == pytest.approx(1.234) and np.isnan(back[0, 1:5]).all()
    f = depth_to_32fc1(depth)
    assert f.dtype == np.float32 and np.isnan(f[0, 1:4]).all() and f[0, 4] == 70.0


def test_intrinsics_for_image_scales_proportional_and_rejects_other_sizes():
    cam = Intrinsics.from_fx(1280, 960, 1000.0)
    half = intrinsics_for_image(cam, 640, 480)
    assert half.fx == 500.0 and half.size == (640, 480)
    assert intrinsics_for_image(cam, 1280, 960) is cam
    with pytest.raises(InputError, match="not proportional"):
        intrinsics_for_image(cam, 640, 360)
    assert math.isclose(half.cx, (cam.cx + 0.5) / 2 - 0.5)
