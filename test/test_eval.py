"""``depthvlm eval``: hand-computed metrics, conventions, bad input, and end-to-end runs on a tiny benchmark."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from depthvlm_ros.errors import InputError
from depthvlm_ros.evaluation.benchmark_data import (
    align_to_grid,
    find_preset,
    iter_records,
    parse_dataset_spec,
    parse_record,
    same_aspect,
)
from depthvlm_ros.evaluation.metrics import (
    METRIC_KEYS,
    DepthRange,
    mean_metrics,
    pair_metrics,
    sample_nearest,
    score_dense,
    score_depths,
    score_sparse,
)

# -- metrics by hand ----------------------------------------------------------------------------


def test_metrics_by_hand():
    m = pair_metrics(np.array([1.0, 2.0, 4.0]), np.array([1.0, 1.0, 4.0]))
    ln2 = math.log(2.0)
    expected = {
        "delta1": 2 / 3, "delta2": 2 / 3, "delta3": 2 / 3,  # ratios 1, 2, 1; 2 > 1.25**3 = 1.953
        "abs_rel": (0 + 1 + 0) / 3,
        "sq_rel": (0 + 1 / 1 + 0) / 3,
        "rmse": math.sqrt((0 + 1 + 0) / 3),
        "rmse_log": math.sqrt(ln2**2 / 3),
        "log10": math.log10(2.0) / 3,
        "silog": math.sqrt(ln2**2 / 3 - (ln2 / 3) ** 2) * 100,  # = 100 * ln2 * sqrt(2) / 3
    }
    assert set(m) == set(METRIC_KEYS)
    for key, value in expected.items():
        assert m[key] == pytest.approx(value, rel=1e-12), key


def test_delta_thresholds_are_strict_and_symmetric():
    # ratios max(p/g, g/p): 1.3, 1.6, 2.0 (under-prediction), 3.0
    m = pair_metrics(np.array([1.3, 1.6, 0.5, 3.0]), np.array([1.0, 1.0, 1.0, 1.0]))
    assert m["delta1"] == 0.0
    assert m["delta2"] == pytest.approx(1 / 4)  # 1.3 < 1.5625
    assert m["delta3"] == pytest.approx(2 / 4)  # 1.3, 1.6 < 1.953125
    assert pair_metrics(np.array([1.25]), np.array([1.0]))["delta1"] == 0.0  # "< 1.25", not "<="
    # silog ignores a global scale; abs_rel does not
    scaled = pair_metrics(np.array([2.0, 4.0, 8.0]) * 1.7, np.array([2.0, 4.0, 8.0]))
    assert scaled["silog"] == pytest.approx(0.0, abs=1e-5) and scaled["abs_rel"] == pytest.approx(0.7)


def test_invalid_gt_and_predictions_are_masked_and_missing_predictions_reported():
    gt = np.array([np.nan, 0.0, 1.0, 2.0, 4.0, 20.0])
    pred = np.array([5.0, 5.0, np.nan, 2.0, 4.0, 99.0])
    score = score_depths(pred, gt, DepthRange(0.005, 10.0))
    # GT-valid: 1, 2, 4 (NaN, 0 and out-of-range 20 m ignored); scored: 2 and 4 (prediction NaN at 1)
    assert (score.n_gt_valid, score.n_scored) == (3, 2)
    assert score.pred_missing == pytest.approx(1 / 3)
    assert score.metrics["delta1"] == 1.0 and score.metrics["abs_rel"] == 0.0
    # without a range the 20 m pixel counts: abs_rel = (0 + 0 + 79/20) / 3
    unranged = score_depths(pred, gt)
    assert unranged.n_scored == 3
    assert unranged.metrics["abs_rel"] == pytest.approx((79 / 20) / 3)
    # non-positive predictions are excluded too, and nothing left -> no metrics
    nothing = score_depths(np.array([0.0, -1.0, np.inf]), np.array([1.0, 2.0, 3.0]))
    assert nothing.metrics is None and nothing.pred_missing == 1.0


def test_mean_metrics_averages_per_item_and_skips_none():
    a = {k: 1.0 for k in METRIC_KEYS}
    b = {k: 0.0 for k in METRIC_KEYS}
    assert mean_metrics([a, None, b]) == {k: 0.5 for k in METRIC_KEYS}
    assert mean_metrics([None]) is None


# -- the sparse coordinate convention -----------------------------------------------------------


def test_sparse_coords_are_col_row_on_the_depth_grid():
    height, width = 3, 5  # non-square, so [row, col] would read other pixels
    pred = 1.0 + np.arange(height * width, dtype=np.float32).reshape(height, width)
    coords = np.array([[1, 2], [2, 1], [0, 1]], dtype=np.float64)  # [col, row]
    gt_values = [pred[2, 1], pred[1, 2], pred[1, 0]]  # 12, 8, 6
    score = score_sparse(pred, coords, gt_values)
    assert score.metrics["delta1"] == 1.0 and score.metrics["abs_rel"] == 0.0
    transposed = [pred[1, 2], pred[2, 1], pred[0, 1]]  # what reading [row, col] would see
    assert score_sparse(pred, coords, transposed).metrics["abs_rel"] > 0.1
    # [col, row] = [4, 2] is on the 5x3 grid; [2, 4] is not
    assert sample_nearest(pred, np.array([[4.0, 2.0]]))[0] == pred[2, 4]
    with pytest.raises(InputError, match="outside the 5x3 depth map"):
        sample_nearest(pred, np.array([[2.0, 4.0]]))


def test_sparse_coords_read_the_nearest_pixel():
    pred = 1.0 + np.arange(15, dtype=np.float32).reshape(3, 5)
    # pixel centres at integers: 1.4 -> 1, 0.6 -> 1, 1.5 -> 2 (half up), -0.5 -> 0
    values = sample_nearest(pred, np.array([[1.4, 0.6], [1.5, 0.5], [-0.5, -0.5]]))
    np.testing.assert_array_equal(values, [pred[1, 1], pred[1, 2], pred[0, 0]])
    with pytest.raises(InputError):
        sample_nearest(pred, np.array([[-0.6, 0.0]]))


# -- dense resizing -----------------------------------------------------------------------------


def smooth_field(width: int, height: int) -> np.ndarray:
    """A linear depth field (metres) over the image, sampled at pixel centres of a W x H grid."""
    u = (np.arange(width) + 0.5) / width
    v = (np.arange(height) + 0.5) / height
    return (2.0 + 1.0 * u[None, :] + 0.5 * v[:, None]).astype(np.float32)


def test_half_resolution_prediction_scores_like_the_full_one():
    gt = smooth_field(40, 30)
    full = score_dense(align_to_grid(gt, 40, 30), gt)
    half = score_dense(align_to_grid(smooth_field(20, 15), 40, 30), gt)
    assert full.metrics["abs_rel"] == 0.0
    assert half.metrics["delta1"] == 1.0
    assert half.metrics["abs_rel"] < 2e-3  # only the border pixels (clamped interpolation) differ
    assert half.n_scored == 40 * 30


def test_prediction_of_another_aspect_is_refused():
    with pytest.raises(InputError, match="different aspect ratio"):
        align_to_grid(smooth_field(20, 20), 40, 30)
    assert same_aspect((640, 480), (213, 160))  # 480 * 213 / 640 = 159.75: a rounded side
    assert not same_aspect((64, 48), (48, 48))


# -- presets, specs and records -----------------------------------------------------------------


@pytest.mark.parametrize(("name", "preset", "group"), [
    ("scannetpp", "ScanNet++", "indoor"), ("ScanNet++", "ScanNet++", "indoor"), ("sunrgbd", "SUN RGB-D", "indoor"),
    ("SUN RGB-D", "SUN RGB-D", "indoor"), ("ibims", "iBims-1", "indoor"), ("iBims-1", "iBims-1", "indoor"),
    ("nyuv2", "NYUv2", "indoor"), ("NYU-v2", "NYUv2", "indoor"), ("argoverse2", "Argoverse2", "outdoor"),
    ("argo2", "Argoverse2", "outdoor"), ("WAYMO", "Waymo", "outdoor"), ("ddad", "DDAD", "outdoor"),
    ("nuscenes", "nuScenes", "outdoor"), ("eth3d", "ETH3D", "mixed"),
])
def test_preset_names_match_loosely(name, preset, group):
    found = find_preset(name)
    assert found is not None and found.name == preset and found.group == group


def test_preset_ranges():
    ranges = {p: (find_preset(p).min_m, find_preset(p).max_m) for p in (
        "argoverse2", "waymo", "ddad", "nuscenes", "eth3d", "scannetpp", "sunrgbd", "ibims", "nyuv2")}
    assert ranges == {
        "argoverse2": (0.05, 120.0), "waymo": (0.05, 70.0), "ddad": (0.05, 120.0), "nuscenes": (0.05, 80.0),
        "eth3d": (0.01, 50.0), "scannetpp": (0.001, 10.0), "sunrgbd": (0.005, 8.0), "ibims": (0.005, 25.0),
        "nyuv2": (0.005, 10.0),
    }
    assert find_preset("kitti") is None and find_preset("scannet") is None


def test_dataset_spec_parsing(tmp_path):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("")
    spec = parse_dataset_spec(f"SUN RGB-D={jsonl},{tmp_path},{tmp_path}")
    assert (spec.depth_range.min_m, spec.depth_range.max_m, spec.group) == (0.005, 8.0, "indoor")
    given = parse_dataset_spec(f"nyuv2={jsonl},{tmp_path},{tmp_path},0.1,5")
    assert (given.depth_range.min_m, given.depth_range.max_m, given.range_source) == (0.1, 5.0, "--dataset")
    unknown = parse_dataset_spec(f"mycam={jsonl},{tmp_path},{tmp_path}")
    assert not unknown.has_range and unknown.group is None and "gt > 0" in unknown.range_source
    for bad in ("nyuv2", f"={jsonl},{tmp_path},{tmp_path}", f"x={jsonl},{tmp_path}",
                f"x={jsonl},{tmp_path},{tmp_path},1", f"x={jsonl},{tmp_path},{tmp_path},5,1",
                f"x={jsonl},{tmp_path},{tmp_path},a,b", f"x={tmp_path / 'nope.jsonl'},{tmp_path},{tmp_path}",
                f"x={jsonl},{tmp_path / 'nope'},{tmp_path}"):
        with pytest.raises(InputError):
            parse_dataset_spec(bad)


@pytest.mark.processes
def test_records_are_validated_one_by_one(tmp_path):
    good = record_dict("a.png", "a.png", 1000.0, (8, 6), (8, 6), 10.0, [[1, 2]], [1.5])
    lines = [json.dumps(good), "{not json", json.dumps({**good, "image": "b.png", "depth": [1.0, 2.0]}),
             "", json.dumps({k: v for k, v in good.items() if k != "original_fx"} | {"image": "c.png"}),
             json.dumps({**good, "image": "d.png", "depth_type": "ray_depth"})]
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(lines) + "\n")
    items = list(iter_records(path))
    assert len(items) == 5  # the blank line is not a record
    assert items[0].pixel_coords.tolist() == [[1.0, 2.0]] and items[0].depth_size == (8, 6)
    assert [getattr(i, "reason", None) is not None for i in items] == [False, True, True, True, True]
    assert items[1].label == "line 2" and "malformed JSON" in items[1].reason
    assert items[2].label == "b.png" and "1 pixel_coords but 2 depth values" in items[2].reason
    assert "missing field original_fx" in items[3].reason
    assert "depth_type" in items[4].reason
    assert len(list(iter_records(path, limit=2))) == 2
    with pytest.raises(InputError, match="pixel_coords"):
        parse_record({**good, "pixel_coords": [[1, 2, 3]]}, 1)


# -- a tiny benchmark on disk -------------------------------------------------------------------


def record_dict(image, depth_path, scale, rgb_size, depth_size, fx, coords, depth) -> dict:
    w, h = rgb_size
    return {
        "image": image, "depth_path": depth_path, "depth_scale": scale, "original_rgb_size": list(rgb_size),
        "original_depth_size": list(depth_size), "original_fx": fx, "canonical_fx": 1000,
        "canonical_size": [round(w * 1000 / fx), round(h * 1000 / fx)], "prompt": "How far is the point?",
        "solution": "x m", "pixel_coords": coords, "depth": depth, "depth_type": "z_depth", "scene_id": "s",
    }


#: name -> (RGB size, depth size, depth_scale, [(image, fx)], depth field in metres (u, v in 0..1))
BENCH = {
    "NYUv2": ((64, 48), (64, 48), 1000.0, [("scene1/000001.png", 200.0), ("scene1/000002.png", 200.0),
                                            ("scene2/000003.png", 250.0)], lambda u, v: 1.0 + 3.0 * u + 2.0 * v),
    "argo2": ((96, 72), (48, 36), 256.0, [("log7/000010.png", 300.0), ("log7/000011.png", 300.0)],
              lambda u, v: 5.0 + 40.0 * u + 20.0 * v),
}


def make_benchmark(root: Path) -> dict[str, dict]:
    """Two datasets of RGB PNGs, 16-bit depth PNGs and a JSONL each; NYUv2 also has a record with a
    missing depth file and a malformed line. Returns per dataset its spec and GT maps (metres)."""
    out = {}
    for d_index, (name, (rgb_size, depth_size, scale, images, field_fn)) in enumerate(BENCH.items()):
        rgb_root, depth_root = root / name / "rgb", root / name / "depth"
        dw, dh = depth_size
        u, v = np.meshgrid((np.arange(dw) + 0.5) / dw, (np.arange(dh) + 0.5) / dh)
        lines, gts = [], {}
        for i, (image, fx) in enumerate(images):
            raw = np.rint(field_fn(u, v) * (1 + 0.05 * i) * scale).astype(np.uint16)
            raw[:3, :4] = 0  # an invalid corner
            depth_rel = str(Path(image).with_suffix(".png"))
            (depth_root / depth_rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(raw).save(depth_root / depth_rel)
            gt = raw.astype(np.float32) / np.float32(scale)
            gt[raw == 0] = np.nan
            gts[image] = gt
            rng = np.random.default_rng(10 * d_index + i)
            rgb = rng.integers(0, 255, (rgb_size[1], rgb_size[0], 3), dtype=np.uint8)
            (rgb_root / image).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rgb).save(rgb_root / image)
            coords = [[dw - 1, dh - 1], [5, 3], [dw // 2, 7], [10, dh - 2]]  # [col, row]
            lines.append(json.dumps(record_dict(image, depth_rel, scale, rgb_size, depth_size, fx, coords,
                                                [float(gt[r, c]) for c, r in coords])))
        if name == "NYUv2":
            lines.insert(1, json.dumps(record_dict("scene1/missing.png", "scene1/missing.png", scale, rgb_size,
                                                   depth_size, 200.0, [[1, 1]], [1.0])))
            lines.append('{"image": "broken.png", "depth_path": ')
        jsonl = root / name / "test.jsonl"
        jsonl.write_text("\n".join(lines) + "\n")
        out[name] = {"spec": f"{name}={jsonl},{rgb_root},{depth_root}", "gts": gts}
    return out


def write_predictions(folder: Path, bench: dict[str, dict], factor: float) -> None:
    """GT x ``factor`` as saved predictions, in each of the accepted layouts."""
    for name, data in bench.items():
        for i, (image, gt) in enumerate(data["gts"].items()):
            pred = gt * np.float32(factor)
            stem = Path(image).with_suffix("")
            if name == "argo2" and i == 1:  # the flat name
                path = folder / f"{stem.name}.npy"
            else:
                path = folder / f"{stem}.npy"
            path.parent.mkdir(parents=True, exist_ok=True)
            if name == "NYUv2" and i == 2 and factor == 1.0:  # 16-bit millimetre PNG (exact for mm GT)
                Image.fromarray(np.rint(np.nan_to_num(pred) * 1000).astype(np.uint16)).save(path.with_suffix(".png"))
            else:
                np.save(path, pred.astype(np.float32))


def depthvlm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "depthvlm_ros", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ})


DATASET_KEYS = {"sparse", "dense", "n_images", "n_skipped", "skipped", "group", "valid_range_m", "range_source",
                "pred_missing", "temporal"}  # temporal: null for datasets without sequences


def check_structure(report: dict, groups: set[str]) -> None:
    assert set(report) == {"datasets", "groups", "overall", "run"}
    assert set(report["datasets"]) == set(BENCH)
    for d in report["datasets"].values():
        assert set(d) == DATASET_KEYS and d["temporal"] is None
        for protocol in ("sparse", "dense"):
            assert list(d[protocol]) == list(METRIC_KEYS)
            assert all(isinstance(v, float) and math.isfinite(v) for v in d[protocol].values())
    assert set(report["groups"]) == groups
    for entry in (*report["groups"].values(), report["overall"]):
        assert set(entry) == {"sparse", "dense", "datasets"}
        assert list(entry["sparse"]) == list(METRIC_KEYS) and list(entry["dense"]) == list(METRIC_KEYS)


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    root = tmp_path_factory.mktemp("bench")
    return root, make_benchmark(root)


@pytest.mark.processes
def test_saved_perfect_predictions_score_perfectly_and_the_cache_resumes(bench, tmp_path):
    root, data = bench
    preds = tmp_path / "preds"
    write_predictions(preds, data, 1.0)
    specs = [a for d in data.values() for a in ("--dataset", d["spec"])]
    out = tmp_path / "out"
    run = depthvlm("eval", *specs, "--predictions", str(preds), "--json", str(out / "r.json"), "--markdown",
                   str(out / "r.md"), "--plots", str(out / "plots"), "--cache", str(tmp_path / "cache"), "--worst", "2")
    assert run.returncode == 0, run.stderr
    report = json.loads((out / "r.json").read_text())
    check_structure(report, {"indoor", "outdoor"})
    nyu, argo = report["datasets"]["NYUv2"], report["datasets"]["argo2"]
    assert (nyu["n_images"], nyu["n_skipped"], argo["n_images"], argo["n_skipped"]) == (3, 2, 2, 0)
    reasons = {s["image"]: s["reason"] for s in nyu["skipped"]}
    assert "missing file" in reasons["scene1/missing.png"] and "malformed JSON" in reasons["line 5"]
    assert "skipped scene1/missing.png: missing file" in run.stderr
    assert (nyu["group"], nyu["valid_range_m"], argo["group"], argo["valid_range_m"]) == (
        "indoor", [0.005, 10.0], "outdoor", [0.05, 120.0])
    for entry in (nyu, argo, report["groups"]["indoor"], report["groups"]["outdoor"], report["overall"]):
        for protocol in ("sparse", "dense"):
            assert entry[protocol]["delta1"] == 1.0 and entry[protocol]["abs_rel"] == 0.0
            assert entry[protocol]["rmse"] == 0.0 and entry[protocol]["silog"] == 0.0
    assert nyu["pred_missing"] == {"sparse": 0.0, "dense": 0.0}
    assert report["overall"]["datasets"] == ["NYUv2", "argo2"] and report["run"]["cache_hits"] == 0

    markdown = (out / "r.md").read_text()
    assert markdown in run.stdout
    assert "| dataset | group | images | skipped | delta1 |" in markdown and "**overall**" in markdown
    assert "| NYUv2 | indoor | 3 | 2 | 1.000 |" in markdown
    plots = {p.name for p in (out / "plots").iterdir()}
    assert plots == {"delta1_by_dataset.png", "abs_rel_vs_depth_NYUv2.png", "abs_rel_vs_depth_argo2.png",
                     "worst_NYUv2.png", "worst_argo2.png"}
    for name in plots:
        with Image.open(out / "plots" / name) as img:
            assert img.format == "PNG" and min(img.size) > 100

    # the rerun reads every scored image from the cache: the same prediction files, the same numbers
    again = depthvlm("eval", *specs, "--predictions", str(preds), "--json", str(out / "again.json"),
                     "--cache", str(tmp_path / "cache"))
    assert again.returncode == 0, again.stderr
    second = json.loads((out / "again.json").read_text())
    assert second["run"]["cache_hits"] == 5 and second["run"]["computed"] == 0
    assert second["datasets"] == report["datasets"] and second["overall"] == report["overall"]

    # predictions rewritten in place (same names, other content) are scored again, never the old numbers
    shutil.rmtree(preds)
    write_predictions(preds, data, 1.3)
    third = depthvlm("eval", *specs, "--predictions", str(preds), "--json", str(out / "third.json"),
                     "--cache", str(tmp_path / "cache"))
    assert third.returncode == 0, third.stderr
    rescored = json.loads((out / "third.json").read_text())
    assert rescored["run"]["cache_hits"] == 0 and rescored["run"]["computed"] == 5
    assert rescored["overall"]["dense"]["delta1"] < 0.5


def test_scaled_predictions_fail_delta1_everywhere(bench, tmp_path, capsys):
    from depthvlm_ros.tools.cli import main

    root, data = bench
    preds = tmp_path / "preds"
    write_predictions(preds, data, 1.3)
    argo_spec = data["argo2"]["spec"].split("=", 1)[1]
    rc = main(["eval", "--dataset", data["NYUv2"]["spec"], "--dataset", data["argo2"]["spec"],
               "--dataset", f"mycam={argo_spec}", "--group", "mycam=outdoor", "--predictions", str(preds),
               "--json", str(tmp_path / "r.json")])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    report = json.loads((tmp_path / "r.json").read_text())
    for entry in (*report["datasets"].values(), report["overall"]):
        for protocol in ("sparse", "dense"):
            assert entry[protocol]["delta1"] == 0.0
            assert entry[protocol]["abs_rel"] == pytest.approx(0.3, abs=1e-6)
    mycam = report["datasets"]["mycam"]
    assert mycam["valid_range_m"] is None and "gt > 0" in mycam["range_source"] and mycam["group"] == "outdoor"
    assert report["groups"]["outdoor"]["datasets"] == ["argo2", "mycam"]
    assert "mycam: no preset depth range" in captured.out

    rc = main(["eval", "--dataset", data["NYUv2"]["spec"], "--predictions", str(preds), "--limit", "2",
               "--json", str(tmp_path / "limited.json")])
    assert rc == 0
    limited = json.loads((tmp_path / "limited.json").read_text())["datasets"]["NYUv2"]
    assert (limited["n_images"], limited["n_skipped"]) == (1, 1)  # first two records: one good, one missing


def test_model_batches_by_canonical_size(bench, monkeypatch):
    from depthvlm_ros.evaluation.benchmark_data import parse_dataset_spec
    from depthvlm_ros.evaluation.evaluator import DatasetEvaluator, PredictionSource
    from depthvlm_ros.geometry import canonical_size

    root, data = bench
    calls = []

    def predict(images, intrinsics):
        calls.append(sorted({canonical_size(k) for k in intrinsics}) + [len(images)])
        return [np.full(img.shape[:2], 2.0, dtype=np.float32) for img in images]

    source = PredictionSource("fake", predict=predict, batch_size=2)
    results = DatasetEvaluator(parse_dataset_spec(data["NYUv2"]["spec"]), source, None, worst=0).run(None)
    assert calls == [[(320, 240), 2], [(256, 192), 1]]  # fx 200, 200 -> one batch; fx 250 flushed at the end
    assert len(results.images) == 3 and len(results.skipped) == 2


def test_prediction_of_another_aspect_is_a_skipped_record(bench):
    from depthvlm_ros.evaluation.benchmark_data import parse_dataset_spec
    from depthvlm_ros.evaluation.evaluator import DatasetEvaluator, PredictionSource

    root, data = bench
    source = PredictionSource("square", predict=lambda images, ks: [np.ones((32, 32), np.float32)] * len(images))
    results = DatasetEvaluator(parse_dataset_spec(data["argo2"]["spec"]), source, None, worst=2).run(None)
    assert results.images == [] and len(results.skipped) == 2
    assert all("different aspect ratio" in s.reason for s in results.skipped)


@pytest.mark.processes
def test_model_run_end_to_end(bench, tmp_path, tiny_checkpoint):
    root, data = bench
    specs = [a for d in data.values() for a in ("--dataset", d["spec"])]
    run = depthvlm("eval", *specs, "--model", str(tiny_checkpoint), "--batch-size", "2", "--json",
                   str(tmp_path / "r.json"), "--plots", str(tmp_path / "plots"), "--worst", "1")
    assert run.returncode == 0, run.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    check_structure(report, {"indoor", "outdoor"})
    assert report["datasets"]["NYUv2"]["n_images"] == 3 and report["datasets"]["NYUv2"]["n_skipped"] == 2
    assert report["datasets"]["argo2"]["n_images"] == 2
    assert report["run"]["source"].startswith("model:")
    assert (tmp_path / "plots" / "worst_argo2.png").is_file()


@pytest.mark.processes
def test_model_cache_is_keyed_by_the_weights_not_the_folder(bench, tmp_path, tiny_checkpoint):
    """Retraining in place (same folder, new weights) must not return the old scores."""
    from safetensors.torch import load_file, save_file

    root, data = bench
    model = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, model)
    specs = ["--dataset", data["argo2"]["spec"]]
    cache = ["--cache", str(tmp_path / "cache")]
    runs = []
    for _ in range(2):
        run = depthvlm("eval", *specs, "--model", str(model), *cache, "--json", str(tmp_path / "r.json"))
        assert run.returncode == 0, run.stderr
        runs.append(json.loads((tmp_path / "r.json").read_text()))
    assert runs[0]["run"]["computed"] == 2 and runs[1]["run"]["cache_hits"] == 2
    weights = load_file(str(model / "model.safetensors"))
    weights["depth_head.scratch.output_conv2.2.bias"] += 0.5  # "retrained": the head's output shifts
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    run = depthvlm("eval", *specs, "--model", str(model), *cache, "--json", str(tmp_path / "r.json"))
    assert run.returncode == 0, run.stderr
    retrained = json.loads((tmp_path / "r.json").read_text())
    assert retrained["run"]["cache_hits"] == 0 and retrained["run"]["computed"] == 2
    assert retrained["datasets"]["argo2"]["dense"] != runs[0]["datasets"]["argo2"]["dense"]


@pytest.mark.processes
def test_bad_dataset_spec_is_one_line_and_exit_code_2():
    run = depthvlm("eval", "--dataset", "nyuv2=only_one_path.jsonl", "--predictions", ".")
    assert run.returncode == 2
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("depthvlm: error: --dataset"), run.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--dataset", "x=MISSING,ROOT,ROOT", "--predictions", "ROOT"], "does not exist"),
    (["--dataset", "x=JSONL,ROOT,ROOT,1,0.5", "--predictions", "ROOT"], "MIN < MAX"),
    (["--dataset", "x=JSONL,ROOT,ROOT", "--predictions", "ROOT", "--model", "ROOT"], "not both"),
    (["--dataset", "x=JSONL,ROOT,ROOT", "--predictions", "ROOT", "--group", "y=indoor"], "no --dataset named"),
    (["--dataset", "x=JSONL,ROOT,ROOT", "--predictions", "ROOT", "--group", "x=underwater"], "--group"),
    (["--dataset", "x=JSONL,ROOT,ROOT", "--dataset", "x=JSONL,ROOT,ROOT", "--predictions", "ROOT"], "twice"),
    (["--predictions", "ROOT"], "at least one --dataset"),
])
def test_bad_arguments_are_input_errors(tmp_path, capsys, args, message):
    from depthvlm_ros.tools.cli import main

    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("")
    subst = {"JSONL": str(jsonl), "ROOT": str(tmp_path), "MISSING": str(tmp_path / "missing.jsonl")}
    for placeholder, value in subst.items():
        args = [a.replace(placeholder, value) for a in args]
    assert main(["eval", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("depthvlm: error:") and message in err[0], err


@pytest.mark.processes
@pytest.mark.slow
def test_two_processes_evaluate_exactly_what_one_does(tmp_path):
    """``torchrun``/``accelerate launch`` with two processes: each scores every other record, the main process
    merges them in record order and alone writes the report, which is byte for byte the one-process report
    (with the same CPU thread count: torchrun gives each process one thread, and float sums follow the
    threads). A malformed record is skipped and listed either way."""
    gen = tmp_path / "gen"
    made = subprocess.run([sys.executable, "-m", "depthvlm_ros", "generate", "--out", str(gen), "--n", "6", "--seed",
                           "3", "--size", "128x96"], capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    with open(gen / "depth.jsonl", "a") as f:
        f.write("{not a record\n")
    dataset = ["--dataset", f"gen={gen / 'depth.jsonl'},{gen},{gen}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    one = subprocess.run([sys.executable, "-m", "depthvlm_ros", "eval", *dataset, "--json", str(tmp_path / "one.json")],
                         capture_output=True, text=True, timeout=600, env=env)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "depthvlm_ros", "eval", *dataset, "--json", str(tmp_path / "two.json")],
                         capture_output=True, text=True, timeout=600, env=env)
    assert two.returncode == 0, two.stderr
    assert "by 2 processes" in two.stderr
    assert (tmp_path / "two.json").read_bytes() == (tmp_path / "one.json").read_bytes()
    assert two.stdout.count("# DepthVLM-Bench") == 1 and two.stdout == one.stdout  # the main process reports
    report = json.loads((tmp_path / "one.json").read_text())["datasets"]["gen"]
    assert report["n_images"] == 6 and report["n_skipped"] == 1
