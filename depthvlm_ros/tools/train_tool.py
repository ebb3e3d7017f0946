"""``depthvlm train``: one training stage (0, 1 or 2) on DepthVLM-Bench / generated data."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a stage: 0 (tiny VLM pretraining), 1 (depth head), 2 (LLM + head)",
                       description="Stage 1: depth head only, VLM frozen, SILog (lambda 0.5). Stage 2: LLM + depth "
                                   "head + LM head, vision frozen, LM loss + w * SILog on depth and QA samples. "
                                   "Stage 0 (small models from random weights): everything, LM + w * SILog. "
                                   "Runs through Accelerate: `accelerate launch -m depthvlm_ros train ...` for "
                                   "multi-GPU/FSDP.")
    p.add_argument("--stage", type=int, required=True, choices=[0, 1, 2])
    p.add_argument("--data", action="append", required=True, metavar="DIR|JSONL,RGB,DEPTH",
                   help="generated folder (depth.jsonl + qa.jsonl) or a Bench JSONL with roots (repeatable)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="checkpoints, logs/ and final/")
    init = p.add_mutually_exclusive_group(required=True)
    init.add_argument("--init", type=Path, metavar="MODEL", help="DepthVLM folder to start from")
    init.add_argument("--init-tiny", action="store_true", help="start from a fresh random depthvlm-tiny (stage 0)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--qa-fraction", type=float, default=0.5, help="share of QA samples per batch (stages 0, 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=500, metavar="STEPS")
    p.add_argument("--eval-data", metavar="DIR", help="held-out generated folder for periodic δ1/AbsRel")
    p.add_argument("--eval-every", type=int, default=250, metavar="STEPS")
    p.add_argument("--eval-limit", type=int, default=64, metavar="N", help="images per periodic evaluation")
    p.add_argument("--workers", type=int, default=1, help="data-loading processes (default 1)")
    p.add_argument("--no-flip", action="store_true", help="no horizontal-flip augmentation")
    p.add_argument("--freeze", action="append", default=[], metavar="PREFIX",
                   help="also keep parameters whose names start with PREFIX frozen (repeatable), "
                        "e.g. model.visual.pos_embed")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from depthvlm_ros.errors import InputError
    from depthvlm_ros.training.trainer import TrainConfig, train

    for name in ("steps", "batch_size"):
        if not 1 <= getattr(args, name) <= 10_000_000:
            raise InputError(f"--{name.replace('_', '-')} must be positive")
    if not 0.0 <= args.qa_fraction <= 1.0:
        raise InputError(f"--qa-fraction must be in 0..1, got {args.qa_fraction}")
    init = args.init
    if args.init_tiny:
        from depthvlm_ros.training.tiny import init_tiny_model

        init = args.out / "init"
        if not (init / "model.safetensors").is_file():
            init_tiny_model(init, seed=args.seed)
    cfg = TrainConfig(
        stage=args.stage, data=[str(d) for d in args.data], out=str(args.out), init=str(init), steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps, qa_fraction=args.qa_fraction,
        seed=args.seed, save_every=args.save_every, eval_every=args.eval_every, eval_data=args.eval_data,
        eval_limit=args.eval_limit, flip=not args.no_flip, workers=args.workers, freeze=list(args.freeze),
    )
    final = train(cfg, resume=args.resume)
    print(f"stage {args.stage} done: {final}")
    return 0
