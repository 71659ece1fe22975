"""Label protocols: the Cityscapes label table and the id -> train-id lookup tables.

The 35-row table is the one in ``cityscapesscripts/helpers/labels.py`` (MIT licence,
Copyright (c) 2022 The Cityscapes Authors); ``tests/test_labels.py`` asserts it is equal.
Every lookup table in this project maps to train ids with ``IGNORE_INDEX`` (255) for
anything that is not evaluated (docs/data.md §4).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

IGNORE_INDEX = 255


class Label(NamedTuple):
    name: str
    id: int
    trainId: int
    category: str
    categoryId: int
    hasInstances: bool
    ignoreInEval: bool
    color: tuple[int, int, int]


# fmt: off
LABELS: tuple[Label, ...] = (
    Label("unlabeled",            0, 255, "void",         0, False, True,  (0, 0, 0)),
    Label("ego vehicle",          1, 255, "void",         0, False, True,  (0, 0, 0)),
    Label("rectification border", 2, 255, "void",         0, False, True,  (0, 0, 0)),
    Label("out of roi",           3, 255, "void",         0, False, True,  (0, 0, 0)),
    Label("static",               4, 255, "void",         0, False, True,  (0, 0, 0)),
    Label("dynamic",              5, 255, "void",         0, False, True,  (111, 74, 0)),
    Label("ground",               6, 255, "void",         0, False, True,  (81, 0, 81)),
    Label("road",                 7,   0, "flat",         1, False, False, (128, 64, 128)),
    Label("sidewalk",             8,   1, "flat",         1, False, False, (244, 35, 232)),
    Label("parking",              9, 255, "flat",         1, False, True,  (250, 170, 160)),
    Label("rail track",          10, 255, "flat",         1, False, True,  (230, 150, 140)),
    Label("building",            11,   2, "construction", 2, False, False, (70, 70, 70)),
    Label("wall",                12,   3, "construction", 2, False, False, (102, 102, 156)),
    Label("fence",               13,   4, "construction", 2, False, False, (190, 153, 153)),
    Label("guard rail",          14, 255, "construction", 2, False, True,  (180, 165, 180)),
    Label("bridge",              15, 255, "construction", 2, False, True,  (150, 100, 100)),
    Label("tunnel",              16, 255, "construction", 2, False, True,  (150, 120, 90)),
    Label("pole",                17,   5, "object",       3, False, False, (153, 153, 153)),
    Label("polegroup",           18, 255, "object",       3, False, True,  (153, 153, 153)),
    Label("traffic light",       19,   6, "object",       3, False, False, (250, 170, 30)),
    Label("traffic sign",        20,   7, "object",       3, False, False, (220, 220, 0)),
    Label("vegetation",          21,   8, "nature",       4, False, False, (107, 142, 35)),
    Label("terrain",             22,   9, "nature",       4, False, False, (152, 251, 152)),
    Label("sky",                 23,  10, "sky",          5, False, False, (70, 130, 180)),
    Label("person",              24,  11, "human",        6, True,  False, (220, 20, 60)),
    Label("rider",               25,  12, "human",        6, True,  False, (255, 0, 0)),
    Label("car",                 26,  13, "vehicle",      7, True,  False, (0, 0, 142)),
    Label("truck",               27,  14, "vehicle",      7, True,  False, (0, 0, 70)),
    Label("bus",                 28,  15, "vehicle",      7, True,  False, (0, 60, 100)),
    Label("caravan",             29, 255, "vehicle",      7, True,  True,  (0, 0, 90)),
    Label("trailer",             30, 255, "vehicle",      7, True,  True,  (0, 0, 110)),
    Label("train",               31,  16, "vehicle",      7, True,  False, (0, 80, 100)),
    Label("motorcycle",          32,  17, "vehicle",      7, True,  False, (0, 0, 230)),
    Label("bicycle",             33,  18, "vehicle",      7, True,  False, (119, 11, 32)),
    Label("license plate",       -1,  -1, "vehicle",      7, False, True,  (0, 0, 142)),
)
# fmt: on

#: The 19 evaluated Cityscapes classes, in train-id order.
CLASSES_19: tuple[str, ...] = tuple(
    label.name for label in sorted((l for l in LABELS if 0 <= l.trainId < 255), key=lambda l: l.trainId)
)
#: The SYNTHIA 16-class protocol: the 19 without terrain, truck and train (docs/data.md §4).
CLASSES_16: tuple[str, ...] = tuple(c for c in CLASSES_19 if c not in ("terrain", "truck", "train"))
#: The SYNTHIA 13-class protocol (mIoU*): the 16 without wall, fence and pole.
CLASSES_13: tuple[str, ...] = tuple(c for c in CLASSES_16 if c not in ("wall", "fence", "pole"))

CLASSES = {19: CLASSES_19, 16: CLASSES_16, 13: CLASSES_13}

#: SYNTHIA-RAND-CITYSCAPES class ids (red channel of GT/LABELS) for the 16 classes, in
#: CLASSES_16 order (docs/data.md §4; ProDA's ``valid_classes``).
SYNTHIA_IDS_16: tuple[int, ...] = (3, 4, 2, 21, 5, 7, 15, 9, 6, 1, 10, 17, 8, 19, 12, 11)
#: SYNTHIA ids of the three classes outside the 16-class protocol (used by the 19-way table).
SYNTHIA_IDS_EXTRA = {"terrain": 16, "truck": 18, "train": 20}

_NAME_TO_LABEL = {label.name: label for label in LABELS}


def class_names(num_classes: int) -> tuple[str, ...]:
    """Class names of the 19-, 16- or 13-class protocol (docs/data.md §4)."""
    if num_classes not in CLASSES:
        raise ValueError(f"num_classes must be one of 19, 16, 13; got {num_classes}")
    return CLASSES[num_classes]


def _lut(pairs: dict[int, int]) -> np.ndarray:
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for src, dst in pairs.items():
        lut[src] = dst
    return lut


def cityscapes_lut(num_classes: int = 19) -> np.ndarray:
    """256-entry table from Cityscapes labelIds (also GTA5 label ids) to train ids.

    With 19 classes this is the official trainId; with 16 or 13 the excluded classes become
    ignore and the rest are renumbered contiguously in protocol order (docs/data.md §4).
    """
    names = class_names(num_classes)
    return _lut({_NAME_TO_LABEL[n].id: i for i, n in enumerate(names)})


def gta5_lut(num_classes: int = 19) -> np.ndarray:
    """GTA5 labels hold Cityscapes labelIds as palette indices: the same table (2.2)."""
    return cityscapes_lut(num_classes)


def synthia_lut(num_classes: int = 16) -> np.ndarray:
    """256-entry table from SYNTHIA class ids to train ids for 16, 13 or 19 classes.

    19 classes map onto the Cityscapes train ids (the ADVENT-family table, docs/data.md §3:
    SYNTHIA's terrain 16, truck 18 and train 20 included); 16 and 13 are contiguous heads in
    protocol order (docs/data.md §4).
    """
    by_name = {**dict(zip(CLASSES_16, SYNTHIA_IDS_16)), **SYNTHIA_IDS_EXTRA}
    names = class_names(num_classes)
    return _lut({by_name[n]: i for i, n in enumerate(names)})


def train_id_to_label_id(num_classes: int = 19) -> np.ndarray:
    """256-entry table from train ids back to Cityscapes labelIds (0 for ignore).

    Used to write predictions in the format the official evaluation reads.
    """
    names = class_names(num_classes)
    table = np.zeros(256, dtype=np.uint8)
    for i, n in enumerate(names):
        table[i] = _NAME_TO_LABEL[n].id
    return table


def palette(num_classes: int = 19) -> np.ndarray:
    """[256, 3] uint8 colours for train ids; ignore and unused entries are black."""
    pal = np.zeros((256, 3), dtype=np.uint8)
    for i, n in enumerate(class_names(num_classes)):
        pal[i] = _NAME_TO_LABEL[n].color
    return pal


def label_id_palette() -> list[int]:
    """A flat 768-value PNG palette indexed by Cityscapes labelId (the GTA5 label files' palette)."""
    pal = np.zeros((256, 3), dtype=np.uint8)
    for label in LABELS:
        if label.id >= 0:
            pal[label.id] = label.color
    return pal.reshape(-1).tolist()


def colorize(label_map, num_classes: int = 19) -> np.ndarray:
    """Cityscapes colours for a train-id map ([H, W] array or tensor) as [H, W, 3] uint8."""
    if isinstance(label_map, torch.Tensor):
        label_map = label_map.detach().cpu().numpy()
    label_map = np.asarray(label_map)
    if label_map.min(initial=0) < 0 or label_map.max(initial=0) > 255:
        raise ValueError("colorize expects train ids in [0, 255]")
    return palette(num_classes)[label_map.astype(np.uint8)]
