"""The ``depthvlm`` command as a user runs it: separate processes, real files, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import SAMPLE_CAMERA, SAMPLE_IMAGE


def depthvlm(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "depthvlm_ros", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


@pytest.mark.processes
def test_predict_writes_five_consistent_files_per_image(tmp_path, tiny_checkpoint):
    second = tmp_path / "second.jpg"
    Image.open(SAMPLE_IMAGE).resize((160, 120)).save(second)  # same camera, half resolution: K scaled
    out = tmp_path / "out"
    run = depthvlm("predict", str(SAMPLE_IMAGE), str(second), "--camera-info", str(SAMPLE_CAMERA),
                   "--model", str(tiny_checkpoint), "--out", str(out))
    assert run.returncode == 0, run.stderr
    for name, (w, h) in (("sample_room", (320, 240)), ("second", (160, 120))):
        files = {p.name for p in out.glob(f"{name}*")}
        assert files == {f"{name}_depth.npy", f"{name}_depth.png", f"{name}_depth_color.png", f"{name}.ply",
                         f"{name}.json"}
        depth = np.load(out / f"{name}_depth.npy")
        assert depth.shape == (h, w) and depth.dtype == np.float32
        mm = np.asarray(Image.open(out / f"{name}_depth.png"))
        assert mm.dtype in (np.uint16, np.int32) and mm.shape == (h, w)
        np.testing.assert_allclose(mm / 1000.0, depth, atol=0.0006)  # 16-bit millimetres
        color = np.asarray(Image.open(out / f"{name}_depth_color.png"))
        assert color.shape[0] == h and color.shape[1] > w and color.shape[2] == 3  # image + scale bar
        summary = json.loads((out / f"{name}.json").read_text())
        fx = 300.0 * w / 320
        assert summary["camera"]["K"][0][0] == pytest.approx(fx)
        assert summary["camera"]["size"] == [w, h]
        assert set(summary["timings_ms"]) == {"preprocess", "vision", "llm", "head", "postprocess"}
        assert summary["depth"]["valid_pixels"] == w * h

    import open3d as o3d

    cloud = o3d.io.read_point_cloud(str(out / "sample_room.ply"))
    points = np.asarray(cloud.points)
    assert len(points) == 320 * 240 and cloud.has_colors()
    depth = np.load(out / "sample_room_depth.npy")
    np.testing.assert_allclose(np.sort(points[:, 2]), np.sort(depth.ravel()), rtol=1e-5)


@pytest.mark.processes
def test_default_model_is_the_shipped_depthvlm_tiny(tmp_path):
    run = depthvlm("predict", str(SAMPLE_IMAGE), "--fx", "300", "--out", str(tmp_path / "o"),
                   env={"DEPTHVLM_CACHE": str(tmp_path / "cache")})
    assert run.returncode == 0, run.stderr
    from depthvlm_ros.model.default import BUILTIN_NOTE

    assert "initialised" not in run.stderr  # a trained model
    # ... which has never seen a real photograph: said once, in one line, at start
    assert run.stderr.count(BUILTIN_NOTE) == 1 and run.stderr.splitlines()[0] == f"note: {BUILTIN_NOTE}"
    assert not (tmp_path / "cache").exists()  # nothing generated, nothing downloaded
    summary = json.loads((tmp_path / "o" / "sample_room.json").read_text())
    assert summary["model"] == "depthvlm-tiny"
    assert len(list((tmp_path / "o").iterdir())) == 5


@pytest.mark.processes
def test_ask_prints_the_models_answer(tiny_checkpoint, tiny_model):
    from depthvlm_ros.geometry import Intrinsics
    from depthvlm_ros.tools.ask import NO_TEXT

    question = "How far is the red ball?"
    run = depthvlm("ask", str(SAMPLE_IMAGE), question, "--camera-info", str(SAMPLE_CAMERA),
                   "--model", str(tiny_checkpoint), "--max-new-tokens", "4")
    assert run.returncode == 0, run.stderr
    rgb = np.asarray(Image.open(SAMPLE_IMAGE).convert("RGB"))
    expected = tiny_model.ask(rgb, Intrinsics.from_yaml(SAMPLE_CAMERA), question, max_new_tokens=4).text
    assert run.stdout.splitlines() == [expected or NO_TEXT]
    assert "tokens" in run.stderr


@pytest.mark.processes
def test_bench_prints_a_table_and_json(tiny_checkpoint):
    run = depthvlm("bench", "--model", str(tiny_checkpoint), "--size", "320x256", "--warmup", "1", "--runs", "3")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    stages = report["backends"]["torch"]["stages"]
    assert set(stages) == {"preprocess", "vision", "llm", "head", "postprocess", "total"}
    assert all(s["median_ms"] <= s["p90_ms"] and s["n"] == 3 for s in stages.values())
    assert report["input_size"] == [320, 256] and report["model_size"] == [320, 256]
    assert "median ms" in run.stdout


@pytest.mark.parametrize(("args", "message", "code"), [
    (["predict", "missing.png", "--fx", "300"], "no such image", 2),
    (["predict", "CORRUPT", "--fx", "300"], "cannot read image", 2),
    (["predict", str(SAMPLE_IMAGE), "--fx", "0"], "positive", 2),
    (["predict", str(SAMPLE_IMAGE), "--fx", "nan"], "finite", 2),
    (["predict", str(SAMPLE_IMAGE)], "--fx", 2),
    (["predict", str(SAMPLE_IMAGE), "--fx", "300", "--model", "BROKEN"], "missing keys: depth_head.norm.weight", 3),
    (["ask", str(SAMPLE_IMAGE), "", "--fx", "300", "--model", "MODEL"], "question is empty", 2),
])
@pytest.mark.processes
def test_bad_input_is_one_line_exit_2_and_a_broken_model_folder_exit_3(tmp_path, tiny_checkpoint, args, message,
                                                                        code):
    from safetensors.torch import load_file, save_file

    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not a png at all")
    broken = tmp_path / "broken"
    if "BROKEN" in args:
        import shutil

        shutil.copytree(tiny_checkpoint, broken)
        state = load_file(broken / "model.safetensors")
        del state["depth_head.norm.weight"]
        save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    subst = {"CORRUPT": str(corrupt), "BROKEN": str(broken), "MODEL": str(tiny_checkpoint)}
    run = depthvlm(*[subst.get(a, a) for a in args], "--out", str(tmp_path / "o")) if args[0] == "predict" \
        else depthvlm(*[subst.get(a, a) for a in args])
    assert run.returncode == code, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip() and not line.startswith("note:")]
    assert len(lines) == 1 and lines[0].startswith("depthvlm: error:"), run.stderr
    assert message in lines[0]
    assert "Traceback" not in run.stderr


@pytest.mark.processes
def test_the_cli_runs_without_ros(tmp_path):
    """A GPU server or a training machine has no ROS: every subcommand's options parse and the model tools run
    with rclpy not importable (ROS is imported only by the subcommands that talk to ROS)."""
    code = ("import sys; sys.modules['rclpy'] = None\n"
            "from depthvlm_ros.tools.cli import build_parser, main\n"
            "build_parser()\n"
            "sys.exit(main(['predict', sys.argv[1], '--fx', '300', '--out', sys.argv[2]]))")
    run = subprocess.run([sys.executable, "-c", code, str(SAMPLE_IMAGE), str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert any((tmp_path / "out").glob("*.npy")) or any((tmp_path / "out").iterdir())



@pytest.mark.slow
def test_bench_compile_default_is_one_graph_with_the_eager_depth(tmp_path):
    """``depthvlm bench --compile default`` on the built-in model: the compiled depth forward is one graph (0 graph
    breaks), its depth equals eager PyTorch's (measured beside it) within 1e-4, and a CPU run says why it counts no
    host syncs. (Compiling takes about a minute on one core.)"""
    from depthvlm_ros.tools.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "--compile", "default", "--size", "128x96", "--warmup", "1", "--runs", "2",
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    compiled = report["compile"]
    assert compiled["mode"] == "default" and compiled["graph_breaks"] == 0 and compiled["graphs"] == 1
    assert compiled["depth_max_rel_vs_eager"] < 1e-4
    assert set(report["backends"]) == {"torch", "torch_eager"}
    assert set(report["backends"]["torch"]["stages"]) == {"preprocess", "model", "postprocess", "total"}
    assert {"vision", "llm", "head"} < set(report["backends"]["torch_eager"]["stages"])
    for entry in report["backends"].values():
        assert entry["host_syncs_per_frame"] is None and "CUDA only" in entry["host_syncs_reason"]


def test_bench_compile_graphs_off_cuda_is_one_line_exit_3(capsys):
    from depthvlm_ros.tools.cli import main

    assert main(["bench", "--compile", "graphs", "--size", "128x96", "--runs", "1"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("depthvlm: error: compile graphs (CUDA graphs) needs a CUDA device, the model is on cpu: use "
                       "compile default or none")
