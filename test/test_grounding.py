"""Teaching the built-in model to point (training/grounding.py, training/probes.py): the targets the losses are
built from, the losses themselves, a run that trains and resumes with them, and the probes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from depthvlm_ros.training.grounding import (
    CoordinateVocab,
    cell_fractions,
    lm_loss_sum_soft,
    mirror_qa_text,
    parse_heads,
    position_targets,
)
from depthvlm_ros.training.trainer import lm_loss_sum

from conftest import depthvlm


@pytest.fixture(scope="module")
def processor(tiny_init: Path):
    from depthvlm_ros.pipeline import DepthVLM

    return DepthVLM.from_pretrained(tiny_init).processor


@pytest.fixture(scope="module")
def vocab(processor) -> CoordinateVocab:
    return CoordinateVocab.from_tokenizer(processor.tokenizer)


def test_every_answer_coordinate_is_one_token_of_its_own_axis(vocab, processor):
    assert len(vocab.x_ids) == len(vocab.y_ids) == 101 and not set(vocab.x_ids) & set(vocab.y_ids)
    answer = '[{"point_2d": [450, 320], "label": "red chair"}, {"point_2d": [0, 1000], "label": "blue box"}] x'
    ids = processor.tokenizer.encode(answer, add_special_tokens=False)
    places = vocab.places(ids, 0)
    assert [(vocab.values[ids[x + 1]], vocab.values[ids[y + 1]]) for x, y in places] == [(450, 320), (0, 1000)]
    assert all(ids[x] == vocab.open_id and ids[y] == vocab.comma_id for x, y in places)


def test_a_mirrored_image_gets_mirrored_points_in_answers_and_questions():
    question, answer = mirror_qa_text("What is at (120, 340)?", '{"point_2d": [120, 340], "label": "floor"} The floor.')
    assert question == "What is at (880, 340)?"
    assert answer == '{"point_2d": [880, 340], "label": "floor"} The floor.'
    _, two = mirror_qa_text("How far apart are the a and the b?",
                            '[{"point_2d": [0, 5], "label": "a"}, {"point_2d": [1000, 7], "label": "b"}] 2.0 m')
    assert two == '[{"point_2d": [1000, 5], "label": "a"}, {"point_2d": [0, 7], "label": "b"}] 2.0 m'


def test_cell_fractions_are_the_objects_share_of_each_model_grid_cell():
    mask = np.full((48, 64), -1, np.int16)
    mask[:24, :16] = 3  # object 3: the top-left quarter of the image's width, top half
    cells = cell_fractions(mask, 3, (128, 96), 32)  # model grid 128x96 = 4x3 cells of 32 px (2x the mask)
    grid = cells.reshape(3, 4)
    assert cells.sum() == pytest.approx(1.0)
    # model rows 0-47 of 96: all of cell row 0 (rows 0-31), half of cell row 1 (32-63)
    assert grid[0, 0] == pytest.approx(2 / 3) and grid[1, 0] == pytest.approx(1 / 3)
    assert grid[:, 1:].sum() == 0 and grid[2].sum() == 0
    assert cell_fractions(mask, 7, (128, 96), 32).sum() == 0  # not in the image: no target


def test_position_targets_run_left_to_right_and_top_to_bottom():
    t = position_targets(2, 3)
    assert t.shape == (6, 10)
    assert t[:3, 0].tolist() == pytest.approx([1 / 6, 3 / 6, 5 / 6]) and t[:3, 1].tolist() == pytest.approx([0.25] * 3)
    assert t[3:, 1].tolist() == pytest.approx([0.75] * 3)


def test_heads_are_named_layer_dot_head():
    assert parse_heads("2.2, 3.3") == ((2, 2), (3, 3))
    from depthvlm_ros.errors import InputError

    with pytest.raises(InputError, match="LAYER.HEAD"):
        parse_heads("2")


def test_soft_coordinates_cost_a_near_miss_less_and_leave_other_tokens_alone(vocab):
    vocab_size = max(max(vocab.x_ids), max(vocab.y_ids), vocab.open_id) + 1
    x450 = next(i for i in vocab.x_ids if vocab.values[i] == 450)
    near = next(i for i in vocab.x_ids if vocab.values[i] == 460)
    far = next(i for i in vocab.x_ids if vocab.values[i] == 900)
    labels = torch.tensor([[-100, vocab.open_id, x450]])

    def logits_favouring(token: int) -> torch.Tensor:
        logits = torch.zeros(1, 3, vocab_size)
        logits[0, 1, token] = 8.0  # position 1 predicts token 2 (the x)
        logits[0, 0, vocab.open_id] = 8.0
        return logits

    # weight 1 and no smoothing: exactly the plain LM loss
    for token in (x450, near, far):
        assert lm_loss_sum_soft(logits_favouring(token), labels, vocab, 1.0, 0.0) == pytest.approx(
            float(lm_loss_sum(logits_favouring(token), labels)), rel=1e-6)
    near_cost = float(lm_loss_sum_soft(logits_favouring(near), labels, vocab, 1.0, 15.0))
    far_cost = float(lm_loss_sum_soft(logits_favouring(far), labels, vocab, 1.0, 15.0))
    assert near_cost < far_cost  # one-hot cross-entropy would charge both the same
    one_hot = lm_loss_sum(logits_favouring(near), labels)
    assert lm_loss_sum(logits_favouring(far), labels) == pytest.approx(float(one_hot))
    # the weight multiplies the coordinate's term only
    open_term = float(lm_loss_sum(logits_favouring(x450)[:, :2], labels[:, :2]))
    coord_term = float(lm_loss_sum(logits_favouring(x450), labels)) - open_term
    assert float(lm_loss_sum_soft(logits_favouring(x450), labels, vocab, 3.0, 0.0)) == pytest.approx(
        open_term + 3.0 * coord_term, rel=1e-5)


def test_generated_places_name_the_objects_their_points_lie_on(generated):
    from depthvlm_ros.scenes.dataset import read_object_mask
    from depthvlm_ros.scenes.qa import pixel_of_relative
    from depthvlm_ros.spatial import parse_grounding

    checked = 0
    for line in (generated / "qa.jsonl").read_text().splitlines():
        record = json.loads(line)
        mask = read_object_mask(generated / record["mask_path"])
        width, height = record["original_rgb_size"]
        assert mask.shape == (height, width)
        points = parse_grounding(record["answer"])
        if record["qa_kind"] == "at_pixel":
            assert record["places"] == []
            continue
        assert len(record["places"]) == len(points)
        for index, place in zip(record["places"], points):
            u, v = pixel_of_relative(*place.coords, width, height)
            assert mask[v, u] == index
            checked += 1
    assert checked >= 10


def test_the_collator_finds_each_points_positions_object_cells_and_named_words(generated, processor):
    from depthvlm_ros.training.data import Collator, SampleDataset, read_dataset_folder

    _, qa = read_dataset_folder(generated, with_qa=True)
    refs = [r for r in qa if r.places][:6]
    dataset = SampleDataset(refs, processor, grounding=True)
    collate = Collator(processor, grounding=True)
    vocab = collate.vocab
    tokenizer = processor.tokenizer
    for i, ref in enumerate(refs):
        (batch,) = collate([dataset[i]])
        places = batch.places
        ids = batch.input_ids[0].tolist()
        assert len(places.rows) == len(ref.places)
        for p, (_, label) in enumerate(ref.places):
            x, y = int(places.x_pos[p]), int(places.y_pos[p])
            assert ids[x] == vocab.open_id and ids[x + 1] in vocab.x_ids and ids[y + 1] in vocab.y_ids
            assert batch.labels[0, x + 1] == ids[x + 1]  # the answer's own token: what the LM loss trains
            assert places.cells[p].sum() == pytest.approx(1.0, abs=1e-5)
            named = places.words[p].nonzero()[:, 0].tolist()
            assert tokenizer.decode([ids[j] for j in named]).strip() == label
            assert max(named) < x  # in the question, before the answer


@pytest.mark.processes
def test_a_grounded_run_trains_saves_its_readouts_apart_and_resumes(tmp_path, generated, tiny_init):
    """Every loss on: the run writes checkpoints whose model folder loads strictly (the readouts in
    grounding.safetensors beside it), logs the probes, and --resume continues from a checkpoint that a kill
    left next to a half-written one."""
    from depthvlm_ros.pipeline import DepthVLM

    out = tmp_path / "run"
    common = ["train", "--stage", "0", "--init", str(tiny_init), "--data", str(generated), "--out", str(out),
              "--batch-size", "4", "--qa-fraction", "0.75", "--save-every", "2", "--mirror-qa",
              "--pointer-weight", "1", "--hop-weight", "1", "--position-weight", "1", "--coord-weight", "3",
              "--coord-sigma", "15", "--probe-data", str(generated), "--probe-every", "2"]
    run = depthvlm(*common, "--steps", "2")
    assert run.returncode == 0, run.stderr[-3000:]
    checkpoint = out / "checkpoint-2"
    assert (checkpoint / "grounding.safetensors").is_file() and (checkpoint / "optimizer.safetensors").is_file()
    DepthVLM.from_pretrained(checkpoint)  # strict: no key of the readouts in the model's weights
    summary = json.loads((out / "train_summary.json").read_text())
    probes = summary["history"][-1]["probes"]
    assert 0.0 <= probes["pointer"] <= 1.0 and 0.0 <= probes["hop"] <= 1.0 and "column_r2.vision" in probes
    assert math.isfinite(summary["running"]["pointer"]) and math.isfinite(summary["running"]["position"])
    # a kill mid-save leaves a partial folder: --resume takes the whole checkpoint and ignores it
    (out / "checkpoint-9.partial").mkdir()
    (out / "checkpoint-9.partial" / "trainer_state.json").write_text("{}")
    resumed = depthvlm(*common, "--steps", "4", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((out / "train_summary.json").read_text())["state"]["step"] == 4
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-9.partial"]


@pytest.mark.processes
def test_a_gate_that_does_not_hold_stops_the_run_with_exit_3(tmp_path, generated, tiny_init):
    out = tmp_path / "gated"
    run = depthvlm("train", "--stage", "0", "--init", str(tiny_init), "--data", str(generated), "--out", str(out),
                   "--steps", "5", "--batch-size", "4", "--pointer-weight", "1", "--probe-data", str(generated),
                   "--gate", "pointer>=1.01@1")
    assert run.returncode == 4, run.stderr[-3000:]
    assert "gate pointer>=1.01@1 did not hold" in run.stderr and (out / "checkpoint-1").is_dir()
    assert not (out / "final").exists()
    bad = depthvlm("train", "--stage", "0", "--init", str(tiny_init), "--data", str(generated), "--out", str(out),
                   "--gate", "pointer=1")
    assert bad.returncode == 2 and "METRIC>=VALUE@STEP" in bad.stderr


def test_probes_report_positions_pointer_hop_and_the_distance_ceiling(generated, tiny_init):
    from depthvlm_ros.pipeline import DepthVLM
    from depthvlm_ros.training.probes import Probe, markdown

    vlm = DepthVLM.from_pretrained(tiny_init)
    result = Probe(vlm, generated, questions=20, frames=8).run()
    layers = vlm.model.config.text_config.num_hidden_layers
    heads = vlm.model.config.text_config.num_attention_heads
    assert set(result["positions"]) == {"vision", "deepstack0", "deepstack1", "deepstack2",
                                        *(f"llm_after{k}" for k in range(layers))}
    for table in ("pointer", "image_mass", "hop"):
        assert np.shape(result[table]) == (layers, heads)
        assert all(0.0 <= v <= 1.0 for row in result[table] for v in row)
    assert result["points"] > 0 and result["worded"] > 0
    # the fixed sine-cosine position table of a fresh tiny model: the vision tower's output knows the column
    assert result["positions"]["vision"]["column_r2"] > 0.5
    assert vlm.model.config.text_config._attn_implementation != "eager"  # the probe put it back
    assert "| vision |" in markdown(result)
