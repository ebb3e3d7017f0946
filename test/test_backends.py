"""Compiled depth path: ONNX export + parity, backend selection, fixed sizes, engine sidecars."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from depthvlm_ros.backends import BackendError, BackendSpec, TorchBackend, create_backend
from depthvlm_ros.backends.onnx_export import export_onnx, max_relative_error, read_metadata
from depthvlm_ros.backends.onnxruntime_backend import OnnxRuntimeBackend
from depthvlm_ros.backends.probe import TOLERANCE, probe_path, read_probe
from depthvlm_ros.backends.tensorrt_backend import check_sidecar
from depthvlm_ros.geometry import Intrinsics
from depthvlm_ros.model.checkpoint import model_fingerprint

from conftest import SAMPLE_CAMERA, SAMPLE_IMAGE, alter_onnx_weights, scene_image


@pytest.fixture(scope="module")
def exports(tiny_model, tmp_path_factory):
    """The tiny model exported at two sizes (each export checks itself against PyTorch)."""
    out = tmp_path_factory.mktemp("onnx")
    reports = {size: export_onnx(tiny_model, *size, out / f"depth_{size[0]}x{size[1]}.onnx", check_images=1,
                                 progress=lambda _: None)
               for size in ((320, 256), (256, 320))}
    return reports


@pytest.fixture
def use_backend(tiny_model):
    """The tiny model (shared, not reloaded) with another backend."""
    return tiny_model.with_backend


@pytest.mark.model_core
def test_export_passes_checker_and_matches_pytorch_at_two_sizes(exports, tiny_checkpoint):
    import onnx

    for (width, height), report in exports.items():
        onnx.checker.check_model(report.path)
        assert report.max_rel_error < 1e-3 and report.checked_images == 1
        meta = read_metadata(report.path)
        assert meta["depthvlm.size"] == f"{width}x{height}"
        assert meta["depthvlm.model_fingerprint"] == model_fingerprint(tiny_checkpoint)
        graph = onnx.load(report.path, load_external_data=False).graph
        assert [i.name for i in graph.input] == ["pixel_values"] and [o.name for o in graph.output] == ["depth"]
        assert Path(report.path + ".json").is_file()


@pytest.mark.model_core
def test_onnxruntime_backend_equals_torch_through_the_whole_pipeline(exports, tiny_model, use_backend):
    k = Intrinsics.from_fx(320, 240, 1000.0)  # canonical 320x240 -> processed 320x256: an exported size
    rgb = scene_image(320, 240, 1000.0)
    want = tiny_model.predict_depth(rgb, k)
    model = use_backend(OnnxRuntimeBackend([r.path for r in exports.values()]))
    got = model.predict_depth(rgb, k)
    assert got.intrinsics_model == want.intrinsics_model
    assert max_relative_error(got.depth_model, want.depth_model) < 1e-4
    assert set(got.timings_ms) == {"preprocess", "model", "postprocess"}
    portrait = model.predict_depth(scene_image(240, 320, 1000.0), Intrinsics.from_fx(240, 320, 1000.0))
    assert portrait.intrinsics_model.size == (256, 320)  # the second session, chosen by size


def test_fixed_size_backend_resizes_and_rescales_depth_by_the_focal_ratio(exports, tiny_model, use_backend):
    # fx = 500 at 320x240 needs a 640x480 model grid; only 320x256 and 256x320 exist.
    k = Intrinsics.from_fx(320, 240, 500.0)
    rgb = scene_image(320, 240, 500.0)
    model = use_backend(OnnxRuntimeBackend([exports[(320, 256)].path]))
    got = model.predict_depth(rgb, k)
    mk = got.intrinsics_model
    assert mk.size == (320, 256) and mk.fx == pytest.approx(500.0) and mk.fy == pytest.approx(500.0 * 256 / 240)
    # Same input straight through the reference, scaled by fx'/1000: the canonical-camera transform.
    reference = TorchBackend(model.model)
    plan = model.plan(k)
    assert plan.size == (320, 256) and plan.image.scale == pytest.approx(0.5)
    np.testing.assert_allclose(got.depth_model, reference.depth(plan.prepare([rgb]))[0] * 0.5, rtol=1e-4)


def test_onnx_from_other_weights_is_refused(exports, tmp_path):
    with pytest.raises(BackendError, match="other weights.*re-export"):
        OnnxRuntimeBackend([exports[(320, 256)].path], expected_fingerprint="0123456789abcdef")
    with pytest.raises(BackendError, match="no such ONNX file"):
        OnnxRuntimeBackend([tmp_path / "missing.onnx"])


def test_backend_selection_and_fallback(tiny_model, exports):
    model, fingerprint = tiny_model.model, tiny_model.fingerprint
    assert isinstance(create_backend(BackendSpec("torch"), model), TorchBackend)
    ort = create_backend(BackendSpec("onnxruntime", onnx=(exports[(320, 256)].path,)), model, fingerprint)
    assert ort.name == "onnxruntime" and ort.sizes() == [(320, 256)]
    with pytest.raises(BackendError, match="unknown backend"):
        create_backend(BackendSpec("tvm"), model)
    with pytest.raises(BackendError, match="TensorRT is not installed|needs --engine"):
        create_backend(BackendSpec("tensorrt"), model)
    messages: list[str] = []
    chosen = create_backend(BackendSpec("tensorrt", onnx=(exports[(320, 256)].path,), fallback=True), model,
                            fingerprint, log=messages.append)
    assert chosen.name == "onnxruntime"
    assert len(messages) == 1 and "falling back to onnxruntime" in messages[0]


def test_auto_picks_onnxruntime_on_this_cpu_and_says_why(tiny_model, exports, tmp_path):
    from depthvlm_ros.backends import choose_backend

    assert not torch.cuda.is_available()  # this machine: the CPU rules apply
    name, why = choose_backend("cpu")
    assert name == "onnxruntime" and "no TensorRT engine given" in why and "ONNX Runtime on the CPU" in why
    engine = tmp_path / "d.engine"
    name, why = choose_backend("cpu", [engine])
    assert name == "onnxruntime" and "no CUDA device (d.engine)" in why  # an engine alone is not enough
    messages: list[str] = []
    graph = exports[(320, 256)].path
    chosen = create_backend(BackendSpec("auto", onnx=(graph, engine), engines=(graph, engine)), tiny_model.model,
                            tiny_model.fingerprint, log=messages.append)
    assert chosen.name == "onnxruntime" and chosen.sizes() == [(320, 256)]  # the graph, not the engine file
    assert chosen.choice_reason == messages[0] == why
    assert create_backend(BackendSpec("torch"), tiny_model.model).choice_reason == "torch (asked for)"


SIDECAR = {"gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "tensorrt_version": "10.13.0",
           "model_fingerprint": "aaaa", "size": [640, 480], "precision": "fp16", "onnx": "engines/d.onnx"}


@pytest.mark.parametrize(("here", "named"), [
    (dict(gpu_name="Orin"), "GPU"),
    (dict(compute_capability="8.7"), "compute capability"),
    (dict(tensorrt_version="10.3.0"), "TensorRT version"),
    (dict(model_fingerprint="bbbb"), "model"),
    (dict(size=(320, 256)), "input size"),
])
def test_engine_sidecar_mismatch_is_refused_with_the_rebuild_command(here, named):
    env = dict(gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0", tensorrt_version="10.13.0",
               model_fingerprint="aaaa", size=(640, 480)) | here
    with pytest.raises(BackendError) as err:
        check_sidecar(SIDECAR, "engines/d.engine", **env)
    assert f"built for {named}" in str(err.value)
    assert "depthvlm build-engine --onnx engines/d.onnx --out engines/d.engine --fp16" in str(err.value)
    check_sidecar(SIDECAR, "engines/d.engine", gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0",
                  tensorrt_version="10.13.0", model_fingerprint="aaaa", size=(640, 480))  # a match passes


def cli_commands(message: str) -> list[list[str]]:
    """Every ``depthvlm ...`` command a message tells the user to run, placeholders filled in."""
    import re
    import shlex

    fill = {"WxH": "320x256", "GRAPH": "g.onnx", "ENGINE": "e.engine", "DIR": "m", "FILE": "f"}
    commands = []
    for found in re.findall(r"depthvlm ((?:export|build-engine)[^,;()]*)", message):
        commands.append([fill.get(word, word) for word in shlex.split(found.rstrip(". "))])
    return commands


@pytest.mark.parametrize(("graph", "requested", "error"), [
    ("fp32", None, None),
    ("fp32", "fp32", None),
    ("fp16", None, None),
    ("fp16", "fp16", None),
    ("fp32", "fp16", "RMSNorm in fp16"),  # the weakly typed build that can overflow is not offered
    ("fp16", "fp32", "built from a fp32 graph"),
    ("fp32", "bf16", "bf16 engines are not built"),
])
@pytest.mark.processes
def test_engines_are_strongly_typed_and_errors_name_commands_that_exist(graph, requested, error):
    from depthvlm_ros.backends.tensorrt_backend import engine_recipe
    from depthvlm_ros.tools.cli import build_parser

    if error is None:
        recipe = engine_recipe(graph, requested)
        assert recipe.strongly_typed and recipe.precision == graph
        sidecar = dict(SIDECAR, precision=recipe.precision)
        message = check_sidecar_message(sidecar)
    else:
        with pytest.raises(BackendError, match=error) as err:
            engine_recipe(graph, requested)
        message = str(err.value)
    commands = cli_commands(message)
    assert commands, message
    for command in commands:
        build_parser().parse_args(command)  # argparse exits on an option the CLI does not have


def check_sidecar_message(sidecar: dict) -> str:
    with pytest.raises(BackendError) as err:
        check_sidecar(sidecar, "engines/d.engine", "other GPU", "9.0", "10.13.0")
    return str(err.value)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "depthvlm_ros", *args], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ))


@pytest.mark.processes
def test_cli_export_then_predict_with_onnxruntime_matches_torch(tmp_path, tiny_checkpoint):
    onnx_path = tmp_path / "engines" / "tiny_320x256.onnx"
    run = run_cli("export", "--model", str(tiny_checkpoint), "--size", "320x256", "--out", str(onnx_path),
                  "--check-images", "1")
    assert run.returncode == 0, run.stderr
    assert "max relative error" in run.stdout and "[4/4]" in run.stderr and onnx_path.is_file()
    image = tmp_path / "view.png"
    from PIL import Image

    Image.fromarray(scene_image(320, 240, 1000.0)).save(image)
    outs = {}
    for backend in ("torch", "onnxruntime"):
        out = tmp_path / backend
        run = run_cli("predict", str(image), "--fx", "1000", "--model", str(tiny_checkpoint), "--out", str(out),
                      "--backend", backend, "--onnx", str(onnx_path))
        assert run.returncode == 0, run.stderr
        outs[backend] = np.load(out / "view_depth.npy")
        assert json.loads((out / "view.json").read_text())["backend"].startswith(backend)
    assert max_relative_error(outs["onnxruntime"], outs["torch"]) < 1e-4


@pytest.mark.processes
def test_cli_bench_measures_backends_side_by_side(tiny_checkpoint, exports):
    run = run_cli("bench", "--model", str(tiny_checkpoint), "--size", "320x256", "--runs", "2", "--warmup", "1",
                  "--backends", "torch,onnxruntime", "--onnx", exports[(320, 256)].path)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(report["backends"]) == {"torch", "onnxruntime"}
    assert set(report["backends"]["onnxruntime"]["stages"]) == {"preprocess", "model", "postprocess", "total"}
    medians = {name: b["stages"]["total"]["median_ms"] for name, b in report["backends"].items()}
    assert report["speedup_vs_torch"]["onnxruntime"] == pytest.approx(medians["torch"] / medians["onnxruntime"],
                                                                      rel=1e-3)


@pytest.mark.processes
def test_cli_compiled_path_errors_are_one_line(tmp_path, tiny_checkpoint):
    run = run_cli("build-engine", "--onnx", str(tmp_path / "x.onnx"), "--out", str(tmp_path / "x.engine"))
    assert run.returncode == 3  # TensorRT is missing here: this machine cannot, whatever the input
    assert run.stderr.strip().startswith("depthvlm: error:") and len(run.stderr.strip().splitlines()) == 1
    run = run_cli("export", "--model", str(tiny_checkpoint), "--size", "300x256", "--out", str(tmp_path / "y.onnx"))
    assert run.returncode == 2 and "multiple of 32" in run.stderr
    run = run_cli("predict", str(SAMPLE_IMAGE), "--camera-info", str(SAMPLE_CAMERA), "--model", str(tiny_checkpoint),
                  "--backend", "tensorrt", "--out", str(tmp_path / "o"))
    assert run.returncode == 3 and "depthvlm: error: tensorrt needs --engine FILE" in run.stderr


def test_failed_export_never_lands_where_a_backend_would_use_it(tiny_model, tmp_path, monkeypatch):
    from depthvlm_ros.backends import onnx_export

    monkeypatch.setitem(onnx_export.PARITY_LIMITS, "fp32", 0.0)  # any difference fails the check
    out = tmp_path / "cache" / "depth_320x256_fp32.onnx"
    with pytest.raises(onnx_export.ExportError, match="kept for inspection"):
        export_onnx(tiny_model, 320, 256, out, check_images=1, progress=lambda _: None)
    assert not out.exists() and not Path(str(out) + ".json").exists()
    assert (tmp_path / "cache" / "depth_320x256_fp32.failed" / out.name).is_file()
    assert not (tmp_path / "cache" / f".{out.name}.partial").exists()


@pytest.mark.model_core
def test_fp16_export_keeps_rmsnorm_in_fp32_and_leaves_the_live_model_unchanged(tiny_model, tmp_path):
    import onnx

    before = {k: v.clone() for k, v in tiny_model.model.state_dict().items() if "depth_head.projects" in k}
    report = export_onnx(tiny_model, 320, 256, tmp_path / "half.onnx", dtype="fp16", check_images=1,
                         progress=lambda _: None)
    assert report.dtype == "fp16" and report.max_rel_error < 3e-2
    assert next(tiny_model.model.parameters()).dtype == torch.float32
    for key, value in before.items():
        assert torch.equal(tiny_model.model.state_dict()[key], value)  # not rounded through fp16
    # What a strongly typed TensorRT build preserves: Qwen3's RMSNorm squares and averages in fp32
    # (its Casts are in the graph), so an fp16 engine cannot overflow there.
    graph = onnx.shape_inference.infer_shapes(onnx.load(report.path)).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    averaged = {name for n in graph.node if n.op_type == "ReduceMean" for name in n.input}
    squares = [n for n in graph.node if n.op_type == "Pow" and n.output[0] in averaged]  # x^2 then mean: RMSNorm
    assert len(squares) >= 2 * tiny_model.model.config.text_config.num_hidden_layers  # both norms of each layer
    assert all(types[n.input[0]] == onnx.TensorProto.FLOAT for n in squares)
    assert types["pixel_values"] == onnx.TensorProto.FLOAT16
    assert not [n for n in graph.node if n.op_type == "Softplus"]  # the overflow-free form instead


def test_exported_softplus_cannot_overflow_in_fp16_and_eager_stays_the_stock_op(tmp_path):
    import onnxruntime as ort

    from depthvlm_ros.model.dpt_head import DepthSoftplus

    x = torch.tensor([-30.0, -3.0, 0.0, 3.0, 11.5, 15.0, 19.0, 25.0, 60.0])
    assert torch.equal(DepthSoftplus()(x), torch.nn.functional.softplus(x))  # eager: bit for bit the release
    path = tmp_path / "softplus.onnx"
    with torch.no_grad():
        torch.onnx.export(DepthSoftplus().eval(), (x.half(),), input_names=["x"], output_names=["y"], dynamo=True,
                          verbose=False).save(str(path))
    import onnx

    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    # The stock op exports as Softplus (+ Where), which TensorRT may run as exp(x) in fp16: inf past x = 11.09.
    assert "Softplus" not in ops and "Abs" in ops, ops  # exp is only ever taken of -|x| <= 0
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.half().numpy()})[0]
    assert got.dtype == np.float16 and np.isfinite(got).all()
    want = torch.nn.functional.softplus(x.double()).numpy()
    assert np.allclose(got.astype(np.float64), want, rtol=2e-3, atol=1e-3)


def test_export_without_a_fingerprint_is_refused_when_one_is_expected(exports, tmp_path):
    import onnx

    proto = onnx.load(exports[(320, 256)].path)
    for prop in proto.metadata_props:
        if prop.key == "depthvlm.model_fingerprint":
            prop.value = ""
    anonymous = tmp_path / "anonymous.onnx"
    onnx.save(proto, str(anonymous))
    shutil.copyfile(probe_path(exports[(320, 256)].path), probe_path(anonymous))
    with pytest.raises(BackendError, match="other weights"):
        OnnxRuntimeBackend([anonymous], expected_fingerprint="0123456789abcdef")
    assert OnnxRuntimeBackend([anonymous]).sizes() == [(320, 256)]  # fine when nothing is expected
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07garbage")
    with pytest.raises(BackendError, match="not a readable ONNX file|not a depthvlm export"):
        OnnxRuntimeBackend([corrupt])


def copy_export(report, folder: Path) -> Path:
    """An export's graph and probe copied into ``folder`` (to damage without touching the fixture)."""
    folder.mkdir(parents=True, exist_ok=True)
    graph = folder / Path(report.path).name
    shutil.copyfile(report.path, graph)
    shutil.copyfile(probe_path(report.path), probe_path(graph))
    return graph


@pytest.mark.model_core
def test_export_stores_a_probe_that_the_backend_reproduces(exports, tiny_model):
    report = exports[(320, 256)]
    probe = read_probe(report.path, "unused")
    assert probe.size == "320x256" and probe.depth.shape == (1, 256, 320)
    inputs = tiny_model.processor([np.zeros((256, 320, 3), np.uint8)], "x")
    assert probe.pixel_values.shape == tuple(inputs.pixel_values.shape)
    backend = OnnxRuntimeBackend([report.path])  # loading runs the probe
    session = backend._session((320, 256))
    got = backend._run(session, probe.pixel_values, [probe.pixel_values.shape[0]])
    assert max_relative_error(got, probe.depth) < TOLERANCE["fp32"]


def test_a_graph_altered_after_export_is_refused_and_fallback_serves_pytorch(exports, tiny_model, tmp_path):
    graph = copy_export(exports[(320, 256)], tmp_path / "scaled")
    alter_onnx_weights(graph, scale=1.5)
    with pytest.raises(BackendError) as err:
        OnnxRuntimeBackend([graph])
    assert "differs from its PyTorch reference" in str(err.value)
    assert f"depthvlm export --model DIR --size 320x256 --out {graph}" in str(err.value)  # how to fix it
    nan_graph = copy_export(exports[(320, 256)], tmp_path / "nan")
    alter_onnx_weights(nan_graph, value=float("nan"))
    with pytest.raises(BackendError, match="NaN/Inf"):
        OnnxRuntimeBackend([nan_graph])
    no_probe = copy_export(exports[(320, 256)], tmp_path / "bare")
    probe_path(no_probe).unlink()
    with pytest.raises(BackendError, match="has no probe"):
        OnnxRuntimeBackend([no_probe])
    messages: list[str] = []
    chosen = create_backend(BackendSpec("onnxruntime", onnx=(graph,), fallback=True), tiny_model.model,
                            tiny_model.fingerprint, log=messages.append)
    assert isinstance(chosen, TorchBackend) and "differs from its PyTorch reference" in chosen.fallback_reason
    assert len(messages) == 1 and "falling back to torch" in messages[0]


def test_held_sizes_are_bounded_and_background_sizes_never_block(exports, tiny_model):
    """Foreground: a missing size is made on the call that needs it; at most max_sizes are held. Background:
    the call gets SizeNotReadyError (PyTorch serves) and later the size, made by the worker thread."""
    from depthvlm_ros.backends import SizeNotReadyError

    graphs = {size: Path(report.path) for size, report in exports.items()}
    made: list[tuple[int, int]] = []

    def exporter(width: int, height: int, replace: bool = False) -> Path:
        made.append((width, height))
        return graphs[(width, height)]

    fore = OnnxRuntimeBackend(exporter=exporter, max_sizes=1)
    k = Intrinsics.from_fx(320, 240, 1000.0)
    portrait = Intrinsics.from_fx(240, 320, 1000.0)
    model = tiny_model.with_backend(fore)
    try:
        model.predict_depth(scene_image(320, 240, 1000.0), k)
        result = model.predict_depth(scene_image(240, 320, 1000.0), portrait)
        assert result.backend == "onnxruntime" and fore.held_sizes() == [(256, 320)] and made == list(graphs)

        release = threading.Event()

        def slow_exporter(width: int, height: int, replace: bool = False) -> Path:
            assert release.wait(60), "never released"  # an export that takes as long as the test wants
            return graphs[(width, height)]

        # persist_frames 1: made on the first ask (the default's wait for a settled size: test_faults.py)
        back = OnnxRuntimeBackend(exporter=slow_exporter, max_sizes=1, background=True, log=lambda _: None,
                                  persist_frames=1)
        try:
            with pytest.raises(SizeNotReadyError):
                back.nearest_size(320, 256)
            model = tiny_model.with_backend(back)
            assert model.predict_depth(scene_image(320, 240, 1000.0), k).backend == "torch"  # PyTorch stands in
            release.set()
            assert back.wait_for_size((320, 256), timeout_s=60), back.describe()  # the worker made it
            assert back.held_sizes() == [(320, 256)]
            assert model.predict_depth(scene_image(320, 240, 1000.0), k).backend == "onnxruntime"
        finally:
            back.close()
    finally:
        fore.close()


def test_export_cache_keeps_the_most_recently_used_graphs(tmp_path, monkeypatch):
    from depthvlm_ros.backends.export_cache import prune_export_cache

    root = tmp_path / "exports"
    graphs = []
    for i in range(5):
        graph = root / f"model-{i % 2}" / f"depth_{i}_fp32.onnx"
        graph.parent.mkdir(parents=True, exist_ok=True)
        graph.write_bytes(b"x" * 1000)
        probe_path(graph).write_bytes(b"p" * 100)
        os.utime(graph, (1000 + i, 1000 + i))  # graph i was used at time 1000 + i
        graphs.append(graph)
    monkeypatch.setenv("DEPTHVLM_EXPORT_CACHE_MAX_GRAPHS", "3")
    removed = prune_export_cache(root, keep=graphs[0])  # the one just made always stays
    assert sorted(removed) == sorted(graphs[1:3])
    assert [g.is_file() for g in graphs] == [True, False, False, True, True]
    assert not probe_path(graphs[1]).exists()  # its companions go with it
    monkeypatch.setenv("DEPTHVLM_EXPORT_CACHE_MAX_GB", str(2200 / 1e9))  # room for two graphs and their probes
    prune_export_cache(root)
    assert [g.is_file() for g in graphs] == [False, False, False, True, True]


def test_loaded_sizes_evicts_the_least_recently_used_and_keeps_sizes_in_use():
    """The one cache both compiled backends hold their sizes in: at most max_sizes, the least recently used
    goes first, and a size used within idle_before_replaced_s leaves no room for a background size."""
    from depthvlm_ros.backends.base import LoadedSizes

    held: LoadedSizes[str] = LoadedSizes(2, idle_before_replaced_s=3600.0)
    assert held.hold((320, 240), "a") == [] and held.hold((640, 480), "b") == []
    assert held.get((320, 240)) == "a"  # used: 640x480 is now the least recently used
    assert not held.has_room()  # both were used within the hour
    assert held.hold((160, 120), "c") == [(640, 480)]
    assert held.sizes() == [(160, 120), (320, 240)] and held.get((640, 480)) is None
    idle: LoadedSizes[str] = LoadedSizes(1, idle_before_replaced_s=0.0)
    idle.hold((320, 240), "a")
    assert idle.has_room()  # unused for 0 s is idle enough
    with pytest.raises(BackendError, match="at least 1"):
        LoadedSizes(0)


def test_torch_backend_keys_static_prompts_by_plan_and_refuses_cuda_graphs_off_cuda(tiny_model):
    """A frame of a plan finds its static prompt by the plan's host values (size, batch, device), one per plan and
    batch; CUDA graphs on a CPU model are refused in one line, as is an unknown compile mode."""
    backend = TorchBackend(tiny_model.model)
    plan = tiny_model.plan(Intrinsics.from_fx(256, 192, 1000.0))
    one = plan.prepare([scene_image(256, 192, 1000.0)])
    assert one.prompt_key == ("depth", plan.size, 1, "cpu")
    first = backend.static_prompt(one)
    assert backend.static_prompt(plan.prepare([scene_image(256, 192, 600.0)])) is first
    two = backend.static_prompt(plan.prepare([scene_image(256, 192, 1000.0)] * 2))
    assert two is not first and two.batch == 2 and first.batch == 1
    for spec, message in ((BackendSpec(compile="graphs"), "compile graphs (CUDA graphs) needs a CUDA device"),
                          (BackendSpec(compile="max"), "compile must be one of none, default, graphs")):
        with pytest.raises(BackendError, match=re.escape(message)) as refused:
            create_backend(spec, tiny_model.model)
        assert "\n" not in str(refused.value)


def test_sdpa_kernels_are_chosen_on_cuda_only_and_the_cpu_depth_is_unchanged(tiny_model):
    """On the CPU the torch backend leaves the attention kernels to torch (no choice, nothing logged) and its depth
    is the plain forward's (the head's channels-last layout within 1e-5); on CUDA each tower gets its kernels by
    priority, said in one line (the settings are host values: read here without a GPU; test_gpu.py runs them)."""
    from depthvlm_ros.backends.torch_backend import (
        LLM_SDPA_CUDA,
        VISION_SDPA_CUDA,
        describe_execution,
        execution_settings,
    )

    logged: list[str] = []
    model = tiny_model.model
    backend = TorchBackend(model, log=logged.append)
    inputs = tiny_model.plan(Intrinsics.from_fx(320, 240, 277.0)).prepare([scene_image(320, 240, 277.0)])
    prompt = backend.static_prompt(inputs)
    assert prompt.vision_attention == prompt.llm_attention == () and prompt.channels_last and logged == []
    with torch.no_grad():
        plain = model(pixel_values=inputs.pixel_values, static_prompt=model.static_prompt(inputs)).depth.numpy()
    assert max_relative_error(backend.depth(inputs), plain) < 1e-5
    cuda = execution_settings(model, torch.device("cuda"))
    assert cuda == {"channels_last": True, "vision_attention": VISION_SDPA_CUDA, "llm_attention": LLM_SDPA_CUDA}
    assert describe_execution(cuda) == ("SDPA vision tower cudnn > flash > efficient > math; "
                                        "LLM flash > efficient > math; depth head channels-last")


def test_host_syncs_and_sdpa_kernels_are_read_from_profiled_names():
    """The profile's reading (bench, scripts/gpu_bench_4b.py): blocking CUDA runtime calls count as host syncs, the
    asynchronous ones do not; SDPA kernels name their backend."""
    from depthvlm_ros.backends.torch_inspect import count_host_syncs, sdpa_backends

    names = ["cudaLaunchKernel", "cudaMemcpyAsync", "cudaStreamSynchronize", "cudaMemcpy", "cudaEventRecord",
             "cudaDeviceSynchronize", "aten::_local_scalar_dense"]
    assert count_host_syncs(names) == 3
    assert sdpa_backends(["void pytorch_flash::flash_fwd_kernel<...>", "cudnn_generated_fort_native_sdpa_sm90",
                          "fmha_cutlassF_bf16_aligned_64x128_rf_sm80", "ampere_bf16_s16816gemm"]) == \
        ["cudnn", "efficient", "flash"]
