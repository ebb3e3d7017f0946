"""Training samples from DepthVLM-Bench JSONL files: depth records and spatial QA records.

A depth record (any Bench JSONL) gives an image, its z-depth and fx; a QA record (``qa.jsonl``
from ``depthvlm generate``: the same fields plus ``question`` and ``answer``) adds a text target.
Both go through the inference pipeline's own :class:`~depthvlm_ros.pipeline.plan.ImagePlan` (the node's preprocessing),
so the model trains on exactly the inputs it will see, and the depth target is in the model's
units (metres / depth scale) on the model's grid.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from depthvlm_ros.errors import InputError
from depthvlm_ros.evaluation.benchmark_data import BadRecord, bench_intrinsics, iter_records, read_depth_file
from depthvlm_ros.geometry import Intrinsics, resize_depth
from depthvlm_ros.model.processing import DEPTH_PROMPT, ImageTextProcessor
from depthvlm_ros.pipeline.plan import image_plan, model_input_size
from depthvlm_ros.scenes.dataset import read_object_mask
from depthvlm_ros.training.grounding import PlaceTargets, label_positions

#: Label value that the LM loss ignores (prompt and image tokens).
IGNORE_INDEX = -100
#: Longest answer (characters) a QA record may have.
MAX_ANSWER_CHARS = 512


@dataclass(frozen=True)
class SampleRef:
    """Where one sample lives: image and depth paths, fx, and the text (None = depth prompt only)."""

    image: Path
    depth: Path
    depth_scale: float
    rgb_size: tuple[int, int]
    fx: float
    question: str | None = None
    answer: str | None = None
    mask: Path | None = None  # object index mask (generated datasets): the grounding losses' targets
    places: tuple[tuple[int, str], ...] = ()  # (object index in the mask, label) of each point of the answer


def read_depth_samples(jsonl: Path, rgb_root: Path, depth_root: Path) -> list[SampleRef]:
    """Every valid record of a Bench JSONL (bad records are skipped with a count in the error)."""
    out, bad = [], 0
    for record in iter_records(jsonl):
        if isinstance(record, BadRecord):
            bad += 1
            continue
        out.append(SampleRef(rgb_root / record.image, depth_root / record.depth_path, record.depth_scale,
                             record.rgb_size, record.fx))
    if not out:
        raise InputError(f"{jsonl}: no usable records ({bad} bad)")
    return out


def read_qa_samples(jsonl: Path, root: Path) -> list[SampleRef]:
    """QA records (``question``/``answer`` + the Bench image fields) of a generated dataset."""
    out = []
    with open(jsonl) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                question, answer = str(r["question"]), str(r["answer"])
                size = (int(r["original_rgb_size"][0]), int(r["original_rgb_size"][1]))
                labels = {int(o["index"]): str(o["label"]) for o in r.get("truth", {}).get("objects", [])
                          if "index" in o}
                places = tuple((int(i), labels[int(i)]) for i in r.get("places", []) if int(i) in labels)
                mask = root / r["mask_path"] if "mask_path" in r else None
                ref = SampleRef(root / r["image"], root / r["depth_path"], float(r.get("depth_scale", 1000.0)),
                                size, float(r["original_fx"]), question, answer, mask, places)
            except (ValueError, KeyError, TypeError, IndexError) as exc:
                raise InputError(f"{jsonl}:{line_no}: not a QA record ({exc})") from None
            if len(answer) > MAX_ANSWER_CHARS:
                raise InputError(f"{jsonl}:{line_no}: answer longer than {MAX_ANSWER_CHARS} characters")
            out.append(ref)
    if not out:
        raise InputError(f"{jsonl}: no QA records")
    return out


def read_dataset_folder(folder: Path, with_qa: bool) -> tuple[list[SampleRef], list[SampleRef]]:
    """A ``depthvlm generate`` folder, or ``JSONL[,RGB_ROOT,DEPTH_ROOT]`` of any Bench dataset."""
    text = str(folder)
    if "," in text:
        parts = text.split(",")
        if len(parts) != 3:
            raise InputError(f"--data {text!r}: use a generated folder or JSONL,RGB_ROOT,DEPTH_ROOT")
        return read_depth_samples(Path(parts[0]), Path(parts[1]), Path(parts[2])), []
    if not (folder / "depth.jsonl").is_file():
        raise InputError(f"--data {folder}: no depth.jsonl (generate one with depthvlm generate)")
    depth = read_depth_samples(folder / "depth.jsonl", folder, folder)
    qa = read_qa_samples(folder / "qa.jsonl", folder) if with_qa and (folder / "qa.jsonl").is_file() else []
    return depth, qa


class SampleDataset(torch.utils.data.Dataset):
    """Loads a sample: RGB, the model-grid depth target (model units) and the chat token ids.

    ``flip``: depth-only samples are mirrored on a coin per draw. ``mirror_qa``: QA samples too, their
    text rewritten for the mirrored image (every answer point's x -> 1000 - x, and the x of "what is
    at (x, y)"), so no side of the image is a safe guess. ``grounding``: QA samples of generated data
    also carry each answer point's object as an area fraction per model-grid cell (from the object mask),
    for the grounding losses (:mod:`~depthvlm_ros.training.grounding`).
    """

    def __init__(self, refs: Sequence[SampleRef], processor: ImageTextProcessor, flip: bool = False,
                 seed: int = 0, mirror_qa: bool = False, grounding: bool = False) -> None:
        self.refs = list(refs)
        self.processor = processor
        self.flip = flip
        self.seed = seed
        self.mirror_qa = mirror_qa
        self.grounding = grounding

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        """``item``: a sample index, or ``(index, draw)`` — the training sampler numbers its draws
        (the step), so each time a sample is drawn its flip coin is a new one, reproducibly."""
        from depthvlm_ros.training.grounding import cell_fractions, mirror_qa_text

        index, draw = (item, 0) if isinstance(item, int) else item
        ref = self.refs[index]
        rgb, gt, k = load_sample(ref)
        question, answer = ref.question, ref.answer
        places = ref.places if self.grounding and ref.mask is not None else ()
        mask = read_object_mask(ref.mask) if places else None
        # Mirror: a coin keyed by [seed, draw, index]. Answers name points, so a QA sample is mirrored only
        # with mirror_qa, its text rewritten for the mirrored image.
        if (self.flip and (answer is None or self.mirror_qa)
                and np.random.default_rng([self.seed, draw, index]).random() < 0.5):
            rgb, gt = rgb[:, ::-1], gt[:, ::-1]
            mask = mask[:, ::-1] if mask is not None else None
            if answer is not None:
                question, answer = mirror_qa_text(question, answer)
        plan = image_plan(self.processor, k, model_input_size(self.processor, k))
        pixels = plan.pixel_values(np.ascontiguousarray(rgb))  # the node's own preprocessing
        target = resize_depth(gt, *plan.size) / np.float32(plan.scale)
        cell = self.processor.patch_size * self.processor.merge_size
        return {"pixel_values": pixels, "grid_thw": plan.grid_thw(), "target": target, "question": question,
                "answer": answer, "place_labels": [label for _, label in places],
                "place_cells": [cell_fractions(mask, i, plan.size, cell) for i, _ in places]}


def load_sample(ref: SampleRef) -> tuple[np.ndarray, np.ndarray, Intrinsics]:
    """RGB uint8, z-depth (metres, NaN invalid) and the Bench convention's K of one sample."""
    from depthvlm_ros.imageio import read_rgb

    rgb = read_rgb(ref.image, str(ref.image))
    gt = read_depth_file(ref.depth, ref.depth_scale)
    return rgb, gt, bench_intrinsics(ref.rgb_size, ref.fx, rgb.shape[1], rgb.shape[0])


@dataclass
class Batch:
    """Samples of one image size: model inputs, LM labels (-100 = no loss) and depth targets."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    mm_token_type_ids: torch.Tensor
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor
    labels: torch.Tensor
    depth_target: torch.Tensor  # (B, H, W) model units, NaN invalid
    has_text: torch.Tensor  # (B,) bool: the sample has an answer (LM loss)
    places: PlaceTargets | None = None  # the answers' points and their targets (grounding losses only)

    def to(self, device: torch.device | str) -> Batch:
        moved = {k: v.to(device) for k, v in vars(self).items() if isinstance(v, torch.Tensor)}
        return Batch(**moved, places=None if self.places is None else self.places.to(device))


class Collator:
    """Builds :class:`Batch` es: one per image size in the list (usually one), right-padded text.

    ``grounding``: each batch also carries :class:`~depthvlm_ros.training.grounding.PlaceTargets`: for every
    point an answer writes, the positions that predict its x and y, its object's cells and the question's
    words that name it.
    """

    def __init__(self, processor: ImageTextProcessor, grounding: bool = False) -> None:
        from depthvlm_ros.training.grounding import CoordinateVocab

        self.processor = processor
        self.pad_id = int(processor.tokenizer.pad_token_id)
        self.vocab = CoordinateVocab.from_tokenizer(processor.tokenizer) if grounding else None

    def one(self, sample: dict[str, Any]) -> tuple[Any, list[int], list[int]]:
        p = self.processor
        question = sample["question"] or DEPTH_PROMPT
        inputs = SimpleNamespace(pixel_values=sample["pixel_values"],
                                 image_grid_thw=torch.tensor([sample["grid_thw"]], dtype=torch.long))
        n_tokens = int(inputs.image_grid_thw[0].prod()) // (p.merge_size ** 2)
        prompt = p.token_ids(question, n_tokens)
        if sample["answer"] is None:
            return inputs, prompt, [IGNORE_INDEX] * len(prompt)
        full = p.token_ids(question, n_tokens, sample["answer"])
        if full[: len(prompt) - 3] != prompt[: len(prompt) - 3]:
            raise InputError("chat template: the answer turn does not extend the prompt")
        # Loss on the assistant's tokens only: everything after the generation prompt.
        labels = [IGNORE_INDEX] * len(prompt) + full[len(prompt):]
        return inputs, full, labels

    def places(self, items: Sequence[tuple[Any, ...]], length: int) -> PlaceTargets:
        """The grounding targets of one batch's samples (``items`` as grouped in :meth:`__call__`)."""
        tokenizer = self.processor.tokenizer
        rows, xs, ys, cells, words = [], [], [], [], []
        n_tokens = 0
        for row, (inputs, ids, labels, _, _, sample) in enumerate(items):
            n_tokens = int(inputs.image_grid_thw[0].prod()) // (self.processor.merge_size ** 2)
            if sample["answer"] is None:
                continue
            answer_start = next(i for i, lab in enumerate(labels) if lab != IGNORE_INDEX)
            question_start = max(i for i, t in enumerate(ids[:answer_start]) if t == self.processor.image_token_id)
            points = self.vocab.places(ids, answer_start - 1)
            for j, (x_pos, y_pos) in enumerate(points):
                rows.append(row)
                xs.append(x_pos)
                ys.append(y_pos)
                has = j < len(sample["place_cells"])
                cells.append(torch.from_numpy(sample["place_cells"][j]) if has else torch.zeros(n_tokens))
                target = torch.zeros(length)
                if has:
                    named = label_positions(ids, tokenizer.encode(" " + sample["place_labels"][j],
                                                                  add_special_tokens=False),
                                            question_start + 1, answer_start)
                    if named:
                        target[named] = 1.0 / len(named)
                words.append(target)
        if not rows:
            return PlaceTargets.empty(n_tokens, length)
        return PlaceTargets(torch.tensor(rows), torch.tensor(xs), torch.tensor(ys), torch.stack(cells).float(),
                            torch.stack(words))

    def __call__(self, samples: Sequence[dict[str, Any]]) -> list[Batch]:
        groups: dict[tuple[int, ...], list[tuple[Any, ...]]] = {}
        for s in samples:
            inputs, ids, labels = self.one(s)
            key = tuple(int(v) for v in inputs.image_grid_thw[0])
            groups.setdefault(key, []).append((inputs, ids, labels, s["target"], s["answer"] is not None, s))
        batches = []
        for items in groups.values():
            length = max(len(ids) for _, ids, _, _, _, _ in items)
            ids = torch.full((len(items), length), self.pad_id, dtype=torch.long)
            labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)
            mask = torch.zeros((len(items), length), dtype=torch.long)
            for i, (_, row, lab, _, _, _) in enumerate(items):
                ids[i, : len(row)] = torch.tensor(row)
                labels[i, : len(lab)] = torch.tensor(lab)
                mask[i, : len(row)] = 1
            batches.append(Batch(
                input_ids=ids, attention_mask=mask,
                mm_token_type_ids=(ids == self.processor.image_token_id).to(torch.int32),
                pixel_values=torch.cat([it[0].pixel_values for it in items]),
                image_grid_thw=torch.cat([it[0].image_grid_thw for it in items]),
                labels=labels,
                depth_target=torch.from_numpy(np.stack([it[3] for it in items])),
                has_text=torch.tensor([it[4] for it in items]),
                places=self.places(items, length) if self.vocab is not None else None,
            ))
        return batches
