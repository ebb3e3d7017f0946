"""An independent re-statement of the released DepthVLM architecture, for parity tests only.

Written from the published facts (shared/reference/official_checkpoint.md) in the style of the
release's DPT code: ReLU modules with ``inplace=True`` inside the residual conv units, so their
skip connection sees the ReLU'd input. It shares no code with ``depthvlm_ros.model``; the model
parts come straight from stock transformers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RefResidualConvUnit(nn.Module):
    def __init__(self, features: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, 1, 1, bias=True)
        self.conv2 = nn.Conv2d(features, features, 3, 1, 1, bias=True)
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.activation(x)
        out = self.conv1(out)
        out = self.activation(out)
        out = self.conv2(out)
        return out + x


class RefFusion(nn.Module):
    def __init__(self, features: int, skip: bool) -> None:
        super().__init__()
        if skip:
            self.resConfUnit1 = RefResidualConvUnit(features)
        self.resConfUnit2 = RefResidualConvUnit(features)
        self.out_conv = nn.Conv2d(features, features, 1, 1, 0, bias=True)

    def forward(self, *xs, size=None):
        output = xs[0]
        if len(xs) == 2:
            output = output + self.resConfUnit1(xs[1])
        output = self.resConfUnit2(output)
        kw = {"scale_factor": 2} if size is None else {"size": size}
        output = F.interpolate(output, **kw, mode="bilinear", align_corners=True)
        return self.out_conv(output)


class RefDPTHead(nn.Module):
    def __init__(self, dim_in, features=256, out_channels=(256, 512, 1024, 1024), last=32, patch=32):
        super().__init__()
        self.patch = patch
        self.norm = nn.LayerNorm(dim_in)
        self.projects = nn.ModuleList([nn.Conv2d(dim_in, c, 1, 1, 0) for c in out_channels])
        self.resize_layers = nn.ModuleList([
            nn.ConvTranspose2d(out_channels[0], out_channels[0], 8, 8, 0),
            nn.ConvTranspose2d(out_channels[1], out_channels[1], 4, 4, 0),
            nn.ConvTranspose2d(out_channels[2], out_channels[2], 2, 2, 0),
            nn.Identity(),
        ])
        s = nn.Module()
        s.layer1_rn = nn.Conv2d(out_channels[0], features, 3, 1, 1, bias=False)
        s.layer2_rn = nn.Conv2d(out_channels[1], features, 3, 1, 1, bias=False)
        s.layer3_rn = nn.Conv2d(out_channels[2], features, 3, 1, 1, bias=False)
        s.layer4_rn = nn.Conv2d(out_channels[3], features, 3, 1, 1, bias=False)
        s.refinenet1 = RefFusion(features, True)
        s.refinenet2 = RefFusion(features, True)
        s.refinenet3 = RefFusion(features, True)
        s.refinenet4 = RefFusion(features, False)
        s.output_conv1 = nn.Conv2d(features, features // 2, 3, 1, 1)
        s.output_conv2 = nn.Sequential(
            nn.Conv2d(features // 2, last, 3, 1, 1), nn.ReLU(True), nn.Conv2d(last, 1, 1, 1, 0), nn.Softplus()
        )
        self.scratch = s

    def forward(self, feats, ph, pw):
        out = []
        for i, x in enumerate(feats):
            x = self.norm(x)
            x = x.permute(0, 2, 1).reshape(x.shape[0], x.shape[-1], ph, pw)
            x = self.projects[i](x)
            x = self.resize_layers[i](x)
            out.append(x)
        l1, l2, l3, l4 = out
        s = self.scratch
        l1, l2, l3, l4 = s.layer1_rn(l1), s.layer2_rn(l2), s.layer3_rn(l3), s.layer4_rn(l4)
        p4 = s.refinenet4(l4, size=l3.shape[2:])
        p3 = s.refinenet3(p4, l3, size=l2.shape[2:])
        p2 = s.refinenet2(p3, l2, size=l1.shape[2:])
        p1 = s.refinenet1(p2, l1)
        out = s.output_conv1(p1)
        out = F.interpolate(out, (ph * self.patch, pw * self.patch), mode="bilinear", align_corners=True)
        return s.output_conv2(out)


def reference_depth(folder, rgb_canonical):
    """Depth the released pipeline computes for an image already at the canonical focal.

    Stock pieces only: the PIL Qwen2-VL image processor with the folder's settings, the folder's
    tokenizer and chat template, stock ``Qwen3VLForConditionalGeneration`` weights from the
    folder, and :class:`RefDPTHead` loaded with the folder's ``depth_head.*`` tensors.
    """
    import json
    from pathlib import Path

    from safetensors.torch import load_file
    from transformers import AutoTokenizer, Qwen3VLConfig, Qwen3VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    folder = Path(folder)
    cfg = Qwen3VLConfig.from_pretrained(folder)
    pp = json.loads((folder / "preprocessor_config.json").read_text())
    proc = Qwen2VLImageProcessorPil(**{k: pp[k] for k in (
        "size", "patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std")})
    tok = AutoTokenizer.from_pretrained(folder)
    template = (folder / "chat_template.jinja").read_text()
    msgs = [
        {"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": (
            "Given this image, estimate the metric depth (in meters, rounded to two decimal places) "
            "for every pixel of the image.")}]},
    ]
    text = tok.apply_chat_template(msgs, chat_template=template, tokenize=False, add_generation_prompt=True)
    px = proc(images=[rgb_canonical], return_tensors="pt")
    n = int(px["image_grid_thw"][0].prod()) // 4
    ids = torch.tensor([tok(text.replace("<|image_pad|>", "<|image_pad|>" * n), add_special_tokens=False)["input_ids"]])
    mm = (ids == cfg.image_token_id).int()

    vlm = Qwen3VLForConditionalGeneration.from_pretrained(folder, config=cfg).eval()
    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update({k[len("depth_head."):]: v for k, v in load_file(f).items() if k.startswith("depth_head.")})
    head = RefDPTHead(cfg.text_config.hidden_size, cfg.depth_head_features, cfg.depth_head_out_channels,
                      cfg.depth_head_last_channels)
    head.load_state_dict(state, strict=True)
    head.eval()
    with torch.no_grad():
        vis = vlm.model.get_image_features(px["pixel_values"], px["image_grid_thw"], return_dict=True)
        deep = [torch.cat(list(f), 0) for f in vis.deepstack_features]
        hidden = vlm.model(input_ids=ids, image_grid_thw=px["image_grid_thw"], mm_token_type_ids=mm,
                           mm_encoder_outputs={"image": vis}).last_hidden_state[0]
        _, gh, gw = (int(v) for v in px["image_grid_thw"][0])
        feats = [f[None] for f in (*deep, hidden[ids[0] == cfg.image_token_id])]
        return head(feats, gh // 2, gw // 2)[0, 0].numpy()
