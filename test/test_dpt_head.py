"""The depth head: released names and shapes, and exactly the released computation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from depthvlm_ros.model.dpt_head import DPTDepthHead, ResidualConvUnit

from reference_release import RefDPTHead

pytestmark = pytest.mark.model_core

KEYS_FILE = Path(__file__).with_name("dpt_head_keys.txt")


def released_shapes() -> dict[str, tuple[int, ...]]:
    shapes = {}
    for line in KEYS_FILE.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, shape = line.split("\t")
            shapes[key] = tuple(int(v) for v in shape.strip("()").split(",") if v.strip())
    return shapes


def varying_head(width: dict, seed: int = 0) -> DPTDepthHead:
    """A head (dim_in 48) with weights whose output varies (the default init gives ~constant ln 2), in eval mode."""
    torch.manual_seed(seed)
    head = DPTDepthHead(dim_in=48, patch_size=32, **width).eval()
    for m in head.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                torch.nn.init.normal_(m.bias, std=0.1)
    return head


def test_released_width_head_has_the_checkpoints_62_keys_and_shapes():
    with torch.device("meta"):
        head = DPTDepthHead(dim_in=2560, patch_size=32)
    mine = {f"depth_head.{k}": tuple(v.shape) for k, v in head.state_dict().items()}
    assert mine == released_shapes()
    assert len(mine) == 62
    assert sum(p.numel() for p in head.parameters()) == pytest.approx(35.15e6, rel=1e-3)


@pytest.mark.parametrize(("width", "grid"), [
    (dict(features=32, out_channels=(16, 32, 64, 64), last_channels=16), (3, 5)),
    (dict(features=64, out_channels=(32, 64, 128, 128), last_channels=32), (4, 4)),
])
def test_head_is_bit_identical_to_the_release_style_reference(width, grid):
    head = varying_head(width)
    ref = RefDPTHead(48, width["features"], width["out_channels"], width["last_channels"]).eval()
    ref.load_state_dict(head.state_dict(), strict=True)  # identical key set and shapes
    gh, gw = grid
    feats = [torch.randn(2, gh * gw, 48) for _ in range(4)]
    with torch.no_grad():
        ours = head([f.clone() for f in feats], gh, gw)
        theirs = ref([f.clone() for f in feats], gh, gw)
    assert ours.shape == (2, 1, gh * 32, gw * 32)
    assert torch.equal(ours, theirs)
    assert (ours > 0).all()  # Softplus: metres are positive
    assert ours.std() > 1e-2 * ours.mean()  # a test on varying output, not on a constant


@pytest.mark.parametrize("output_size", [None, (150, 100)])
def test_channels_last_head_equals_the_default_layout_and_leaves_the_weights_as_they_are(output_size):
    """``channels_last=True`` (the torch backend's layout on the CPU and CUDA) gives the default layout's depth within
    1e-5 relative, on the model grid and at a camera's grid; the module's parameters keep their layout (training,
    saving and sharding see the usual tensors)."""
    head = varying_head(dict(features=64, out_channels=(32, 64, 128, 128), last_channels=32))
    feats = [torch.randn(2, 3 * 4, 48) for _ in range(4)]
    with torch.no_grad():
        default = head(feats, 3, 4, output_size)
        fast = head(feats, 3, 4, output_size, channels_last=True)
    assert fast.shape == default.shape == (2, 1, *(output_size or (96, 128)))
    assert ((fast - default).abs() / default.abs()).max() < 1e-5
    assert all(p.is_contiguous() for p in head.parameters())
    assert default.std() > 1e-2 * default.mean()  # a test on varying output, not on a constant


def test_residual_unit_adds_relu_of_its_input_like_the_release():
    torch.manual_seed(0)
    unit = ResidualConvUnit(4)
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        inner = unit.conv2(torch.relu(unit.conv1(torch.relu(x))))
        out = unit(x.clone())
    torch.testing.assert_close(out, inner + torch.relu(x))
    assert not torch.allclose(out, inner + x)  # the "clean" x + f(x) is not what was released


def test_4b_benchmark_config_has_qwen3_vl_4b_size_and_the_released_head():
    from depthvlm_ros.model.factory import depthvlm_4b_config
    from depthvlm_ros.model.modeling import DepthVLMForConditionalGeneration

    with torch.device("meta"):
        model = DepthVLMForConditionalGeneration(depthvlm_4b_config())
    head = {f"depth_head.{k}": tuple(v.shape) for k, v in model.depth_head.state_dict().items()}
    assert head == released_shapes()
    n_params = sum(p.numel() for p in model.parameters())  # tied lm_head counted once
    assert 4.2e9 < n_params < 4.7e9
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
