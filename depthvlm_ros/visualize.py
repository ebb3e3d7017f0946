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
