"""Teaching a small DepthVLM to point at what a question names: grounding losses (training only).

The language-model loss alone never binds a question's words to the image tokens they name in a model
as small as depthvlm-tiny (its model card, ``shared/reference/grounding.md``). These losses supervise
the steps a pointing answer needs, on the model's own attention and states; none adds a module to the
model, so the architecture, the checkpoint layout and the answer format stay as released:

==============  ====================================================================================
loss            what it asks of the model
==============  ====================================================================================
pointer         at the answer positions that predict a point's x and y (``[`` and ``,`` of
                ``"point_2d": [x, y]``), the attention of a few heads (``pointer_heads``) puts its
                mass on the image tokens of the named object: cross-entropy between the object's
                area fraction per merged cell and the heads' attention probabilities (the KL up to
                the target's entropy; arXiv 2511.12738)
hop             earlier heads (``hop_heads``) at the same positions attend to the question's words
                that name the object (its colour and name): the object's identity reaches the
                position that then looks it up in the image
position        a linear readout of each image token's column and row (x, y and sin/cos at two
                frequencies, 0-1 across the image) from the vision tower's merged output and from
                the LLM's image-token states at the input of ``position_layer``, so the column
                survives to where the pointer reads it (CoordConv's lesson: give coordinates)
coordinates     the answer's coordinate tokens get soft targets, a Gaussian of ``coord_sigma`` (0-1000
                units) over the neighbouring coordinates of the same axis, weighted ``coord_weight``
                (DIST2Loss-style: a near miss costs less than a far one)
==============  ====================================================================================

Each loss has a weight; 0 turns it off (all off: the trainer is exactly what it was). Heads are named
``LAYER.HEAD`` (0-based). The attention rows come from the LLM's own forward (eager attention, forward
hooks): nothing else is computed. The readouts are the only new parameters; they live beside the model
(``grounding.safetensors`` in a checkpoint folder, never in the model folder), so ``--resume`` continues
them and the model folder loads strictly as before.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from depthvlm_ros.errors import InputError

#: File of a checkpoint folder that holds the position readouts (training only).
GROUNDING_FILE = "grounding.safetensors"
#: Relative coordinates of answers run 0-1000 (Qwen's grounding scale).
COORD_RANGE = 1000


def parse_heads(text: str | Sequence[str]) -> tuple[tuple[int, int], ...]:
    """``"2.0,2.1"`` (or a list of ``LAYER.HEAD``) -> ((2, 0), (2, 1))."""
    items = text.split(",") if isinstance(text, str) else list(text)
    heads = []
    for item in items:
        item = item.strip()
        if not item:
            continue
        match = re.fullmatch(r"(\d+)\.(\d+)", item)
        if match is None:
            raise InputError(f"head {item!r}: use LAYER.HEAD, e.g. 2.0")
        heads.append((int(match.group(1)), int(match.group(2))))
    return tuple(heads)


@dataclass(frozen=True)
class GroundingConfig:
    """Weights (0 = off) and where each loss acts; see the module table."""

    pointer_weight: float = 0.0
    pointer_heads: tuple[tuple[int, int], ...] = ((2, 2), (2, 3), (3, 2), (3, 3))
    hop_weight: float = 0.0
    hop_heads: tuple[tuple[int, int], ...] = ((1, 1), (1, 2))
    position_weight: float = 0.0
    position_layer: int = 2
    coord_weight: float = 1.0
    coord_sigma: float = 0.0

    @property
    def attention_layers(self) -> tuple[int, ...]:
        """LLM layers whose attention rows a loss reads."""
        layers = set()
        if self.pointer_weight > 0:
            layers |= {layer for layer, _ in self.pointer_heads}
        if self.hop_weight > 0:
            layers |= {layer for layer, _ in self.hop_heads}
        return tuple(sorted(layers))

    @property
    def active(self) -> bool:
        return bool(self.attention_layers) or self.position_weight > 0 or self.coord_sigma > 0 \
            or self.coord_weight != 1.0

    def check(self, num_layers: int, num_heads: int) -> None:
        for name, heads in (("pointer", self.pointer_heads), ("hop", self.hop_heads)):
            for layer, head in heads:
                if not (0 <= layer < num_layers and 0 <= head < num_heads):
                    raise InputError(f"--{name}-heads {layer}.{head}: the LLM has {num_layers} layers of "
                                     f"{num_heads} heads")
        if self.position_weight > 0 and not 0 <= self.position_layer < num_layers:
            raise InputError(f"--position-layer {self.position_layer}: the LLM has {num_layers} layers")
        if min(self.pointer_weight, self.hop_weight, self.position_weight, self.coord_sigma) < 0 \
                or self.coord_weight <= 0:
            raise InputError("grounding weights and coord-sigma must be >= 0, coord-weight > 0")


# -- coordinates in the tokenizer --------------------------------------------------------------------


@dataclass(frozen=True)
class CoordinateVocab:
    """Token ids of the answers' coordinates: x is written without a leading space (``[450``), y with one
    (``, 320``), so each axis has its own ids. ``values[id]`` is the coordinate a token writes."""

    x_ids: tuple[int, ...]
    y_ids: tuple[int, ...]
    values: dict[int, int]
    open_id: int  # " [" before x
    comma_id: int  # "," between x and y

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, step: int = 10) -> CoordinateVocab:
        def single(text: str) -> int | None:
            ids = tokenizer.encode(text, add_special_tokens=False)
            return ids[0] if len(ids) == 1 else None

        x_ids, y_ids, values = [], [], {}
        for value in range(0, COORD_RANGE + 1, step):
            x, y = single(str(value)), single(f" {value}")
            if x is not None and y is not None:
                x_ids.append(x)
                y_ids.append(y)
                values[x] = values[y] = value
        open_id, comma_id = single(" ["), single(",")
        if not x_ids or open_id is None or comma_id is None:
            raise InputError("the tokenizer does not write coordinates as single tokens (grounding losses "
                             "need depthvlm-tiny's tokenizer or one like it)")
        return cls(tuple(x_ids), tuple(y_ids), values, open_id, comma_id)

    def places(self, ids: Sequence[int], start: int) -> list[tuple[int, int]]:
        """Positions (in ``ids``) that predict each point's x and y, from ``start`` on: the ``[`` before x
        and the ``,`` before y of every ``[x, y]`` written with coordinate tokens."""
        xs, ys = set(self.x_ids), set(self.y_ids)
        out = []
        for i in range(start, len(ids) - 3):
            if ids[i] == self.open_id and ids[i + 1] in xs and ids[i + 2] == self.comma_id and ids[i + 3] in ys:
                out.append((i, i + 2))
        return out

    def soft_targets(self, sigma: float, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Per axis: ``ids`` (K,) and ``table`` (K, K): row k is the Gaussian (``sigma`` in 0-1000 units)
        around coordinate k over the axis' K coordinates, summing to 1."""
        out = {}
        for axis, ids in (("x", self.x_ids), ("y", self.y_ids)):
            values = torch.tensor([self.values[i] for i in ids], dtype=torch.float32, device=device)
            table = torch.exp(-0.5 * ((values[:, None] - values[None, :]) / sigma) ** 2)
            out[f"{axis}_ids"] = torch.tensor(ids, dtype=torch.long, device=device)
            out[f"{axis}_table"] = table / table.sum(dim=1, keepdim=True)
        return out


def lm_loss_sum_soft(logits: torch.Tensor, labels: torch.Tensor, vocab: CoordinateVocab, weight: float,
                     sigma: float, ignore_index: int = -100) -> torch.Tensor:
    """Next-token cross-entropy summed over the labelled tokens, coordinate tokens weighted ``weight`` and,
    with ``sigma`` > 0, scored against a Gaussian over their axis' coordinates instead of one token."""
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1)
    keep = shift_labels != ignore_index
    if not bool(keep.any()):
        return logits.sum() * 0.0
    logp = F.log_softmax(shift_logits[keep], dim=-1)
    target = shift_labels[keep]
    nll = -logp.gather(1, target[:, None])[:, 0]
    total = nll.sum()
    soft = vocab.soft_targets(sigma, logits.device) if sigma > 0 else None
    for axis in ("x", "y"):
        ids = torch.tensor(vocab.x_ids if axis == "x" else vocab.y_ids, device=logits.device)
        on_axis = torch.isin(target, ids)
        if not bool(on_axis.any()):
            continue
        # the coordinate's own term is replaced: weight x (its one-hot or its Gaussian cross-entropy)
        total = total - nll[on_axis].sum()
        if soft is None:
            total = total + weight * nll[on_axis].sum()
            continue
        slot = (target[on_axis][:, None] == ids[None, :]).float().argmax(dim=1)  # each target's place on its axis
        rows = soft[f"{axis}_table"][slot]  # (n, K): the Gaussian around each target coordinate
        total = total - weight * (rows * logp[on_axis][:, ids]).sum()
    return total


# -- targets from the data --------------------------------------------------------------------------


def cell_fractions(mask: np.ndarray, index: int, size: tuple[int, int], cell: int) -> np.ndarray:
    """The share of each ``cell`` x ``cell`` block of the model grid ``size`` (width, height, pixels) that
    shows object ``index``, from its camera-grid mask (nearest-neighbour resize, as the image's own
    geometry), raster order; sums to 1 (all zeros when the object is not visible at that size)."""
    width, height = size
    rows = np.minimum(((np.arange(height) + 0.5) * mask.shape[0] / height).astype(np.int64), mask.shape[0] - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * mask.shape[1] / width).astype(np.int64), mask.shape[1] - 1)
    on = (mask[rows[:, None], cols[None, :]] == index).astype(np.float32)
    cells = on.reshape(height // cell, cell, width // cell, cell).mean(axis=(1, 3)).reshape(-1)
    total = float(cells.sum())
    return cells / total if total > 0 else cells


_POINT_RE = re.compile(r'("point_2d": \[)(\d+)(, \d+\])')
_AT_RE = re.compile(r"\((\d+), (\d+)\)")


def mirror_qa_text(question: str, answer: str) -> tuple[str, str]:
    """A question and its answer for the horizontally mirrored image: every ``point_2d`` x becomes
    1000 - x, and so does the x of a "what is at (x, y)" question."""
    answer = _POINT_RE.sub(lambda m: f"{m.group(1)}{COORD_RANGE - int(m.group(2))}{m.group(3)}", answer)
    question = _AT_RE.sub(lambda m: f"({COORD_RANGE - int(m.group(1))}, {m.group(2)})", question)
    return question, answer


def position_targets(grid_h: int, grid_w: int) -> torch.Tensor:
    """(grid_h * grid_w, 10) raster-order targets of the position readouts: x, y in 0-1 (cell centres),
    then sin and cos of pi x, pi y, 2 pi x, 2 pi y."""
    y, x = torch.meshgrid((torch.arange(grid_h) + 0.5) / grid_h, (torch.arange(grid_w) + 0.5) / grid_w,
                          indexing="ij")
    x, y = x.reshape(-1), y.reshape(-1)
    parts = [x, y]
    for f in (math.pi, 2 * math.pi):
        parts += [torch.sin(f * x), torch.cos(f * x), torch.sin(f * y), torch.cos(f * y)]
    return torch.stack(parts, dim=1).float()


@dataclass
class PlaceTargets:
    """A batch's places (points of answers) with what the losses compare them with: one row each."""

    rows: torch.Tensor  # (P,) batch row
    x_pos: torch.Tensor  # (P,) position that predicts the x token
    y_pos: torch.Tensor  # (P,) position that predicts the y token
    cells: torch.Tensor  # (P, n_image_tokens) area fraction per image token (all zero: no pointer target)
    words: torch.Tensor  # (P, L) share per sequence position of the question's words naming it (zero: none)

    def to(self, device: torch.device | str) -> PlaceTargets:
        return PlaceTargets(**{k: v.to(device) for k, v in vars(self).items()})

    @classmethod
    def empty(cls, n_tokens: int, length: int) -> PlaceTargets:
        return cls(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                   torch.zeros(0, dtype=torch.long), torch.zeros(0, n_tokens), torch.zeros(0, length))


def label_positions(ids: Sequence[int], label_ids: Sequence[int], start: int, end: int) -> list[int]:
    """Positions of the first occurrence of ``label_ids`` in ``ids[start:end]`` (empty if absent)."""
    n = len(label_ids)
    for i in range(start, end - n + 1):
        if list(ids[i:i + n]) == list(label_ids):
            return list(range(i, i + n))
    return []


# -- what the forward leaves behind ----------------------------------------------------------------------


@dataclass
class VisionTap:
    """The vision tower's outputs for all images of a forward, concatenated: merged tokens and DeepStack levels."""

    pooler_output: torch.Tensor  # (images x tokens, hidden)
    deepstack_features: list[torch.Tensor]


class GroundingTaps:
    """Forward hooks that keep what the losses and probes read, per forward: attention probabilities of
    chosen LLM layers (needs eager attention), image-token states at chosen layers' inputs and outputs,
    and the vision tower's merged output and DeepStack features."""

    def __init__(self, model: Any, attention_layers: Sequence[int] = (), input_layers: Sequence[int] = (),
                 output_layers: Sequence[int] = (), vision: bool = False) -> None:
        self.attention: dict[int, torch.Tensor] = {}
        self.inputs: dict[int, torch.Tensor] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.vision: VisionTap | None = None
        self._handles = []
        layers = model.model.language_model.layers
        for layer in attention_layers:
            self._handles.append(layers[layer].self_attn.register_forward_hook(
                lambda _m, _i, out, layer=layer: self.attention.__setitem__(layer, out[1])))
        for layer in input_layers:
            self._handles.append(layers[layer].register_forward_pre_hook(
                lambda _m, args, kwargs, layer=layer: self.inputs.__setitem__(
                    layer, args[0] if args else kwargs["hidden_states"]), with_kwargs=True))
        for layer in output_layers:
            self._handles.append(layers[layer].register_forward_hook(
                lambda _m, _i, out, layer=layer: self.outputs.__setitem__(
                    layer, out[0] if isinstance(out, tuple) else out)))
        if vision:  # (the fields are taken now: the caller replaces them with per-image splits afterwards)
            self._handles.append(model.model.visual.register_forward_hook(
                lambda _m, _i, out: setattr(self, "vision", VisionTap(out.pooler_output,
                                                                      list(out.deepstack_features)))))

    def clear(self) -> None:
        self.attention.clear()
        self.inputs.clear()
        self.outputs.clear()
        self.vision = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def use_eager_text_attention(model: Any) -> None:
    """Attention probabilities are only materialised by the eager implementation (the LLM's layers only)."""
    model.config.text_config._attn_implementation = "eager"
    model.model.language_model.config._attn_implementation = "eager"


class PositionReadout(nn.Module):
    """Linear readouts of an image token's position (:func:`position_targets`): one from the vision tower's
    merged output, one from the LLM's states at a layer's input."""

    def __init__(self, vision_dim: int, text_dim: int) -> None:
        super().__init__()
        self.vision = nn.Linear(vision_dim, 10)
        self.text = nn.Linear(text_dim, 10)


@dataclass
class GroundingLosses:
    """Sums over a batch (the trainer divides by global counts) and the counts."""

    pointer: torch.Tensor
    hop: torch.Tensor
    position: torch.Tensor
    places: int
    images: int
    stats: dict[str, float] = field(default_factory=dict)


def grounding_losses(cfg: GroundingConfig, taps: GroundingTaps, readout: PositionReadout | None,
                     places: PlaceTargets, image_start: int, grid_h: int, grid_w: int,
                     batch_size: int) -> GroundingLosses:
    """The pointer, hop and position losses of one forward (sums; see :class:`GroundingLosses`).

    Pointer: for each place with a target, each pointer head and each of the x and y positions,
    ``-sum(target * log attention)`` over the image tokens. Hop: the same with the question's words as the
    target and the hop heads. Position: per image, the mean squared error of both readouts over its
    tokens.
    """
    n = grid_h * grid_w
    zero = next(iter(taps.attention.values()), None)
    device = zero.device if zero is not None else places.cells.device
    pointer = hop = position = torch.zeros((), device=device)
    stats: dict[str, float] = {}
    has_cells = places.cells.sum(dim=1) > 0
    has_words = places.words.sum(dim=1) > 0
    if cfg.pointer_weight > 0 and bool(has_cells.any()):
        rows, target = places.rows[has_cells], places.cells[has_cells]
        hits = []
        for layer, head in cfg.pointer_heads:
            attn = taps.attention[layer][:, head]  # (B, L, L)
            for pos in (places.x_pos[has_cells], places.y_pos[has_cells]):
                probs = attn[rows, pos, image_start:image_start + n]  # (P, n)
                pointer = pointer - (target * torch.log(probs.clamp_min(1e-9))).sum()
                hits.append((target.gather(1, probs.argmax(dim=1, keepdim=True))[:, 0] > 0).float())
        pointer = pointer / (2 * len(cfg.pointer_heads))
        stats["pointer_hits"] = float(torch.cat(hits).mean())
    if cfg.hop_weight > 0 and bool(has_words.any()):
        rows, target = places.rows[has_words], places.words[has_words]
        hits = []
        for layer, head in cfg.hop_heads:
            attn = taps.attention[layer][:, head]
            for pos in (places.x_pos[has_words], places.y_pos[has_words]):
                probs = attn[rows, pos, : target.shape[1]]  # (P, L)
                hop = hop - (target * torch.log(probs.clamp_min(1e-9))).sum()
                hits.append((target.gather(1, probs.argmax(dim=1, keepdim=True))[:, 0] > 0).float())
        hop = hop / (2 * len(cfg.hop_heads))
        stats["hop_hits"] = float(torch.cat(hits).mean())
    if cfg.position_weight > 0 and readout is not None:
        want = position_targets(grid_h, grid_w).to(device)
        merged = taps.vision.pooler_output.reshape(batch_size, n, -1)
        text = taps.inputs[cfg.position_layer][:, image_start:image_start + n]
        position = (F.mse_loss(readout.vision(merged.float()), want.expand(batch_size, -1, -1), reduction="none")
                    .mean(dim=(1, 2)).sum()
                    + F.mse_loss(readout.text(text.float()), want.expand(batch_size, -1, -1), reduction="none")
                    .mean(dim=(1, 2)).sum()) / 2
    return GroundingLosses(pointer, hop, position, int(has_cells.sum()), batch_size, stats)
