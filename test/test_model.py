"""DepthVLM end to end on a tiny checkpoint laid out like the published one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from depthvlm_ros.errors import CheckpointError, InputError
from depthvlm_ros.geometry import Intrinsics
from depthvlm_ros.pipeline import DepthVLM

from conftest import scene_image
from reference_release import reference_depth

pytestmark = pytest.mark.model_core


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_checkpoint_has_the_published_layout(tiny_checkpoint):
    names = {p.name for p in tiny_checkpoint.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "preprocessor_config.json", "chat_template.jinja", "generation_config.json"} <= names
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert config["model_type"] == "qwen3_vl" and config["depth_head_type"] == "dpt"
    keys = load_file(tiny_checkpoint / "model.safetensors").keys()
    prefixes = {k.split(".")[0] + "." + k.split(".")[1] if k.startswith("model.") else k.split(".")[0] for k in keys}
    assert prefixes == {"model.visual", "model.language_model", "depth_head"}  # lm_head tied, omitted


def test_depth_equals_the_released_architecture(tiny_model, tiny_checkpoint):
    # At the canonical focal and a multiple of 32 px, neither resize changes the image, so the
    # reference sees exactly the pixels the model does.
    rgb = scene_image(320, 224, fx=1000.0)
    ours = tiny_model.predict_depth(rgb, Intrinsics.from_fx(320, 224, 1000.0))
    ref = reference_depth(tiny_checkpoint, rgb)
    assert ours.depth_model.shape == ref.shape == (224, 320)
    rel = np.abs(ours.depth_model - ref) / np.abs(ref)
    assert rel.max() < 1e-4
    assert ref.std() > 0.05 * ref.mean()  # weights whose output varies: the comparison can fail


def test_released_width_head_on_a_tiny_vlm_equals_the_release(tmp_path):
    from depthvlm_ros.model.factory import make_tiny_checkpoint

    folder = make_tiny_checkpoint(tmp_path / "wide", seed=1, depth_head_features=256,
                                  depth_head_out_channels=[256, 512, 1024, 1024], depth_head_last_channels=32)
    rgb = scene_image(192, 128, fx=1000.0)
    ours = DepthVLM.from_pretrained(folder).predict_depth(rgb, Intrinsics.from_fx(192, 128, 1000.0))
    ref = reference_depth(folder, rgb)
    assert np.abs(ours.depth_model - ref).max() / np.abs(ref).min() < 1e-4
    assert ref.std() > 0.05 * ref.mean()


def test_untied_lm_head_is_loaded_and_a_tied_one_may_be_absent(tmp_path, tiny_checkpoint):
    folder = copy_checkpoint(tiny_checkpoint, tmp_path / "untied")
    config = json.loads((folder / "config.json").read_text())
    config["tie_word_embeddings"] = False
    config["text_config"]["tie_word_embeddings"] = False
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="missing keys: lm_head.weight"):
        DepthVLM.from_pretrained(folder)
    state = load_file(folder / "model.safetensors")
    state["lm_head.weight"] = torch.randn_like(state["model.language_model.embed_tokens.weight"])
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    model = DepthVLM.from_pretrained(folder)
    assert torch.equal(model.model.lm_head.weight, state["lm_head.weight"])


@pytest.mark.parametrize(("edit", "message"), [
    (lambda s: s.pop("depth_head.scratch.refinenet1.out_conv.bias"),
     "missing keys: depth_head.scratch.refinenet1.out_conv.bias"),
    (lambda s: s.__setitem__("depth_head.extra.weight", torch.zeros(2)), "unexpected keys: depth_head.extra.weight"),
    (lambda s: s.__setitem__("depth_head.projects.0.bias", torch.zeros(7)), "wrong shapes: depth_head.projects.0.bias"),
    (lambda s: s.pop("model.visual.blocks.0.attn.qkv.weight"), "missing keys: model.visual.blocks.0.attn.qkv.weight"),
])
def test_strict_loading_names_the_wrong_key(tmp_path, tiny_checkpoint, edit, message):
    folder = copy_checkpoint(tiny_checkpoint, tmp_path / "bad")
    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=message.replace(".", r"\.")):
        DepthVLM.from_pretrained(folder)


def test_pickle_weights_and_missing_files_are_refused(tmp_path, tiny_checkpoint):
    folder = copy_checkpoint(tiny_checkpoint, tmp_path / "pickled")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="safetensors only"):
        DepthVLM.from_pretrained(folder)
    folder = copy_checkpoint(tiny_checkpoint, tmp_path / "noproc")
    (folder / "preprocessor_config.json").unlink()
    with pytest.raises(CheckpointError, match="preprocessor_config.json"):
        DepthVLM.from_pretrained(folder)
    folder = copy_checkpoint(tiny_checkpoint, tmp_path / "corrupt")
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="safetensors"):
        DepthVLM.from_pretrained(folder)
    with pytest.raises(CheckpointError, match="does not exist"):
        DepthVLM.from_pretrained(tmp_path / "nowhere")


def test_sharded_checkpoint_loads_by_key_name(tmp_path, tiny_checkpoint, tiny_model):
    folder = copy_checkpoint(tiny_checkpoint, tmp_path / "sharded")
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    weight_map = {}
    for name, part in shards.items():
        save_file({k: state[k] for k in part}, folder / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    model = DepthVLM.from_pretrained(folder)
    rgb = scene_image(256, 256, fx=1000.0)
    k = Intrinsics.from_fx(256, 256, 1000.0)
    np.testing.assert_array_equal(model.predict_depth(rgb, k).depth, tiny_model.predict_depth(rgb, k).depth)


def test_metric_scale_follows_the_camera(tiny_model):
    # The same view as W x H at fx and as 2W x 2H at 2 fx reaches the model as one canonical image.
    small_k = Intrinsics.from_fx(256, 192, 400.0)
    big_k = Intrinsics.from_fx(512, 384, 800.0)
    small = tiny_model.predict_depth(scene_image(256, 192, 400.0), small_k)
    big = tiny_model.predict_depth(scene_image(512, 384, 800.0), big_k)
    assert small.intrinsics_model.size == big.intrinsics_model.size == (640, 480)
    assert big.depth.shape == (384, 512) and small.depth.shape == (192, 256)
    rel = np.abs(small.depth_model - big.depth_model) / small.depth_model
    assert np.median(rel) < 0.01
    big_on_small_grid = big.depth.reshape(192, 2, 256, 2).mean(axis=(1, 3))
    rel_cam = np.abs(big_on_small_grid - small.depth) / small.depth
    assert np.median(rel_cam) < 0.02
    # The check can fail: ignoring camera_info (the big image with the small camera's focal)
    # gives a different canonical image and a clearly different depth map.
    wrong = tiny_model.predict_depth(scene_image(512, 384, 800.0), Intrinsics.from_fx(512, 384, 400.0))
    assert wrong.intrinsics_model.size != big.intrinsics_model.size
    wrong_small = wrong.depth.reshape(192, 2, 256, 2).mean(axis=(1, 3))
    assert np.median(np.abs(wrong_small - small.depth) / small.depth) > 5 * np.median(rel_cam)


def test_depth_maps_back_to_the_camera_grid_with_its_k(tiny_model):
    cam = Intrinsics(fx=350.0, fy=340.0, cx=170.0, cy=118.0, width=333, height=241)
    result = tiny_model.predict_depth(scene_image(333, 241, 350.0, 340.0), cam)
    assert result.depth.shape == (241, 333) and result.depth.dtype == np.float32
    assert result.intrinsics == cam
    mk = result.intrinsics_model
    assert mk.width % 32 == 0 and mk.height % 32 == 0
    assert result.depth_model.shape == (mk.height, mk.width)
    assert mk.fx == pytest.approx(1000.0, rel=0.03)  # snapping to 32 px moves fx by < 3 %
    assert np.isfinite(result.depth).all() and (result.depth > 0).all()
    assert set(result.timings_ms) == {"preprocess", "vision", "llm", "head", "postprocess"}


def test_batch_equals_single_images(tiny_model):
    k = Intrinsics.from_fx(320, 240, 600.0)
    images = [scene_image(320, 240, 600.0), scene_image(320, 240, 450.0)]
    batch = tiny_model.predict_depth_batch(images, [k, k])
    for rgb, got in zip(images, batch):
        single = tiny_model.predict_depth(rgb, k)
        np.testing.assert_allclose(got.depth_model, single.depth_model, rtol=1e-4)
    assert not np.allclose(batch[0].depth_model, batch[1].depth_model, rtol=1e-3)
    with pytest.raises(InputError, match="one size"):
        tiny_model.predict_depth_batch(images, [k, Intrinsics.from_fx(320, 240, 300.0)])


def test_ask_answers_and_its_depth_is_the_depth_paths(tiny_model):
    k = Intrinsics.from_fx(320, 240, 500.0)
    rgb = scene_image(320, 240, 500.0)
    answer = tiny_model.ask(rgb, k, "How far is the red ball?", max_new_tokens=5)
    assert isinstance(answer.text, str) and 1 <= answer.num_tokens <= 5
    # Image tokens precede the question (causal attention): the prefill's depth is the depth path's.
    depth = tiny_model.predict_depth(rgb, k)
    np.testing.assert_allclose(answer.depth.depth_model, depth.depth_model, rtol=1e-4)
    assert "generate" in answer.timings_ms


def test_ask_stops_when_asked_and_says_so(tiny_model):
    """``should_stop`` ends generation within one token (how the node stops an answer on SIGTERM)."""
    k = Intrinsics.from_fx(320, 240, 500.0)
    rgb = scene_image(320, 240, 500.0)
    calls = []

    def stop_after_three() -> bool:
        calls.append(1)
        return len(calls) >= 3

    answer = tiny_model.ask(rgb, k, "How far is the red ball?", max_new_tokens=200, should_stop=stop_after_three)
    assert answer.stopped and answer.num_tokens == 3
    free = tiny_model.ask(rgb, k, "How far is the red ball?", max_new_tokens=5, should_stop=lambda: False)
    assert not free.stopped and free.num_tokens == 5


def test_model_input_is_bounded_whatever_the_lens(tiny_model):
    """A wide lens asks for a canonical size of 64000 x 48000 px: it is served at the capped size on the
    canonical-camera route (depth x fx'/1000), never resized to that; under 1 px focal length is refused."""
    from depthvlm_ros.geometry import DEFAULT_MAX_IMAGE_TOKENS
    from depthvlm_ros.pipeline import RouteSettings

    wide = Intrinsics.from_fx(640, 480, 10.0)
    rgb = scene_image(640, 480, 10.0)
    capped = tiny_model.predict_depth(rgb, wide, RouteSettings(max_tokens=DEFAULT_MAX_IMAGE_TOKENS))
    w, h = capped.intrinsics_model.size
    assert (w // 32) * (h // 32) <= DEFAULT_MAX_IMAGE_TOKENS and w / h == pytest.approx(4 / 3, rel=0.05)
    assert capped.intrinsics_model.fx == pytest.approx(10.0 * w / 640)  # the model saw focal fx', not 1000
    assert capped.depth.shape == (480, 640) and np.isfinite(capped.depth).all()
    # Without the node's cap, the model's own max_pixels (16.7 M px for the released processor) still bounds it.
    from depthvlm_ros.pipeline import model_input_size

    own_w, own_h = model_input_size(tiny_model.processor, wide)
    assert own_w * own_h <= 16777216 and own_w / own_h == pytest.approx(4 / 3, rel=0.05)
    with pytest.raises(InputError, match="below 1 px"):
        tiny_model.predict_depth(rgb, Intrinsics.from_fx(640, 480, 0.5))


@pytest.mark.parametrize(("question", "message"), [("", "empty"), ("   ", "empty"), ("x" * 1001, "limit is 1000")])
def test_ask_rejects_bad_questions(tiny_model, question, message):
    k = Intrinsics.from_fx(64, 64, 100.0)
    with pytest.raises(InputError, match=message):
        tiny_model.ask(np.zeros((64, 64, 3), np.uint8), k, question)


@pytest.mark.parametrize(("image", "message"), [
    (np.zeros((64, 64), np.uint8), "H x W x 3"),
    (np.zeros((64, 64, 3), np.float32), "uint8"),
    (np.zeros((0, 64, 3), np.uint8), "image size"),
])
def test_bad_images_are_rejected(tiny_model, image, message):
    with pytest.raises(InputError, match=message):
        tiny_model.predict_depth(image, Intrinsics.from_fx(64, 64, 100.0))


def test_released_config_format_without_width_fields_loads_a_narrow_head(tmp_path, tiny_checkpoint, tiny_model):
    # The published config.json names only depth_head_type and depth_loss_weight: widths come
    # from the weights, and keys and shapes are still checked strictly.
    folder = copy_checkpoint(tiny_checkpoint, tmp_path / "released-format")
    config = json.loads((folder / "config.json").read_text())
    for name in ("depth_head_features", "depth_head_out_channels", "depth_head_last_channels", "depth_head_norm_eps"):
        config.pop(name)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "chat_template.jinja").unlink()  # no template in the folder: Qwen3-VL's format is used
    preprocessor = json.loads((folder / "preprocessor_config.json").read_text())
    preprocessor["size"] = {"min_pixels": 65536, "max_pixels": 16777216}  # the older size layout
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    model = DepthVLM.from_pretrained(folder)
    rgb = scene_image(320, 224, fx=1000.0)
    k = Intrinsics.from_fx(320, 224, 1000.0)
    np.testing.assert_array_equal(model.predict_depth(rgb, k).depth_model, tiny_model.predict_depth(rgb, k).depth_model)
    state = load_file(folder / "model.safetensors")
    state["depth_head.scratch.layer2_rn.weight"] = torch.zeros(8, 32, 3, 3)  # inconsistent with layer1_rn
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="wrong shapes: depth_head.scratch.layer2_rn.weight"):
        DepthVLM.from_pretrained(folder)


def test_extreme_aspect_ratio_is_an_input_error(tiny_model):
    with pytest.raises(InputError, match="cannot be processed"):
        tiny_model.predict_depth(np.zeros((16, 4000, 3), np.uint8), Intrinsics.from_fx(4000, 16, 1000.0))


def test_tiny_initialisation_is_deterministic_by_seed(tmp_path, tiny_checkpoint):
    from depthvlm_ros.model.factory import make_tiny_checkpoint

    again = load_file(make_tiny_checkpoint(tmp_path / "again", seed=0) / "model.safetensors")
    other = load_file(make_tiny_checkpoint(tmp_path / "other", seed=1) / "model.safetensors")
    first = load_file(tiny_checkpoint / "model.safetensors")
    assert again.keys() == first.keys()
    assert all(torch.equal(again[k], first[k]) for k in first)
    last = "depth_head.scratch.output_conv2.2.weight"
    assert not torch.equal(other[last], first[last])
    assert not torch.equal(other["model.visual.patch_embed.proj.weight"], first["model.visual.patch_embed.proj.weight"])
    assert (tmp_path / "again" / "tokenizer.json").read_text() == (tiny_checkpoint / "tokenizer.json").read_text()


def test_a_model_loaded_without_weights_is_checked_as_strictly_and_reads_no_weight(tmp_path, tiny_checkpoint):
    """``weights=False`` (the node's answers: false): the same key checks, a model on ``meta`` (no storage),
    the processor as usual; a missing key is still refused."""
    model = DepthVLM.from_pretrained(tiny_checkpoint, weights=False)
    assert {p.device.type for p in model.model.parameters()} == {"meta"} and not model.has_weights
    full = DepthVLM.from_pretrained(tiny_checkpoint)
    assert model.processor.processed_size(320, 240) == full.processor.processed_size(320, 240)
    folder = copy_checkpoint(tiny_checkpoint, tmp_path / "damaged")
    state = load_file(folder / "model.safetensors")
    state.pop("depth_head.scratch.refinenet1.out_conv.bias")
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="depth_head.scratch.refinenet1.out_conv.bias"):
        DepthVLM.from_pretrained(folder, weights=False)


def test_camera_grid_head_is_within_its_stated_tolerance_of_the_model_grid(tiny_model):
    """The head's camera-grid output (``head_output: camera_grid``) against the released path (model grid, then
    resampled on the host), on this official-layout checkpoint: docs/model.md states the tolerance measured here
    (320x240, fx 277: mean |difference| 0.11 m, AbsRel 0.051, delta1 0.991); where the camera's grid is the model's,
    the two are one computation."""
    from depthvlm_ros.backends import BackendSpec
    from depthvlm_ros.evaluation.metrics import pair_metrics

    camera_grid = tiny_model.with_backend(BackendSpec(head_output="camera_grid"))
    k = Intrinsics.from_fx(320, 240, 277.0)
    rgb = scene_image(320, 240, 277.0)
    full, direct = tiny_model.predict_depth(rgb, k), camera_grid.predict_depth(rgb, k)
    assert full.depth_model.shape == (864, 1152) and direct.depth_model.shape == direct.depth.shape == (240, 320)
    assert direct.intrinsics_model == k
    metrics = pair_metrics(direct.depth, full.depth)
    assert np.abs(direct.depth - full.depth).mean() < 0.13 and metrics["abs_rel"] < 0.06 and metrics["delta1"] > 0.985
    assert metrics["abs_rel"] > 1e-3  # not the same computation: the bound is what is tested
    same = Intrinsics.from_fx(320, 224, 1000.0)  # the camera's grid is the model's: one computation
    rgb = scene_image(320, 224, 1000.0)
    np.testing.assert_array_equal(camera_grid.predict_depth(rgb, same).depth, tiny_model.predict_depth(rgb, same).depth)


def test_cameras_batched_equal_cameras_in_turn_frame_by_frame(tiny_model):
    """Frames of two cameras whose plans share a model-grid size go through one forward (``infer_batch``), a third
    camera of another size through its own; each frame's depth equals its camera's frame run alone (1e-5), on its own
    camera's grid and K."""
    cameras = [Intrinsics.from_fx(320, 240, 277.0), Intrinsics(279.0, 277.0, 161.0, 118.5, 320, 240),
               Intrinsics.from_fx(256, 192, 600.0)]
    plans = [tiny_model.plan(k) for k in cameras]
    assert plans[0] is not plans[1] and plans[0].size == plans[1].size != plans[2].size
    images = [scene_image(k.width, k.height, k.fx) for k in cameras]
    forwards = []  # the images of each vision-tower call
    hook = tiny_model.model.model.visual.register_forward_pre_hook(
        lambda _m, _args, kwargs: forwards.append(kwargs["grid_thw"].shape[0]), with_kwargs=True)
    try:
        batched = tiny_model.infer_batch(list(zip(plans, images)))
    finally:
        hook.remove()
    assert forwards == [2, 1]  # the two cameras of one size in one forward, the third alone
    for plan, rgb, got in zip(plans, images, batched):
        alone = tiny_model.infer(plan, [rgb])[0]
        assert got.intrinsics == alone.intrinsics == plan.image.camera
        assert got.depth.shape == (plan.image.camera.height, plan.image.camera.width)
        np.testing.assert_allclose(got.depth, alone.depth, rtol=1e-5, atol=1e-6)
    assert not np.allclose(batched[0].depth_model, batched[1].depth_model, rtol=1e-3)


def test_patch_embedding_as_a_matmul_equals_the_stock_conv3d(tiny_model):
    """The vision tower's patch embedding runs as ``F.linear`` over each flattened patch (faster on the CPU,
    docs/benchmarks.md); it equals the stock ``Conv3d`` (kernel = stride) with the same parameters, under the same
    state-dict keys, on a camera frame's pixels (< 1e-5)."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionPatchEmbed

    from depthvlm_ros.model.modeling import DepthVLMVisionPatchEmbed

    ours = tiny_model.model.model.visual.patch_embed
    assert type(ours) is DepthVLMVisionPatchEmbed
    stock = Qwen3VLVisionPatchEmbed(tiny_model.model.config.vision_config)
    stock.load_state_dict(ours.state_dict(), strict=True)  # same keys and shapes: checkpoints load unchanged
    k = Intrinsics.from_fx(320, 240, 277.0)
    pixels = tiny_model.plan(k).prepare([scene_image(320, 240, 277.0)]).pixel_values
    with torch.no_grad():
        got, want = ours(pixels), stock(pixels)
    assert got.shape == want.shape == (pixels.shape[0], stock.embed_dim)
    assert (got - want).abs().max() < 1e-5
    assert want.std() > 0.1  # embeddings that vary: the comparison can fail
