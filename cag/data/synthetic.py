"""Mini street scenes: the built-in two-domain benchmark (docs/data.md §7).

Procedural street scenes over the Cityscapes label space, rendered in two domains:

* **source** ("synthetic"): flat class colours with jitter, saturated car colours, mild noise;
* **target** ("real"): the same scene grammar with three shift components that a preset mixes:
  a *global* photometric change (one per-channel affine colour map of the whole image plus
  sensor noise), a *class*-conditional change (every class moves towards its own "real" colour
  with its own procedural texture, cars become achromatic), and a *layout* change (lower
  horizon, more vegetation, more cars).

``strength`` scales all three components linearly (0 = no shift; the target is then drawn from
exactly the source distribution). The random draws of a sample never depend on the preset or
the strength, so one target image morphs continuously as the strength grows.

Every sample is a pure function of ``(preset, strength, domain, split, index, size)``: its
random generator is seeded by ``SeedSequence([SEED_SALT, domain, split, index])``. Labels are
rasterised on integer geometry with ``PIL.ImageDraw``; images are quantised to uint8 at the end.

``generate`` writes the benchmark in the real on-disk formats (docs/data.md §1-§3): the
source in the GTA5 layout (optionally also SYNTHIA), the target in the Cityscapes layout with
train / val / test splits, and a ``benchmark.json`` manifest. Command line::

    python -m cag.data.synthetic --out DIR --preset full [--strength S] [--size 64x128]
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from ..errors import OutputError, UserInputError, cli_main, writable_folder
from ..labels import CLASSES_16, LABELS, SYNTHIA_IDS_16
from . import io


class Preset(NamedTuple):
    """Weights of the three shift components, and the strength used when none is given."""

    global_: float
    classwise: float
    layout: float
    default_strength: float


#: The shift presets. Effective amount of a component = strength * weight.
#: Default strengths are calibrated (docs/data.md §7): source-only reaches 50-65 % of the target-trained
#: model's mIoU on target *val* with configs/synthetic.yaml (then on version 1), seed 1, measured before any
#: adaptation ran by version 1's calibration (removed; results/README.md names the commit: class 0.302 / 0.484
#: = 62 %, global 0.295 / 0.498 = 59 %, full 0.277 / 0.484 = 57 %).
PRESETS: dict[str, Preset] = {
    #                 global  class  layout  default strength
    "global": Preset(1.0,    0.0,   0.0,    1.6),
    "class":  Preset(0.2,    1.0,   0.0,    0.45),
    "full":   Preset(1.0,    1.0,   1.0,    0.4),
}

#: Bump whenever rendering or file layout changes: cached benchmarks then regenerate.
FORMAT_VERSION = 1
#: Scene versions: 1 (12 classes; version 1 of the benchmark table, removed), 2 the book's chapters 1-7 and
#: the new benchmark table's (17 classes, five shift components: street_scene, appearance, domain_shift).
VERSIONS = (1, 2)
MANIFEST = "benchmark.json"
SEED_SALT = 2019
MAX_STRENGTH = 2.0
DOMAINS = ("source", "target")
SPLITS = ("train", "val", "test")

_ID = {label.name: label.id for label in LABELS}
UNLABELED, STATIC = 0, 4
ROAD, SIDEWALK, BUILDING, FENCE = _ID["road"], _ID["sidewalk"], _ID["building"], _ID["fence"]
POLE, SIGN, VEGETATION, TERRAIN = _ID["pole"], _ID["traffic sign"], _ID["vegetation"], _ID["terrain"]
SKY, PERSON, CAR, TRUCK = _ID["sky"], _ID["person"], _ID["car"], _ID["truck"]

#: The 12 evaluated classes a scene can contain (Cityscapes labelIds); 0 and 4 are void.
CLASS_LABEL_IDS = (ROAD, SIDEWALK, BUILDING, FENCE, POLE, SIGN, VEGETATION, TERRAIN, SKY, PERSON, CAR, TRUCK)
VOID_LABEL_IDS = (UNLABELED, STATIC)

# fmt: off
#: Flat class colours of the source domain (RGB).
SOURCE_COLOURS = {
    UNLABELED: (25, 25, 30),    STATIC: (110, 80, 50),
    ROAD: (95, 90, 105),        SIDEWALK: (175, 150, 170), BUILDING: (120, 115, 110),
    FENCE: (190, 153, 153),     POLE: (153, 153, 153),     SIGN: (220, 220, 0),
    VEGETATION: (107, 142, 35), TERRAIN: (152, 200, 120),  SKY: (70, 130, 180),
    PERSON: (220, 20, 60),      CAR: (0, 0, 142),          TRUCK: (230, 120, 20),
}
#: Class colours of the target domain: every class moves in its own direction.
TARGET_COLOURS = {
    UNLABELED: (40, 35, 30),    STATIC: (90, 90, 90),
    ROAD: (150, 135, 120),      SIDEWALK: (120, 105, 100), BUILDING: (175, 140, 110),
    FENCE: (110, 100, 80),      POLE: (70, 70, 75),        SIGN: (200, 190, 40),
    VEGETATION: (45, 85, 40),   TERRAIN: (150, 135, 80),   SKY: (205, 210, 215),
    PERSON: (50, 50, 60),       CAR: (95, 95, 100),        TRUCK: (215, 215, 205),
}
#: Per-instance colours: saturated source cars against achromatic target cars (which then
#: look like source road and building), bright source clothes against dark target clothes.
SOURCE_INSTANCE_COLOURS = {
    CAR: ((200, 30, 30), (30, 60, 200), (230, 200, 30), (40, 170, 60)),
    PERSON: ((220, 20, 60), (250, 120, 0), (30, 160, 220), (150, 40, 200)),
}
TARGET_INSTANCE_COLOURS = {
    CAR: ((225, 225, 225), (160, 160, 165), (95, 95, 100), (30, 30, 35)),
    PERSON: ((50, 50, 60), (80, 60, 50), (40, 40, 40), (100, 100, 110)),
}
#: Target textures: (kind, amplitude); kinds are procedural zero-mean modulations.
TARGET_TEXTURES = {
    ROAD: ("gravel", 0.15), SIDEWALK: ("tiles", 0.15), BUILDING: ("bricks", 0.2),
    VEGETATION: ("leaves", 0.35), TERRAIN: ("grass", 0.25), SKY: ("clouds", 0.08),
    FENCE: ("planks", 0.2),
}
# fmt: on

#: Global photometric component at amount 1: per-channel contrast change (gain - 1) around
#: grey 128 and an offset; together a warm, low-contrast camera.
GLOBAL_GAIN_DELTA = np.array([-0.15, -0.2, -0.3])
GLOBAL_OFFSET = np.array([18.0, 8.0, -6.0])
GLOBAL_EXPOSURE_JITTER = 0.1
GLOBAL_EXTRA_NOISE = 4.0
COLOUR_JITTER = (0.1, 0.04)  # per class and instance: brightness, per-channel
SOURCE_NOISE = 3.0

#: Detail codes drawn inside objects (windows, wheels) and their brightness factor; they are
#: shape cues shared by both domains.
DETAIL_SHADE = np.array([1.0, 0.55, 0.4, 0.25], dtype=np.float32)
WINDOW, GLASS, WHEEL = 1, 2, 3

#: SYNTHIA-RAND-CITYSCAPES class ids (docs/data.md §3) for the Cityscapes labelIds.
SYNTHIA_ID = {**{_ID[n]: s for n, s in zip(CLASSES_16, SYNTHIA_IDS_16)},
              TERRAIN: 16, TRUCK: 18, _ID["train"]: 20}

_DOMAIN_CODE = {d: i for i, d in enumerate(DOMAINS)}
_SPLIT_CODE = {s: i for i, s in enumerate(SPLITS)}


# --------------------------------------------------------------------------- arguments


def check_preset(preset: str) -> Preset:
    """The preset's weights; a clear error for an unknown name."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[preset]


def resolve_strength(preset: str, strength: float | None) -> float:
    """The preset's default strength for ``None``; otherwise a checked float in [0, MAX_STRENGTH]."""
    weights = check_preset(preset)
    value = weights.default_strength if strength is None else float(strength)
    if not 0.0 <= value <= MAX_STRENGTH:
        raise ValueError(f"strength must lie in [0, {MAX_STRENGTH}] (0 = no shift); got {strength}")
    return value


def check_version(version) -> int:
    """The scene version: 1 (12 classes, three shift components) or 2 (17 classes, five)."""
    if version not in VERSIONS:
        raise ValueError(f"unknown benchmark version {version!r}; expected one of {VERSIONS}")
    return int(version)


def strength_of(preset: str, strength: float | None, version: int) -> float:
    """The checked strength of a preset of either version (its default for ``None``)."""
    if check_version(version) == 2:
        from .domain_shift import resolve_strength as resolve_v2

        return resolve_v2(preset, strength)
    return resolve_strength(preset, strength)


def check_size(size) -> tuple[int, int]:
    """``(H, W)`` as ints, at least 16x16."""
    try:
        h, w = (int(v) for v in size)
    except (TypeError, ValueError) as err:
        raise ValueError(f"size must be (H, W), got {size!r}") from err
    if h < 16 or w < 16:
        raise ValueError(f"size must be at least 16x16, got {h}x{w}")
    return h, w


def shift_amounts(preset: str, strength: float | None, domain: str) -> tuple[float, float, float]:
    """(global, classwise, layout) amounts: strength times the preset weights; 0 for the source."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS}")
    weights = check_preset(preset)
    s = resolve_strength(preset, strength)
    if domain == "source":
        return 0.0, 0.0, 0.0
    return s * weights.global_, s * weights.classwise, s * weights.layout


def sample_rngs(domain: str, split: str, index: int) -> tuple[np.random.Generator, ...]:
    """Independent (layout, paint, shift) generators of one sample (docs/data.md §7)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if int(index) < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    seed = np.random.SeedSequence([SEED_SALT, _DOMAIN_CODE[domain], _SPLIT_CODE[split], int(index)])
    return tuple(np.random.default_rng(child) for child in seed.spawn(3))


# --------------------------------------------------------------------------- layout


class Canvas:
    """Three aligned 8-bit rasters: labelIds, instance slots and detail codes."""

    def __init__(self, size: tuple[int, int]):
        h, w = size
        self.images = [Image.new("L", (w, h)) for _ in range(3)]
        self.label, self.instance, self.detail = (ImageDraw.Draw(im) for im in self.images)

    def fill(self, shape: str, box, label: int, instance: int = 0) -> None:
        """Draw a shape of one class and instance; it hides whatever detail lay beneath."""
        for draw, value in ((self.label, label), (self.instance, instance), (self.detail, 0)):
            getattr(draw, shape)(box, fill=value)

    def mark(self, shape: str, box, code: int) -> None:
        """Draw a detail code (window, glass, wheel) without changing the labels."""
        getattr(self.detail, shape)(box, fill=code)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(labelIds, instance slots, detail codes) as uint8 [H, W] arrays."""
        return tuple(np.asarray(im, dtype=np.uint8) for im in self.images)


def _box(x0, y0, x1, y1) -> list[int]:
    """Integer corners of a box at least one pixel wide and high (tiny far objects survive)."""
    left, top = int(round(x0)), int(round(y0))
    return [left, top, max(left, int(round(x1))), max(top, int(round(y1)))]


class Ground(NamedTuple):
    """Perspective of the ground plane: horizon row, vanishing column, trapezoid half-widths."""

    height: int
    horizon: int
    vanish_x: float
    road_top: float
    road_bottom: float
    walk_top: float
    walk_bottom: float

    def row(self, depth: float) -> float:
        """Image row of a ground point at ``depth`` (0 = horizon, 1 = bottom edge)."""
        return self.horizon + depth * (self.height - 1 - self.horizon)

    def road_half(self, depth: float) -> float:
        """Half-width of the road at ``depth``."""
        return self.road_top + depth * (self.road_bottom - self.road_top)

    def walk_half(self, depth: float) -> float:
        """Half-width of road plus sidewalks at ``depth``."""
        return self.walk_top + depth * (self.walk_bottom - self.walk_top)


def draw_ground(canvas: Canvas, rng: np.random.Generator, size, layout: float) -> Ground:
    """Sky above a horizon, terrain below, sidewalk and road trapezoids to a vanishing point.

    The layout shift lowers the horizon by 10 % of the image height per unit amount.
    """
    h, w = size
    u = rng.random(4)
    horizon = int(round(h * min(0.36 + 0.12 * u[0] + 0.1 * layout, 0.7)))
    ground = Ground(h, horizon, w * (0.4 + 0.2 * u[1]), 0.02 * w, w * (0.45 + 0.2 * u[2]),
                    0.05 * w, w * (0.8 + 0.3 * u[3]))
    canvas.fill("rectangle", [0, 0, w - 1, horizon], SKY)
    canvas.fill("rectangle", [0, horizon, w - 1, h - 1], TERRAIN)
    for half_top, half_bottom, label in ((ground.walk_top, ground.walk_bottom, SIDEWALK),
                                         (ground.road_top, ground.road_bottom, ROAD)):
        vx = ground.vanish_x
        polygon = [(vx - half_top, horizon), (vx + half_top, horizon),
                   (vx + half_bottom, h - 1), (vx - half_bottom, h - 1)]
        canvas.fill("polygon", [(int(round(x)), int(round(y))) for x, y in polygon], label)
    return ground


def draw_skyline(canvas: Canvas, rng: np.random.Generator, size, ground: Ground, layout: float,
                 first_slot: int) -> int:
    """Buildings (with window grids), trees and fences standing on the horizon.

    Segments are vegetation with probability 0.3 + 0.3 * layout (twice as many at amount 1).
    Returns the next free instance slot.
    """
    h, w = size
    slot, x = first_slot, 0.0
    p_tree = min(0.3 + 0.3 * layout, 0.9)
    while x < w:
        u = rng.random(6)
        width = w * (0.08 + 0.12 * u[0])
        height = h * (0.12 + 0.28 * u[1])
        x0, x1, top = x, x + width - 1, ground.horizon - height
        if u[2] < p_tree:
            canvas.fill("ellipse", _box(x0, top, x1, ground.horizon + height * 0.2), VEGETATION, slot)
        else:
            canvas.fill("rectangle", _box(x0, top, x1, ground.horizon), BUILDING, slot)
            draw_windows(canvas, x0, top, x1, ground.horizon, h, u[3])
        if u[4] < 0.3:
            canvas.fill("rectangle", _box(x0, ground.horizon - max(2.0, 0.05 * h), x1, ground.horizon), FENCE)
        slot, x = slot + 1, x + width
    return slot


def draw_windows(canvas: Canvas, x0, y0, x1, y1, h: int, u: float) -> None:
    """A regular grid of dark windows inside a building facade."""
    step = max(3, int(round(h * (0.05 + 0.03 * u))))
    size = max(1, step // 2)
    for wy in range(int(y0) + size, int(y1) - size, step):
        for wx in range(int(x0) + size, int(x1) - size, step):
            canvas.mark("rectangle", [wx, wy, wx + size - 1, wy + size - 1], WINDOW)


def draw_car(canvas: Canvas, ground: Ground, depth: float, lane: float, w: int, slot: int) -> None:
    """A car: body, narrower glass cabin and two wheels, sized by perspective."""
    length = max(4.0, 0.34 * w * depth)
    cx, bottom = ground.vanish_x + lane * 0.6 * ground.road_half(depth), ground.row(depth)
    body_top, cabin_top = bottom - 0.3 * length, bottom - 0.55 * length
    canvas.fill("rectangle", _box(cx - length / 2, body_top, cx + length / 2, bottom), CAR, slot)
    canvas.fill("rectangle", _box(cx - length / 3, cabin_top, cx + length / 3, body_top), CAR, slot)
    canvas.mark("rectangle", _box(cx - length / 4, cabin_top + 0.05 * length, cx + length / 4, body_top - 1), GLASS)
    for side in (-1, 1):
        wx = cx + side * length * 0.3
        canvas.mark("rectangle", _box(wx - 0.08 * length, bottom - 0.1 * length, wx + 0.08 * length, bottom), WHEEL)


def draw_truck(canvas: Canvas, ground: Ground, depth: float, lane: float, w: int, slot: int) -> None:
    """A truck: a tall cargo box and a lower cab with a windscreen."""
    length = max(6.0, 0.4 * w * depth)
    cx, bottom = ground.vanish_x + lane * 0.5 * ground.road_half(depth), ground.row(depth)
    box_right = cx + 0.2 * length
    canvas.fill("rectangle", _box(cx - length / 2, bottom - 0.5 * length, box_right, bottom), TRUCK, slot)
    canvas.fill("rectangle", _box(box_right, bottom - 0.35 * length, cx + length / 2, bottom), TRUCK, slot)
    canvas.mark("rectangle", _box(box_right + 0.05 * length, bottom - 0.3 * length,
                                  cx + 0.45 * length, bottom - 0.2 * length), GLASS)
    for wx in (cx - 0.35 * length, cx + 0.35 * length):
        canvas.mark("rectangle", _box(wx - 0.06 * length, bottom - 0.08 * length, wx + 0.06 * length, bottom), WHEEL)


def beside_road(ground: Ground, depth: float, side: float) -> float:
    """Column on the sidewalk: ``side`` in [-1, 1] goes from the left outer edge through the
    road edges (``abs(side) == 0``) to the right outer edge."""
    half_road, half_walk = ground.road_half(depth), ground.walk_half(depth)
    direction = 1.0 if side >= 0 else -1.0
    return ground.vanish_x + direction * (half_road + abs(side) * (half_walk - half_road))


def draw_person(canvas: Canvas, ground: Ground, depth: float, side: float, h: int, slot: int) -> None:
    """A person on the sidewalk: a thin body ellipse and a round head."""
    height = max(4.0, 0.32 * h * depth)
    cx = beside_road(ground, depth, side)
    bottom, width = ground.row(depth), max(1.0, height / 4)
    head = height * 0.2
    canvas.fill("ellipse", _box(cx - width / 2, bottom - height + head, cx + width / 2, bottom), PERSON, slot)
    canvas.fill("ellipse", _box(cx - head / 2, bottom - height, cx + head / 2, bottom - height + head), PERSON, slot)


def draw_pole(canvas: Canvas, ground: Ground, depth: float, side: float, size, with_sign: bool) -> None:
    """A pole at the outer sidewalk edge, optionally carrying a traffic sign near its top."""
    h, w = size
    x = beside_road(ground, depth, 0.85 if side >= 0 else -0.85)
    bottom, height = ground.row(depth), max(4.0, 0.6 * h * depth)
    left, width = int(round(x)), max(1, int(round(0.012 * w * depth)))
    canvas.fill("rectangle", [left, int(round(bottom - height)), left + width - 1, int(round(bottom))], POLE)
    if with_sign:
        s = max(2.0, 0.07 * h * depth)
        canvas.fill("rectangle", _box(x - s / 2, bottom - height, x + s / 2, bottom - height + s), SIGN)


def draw_static(canvas: Canvas, ground: Ground, depth: float, side: float, h: int) -> None:
    """A void 'static' box (a bin) on the sidewalk: ignored in evaluation."""
    x = beside_road(ground, depth, side)
    s, bottom = max(2.0, 0.08 * h * depth), ground.row(depth)
    canvas.fill("rectangle", _box(x - s / 2, bottom - s, x + s / 2, bottom), STATIC)


#: Object candidates: (kind, count, base probability, extra probability per unit of layout shift).
OBJECT_SLOTS = (("car", 6, 0.35, 0.25), ("truck", 1, 0.25, 0.1), ("person", 4, 0.5, 0.0),
                ("pole", 3, 0.6, 0.0), ("static", 2, 0.4, 0.0))


def draw_objects(canvas: Canvas, rng: np.random.Generator, size, ground: Ground, layout: float,
                 first_slot: int) -> None:
    """Cars and a truck on the road, persons, poles (with signs) and void boxes beside it.

    Every candidate draws its numbers whether or not it appears; the layout shift raises the
    probability of cars. Objects are painted far to near so nearer ones occlude.
    """
    h, w = size
    candidates = []
    for kind, count, p_base, p_layout in OBJECT_SLOTS:
        u = rng.random((count, 4))
        for k in range(count):
            if u[k, 0] < min(p_base + p_layout * layout, 0.95):
                candidates.append((0.15 + 0.85 * u[k, 1], kind, 2 * u[k, 2] - 1, u[k, 3], first_slot))
            first_slot += 1
    for depth, kind, pos, extra, slot in sorted(candidates):
        if kind == "car":
            draw_car(canvas, ground, depth, pos, w, slot)
        elif kind == "truck":
            draw_truck(canvas, ground, depth, pos, w, slot)
        elif kind == "person":
            draw_person(canvas, ground, depth, pos, h, slot)
        elif kind == "pole":
            draw_pole(canvas, ground, depth, pos, size, extra < 0.6)
        else:
            draw_static(canvas, ground, depth, pos, h)


def draw_scene(rng: np.random.Generator, size, layout: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rasterise one scene: (labelIds, instance slots, detail codes), each uint8 [H, W].

    A bottom band of 'unlabeled' (id 0) appears in half of the scenes, as void to ignore.
    """
    h, w = size
    canvas = Canvas(size)
    ground = draw_ground(canvas, rng, size, layout)
    slot = draw_skyline(canvas, rng, size, ground, layout, first_slot=1)
    draw_objects(canvas, rng, size, ground, layout, first_slot=max(slot, 64))
    u = rng.random(2)
    if u[0] < 0.5:
        canvas.fill("rectangle", [0, h - max(1, int(round(0.04 * h * (1 + u[1])))), w - 1, h - 1], UNLABELED)
    return canvas.arrays()


# --------------------------------------------------------------------------- appearance


def colour_table(colours: dict[int, tuple[int, int, int]]) -> np.ndarray:
    """[256, 3] float64 colours indexed by labelId (black for absent ids)."""
    table = np.zeros((256, 3))
    for label_id, rgb in colours.items():
        table[label_id] = rgb
    return table


def instance_table(class_colours: np.ndarray, instance_colours, label_of_slot: np.ndarray,
                   u: np.ndarray) -> np.ndarray:
    """[256, 3] per-slot colours: a choice from the class's instance colours, else the class colour."""
    table = class_colours[label_of_slot].copy()
    for label_id, choices in instance_colours.items():
        pick = np.asarray(choices, dtype=np.float64)[(u * len(choices)).astype(int) % len(choices)]
        table = np.where((label_of_slot == label_id)[:, None], pick, table)
    return table


def slot_labels(labels: np.ndarray, instances: np.ndarray) -> np.ndarray:
    """labelId of each instance slot ([256] uint8; 0 for unused slots)."""
    table = np.zeros(256, dtype=np.uint8)
    table[instances.ravel()] = labels.ravel()
    table[0] = 0
    return table


def flat_colours(labels, instances, class_colours, slot_colours) -> np.ndarray:
    """[H, W, 3] colour of every pixel: its instance's colour, or its class colour outside instances.

    One lookup in the stacked [512, 3] table: rows 0-255 by labelId, rows 256-511 by slot.
    """
    index = np.where(instances > 0, 256 + instances.astype(np.int32), labels)
    return np.concatenate([class_colours, slot_colours]).astype(np.float32)[index]


def colour_jitter(rng: np.random.Generator) -> np.ndarray:
    """[256, 3] factors: +-10 % brightness and +-4 % per channel, one row per labelId or slot."""
    brightness, channel = COLOUR_JITTER
    return (1 + brightness * rng.uniform(-1, 1, (256, 1))) * (1 + channel * rng.uniform(-1, 1, (256, 3)))


def flat_look(labels, instances, rng: np.random.Generator, class_colours, instance_colours) -> np.ndarray:
    """Flat colours with jitter per image (per class) and per instance (objects, buildings)."""
    classes = colour_table(class_colours) * colour_jitter(rng)
    slots = instance_table(classes, instance_colours, slot_labels(labels, instances), rng.random(256))
    return flat_colours(labels, instances, classes, slots * colour_jitter(rng))


def paint_source(labels, instances, rng: np.random.Generator) -> np.ndarray:
    """Source look: flat class colours, saturated cars and clothes (docs/data.md §7)."""
    return flat_look(labels, instances, rng, SOURCE_COLOURS, SOURCE_INSTANCE_COLOURS)


def value_noise(rng: np.random.Generator, size, cell: float) -> np.ndarray:
    """Smooth zero-mean noise in [-1, 1]: random values on a grid of ``cell`` pixels, interpolated."""
    h, w = size
    cell = max(cell, 1.0)
    grid = rng.uniform(-1, 1, (int(h / cell) + 2, int(w / cell) + 2))
    y, x = np.arange(h) / cell, np.arange(w) / cell
    y0, x0 = y.astype(int), x.astype(int)
    fy, fx = y - y0, x - x0
    fy, fx = (fy * fy * (3 - 2 * fy))[:, None], (fx * fx * (3 - 2 * fx))[None, :]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def masonry(size, brick_h: int, brick_w: int, offset: bool) -> np.ndarray:
    """A mortar-line pattern: -1 on the joints, a small positive value on the bricks (zero mean)."""
    h, w = size
    y, x = np.arange(h)[:, None], np.arange(w)[None, :]
    shift = (y // brick_h) % 2 * (brick_w // 2) if offset else 0
    joint = (y % brick_h == 0) | ((x + shift) % brick_w == 0)
    return np.where(joint, -1.0, joint.mean() / max(1 - joint.mean(), 1e-9))


def textures(rng: np.random.Generator, size) -> dict[str, np.ndarray]:
    """The target's procedural textures, all zero-mean modulations in about [-1, 1]."""
    h, w = size
    unit = h / 64
    brick = max(2, int(round(2 * unit)))
    return {
        "gravel": rng.uniform(-1, 1, size),
        "tiles": masonry(size, max(3, int(round(4 * unit))), max(3, int(round(4 * unit))), False),
        "bricks": masonry(size, brick, 3 * brick, True),
        "leaves": 0.6 * value_noise(rng, size, 2 * unit) + 0.4 * rng.uniform(-1, 1, size),
        "grass": value_noise(rng, size, 4 * unit),
        "clouds": value_noise(rng, size, 16 * unit),
        "planks": np.broadcast_to(np.where(np.arange(w) % max(2, int(round(2 * unit))) == 0, -1.0, 0.5), size),
    }


def paint_target(labels, instances, rng: np.random.Generator) -> np.ndarray:
    """Target ("real") look: per-class target colours with class textures, achromatic cars,
    dark clothes and an overcast sky brightening towards the top."""
    h, w = labels.shape
    image = flat_look(labels, instances, rng, TARGET_COLOURS, TARGET_INSTANCE_COLOURS)
    fields, texture = textures(rng, (h, w)), np.zeros((h, w))
    for label_id, (kind, amplitude) in TARGET_TEXTURES.items():
        texture = np.where(labels == label_id, amplitude * fields[kind], texture)
    sky_gradient = np.where(labels == SKY, 0.12 * (1 - 2 * np.arange(h) / h)[:, None], 0.0)
    return image * (1 + texture + sky_gradient).astype(np.float32)[..., None]


def global_photometric(image: np.ndarray, amount: float, rng: np.random.Generator) -> np.ndarray:
    """One per-channel affine colour map of the whole image (contrast, cast, exposure) and
    extra sensor noise; identical for every class. Amount 0 is the identity."""
    exposure = 1 + amount * GLOBAL_EXPOSURE_JITTER * rng.uniform(-1, 1)
    noise = GLOBAL_EXTRA_NOISE * rng.standard_normal(image.shape, dtype=np.float32)
    gain = ((1 + amount * GLOBAL_GAIN_DELTA) * exposure).astype(np.float32)
    offset = (amount * (GLOBAL_OFFSET - 128 * GLOBAL_GAIN_DELTA) * exposure).astype(np.float32)
    return image * gain + offset + amount * noise


def quantise(image: np.ndarray) -> np.ndarray:
    """Round and clip to uint8."""
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def render_layers(preset: str, strength: float | None, domain: str, split: str, index: int,
                  size, version: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image uint8 [H, W, 3], labelIds uint8 [H, W], instance slots uint8 [H, W]) of one sample.

    Version 1: image = global(shade * lerp(source look, target look, class amount)) + source
    noise, where the scene's layout is drawn with the layout amount (all amounts 0 for the
    source). Version 2 is :func:`cag.data.domain_shift.render_layers`.
    """
    check_version(version)
    if version == 2:
        from . import domain_shift

        return domain_shift.render_layers(preset, strength, domain, split, index, size)
    size = check_size(size)
    amount_global, amount_class, amount_layout = shift_amounts(preset, strength, domain)
    layout_rng, paint_rng, shift_rng = sample_rngs(domain, split, index)
    labels, instances, details = draw_scene(layout_rng, size, amount_layout)
    image = paint_source(labels, instances, paint_rng)
    noise = SOURCE_NOISE * paint_rng.standard_normal(image.shape, dtype=np.float32)
    if domain == "target":
        image = image + amount_class * (paint_target(labels, instances, shift_rng) - image)
    image = image * DETAIL_SHADE[details][..., None]
    if domain == "target":
        image = global_photometric(image, amount_global, shift_rng)
    return quantise(image + noise), labels, instances


def render_sample(preset: str, strength: float | None, domain: str, split: str, index: int,
                  size=(64, 128), version: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """One sample in memory: (image uint8 [H, W, 3], Cityscapes labelIds uint8 [H, W]).

    Deterministic in its arguments and independent of any other sample (docs/data.md §7).
    """
    image, labels, _ = render_layers(preset, strength, domain, split, index, size, version)
    return image, labels


# --------------------------------------------------------------------------- files


def source_paths(out, index: int) -> tuple[Path, Path]:
    """GTA5 layout: ``source/images/NNNNN.png`` and ``source/labels/NNNNN.png`` (1-based)."""
    name = f"{index + 1:05d}.png"
    return Path(out) / "source" / "images" / name, Path(out) / "source" / "labels" / name


def target_paths(out, split: str, index: int) -> tuple[Path, Path]:
    """Cityscapes layout: ``target/leftImg8bit/<split>/synth/synth_000000_NNNNNN_leftImg8bit.png``
    and ``target/gtFine/<split>/synth/synth_000000_NNNNNN_gtFine_labelIds.png`` (0-based)."""
    stem = f"synth_000000_{index:06d}"
    root = Path(out) / "target"
    return (root / "leftImg8bit" / split / "synth" / f"{stem}_leftImg8bit.png",
            root / "gtFine" / split / "synth" / f"{stem}_gtFine_labelIds.png")


def synthia_paths(out, index: int) -> tuple[Path, Path]:
    """SYNTHIA layout: ``source_synthia/RGB/NNNNNNN.png`` and ``GT/LABELS/NNNNNNN.png`` (0-based)."""
    name = f"{index:07d}.png"
    root = Path(out) / "source_synthia"
    return root / "RGB" / name, root / "GT" / "LABELS" / name


def to_synthia_ids(label_ids: np.ndarray) -> np.ndarray:
    """Cityscapes labelIds to SYNTHIA class ids (uint16); ids without a SYNTHIA class become 0."""
    table = np.zeros(256, dtype=np.uint16)
    for label_id, synthia_id in SYNTHIA_ID.items():
        table[label_id] = synthia_id
    return table[label_ids]


def synthia_instances(label_ids: np.ndarray, instances: np.ndarray) -> np.ndarray:
    """SYNTHIA's instance channel: the instance slot on pixels of thing classes, else 0."""
    things = [label.id for label in LABELS if label.hasInstances]
    return np.where(np.isin(label_ids, things), instances, 0).astype(np.uint16)


def _jobs(params: dict) -> list[tuple[str, str, int]]:
    counts = (("source", "train", params["n_source"]), ("target", "train", params["n_target_train"]),
              ("target", "val", params["n_target_val"]), ("target", "test", params["n_target_test"]))
    return [(domain, split, i) for domain, split, n in counts for i in range(n)]


def _files(out, params: dict) -> list[Path]:
    paths = []
    for domain, split, i in _jobs(params):
        paths += source_paths(out, i) if domain == "source" else target_paths(out, split, i)
        if domain == "source" and params["synthia"]:
            paths += synthia_paths(out, i)
    return paths


def read_manifest(out) -> dict | None:
    """The manifest in ``out``, or None when there is none."""
    path = Path(out) / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise io.DataError(f"{path}: unreadable benchmark manifest ({err})") from err


def is_current(out, params: dict) -> bool:
    """True when ``out`` holds a complete benchmark made with exactly these parameters."""
    manifest = read_manifest(out)
    return (manifest is not None and manifest.get("complete") is True
            and manifest.get("format_version") == FORMAT_VERSION
            and manifest.get("parameters") == params
            and all(p.exists() for p in _files(out, params)))


def clear_previous(out) -> None:
    """Remove an earlier benchmark's folders; refuse to touch folders that no manifest claims."""
    out = Path(out)
    ours = [out / d for d in ("source", "target", "source_synthia")]
    if read_manifest(out) is None and any(d.exists() for d in ours):
        raise OutputError(
            f"{out} already holds source/ or target/ folders but no {MANIFEST}; refusing to "
            "overwrite them: delete them or choose another --out")
    for d in ours:
        if d.exists():
            shutil.rmtree(d)


def sample_size(params: dict, domain: str, index: int) -> list[int]:
    """The (H, W) of one sample: ``params["size"]``, or a source frame's entry in
    ``params["source_sizes"]`` (frames of other sizes, as GTA5's 1914x1046 ones)."""
    if domain == "source":
        return params.get("source_sizes", {}).get(str(index), params["size"])
    return params["size"]


def write_sample(out, domain: str, split: str, index: int, params: dict) -> np.ndarray:
    """Render one sample, write it in its dataset's format and return its labelIds."""
    image, labels, instances = render_layers(params["preset"], params["strength"], domain, split, index,
                                             sample_size(params, domain, index), params.get("version", 1))
    if domain == "target":
        image_path, label_path = target_paths(out, split, index)
        io.write_image(image_path, image)
        io.write_cityscapes_label(label_path, labels)
        return labels
    image_path, label_path = source_paths(out, index)
    io.write_image(image_path, image)
    io.write_gta5_label(label_path, labels)
    if params["synthia"]:
        rgb_path, gt_path = synthia_paths(out, index)
        io.write_image(rgb_path, image)
        io.write_synthia_label(gt_path, to_synthia_ids(labels), synthia_instances(labels, instances))
    return labels


def generate(out, preset: str = "class", strength: float | None = None, size=(64, 128),
             n_source: int = 600, n_target_train: int = 600, n_target_val: int = 100,
             n_target_test: int = 200, synthia: bool = False, progress: bool = True,
             source_sizes: dict | None = None, version: int = 1) -> dict:
    """Write the benchmark to ``out`` and return its manifest (docs/data.md §7).

    ``version`` picks the scene grammar and shift (:data:`VERSIONS`); it is recorded in the
    manifest's parameters only when it is not 1, so version-1 folders stay current.
    ``source_sizes`` maps source indices to another (H, W) than ``size``: frames of other sizes
    among the rest, as GTA5's 1914x1046 ones (written to both source layouts).
    Does nothing when ``out/benchmark.json`` already records these parameters and all files
    exist; otherwise removes the previous benchmark's folders and regenerates.
    """
    from tqdm.auto import tqdm

    counts = {"n_source": n_source, "n_target_train": n_target_train,
              "n_target_val": n_target_val, "n_target_test": n_target_test}
    for key, value in counts.items():
        if int(value) < 0:
            raise ValueError(f"{key} must be >= 0, got {value}")
    params = {"preset": preset, "strength": strength_of(preset, strength, version),
              "size": list(check_size(size)), **{k: int(v) for k, v in counts.items()},
              "synthia": bool(synthia)}
    if check_version(version) != 1:
        params["version"] = version
    if source_sizes:
        bad = [i for i in source_sizes if not 0 <= int(i) < int(n_source)]
        if bad:
            raise ValueError(f"source_sizes: indices {bad} are not source samples (0..{int(n_source) - 1})")
        params["source_sizes"] = {str(int(i)): list(check_size(hw)) for i, hw in sorted(source_sizes.items())}
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: the benchmark folder is a file; choose another folder")
    if is_current(out, params):
        return read_manifest(out)
    writable_folder(out, "the benchmark folder")
    clear_previous(out)
    manifest = {"format": "cag-mini-street-scenes", "format_version": FORMAT_VERSION,
                "complete": False, "parameters": params}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    histograms: dict[str, np.ndarray] = {}
    for domain, split, i in tqdm(_jobs(params), desc="mini street scenes", disable=not progress):
        labels = write_sample(out, domain, split, i, params)
        key = "source" if domain == "source" else f"target_{split}"
        histograms[key] = histograms.get(key, np.zeros(256, np.int64)) + np.bincount(labels.ravel(), minlength=256)
    manifest.update(describe(params, histograms))
    manifest["complete"] = True
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def describe(params: dict, histograms: dict[str, np.ndarray]) -> dict:
    """Manifest body: layouts, class list, counts and per-set labelId pixel fractions."""
    names = {label.id: label.name for label in LABELS}
    if params.get("version", 1) == 2:
        from . import domain_shift, street_scene

        classes, presets = street_scene.CLASS_LABEL_IDS, domain_shift.PRESETS
        presets = {name: {**p.weights._asdict(), "default_strength": p.default_strength} for name, p in presets.items()}
    else:
        classes, presets = CLASS_LABEL_IDS, {name: p._asdict() for name, p in PRESETS.items()}
    layouts = {"source": "GTA5", "target": "Cityscapes"}
    if params["synthia"]:
        layouts["source_synthia"] = "SYNTHIA-RAND-CITYSCAPES"
    return {
        "layouts": layouts,
        "target_city": "synth",
        "classes": {names[i]: i for i in classes},
        "void_label_ids": list(VOID_LABEL_IDS),
        "presets": presets,
        "counts": {"source": params["n_source"], "target_train": params["n_target_train"],
                   "target_val": params["n_target_val"], "target_test": params["n_target_test"]},
        "label_fractions": {key: {names[i]: round(float(hist[i] / hist.sum()), 5)
                                  for i in np.flatnonzero(hist)} for key, hist in histograms.items()},
    }


# --------------------------------------------------------------------------- command line


def parse_size(text: str) -> tuple[int, int]:
    """``"64x128"`` -> (64, 128)."""
    try:
        h, w = text.lower().split("x")
        return check_size((int(h), int(w)))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--size must look like 64x128 (HxW), got {text!r}") from err


def main(argv=None) -> int:
    """``python -m cag.data.synthetic --out DIR [--preset P] [--strength S] ...``; an unusable
    ``--out`` or manifest ends in one line and exit status 2 (:mod:`cag.errors`)."""
    return cli_main(_main, argv)


def _main(argv) -> int:
    parser = argparse.ArgumentParser(prog="python -m cag.data.synthetic", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--preset", default="class", choices=sorted(PRESETS))
    parser.add_argument("--strength", type=float, default=None, help="shift strength (default: the preset's)")
    parser.add_argument("--size", type=parse_size, default=(64, 128), help="HxW, e.g. 64x128")
    parser.add_argument("--n-source", type=int, default=600)
    parser.add_argument("--n-target-train", type=int, default=600)
    parser.add_argument("--n-target-val", type=int, default=100)
    parser.add_argument("--n-target-test", type=int, default=200)
    parser.add_argument("--version", type=int, default=1, choices=VERSIONS, help="scene version (docs/data.md §7)")
    parser.add_argument("--synthia", action="store_true", help="also write the source in the SYNTHIA layout")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        manifest = generate(args.out, args.preset, args.strength, args.size, args.n_source,
                            args.n_target_train, args.n_target_val, args.n_target_test,
                            args.synthia, progress=not args.quiet, version=args.version)
    except ValueError as err:
        if isinstance(err, UserInputError):
            raise
        parser.error(str(err))
    n = sum(manifest["counts"].values())
    print(f"{args.out}: {n} samples ({manifest['parameters']['preset']}, strength "
          f"{manifest['parameters']['strength']}) ready in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
