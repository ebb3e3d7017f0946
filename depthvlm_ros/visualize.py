"""Depth for people: a turbo colour map and a labelled metre scale bar (numpy + PIL).

Convention: near is warm (red), far is cool (blue), invalid is black. The colour range is the
2nd..98th percentile of the valid depth unless given, so one outlier does not flatten the view.
"""

from __future__ import annotations

import numpy as np

# Polynomial fit of Google's Turbo colour map (published coefficients), evaluated once to a LUT.
_TURBO_COEFFS = np.array([
    [0.13572138, 4.61539260, -42.66032258, 132.13108234, -152.94239396, 59.28637943],
    [0.09140261, 2.19418839, 4.84296658, -14.18503333, 4.27729857, 2.82956604],
    [0.10667330, 12.64194608, -60.58204836, 110.36276771, -89.90310912, 27.34824973],
])


def _turbo_lut() -> np.ndarray:
    x = np.linspace(0.0, 1.0, 256)
    powers = np.stack([x**i for i in range(6)], axis=1)  # (256, 6)
    rgb = np.clip(powers @ _TURBO_COEFFS.T, 0.0, 1.0)
    return np.rint(rgb * 255).astype(np.uint8)


TURBO_LUT = _turbo_lut()


def depth_range(depth: np.ndarray, min_m: float | None = None, max_m: float | None = None) -> tuple[float, float]:
    """Colour range in metres: given bounds, else the 2nd..98th percentile of valid depth."""
    valid = depth[np.isfinite(depth) & (depth > 0)]
    lo = min_m if min_m is not None else (float(np.percentile(valid, 2)) if valid.size else 0.0)
    hi = max_m if max_m is not None else (float(np.percentile(valid, 98)) if valid.size else 1.0)
    if not hi > lo:
        hi = lo + 1e-3
    return lo, hi


def colorize_depth(depth: np.ndarray, min_m: float | None = None, max_m: float | None = None) -> np.ndarray:
    """(H, W) metres -> (H, W, 3) uint8 RGB; near red, far blue, invalid black."""
    depth = np.asarray(depth, dtype=np.float32)
    lo, hi = depth_range(depth, min_m, max_m)
    valid = np.isfinite(depth) & (depth > 0)
    t = np.clip((hi - np.where(valid, depth, hi)) / (hi - lo), 0.0, 1.0)
    rgb = TURBO_LUT[np.rint(t * 255).astype(np.uint8)]
    rgb[~valid] = 0
    return rgb


def add_scale_bar(color: np.ndarray, min_m: float, max_m: float, ticks: int = 5) -> np.ndarray:
    """Append a vertical colour bar with metre labels to the right of a colourised depth image."""
    from PIL import Image, ImageDraw, ImageFont

    height = color.shape[0]
    bar_w, label_w = max(12, height // 24), 64
    t = np.linspace(1.0, 0.0, height)  # top = far (cool), bottom = near (warm)
    bar = np.repeat(TURBO_LUT[np.rint((1 - t) * 255).astype(np.uint8)][:, None, :], bar_w, axis=1)
    panel = np.full((height, bar_w + label_w, 3), 255, dtype=np.uint8)
    panel[:, :bar_w] = bar
    image = Image.fromarray(np.concatenate([color, panel], axis=1))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    x0 = color.shape[1] + bar_w + 4
    for i in range(ticks):
        frac = i / (ticks - 1)
        y = int(round(frac * (height - 12)))
        value = max_m - frac * (max_m - min_m)  # top: far
        draw.text((x0, y), f"{value:.2f} m", fill=(0, 0, 0), font=font)
    return np.asarray(image)


def draw_answer(rgb: np.ndarray, region_px: list[float] | None, truth_boxes: list[tuple[list[float], str]],
                lines: list[str], scale: int = 2) -> np.ndarray:
    """A spatial answer for people: the frame (enlarged ``scale`` times) with the true boxes of the named
    objects (green, labelled), the answer's place (magenta: a cross for a point, a rectangle for a box) and
    ``lines`` of text in a white strip below. Boxes and the region are ``[u_min, v_min, u_max, v_max]``
    pixels of ``rgb``."""
    from PIL import Image, ImageDraw, ImageFont

    height, width = rgb.shape[:2]
    font = ImageFont.load_default()
    strip = 14 * len(lines) + 8
    image = Image.new("RGB", (width * scale, height * scale + strip), (255, 255, 255))
    image.paste(Image.fromarray(np.ascontiguousarray(rgb[..., :3])).resize((width * scale, height * scale),
                                                                          Image.Resampling.NEAREST))
    draw = ImageDraw.Draw(image)

    def px(u: float, v: float) -> tuple[float, float]:
        return ((u + 0.5) * scale, (v + 0.5) * scale)

    for box, label in truth_boxes:
        (x0, y0), (x1, y1) = px(box[0] - 0.5, box[1] - 0.5), px(box[2] + 0.5, box[3] + 0.5)
        draw.rectangle([x0, y0, x1, y1], outline=(0, 230, 0), width=2)
        draw.text((x0 + 3, max(0.0, y0 - 12)), label, fill=(0, 230, 0), font=font)
    if region_px:
        u0, v0, u1, v1 = region_px
        if u1 - u0 < 1 and v1 - v0 < 1:  # a point
            x, y = px((u0 + u1) / 2, (v0 + v1) / 2)
            r = 4 * scale
            draw.line([x - r, y, x + r, y], fill=(255, 0, 255), width=3)
            draw.line([x, y - r, x, y + r], fill=(255, 0, 255), width=3)
            draw.ellipse([x - r, y - r, x + r, y + r], outline=(255, 0, 255), width=2)
        else:
            draw.rectangle([*px(u0, v0), *px(u1, v1)], outline=(255, 0, 255), width=3)
    for i, line in enumerate(lines):
        draw.text((6, height * scale + 4 + 14 * i), line, fill=(0, 0, 0), font=font)
    return np.asarray(image)
