"""Scene grammar of the built-in benchmark, version 2 (docs/data.md §7): what is where.

A scene is rasterised into three aligned 8-bit maps: Cityscapes labelIds, instance slots and
detail codes (windows, glass, wheels, lamps: shape cues shared by both domains). Version 2 holds
17 of the 19 evaluated Cityscapes classes (all but train and motorcycle), small ones included,
at sizes a 96-row image can resolve: every length is given in pixels of a 96-row image and
scaled with the image height (:func:`px`), so poles, signs, lights, persons, riders and
bicycles stay visible whatever the size, and small (each under 3 % of the pixels).

Two of the five shift components (:mod:`cag.data.domain_shift`) act here:

* **geometry** changes the objects' shapes and scales: target cars are longer and lower, persons
  and riders taller and thinner, buses longer, buildings taller, poles taller;
* **layout** changes where things are: a lower horizon, more vegetation, more cars and persons.

Every candidate object draws its random numbers whether or not it appears and whatever the
amounts, so a sample's draws never depend on the preset or the strength (one target image
morphs continuously as the strength grows).
"""
from __future__ import annotations

import numpy as np

from .synthetic import (BUILDING, CAR, FENCE, PERSON, POLE, ROAD, SIDEWALK, SIGN, SKY, STATIC, TERRAIN, TRUCK,
                        UNLABELED, VEGETATION, Canvas, Ground, _box, _ID, beside_road, draw_ground)

WALL, LIGHT, RIDER = _ID["wall"], _ID["traffic light"], _ID["rider"]
BUS, BICYCLE = _ID["bus"], _ID["bicycle"]

#: The 17 evaluated classes a version-2 scene can contain (Cityscapes labelIds).
CLASS_LABEL_IDS = (ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN, VEGETATION, TERRAIN, SKY,
                   PERSON, RIDER, CAR, TRUCK, BUS, BICYCLE)
VOID_LABEL_IDS = (UNLABELED, STATIC)
#: Classes that must stay small (at most 3 % of the target pixels, docs/data.md §7).
SMALL_CLASSES = (POLE, LIGHT, SIGN, PERSON, RIDER, BICYCLE)

#: Detail codes: their brightness factors are cag.data.appearance.DETAIL_SHADE.
WINDOW, GLASS, WHEEL, LAMP = 1, 2, 3, 4

#: Object candidates: (kind, count, base probability, extra probability per unit of layout shift).
OBJECT_SLOTS = (("car", 6, 0.35, 0.25), ("truck", 1, 0.2, 0.0), ("bus", 1, 0.2, 0.0),
                ("person", 6, 0.55, 0.2), ("cyclist", 3, 0.5, 0.0), ("pole", 5, 0.8, 0.0),
                ("static", 2, 0.4, 0.0))


def px(size, value: float) -> float:
    """``value`` pixels of a 96-row image, scaled to this image's height."""
    return value * size[0] / 96


def draw_skyline(canvas: Canvas, rng: np.random.Generator, size, ground: Ground, geometry: float,
                 layout: float, first_slot: int) -> int:
    """Buildings (window grids), trees, walls and fences standing on the horizon.

    Segments are vegetation with probability 0.3 + 0.3 * layout; buildings grow 40 % taller per
    unit of geometry. A segment may carry a low wall or a fence in front. Returns the next slot.
    """
    h, w = size
    slot, x = first_slot, 0.0
    p_tree = min(0.3 + 0.3 * layout, 0.9)
    while x < w:
        u = rng.random(7)
        width = w * (0.08 + 0.12 * u[0])
        height = h * (0.12 + 0.28 * u[1]) * (1 + 0.4 * geometry)
        x0, x1, top = x, x + width - 1, max(0.0, ground.horizon - height)
        if u[2] < p_tree:
            canvas.fill("ellipse", _box(x0, top, x1, ground.horizon + height * 0.2), VEGETATION, slot)
        else:
            canvas.fill("rectangle", _box(x0, top, x1, ground.horizon), BUILDING, slot)
            draw_windows(canvas, size, x0, top, x1, ground.horizon, u[3])
        if u[4] < 0.25:
            wall_top = ground.horizon - max(px(size, 5), 0.08 * h)
            canvas.fill("rectangle", _box(x0, wall_top, x1, ground.horizon), WALL, slot + 1)
        elif u[4] < 0.5:
            canvas.fill("rectangle", _box(x0, ground.horizon - max(px(size, 3), 0.05 * h), x1, ground.horizon), FENCE)
        slot, x = slot + 2, x + width
    return slot


def draw_windows(canvas: Canvas, size, x0, y0, x1, y1, u: float) -> None:
    """A regular grid of dark windows inside a building facade."""
    step = max(3, int(round(px(size, 5 + 3 * u))))
    side = max(1, step // 2)
    for wy in range(int(y0) + side, int(y1) - side, step):
        for wx in range(int(x0) + side, int(x1) - side, step):
            canvas.mark("rectangle", [wx, wy, wx + side - 1, wy + side - 1], WINDOW)


def draw_wheels(canvas: Canvas, centres, bottom: float, radius: float) -> None:
    """Dark wheel marks of radius ``radius`` standing on ``bottom``."""
    for wx in centres:
        canvas.mark("ellipse", _box(wx - radius, bottom - 2 * radius, wx + radius, bottom), WHEEL)


def draw_car(canvas: Canvas, size, ground: Ground, depth: float, lane: float, geometry: float, slot: int) -> None:
    """A car: body, narrower glass cabin, two wheels; geometry makes it longer and lower."""
    w = size[1]
    length = max(px(size, 6), 0.34 * w * depth) * (1 + 0.3 * geometry)
    tall = 0.55 - 0.12 * geometry
    cx, bottom = ground.vanish_x + lane * 0.6 * ground.road_half(depth), ground.row(depth)
    body_top, cabin_top = bottom - 0.55 * tall * length, bottom - tall * length
    canvas.fill("rectangle", _box(cx - length / 2, body_top, cx + length / 2, bottom), CAR, slot)
    canvas.fill("rectangle", _box(cx - length / 3, cabin_top, cx + length / 3, body_top), CAR, slot)
    canvas.mark("rectangle", _box(cx - length / 4, cabin_top + 0.05 * length, cx + length / 4, body_top - 1), GLASS)
    draw_wheels(canvas, (cx - 0.3 * length, cx + 0.3 * length), bottom, 0.08 * length)


def draw_truck(canvas: Canvas, size, ground: Ground, depth: float, lane: float, geometry: float,
               slot: int) -> None:
    """A truck: a tall cargo box and a lower cab with a windscreen."""
    w = size[1]
    length = max(px(size, 8), 0.4 * w * depth) * (1 + 0.15 * geometry)
    cx, bottom = ground.vanish_x + lane * 0.5 * ground.road_half(depth), ground.row(depth)
    box_right = cx + 0.2 * length
    canvas.fill("rectangle", _box(cx - length / 2, bottom - 0.5 * length, box_right, bottom), TRUCK, slot)
    canvas.fill("rectangle", _box(box_right, bottom - 0.35 * length, cx + length / 2, bottom), TRUCK, slot + 1)
    canvas.mark("rectangle", _box(box_right + 0.05 * length, bottom - 0.3 * length,
                                  cx + 0.45 * length, bottom - 0.2 * length), GLASS)
    draw_wheels(canvas, (cx - 0.35 * length, cx + 0.35 * length), bottom, 0.06 * length)


def draw_bus(canvas: Canvas, size, ground: Ground, depth: float, lane: float, geometry: float, slot: int) -> None:
    """A bus: one long box with a row of side windows; geometry makes it longer."""
    w = size[1]
    length = max(px(size, 10), 0.5 * w * depth) * (1 + 0.3 * geometry)
    cx, bottom = ground.vanish_x + lane * 0.5 * ground.road_half(depth), ground.row(depth)
    top = bottom - 0.38 * length
    canvas.fill("rectangle", _box(cx - length / 2, top, cx + length / 2, bottom), BUS, slot)
    canvas.mark("rectangle", _box(cx - 0.45 * length, top + 0.05 * length, cx + 0.45 * length,
                                  top + 0.15 * length), GLASS)
    draw_wheels(canvas, (cx - 0.32 * length, cx + 0.32 * length), bottom, 0.06 * length)


def draw_person(canvas: Canvas, size, ground: Ground, depth: float, side: float, geometry: float,
                slot: int) -> None:
    """A person on the inner part of the sidewalk: body ellipse and head; geometry: taller and thinner."""
    h = size[0]
    height = max(px(size, 14), 0.3 * h * depth) * (1 + 0.25 * geometry)
    cx = beside_road(ground, depth, 0.6 * side)
    bottom, width = ground.row(depth), max(px(size, 3.5), height / (3.5 * (1 + 0.4 * geometry)))
    head = height * 0.2
    canvas.fill("ellipse", _box(cx - width / 2, bottom - height + head, cx + width / 2, bottom), PERSON, slot)
    canvas.fill("ellipse", _box(cx - head / 2, bottom - height, cx + head / 2, bottom - height + head), PERSON, slot + 1)


def draw_cyclist(canvas: Canvas, size, ground: Ground, depth: float, side: float, geometry: float,
                 slot: int) -> None:
    """A rider on a bicycle at the road's edge: two wheel rings and a frame (bicycle), a body
    and head above them (rider); geometry makes the rider taller and thinner."""
    h = size[0]
    wheel = max(px(size, 3), 0.06 * h * depth)
    cx = ground.vanish_x + (1 if side >= 0 else -1) * 0.85 * ground.road_half(depth)
    bottom = ground.row(depth)
    for wx in (cx - 1.3 * wheel, cx + 1.3 * wheel):
        canvas.fill("ellipse", _box(wx - wheel, bottom - 2 * wheel, wx + wheel, bottom), BICYCLE, slot)
        canvas.mark("ellipse", _box(wx - 0.4 * wheel, bottom - 1.4 * wheel, wx + 0.4 * wheel, bottom - 0.6 * wheel),
                    WHEEL)
    canvas.fill("rectangle", _box(cx - 1.3 * wheel, bottom - 1.3 * wheel, cx + 1.3 * wheel,
                                  bottom - wheel), BICYCLE, slot)
    body = max(px(size, 8), 0.2 * h * depth) * (1 + 0.25 * geometry)
    width = max(px(size, 3.5), body / (2.5 * (1 + 0.4 * geometry)))
    seat = bottom - 1.6 * wheel
    canvas.fill("ellipse", _box(cx - width / 2, seat - body, cx + width / 2, seat), RIDER, slot + 1)
    head = 0.3 * body
    canvas.fill("ellipse", _box(cx - head / 2, seat - body - head, cx + head / 2, seat - body + 1), RIDER, slot + 1)


def draw_pole(canvas: Canvas, size, ground: Ground, depth: float, side: float, geometry: float,
              carries: float) -> None:
    """A pole on the sidewalk near the kerb carrying a traffic sign (``carries`` < 0.45), a traffic
    light with three lamps (< 0.8) or nothing; geometry makes it 20 % taller per unit."""
    h, w = size
    x = beside_road(ground, depth, 0.3 if side >= 0 else -0.3)
    bottom = ground.row(depth)
    height = max(px(size, 20), 0.55 * h * depth) * (1 + 0.2 * geometry)
    top = max(0.0, bottom - height)
    width = max(px(size, 3), 0.015 * w * depth)
    canvas.fill("rectangle", _box(x - width / 2, top, x + width / 2, bottom), POLE)
    if carries < 0.45:
        s = max(px(size, 9), 0.1 * h * depth)
        canvas.fill("rectangle", _box(x - s / 2, top, x + s / 2, top + s), SIGN)
    elif carries < 0.8:
        lw, lh = max(px(size, 5), 0.04 * h * depth), max(px(size, 13), 0.12 * h * depth)
        canvas.fill("rectangle", _box(x - lw / 2, top, x + lw / 2, top + lh), LIGHT)
        for k in range(3):
            cy = top + (k + 0.5) * lh / 3
            canvas.mark("ellipse", _box(x - lw / 4, cy - lh / 10, x + lw / 4, cy + lh / 10), LAMP)


def draw_static(canvas: Canvas, size, ground: Ground, depth: float, side: float) -> None:
    """A void 'static' box (a bin) on the sidewalk: ignored in evaluation."""
    x = beside_road(ground, depth, side)
    s, bottom = max(px(size, 3), 0.08 * size[0] * depth), ground.row(depth)
    canvas.fill("rectangle", _box(x - s / 2, bottom - s, x + s / 2, bottom), STATIC)


def draw_objects(canvas: Canvas, rng: np.random.Generator, size, ground: Ground, geometry: float,
                 layout: float, first_slot: int) -> None:
    """Vehicles on the road, persons, cyclists, poles and void boxes beside it, far to near
    (nearer ones occlude). Each object takes two instance slots (its parts can differ)."""
    candidates = []
    for kind, count, p_base, p_layout in OBJECT_SLOTS:
        u = rng.random((count, 4))
        for k in range(count):
            if u[k, 0] < min(p_base + p_layout * layout, 0.95):
                candidates.append((0.2 + 0.8 * u[k, 1], kind, 2 * u[k, 2] - 1, u[k, 3], first_slot))
            first_slot += 2
    for depth, kind, pos, extra, slot in sorted(candidates):
        if kind == "car":
            draw_car(canvas, size, ground, depth, pos, geometry, slot)
        elif kind == "truck":
            draw_truck(canvas, size, ground, depth, pos, geometry, slot)
        elif kind == "bus":
            draw_bus(canvas, size, ground, depth, pos, geometry, slot)
        elif kind == "person":
            draw_person(canvas, size, ground, depth, pos, geometry, slot)
        elif kind == "cyclist":
            draw_cyclist(canvas, size, ground, depth, pos, geometry, slot)
        elif kind == "pole":
            draw_pole(canvas, size, ground, depth, pos, geometry, extra)
        else:
            draw_static(canvas, size, ground, depth, pos)


def draw_scene(rng: np.random.Generator, size, geometry: float, layout: float):
    """Rasterise one version-2 scene: (labelIds, instance slots, detail codes), uint8 [H, W].

    A bottom band of 'unlabeled' (id 0) appears in half of the scenes, as void to ignore.
    """
    h, w = size
    canvas = Canvas(size)
    ground = draw_ground(canvas, rng, size, layout)
    slot = draw_skyline(canvas, rng, size, ground, geometry, layout, first_slot=1)
    draw_objects(canvas, rng, size, ground, geometry, layout, first_slot=max(slot, 100))
    u = rng.random(2)
    if u[0] < 0.5:
        canvas.fill("rectangle", [0, h - max(1, int(round(0.04 * h * (1 + u[1])))), w - 1, h - 1], UNLABELED)
    return canvas.arrays()
