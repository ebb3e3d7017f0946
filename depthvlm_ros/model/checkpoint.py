"""Checks on a model folder before anything is loaded: files, formats, key names and shapes.

Only safetensors are read (never pickle: ``.bin``/``.pt`` checkpoints are refused). The expected
key set comes from the model class built on the meta device from the folder's own config, so a
checkpoint of any width is checked against itself; ``lm_head.weight`` may be absent when the
config ties it to the input embeddings (the released 4B does).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open

from depthvlm_ros.errors import CheckpointError
from depthvlm_ros.hashing import sha256_of_files

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
#: Files a model folder must hold besides its weights.
REQUIRED_FILES = ("config.json", "preprocessor_config.json")


def weight_files(folder: Path) -> list[Path]:
    """The folder's safetensors shards (from the index when sharded)."""
    index = folder / WEIGHTS_INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError(f"{index}: not a valid safetensors index") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{folder}: shards named in the index are missing: {', '.join(missing)}")
        return files
    single = folder / WEIGHTS_NAME
    if single.is_file():
        return [single]
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{folder}: only pickle weights ({', '.join(pickles[:3])}); safetensors only — "
            "convert them with safetensors.torch.save_file"
        )
    raise CheckpointError(f"{folder}: no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME}")


def checkpoint_shapes(files: Iterable[Path]) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor in the shards, read from the headers only."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    shapes[key] = tuple(f.get_slice(key).get_shape())
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    return shapes


def _listing(keys: Iterable[str], limit: int = 5) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def compare_state(
    expected: dict[str, tuple[int, ...]],
    found: dict[str, tuple[int, ...]],
    optional: set[str] = frozenset(),
) -> None:
    """Raise CheckpointError naming missing, unexpected or wrongly shaped keys."""
    missing = set(expected) - set(found) - set(optional)
    unexpected = set(found) - set(expected)
    mismatched = sorted(
        f"{k} (checkpoint {list(found[k])}, model {list(expected[k])})"
        for k in set(expected) & set(found) if tuple(found[k]) != tuple(expected[k])
    )
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if mismatched:
        problems.append(f"wrong shapes: {_listing(mismatched, 3)}")
    if problems:
        raise CheckpointError("checkpoint does not match its config: " + "; ".join(problems))


def infer_head_widths(shapes: dict[str, tuple[int, ...]]) -> dict[str, object]:
    """Depth-head width fields read off the checkpoint's tensor shapes.

    The released config.json names only ``depth_head_type`` (its widths are the defaults); a folder
    in that format with a narrower head is still loadable: the widths come from the weights, and
    every key and shape is still checked strictly afterwards.
    """
    widths: dict[str, object] = {}
    prefix = "depth_head."
    if f"{prefix}scratch.layer1_rn.weight" in shapes:
        widths["depth_head_features"] = int(shapes[f"{prefix}scratch.layer1_rn.weight"][0])
    projects = [shapes.get(f"{prefix}projects.{i}.weight") for i in range(4)]
    if all(p is not None for p in projects):
        widths["depth_head_out_channels"] = [int(p[0]) for p in projects]
    if f"{prefix}scratch.output_conv2.0.weight" in shapes:
        widths["depth_head_last_channels"] = int(shapes[f"{prefix}scratch.output_conv2.0.weight"][0])
    return widths


def expected_state(model_class: type, config: object) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """Key -> shape the model built from ``config`` holds, and the keys allowed to be absent (tied)."""
    with torch.device("meta"):
        model = model_class(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    optional: set[str] = set()
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    if out_emb is not None and out_emb.weight is in_emb.weight:
        optional.add("lm_head.weight")
    return shapes, optional


def model_fingerprint(folder: str | Path) -> str:
    """sha256 (first 16 hex digits) of a model folder's config and weights.

    Compiled artefacts (ONNX exports, TensorRT engines) record it so that a graph built from other
    weights is refused. Reads every weight byte once (about 1 s per GB); the result is cached per
    (path, size, mtime) in the user's cache folder.
    """
    import hashlib

    from depthvlm_ros.model.default import cache_dir

    folder = Path(folder).resolve()
    files = [folder / "config.json", *weight_files(folder)]
    stamp = [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    cache = cache_dir() / "fingerprints.json"
    try:
        known = json.loads(cache.read_text())
    except (OSError, json.JSONDecodeError):
        known = {}
    key = hashlib.sha256(json.dumps(stamp).encode()).hexdigest()
    if key in known:
        return known[key]
    value = sha256_of_files(files)
    known = dict(list(known.items())[-63:])  # bounded
    known[key] = value
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(known))
    except OSError:
        pass  # a read-only cache only costs a re-hash next time
    return value
