"""The trainer: losses, what each stage trains, LM labels, checkpoints that load and resume."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from depthvlm_ros.training.data import IGNORE_INDEX, Collator, SampleDataset, read_dataset_folder
from depthvlm_ros.training.trainer import (
    STAGES,
    answer_tokens,
    batch_delta1,
    lm_loss_sum,
    set_trainable,
    silog_per_image,
)

from conftest import depthvlm


def test_silog_is_scale_invariant_by_half_and_ignores_invalid_pixels():
    gt = torch.tensor([[[1.0, 2.0], [4.0, float("nan")]]])
    assert float(silog_per_image(gt.nan_to_num(1.0), gt)[0]) == pytest.approx(0.0, abs=1e-3)
    scaled = silog_per_image(gt.nan_to_num(1.0) * 2.0, gt)[0]  # g = ln 2 everywhere: sqrt((1 - 0.5)) * ln 2
    assert float(scaled) == pytest.approx(math.sqrt(0.5) * math.log(2.0), rel=1e-4)
    assert float(silog_per_image(gt.nan_to_num(1.0) * 2.0, gt, lam=1.0)[0]) == pytest.approx(0.0, abs=1e-3)
    empty = torch.full((1, 2, 2), float("nan"))
    assert float(silog_per_image(torch.ones(1, 2, 2), empty)[0]) == 0.0  # no valid pixel: no loss
    assert batch_delta1(torch.tensor([[1.0, 1.3]]), torch.tensor([[1.0, 1.0]])) == pytest.approx(0.5)


def test_lm_loss_counts_only_labelled_tokens():
    logits = torch.zeros(1, 4, 5)
    logits[0, 2, 3] = 10.0  # position 2 predicts token 3 confidently
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 3]])
    assert float(lm_loss_sum(logits, labels)) < 1e-3 and answer_tokens(labels) == 1
    assert float(lm_loss_sum(torch.zeros(1, 4, 5), labels)) == pytest.approx(math.log(5.0))  # uniform over 5
    assert float(lm_loss_sum(logits, torch.full((1, 4), IGNORE_INDEX))) == 0.0


@pytest.mark.parametrize("stage", STAGES)
def test_stages_train_what_the_recipe_says(tiny_model, stage):
    names = set(set_trainable(tiny_model.model, stage))
    all_names = {n for n, _ in tiny_model.model.named_parameters()}
    head = {n for n in all_names if n.startswith("depth_head.")}
    vision = {n for n in all_names if n.startswith("model.visual.")}
    if stage == 0:
        assert names == all_names
    elif stage == 1:
        assert names == head
    else:
        assert names == all_names - vision and head <= names
        assert any(n.startswith("model.language_model.") for n in names)
    set_trainable(tiny_model.model, 0)


def test_freeze_keeps_named_parameters_fixed_and_refuses_unknown_names(tiny_model):
    from depthvlm_ros.errors import InputError

    names = set(set_trainable(tiny_model.model, 0, ["model.visual.pos_embed"]))
    assert "model.visual.pos_embed.weight" not in names and "model.visual.patch_embed.proj.weight" in names
    with pytest.raises(InputError, match="--freeze model.visual.nothing"):
        set_trainable(tiny_model.model, 0, ["model.visual.nothing"])
    set_trainable(tiny_model.model, 0)


def test_collator_labels_exactly_the_answer(tiny_init, generated):
    from depthvlm_ros.pipeline import DepthVLM

    model = DepthVLM.from_pretrained(tiny_init)
    depth, qa = read_dataset_folder(generated, with_qa=True)
    data = SampleDataset([depth[0], qa[0]], model.processor)
    (batch,) = Collator(model.processor)([data[0], data[1]])
    tok = model.processor.tokenizer
    assert (batch.labels[0] == IGNORE_INDEX).all()  # depth prompt: no LM target
    answer = tok.decode([t for t in batch.labels[1].tolist() if t != IGNORE_INDEX])
    assert answer == qa[0].answer + "<|im_end|>"
    # 128x96 at fx ~55-220 has a canonical size over the model's 320x240 limit: it reaches the
    # model at 320x224 (the capped canonical size), like any camera would.
    assert batch.depth_target.shape[1:] == (224, 320)
    assert int(batch.attention_mask[0].sum()) < batch.input_ids.shape[1] == int(batch.attention_mask[1].sum())
    # The depth target is in model units: metres / (fx' / 1000) on the model's grid.
    ref = depth[0]
    gt = np.asarray(Image.open(ref.depth), dtype=np.float32) / 1000.0
    fx_model = ref.fx * 320 / ref.rgb_size[0]
    expected = np.nanmedian(np.where(gt > 0, gt, np.nan)) * 1000.0 / fx_model
    assert float(batch.depth_target[0].nanmedian()) == pytest.approx(expected, rel=0.05)


def test_tiny_init_vision_positions_start_as_a_2d_grid(tiny_init):
    """Stage 0 starts with the column and the row in the vision position table (grounding needs both)."""
    from depthvlm_ros.pipeline import DepthVLM
    from depthvlm_ros.training.tiny import sincos_position_table

    table = DepthVLM.from_pretrained(tiny_init).model.model.visual.pos_embed.weight.detach()
    assert torch.equal(table, sincos_position_table(32, table.shape[1]))
    grid = table.reshape(32, 32, -1)
    half = table.shape[1] // 2
    assert torch.equal(grid[0, :, :half], grid[17, :, :half])  # first half: the column only
    assert torch.equal(grid[:, 0, half:], grid[:, 17, half:])  # second half: the row only
    assert len({tuple(row.tolist()) for row in table}) == 1024  # every cell its own code


def test_each_draw_of_a_sample_flips_on_its_own_coin(tiny_init, generated):
    """Mirroring is drawn per (sample, draw): one depth sample is seen both ways over a run,
    reproducibly; question samples are never mirrored (their answers name points)."""
    from depthvlm_ros.pipeline import DepthVLM

    processor = DepthVLM.from_pretrained(tiny_init).processor
    depth, qa = read_dataset_folder(generated, with_qa=True)
    data = SampleDataset([depth[0], qa[0]], processor, flip=True, seed=0)
    plain = SampleDataset([depth[0]], processor, flip=False)[0]["target"]

    def close(a: np.ndarray, b: np.ndarray) -> bool:
        return np.allclose(a, b, rtol=1e-5, equal_nan=True)

    mirrored = [close(data[(0, draw)]["target"], plain[:, ::-1]) for draw in range(12)]
    same = [close(data[(0, draw)]["target"], plain) for draw in range(12)]
    assert all(m != s for m, s in zip(mirrored, same))  # each draw is one way or the other
    assert 0 < sum(mirrored) < 12
    again = SampleDataset([depth[0], qa[0]], processor, flip=True, seed=0)
    assert all(close(again[(0, d)]["target"], data[(0, d)]["target"]) for d in range(12))
    assert all(np.array_equal(data[(1, d)]["pixel_values"], data[(1, 0)]["pixel_values"]) for d in range(4))


@pytest.mark.processes
def test_train_stage0_saves_loadable_checkpoints_and_resumes(tmp_path, generated):
    from safetensors.torch import load_file

    from depthvlm_ros.pipeline import DepthVLM

    out = tmp_path / "run"
    common = ["--stage", "0", "--init-tiny", "--data", str(generated), "--out", str(out), "--batch-size", "2",
              "--save-every", "2", "--eval-data", str(generated), "--eval-every", "2", "--eval-limit", "2",
              "--workers", "0", "--warmup-steps", "1"]
    first = depthvlm("train", *common, "--steps", "2")
    assert first.returncode == 0, first.stderr
    assert "eval delta1" in first.stdout + first.stderr
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["state"]["step"] == 2 and state["config"]["stage"] == 0
    assert list((out / "logs").rglob("events.out.tfevents.*")), "no TensorBoard log"
    optimizer = load_file(str(out / "checkpoint-2" / "optimizer.safetensors"))
    assert any(k.endswith("::exp_avg") for k in optimizer)
    final = DepthVLM.from_pretrained(out / "final")  # the strict loader accepts what training wrote
    init = DepthVLM.from_pretrained(out / "init")
    assert not torch.equal(final.model.depth_head.norm.weight, init.model.depth_head.norm.weight)

    resumed = depthvlm("train", *common, "--steps", "4", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["state"]["step"] == 4
    assert "steps 2->4" in resumed.stdout + resumed.stderr


@pytest.mark.processes
def test_stage1_changes_only_the_head_and_stage2_never_the_vision_tower(tmp_path, generated, tiny_init):
    from safetensors.torch import load_file

    before = load_file(str(tiny_init / "model.safetensors"))
    for stage in (1, 2):
        out = tmp_path / f"s{stage}"
        run = depthvlm("train", "--stage", str(stage), "--init", str(tiny_init), "--data", str(generated),
                       "--out", str(out), "--steps", "2", "--batch-size", "2", "--lr", "1e-2", "--workers", "0",
                       "--warmup-steps", "1", "--save-every", "0")
        assert run.returncode == 0, run.stderr
        after = load_file(str(out / "final" / "model.safetensors"))
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert changed, f"stage {stage} changed nothing"
        if stage == 1:
            assert all(k.startswith("depth_head.") for k in changed), sorted(changed)[:3]
        else:
            assert not any(k.startswith("model.visual.") for k in changed)
            assert any(k.startswith("model.language_model.") for k in changed)


@pytest.mark.processes
def test_train_rejects_a_missing_model_folder_in_one_line(tmp_path):
    run = depthvlm("train", "--stage", "1", "--init", str(tmp_path / "missing"), "--data", str(tmp_path),
                   "--out", str(tmp_path / "o"), "--steps", "1")
    assert run.returncode == 3  # a model folder that cannot load: not bad input (errors.py)
    assert run.stderr.strip().splitlines()[-1].startswith("depthvlm: error:")


def test_packaging_stores_float16_weights_and_keeps_the_model_card(tmp_path, tiny_checkpoint):
    """The last step of scripts/train_tiny.sh: what ships is the trained folder rounded to float16."""
    import torch
    from safetensors.torch import load_file

    from depthvlm_ros.pipeline import DepthVLM
    from depthvlm_ros.training.tiny import package_model

    dest = tmp_path / "depthvlm-tiny"
    dest.mkdir()
    (dest / "README.md").write_text("model card")
    package_model(tiny_checkpoint, dest)
    assert (dest / "README.md").read_text() == "model card"
    packed, trained = load_file(str(dest / "model.safetensors")), load_file(str(tiny_checkpoint / "model.safetensors"))
    assert packed.keys() == trained.keys() and {v.dtype for v in packed.values()} == {torch.float16}
    assert all(torch.equal(packed[k], trained[k].half()) for k in trained)
    model = DepthVLM.from_pretrained(dest)
    assert model.dtype == torch.float32  # stored as float16, run in float32


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "final" / "model.safetensors"))


def _relative(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """||a - b|| / ||b|| over all weights of the model (float64)."""
    diff = sum(float((a[k].double() - b[k].double()).norm() ** 2) for k in b) ** 0.5
    return diff / sum(float(b[k].double().norm() ** 2) for k in b) ** 0.5


@pytest.mark.processes
@pytest.mark.slow
def test_two_processes_train_the_same_weights_as_one(tmp_path, generated, tiny_init):
    """DDP on two CPU processes (gloo, torchrun) with a global batch of 4 ends 5 steps of stage 0 with the
    weights one process gets from the same global batches: each process trains on its own half of every
    batch (depth samples on one, QA samples on the other here) and the halves' losses add up to the
    one-process loss. The model's weights agree within 1e-5 relative (float summation order differs:
    a few elements whose gradient is near zero take Adam's sign-like first step the other way), far
    inside what the training moved them, while another seed (other batches) ends far away. Two processes
    resumed from the step-3 checkpoint end where the uninterrupted two-process run did."""
    import os

    from safetensors.torch import load_file

    common = ["-m", "depthvlm_ros", "train", "--stage", "0", "--init", str(tiny_init), "--data", str(generated),
              "--batch-size", "4", "--steps", "5", "--save-every", "0", "--workers", "0", "--warmup-steps", "1",
              "--lr", "1e-4"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}  # torchrun's thread count, in all

    def train(*args: str, launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *launcher, *common, *args], capture_output=True, text=True,
                              timeout=600, env=env)

    one = train("--seed", "5", "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    two = train("--seed", "5", "--out", str(tmp_path / "two"), "--save-every", "3", launcher=torchrun)
    assert two.returncode == 0, two.stderr
    # --resume with two processes: from the step-3 checkpoint alone, the same 5 steps' end
    shutil.copytree(tmp_path / "two" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    resumed = train("--seed", "5", "--out", str(tmp_path / "resumed"), "--save-every", "3", "--resume",
                    launcher=torchrun)
    assert resumed.returncode == 0, resumed.stderr
    assert "steps 3->5" in resumed.stdout + resumed.stderr
    assert "2 process(es)" in two.stdout + two.stderr
    other = train("--seed", "6", "--out", str(tmp_path / "other"))
    assert other.returncode == 0, other.stderr
    a, b, c = _final_weights(tmp_path / "one"), _final_weights(tmp_path / "two"), _final_weights(tmp_path / "other")
    init = load_file(str(tiny_init / "model.safetensors"))
    assert set(a) == set(b) == set(init)
    moved = _relative(a, init)  # how far 5 steps moved the weights
    print(f"two vs one: {_relative(b, a):.2e} relative; training moved the weights {moved:.2e}")
    assert _relative(b, a) <= 1e-5 and _relative(b, a) <= 0.01 * moved, (_relative(b, a), moved)
    assert _relative(c, a) >= 0.5 * moved  # the tolerance tells training runs apart
    torch.testing.assert_close(_relative(_final_weights(tmp_path / "resumed"), b), 0.0, rtol=0, atol=1e-6)
    summary = json.loads((tmp_path / "two" / "train_summary.json").read_text())
    assert summary["processes"] == 2 and summary["state"]["step"] == 5
    assert not (tmp_path / "two" / "final.partial").exists()  # one process wrote the final folder


def test_an_fsdp_checkpoint_is_written_from_the_gathered_weights(tmp_path, tiny_checkpoint):
    """Under FSDP a process's module holds only its shard; checkpoints are written from the full weights
    ``accelerator.get_state_dict`` gathers. (Accelerate offers FSDP only on GPUs, so the sharding itself
    is not run here.) The folder written from a given state dict loads strictly and holds those weights,
    not the module's own; config/accelerate_fsdp.yaml names classes that exist."""
    import yaml

    from depthvlm_ros.pipeline import DepthVLM
    from depthvlm_ros.training.trainer import TrainConfig, TrainState, save_checkpoint

    loaded = DepthVLM.from_pretrained(tiny_checkpoint)
    gathered = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    key = "depth_head.scratch.output_conv2.2.bias"
    gathered[key] = gathered[key] + 1.0  # differs from the module's
    cfg = TrainConfig(stage=2, data=[], out=str(tmp_path), init=str(tiny_checkpoint))
    folder = save_checkpoint(tmp_path / "checkpoint-1", loaded.model, loaded.processor, None, cfg, TrainState(step=1),
                             state_dict=gathered)
    saved = DepthVLM.from_pretrained(folder).model.state_dict()
    torch.testing.assert_close(saved[key], gathered[key])
    assert not torch.equal(saved[key], loaded.model.state_dict()[key])
    config = yaml.safe_load((Path(__file__).resolve().parent.parent / "config" / "accelerate_fsdp.yaml").read_text())
    from transformers.models.qwen3_vl import modeling_qwen3_vl

    assert config["distributed_type"] == "FSDP" and config["fsdp_config"]["fsdp_version"] == 2
    for name in config["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"].split(","):
        assert hasattr(modeling_qwen3_vl, name), name
