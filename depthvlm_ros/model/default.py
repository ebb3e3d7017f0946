"""The built-in default model: what runs when no ``--model`` is given. No downloads, ever.

Order: a trained ``depthvlm-tiny`` shipped inside the package (``depthvlm_ros/models/``), else
the tiny *initialised* model (deterministic random weights, seed 0), written once to the user's
cache folder and then loaded through the same strict loader as any checkpoint. The initialised
model's depth varies with the image but is not meaningful; tools say so when they use it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

PACKAGED_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "depthvlm-tiny"
TINY_INIT_NAME = "depthvlm-tiny-init-seed0-v2"
TINY_INIT_NOTE = (
    "no --model given: using the tiny initialised model (deterministic random weights; its depth "
    "varies with the image but is not meaningful until the trained depthvlm-tiny ships)"
)


#: Said once, at start, by every tool and the node when the shipped depthvlm-tiny serves.
BUILTIN_NOTE = (
    "serving the built-in depthvlm-tiny: it was trained only on this package's generated rooms and streets "
    "and has never seen a real photograph; for a real camera use the released DepthVLM-4B (--model / "
    "model_path: its folder; see README, 'Real cameras')"
)


def cache_dir() -> Path:
    """Where generated models live: $DEPTHVLM_CACHE, else $XDG_CACHE_HOME/depthvlm_ros."""
    if os.environ.get("DEPTHVLM_CACHE"):
        return Path(os.environ["DEPTHVLM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "depthvlm_ros"


def resolve_model(folder: str | Path | None) -> tuple[Path, str | None]:
    """The folder to load (``folder``, or the default when None/empty) and the one-line note to show
    at start: :data:`BUILTIN_NOTE` when the built-in model serves, the initialised model's note, or None."""
    if not folder:
        return default_model_dir()
    folder = Path(folder)
    is_builtin = folder.is_dir() and PACKAGED_MODEL_DIR.is_dir() and folder.resolve() == PACKAGED_MODEL_DIR
    return folder, BUILTIN_NOTE if is_builtin else None


def default_model_dir() -> tuple[Path, str]:
    """Folder of the default model, and the note to show the user about it."""
    if (PACKAGED_MODEL_DIR / "config.json").is_file():
        return PACKAGED_MODEL_DIR, BUILTIN_NOTE
    folder = cache_dir() / TINY_INIT_NAME
    if not (folder / "model.safetensors").is_file():
        from depthvlm_ros.model.factory import make_tiny_checkpoint

        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=folder.parent))
        try:
            make_tiny_checkpoint(staging, seed=0)
            if folder.exists():  # a stale or half-deleted folder without weights: set it aside
                shutil.rmtree(folder, ignore_errors=True)
            try:
                staging.rename(folder)  # atomic: concurrent first runs never see half a folder
            except OSError:
                if not (folder / "model.safetensors").is_file():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return folder, TINY_INIT_NOTE
