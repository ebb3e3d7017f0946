"""DepthVLM's two-stage training (plus a stage 0 for models that start from random weights).

=======  ==========================================  =====================================
stage    trains                                      loss
=======  ==========================================  =====================================
0        everything (vision tower too)               LM loss + w * SILog  (tiny models only:
                                                     pretrains a VLM from random init)
1        the depth head; the VLM is frozen           SILog (lambda 0.5)
2        LLM + depth head + LM head; vision frozen   LM loss + w * SILog on mixed samples
=======  ==========================================  =====================================

``w`` is the config's ``depth_loss_weight``. A step's loss is over its whole global batch: SILog is
the mean over the batch's images, the LM loss the mean over all of the batch's answer tokens.

Runs through Hugging Face Accelerate: the same command runs on one CPU, one GPU, or several
processes (``accelerate launch``, ``torchrun``: DDP). Model, optimizer and DataLoader go through
``accelerator.prepare``; every forward runs through the prepared model; each process takes its own
slice of every global batch (``split_batches``: deterministic for a seed and a world size), and its
loss is its share of the global loss, so N processes compute the same update as one process with
the same global batch. Gradients are synchronised once per step (the image-size groups before the
last run under ``no_sync``). Logging, evaluation, checkpoints and the final folder come from the
main process. Checkpoints are DepthVLM folders (safetensors) plus ``optimizer.safetensors`` and
``trainer_state.json``; ``--resume`` continues from the newest one in the output folder, in every
process. Nothing is pickled.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from depthvlm_ros.errors import InputError
from depthvlm_ros.model.modeling import DepthVLMForConditionalGeneration
from depthvlm_ros.training.data import IGNORE_INDEX, Batch, Collator, SampleDataset, read_dataset_folder

STAGES = (0, 1, 2)
#: SILog's lambda (the paper's value): 0 = plain log-RMSE, 1 = fully scale-invariant.
SILOG_LAMBDA = 0.5


@dataclass
class TrainConfig:
    """Everything a run depends on (saved with every checkpoint)."""

    stage: int
    data: list[str]
    out: str
    init: str  # model folder to start from
    steps: int = 1000
    batch_size: int = 8
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_steps: int = 50
    qa_fraction: float = 0.5  # share of QA samples in a stage 0/2 batch (when QA records exist)
    seed: int = 0
    save_every: int = 500
    eval_every: int = 250
    eval_data: str | None = None
    eval_limit: int = 64
    grad_clip: float = 1.0
    flip: bool = True
    workers: int = 1
    log_every: int = 10
    freeze: list[str] = field(default_factory=list)  # parameter-name prefixes kept frozen besides the stage's
    mirror_qa: bool = False  # mirror QA samples too (their points rewritten), on the flip coin
    # grounding losses (training/grounding.py; 0 = off)
    pointer_weight: float = 0.0
    pointer_heads: str = "2.2,2.3,3.2,3.3"
    hop_weight: float = 0.0
    hop_heads: str = "1.1,1.2"
    position_weight: float = 0.0
    position_layer: int = 2
    coord_weight: float = 1.0
    coord_sigma: float = 0.0
    # probes and spatial-answer evaluation during training, and early stops on the probes
    probe_data: str | None = None
    probe_every: int = 0
    gates: list[str] = field(default_factory=list)  # "METRIC>=VALUE@STEP": stop unless it holds at that step
    eval_qa_data: str | None = None
    eval_qa_every: int = 0
    eval_qa_limit: int = 200

    def grounding(self) -> Any:
        from depthvlm_ros.training.grounding import GroundingConfig, parse_heads

        return GroundingConfig(self.pointer_weight, parse_heads(self.pointer_heads), self.hop_weight,
                               parse_heads(self.hop_heads), self.position_weight, self.position_layer,
                               self.coord_weight, self.coord_sigma)


@dataclass
class TrainState:
    """Where a run stands: steps done, training time so far (seconds) and the latest evaluation's metrics
    (saved in ``trainer_state.json``, resumed from it)."""

    step: int = 0
    seconds: float = 0.0
    last_eval: dict[str, float] = field(default_factory=dict)


def silog_per_image(pred: torch.Tensor, target: torch.Tensor, lam: float = SILOG_LAMBDA) -> torch.Tensor:
    """Scale-invariant log loss of each image, sqrt(mean(g^2) - lam * mean(g)^2), g = log pred - log target,
    over its valid target pixels (finite, > 0); 0 for an image with fewer than 2. ``pred`` and
    ``target``: (B, H, W) in the same units; returns (B,)."""
    valid = torch.isfinite(target) & (target > 0)
    losses = []
    for p, t, m in zip(pred, target, valid):
        if int(m.sum()) < 2:
            losses.append(p.sum() * 0.0)
            continue
        g = torch.log(p[m].clamp_min(1e-6)) - torch.log(t[m])
        losses.append(torch.sqrt((g.pow(2).mean() - lam * g.mean().pow(2)).clamp_min(1e-8)))
    return torch.stack(losses)


@torch.no_grad()
def batch_delta1(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Share of valid pixels with max(pred/gt, gt/pred) < 1.25 (model units: ratios are unit-free)."""
    valid = torch.isfinite(target) & (target > 0)
    if not bool(valid.any()):
        return math.nan
    ratio = torch.maximum(pred[valid] / target[valid], target[valid] / pred[valid].clamp_min(1e-6))
    return float((ratio < 1.25).float().mean())


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy summed over the labelled (answer) tokens."""
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1)
    if not bool((shift_labels != IGNORE_INDEX).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")


def answer_tokens(labels: torch.Tensor) -> int:
    """How many tokens :func:`lm_loss_sum` scores in ``labels``."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def set_trainable(model: DepthVLMForConditionalGeneration, stage: int, freeze: Sequence[str] = ()) -> list[str]:
    """Freeze/unfreeze by stage (see the module table), then freeze the names starting with a ``freeze``
    prefix; returns the trainable parameter names."""
    if stage not in STAGES:
        raise InputError(f"--stage must be 0, 1 or 2, got {stage}")
    names = [name for name, _ in model.named_parameters()]
    for prefix in freeze:
        if not any(name.startswith(prefix) for name in names):
            raise InputError(f"--freeze {prefix}: no parameter name starts with it")
    for name, p in model.named_parameters():
        if any(name.startswith(prefix) for prefix in freeze):
            p.requires_grad_(False)
        elif stage == 0:
            p.requires_grad_(True)
        elif stage == 1:
            p.requires_grad_(name.startswith("depth_head."))
        else:
            p.requires_grad_(not name.startswith("model.visual."))
    return [n for n, p in model.named_parameters() if p.requires_grad]


@dataclass
class Grounding:
    """What the grounding losses need during a run: their settings, the hooks on the model, the position
    readouts (trained beside the model) and the tokenizer's coordinates."""

    cfg: Any  # training.grounding.GroundingConfig
    taps: Any  # GroundingTaps
    readout: Any  # PositionReadout | None
    vocab: Any  # CoordinateVocab
    image_token_id: int
    merge_size: int


def forward_losses(model: Any, batch: Batch, stage: int, grounding: Grounding | None = None) -> dict[str, torch.Tensor]:
    """One forward over a batch: depth (B, H, W), the SILog of each image and the answer tokens' summed
    cross-entropy (stages 0 and 2, rows with answers); with ``grounding``, also the grounding losses' sums
    (``pointer_sum``, ``hop_sum``, ``position_sum``) and the LM loss with its coordinate weighting.

    ``model``: the model as prepared (DDP/FSDP wrapped, or itself): the model's own forward (the one the
    robot runs), one vision pass and one LLM pass give the depth and the last hidden state, and the
    LM head scores the answer rows inside that forward (``logits_rows``), so FSDP gathers its weights
    there like every other layer's.
    """
    text = stage != 1 and bool(batch.has_text.any())
    if grounding is not None:
        grounding.taps.clear()
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values,
                image_grid_thw=batch.image_grid_thw, mm_token_type_ids=batch.mm_token_type_ids, return_logits=False,
                logits_rows=batch.has_text if text else None)
    losses = {"depth": out.depth, "silog": silog_per_image(out.depth, batch.depth_target)}
    if text and grounding is not None and (grounding.cfg.coord_sigma > 0 or grounding.cfg.coord_weight != 1.0):
        from depthvlm_ros.training.grounding import lm_loss_sum_soft

        losses["lm_sum"] = lm_loss_sum_soft(out.logits, batch.labels[batch.has_text], grounding.vocab,
                                            grounding.cfg.coord_weight, grounding.cfg.coord_sigma)
    elif text:
        losses["lm_sum"] = lm_loss_sum(out.logits, batch.labels[batch.has_text])
    if grounding is not None and stage != 1 and batch.places is not None:
        from depthvlm_ros.training.grounding import grounding_losses

        grid_h, grid_w = (int(v) // grounding.merge_size for v in batch.image_grid_thw[0, 1:])
        start = int((batch.input_ids[0] == grounding.image_token_id).nonzero()[0, 0])
        found = grounding_losses(grounding.cfg, grounding.taps, grounding.readout, batch.places, start, grid_h,
                                 grid_w, len(batch.input_ids))
        losses.update(pointer_sum=found.pointer, hop_sum=found.hop, position_sum=found.position,
                      **{k: torch.tensor(v) for k, v in found.stats.items()})
    return losses


def _mixed_indices(n_depth: int, n_qa: int, qa_fraction: float, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless batches of indices into depth + QA samples (QA indices offset by ``n_depth``)."""
    rng = random.Random(seed)
    n_q = int(round(batch_size * qa_fraction)) if n_qa else 0
    n_d = batch_size - n_q
    depth_order: list[int] = []
    qa_order: list[int] = []
    while True:
        if len(depth_order) < n_d:
            depth_order += rng.sample(range(n_depth), n_depth)
        if len(qa_order) < n_q:
            qa_order += rng.sample(range(n_qa), n_qa)
        batch = depth_order[:n_d] + [n_depth + i for i in qa_order[:n_q]]
        del depth_order[:n_d], qa_order[:n_q]
        yield batch


class _BatchSampler(torch.utils.data.Sampler):
    def __init__(self, n_depth: int, n_qa: int, cfg: TrainConfig, skip: int) -> None:
        self.args = (n_depth, n_qa, cfg.qa_fraction, cfg.batch_size, cfg.seed)
        self.total, self.skip = cfg.steps, skip
        self.batch_size, self.drop_last = cfg.batch_size, False  # what Accelerate's per-process split reads

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        it = _mixed_indices(*self.args)
        for i in range(self.total):
            batch = next(it)
            if i >= self.skip:
                yield [(index, i) for index in batch]  # (sample, draw): the draw keys the flip coin

    def __len__(self) -> int:
        return self.total - self.skip


def _lr_factor(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# -- checkpoints: safetensors only -------------------------------------------------------------


def _named_parameters(model: DepthVLMForConditionalGeneration, readout: torch.nn.Module | None) -> dict[str, Any]:
    """Every trained parameter by name: the model's, and the position readouts' as ``grounding.*``."""
    named = dict(model.named_parameters())
    if readout is not None:
        named |= {f"grounding.{n}": p for n, p in readout.named_parameters()}
    return named


def save_checkpoint(folder: Path, model: DepthVLMForConditionalGeneration, processor: Any,
                    optimizer: torch.optim.Optimizer | None, cfg: TrainConfig, state: TrainState,
                    state_dict: dict[str, torch.Tensor] | None = None,
                    readout: torch.nn.Module | None = None) -> Path:
    """A loadable DepthVLM folder (+ optimizer and trainer state when resumable). ``state_dict``: the full
    weights when ``model``'s own are sharded (FSDP: ``accelerator.get_state_dict``). ``readout``: the
    grounding losses' position readouts, written beside the model (``grounding.safetensors``).

    Written to ``<folder>.partial`` (every file fsynced), then the old folder is moved aside, the new one
    renamed into place and the old one removed: a kill at any moment leaves either the old or the new
    folder whole (:func:`latest_checkpoint` ignores anything that is not ``checkpoint-<step>``)."""
    from safetensors.torch import save_file

    from depthvlm_ros.model.factory import write_checkpoint

    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    source = Path(cfg.init)
    preprocessor = json.loads((source / "preprocessor_config.json").read_text())
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        write_checkpoint(model, processor.tokenizer, staging, preprocessor, state_dict=state_dict)
    finally:
        hf_logging.enable_progress_bar()
    if readout is not None:
        from depthvlm_ros.training.grounding import GROUNDING_FILE

        save_file({k: v.detach().cpu().contiguous() for k, v in readout.state_dict().items()},
                  str(staging / GROUNDING_FILE))
    if optimizer is not None:
        names = {id(p): n for n, p in _named_parameters(model, readout).items()}
        tensors: dict[str, torch.Tensor] = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                for key, value in optimizer.state.get(p, {}).items():
                    tensors[f"{names[id(p)]}::{key}"] = value.detach().cpu().contiguous().reshape(value.shape)
        save_file(tensors, str(staging / "optimizer.safetensors"))
    (staging / "trainer_state.json").write_text(json.dumps({"config": asdict(cfg), "state": asdict(state)}, indent=2))
    fsync_tree(staging)
    aside = folder.with_name(folder.name + ".old")
    shutil.rmtree(aside, ignore_errors=True)
    if folder.exists():
        folder.rename(aside)
    staging.rename(folder)
    fsync_tree(folder.parent, files=False)
    shutil.rmtree(aside, ignore_errors=True)
    return folder


def fsync_tree(folder: Path, files: bool = True) -> None:
    """Flush ``folder`` (and, with ``files``, every file under it and its subfolders) to disk."""
    from depthvlm_ros.files import fsync_dir

    for path in (p for p in folder.rglob("*") if p.is_file()) if files else ():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    for directory in ([folder, *(p for p in folder.rglob("*") if p.is_dir())] if files else [folder]):
        fsync_dir(directory)


#: A resumable checkpoint's folder name; ``.partial`` and ``.old`` folders a kill left behind are not.
CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)")


def checkpoints(out: Path) -> list[tuple[int, Path]]:
    """The run's ``checkpoint-<step>`` folders, oldest first (nothing else in ``out`` counts)."""
    found = [(int(m.group(1)), p) for p in out.glob("checkpoint-*") if p.is_dir()
             and (m := CHECKPOINT_RE.fullmatch(p.name)) is not None]
    return sorted(found)


def load_optimizer_state(folder: Path, model: DepthVLMForConditionalGeneration,
                         optimizer: torch.optim.Optimizer, readout: torch.nn.Module | None = None) -> None:
    """Restore the optimizer state of a checkpoint's ``optimizer.safetensors`` (keys ``PARAM::SLOT``,
    the position readouts' as ``grounding.*``); InputError for a parameter it does not know."""
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "optimizer.safetensors"))
    params = _named_parameters(model, readout)
    for key, value in tensors.items():
        name, slot = key.split("::")
        if name not in params:
            raise InputError(f"{folder}: optimizer state for unknown parameter {name}")
        optimizer.state[params[name]][slot] = value


def latest_checkpoint(out: Path) -> Path | None:
    """The newest whole ``checkpoint-<step>`` folder of a run (one with its trainer state), if any."""
    found = [path for _, path in checkpoints(out) if (path / "trainer_state.json").is_file()]
    return found[-1] if found else None


# -- the loop ----------------------------------------------------------------------------------


def evaluate(model: Any, processor: Any, folder: str, limit: int) -> dict[str, float]:
    """δ1 and AbsRel (metres, the evaluator's dense scoring) through the inference pipeline."""
    from depthvlm_ros.evaluation.metrics import mean_metrics, score_depths
    from depthvlm_ros.pipeline import DepthVLM
    from depthvlm_ros.training.data import load_sample

    refs, _ = read_dataset_folder(Path(folder), with_qa=False)
    wrapper = DepthVLM(model, processor)
    scores = []
    for ref in refs[:limit]:
        rgb, gt, k = load_sample(ref)
        scores.append(score_depths(wrapper.predict_depth(rgb, k).depth, gt).metrics)
    model.train()
    means = mean_metrics(scores) or {}
    return {"delta1": float(means.get("delta1", math.nan)), "abs_rel": float(means.get("abs_rel", math.nan))}


class EarlyStopError(RuntimeError):
    """An early-stop gate (``--gate``) did not hold: the run stopped there, its checkpoint saved."""


def parse_gate(text: str) -> tuple[str, str, float, int]:
    """``"pointer>=0.35@1500"`` -> ("pointer", ">=", 0.35, 1500); InputError if malformed."""
    match = re.fullmatch(r"\s*([\w.]+)\s*(>=|<=)\s*([-\d.eE+]+)\s*@\s*(\d+)\s*", text)
    if match is None:
        raise InputError(f"--gate {text!r}: use METRIC>=VALUE@STEP (or <=), e.g. pointer>=0.35@1500")
    return match.group(1), match.group(2), float(match.group(3)), int(match.group(4))


def probe_metrics(result: dict[str, Any], cfg: Any) -> dict[str, float]:
    """The probes' numbers the trainer logs and gates on: ``pointer`` / ``hop`` (the supervised heads' mean
    rate), ``pointer_best`` (any head), ``column_r2.<site>``, ``row_r2.<site>`` and ``distance_ceiling``."""
    from depthvlm_ros.training.probes import head_rate

    layers, heads = len(result["pointer"]), len(result["pointer"][0])
    everyone = [(layer, head) for layer in range(layers) for head in range(heads)]
    metrics = {"pointer": head_rate(result["pointer"], cfg.pointer_heads),
               "pointer_best": max(head_rate(result["pointer"], [h]) for h in everyone),
               "hop": head_rate(result["hop"], cfg.hop_heads),
               "hop_best": max(head_rate(result["hop"], [h]) for h in everyone)}
    for site, values in result["positions"].items():
        metrics[f"column_r2.{site}"] = values["column_r2"]
        metrics[f"row_r2.{site}"] = values["row_r2"]
    if result["distance_ceiling"]["rate"] is not None:
        metrics["distance_ceiling"] = result["distance_ceiling"]["rate"]
    return metrics


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    """Run one stage; returns the final model folder (``out/final``). Raises :class:`EarlyStopError` when an
    early-stop gate does not hold (the checkpoint of that step is saved first)."""
    from accelerate import Accelerator, DataLoaderConfiguration
    from tqdm import tqdm

    from depthvlm_ros.pipeline import DepthVLM
    from depthvlm_ros.training.grounding import (
        GROUNDING_FILE,
        CoordinateVocab,
        GroundingTaps,
        PositionReadout,
        use_eager_text_attention,
    )

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    gates = [parse_gate(text) for text in cfg.gates]
    if gates and not cfg.probe_data:
        raise InputError("--gate needs --probe-data (the gates read the probes)")
    start_from = latest_checkpoint(out) if resume else None
    if resume and start_from is None:
        raise InputError(f"--resume: no checkpoint in {out}")
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    loaded = DepthVLM.from_pretrained(start_from or cfg.init)
    model, processor = loaded.model, loaded.processor
    state = TrainState()
    if start_from is not None:
        state = TrainState(**json.loads((start_from / "trainer_state.json").read_text())["state"])
    text_config = model.config.text_config
    gcfg = cfg.grounding()
    gcfg.check(int(text_config.num_hidden_layers), int(text_config.num_attention_heads))
    grounded = gcfg.active and cfg.stage != 1
    if grounded and gcfg.attention_layers:
        use_eager_text_attention(model)  # the attention rows the pointer and hop losses read
    readout = None
    if grounded and gcfg.position_weight > 0:
        readout = PositionReadout(int(model.config.vision_config.out_hidden_size), int(text_config.hidden_size))
        if start_from is not None and (start_from / GROUNDING_FILE).is_file():
            from safetensors.torch import load_file

            readout.load_state_dict(load_file(str(start_from / GROUNDING_FILE)))

    depth_refs, qa_refs = [], []
    for spec in cfg.data:
        d, q = read_dataset_folder(Path(spec), with_qa=cfg.stage != 1)
        depth_refs += d
        qa_refs += q
    dataset = SampleDataset(depth_refs + qa_refs, processor, flip=cfg.flip, seed=cfg.seed, mirror_qa=cfg.mirror_qa,
                            grounding=grounded and bool(gcfg.attention_layers))
    sampler = _BatchSampler(len(depth_refs), len(qa_refs), cfg, skip=state.step)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler,
                                         collate_fn=Collator(processor, grounding=grounded),
                                         num_workers=cfg.workers, persistent_workers=cfg.workers > 0)

    trainable = set_trainable(model, cfg.stage, cfg.freeze)
    params = [p for p in model.parameters() if p.requires_grad]
    extra = list(readout.parameters()) if readout is not None else []
    optimizer = torch.optim.AdamW(params + extra, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if start_from is not None:
        load_optimizer_state(start_from, model, optimizer, readout)
    # split_batches: every process takes its own slice of each global batch of cfg.batch_size samples.
    accelerator = Accelerator(log_with="tensorboard", project_dir=str(out),
                              dataloader_config=DataLoaderConfiguration(split_batches=True))
    world = accelerator.num_processes
    if cfg.batch_size % world:
        raise InputError(f"--batch-size {cfg.batch_size} must be a multiple of the {world} processes")
    accelerator.init_trackers("logs", config={k: v for k, v in asdict(cfg).items() if not isinstance(v, list)})
    if readout is not None:
        model, readout, optimizer, loader = accelerator.prepare(model, readout, optimizer, loader)
    else:
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    core = accelerator.unwrap_model(model)
    core_readout = accelerator.unwrap_model(readout) if readout is not None else None
    core.train()
    grounding = None
    if grounded:
        taps = GroundingTaps(core, attention_layers=gcfg.attention_layers,
                             input_layers=[gcfg.position_layer] if readout is not None else [],
                             vision=readout is not None)
        grounding = Grounding(gcfg, taps, readout, CoordinateVocab.from_tokenizer(processor.tokenizer),
                              int(processor.image_token_id), int(processor.merge_size))
    weight = float(getattr(core.config, "depth_loss_weight", 1.0))
    accelerator.print(f"stage {cfg.stage}: {len(trainable)} trainable tensors "
                      f"({sum(p.numel() for p in params) / 1e6:.2f} M parameters), "
                      f"{len(depth_refs)} depth + {len(qa_refs)} QA samples, steps {state.step}->{cfg.steps}, "
                      f"{world} process(es)" + (f"; grounding losses {gcfg}" if grounded else ""))
    bar = tqdm(total=cfg.steps, initial=state.step, unit="step", disable=not accelerator.is_main_process)
    began = time.perf_counter() - state.seconds
    running: dict[str, float] = {}
    history: list[dict[str, Any]] = []  # probes and QA evaluations, by step (train_summary.json)
    failed: list[tuple[str, str, float, int]] = []  # the gates that did not hold: the run stops (EarlyStopError)
    record: dict[str, Any] | None = None
    for batches in loader:
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * _lr_factor(state.step, cfg)
        # The step's denominators are global: all images of the global batch, all its answer tokens, all its
        # answer points with a pointer target and with named words.
        local = [float(sum(answer_tokens(b.labels[b.has_text]) for b in batches)) if cfg.stage != 1 else 0.0,
                 float(sum(int((b.places.cells.sum(1) > 0).sum()) for b in batches if b.places is not None)),
                 float(sum(int((b.places.words.sum(1) > 0).sum()) for b in batches if b.places is not None))]
        tokens, n_pointer, n_hop = accelerator.reduce(torch.tensor(local, device=accelerator.device), "sum").tolist()
        # silog, lm, delta1 x images, images with a delta1, pointer, hop, position, pointer hits, hop hits
        sums = torch.zeros(9, dtype=torch.float64)
        for i, batch in enumerate(batches):
            batch = batch.to(accelerator.device)
            last = i == len(batches) - 1  # gradients are synchronised once, on the step's last backward
            with contextlib.nullcontext() if last else accelerator.no_sync(model):
                losses = forward_losses(model, batch, cfg.stage, grounding)
                silog = losses["silog"].sum() / cfg.batch_size
                lm = losses["lm_sum"] / max(tokens, 1.0) if "lm_sum" in losses else silog * 0.0
                pointer = losses["pointer_sum"] / max(n_pointer, 1.0) if "pointer_sum" in losses else silog * 0.0
                hop = losses["hop_sum"] / max(n_hop, 1.0) if "hop_sum" in losses else silog * 0.0
                position = losses["position_sum"] / cfg.batch_size if "position_sum" in losses else silog * 0.0
                loss = silog if cfg.stage == 1 else (weight * silog + lm + gcfg.pointer_weight * pointer
                                                     + gcfg.hop_weight * hop + gcfg.position_weight * position)
                accelerator.backward(loss * world)  # DDP averages over the processes: their shares add up
            d1 = batch_delta1(losses["depth"].detach(), batch.depth_target)
            n_places = int((batch.places.cells.sum(1) > 0).sum()) if batch.places is not None else 0
            n_words = int((batch.places.words.sum(1) > 0).sum()) if batch.places is not None else 0
            sums += torch.tensor([float(silog.detach()), float(lm.detach()),
                                  0.0 if math.isnan(d1) else d1 * len(batch.input_ids),
                                  0.0 if math.isnan(d1) else len(batch.input_ids),
                                  float(pointer.detach()), float(hop.detach()), float(position.detach()),
                                  float(losses.get("pointer_hits", 0.0)) * n_places,
                                  float(losses.get("hop_hits", 0.0)) * n_words], dtype=torch.float64)
        if cfg.grad_clip > 0:
            accelerator.clip_grad_norm_(params + extra, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.seconds = time.perf_counter() - began
        silog_g, lm_g, d1_sum, d1_n, pointer_g, hop_g, position_g, p_hits, h_hits = accelerator.reduce(
            sums.to(accelerator.device), "sum").tolist()
        step_values = {"loss": silog_g if cfg.stage == 1 else weight * silog_g + lm_g + gcfg.pointer_weight * pointer_g
                       + gcfg.hop_weight * hop_g + gcfg.position_weight * position_g,
                       "silog": silog_g, "lm": lm_g, "delta1": d1_sum / d1_n if d1_n else math.nan}
        if grounded:
            step_values |= {"pointer": pointer_g, "hop": hop_g, "position": position_g,
                            "pointer_hits": p_hits / n_pointer if n_pointer else math.nan,
                            "hop_hits": h_hits / n_hop if n_hop else math.nan}
        for key, value in step_values.items():
            if not math.isnan(value):
                running[key] = value if key not in running else 0.9 * running[key] + 0.1 * value
        bar.update(1)
        shown = {k: running[k] for k in ("loss", "silog", "lm", "delta1", "pointer_hits", "hop_hits") if k in running}
        bar.set_postfix({("d1" if k == "delta1" else k): f"{v:.3f}" for k, v in shown.items()})
        if state.step % cfg.log_every == 0:
            logged = {f"train/{k}": v for k, v in running.items()}
            accelerator.log(logged | {"train/lr": optimizer.param_groups[0]["lr"]}, step=state.step)
        if cfg.eval_data and cfg.eval_every > 0 and (state.step % cfg.eval_every == 0 or state.step == cfg.steps):
            if accelerator.is_main_process:  # one process evaluates (the others wait below)
                core.eval()
                state.last_eval = evaluate(core, processor, cfg.eval_data, cfg.eval_limit)
                accelerator.log({f"eval/{k}": v for k, v in state.last_eval.items()}, step=state.step)
                bar.write(f"step {state.step}: eval delta1 {state.last_eval['delta1']:.3f} "
                          f"AbsRel {state.last_eval['abs_rel']:.3f}")
            accelerator.wait_for_everyone()
        record = _observe(cfg, state.step, gates, gcfg, core, processor, accelerator, bar)
        if record:
            history.append(record)
        failed = [g for g in gates if g[3] == state.step and not _gate_holds(g, record)]
        stop = cfg.save_every > 0 and state.step % cfg.save_every == 0
        if stop or failed:
            weights = accelerator.get_state_dict(model)  # every process takes part (FSDP gathers the shards)
            if accelerator.is_main_process:
                save_checkpoint(out / f"checkpoint-{state.step}", core, processor, optimizer, cfg, state, weights,
                                core_readout)
                for _, old in checkpoints(out)[:-2]:
                    shutil.rmtree(old, ignore_errors=True)  # keep the newest two
            accelerator.wait_for_everyone()
        if failed:
            break
    bar.close()
    if grounding is not None:
        grounding.taps.remove()
    final = out / "final"
    if not failed:  # (a failed gate's checkpoint is saved above)
        weights = accelerator.get_state_dict(model)
        if accelerator.is_main_process:
            core.eval()
            save_checkpoint(final, core, processor, None, cfg, state, weights)
            (final / "trainer_state.json").unlink()
    _write_summary(out, cfg, state, running, world, history, accelerator)  # (main process)
    accelerator.wait_for_everyone()
    model = readout = optimizer = loader = None  # before the process group (end_distributed)
    end_distributed(accelerator)
    if failed:
        name, op, value, step = failed[0]
        got = record.get("probes", {}).get(name, math.nan) if record else math.nan
        raise EarlyStopError(f"gate {name}{op}{value:g}@{step} did not hold: {name} = {got:.3f} at step {step} "
                             f"(checkpoint-{step} saved; train_summary.json has the probes)")
    return final


def end_distributed(accelerator: Any) -> None:
    """End the trackers and the process group, after the caller dropped its prepared wrappers.

    The order matters: DDP's reducer holds the process group, and when the reducer (freed with the GIL held)
    drops the group's last reference, gloo's destructor joins worker threads that may still need the GIL to
    free the last collective's tensors: a deadlock (pytorch/pytorch#56297) that hung 4 of 105 two-process runs
    on a loaded 2-core machine, after the final weights were written (0 of 100 in this order). With the
    wrappers freed first, the group's last reference is the Python one ``end_training`` drops, and that
    destructor releases the GIL."""
    accelerator.free_memory()  # its own references to the prepared model, optimizer and loader (then gc)
    accelerator.end_training()


def _write_summary(out: Path, cfg: TrainConfig, state: TrainState, running: dict[str, float], world: int,
                   history: list[dict[str, Any]], accelerator: Any) -> None:
    if accelerator.is_main_process:
        from depthvlm_ros.files import write_text_atomic

        write_text_atomic(out / "train_summary.json", json.dumps(
            {"config": asdict(cfg), "state": asdict(state), "running": running, "processes": world,
             "history": history}, indent=2) + "\n")


def _gate_holds(gate: tuple[str, str, float, int], record: dict[str, Any] | None) -> bool:
    name, op, value, _ = gate
    got = (record or {}).get("probes", {}).get(name)
    if got is None or math.isnan(got):
        return False
    return got >= value if op == ">=" else got <= value


def _observe(cfg: TrainConfig, step: int, gates: list[tuple[str, str, float, int]], gcfg: Any, core: Any,
             processor: Any, accelerator: Any, bar: Any) -> dict[str, Any] | None:
    """The probes and the spatial-answer evaluation due at ``step`` (main process; the rest wait).
    Returns what was measured (None when nothing was due); the probes' numbers reach every process."""
    from depthvlm_ros.pipeline import DepthVLM

    probe_due = cfg.probe_data and ((cfg.probe_every > 0 and step % cfg.probe_every == 0)
                                    or any(g[3] == step for g in gates) or step == cfg.steps)
    qa_due = cfg.eval_qa_data and cfg.eval_qa_every > 0 and (step % cfg.eval_qa_every == 0 or step == cfg.steps)
    if not (probe_due or qa_due):
        return None
    record: dict[str, Any] = {"step": step}
    if accelerator.is_main_process:
        vlm = DepthVLM(core, processor)
        if probe_due:
            from depthvlm_ros.training.probes import Probe

            record["probes"] = probe_metrics(Probe(vlm, Path(cfg.probe_data), questions=100, frames=24).run(), gcfg)
            accelerator.log({f"probe/{k}": v for k, v in record["probes"].items()}, step=step)
            p = record["probes"]
            layer_input = p.get(f"column_r2.llm_after{gcfg.position_layer - 1}", math.nan)
            bar.write(f"step {step}: probes pointer {p['pointer']:.3f} (best head {p['pointer_best']:.3f}), hop "
                      f"{p['hop']:.3f}, column R^2 vision {p.get('column_r2.vision', math.nan):.2f} / LLM layer-"
                      f"{gcfg.position_layer} input {layer_input:.2f}")
        if qa_due:
            from depthvlm_ros.evaluation.qa import evaluate_qa

            summary = evaluate_qa(vlm, Path(cfg.eval_qa_data), limit=cfg.eval_qa_limit, max_new_tokens=48)["summary"]
            record["qa"] = {k: summary[k]["rate"] for k in ("grounded", "distance_ok", "label_ok")}
            accelerator.log({f"qa/{k}": v for k, v in record["qa"].items() if v is not None}, step=step)
            bar.write(f"step {step}: eval-qa grounded {record['qa']['grounded']:.3f}, distance within 25 % "
                      f"{record['qa']['distance_ok']:.3f}, label {record['qa']['label_ok']:.3f}")
        core.train()
    if gates:  # every process learns the probes' verdict
        values = torch.tensor([record.get("probes", {}).get(g[0], math.nan) if accelerator.is_main_process else 0.0
                               for g in gates], dtype=torch.float64, device=accelerator.device)
        values = accelerator.reduce(values, "sum").tolist()
        record.setdefault("probes", {}).update({g[0]: v for g, v in zip(gates, values)})
    return record
