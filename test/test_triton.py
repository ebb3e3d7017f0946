"""Serving through Triton: the repository's batched graph, ``depthvlm serve`` (PyTriton's real server),
and nodes with ``backend: triton`` over real Fast DDS, each in its own process."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from depthvlm_ros.backends.onnx_export import export_onnx
from depthvlm_ros.geometry import Intrinsics
from depthvlm_ros.tools.serve import free_ports

from conftest import REPO, alter_onnx_weights, ros_environment
from peers.ros_peer import frame_rgb
from test_ros_node import (  # noqa: E402
    PY,
    TEST_PARAMS,
    NodeProcess,
    ProcessOutput,
    finish,
    load_collected,
    node_depth,
    peer,
    start_camera,
    start_peer,
    stop_all,
)

pytest.importorskip("tritonclient.grpc", reason="tritonclient is not installed (make setup installs it)")
SERVER = pytest.importorskip("pytriton.triton", reason="nvidia-pytriton is not installed (make setup installs it "
                             "on x86_64)")
pytestmark = [pytest.mark.slow, pytest.mark.processes]
SIZE = (320, 256)
CAMERA = (320, 240, 300.0)  # width, height, fx of the test cameras


class ServeProcess(ProcessOutput):
    """``depthvlm serve`` in its own process."""

    def __init__(self, graph: Path, ports: list[int], env: dict[str, str], *extra: str) -> None:
        grpc, http, metrics = ports
        self.url = f"localhost:{grpc}"
        super().__init__([PY, "-m", "depthvlm_ros", "serve", "--onnx", str(graph), "--grpc-port", str(grpc),
                          "--http-port", str(http), "--metrics-port", str(metrics), *extra], env, "depthvlm serve")

    def wait_serving(self) -> None:
        self.wait_for_line("serving depthvlm_depth_", timeout=180.0)

    def stop(self) -> int:  # the server waits for requests in flight, then unloads its models
        return super().stop(signal.SIGTERM, timeout=90.0)


def statistics(url: str, name: str) -> tuple[int, int]:
    """(inferences, executions) the server counted for ``name``."""
    import tritonclient.grpc as grpcclient

    from depthvlm_ros.backends.triton_backend import TOKEN_HEADER, read_token

    client = grpcclient.InferenceServerClient(url)  # statistics need the token serve wrote to the (test's) cache
    stats = client.get_inference_statistics(name, headers={TOKEN_HEADER: read_token()}, as_json=True)["model_stats"][0]
    client.close()
    return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))


@pytest.fixture(scope="module")
def graph(tiny_model, tmp_path_factory) -> Path:
    """The tiny checkpoint's checked export at :data:`SIZE` (what the server serves and the local backend runs)."""
    path = tmp_path_factory.mktemp("triton") / "depth.onnx"
    export_onnx(tiny_model, *SIZE, path, check_images=1, progress=lambda _: None)
    return path


@pytest.fixture
def local_onnxruntime(tiny_model, graph):
    """The test's model with the local ONNX Runtime backend on the same graph."""
    from depthvlm_ros.backends.onnxruntime_backend import OnnxRuntimeBackend

    model = tiny_model.with_backend(OnnxRuntimeBackend([graph]))
    yield model
    model.backend.close()


def test_the_batched_graph_computes_each_image_as_the_export_does(graph, tmp_path):
    """The repository's graph (Scan over a batch axis) gives each image of a batch exactly the depth the
    single-image export gives it; its config has fixed dims, batching and the model's fingerprint."""
    import onnxruntime as ort

    from depthvlm_ros.backends.onnx_export import read_metadata
    from depthvlm_ros.backends.triton_repo import write_triton_repo

    names = write_triton_repo([graph], tmp_path, "depth", "onnxruntime", max_batch=4, queue_delay_us=500,
                              progress=lambda _: None)
    assert names == ["depth_320x256"]
    single = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    batched = ort.InferenceSession(str(tmp_path / "depth_320x256" / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    shape = single.get_inputs()[0].shape
    pixels = np.random.default_rng(0).standard_normal((3, *shape)).astype(np.float32)
    got = batched.run(None, {"pixel_values": pixels})[0]
    assert got.shape == (3, SIZE[1], SIZE[0])
    for i in range(3):
        np.testing.assert_array_equal(got[i : i + 1], single.run(None, {"pixel_values": pixels[i]})[0])
    config = (tmp_path / "depth_320x256" / "config.pbtxt").read_text()
    fingerprint = read_metadata(graph)["depthvlm.model_fingerprint"]
    for line in ('backend: "onnxruntime"', "max_batch_size: 4", "data_type: TYPE_FP32", f"dims: {list(shape)}",
                 f"dims: [{SIZE[1]}, {SIZE[0]}]",
                 "dynamic_batching { max_queue_delay_microseconds: 500 default_queue_policy { max_queue_size: 16 "
                 "timeout_action: REJECT default_timeout_microseconds: 2000000 allow_timeout_override: true } }",
                 f'key: "depthvlm.model_fingerprint" value {{ string_value: "{fingerprint}" }}',
                 'key: "depthvlm.canonical_fx" value { string_value: "1000" }'):
        assert line in config, config


def test_an_fp16_export_is_served_as_float32_depth_and_an_altered_graph_is_refused(tiny_model, graph, tmp_path):
    """An fp16 export's repository takes fp16 pixels and returns float32 depth (each image within the fp16
    probe tolerance of the reference); a graph whose weights were altered after export never becomes a
    served model: its probe, run through the batched graph, refuses it."""
    import onnxruntime as ort

    from depthvlm_ros.backends.base import BackendError
    from depthvlm_ros.backends.triton_repo import write_triton_repo

    half = tmp_path / "half.onnx"
    export_onnx(tiny_model, *SIZE, half, dtype="fp16", check_images=1, progress=lambda _: None)
    write_triton_repo([half], tmp_path / "repo", progress=lambda _: None)
    model = tmp_path / "repo" / "depthvlm_depth_320x256"
    config = (model / "config.pbtxt").read_text()
    assert "data_type: TYPE_FP16" in config and 'output [ { name: "depth" data_type: TYPE_FP32' in config, config
    session = ort.InferenceSession(str(model / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_outputs()[0].type == "tensor(float)"

    import shutil

    for suffix in ("", ".probe.safetensors"):
        shutil.copyfile(str(graph) + suffix, str(tmp_path / "altered.onnx") + suffix)
    alter_onnx_weights(tmp_path / "altered.onnx")
    with pytest.raises(BackendError, match="differs from its PyTorch reference"):
        write_triton_repo([tmp_path / "altered.onnx"], tmp_path / "refused", progress=lambda _: None)


@pytest.fixture(scope="module")
def server(graph, private_cache):
    """``depthvlm serve`` on free ports; requests wait up to 20 ms to be batched with others."""
    serve = ServeProcess(graph, free_ports(3), ros_environment(private_cache), "--queue-delay-us", "20000")
    try:
        serve.wait_serving()
        yield serve
    finally:
        code = serve.stop()
    assert code == 0, "\n".join(serve.lines[-40:])


@pytest.mark.ros
def test_two_nodes_stream_from_one_server_batched_and_equal_to_local_onnxruntime(server, tiny_checkpoint,
                                                                                 local_onnxruntime, private_cache,
                                                                                 tmp_path):
    """Two node processes with backend triton (each with its own camera) get the depth the local ONNX Runtime
    backend computes from the same graph (max relative error <= 1e-5), and the server joins their requests:
    fewer executions than inferences while both stream. The second node holds no weights (answers: false)
    and refuses questions, saying why."""
    width, height, fx = CAMERA
    name = f"depthvlm_depth_{SIZE[0]}x{SIZE[1]}"
    envs = [ros_environment(private_cache) for _ in range(2)]
    nodes = [NodeProcess(env, {**TEST_PARAMS, "model_path": tiny_checkpoint, "backend": "triton",
                               "triton_url": server.url, "answers": i == 0}) for i, env in enumerate(envs)]
    cameras: list[subprocess.Popen] = []
    try:
        for node in nodes:
            node.wait_ready()
        before = statistics(server.url, name)
        collectors = [start_peer(env, "collect", "--out", str(tmp_path / f"node{i}"), "--count", "4", "--keep", "4",
                                 "--no-heavy", "--until", "frames_processed>=4")
                      for i, env in enumerate(envs)]
        cameras = [start_camera(env, "--width", str(width), "--height", str(height), "--fx", str(fx), "--rate", "10",
                                "--reliable", "--start", str(100 * i)) for i, env in enumerate(envs)]
        results = [finish(collector) for collector in collectors]
        refused = peer(envs[1], "call", "spatial_query", '{"question": "How far is the wall?"}')
        deadline = time.monotonic() + 240.0
        # Both still stream: wait for the batcher to have joined two of their requests. Triton's statistics
        # have no notification, so they are read again every 0.2 s until the deadline.
        while True:
            inferences, executions = (a - b for a, b in zip(statistics(server.url, name), before))
            if executions < inferences or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        for camera in cameras:
            finish(camera)
    finally:
        stop_all(cameras)
        codes = [node.stop() for node in nodes]
    assert codes == [0, 0], [node.output[-2000:] for node in nodes]
    assert "(no weights loaded: answers off)" in nodes[1].output and "no weights" not in nodes[0].output
    assert not refused["success"] and "needs the model's weights" in refused["message"], refused
    assert 0 < executions < inferences, (inferences, executions)
    k = Intrinsics.from_fx(width, height, fx)
    for i, result in enumerate(results):
        assert result["depth_count"] >= 4, result
        meta, arrays = load_collected(tmp_path / f"node{i}")
        assert meta["depth"], meta
        for key in meta["depth"]:
            index = round((float(key.split("|")[0]) - 1000.0) * 1000)
            expected = node_depth(local_onnxruntime, frame_rgb(width, height, index % 8), k)
            got = arrays[f"depth|{key}"]
            assert np.max(np.abs(got - expected) / np.abs(expected)) <= 1e-5, key
        assert meta["diagnostics"][-1]["backend"].startswith(f"triton (grpc://{server.url}"), meta["diagnostics"][-1]


@pytest.mark.ros
def test_a_node_reports_a_missing_server_and_streams_once_it_is_back(graph, tiny_checkpoint, private_cache):
    """Started before its server, a node says so (diagnostics ERROR with the URL; frames dropped and counted);
    once the server serves, depth flows; when the server goes mid-stream, the same again; and it comes back
    without restarting the node."""
    env = ros_environment(private_cache)
    ports = free_ports(3)
    url = f"localhost:{ports[0]}"
    node = NodeProcess(env, {**TEST_PARAMS, "model_path": tiny_checkpoint, "backend": "triton", "triton_url": url})
    camera = serve = None
    try:
        node.wait_ready()
        camera = start_camera(env, "--rate", "10", "--reliable", ceiling=6000)
        down = peer(env, "watch", "--until", "level==2", "--until", f"message~grpc://{url}", "--until",
                    "frames_failed_backend>=3", "--timeout", "120")
        assert "unreachable" in down["backend_problem"] and down["frames_processed"] == "0", down
        for _ in range(2):  # the server comes, goes, comes again, goes again
            serve = ServeProcess(graph, ports, env)
            serve.wait_serving()
            up = peer(env, "watch", "--until", "level==0", "--until", "backend_problem==", "--until",
                      f"frames_processed>={int(down['frames_processed']) + 3}", "--timeout", "120")
            assert serve.stop() == 0, "\n".join(serve.lines[-40:])
            serve = None
            down = peer(env, "watch", "--until", "level==2", "--until",
                        f"frames_failed_backend>{up['frames_failed_backend']}", "--timeout", "120")
            assert f"grpc://{url}" in down["message"], down
        assert node.proc.poll() is None
        finish(camera)
    finally:
        if serve is not None:
            serve.stop()
        stop_all([camera] if camera is not None else [])
        code = node.stop()
    assert code == 0, node.output[-3000:]
    assert node.output.count("configured: model") == 1  # never restarted


def test_a_tls_client_of_a_plaintext_server_and_missing_certificates_are_one_line_errors(server, tiny_checkpoint,
                                                                                         tmp_path):
    """The client's TLS options reach gRPC: a TLS client of the (plaintext) server does not connect, a missing
    certificate file is named; each one line, exit 3 (no server) and 2 (a bad option). (No TLS server runs
    here: depthvlm serve cannot offer TLS, see its docstring; the standard container can.)"""
    from conftest import SAMPLE_IMAGE

    cert = tmp_path / "ca.pem"
    cert.write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n")
    base = [PY, "-m", "depthvlm_ros", "predict", str(SAMPLE_IMAGE), "--fx", "300", "--out", str(tmp_path / "o"),
            "--model", str(tiny_checkpoint), "--backend", "triton", "--triton-url", server.url]
    tls = subprocess.run([*base, "--triton-tls-root-cert", str(cert)], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    missing = subprocess.run([*base, "--triton-tls-root-cert", str(tmp_path / "nowhere.pem")], cwd=REPO,
                             capture_output=True, text=True, timeout=300)
    for run, says, code in ((tls, "unreachable", 3), (missing, "nowhere.pem", 2)):
        lines = [line for line in run.stderr.splitlines() if line.startswith("depthvlm: error:")]
        assert run.returncode == code and len(lines) == 1 and says in lines[0], run.stderr[-2000:]


def test_triton_errors_are_one_line_with_exit_code_3(server, tiny_checkpoint, tmp_path):
    """An unreachable server names its URL; a server serving other weights is refused. Neither is bad input:
    exit code 3."""
    from conftest import SAMPLE_IMAGE

    free = free_ports(1)[0]
    base = [PY, "-m", "depthvlm_ros", "predict", str(SAMPLE_IMAGE), "--fx", "300", "--out", str(tmp_path),
            "--backend", "triton"]
    nowhere = subprocess.run([*base, "--model", str(tiny_checkpoint), "--triton-url", f"localhost:{free}"],
                             cwd=REPO, capture_output=True, text=True, timeout=180)
    other = subprocess.run([*base, "--triton-url", server.url], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert nowhere.returncode == 3 and f"triton server at grpc://localhost:{free} unreachable" in nowhere.stderr
    assert len(nowhere.stderr.strip().splitlines()) == 1, nowhere.stderr
    assert other.returncode == 3 and "was exported from other weights" in other.stderr and "refused" in other.stderr


def test_a_node_without_weights_needs_backend_triton(ros_env, tiny_checkpoint):
    node = NodeProcess(ros_env, {**TEST_PARAMS, "model_path": tiny_checkpoint, "answers": False})
    assert node.proc.wait(timeout=180) == 2
    node.stop()
    assert "answers: false needs backend triton (the depth path on a server); backend is 'torch'" in node.output


def test_cli_export_writes_a_triton_repository_and_refuses_bad_settings(tiny_checkpoint, tmp_path):
    """``depthvlm export --triton-repo`` writes one model per size (a batched graph that runs, the config);
    settings no repository can have are one-line errors with exit code 2, before any work."""
    import onnxruntime as ort

    base = [PY, "-m", "depthvlm_ros", "export", "--model", str(tiny_checkpoint)]
    repo = tmp_path / "repo"
    run = subprocess.run([*base, "--triton-repo", str(repo), "--size", "320x256", "--max-batch", "2"], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert f"wrote the Triton model repository {repo}: depthvlm_depth_320x256" in run.stdout
    config = (repo / "depthvlm_depth_320x256" / "config.pbtxt").read_text()
    assert 'backend: "onnxruntime"' in config and "max_batch_size: 2" in config, config
    session = ort.InferenceSession(str(repo / "depthvlm_depth_320x256" / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    shape = [2, *session.get_inputs()[0].shape[1:]]
    assert session.run(None, {"pixel_values": np.zeros(shape, np.float32)})[0].shape == (2, SIZE[1], SIZE[0])
    for args, message in [(["--triton-repo", str(repo), "--size", "320x256", "--max-batch", "0"],
                           "max batch must be in 1..256, got 0"),
                          (["--out", str(tmp_path / "x.onnx"), "--size", "320x256", "--size", "256x320"],
                           "one --size per .onnx file")]:
        bad = subprocess.run([*base, *args], cwd=REPO, capture_output=True, text=True, timeout=180)
        assert bad.returncode == 2 and message in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_a_batch_above_the_served_size_is_split_and_a_refused_request_is_not_a_lost_server(
        server, local_onnxruntime, tiny_checkpoint):
    """Nine images in one call go to a server that executes at most 8 at a time: sent in two requests, each
    image's depth equals the local backend's, from a model loaded without weights (nothing on the client
    computes depth). A request the server refuses fails that call only; a lost server (gRPC UNAVAILABLE)
    becomes the backend's problem."""
    from tritonclient.utils import InferenceServerException

    from depthvlm_ros.backends.triton_backend import TritonBackend, TritonConnection, read_token
    from depthvlm_ros.model.checkpoint import model_fingerprint
    from depthvlm_ros.pipeline import DepthVLM

    width, height, fx = CAMERA
    k = Intrinsics.from_fx(width, height, fx)
    frames = [frame_rgb(width, height, i) for i in range(9)]
    expected = [r.depth for r in local_onnxruntime.infer(local_onnxruntime.plan(k, exact=False), frames)]
    loaded = DepthVLM.from_pretrained(tiny_checkpoint, weights=False)
    assert {p.device.type for p in loaded.model.parameters()} == {"meta"}
    backend = TritonBackend(TritonConnection(server.url, token=read_token()),
                            expected_fingerprint=model_fingerprint(tiny_checkpoint), log=lambda _: None)
    try:
        weightless = loaded.with_backend(backend)
        name = f"depthvlm_depth_{SIZE[0]}x{SIZE[1]}"
        before = statistics(server.url, name)
        got = [r.depth for r in weightless.infer(weightless.plan(k, exact=False), frames)]
        inferences, executions = (a - b for a, b in zip(statistics(server.url, name), before))
        assert inferences == 9 and executions >= 2, (inferences, executions)  # max_batch_size 8: two requests
        for a, b in zip(got, expected):
            assert np.max(np.abs(a - b) / np.abs(b)) <= 1e-5
        refused = backend._failed(InferenceServerException("bad shape", status="StatusCode.INVALID_ARGUMENT"))
        assert "refused a request" in str(refused) and backend.problem() == ""
        lost = backend._failed(InferenceServerException("gone", status="StatusCode.UNAVAILABLE"))
        assert "lost" in str(lost) and backend.problem() == str(lost)
    finally:
        backend.close()
