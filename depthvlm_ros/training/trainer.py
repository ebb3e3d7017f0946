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
import random
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


@dataclass
class TrainState:
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


def forward_losses(model: Any, batch: Batch, stage: int) -> dict[str, torch.Tensor]:
    """One forward over a batch: depth (B, H, W), the SILog of each image and the answer tokens' summed
    cross-entropy (stages 0 and 2, rows with answers).

    ``model``: the model as prepared (DDP/FSDP wrapped, or itself): the model's own forward (the one the
    robot runs), one vision pass and one LLM pass give the depth and the last hidden state, and the
    LM head scores the answer rows inside that forward (``logits_rows``), so FSDP gathers its weights
    there like every other layer's.
    """
    text = stage != 1 and bool(batch.has_text.any())
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values,
                image_grid_thw=batch.image_grid_thw, mm_token_type_ids=batch.mm_token_type_ids, return_logits=False,
                logits_rows=batch.has_text if text else None)
    losses = {"depth": out.depth, "silog": silog_per_image(out.depth, batch.depth_target)}
    if text:
        losses["lm_sum"] = lm_loss_sum(out.logits, batch.labels[batch.has_text])
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


def save_checkpoint(folder: Path, model: DepthVLMForConditionalGeneration, processor: Any,
                    optimizer: torch.optim.Optimizer | None, cfg: TrainConfig, state: TrainState,
                    state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """A loadable DepthVLM folder (+ optimizer and trainer state when resumable). ``state_dict``: the full
    weights when ``model``'s own are sharded (FSDP: ``accelerator.get_state_dict``)."""
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
    if optimizer is not None:
        names = {id(p): n for n, p in model.named_parameters()}
        tensors: dict[str, torch.Tensor] = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                for key, value in optimizer.state.get(p, {}).items():
                    tensors[f"{names[id(p)]}::{key}"] = value.detach().cpu().contiguous().reshape(value.shape)
        save_file(tensors, str(staging / "optimizer.safetensors"))
    (staging / "trainer_state.json").write_text(json.dumps({"config": asdict(cfg), "state": asdict(state)}, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return folder


def load_optimizer_state(folder: Path, model: DepthVLMForConditionalGeneration,
                         optimizer: torch.optim.Optimizer) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "optimizer.safetensors"))
    params = dict(model.named_parameters())
    for key, value in tensors.items():
        name, slot = key.split("::")
        if name not in params:
            raise InputError(f"{folder}: optimizer state for unknown parameter {name}")
        optimizer.state[params[name]][slot] = value


def latest_checkpoint(out: Path) -> Path | None:
    found = sorted(out.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[1]))
    return found[-1].parent if found else None


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


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    """Run one stage; returns the final model folder (``out/final``)."""
    from accelerate import Accelerator, DataLoaderConfiguration
    from tqdm import tqdm

    from depthvlm_ros.pipeline import DepthVLM

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
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

    depth_refs, qa_refs = [], []
    for spec in cfg.data:
        d, q = read_dataset_folder(Path(spec), with_qa=cfg.stage != 1)
        depth_refs += d
        qa_refs += q
    dataset = SampleDataset(depth_refs + qa_refs, processor, flip=cfg.flip, seed=cfg.seed)
    sampler = _BatchSampler(len(depth_refs), len(qa_refs), cfg, skip=state.step)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=Collator(processor),
                                         num_workers=cfg.workers, persistent_workers=cfg.workers > 0)

    trainable = set_trainable(model, cfg.stage, cfg.freeze)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if start_from is not None:
        load_optimizer_state(start_from, model, optimizer)
    # split_batches: every process takes its own slice of each global batch of cfg.batch_size samples.
    accelerator = Accelerator(log_with="tensorboard", project_dir=str(out),
                              dataloader_config=DataLoaderConfiguration(split_batches=True))
    world = accelerator.num_processes
    if cfg.batch_size % world:
        raise InputError(f"--batch-size {cfg.batch_size} must be a multiple of the {world} processes")
    accelerator.init_trackers("logs", config={k: v for k, v in asdict(cfg).items() if not isinstance(v, list)})
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    core = accelerator.unwrap_model(model)
    core.train()
    weight = float(getattr(core.config, "depth_loss_weight", 1.0))
    accelerator.print(f"stage {cfg.stage}: {len(trainable)} trainable tensors "
                      f"({sum(p.numel() for p in params) / 1e6:.2f} M parameters), "
                      f"{len(depth_refs)} depth + {len(qa_refs)} QA samples, steps {state.step}->{cfg.steps}, "
                      f"{world} process(es)")
    bar = tqdm(total=cfg.steps, initial=state.step, unit="step", disable=not accelerator.is_main_process)
    began = time.perf_counter() - state.seconds
    running: dict[str, float] = {}
    for batches in loader:
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * _lr_factor(state.step, cfg)
        # The step's denominators are global: all images of the global batch, all its answer tokens.
        local_tokens = sum(answer_tokens(b.labels[b.has_text]) for b in batches) if cfg.stage != 1 else 0
        tokens = float(accelerator.reduce(torch.tensor([float(local_tokens)], device=accelerator.device), "sum"))
        # silog share, lm share, delta1 x images, images with a delta1 (this process)
        sums = torch.zeros(4, dtype=torch.float64)
        for i, batch in enumerate(batches):
            batch = Batch(**{k: v.to(accelerator.device) for k, v in vars(batch).items()})
            last = i == len(batches) - 1  # gradients are synchronised once, on the step's last backward
            with contextlib.nullcontext() if last else accelerator.no_sync(model):
                losses = forward_losses(model, batch, cfg.stage)
                silog = losses["silog"].sum() / cfg.batch_size
                lm = losses["lm_sum"] / max(tokens, 1.0) if "lm_sum" in losses else silog * 0.0
                loss = silog if cfg.stage == 1 else weight * silog + lm
                accelerator.backward(loss * world)  # DDP averages over the processes: their shares add up
            d1 = batch_delta1(losses["depth"].detach(), batch.depth_target)
            sums += torch.tensor([float(silog.detach()), float(lm.detach()),
                                  0.0 if math.isnan(d1) else d1 * len(batch.input_ids),
                                  0.0 if math.isnan(d1) else len(batch.input_ids)], dtype=torch.float64)
        if cfg.grad_clip > 0:
            accelerator.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.seconds = time.perf_counter() - began
        silog_g, lm_g, d1_sum, d1_n = accelerator.reduce(sums.to(accelerator.device), "sum").tolist()
        step_values = {"loss": silog_g if cfg.stage == 1 else weight * silog_g + lm_g, "silog": silog_g, "lm": lm_g,
                       "delta1": d1_sum / d1_n if d1_n else math.nan}
        for key, value in step_values.items():
            running[key] = value if key not in running else 0.9 * running[key] + 0.1 * value
        bar.update(1)
        bar.set_postfix(loss=f"{running['loss']:.3f}", silog=f"{running['silog']:.3f}", lm=f"{running['lm']:.3f}",
                        d1=f"{running['delta1']:.3f}")
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
        if cfg.save_every > 0 and state.step % cfg.save_every == 0:
            weights = accelerator.get_state_dict(model)  # every process takes part (FSDP gathers the shards)
            if accelerator.is_main_process:
                save_checkpoint(out / f"checkpoint-{state.step}", core, processor, optimizer, cfg, state, weights)
                for old in sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[:-2]:
                    shutil.rmtree(old, ignore_errors=True)  # keep the newest two
            accelerator.wait_for_everyone()
    bar.close()
    final = out / "final"
    weights = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        core.eval()
        save_checkpoint(final, core, processor, None, cfg, state, weights)
        (final / "trainer_state.json").unlink()
        (out / "train_summary.json").write_text(json.dumps(
            {"config": asdict(cfg), "state": asdict(state), "running": running,
             "processes": world}, indent=2) + "\n")
    accelerator.wait_for_everyone()
    accelerator.end_training()  # (ends the process group too: after the last collective)
    return final
