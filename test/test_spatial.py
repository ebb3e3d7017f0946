"""Spatial queries: grounding parsing, pixel mapping, robust region depth, depth at pixels."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from depthvlm_ros.errors import InputError
from depthvlm_ros.geometry import Intrinsics, pixel_to_point
from depthvlm_ros.spatial import (
    MAX_GROUNDINGS,
    Grounding,
    answer_measurement,
    depth_at_pixels,
    grounding_to_pixels,
    measure_region,
    parse_grounding,
)

K = Intrinsics(fx=500.0, fy=480.0, cx=322.0, cy=236.0, width=640, height=480)
SIZE = (640, 480)


def wall_with_object(intrinsics: Intrinsics = K) -> np.ndarray:
    """A wall at 5 m; a 2 m object over input-image columns 200..319 and rows 100..299 (any resolution)."""
    h, w = intrinsics.height, intrinsics.width
    u = (np.arange(w) + 0.5) * 640 / w - 0.5  # depth-grid pixel centre in input-image pixels
    v = (np.arange(h) + 0.5) * 480 / h - 0.5
    depth = np.full((h, w), 5.0, dtype=np.float32)
    depth[np.ix_((v >= 99.5) & (v < 299.5), (u >= 199.5) & (u < 319.5))] = 2.0
    return depth


def slanted(intrinsics: Intrinsics = K) -> np.ndarray:
    """A slanted plane, z linear in the normalized image x coordinate (the same scene at any resolution)."""
    xn = (np.arange(intrinsics.width) - intrinsics.cx) / intrinsics.fx
    return np.tile(2.0 + 0.5 * xn, (intrinsics.height, 1)).astype(np.float32)


# -- parsing ---------------------------------------------------------------------------------------------


def test_parses_a_json_list_of_boxes_and_points_in_order():
    text = '[{"bbox_2d": [100, 200, 300, 400], "label": "chair"}, {"point_2d": [500, 600], "label": "cup"}]'
    assert parse_grounding(text) == [
        Grounding("box", (100.0, 200.0, 300.0, 400.0), "chair"), Grounding("point", (500.0, 600.0), "cup"),
    ]


def test_parses_a_single_dict_and_a_fenced_block_inside_prose():
    assert parse_grounding('{"point_2d": [12.5, 40]}') == [Grounding("point", (12.5, 40.0), None)]
    text = 'Sure! Here it is:\n```json\n[\n  {"bbox_2d": [10, 20, 30, 40], "label": "lamp"}\n]\n```\nDone.'
    assert parse_grounding(text) == [Grounding("box", (10.0, 20.0, 30.0, 40.0), "lamp")]


@pytest.mark.parametrize("text", [
    '[{"bbox_2d": [10, 20, 30, 40], "label": "chair",}]',  # trailing comma
    "[{'bbox_2d': [10, 20, 30, 40], 'label': 'chair'}]",  # Python quotes
    '```json\n[{"bbox_2d": [10, 20, 30, 40], "label": "chair"',  # cut off
])
def test_broken_json_falls_back_to_patterns(text):
    assert parse_grounding(text) == [Grounding("box", (10.0, 20.0, 30.0, 40.0), "chair")]


def test_parses_qwen_box_tokens():
    text = ("The <|object_ref_start|>red chair<|object_ref_end|><|box_start|>(100,200),(300,400)<|box_end|> "
            "and <|box_start|>( 5 , 6 ),( 7 , 8 )<|box_end|>")
    assert parse_grounding(text) == [
        Grounding("box", (100.0, 200.0, 300.0, 400.0), "red chair"), Grounding("box", (5.0, 6.0, 7.0, 8.0), None),
    ]


@pytest.mark.parametrize("text", [
    "", "There is no chair in this image.", "[1, 2, 3, 4]", '{"answer": "2.3 m"}', None, 42,
    '{"bbox_2d": [1, 2, 3]}', '{"point_2d": ["a", "b"]}',
])
def test_answers_that_name_no_place_give_no_grounding(text):
    assert parse_grounding(text) == []


def test_coordinates_are_clamped_and_box_corners_ordered():
    assert parse_grounding('{"bbox_2d": [1200, 400, -5, 300]}') == [Grounding("box", (0.0, 300.0, 1000.0, 400.0))]


def test_non_finite_coordinates_are_dropped():
    text = '[{"bbox_2d": [NaN, 1, 2, 3]}, {"point_2d": [1e999, 5]}, {"point_2d": [Infinity, 5]}, ' \
        '{"point_2d": [10, 20]}]'
    assert parse_grounding(text) == [Grounding("point", (10.0, 20.0))]
    assert parse_grounding('"bbox_2d": [1e999, 1, 2, 3], "point_2d": [7, 8]') == [Grounding("point", (7.0, 8.0))]


@pytest.mark.parametrize("text", [
    "[" * 200000, "{" * 200000, '"bbox_2d": [' * 50000, "<|box_start|>(" + "9" * 200000,
    '{"bbox_2d": [' + "1" * 100000 + ", 2, 3, 4]}", "x" * 10**7,
    "[" + ", ".join(['{"point_2d": [1, 2]}'] * 5000) + "]",
    "\n".join(['"point_2d": [1, 2]'] * 5000),
    "<|box_start|>(1,2),(3,4)<|box_end|>" * 5000,
])
def test_absurd_input_is_bounded_and_does_not_crash(text):
    start = time.perf_counter()
    places = parse_grounding(text)
    assert time.perf_counter() - start < 2.0
    assert len(places) <= MAX_GROUNDINGS


def test_many_places_are_capped():
    text = "[" + ", ".join(['{"point_2d": [1, 2]}'] * 100) + "]"
    assert len(parse_grounding(text)) == MAX_GROUNDINGS


# -- pixel mapping --------------------------------------------------------------------------------------


def test_box_corners_map_to_image_edges_in_pixel_centre_coordinates():
    assert grounding_to_pixels(Grounding("box", (0, 0, 1000, 1000)), 640, 480) == (-0.5, -0.5, 639.5, 479.5)
    assert grounding_to_pixels(Grounding("box", (250, 500, 500, 750)), 640, 480) == (159.5, 239.5, 319.5, 359.5)


def test_points_map_to_pixel_centres_inside_the_image():
    assert grounding_to_pixels(Grounding("point", (0, 0)), 640, 480) == (0.0, 0.0, 0.0, 0.0)
    assert grounding_to_pixels(Grounding("point", (1000, 1000)), 640, 480) == (639.0, 479.0, 639.0, 479.0)
    assert grounding_to_pixels(Grounding("point", (500, 500)), 640, 480) == (319.5, 239.5, 319.5, 239.5)


# -- region measurement ---------------------------------------------------------------------------------


def test_box_depth_is_the_object_not_the_wall_behind_it():
    region = (199.5, 99.5, 399.5, 299.5)  # object fills the left 60 % of the box, wall the rest
    m = measure_region(wall_with_object(), K, region, SIZE)
    assert m.depth_m == pytest.approx(2.0, rel=0.05)
    assert m.n_valid == 120 * 200
    # object only 30 % of the box: a plain median would say 5 m
    wide = measure_region(wall_with_object(), K, (199.5, 99.5, 599.5, 299.5), SIZE)
    assert wide.depth_m == pytest.approx(2.0, rel=0.05)
    np.testing.assert_allclose(m.point, pixel_to_point(299.5, 199.5, m.depth_m, K), rtol=1e-9)
    assert m.distance_m == pytest.approx(float(np.linalg.norm(m.point)))
    assert m.distance_m > m.depth_m
    assert all(type(c) is float for c in (m.depth_m, m.distance_m, *m.point))


def test_box_depth_of_a_ring_shaped_object_and_of_a_single_surface():
    depth = np.full((480, 640), 5.0, dtype=np.float32)
    depth[100:300, 200:400] = 2.0
    depth[120:280, 220:380] = 5.0  # hole in the middle: the object is 36 % of the box, none of its centre
    assert measure_region(depth, K, (199.5, 99.5, 399.5, 299.5), SIZE).depth_m == pytest.approx(2.0, rel=0.05)
    plane = slanted()  # one surface whose depth varies: plain median, not its near part
    m = measure_region(plane, K, (99.5, 0, 499.5, 479), SIZE)
    assert m.depth_m == pytest.approx(float(np.median(plane[:, 100:500])), rel=0.01)


def test_point_depth_and_back_projection_match_geometry():
    depth = slanted()
    m = measure_region(depth, K, (400, 100, 400, 100), SIZE)
    assert m.depth_m == pytest.approx(float(depth[100, 400]), rel=1e-6)
    assert m.n_valid == 25
    np.testing.assert_allclose(m.point, pixel_to_point(400, 100, float(depth[100, 400]), K), rtol=1e-6)
    assert m.region_px == (400.0, 100.0, 400.0, 100.0)


def test_point_median_ignores_invalid_pixels_in_its_window():
    depth = np.full((480, 640), 3.0, dtype=np.float32)
    depth[98:101, 398:403] = np.nan
    depth[101, 398:403] = 0.0
    m = measure_region(depth, K, (400, 100, 400, 100), SIZE)
    assert (m.depth_m, m.n_valid) == (3.0, 5)


@pytest.mark.parametrize("region", [(400, 100, 400, 100), (199.5, 99.5, 399.5, 299.5)])
def test_a_lower_resolution_depth_map_gives_the_same_point(region):
    k_low = K.resized(320, 240)
    for scene in (slanted, wall_with_object):
        full = measure_region(scene(K), K, region, SIZE)
        low = measure_region(scene(k_low), k_low, region, SIZE)
        np.testing.assert_allclose(low.point, full.point, rtol=0.01)
        assert low.region_px == full.region_px


def test_no_valid_depth_gives_nan_and_a_reason():
    depth = np.full((480, 640), np.nan, dtype=np.float32)
    for region in [(400, 100, 400, 100), (0, 0, 100, 100)]:
        m = measure_region(depth, K, region, SIZE)
        assert math.isnan(m.depth_m) and math.isnan(m.distance_m) and all(math.isnan(c) for c in m.point)
        assert m.n_valid == 0 and "no valid depth" in m.method


def test_bad_region_and_depth_shape_are_rejected():
    with pytest.raises(InputError, match="4 finite numbers"):
        measure_region(slanted(), K, (0, 0, math.nan, 1), SIZE)
    with pytest.raises(InputError, match="intrinsics describe 640x480"):
        measure_region(np.ones((240, 320), np.float32), K, (0, 0, 1, 1), SIZE)


# -- answers ---------------------------------------------------------------------------------------------


def test_answer_measures_the_first_place_named():
    text = ('```json\n[{"bbox_2d": [312.5, 208.3, 625, 625], "label": "chair"}, '
            '{"point_2d": [900, 900], "label": "lamp"}]\n```')
    q = answer_measurement(text, wall_with_object(), K, SIZE)
    assert q is not None and q.grounding.label == "chair" and q.n_groundings == 2
    assert q.measurement.depth_m == pytest.approx(2.0, rel=0.05)
    assert q.measurement.region_px == pytest.approx((199.5, 99.5, 399.5, 299.5), abs=0.1)
    assert "box [199.5, 99.5, 399.5, 299.5]" in q.message and "'chair'" in q.message and "first of 2" in q.message


def test_answer_with_no_place_or_no_depth():
    assert answer_measurement("It is about two metres away.", slanted(), K, SIZE) is None
    q = answer_measurement('{"point_2d": [500, 500]}', np.full((480, 640), np.nan, np.float32), K, SIZE)
    assert q is not None and math.isnan(q.measurement.distance_m) and "could not measure" in q.message


# -- depth at pixels -------------------------------------------------------------------------------------


def test_depth_at_pixels_matches_back_projection_at_any_depth_resolution():
    u, v = [0, 639, 320, 17], [0, 479, 240, 401]
    z, points = depth_at_pixels(slanted(), K, u, v, SIZE)
    assert z.dtype == np.float32 and points.shape == (4, 3) and points.dtype == np.float64
    for i in range(4):
        np.testing.assert_allclose(points[i], pixel_to_point(u[i], v[i], float(z[i]), K), rtol=1e-6)
    k_low = K.resized(320, 240)
    z_low, points_low = depth_at_pixels(slanted(k_low), k_low, np.array(u, np.int32), np.array(v, np.int32), SIZE)
    np.testing.assert_allclose(points_low, points, rtol=0.01)


def test_depth_at_invalid_pixels_is_nan():
    depth = slanted()
    depth[5, 7], depth[6, 8] = np.nan, 0.0
    z, points = depth_at_pixels(depth, K, [7, 8, 9], [5, 6, 7], SIZE)
    assert np.isnan(z[:2]).all() and np.isnan(points[:2]).all() and np.isfinite(points[2]).all()


@pytest.mark.parametrize(("u", "v", "says"), [
    ([1, 2], [1], "same length, got 2 and 1"),
    ([], [], r"need 1\.\.100 pixels, got 0"),
    (list(range(101)), list(range(101)), r"need 1\.\.100 pixels, got 101"),
    ([1, 640, 700], [1, 1, 1], r"u\[1\] = 640 is outside the image \(0 <= u < 640\)"),
    ([1, 2], [3, -1], r"v\[1\] = -1 is outside the image \(0 <= v < 480\)"),
    ([1.5], [1], r"u\[0\] = 1.5 is not an integer"),
    (["a"], [1], "u must be a list of integer pixels"),
    ([[1]], [[1]], "u must be a list of integer pixels"),
])
def test_depth_at_rejects_bad_pixel_lists(u, v, says):
    with pytest.raises(InputError, match=says):
        depth_at_pixels(slanted(), K, u, v, SIZE, max_pixels=100)
