"""Camera geometry on plain numpy arrays: no ROS, no torch.

Conventions (the ones ROS and OpenCV use):
- Pixel coordinates ``(u, v)`` = (column, row) with the centre of the top-left pixel at (0, 0).
- Intrinsics are in pixels; depth is z-depth along the optical axis in metres.
- Back-projected points are in the camera's optical frame (REP 103: x right, y down, z forward).
- Invalid depth is NaN in float images (REP 117) and 0 in 16-bit millimetre images (REP 118).

Resizing an image from ``W`` to ``W'`` pixels scales the continuous coordinate ``u + 0.5`` by
``s = W'/W``, so ``fx' = s * fx`` and ``cx' = s * (cx + 0.5) - 0.5``. Every resize in the package
(images, depth maps, K) uses this one convention, so a depth map resized back to the camera grid
lines up with the camera's K exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from depthvlm_ros.errors import InputError, shown

#: The focal length (pixels) at which DepthVLM sees every image (paper: "canonical focal").
CANONICAL_FX = 1000.0
#: Largest image side we accept from the outside, in pixels (bounds memory per frame).
MAX_IMAGE_SIDE = 8192
#: Default cap on image tokens (one per 32 x 32 px of model input) for the node and the tools. 1280
#: keeps the released protocol for a 640x480 camera with fx >= 485 px (a horizontal field of view up
#: to 67 degrees: RealSense D435, Kinect and Xtion class lenses need 800-1100 tokens) and bounds the
#: 4B model's prefill per frame on a Jetson; wider lenses and larger images take the canonical-camera
#: route at this size instead of asking for thousands of tokens (fx 300 px: 3300).
DEFAULT_MAX_IMAGE_TOKENS = 1280
#: Smallest focal length (pixels) of a camera we accept: below it no sane model input exists.
MIN_FOCAL_PX = 1.0
#: Largest depth a 16UC1 millimetre image can hold, in metres.
MAX_DEPTH_16UC1_M = 65.535


@dataclass(frozen=True)
class Intrinsics:
    """Pinhole intrinsics of an image of ``width`` x ``height`` pixels (no distortion)."""

    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int

    def __post_init__(self) -> None:
        for name in ("fx", "fy", "cx", "cy"):
            value = getattr(self, name)
            if not isinstance(value, (int, float, np.floating, np.integer)) or not math.isfinite(value):
                raise InputError(f"intrinsics: {name} must be a finite number, got {shown(value)}", "intrinsics.finite")
        if self.fx <= 0 or self.fy <= 0:
            raise InputError(f"intrinsics: focal lengths must be positive, got fx={self.fx:.6g}, fy={self.fy:.6g}",
                             "intrinsics.focal")
        if not (1 <= int(self.width) <= MAX_IMAGE_SIDE and 1 <= int(self.height) <= MAX_IMAGE_SIDE):
            raise InputError(
                f"intrinsics: image size {self.width}x{self.height} outside 1..{MAX_IMAGE_SIDE} pixels"
            )
        object.__setattr__(self, "width", int(self.width))
        object.__setattr__(self, "height", int(self.height))
        # A principal point far outside the image is a broken calibration: it would put every 3D point
        # kilometres off (cx = 1e30 gives finite but absurd clouds). Off-centre lenses stay well inside this.
        if not (-self.width <= self.cx <= 2 * self.width and -self.height <= self.cy <= 2 * self.height):
            raise InputError(f"intrinsics: principal point ({self.cx:.6g}, {self.cy:.6g}) px is outside "
                             f"[-W, 2W] x [-H, 2H] of a {self.width}x{self.height} image", "intrinsics.principal_point")
        for name in ("fx", "fy", "cx", "cy"):
            object.__setattr__(self, name, float(getattr(self, name)))

    @classmethod
    def from_k(cls, k: Sequence[float] | np.ndarray, width: int, height: int) -> "Intrinsics":
        """From a row-major 3x3 camera matrix (``CameraInfo.k``: 9 numbers, or a 3x3 array)."""
        kk = np.asarray(k, dtype=np.float64).reshape(-1)
        if kk.size != 9:
            raise InputError(f"intrinsics: K must have 9 elements, got {kk.size}")
        return cls(fx=kk[0], fy=kk[4], cx=kk[2], cy=kk[5], width=width, height=height)

    @classmethod
    def from_fx(
        cls,
        width: int,
        height: int,
        fx: float,
        fy: float | None = None,
        cx: float | None = None,
        cy: float | None = None,
    ) -> "Intrinsics":
        """From a focal length; fy defaults to fx and the principal point to the image centre."""
        return cls(
            fx=fx,
            fy=fx if fy is None else fy,
            cx=(width - 1) / 2.0 if cx is None else cx,
            cy=(height - 1) / 2.0 if cy is None else cy,
            width=width,
            height=height,
        )

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> "Intrinsics":
        """From a ROS camera-calibration YAML mapping or a plain ``{fx, fy, cx, cy, width, height}``.

        Accepted forms: ``image_width``/``image_height`` + ``camera_matrix: {data: [9]}`` (the
        ``camera_calibration_parsers`` format), ``width``/``height`` + ``k`` or ``K`` (CameraInfo
        fields), or ``width``/``height`` + ``fx``/``fy``/``cx``/``cy``.

        When a projection matrix is present (``projection_matrix: {data: [12]}`` or ``p``/``P``)
        with a positive focal length, its left 3x3 is used, as ROS's ``image_geometry`` does: P
        describes the rectified image, and DepthVLM needs an undistorted pinhole image (feed
        ``image_rect``). K describes the raw, distorted image.
        """
        try:
            width = int(data.get("image_width", data.get("width")))
            height = int(data.get("image_height", data.get("height")))
        except (TypeError, ValueError):
            raise InputError("intrinsics: need image_width/image_height (or width/height)") from None
        projection = data.get("projection_matrix")
        p = projection.get("data") if isinstance(projection, Mapping) else data.get("p", data.get("P"))
        if p is not None:
            pp = np.asarray(p, dtype=np.float64).reshape(-1)
            if pp.size != 12:
                raise InputError(f"intrinsics: P must have 12 elements, got {pp.size}")
            if pp[0] > 0:
                return cls.from_k([pp[0], pp[1], pp[2], pp[4], pp[5], pp[6], 0.0, 0.0, 1.0], width, height)
        matrix = data.get("camera_matrix")
        if isinstance(matrix, Mapping):
            return cls.from_k(matrix.get("data", []), width, height)
        for key in ("k", "K"):
            if key in data:
                return cls.from_k(data[key], width, height)
        if "fx" in data:
            try:
                return cls.from_fx(
                    width, height, float(data["fx"]),
                    *(None if data.get(n) is None else float(data[n]) for n in ("fy", "cx", "cy")),
                )
            except (TypeError, ValueError):
                raise InputError("intrinsics: fx/fy/cx/cy must be numbers") from None
        raise InputError("intrinsics: no camera_matrix, k/K or fx found")

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Intrinsics":
        """Read a camera-info YAML file (see :meth:`from_mapping` for accepted layouts)."""
        import yaml

        try:
            data = yaml.safe_load(Path(path).read_text())
        except OSError as exc:
            raise InputError(f"camera info {path}: {exc.strerror or exc}") from None
        except yaml.YAMLError as exc:
            raise InputError(f"camera info {path}: not valid YAML ({exc.__class__.__name__})") from None
        if not isinstance(data, Mapping):
            raise InputError(f"camera info {path}: expected a mapping at the top level")
        return cls.from_mapping(data)

    @property
    def k(self) -> np.ndarray:
        """The 3x3 camera matrix (float64)."""
        return np.array(
            [[self.fx, 0.0, self.cx], [0.0, self.fy, self.cy], [0.0, 0.0, 1.0]], dtype=np.float64
        )

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        return self.width, self.height

    def resized(self, width: int, height: int) -> "Intrinsics":
        """K of this camera's image resampled to ``width`` x ``height`` (pixel-centre convention)."""
        sx, sy = width / self.width, height / self.height
        return replace(
            self,
            fx=self.fx * sx,
            fy=self.fy * sy,
            cx=(self.cx + 0.5) * sx - 0.5,
            cy=(self.cy + 0.5) * sy - 0.5,
            width=width,
            height=height,
        )

    def to_dict(self) -> dict[str, float | int]:
        return {"fx": self.fx, "fy": self.fy, "cx": self.cx, "cy": self.cy,
                "width": self.width, "height": self.height}


def canonical_size(
    intrinsics: Intrinsics, canonical_fx: float = CANONICAL_FX, match_fy: bool = False
) -> tuple[int, int]:
    """Image size (width, height) at which the camera's focal length becomes ``canonical_fx``.

    As the benchmark computes it: ``round(size * canonical_fx / fx)`` for both sides, so the
    aspect ratio is kept and fy becomes ``fy * canonical_fx / fx``. With ``match_fy`` the height is
    scaled by ``canonical_fx / fy`` instead, so that both focal lengths become canonical (for
    cameras with non-square pixels; not what the paper did).

    This is arithmetic only: a wide lens can give a size far beyond what any model takes (fx 10 px
    on a 640 px image: 64000 px). Callers bound it before any pixel is resized
    (:func:`check_focal`, the model's own ``max_pixels``, :func:`cap_model_size`);
    :func:`canonical_resize`, which allocates the image, refuses sizes over :data:`MAX_IMAGE_SIDE`.
    """
    check_focal(intrinsics)
    sx = canonical_fx / intrinsics.fx
    sy = canonical_fx / intrinsics.fy if match_fy else sx
    return max(1, int(round(intrinsics.width * sx))), max(1, int(round(intrinsics.height * sy)))


def check_focal(intrinsics: Intrinsics) -> Intrinsics:
    """Refuse a camera no sane model input exists for: a focal length under :data:`MIN_FOCAL_PX`.

    (NaN, infinite, non-positive values and image sizes beyond :data:`MAX_IMAGE_SIDE` are refused
    when the :class:`Intrinsics` is made.) Returns ``intrinsics`` unchanged.
    """
    if intrinsics.fx < MIN_FOCAL_PX or intrinsics.fy < MIN_FOCAL_PX:
        raise InputError(
            f"intrinsics: focal length fx={intrinsics.fx:g}, fy={intrinsics.fy:g} px is below {MIN_FOCAL_PX:g} px "
            "(a field of view near 180 degrees): no model input describes this camera; check camera_info"
        )
    return intrinsics


def cap_model_size(
    width: int, height: int, max_side: int = 0, max_tokens: int = 0, multiple: int = 32
) -> tuple[int, int]:
    """Shrink a model input size (multiples of ``multiple`` px) to at most ``max_side`` px per side
    and ``max_tokens`` image tokens (one token per ``multiple`` x ``multiple`` px); 0 = no limit.

    Keeps the aspect ratio as well as the ``multiple`` grid allows; never below one token per side.
    """
    scale = 1.0
    if max_side > 0:
        scale = min(scale, max_side / max(width, height))
    if max_tokens > 0:
        scale = min(scale, math.sqrt(max_tokens * multiple * multiple / (width * height)))
    if scale >= 1.0:
        return width, height
    w = max(multiple, int(width * scale) // multiple * multiple)
    h = max(multiple, int(height * scale) // multiple * multiple)
    return w, h


def check_rgb(rgb: np.ndarray) -> np.ndarray:
    """Validate an RGB image (H, W, 3) uint8 and return it C-contiguous; raise InputError if bad."""
    if not isinstance(rgb, np.ndarray):
        raise InputError(f"image must be a numpy array, got {type(rgb).__name__}")
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise InputError(f"image must be H x W x 3 (RGB), got shape {rgb.shape}")
    h, w = rgb.shape[:2]
    if not (1 <= h <= MAX_IMAGE_SIDE and 1 <= w <= MAX_IMAGE_SIDE):
        raise InputError(f"image size {w}x{h} outside 1..{MAX_IMAGE_SIDE} pixels")
    if rgb.dtype != np.uint8:
        raise InputError(f"image must be uint8, got {rgb.dtype}")
    return np.ascontiguousarray(rgb)


def resize_rgb(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resample an RGB uint8 image with bicubic interpolation (the Qwen image processor's filter)."""
    if (rgb.shape[1], rgb.shape[0]) == (width, height):
        return rgb
    from PIL import Image

    return np.asarray(Image.fromarray(rgb).resize((width, height), Image.Resampling.BICUBIC))


def canonical_resize(
    rgb: np.ndarray,
    intrinsics: Intrinsics,
    canonical_fx: float = CANONICAL_FX,
    match_fy: bool = False,
) -> tuple[np.ndarray, Intrinsics]:
    """Resize an image so its focal length becomes ``canonical_fx``; return it with its new K."""
    rgb = check_rgb(rgb)
    if (rgb.shape[1], rgb.shape[0]) != intrinsics.size:
        raise InputError(
            f"image is {rgb.shape[1]}x{rgb.shape[0]} but intrinsics describe "
            f"{intrinsics.width}x{intrinsics.height}"
        )
    width, height = canonical_size(intrinsics, canonical_fx, match_fy)
    if width > MAX_IMAGE_SIDE or height > MAX_IMAGE_SIDE:
        raise InputError(
            f"canonical size {width}x{height} (fx={intrinsics.fx:g} -> {canonical_fx:g}) exceeds "
            f"{MAX_IMAGE_SIDE} pixels: resize to a bounded model size instead (cap_model_size)"
        )
    return resize_rgb(rgb, width, height), intrinsics.resized(width, height)


def _bilinear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (i0, i1) and weight of i1 for each output sample, pixel-centre aligned."""
    pos = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    pos = np.clip(pos, 0.0, n_in - 1)
    i0 = np.floor(pos).astype(np.intp)
    return i0, np.minimum(i0 + 1, n_in - 1), (pos - i0).astype(np.float32)


def _bilinear(grid: np.ndarray, width: int, height: int) -> np.ndarray:
    """Separable bilinear resampling of a float array (rows, then columns); C-contiguous result."""
    y0, y1, wy = _bilinear_taps(grid.shape[0], height)
    x0, x1, wx = _bilinear_taps(grid.shape[1], width)
    rows = np.take(grid, y0, axis=0) * (1 - wy[:, None]) + np.take(grid, y1, axis=0) * wy[:, None]
    return np.take(rows, x0, axis=1) * (1 - wx) + np.take(rows, x1, axis=1) * wx


def resize_depth(depth: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bilinearly resample a float depth map (metres) to ``width`` x ``height``, keeping invalid.

    Same pixel-centre convention as :meth:`Intrinsics.resized`. A pixel whose interpolation would
    use an invalid sample (NaN, inf or <= 0) with non-zero weight is NaN; valid pixels are the
    plain bilinear value. Returns C-contiguous float32. (A camera's plan does the same in torch,
    on the depth's device: :meth:`depthvlm_ros.pipeline.CameraPlan.restore`; a test holds them equal.)
    """
    depth = np.asarray(depth, dtype=np.float32)
    if depth.ndim != 2:
        raise InputError(f"depth must be 2-D, got shape {depth.shape}")
    valid = np.isfinite(depth) & (depth > 0)
    all_valid = bool(valid.all())
    if depth.shape == (height, width):
        return depth.copy() if all_valid else np.where(valid, depth, np.float32(np.nan))
    out = _bilinear(depth if all_valid else np.where(valid, depth, np.float32(0.0)), width, height)
    if not all_valid:  # NaN wherever an invalid sample has non-zero weight
        out[_bilinear((~valid).astype(np.float32), width, height) > 0] = np.nan
    return out.astype(np.float32, copy=False)


def depth_to_points(depth: np.ndarray, intrinsics: Intrinsics) -> np.ndarray:
    """Back-project a z-depth map (metres) to an organized (H, W, 3) float32 cloud, optical frame.

    ``x = (u - cx) z / fx``, ``y = (v - cy) z / fy``; invalid depth gives NaN points.
    """
    depth = np.asarray(depth, dtype=np.float32)
    if depth.shape != (intrinsics.height, intrinsics.width):
        raise InputError(
            f"depth is {depth.shape[1]}x{depth.shape[0]} but intrinsics describe "
            f"{intrinsics.width}x{intrinsics.height}"
        )
    z = np.where(np.isfinite(depth) & (depth > 0), depth, np.float32(np.nan))
    u = (np.arange(intrinsics.width, dtype=np.float32) - np.float32(intrinsics.cx)) / np.float32(intrinsics.fx)
    v = (np.arange(intrinsics.height, dtype=np.float32) - np.float32(intrinsics.cy)) / np.float32(intrinsics.fy)
    points = np.empty((*z.shape, 3), dtype=np.float32)
    np.multiply(z, u[None, :], out=points[..., 0])
    np.multiply(z, v[:, None], out=points[..., 1])
    points[..., 2] = z
    return points


def pixel_to_point(u: float, v: float, depth_m: float, intrinsics: Intrinsics) -> np.ndarray:
    """Back-project one pixel (column ``u``, row ``v``) at z-depth ``depth_m`` to (x, y, z) metres."""
    return np.array(
        [(u - intrinsics.cx) * depth_m / intrinsics.fx, (v - intrinsics.cy) * depth_m / intrinsics.fy, depth_m],
        dtype=np.float64,
    )


def depth_to_32fc1(depth: np.ndarray) -> np.ndarray:
    """REP 118 float depth: float32 metres, NaN for invalid (non-finite or <= 0)."""
    depth = np.asarray(depth, dtype=np.float32)
    return np.where(np.isfinite(depth) & (depth > 0), depth, np.float32(np.nan))


def depth_to_16uc1(depth: np.ndarray) -> np.ndarray:
    """REP 118 integer depth: uint16 millimetres, 0 for invalid.

    Depth beyond :data:`MAX_DEPTH_16UC1_M` cannot be represented and becomes 0 (invalid) rather
    than saturating, so no consumer ever reads a false 65.5 m.
    """
    depth = np.asarray(depth, dtype=np.float32)
    mm = np.rint(np.where(np.isfinite(depth), depth, 0.0) * 1000.0)
    ok = (mm >= 1) & (mm <= 65535)
    return np.where(ok, mm, 0).astype(np.uint16)


def depth_from_16uc1(raw: np.ndarray, scale: float = 1000.0) -> np.ndarray:
    """Decode integer depth (``scale`` raw units per metre) to float32 metres, NaN for 0."""
    raw = np.asarray(raw)
    depth = raw.astype(np.float32) / np.float32(scale)
    depth[raw == 0] = np.nan
    return depth


def intrinsics_for_image(intrinsics: Intrinsics, width: int, height: int, tolerance: float = 0.01) -> Intrinsics:
    """Intrinsics describing a ``width`` x ``height`` image of this camera.

    Same size: unchanged. Proportional size (same aspect ratio within ``tolerance``, e.g. a
    calibration at full resolution and a binned stream): K scaled. Otherwise InputError: a K of
    another image shape cannot be trusted to describe this one.
    """
    if intrinsics.size == (width, height):
        return intrinsics
    sx, sy = width / intrinsics.width, height / intrinsics.height
    if abs(sx / sy - 1.0) > tolerance:
        raise InputError(
            f"intrinsics describe {intrinsics.width}x{intrinsics.height} but the image is "
            f"{width}x{height} (not proportional)", "intrinsics.aspect"
        )
    return intrinsics.resized(width, height)
