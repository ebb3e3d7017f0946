"""The plan's preprocessing against the stock image processor, and the one depth path."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from depthvlm_ros.backends.torch_backend import execution_settings
from depthvlm_ros.geometry import Intrinsics
from depthvlm_ros.model.factory import QWEN3_VL_PREPROCESSOR
from depthvlm_ros.model.preprocess import MAX_GREY_LEVELS, PixelLayout, bicubic_resize_like_pil, preprocess_image
from depthvlm_ros.model.processing import DEPTH_PROMPT, ImageTextProcessor
from depthvlm_ros.pipeline import RouteSettings, image_plan, model_input_size
from depthvlm_ros.training.data import Collator
from depthvlm_ros.training.trainer import forward_losses

from conftest import scene_image

pytestmark = pytest.mark.model_core


@pytest.fixture(scope="module")
def released_processor(tiny_model) -> ImageTextProcessor:
    """The 4B checkpoint's image processor settings (16.7 M px) with the tiny tokenizer."""
    settings = {k: v for k, v in QWEN3_VL_PREPROCESSOR.items() if k != "image_processor_type"}
    return ImageTextProcessor(tiny_model.processor.tokenizer, Qwen2VLImageProcessorPil(**settings),
                              tiny_model.processor.chat_template)


def stock_pixels(processor: ImageTextProcessor, rgb: np.ndarray, resizes: list[tuple[int, int]]) -> torch.Tensor:
    """The stock path: PIL canonical resize, then the stock processor (its own resize and all)."""
    from PIL import Image

    image = Image.fromarray(rgb)
    for size in resizes[:-1]:
        image = image.resize(size, Image.Resampling.BICUBIC)
    return processor([np.asarray(image)], DEPTH_PROMPT).pixel_values


def noise(width: int, height: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("image", ["noise", "scene"])
@pytest.mark.parametrize(("width", "height", "fx", "released"), [
    (640, 480, 525.0, True),  # canonical route of the 4B config: 1219x914, then the snap to 1216x928
    (640, 480, 525.0, False),  # the tiny model's max_pixels: one direct resize to 320x224
    (320, 240, 1100.0, True),  # enlarged by min_pixels
])
def test_fast_preprocessing_is_within_the_stated_tolerance_of_the_stock_processor(
    tiny_model, released_processor, image, width, height, fx, released
):
    processor = released_processor if released else tiny_model.processor
    k = Intrinsics.from_fx(width, height, fx)
    rgb = noise(width, height) if image == "noise" else scene_image(width, height, fx)
    plan = image_plan(processor, k, model_input_size(processor, k))
    want = stock_pixels(processor, rgb, list(plan.resizes))
    exact = plan.pixel_values(rgb, exact=True)
    assert exact.shape == want.shape and plan.grid_thw() == processor([rgb], DEPTH_PROMPT).image_grid_thw[0].tolist() \
        or plan.resizes[0] != (width, height)
    np.testing.assert_allclose(exact.numpy(), want.numpy(), atol=1e-6)  # PIL's pixels: only float rounding
    fast = plan.pixel_values(rgb)
    grey = (fast - want).abs() * 127.5  # normalised by mean 0.5, std 0.5: one grey level = 1/127.5
    n_resizes = sum(1 for a, b in zip(((width, height),) + plan.resizes, plan.resizes) if a != b)
    assert float(grey.max()) <= MAX_GREY_LEVELS * n_resizes + 1e-3
    assert float((grey > 0.5).float().mean()) < 0.05
    assert float(grey.mean()) < 0.05


def test_float_resampler_for_gpus_holds_the_same_tolerance():
    # The CUDA path's float kernel (two rounded passes), run here on the CPU.
    from PIL import Image

    rgb = noise(640, 480, seed=3)
    for size in ((1219, 914), (320, 224), (700, 500)):
        want = torch.from_numpy(np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BICUBIC)).copy())
        got = bicubic_resize_like_pil(torch.from_numpy(rgb).permute(2, 0, 1)[None].float(), *size)
        diff = (got[0].permute(1, 2, 0) - want.float()).abs()
        assert float(diff.max()) <= MAX_GREY_LEVELS and float((diff > 0).float().mean()) < 0.02


def test_patchify_is_the_processors_layout(tiny_model):
    # No resize: the pixels equal the stock processor's up to float rounding.
    rgb = noise(320, 224, seed=5)
    layout = PixelLayout.from_image_processor(tiny_model.processor.image_processor)
    got = preprocess_image(rgb, [(320, 224)], layout)
    np.testing.assert_allclose(got.numpy(), tiny_model.processor([rgb], DEPTH_PROMPT).pixel_values.numpy(), atol=1e-6)


def test_plan_is_made_once_per_camera_and_follows_camera_info(tiny_model):
    k = Intrinsics.from_fx(320, 240, 300.0)
    plan = tiny_model.plan(k)
    assert tiny_model.plan(k) is plan  # the same camera and settings: not planned again
    assert tiny_model.plan(Intrinsics.from_fx(320, 240, 310.0)) is not plan  # new camera_info: new plan
    assert tiny_model.plan(k, RouteSettings(max_side=512)).size[0] <= 512 < plan.size[0]
    assert plan.image.camera == k and plan.image.model_k.size == plan.size


def test_trainer_optimises_the_depth_the_robot_runs(tiny_model):
    # The trainer's forward and the inference path (static prompt, torch backend) give one depth.
    k = Intrinsics.from_fx(320, 240, 277.0)
    rgb = scene_image(320, 240, 277.0)
    plan = image_plan(tiny_model.processor, k, model_input_size(tiny_model.processor, k))
    sample = {"pixel_values": plan.pixel_values(rgb), "grid_thw": plan.grid_thw(), "question": None, "answer": None,
              "target": np.ones((plan.size[1], plan.size[0]), np.float32)}
    (batch,) = Collator(tiny_model.processor)([sample])
    with torch.no_grad():
        trained = forward_losses(tiny_model.model, batch, stage=2)["depth"][0].numpy()
    served = tiny_model.infer(tiny_model.plan(k, exact=False), [rgb])[0]  # the node's way
    assert served.depth_model.shape == trained.shape
    np.testing.assert_allclose(served.depth_model / np.float32(plan.scale), trained, rtol=1e-5, atol=1e-6)
    assert trained.std() > 0.01 * trained.mean()  # a depth that varies: the comparison can fail


def test_static_prompt_forward_equals_the_stock_prefill(tiny_model):
    """The depth path's static prompt, which drops the prompt's tokens after the image, gives the depth of the
    whole prompt's stock prefill (and of a static prompt that keeps them)."""
    k = Intrinsics.from_fx(320, 240, 277.0)
    plan = tiny_model.plan(k)
    inputs = plan.prepare([scene_image(320, 240, 277.0), scene_image(320, 240, 350.0)])
    model = tiny_model.model
    short, whole = model.static_prompt(inputs), model.static_prompt(inputs, keep_suffix=True)
    assert short.position_ids.shape[-1] == short.end < whole.position_ids.shape[-1] == inputs.input_ids.shape[1]
    with torch.no_grad():
        dynamic = model(**inputs.model_kwargs(), return_logits=False).depth
        static = model(pixel_values=inputs.pixel_values, static_prompt=short).depth
        kept = model(pixel_values=inputs.pixel_values, static_prompt=whole).depth
    torch.testing.assert_close(static, dynamic, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kept, dynamic, rtol=1e-5, atol=1e-6)


def test_static_depth_path_traces_as_one_graph_with_no_host_sync(tiny_model):
    """The depth path over a static prompt (two images of one plan: the vision tower's whole-image attention and
    DeepStack's span injection) is one graph for torch.compile: no graph break, hence no ``tolist``, ``nonzero`` or
    ``.cpu()`` of a tensor in the frame's path."""
    import torch._dynamo

    k = Intrinsics.from_fx(256, 192, 1000.0)
    inputs = tiny_model.plan(k).prepare([scene_image(256, 192, 1000.0), scene_image(256, 192, 700.0)])
    model = tiny_model.model
    for output_size in (None, (240, 320)):  # the model grid, and a camera's grid (head_output camera_grid)
        # the torch backend's prompt on this device (its execution settings: the head in channels-last memory)
        prompt = dataclasses.replace(model.static_prompt(inputs, output_size=output_size),
                                     **execution_settings(model, torch.device("cpu")))
        assert prompt.channels_last
        with torch.no_grad():
            explained = torch._dynamo.explain(model.forward)(pixel_values=inputs.pixel_values, static_prompt=prompt)
        assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
        assert explained.graph_count == 1
