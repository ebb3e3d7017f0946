"""Shared fixtures: a tiny DepthVLM checkpoint folder laid out like the published one."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
SAMPLE_IMAGE = REPO / "depthvlm_ros" / "data" / "sample_room.png"
SAMPLE_CAMERA = REPO / "depthvlm_ros" / "data" / "sample_room.yaml"


def pytest_configure(config: pytest.Config) -> None:
    """Under scripts/test_min_versions.sh: refuse to run unless the declared minimum versions are the
    ones imported (an overlay that did not take would test the main versions and say nothing)."""
    expected = os.environ.get("DEPTHVLM_EXPECT_VERSIONS", "")
    if not expected:
        return
    import importlib
    from importlib.metadata import version

    from packaging.version import Version

    for pin in expected.split():
        name, want = pin.split("==")
        installed, imported = version(name), importlib.import_module(name).__version__
        if not Version(installed) == Version(imported) == Version(want):
            raise pytest.UsageError(f"{name}: expected {want}, installed {installed}, imported {imported}")


#: Fixtures that give a test a ROS environment: a test that uses one starts processes over Fast DDS.
ROS_FIXTURES = {"ros_env", "module_env", "scene_answers"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that talks over DDS ``ros`` (and ``processes``), from the fixtures it uses."""
    for item in items:
        if ROS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ros)
            item.add_marker(pytest.mark.processes)


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Generated models, exports and fingerprints go to a per-run folder, not the user's cache."""
    path = tmp_path_factory.mktemp("depthvlm-cache")
    os.environ["DEPTHVLM_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from depthvlm_ros.model.factory import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "depthvlm-tiny-test", seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint: Path):
    from depthvlm_ros.pipeline import DepthVLM

    return DepthVLM.from_pretrained(tiny_checkpoint)


def depthvlm(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """``python -m depthvlm_ros ARGS``, as a user runs it; its output captured."""
    return subprocess.run([sys.executable, "-m", "depthvlm_ros", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="session")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 generated frames with QA, masks and places, written by ``depthvlm generate``: 128x96 keeps the files
    small (the tiny models see them at 320x224, their input limit)."""
    out = tmp_path_factory.mktemp("train-data") / "gen"
    run = depthvlm("generate", "--out", str(out), "--n", "12", "--seed", "3", "--size", "128x96")
    assert run.returncode == 0, run.stderr
    return out


@pytest.fixture(scope="session")
def tiny_init(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh randomly initialised depthvlm-tiny (the built-in model's tokenizer: coordinates are tokens)."""
    from depthvlm_ros.training.tiny import init_tiny_model

    return init_tiny_model(tmp_path_factory.mktemp("tiny-init") / "init", seed=0)


def scene_image(width: int, height: int, fx: float, fy: float | None = None) -> np.ndarray:
    """One fixed view rendered at any resolution: colour is a function of the ray direction.

    Pixel (u, v) sees the ray ((u - cx) / fx, (v - cy) / fy, 1) with cx = (W - 1) / 2; so a
    W x H image at fx and a 2W x 2H image at 2 fx show the same scene (up to sampling).
    """
    fy = fx if fy is None else fy
    u = (np.arange(width) - (width - 1) / 2) / fx
    v = (np.arange(height) - (height - 1) / 2) / fy
    x, y = np.meshgrid(u, v)
    r = 0.5 + 0.5 * np.sin(6.0 * x + 2.0 * y)
    g = 0.5 + 0.5 * np.cos(5.0 * y - 1.5 * x)
    b = np.clip(0.2 + 0.8 * ((x**2 + (y - 0.1) ** 2) < 0.08), 0, 1)
    return np.rint(np.stack([r, g, b], axis=-1) * 255).astype(np.uint8)


def _domains() -> Iterator[int]:
    """ROS_DOMAIN_IDs for this test process, each used once before any repeats: 20..101 (0..101 keeps the DDS
    ports below Linux's ephemeral range, ROS 2 docs "The ROS_DOMAIN_ID"), split between pytest-xdist workers
    (worker w of W takes the IDs equal to w modulo W), so parallel workers never share a domain."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index, count = int(worker.removeprefix("gw") or 0), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    mine = [d for d in range(20, 102) if d % count == index % count]
    start = os.getpid() % len(mine)  # another run on this machine most likely starts elsewhere
    return itertools.cycle(mine[start:] + mine[:start])


_ROS_DOMAINS = _domains()


def ros_environment(cache: Path) -> dict[str, str]:
    """Environment for ROS processes: a fresh private ROS_DOMAIN_ID, localhost discovery only,
    the shipped Fast DDS large-data profile and the given model cache."""
    env = dict(os.environ)
    env.update({
        "ROS_DOMAIN_ID": str(next(_ROS_DOMAINS)),
        "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST",
        "FASTDDS_DEFAULT_PROFILES_FILE": str(REPO / "config" / "fastdds_large_data.xml"),
        "DEPTHVLM_CACHE": str(cache),
        "PYTHONUNBUFFERED": "1",
    })
    env.pop("ROS_LOCALHOST_ONLY", None)
    return env


@pytest.fixture
def ros_env(private_cache: Path) -> dict[str, str]:
    """:func:`ros_environment` for one test: each test gets its own domain, so processes a failed
    test left behind cannot answer the next."""
    return ros_environment(private_cache)


def alter_onnx_weights(graph: Path, scale: float = 1.5, value: float | None = None) -> str:
    """Change an exported graph's weights in place, as a bad conversion or a corrupted copy would: the
    largest float initializer is multiplied by ``scale`` (or set to ``value``). Metadata (size, model
    fingerprint) stays as it was, so only the graph's output can tell. Returns the initializer's name."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(graph))
    floats = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    target = max(floats, key=lambda t: int(np.prod(t.dims)))
    array = numpy_helper.to_array(target)
    array = np.full_like(array, value) if value is not None else array * np.float32(scale)
    target.CopyFrom(numpy_helper.from_array(array.astype(np.float32), target.name))
    onnx.save(model, str(graph))
    return target.name
