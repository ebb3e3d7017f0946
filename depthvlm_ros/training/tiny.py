"""depthvlm-tiny's two ends: the randomly initialised folder stage 0 starts from, and the packaging of the
trained folder into the package (``python -m depthvlm_ros.training.tiny package SRC DEST``, the last step of
``scripts/train_tiny.sh``)."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

#: Vocabulary size asked of depthvlm-tiny's BPE trainer (learned on the generator's QA templates and every
#: number its answers write, each of which becomes one token). An upper bound: the corpus allows fewer.
TINY_VOCAB = 1024
#: Files of a model folder that the package ships (besides model.safetensors and the model card README.md).
PACKAGED_FILES = ("config.json", "generation_config.json", "preprocessor_config.json", "tokenizer.json",
                  "tokenizer_config.json", "chat_template.jinja")
#: Initial output of the depth head (model units: metres at the canonical camera).
TINY_INIT_DEPTH = 10.0


#: Amplitude of the 2D sine-cosine table the vision tower's position embeddings start from (and keep:
#: scripts/train_tiny.sh trains stage 0 with ``--freeze model.visual.pos_embed``).
TINY_POSITION_AMPLITUDE = 1.0


def sincos_position_table(side: int, dim: int, amplitude: float = TINY_POSITION_AMPLITUDE) -> torch.Tensor:
    """(side * side, dim) 2D sine-cosine position embeddings of a side x side grid, row-major: the first
    half of the channels encode the column, the second half the row (frequencies 1 / 10000^(2i/d))."""
    quarter = dim // 4
    freq = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    grid = torch.arange(side, dtype=torch.float64)
    rows, cols = torch.meshgrid(grid, grid, indexing="ij")

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * freq.reshape(1, -1)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    table = torch.cat([encode(cols), encode(rows)], dim=1)
    return (amplitude * torch.nn.functional.pad(table, (0, dim - table.shape[1]))).float()


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

    tokenizer = build_tokenizer(TINY_VOCAB, corpus=tokenizer_corpus())
    config = depthvlm_tiny_config(tokenizer)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = DepthVLMForConditionalGeneration(config)
        init_weights(model, seed=seed, mean_depth_m=TINY_INIT_DEPTH)
        # The vision tower's position table is a 2D sine-cosine grid (as MAE's, fixed in training), not
        # N(0, 0.02) learned: trained from N(0, 0.02) the image tokens keep the row but not the column
        # (a linear probe on the merged tokens after 3000 stage-0 steps: row R^2 0.46, column < 0), and
        # a point's x cannot be learned. Learned from a 0.5-amplitude grid, the column was gone again
        # by step 2000 (R^2 < 0). Fixed at amplitude 1 it survives a short run (0.82 after 800 steps)
        # but not the full schedule (-0.03 at step 3000; the model card): necessary, not sufficient.
        pos = model.model.visual.pos_embed
        side = int(round(pos.num_embeddings ** 0.5))
        with torch.no_grad():
            pos.weight.copy_(sincos_position_table(side, pos.embedding_dim))
    hf_logging.disable_progress_bar()
    try:
        return write_checkpoint(model, tokenizer, folder, tiny_preprocessor())
    finally:
        hf_logging.enable_progress_bar()


def package_model(src: Path, dest: Path) -> Path:
    """Copy a trained DepthVLM folder into ``dest`` with its weights stored as float16 (loaded as float32).

    Keeps ``dest``'s model card (README.md). The weights go through the strict loader first, and the
    packaged folder is loaded again and compared, so what ships is exactly ``src`` rounded to float16.
    """
    import torch
    from safetensors.torch import load_file, save_file

    from depthvlm_ros.model.checkpoint import weight_files
    from depthvlm_ros.pipeline import DepthVLM

    src, dest = Path(src), Path(dest)
    DepthVLM.from_pretrained(src)  # strict: every key and shape checked
    weights: dict[str, torch.Tensor] = {}
    for f in weight_files(src):
        weights.update(load_file(str(f)))
    dest.mkdir(parents=True, exist_ok=True)
    for name in PACKAGED_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dest / name)
    half = {k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous() for k, v in weights.items()}
    save_file(half, str(dest / "model.safetensors"), metadata={"format": "pt"})
    packaged = DepthVLM.from_pretrained(dest)
    for key, value in packaged.model.state_dict().items():
        if key in half and not torch.equal(value, half[key].to(value.dtype)):
            raise RuntimeError(f"{dest}: {key} differs from the float16 weights written")
    return dest


def main(argv: list[str] | None = None) -> int:
    """``python -m depthvlm_ros.training.tiny package SRC DEST``: a trained folder's weights stored as float16 in
    the package folder (exit code 0)."""
    parser = argparse.ArgumentParser(prog="python -m depthvlm_ros.training.tiny")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("package", help="store a trained folder's weights as float16 in the package folder")
    p.add_argument("src", type=Path, help="trained DepthVLM folder (e.g. build/tiny/stage2/final)")
    p.add_argument("dest", type=Path, help="package folder (depthvlm_ros/models/depthvlm-tiny)")
    args = parser.parse_args(argv)
    out = package_model(args.src, args.dest)
    size = (out / "model.safetensors").stat().st_size
    print(f"packaged {args.src} -> {out} (model.safetensors {size / 2**20:.2f} MiB, float16)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
