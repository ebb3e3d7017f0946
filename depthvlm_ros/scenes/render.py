"""Ray casting of simple scenes: exact z-depth, a shaded RGB image and per-object labels (numpy).

Frames: the world is z-up (x forward at yaw 0, y left); the camera is the ROS optical frame
(x right, y down, z forward). Lengths are metres, image coordinates pixels with the pixel-centre
convention of :class:`~depthvlm_ros.geometry.Intrinsics`. Every ray is ``o + t * d`` with ``d``'s
optical-z component equal to 1, so the ray parameter ``t`` at a hit *is* the z-depth.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from depthvlm_ros.geometry import Intrinsics

#: Camera optical axes expressed in the world at yaw = pitch = roll = 0: x right = -y_world,
#: y down = -z_world, z forward = +x_world (columns of the world-from-optical rotation).
_OPTICAL_TO_WORLD = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
#: Direction towards the light (world), for Lambertian shading.
LIGHT_DIR = np.array([0.35, 0.25, 0.90]) / np.linalg.norm([0.35, 0.25, 0.90])
_EPS = 1e-4

Shape = Literal["box", "sphere", "cylinder"]


@dataclass(frozen=True)
class Primitive:
    """One solid. ``size``: box = full extents (x, y, z) before yaw; sphere = (r, r, r);
    cylinder (vertical axis) = (r, r, height). ``centre`` in world metres, ``yaw`` radians about z."""

    shape: Shape
    centre: tuple[float, float, float]
    size: tuple[float, float, float]
    yaw: float = 0.0


@dataclass(frozen=True)
class SceneObject:
    """A named, coloured thing made of primitives (a tree is a trunk and a crown)."""

    name: str  # "chair", "car", ...
    colour: str  # "red", ... (a key of COLOURS)
    rgb: tuple[float, float, float]  # 0..1
    primitives: tuple[Primitive, ...]
    texture: str = "plain"  # "plain" | "windows" (facades)

    @property
    def label(self) -> str:
        return f"{self.colour} {self.name}"

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """World axis-aligned bounds (lo, hi) of all primitives, metres."""
        los, his = [], []
        for p in self.primitives:
            c, s = np.asarray(p.centre), np.asarray(p.size)
            if p.shape == "box":
                ca, sa = abs(math.cos(p.yaw)), abs(math.sin(p.yaw))
                half = np.array([ca * s[0] + sa * s[1], sa * s[0] + ca * s[1], s[2]]) / 2
            elif p.shape == "sphere":
                half = np.array([s[0], s[0], s[0]])
            else:
                half = np.array([s[0], s[0], s[2] / 2])
            los.append(c - half)
            his.append(c + half)
        return np.min(los, axis=0), np.max(his, axis=0)


@dataclass
class Scene:
    """Static geometry: a room box (indoor) or an endless ground plane (outdoor) plus objects."""

    kind: Literal["indoor", "outdoor"]
    objects: list[SceneObject]
    room: tuple[float, float, float, float, float] | None = None  # x0, x1, y0, y1, ceiling height
    road_half_width: float = 0.0  # outdoor: asphalt where |y| < this
    max_depth_m: float = 60.0  # farther hits (and sky) are invalid depth
    wall_rgb: tuple[float, float, float] = (0.85, 0.83, 0.78)
    floor_rgb: tuple[float, float, float] = (0.55, 0.42, 0.30)
    ceiling_rgb: tuple[float, float, float] = (0.92, 0.92, 0.90)
    ground_rgb: tuple[float, float, float] = (0.35, 0.50, 0.25)
    sky_rgb: tuple[float, float, float] = (0.55, 0.70, 0.92)
    tile_m: float = 0.5  # floor tile / paving size (a metric texture cue)


@dataclass(frozen=True)
class CameraPose:
    """Camera position (world metres) and orientation (radians): yaw about world z (left
    positive), pitch up positive, roll clockwise-in-image positive."""

    position: tuple[float, float, float]
    yaw: float
    pitch: float = 0.0
    roll: float = 0.0

    def world_from_optical(self) -> np.ndarray:
        """3x3 rotation taking optical-frame vectors to the world."""
        cy, sy = math.cos(self.yaw), math.sin(self.yaw)
        cp, sp = math.cos(self.pitch), math.sin(self.pitch)
        cr, sr = math.cos(self.roll), math.sin(self.roll)
        yaw = np.array([[cy, -sy, 0.0], [sy, cy, 0.0], [0.0, 0.0, 1.0]])
        pitch = np.array([[1.0, 0.0, 0.0], [0.0, cp, -sp], [0.0, sp, cp]])  # about optical x
        roll = np.array([[cr, -sr, 0.0], [sr, cr, 0.0], [0.0, 0.0, 1.0]])  # about optical z
        return yaw @ _OPTICAL_TO_WORLD @ pitch @ roll

    def world_from_camera(self) -> np.ndarray:
        """4x4 transform taking points of the camera's optical frame (metres) to the world."""
        out = np.eye(4)
        out[:3, :3] = self.world_from_optical()
        out[:3, 3] = self.position
        return out


@dataclass
class ObjectLabel:
    """What the generator knows about one visible object, in the camera's optical frame."""

    index: int
    name: str
    colour: str
    centre_m: tuple[float, float, float]  # 3D centre of the object's bounds, optical frame
    box_px: tuple[int, int, int, int]  # u_min, v_min, u_max, v_max of visible pixels (inclusive)
    visible_px: int
    point_px: tuple[int, int]  # a visible pixel near the centroid of the visible part
    depth_m: float  # median z-depth of the visible pixels
    distance_m: float  # median straight-line distance of the visible pixels
    height_m: float  # vertical extent of the object
    width_m: float  # largest horizontal extent

    @property
    def label(self) -> str:
        return f"{self.colour} {self.name}"

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name, "colour": self.colour, "centre_m": [round(v, 4) for v in self.centre_m],
            "box_px": list(self.box_px), "visible_px": self.visible_px, "point_px": list(self.point_px),
            "depth_m": round(self.depth_m, 4), "distance_m": round(self.distance_m, 4),
            "height_m": round(self.height_m, 4), "width_m": round(self.width_m, 4),
        }


@dataclass
class Rendering:
    """One rendered view: RGB, z-depth (NaN where invalid), the object index per pixel (-1 none)."""

    rgb: np.ndarray  # (H, W, 3) uint8
    depth: np.ndarray  # (H, W) float32 metres, NaN = sky / beyond max depth
    object_index: np.ndarray  # (H, W) int16; index into scene.objects, -1 = background
    intrinsics: Intrinsics
    pose: CameraPose
    labels: list[ObjectLabel] = field(default_factory=list)
    surface: np.ndarray | None = None  # (H, W) uint8 background surface code (see SURFACES)


#: Background surface codes in :attr:`Rendering.surface` (objects are 255).
SURFACES = {0: "sky", 1: "floor", 2: "wall", 3: "ceiling", 4: "ground", 5: "road"}


def camera_rays(intrinsics: Intrinsics, pose: CameraPose) -> np.ndarray:
    """World directions (H*W, 3) float32 of every pixel's ray, scaled so optical z = 1."""
    k = intrinsics
    u = (np.arange(k.width, dtype=np.float32) - k.cx) / k.fx
    v = (np.arange(k.height, dtype=np.float32) - k.cy) / k.fy
    rot = pose.world_from_optical().astype(np.float32)
    # d_world = R @ [u, v, 1] for every pixel, as an outer sum (no (N, 3) @ (3, 3) temporaries).
    return (v[:, None, None] * rot[:, 1] + u[None, :, None] * rot[:, 0] + rot[:, 2]).reshape(-1, 3)


def _hit_box(o: np.ndarray, d: np.ndarray, p: Primitive) -> np.ndarray:
    """Ray parameter of the entry into a yawed box (inf on a miss)."""
    c, s = math.cos(-p.yaw), math.sin(-p.yaw)
    rel = o - np.asarray(p.centre, dtype=np.float32)
    ox, oy, oz = c * rel[0] - s * rel[1], s * rel[0] + c * rel[1], rel[2]
    dx, dy = c * d[:, 0] - s * d[:, 1], s * d[:, 0] + c * d[:, 1]
    t_near = np.full(len(d), -np.inf, dtype=np.float32)
    t_far = np.full(len(d), np.inf, dtype=np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        for oa, da, half in ((ox, dx, p.size[0] / 2), (oy, dy, p.size[1] / 2), (oz, d[:, 2], p.size[2] / 2)):
            inv = 1.0 / da
            t1, t2 = (-half - oa) * inv, (half - oa) * inv
            np.maximum(t_near, np.minimum(t1, t2), out=t_near)
            np.minimum(t_far, np.maximum(t1, t2), out=t_far)
    hit = (t_far >= t_near) & (t_near > _EPS)
    return np.where(hit, t_near, np.inf).astype(np.float32)


def _hit_sphere(o: np.ndarray, d: np.ndarray, p: Primitive) -> np.ndarray:
    rel = o - np.asarray(p.centre, dtype=np.float32)
    a = np.einsum("ij,ij->i", d, d)
    b = d @ rel
    disc = b * b - a * (float(rel @ rel) - p.size[0] ** 2)
    with np.errstate(invalid="ignore"):
        t = (-b - np.sqrt(disc)) / a
    return np.where((disc >= 0) & (t > _EPS), t, np.inf).astype(np.float32)


def _hit_cylinder(o: np.ndarray, d: np.ndarray, p: Primitive) -> np.ndarray:
    """Vertical capped cylinder: side or top cap (the camera is never below a bottom cap)."""
    cx, cy, cz = p.centre
    r, h = p.size[0], p.size[2]
    rx, ry = o[0] - cx, o[1] - cy
    a = d[:, 0] ** 2 + d[:, 1] ** 2
    b = d[:, 0] * rx + d[:, 1] * ry
    disc = b * b - a * (rx * rx + ry * ry - r * r)
    with np.errstate(invalid="ignore", divide="ignore"):
        t_side = (-b - np.sqrt(disc)) / a
        z_side = o[2] + t_side * d[:, 2]
        side = (disc >= 0) & (t_side > _EPS) & (np.abs(z_side - cz) <= h / 2)
        t_cap = (cz + h / 2 - o[2]) / d[:, 2]
        xc, yc = rx + t_cap * d[:, 0], ry + t_cap * d[:, 1]
        cap = (t_cap > _EPS) & (xc * xc + yc * yc <= r * r) & (d[:, 2] < 0)
    t = np.where(side, t_side, np.inf)
    return np.where(cap & (t_cap < t), t_cap, t).astype(np.float32)


_HIT = {"box": _hit_box, "sphere": _hit_sphere, "cylinder": _hit_cylinder}


def _normals(points: np.ndarray, p: Primitive) -> np.ndarray:
    """Outward unit normals (N, 3) at surface points of a primitive."""
    rel = points - np.asarray(p.centre, dtype=np.float32)
    if p.shape == "sphere":
        return rel / np.maximum(np.linalg.norm(rel, axis=1, keepdims=True), 1e-6)
    if p.shape == "cylinder":
        n = np.zeros_like(rel)
        top = rel[:, 2] >= p.size[2] / 2 - 1e-3
        n[top, 2] = 1.0
        side = ~top
        radial = rel[side, :2]
        n[side, :2] = radial / np.maximum(np.linalg.norm(radial, axis=1, keepdims=True), 1e-6)
        return n
    c, s = math.cos(-p.yaw), math.sin(-p.yaw)
    local = np.stack([c * rel[:, 0] - s * rel[:, 1], s * rel[:, 0] + c * rel[:, 1], rel[:, 2]], axis=1)
    scaled = np.abs(local) / (np.asarray(p.size, dtype=np.float32) / 2)
    axis = np.argmax(scaled, axis=1)
    n_local = np.zeros_like(local)
    n_local[np.arange(len(local)), axis] = np.sign(local[np.arange(len(local)), axis])
    c, s = math.cos(p.yaw), math.sin(p.yaw)
    return np.stack([c * n_local[:, 0] - s * n_local[:, 1], s * n_local[:, 0] + c * n_local[:, 1], n_local[:, 2]],
                    axis=1)


def _lambert(normals: np.ndarray, ambient: float = 0.45) -> np.ndarray:
    return ambient + (1.0 - ambient) * np.clip(normals @ LIGHT_DIR.astype(np.float32), 0.0, 1.0)


def _background(scene: Scene, o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ray parameter and surface code of the room's inside (indoor) or the ground (outdoor)."""
    n = len(d)
    with np.errstate(divide="ignore", invalid="ignore"):
        if scene.kind == "indoor" and scene.room is not None:
            x0, x1, y0, y1, ceiling = scene.room
            tx = np.where(d[:, 0] > 0, (x1 - o[0]) / d[:, 0], (x0 - o[0]) / d[:, 0])
            ty = np.where(d[:, 1] > 0, (y1 - o[1]) / d[:, 1], (y0 - o[1]) / d[:, 1])
            tz = np.where(d[:, 2] > 0, (ceiling - o[2]) / d[:, 2], -o[2] / d[:, 2])
            stack = np.stack([np.where(tx > 0, tx, np.inf), np.where(ty > 0, ty, np.inf),
                              np.where(tz > 0, tz, np.inf)])
            axis = np.argmin(stack, axis=0)
            t = stack[axis, np.arange(n)]
            code = np.where(axis < 2, 2, np.where(d[:, 2] > 0, 3, 1)).astype(np.uint8)
            return t.astype(np.float32), code
        t = np.where(d[:, 2] < 0, -o[2] / d[:, 2], np.inf).astype(np.float32)
        code = np.where(np.isfinite(t), 4, 0).astype(np.uint8)
        return t, code


def _background_colour(scene: Scene, code: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """RGB (N, 3) in 0..1 of background hits, with metric textures (tiles, lane marks), and the
    surface codes with road pixels marked."""
    code = code.copy()
    rgb = np.empty((len(code), 3), dtype=np.float32)
    x, y = points[:, 0], points[:, 1]
    tiles = ((np.floor(x / scene.tile_m) + np.floor(y / scene.tile_m)) % 2).astype(np.float32)
    for value, base in ((1, scene.floor_rgb), (2, scene.wall_rgb), (3, scene.ceiling_rgb), (4, scene.ground_rgb)):
        sel = code == value
        rgb[sel] = base
    floor = code == 1
    rgb[floor] *= (0.82 + 0.18 * tiles[floor])[:, None]
    wall = code == 2
    rgb[wall] *= 0.9
    ground = code == 4
    if scene.road_half_width > 0:
        road = ground & (np.abs(y) < scene.road_half_width)
        code[road] = 5
        rgb[road] = (0.30, 0.30, 0.32)
        rgb[road] *= (0.92 + 0.08 * tiles[road])[:, None]
        marks = road & (np.abs(y) < 0.08) & ((x % 6.0) < 3.0)
        rgb[marks] = (0.92, 0.92, 0.85)
        kerb = ground & ~road & (np.abs(y) < scene.road_half_width + 1.5)
        rgb[kerb] = (0.62, 0.60, 0.58)
        rgb[kerb] *= (0.85 + 0.15 * tiles[kerb])[:, None]
    grass = ground & (code == 4) & ~(np.abs(y) < scene.road_half_width + 1.5)
    rgb[grass] *= (0.85 + 0.15 * tiles[grass])[:, None]
    return rgb, code


def _facade(points: np.ndarray, normals: np.ndarray) -> np.ndarray:
    """Brightness of a building facade: dark windows on a 3 m x 3 m grid of floors and bays."""
    horizontal = np.where(np.abs(normals[:, 0]) > 0.5, points[:, 1], points[:, 0])
    u = horizontal % 3.0
    w = points[:, 2] % 3.0
    window = (u > 0.8) & (u < 2.2) & (w > 1.0) & (w < 2.3) & (np.abs(normals[:, 2]) < 0.5)
    return np.where(window, 0.45, 1.0).astype(np.float32)


def render(scene: Scene, intrinsics: Intrinsics, pose: CameraPose, noise_seed: int | None = None,
           noise_sigma: float = 2.0, with_labels: bool = True) -> Rendering:
    """Ray-cast one view: exact z-depth, a shaded image, the object index map and labels.

    ``noise_seed`` adds Gaussian sensor noise (``noise_sigma`` grey levels) to the RGB only.
    """
    h, w = intrinsics.height, intrinsics.width
    o = np.asarray(pose.position, dtype=np.float32)
    d = camera_rays(intrinsics, pose)
    t_best, code = _background(scene, o, d)
    prim_of = np.full(len(d), -1, dtype=np.int32)
    prims: list[tuple[int, Primitive]] = [(i, p) for i, obj in enumerate(scene.objects) for p in obj.primitives]
    for j, (_, prim) in enumerate(prims):
        t = _HIT[prim.shape](o, d, prim)
        closer = t < t_best
        if closer.any():
            t_best[closer] = t[closer]
            prim_of[closer] = j

    valid = np.isfinite(t_best) & (t_best <= scene.max_depth_m)
    rgb = np.empty((len(d), 3), dtype=np.float32)
    obj_index = np.full(len(d), -1, dtype=np.int16)
    background = prim_of < 0
    finite = np.isfinite(t_best)
    bg = background & finite
    points = o + t_best[bg, None] * d[bg]
    rgb[bg], code[bg] = _background_colour(scene, code[bg], points)
    bg_normals = np.zeros_like(points)
    bg_normals[:, 2] = np.where(code[bg] == 3, -1.0, 1.0)
    shade = _lambert(bg_normals, 0.75)
    walls = code[bg] == 2
    shade[walls] = 0.85
    rgb[bg] *= shade[:, None]
    for j, (i, prim) in enumerate(prims):
        sel = np.flatnonzero(prim_of == j)
        if not len(sel):
            continue
        obj = scene.objects[i]
        pts = o + t_best[sel, None] * d[sel]
        normals = _normals(pts, prim)
        colour = np.asarray(obj.rgb, dtype=np.float32) * _lambert(normals)[:, None]
        if obj.texture == "windows":
            colour *= _facade(pts, normals)[:, None]
        rgb[sel] = colour
        obj_index[sel] = i
        code[sel] = 255
    # Sky and everything beyond max depth: a vertical gradient, with distance haze near the limit.
    sky = ~finite
    up = np.clip(d[sky, 2] / np.linalg.norm(d[sky], axis=1), 0.0, 1.0)
    rgb[sky] = np.asarray(scene.sky_rgb, dtype=np.float32) * (0.85 + 0.15 * up[:, None]) + 0.12 * (1 - up[:, None])
    far = finite & ~valid
    haze = np.asarray(scene.sky_rgb, dtype=np.float32) * 0.95
    rgb[far] = haze
    near_limit = valid & (t_best > 0.7 * scene.max_depth_m)
    a = ((t_best[near_limit] - 0.7 * scene.max_depth_m) / (0.3 * scene.max_depth_m))[:, None]
    rgb[near_limit] = (1 - a) * rgb[near_limit] + a * haze
    code[sky] = 0

    image = rgb.reshape(h, w, 3) * 255.0
    if noise_seed is not None and noise_sigma > 0:
        image = image + np.random.default_rng(noise_seed).normal(0.0, noise_sigma, image.shape).astype(np.float32)
    out = Rendering(
        rgb=np.clip(image + 0.5, 0, 255).astype(np.uint8),
        depth=np.where(valid, t_best, np.nan).astype(np.float32).reshape(h, w),
        object_index=obj_index.reshape(h, w),
        intrinsics=intrinsics,
        pose=pose,
        surface=code.reshape(h, w),
    )
    if with_labels:
        out.labels = object_labels(scene, out)
    return out


def object_labels(scene: Scene, view: Rendering, min_pixels: int = 1) -> list[ObjectLabel]:
    """Labels of the objects with at least ``min_pixels`` visible pixels (optical frame, metres)."""
    k, pose = view.intrinsics, view.pose
    rot = pose.world_from_optical()
    flat = view.object_index.reshape(-1)
    counts = np.bincount(flat[flat >= 0], minlength=len(scene.objects))
    labels = []
    for i in np.flatnonzero(counts >= min_pixels):
        obj = scene.objects[int(i)]
        rows, cols = np.divmod(np.flatnonzero(flat == i), k.width)
        z = view.depth[rows, cols].astype(np.float64)
        ok = np.isfinite(z)
        if not ok.any():
            continue
        x = (cols - k.cx) / k.fx * z
        y = (rows - k.cy) / k.fy * z
        dist = np.sqrt(x * x + y * y + z * z)
        cu, cv = cols.mean(), rows.mean()
        nearest = int(np.argmin((cols - cu) ** 2 + (rows - cv) ** 2))
        lo, hi = obj.bounds()
        centre_optical = rot.T @ ((lo + hi) / 2 - np.asarray(pose.position))
        labels.append(ObjectLabel(
            index=int(i), name=obj.name, colour=obj.colour,
            centre_m=tuple(float(v) for v in centre_optical),
            box_px=(int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max())),
            visible_px=int(counts[i]), point_px=(int(cols[nearest]), int(rows[nearest])),
            depth_m=float(np.median(z[ok])), distance_m=float(np.median(dist[ok])),
            height_m=float(hi[2] - lo[2]), width_m=float(max(hi[0] - lo[0], hi[1] - lo[1])),
        ))
    return labels
