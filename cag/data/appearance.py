"""How the version-2 scenes look in each domain (docs/data.md §7): colours, materials, look-alikes.

* **source** ("synthetic"): flat colours near the Cityscapes palette, with jitter per image and
  per instance, saturated cars and clothes;
* **target** ("real"): every class moves towards its own colour and gets its own procedural
  texture (the *material* component, :mod:`cag.data.domain_shift`), cars turn achromatic and
  clothes dark; and three target classes take the look of *another* source class
  (:data:`LOOK_ALIKES`): target sidewalks are paved like source roads, target terrain is as green
  as source vegetation, target buses are painted like source trucks. Those look-alikes blend in
  :data:`LOOK_ALIKE_RATE` times faster than the rest of the material change.

No BatchNorm statistic can undo a class-conditional colour change, and none can tell a target
sidewalk from a source road.
"""
from __future__ import annotations

import numpy as np

from .street_scene import BICYCLE, BUS, GLASS, LAMP, LIGHT, RIDER, WALL, WHEEL, WINDOW
from .synthetic import (BUILDING, CAR, FENCE, PERSON, POLE, ROAD, SIDEWALK, SIGN, SKY, STATIC, TERRAIN, TRUCK,
                        UNLABELED, VEGETATION, flat_look, textures)

# fmt: off
#: Flat class colours of the source domain (RGB).
SOURCE_COLOURS = {
    UNLABELED: (25, 25, 30),    STATIC: (110, 80, 50),
    ROAD: (95, 90, 105),        SIDEWALK: (175, 150, 170), BUILDING: (120, 115, 110),
    WALL: (102, 102, 156),      FENCE: (190, 153, 153),    POLE: (153, 153, 153),
    LIGHT: (250, 170, 30),      SIGN: (220, 220, 0),       VEGETATION: (107, 142, 35),
    TERRAIN: (152, 200, 120),   SKY: (70, 130, 180),       PERSON: (220, 20, 60),
    RIDER: (255, 60, 0),        CAR: (0, 0, 142),          TRUCK: (230, 120, 20),
    BUS: (0, 90, 140),          BICYCLE: (119, 11, 32),
}
#: Class colours of the target domain: every class moves in its own direction.
TARGET_COLOURS = {
    UNLABELED: (40, 35, 30),    STATIC: (90, 90, 90),
    ROAD: (150, 135, 120),      SIDEWALK: (120, 105, 100), BUILDING: (175, 140, 110),
    WALL: (160, 160, 150),      FENCE: (110, 100, 80),     POLE: (70, 70, 75),
    LIGHT: (40, 45, 40),        SIGN: (40, 90, 190),       VEGETATION: (45, 85, 40),
    TERRAIN: (150, 135, 80),    SKY: (205, 210, 215),      PERSON: (50, 50, 60),
    RIDER: (60, 70, 110),       CAR: (95, 95, 100),        TRUCK: (215, 215, 205),
    BUS: (200, 40, 40),         BICYCLE: (30, 30, 30),
}
#: Per-instance colours: saturated source cars against achromatic target cars, bright source
#: clothes against dark target clothes.
SOURCE_INSTANCE_COLOURS = {
    CAR: ((200, 30, 30), (30, 60, 200), (230, 200, 30), (40, 170, 60)),
    PERSON: ((220, 20, 60), (250, 120, 0), (30, 160, 220), (150, 40, 200)),
}
TARGET_INSTANCE_COLOURS = {
    CAR: ((225, 225, 225), (160, 160, 165), (95, 95, 100), (30, 30, 35)),
    PERSON: ((50, 50, 60), (80, 60, 50), (40, 40, 40), (100, 100, 110)),
}
#: Target materials: (texture kind, amplitude); kinds are zero-mean modulations (cag.data.synthetic.textures).
TARGET_TEXTURES = {
    ROAD: ("gravel", 0.15), SIDEWALK: ("tiles", 0.15), BUILDING: ("bricks", 0.2), WALL: ("tiles", 0.2),
    VEGETATION: ("leaves", 0.35), TERRAIN: ("grass", 0.25), SKY: ("clouds", 0.08), FENCE: ("planks", 0.2),
}
# fmt: on

#: Target class -> the source class whose look it takes (its source colour, no texture).
LOOK_ALIKES = {SIDEWALK: ROAD, TERRAIN: VEGETATION, BUS: TRUCK}
#: A look-alike's blend weight is min(1, LOOK_ALIKE_RATE * material amount).
LOOK_ALIKE_RATE = 1.5

#: Brightness factor of each detail code (0 = none): window, glass, wheel, lamp.
DETAIL_SHADE = np.ones(8, dtype=np.float32)
DETAIL_SHADE[[WINDOW, GLASS, WHEEL, LAMP]] = (0.55, 0.4, 0.25, 1.6)
SOURCE_NOISE = 3.0


def paint_source(labels, instances, rng: np.random.Generator) -> np.ndarray:
    """Source look: flat class colours, saturated cars and clothes ([H, W, 3] float32)."""
    return flat_look(labels, instances, rng, SOURCE_COLOURS, SOURCE_INSTANCE_COLOURS)


def target_colours() -> dict[int, tuple[int, int, int]]:
    """The target's class colours with each look-alike given its source twin's colour."""
    return {**TARGET_COLOURS, **{label: SOURCE_COLOURS[twin] for label, twin in LOOK_ALIKES.items()}}


def paint_target(labels, instances, rng: np.random.Generator) -> np.ndarray:
    """Target ("real") look at full material amount: target colours and class textures,
    achromatic cars, dark clothes, an overcast sky; look-alikes flat in their twin's colour."""
    h, w = labels.shape
    image = flat_look(labels, instances, rng, target_colours(), TARGET_INSTANCE_COLOURS)
    fields, texture = textures(rng, (h, w)), np.zeros((h, w))
    for label_id, (kind, amplitude) in TARGET_TEXTURES.items():
        if label_id not in LOOK_ALIKES:
            texture = np.where(labels == label_id, amplitude * fields[kind], texture)
    sky_gradient = np.where(labels == SKY, 0.12 * (1 - 2 * np.arange(h) / h)[:, None], 0.0)
    return image * (1 + texture + sky_gradient).astype(np.float32)[..., None]


def material_blend(labels: np.ndarray, amount: float) -> np.ndarray:
    """[H, W, 1] weight of the target look per pixel: ``amount``, and
    ``min(1, LOOK_ALIKE_RATE * amount)`` on the look-alike classes."""
    table = np.full(256, amount, dtype=np.float32)
    table[list(LOOK_ALIKES)] = min(1.0, LOOK_ALIKE_RATE * amount)
    return table[labels][..., None]


def paint(labels, instances, details, domain: str, material: float, paint_rng, shift_rng) -> np.ndarray:
    """The image before the global and optical components ([H, W, 3] float32, 0-255 scale):
    the source look, blended per pixel towards the target look by :func:`material_blend`
    (target domain only), shaded by the detail codes."""
    image = paint_source(labels, instances, paint_rng)
    if domain == "target":
        target = paint_target(labels, instances, shift_rng)
        image = image + material_blend(labels, material) * (target - image)
    return image * DETAIL_SHADE[details][..., None]
