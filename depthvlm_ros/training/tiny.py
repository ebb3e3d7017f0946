"""A fresh, randomly initialised depthvlm-tiny folder: what stage 0 of the built-in model starts from."""

from __future__ import annotations

from pathlib import Path

import torch

#: Vocabulary of depthvlm-tiny's tokenizer (BPE learned on the generator's QA templates).
TINY_VOCAB = 1024
#: Initial output of the depth head (model units: metres at the canonical camera).
TINY_INIT_DEPTH = 10.0


def init_tiny_model(folder: Path, seed: int = 0) -> Path:
    """Write an initialised depthvlm-tiny (config, tokenizer, processor limits) to ``folder``."""
    from transformers.utils import logging as hf_logging

    from depthvlm_ros.model.factory import (
        build_tokenizer,
        depthvlm_tiny_config,
        init_weights,
        tiny_preprocessor,
        write_checkpoint,
    )
    from depthvlm_ros.model.modeling import DepthVLMForConditionalGeneration
    from depthvlm_ros.scenes.qa import tokenizer_corpus

    tokenizer = build_tokenizer(TINY_VOCAB, corpus=tokenizer_corpus(), split_digits=True)
    config = depthvlm_tiny_config(tokenizer)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = DepthVLMForConditionalGeneration(config)
        init_weights(model, seed=seed, mean_depth_m=TINY_INIT_DEPTH)
    hf_logging.disable_progress_bar()
    try:
        return write_checkpoint(model, tokenizer, folder, tiny_preprocessor())
    finally:
        hf_logging.enable_progress_bar()
