"""Probes of a model's grounding: what it knows of where, and where it looks (no training; a few minutes).

``python -m depthvlm_ros.training.probes --model DIR --data DIR [--json F]`` on a generated set
(``depthvlm generate``; its object masks and QA ``places``) prints and writes:

- **column / row R^2** of a linear read-out (ridge, fit on 70 % of the images' tokens, scored on the
  rest) of each image token's position (0-1 across the image) from: the vision tower's merged output,
  each DeepStack level, and the LLM's image-token states after each layer (``llm_after{k}``; after the
  DeepStack addition where there is one). The image comes first in every prompt, so under the causal
  mask these states are the same for any question.
- **pointer**: teacher-forced on the true answers, for each LLM layer and head, the share of answer
  points whose x-predicting position (the ``[`` of ``"point_2d": [x, y]``) has its attention argmax over
  the image tokens on a cell that shows the named object; ``image_mass``: the share of that position's
  attention on image tokens.
- **hop**: the share of those positions whose attention argmax (over everything before them) is on the
  question's words naming the object.
- **distance ceiling**: distance questions measured on the model's own depth at the *true* answer point
  (the node's measurement code): the best the distance score can be with perfect pointing.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from depthvlm_ros.errors import DepthVLMError, InputError
from depthvlm_ros.files import write_text_atomic

#: Share of the probe images whose tokens fit the read-outs (the rest score them).
FIT_SHARE = 0.7
#: Ridge strength of the position read-outs (features standardised first).
RIDGE = 1e-2


def ridge_r2(features: np.ndarray, targets: np.ndarray, fit: np.ndarray) -> np.ndarray:
    """R^2 on the rows not in ``fit`` of a ridge regression fitted on ``fit`` rows; one per target column."""
    x = features.astype(np.float64)
    mean, std = x[fit].mean(axis=0), x[fit].std(axis=0) + 1e-6
    x = np.concatenate([(x - mean) / std, np.ones((len(x), 1))], axis=1)
    a = x[fit]
    w = np.linalg.solve(a.T @ a + RIDGE * len(a) * np.eye(a.shape[1]), a.T @ targets[fit])
    test = ~fit
    pred = x[test] @ w
    ss_res = ((targets[test] - pred) ** 2).sum(axis=0)
    ss_tot = ((targets[test] - targets[test].mean(axis=0)) ** 2).sum(axis=0)
    return 1.0 - ss_res / np.maximum(ss_tot, 1e-12)


def _qa_records(data: Path) -> list[dict[str, Any]]:
    path = data / "qa.jsonl"
    if not path.is_file():
        raise InputError(f"{data}: no qa.jsonl (make one with depthvlm generate)")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not any("places" in r and "mask_path" in r for r in records):
        raise InputError(f"{data}: its QA records have no places or masks (generate it again with this version)")
    return records


#: The fields of a collated batch the model's forward takes.
MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")


class Probe:
    """The probes of one model (a :class:`~depthvlm_ros.pipeline.DepthVLM`, eval mode) on one generated set."""

    def __init__(self, vlm: Any, data: Path, questions: int = 200, frames: int = 40, seed: int = 0) -> None:
        from depthvlm_ros.training.data import read_qa_samples

        self.vlm = vlm
        self.data = data
        records = _qa_records(data)
        refs = read_qa_samples(data / "qa.jsonl", data)
        pairs = [(r, ref) for r, ref in zip(records, refs) if ref.places and ref.mask is not None]
        random.Random(seed).shuffle(pairs)
        self.questions = pairs[:questions]
        seen: dict[str, Any] = {}
        for _, ref in pairs:
            seen.setdefault(str(ref.image), ref)
        self.frames = list(seen.values())[:frames]

    # -- where the states know they are -----------------------------------------------------------------

    def positions(self) -> dict[str, dict[str, float]]:
        """Column and row R^2 per site (see the module docstring)."""
        from depthvlm_ros.model.processing import DEPTH_PROMPT
        from depthvlm_ros.pipeline.plan import image_plan, model_input_size, prompt_inputs
        from depthvlm_ros.training.data import load_sample
        from depthvlm_ros.training.grounding import GroundingTaps, position_targets

        model, processor = self.vlm.model, self.vlm.processor
        device = next(model.parameters()).device  # the model's (the trainer's GPU); results come back to numpy
        n_layers = len(model.model.language_model.layers)
        taps = GroundingTaps(model, input_layers=range(1, n_layers), output_layers=[n_layers - 1], vision=True)
        sites: dict[str, list[np.ndarray]] = {}
        targets, image_of = [], []
        try:
            for number, ref in enumerate(self.frames):
                rgb, _, k = load_sample(ref)
                plan = image_plan(processor, k, model_input_size(processor, k))
                inputs = prompt_inputs(processor, plan, DEPTH_PROMPT, plan.pixel_values(rgb)).to(device)
                taps.clear()
                with torch.no_grad():
                    model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                          pixel_values=inputs.pixel_values, image_grid_thw=inputs.image_grid_thw,
                          mm_token_type_ids=inputs.mm_token_type_ids, return_logits=False)
                ids = inputs.input_ids[0].cpu()
                span = (ids == processor.image_token_id).nonzero()[:, 0]
                start, n = int(span[0]), len(span)
                _, gh, gw = plan.grid_thw()
                grid_h, grid_w = gh // processor.merge_size, gw // processor.merge_size
                found = {"vision": taps.vision.pooler_output}
                for level, feature in enumerate(taps.vision.deepstack_features):
                    found[f"deepstack{level}"] = feature
                for layer in range(1, n_layers):
                    found[f"llm_after{layer - 1}"] = taps.inputs[layer][0, start:start + n]
                found[f"llm_after{n_layers - 1}"] = taps.outputs[n_layers - 1][0, start:start + n]
                for name, value in found.items():
                    sites.setdefault(name, []).append(value.reshape(n, -1).float().cpu().numpy())
                targets.append(position_targets(grid_h, grid_w)[:, :2].numpy())
                image_of += [number] * n
        finally:
            taps.remove()
        if len(self.frames) < 4:
            raise InputError(f"{self.data}: the position probe needs at least 4 frames with QA, found "
                             f"{len(self.frames)}")
        image_of_arr = np.array(image_of)
        fit = image_of_arr < max(1, int(round(FIT_SHARE * len(self.frames))))
        y = np.concatenate(targets)
        out = {}
        for name, values in sites.items():
            r2 = ridge_r2(np.concatenate(values), y, fit)
            out[name] = {"column_r2": float(r2[0]), "row_r2": float(r2[1])}
        return out

    # -- where the answer looks ---------------------------------------------------------------------------

    def attention(self) -> dict[str, Any]:
        """Pointer and hop rates per LLM layer and head, image mass, and the distance ceiling."""
        from depthvlm_ros.evaluation.qa import distance_error
        from depthvlm_ros.geometry import resize_depth
        from depthvlm_ros.pipeline.plan import image_plan, model_input_size
        from depthvlm_ros.spatial import answer_measurement
        from depthvlm_ros.training.data import Collator, SampleDataset, load_sample
        from depthvlm_ros.training.grounding import GroundingTaps

        model, processor = self.vlm.model, self.vlm.processor
        device = next(model.parameters()).device
        n_layers = len(model.model.language_model.layers)
        n_heads = int(model.config.text_config.num_attention_heads)
        dataset = SampleDataset([ref for _, ref in self.questions], processor, grounding=True)
        collate = Collator(processor, grounding=True)
        taps = GroundingTaps(model, attention_layers=range(n_layers))
        pointer = np.zeros((n_layers, n_heads))
        hop = np.zeros((n_layers, n_heads))
        mass = np.zeros((n_layers, n_heads))
        points = worded = 0
        ceiling = []
        try:
            for index, (record, ref) in enumerate(self.questions):
                (batch,) = collate([dataset[index]])
                taps.clear()
                with torch.no_grad():
                    out = model(**{name: getattr(batch, name).to(device) for name in MODEL_INPUTS}, return_logits=False)
                places = batch.places
                start = int((batch.input_ids[0] == processor.image_token_id).nonzero()[0, 0])
                n = places.cells.shape[1]
                for p in range(len(places.rows)):
                    x_pos = int(places.x_pos[p])
                    cells, words = places.cells[p], places.words[p]
                    for layer in range(n_layers):
                        row = taps.attention[layer][0, :, x_pos].cpu()  # (heads, L)
                        if float(cells.sum()) > 0:
                            image = row[:, start:start + n]
                            pointer[layer] += (cells[image.argmax(dim=1)] > 0).float().numpy()
                            mass[layer] += image.sum(dim=1).numpy()
                        if float(words.sum()) > 0:
                            hop[layer] += (words[row[:, : x_pos + 1].argmax(dim=1)] > 0).float().numpy()
                    points += float(cells.sum()) > 0
                    worded += float(words.sum()) > 0
                if record["qa_kind"] == "distance":
                    rgb, _, k = load_sample(ref)
                    plan = image_plan(processor, k, model_input_size(processor, k))
                    depth = resize_depth(plan.metric(out.depth[0].float().cpu().numpy()), *k.size)
                    found = answer_measurement(record["answer"], depth, k, k.size)
                    measured = found.measurement.distance_m if found is not None else math.nan
                    ceiling.append(distance_error(measured, float(record["truth"]["distance_m"]))[1])
        finally:
            taps.remove()
        table = lambda counts, total: [[round(float(v) / max(total, 1), 4) for v in row] for row in counts]  # noqa: E731
        return {"points": points, "pointer": table(pointer, points), "image_mass": table(mass, points),
                "worded": worded, "hop": table(hop, worded),
                "distance_ceiling": {"rate": float(np.mean(ceiling)) if ceiling else None, "n": len(ceiling)}}

    def run(self) -> dict[str, Any]:
        from depthvlm_ros.training.grounding import use_eager_text_attention

        model = self.vlm.model
        was = model.config.text_config._attn_implementation
        was_training = model.training
        use_eager_text_attention(model)
        model.eval()
        try:
            return {"positions": self.positions(), **self.attention(), "frames": len(self.frames),
                    "questions": len(self.questions)}
        finally:
            model.config.text_config._attn_implementation = was
            model.model.language_model.config._attn_implementation = was
            model.train(was_training)


def head_rate(table: Sequence[Sequence[float]], heads: Sequence[tuple[int, int]]) -> float:
    """Mean of a per-layer-per-head table over ``heads`` (``(layer, head)``)."""
    return float(np.mean([table[layer][head] for layer, head in heads])) if heads else math.nan


def markdown(result: dict[str, Any]) -> str:
    """The probe tables as Markdown (the model card's form)."""
    lines = ["| site | column R^2 | row R^2 |", "|---|---|---|"]
    lines += [f"| {name} | {v['column_r2']:.2f} | {v['row_r2']:.2f} |" for name, v in result["positions"].items()]
    heads = len(result["pointer"][0])
    lines += ["", f"Teacher-forced, {result['points']} answer points ({result['questions']} questions): share whose "
              "x position's attention argmax is on the named object (pointer), attention mass on image tokens, "
              f"argmax on the question's words naming it (hop, {result['worded']} points).", "",
              "| layer | " + " | ".join(f"head {h} pointer / mass / hop" for h in range(heads)) + " |",
              "|---" * (heads + 1) + "|"]
    for layer, (p, m, h) in enumerate(zip(result["pointer"], result["image_mass"], result["hop"])):
        lines.append(f"| {layer} | " + " | ".join(f"{a:.2f} / {b:.2f} / {c:.2f}" for a, b, c in zip(p, m, h)) + " |")
    ceiling = result["distance_ceiling"]
    if ceiling["rate"] is not None:
        lines += ["", f"Distance ceiling (true point, the model's depth): {100 * ceiling['rate']:.1f} % within 25 % "
                      f"(n={ceiling['n']})."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m depthvlm_ros.training.probes``: the grounding probes on --data, printed as Markdown and written
    to --json (exit code 0, or a DepthVLMError's)."""
    from depthvlm_ros.pipeline import DepthVLM

    parser = argparse.ArgumentParser(prog="python -m depthvlm_ros.training.probes", description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: the built-in model)")
    parser.add_argument("--data", type=Path, required=True, help="generated folder (depthvlm generate)")
    parser.add_argument("--questions", type=int, default=200)
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    try:
        from depthvlm_ros.model.default import resolve_model

        vlm = DepthVLM.from_pretrained(resolve_model(args.model)[0])
        result = Probe(vlm, args.data, args.questions, args.frames).run()
    except DepthVLMError as exc:
        print(f"probes: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(markdown(result))
    if args.json is not None:
        write_text_atomic(args.json, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
