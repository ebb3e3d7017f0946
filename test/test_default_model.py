"""The shipped depthvlm-tiny: small, documented, loadable, and really trained."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from depthvlm_ros.model.default import BUILTIN_NOTE, PACKAGED_MODEL_DIR, default_model_dir, resolve_model


def test_shipped_model_is_the_default_small_and_documented():
    folder, note = default_model_dir()
    assert folder == PACKAGED_MODEL_DIR and note == BUILTIN_NOTE
    assert resolve_model(None) == resolve_model("") == (PACKAGED_MODEL_DIR, BUILTIN_NOTE)
    assert resolve_model(PACKAGED_MODEL_DIR / ".." / "depthvlm-tiny")[1] == BUILTIN_NOTE  # named explicitly
    assert resolve_model("/models/DepthVLM-4B") == (Path("/models/DepthVLM-4B"), None)
    size_mb = (folder / "model.safetensors").stat().st_size / 2**20
    assert size_mb <= 25.0
    card = (folder / "README.md").read_text()
    for needed in ("depthvlm train --stage 0", "depthvlm train --stage 1", "depthvlm train --stage 2",
                   "depthvlm generate", "δ1", "AbsRel", "seed"):
        assert needed in card, needed
    assert not list(folder.glob("*.bin")) and not list(folder.glob("*.pt"))  # safetensors only


@pytest.mark.model_core
def test_shipped_model_measures_held_out_scenes():
    """Unseen seeds (the training sets are seeds 1, 21, 22): the depth is metric, not a constant guess."""
    from depthvlm_ros.pipeline import DepthVLM
    from depthvlm_ros.scenes.dataset import FrameSpec, generate_frame

    model = DepthVLM.from_pretrained(PACKAGED_MODEL_DIR)
    deltas = []
    for kind in ("indoor", "outdoor"):
        for index in range(3):
            _, view = generate_frame(4242, index, FrameSpec(kind, 320, 240, 140.0, 550.0))
            pred = model.predict_depth(view.rgb, view.intrinsics).depth
            ok = np.isfinite(view.depth)
            ratio = np.maximum(pred[ok] / view.depth[ok], view.depth[ok] / pred[ok])
            deltas.append(float((ratio < 1.25).mean()))
            assert pred[ok].std() > 0.2 * view.depth[ok].std()  # follows the scene, not flat
    assert np.mean(deltas) > 0.6, deltas


def test_model_card_states_the_tokenizer_as_shipped():
    """The card's tokenizer numbers are the shipped tokenizer's (they were wrong once)."""
    import json

    tokenizer = json.loads((PACKAGED_MODEL_DIR / "tokenizer.json").read_text())
    learned, special = len(tokenizer["model"]["vocab"]), len(tokenizer["added_tokens"])
    card = (PACKAGED_MODEL_DIR / "README.md").read_text()
    assert f"{learned} tokens" in card and f"the {special} Qwen3-VL special tokens" in card
    assert f"{learned + special} ids" in card
