"""Random scenes, cameras and smooth camera paths; deterministic given a numpy Generator.

Sizes are metres, angles radians, focal lengths pixels. Object names and colours come from the
catalogues below; within one scene every object has its own colour, so "the red chair" is unique, except a
street's buildings, which repeat their few colours (the question generator names only labels that are unique in
the view: :func:`depthvlm_ros.scenes.qa.askable`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from depthvlm_ros.geometry import Intrinsics
from depthvlm_ros.scenes.render import CameraPose, Primitive, Scene, SceneObject

#: Named colours (RGB 0..1) objects are painted with; names appear in questions.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.12, 0.10), "green": (0.15, 0.65, 0.20), "blue": (0.12, 0.25, 0.85),
    "yellow": (0.95, 0.85, 0.10), "white": (0.95, 0.95, 0.95), "black": (0.08, 0.08, 0.08),
    "orange": (0.95, 0.50, 0.05), "purple": (0.55, 0.15, 0.70), "grey": (0.50, 0.50, 0.52),
    "brown": (0.45, 0.28, 0.12), "pink": (0.95, 0.55, 0.70), "cyan": (0.10, 0.80, 0.85),
}


@dataclass(frozen=True)
class Furniture:
    """A catalogue entry: shape and size ranges (min, max) in metres (box: x, y, z extents)."""

    name: str
    shape: str
    size_min: tuple[float, float, float]
    size_max: tuple[float, float, float]


INDOOR_CATALOGUE = (
    Furniture("chair", "box", (0.42, 0.42, 0.80), (0.55, 0.55, 1.00)),
    Furniture("table", "box", (0.90, 0.60, 0.70), (1.60, 1.00, 0.78)),
    Furniture("sofa", "box", (1.60, 0.80, 0.75), (2.20, 0.95, 0.90)),
    Furniture("shelf", "box", (0.70, 0.30, 1.40), (1.20, 0.45, 2.00)),
    Furniture("bed", "box", (1.90, 1.40, 0.45), (2.10, 1.80, 0.60)),
    Furniture("box", "box", (0.30, 0.30, 0.30), (0.60, 0.60, 0.60)),
    Furniture("cabinet", "box", (0.50, 0.45, 0.80), (0.90, 0.60, 1.10)),
    Furniture("ball", "sphere", (0.12, 0.12, 0.12), (0.30, 0.30, 0.30)),
    Furniture("lamp", "cylinder", (0.12, 0.12, 1.30), (0.20, 0.20, 1.70)),
    Furniture("bin", "cylinder", (0.15, 0.15, 0.40), (0.25, 0.25, 0.60)),
)
OUTDOOR_CATALOGUE = (
    Furniture("car", "box", (3.90, 1.70, 1.40), (4.80, 1.90, 1.60)),
    Furniture("van", "box", (4.80, 1.90, 1.90), (5.50, 2.10, 2.40)),
    Furniture("pole", "cylinder", (0.08, 0.08, 3.50), (0.14, 0.14, 6.00)),
    Furniture("bin", "cylinder", (0.25, 0.25, 0.90), (0.35, 0.35, 1.10)),
    Furniture("box", "box", (0.60, 0.60, 0.60), (1.20, 1.20, 1.20)),
)
INDOOR_NAMES = tuple(f.name for f in INDOOR_CATALOGUE)
OUTDOOR_NAMES = tuple(f.name for f in OUTDOOR_CATALOGUE) + ("tree", "building")
BUILDING_COLOURS = ("white", "grey", "brown", "yellow", "pink")

#: Horizontal field of view (radians) that defines the nominal focal length, 60 degrees.
NOMINAL_HFOV = math.radians(60.0)


def nominal_fx(width: int) -> float:
    """Focal length (pixels) of a 60-degree horizontal field of view at ``width`` pixels."""
    return width / 2.0 / math.tan(NOMINAL_HFOV / 2.0)


def random_intrinsics(rng: np.random.Generator, width: int, height: int, fx_min: float, fx_max: float) -> Intrinsics:
    """fx log-uniform in [fx_min, fx_max], fy = fx, principal point at the centre (Bench convention)."""
    fx = float(math.exp(rng.uniform(math.log(fx_min), math.log(fx_max))))
    return Intrinsics.from_fx(width, height, fx)


def _size(rng: np.random.Generator, item: Furniture) -> tuple[float, float, float]:
    return tuple(float(rng.uniform(a, b)) for a, b in zip(item.size_min, item.size_max))  # type: ignore[return-value]


def _colours(rng: np.random.Generator, n: int, exclude: tuple[str, ...] = ()) -> list[str]:
    names = [c for c in COLOURS if c not in exclude]
    return [names[i] for i in rng.permutation(len(names))[:n]]


def _primitive(item: Furniture, size: tuple[float, float, float], x: float, y: float, yaw: float) -> Primitive:
    if item.shape == "sphere":
        return Primitive("sphere", (x, y, size[0]), size)
    if item.shape == "cylinder":
        return Primitive("cylinder", (x, y, size[2] / 2), size)
    return Primitive("box", (x, y, size[2] / 2), size, yaw)


def _footprint(size: tuple[float, float, float]) -> float:
    return 0.5 * math.hypot(size[0], size[1])


def random_indoor_scene(rng: np.random.Generator) -> Scene:
    """A room 4-9 m x 4-8 m x 2.5-3.2 m with 3-7 furniture objects standing on the floor."""
    length, width, ceiling = rng.uniform(4.0, 9.0), rng.uniform(4.0, 8.0), rng.uniform(2.5, 3.2)
    room = (0.0, float(length), -float(width) / 2, float(width) / 2, float(ceiling))
    n = int(rng.integers(3, 8))
    colours = _colours(rng, n)
    objects: list[SceneObject] = []
    placed: list[tuple[float, float, float]] = []
    for colour in colours:
        item = INDOOR_CATALOGUE[int(rng.integers(len(INDOOR_CATALOGUE)))]
        size = _size(rng, item)
        r = _footprint(size) if item.shape == "box" else size[0]
        for _ in range(20):  # rejection sampling: inside the room, not overlapping, away from the camera end
            x = float(rng.uniform(1.2 + r, length - r - 0.05))
            room_y = max(0.0, width / 2 - r - 0.05)
            y = float(rng.uniform(-room_y, room_y))
            if all(math.hypot(x - px, y - py) > r + pr + 0.1 for px, py, pr in placed):
                break
        else:
            continue
        placed.append((x, y, r))
        yaw = float(rng.choice([0.0, math.pi / 2]) + rng.uniform(-0.3, 0.3))
        objects.append(SceneObject(item.name, colour, COLOURS[colour], (_primitive(item, size, x, y, yaw),)))
    tint = rng.uniform(0.85, 1.0, 3)
    return Scene(
        kind="indoor", objects=objects, room=room, max_depth_m=20.0,
        wall_rgb=tuple(float(v) for v in np.array([0.86, 0.84, 0.78]) * tint),
        floor_rgb=tuple(float(v) for v in np.array([0.58, 0.44, 0.30]) * rng.uniform(0.8, 1.1, 3)),
        tile_m=float(rng.choice([0.4, 0.5, 0.6])),
    )


def random_outdoor_scene(rng: np.random.Generator) -> Scene:
    """A street along +x: road, kerbs, facades both sides, vehicles, poles, trees; sky is invalid."""
    half_road = float(rng.uniform(3.0, 5.0))
    objects: list[SceneObject] = []
    colours = _colours(rng, 8, exclude=BUILDING_COLOURS)
    colour_iter = iter(colours)
    for side in (-1.0, 1.0):  # facades: a row of boxes set back from the kerb
        x = float(rng.uniform(-5.0, 5.0))
        setback = half_road + 1.5 + float(rng.uniform(1.0, 6.0))
        while x < 90.0:
            length, depth, height = rng.uniform(8.0, 25.0), rng.uniform(8.0, 14.0), rng.uniform(6.0, 22.0)
            colour = BUILDING_COLOURS[int(rng.integers(len(BUILDING_COLOURS)))]
            centre = (x + length / 2, side * (setback + depth / 2), height / 2)
            objects.append(SceneObject("building", colour, COLOURS[colour],
                                       (Primitive("box", centre, (float(length), float(depth), float(height))),),
                                       texture="windows"))
            x += float(length + rng.uniform(0.0, 6.0))
    placed: list[tuple[float, float]] = []
    for _ in range(int(rng.integers(3, 8))):
        colour = next(colour_iter, None)
        if colour is None:
            break
        kind = rng.choice(["vehicle", "vehicle", "pole", "tree", "street"])
        x = float(rng.uniform(5.0, 45.0))
        if kind == "vehicle":
            item = OUTDOOR_CATALOGUE[int(rng.integers(2))]
            size = _size(rng, item)
            lane = float(rng.choice([-1.0, 1.0])) * half_road / 2
            if any(abs(x - px) < 6.5 and abs(lane - py) < 2.0 for px, py in placed):
                continue
            placed.append((x, lane))
            objects.append(SceneObject(item.name, colour, COLOURS[colour],
                                       (_primitive(item, size, x, lane, float(rng.uniform(-0.15, 0.15))),)))
        elif kind == "tree":
            y = float(rng.choice([-1.0, 1.0])) * (half_road + float(rng.uniform(0.6, 1.3)))
            trunk_h, crown = float(rng.uniform(1.8, 3.0)), float(rng.uniform(1.0, 2.0))
            objects.append(SceneObject("tree", "green", COLOURS["green"], (
                Primitive("cylinder", (x, y, trunk_h / 2), (0.15, 0.15, trunk_h)),
                Primitive("sphere", (x, y, trunk_h + crown * 0.8), (crown, crown, crown)),
            )))
        else:
            item = OUTDOOR_CATALOGUE[2] if kind == "pole" else OUTDOOR_CATALOGUE[int(rng.integers(3, 5))]
            size = _size(rng, item)
            y = float(rng.choice([-1.0, 1.0])) * (half_road + float(rng.uniform(0.3, 1.2)))
            objects.append(SceneObject(item.name, colour, COLOURS[colour], (_primitive(item, size, x, y, 0.0),)))
    # Trees are all green: keep at most one so that "the green tree" stays unique.
    trees = [o for o in objects if o.name == "tree"]
    objects = [o for o in objects if o.name != "tree" or o is trees[0]]
    return Scene(kind="outdoor", objects=objects, road_half_width=half_road, max_depth_m=60.0,
                 ground_rgb=tuple(float(v) for v in np.array([0.35, 0.50, 0.25]) * rng.uniform(0.85, 1.1, 3)),
                 tile_m=float(rng.choice([0.5, 1.0])))


def random_scene(rng: np.random.Generator, kind: str) -> Scene:
    """``kind``: "indoor", "outdoor", or "mixed" (either, half and half)."""
    if kind == "mixed":
        kind = "indoor" if rng.random() < 0.5 else "outdoor"
    if kind == "indoor":
        return random_indoor_scene(rng)
    if kind == "outdoor":
        return random_outdoor_scene(rng)
    raise ValueError(f"unknown scene kind {kind!r} (indoor, outdoor or mixed)")


def random_pose(rng: np.random.Generator, scene: Scene) -> CameraPose:
    """A camera at the room's entrance end looking in (indoor), or on the road looking along it.

    Indoor: height 0.8-1.8 m, pitch -25..+5 deg, roll +-5 deg. Outdoor: height 1.2-2.5 m, pitch
    -12..+3 deg, roll +-3 deg.
    """
    deg = math.radians
    if scene.kind == "indoor" and scene.room is not None:
        x0, _, y0, y1, _ = scene.room
        pos = (x0 + float(rng.uniform(0.15, 0.9)), float(rng.uniform(y0 * 0.6, y1 * 0.6)), float(rng.uniform(0.8, 1.8)))
        return CameraPose(pos, yaw=float(rng.uniform(-deg(30), deg(30))), pitch=float(rng.uniform(-deg(25), deg(5))),
                          roll=float(rng.uniform(-deg(5), deg(5))))
    lane = scene.road_half_width * float(rng.uniform(-0.6, 0.6))
    return CameraPose((float(rng.uniform(-2.0, 2.0)), lane, float(rng.uniform(1.2, 2.5))),
                      yaw=float(rng.uniform(-deg(15), deg(15))), pitch=float(rng.uniform(-deg(12), deg(3))),
                      roll=float(rng.uniform(-deg(3), deg(3))))


def trajectory(scene: Scene, start: CameraPose, seconds: float, rate_hz: float) -> Iterator[CameraPose]:
    """A smooth camera path for a live demo: slow forward-back sway, panning and bobbing.

    Positions and angles are sums of sines (continuous, periodic), so any frame rate shows motion
    a camera on a robot could make; indoor paths stay inside the room.
    """
    n = max(1, int(round(seconds * rate_hz)))
    for i in range(n):
        s = i / rate_hz
        forward = 0.6 * math.sin(2 * math.pi * s / 20.0) if scene.kind == "indoor" else 1.0 * s
        lateral = 0.3 * math.sin(2 * math.pi * s / 13.0)
        cy, sy = math.cos(start.yaw), math.sin(start.yaw)
        x = start.position[0] + max(forward, -0.1) * cy - lateral * sy
        y = start.position[1] + max(forward, -0.1) * sy + lateral * cy
        z = start.position[2] + 0.03 * math.sin(2 * math.pi * s / 1.1)
        yield CameraPose((x, y, z), yaw=start.yaw + math.radians(20) * math.sin(2 * math.pi * s / 16.0),
                         pitch=start.pitch + math.radians(4) * math.sin(2 * math.pi * s / 9.0), roll=start.roll)
