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
from . import synthetic
from .synthetic import ROAD, SIDEWALK, SIGN, SKY, TERRAIN, TRUCK, VEGETATION, flat_look, textures

# fmt: off
#: Flat class colours of the source domain (RGB): version 1's, plus the five new classes.
SOURCE_COLOURS = {
    **synthetic.SOURCE_COLOURS,
    WALL: (102, 102, 156),  LIGHT: (250, 170, 30),  RIDER: (255, 60, 0),
    BUS: (0, 90, 140),      BICYCLE: (119, 11, 32),
}
#: Class colours of the target domain (every class moves in its own direction): version 1's,
#: the five new classes, and traffic signs turned blue (version 1's stay yellow, as the source's).
TARGET_COLOURS = {
    **synthetic.TARGET_COLOURS,
    WALL: (160, 160, 150),  LIGHT: (40, 45, 40),    RIDER: (60, 70, 110),
    BUS: (200, 40, 40),     BICYCLE: (30, 30, 30),  SIGN: (40, 90, 190),
}
# fmt: on
#: Per-instance colours (saturated source cars and clothes, achromatic and dark target ones).
SOURCE_INSTANCE_COLOURS = synthetic.SOURCE_INSTANCE_COLOURS
TARGET_INSTANCE_COLOURS = synthetic.TARGET_INSTANCE_COLOURS
#: Target materials (texture kind, amplitude): version 1's, and walls tiled.
TARGET_TEXTURES = {**synthetic.TARGET_TEXTURES, WALL: ("tiles", 0.2)}

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
