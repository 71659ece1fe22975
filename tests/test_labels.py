"""The label table and the id -> train-id lookup tables (docs/data.md §4).

Expected values are written out by hand from the tables in the reference documents, not
derived from ``cag.labels`` itself.
"""
import numpy as np
import pytest
import torch

from cag import labels
from cag.labels import IGNORE_INDEX

# Cityscapes labelId -> trainId (docs/data.md §4; AdaptSegNet, ADVENT, ProDA, CAG agree).
CITYSCAPES_19 = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
                 23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
# 16 classes: terrain (22), truck (27), train (31) ignored, the rest contiguous.
CITYSCAPES_16 = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8,
                 23: 9, 24: 10, 25: 11, 26: 12, 28: 13, 32: 14, 33: 15}
# 13 classes: also wall (12), fence (13), pole (17) ignored.
CITYSCAPES_13 = {7: 0, 8: 1, 11: 2, 19: 3, 20: 4, 21: 5,
                 23: 6, 24: 7, 25: 8, 26: 9, 28: 10, 32: 11, 33: 12}
# SYNTHIA README ids (docs/data.md §3) in ProDA's valid_classes order (docs/data.md §4).
SYNTHIA_16 = {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8,
              1: 9, 10: 10, 17: 11, 8: 12, 19: 13, 12: 14, 11: 15}
SYNTHIA_13 = {3: 0, 4: 1, 2: 2, 15: 3, 9: 4, 6: 5, 1: 6, 10: 7, 17: 8, 8: 9, 19: 10, 12: 11, 11: 12}
# The ADVENT-family 19-way mapping onto Cityscapes train ids (docs/data.md §3).
SYNTHIA_19 = {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9, 1: 10,
              10: 11, 17: 12, 8: 13, 18: 14, 19: 15, 20: 16, 12: 17, 11: 18}


def expected_lut(pairs):
    return [pairs.get(i, IGNORE_INDEX) for i in range(256)]


def test_table_equals_cityscapesscripts_field_by_field():
    official = pytest.importorskip("cityscapesscripts.helpers.labels", reason="test extra: cityscapesscripts")
    assert labels.Label._fields == official.Label._fields
    assert len(labels.LABELS) == len(official.labels) == 35
    for ours, theirs in zip(labels.LABELS, official.labels):
        for field in official.Label._fields:
            theirs_value = tuple(theirs.color) if field == "color" else getattr(theirs, field)
            assert getattr(ours, field) == theirs_value, f"{theirs.name}.{field}"


@pytest.mark.parametrize(
    "lut, pairs",
    [
        (labels.cityscapes_lut(19), CITYSCAPES_19),
        (labels.cityscapes_lut(16), CITYSCAPES_16),
        (labels.cityscapes_lut(13), CITYSCAPES_13),
        (labels.gta5_lut(19), CITYSCAPES_19),
        (labels.synthia_lut(16), SYNTHIA_16),
        (labels.synthia_lut(13), SYNTHIA_13),
    ],
    ids=["cityscapes19", "cityscapes16", "cityscapes13", "gta5", "synthia16", "synthia13"],
)
def test_lut_maps_all_256_ids(lut, pairs):
    assert lut.shape == (256,) and lut.dtype == np.uint8
    assert lut.tolist() == expected_lut(pairs)


def test_synthia_lut_19_follows_the_advent_mapping():
    assert labels.synthia_lut(19).tolist() == expected_lut(SYNTHIA_19)


def test_synthia_lut_19_maps_the_16_shared_classes_onto_cityscapes_train_ids():
    shared = {k: v for k, v in SYNTHIA_19.items() if k not in (16, 18, 20)}
    lut = labels.synthia_lut(19)
    assert [lut[i] for i in sorted(shared)] == [shared[i] for i in sorted(shared)]
    assert [lut[i] for i in (0, 13, 14, 22, 23, 255)] == [IGNORE_INDEX] * 6


@pytest.mark.parametrize(
    "lut, spot_checks",
    [
        (labels.cityscapes_lut(19), {7: 0, 8: 1, 26: 13, 33: 18, 34: 255, 0: 255, 255: 255, -1 % 256: 255}),
        (labels.cityscapes_lut(16), {22: 255, 23: 9, 27: 255, 28: 13, 31: 255, 33: 15}),
        (labels.synthia_lut(16), {3: 0, 4: 1, 21: 3, 12: 14, 0: 255, 22: 255}),
    ],
    ids=["cityscapes19", "cityscapes16", "synthia16"],
)
def test_lut_spot_checks_from_the_brief(lut, spot_checks):
    assert {k: int(lut[k]) for k in spot_checks} == spot_checks


@pytest.mark.parametrize("n", [19, 16, 13])
def test_train_id_to_label_id_inverts_the_cityscapes_lut(n):
    to_label = labels.train_id_to_label_id(n)
    lut = labels.cityscapes_lut(n)
    assert [int(lut[to_label[t]]) for t in range(n)] == list(range(n))
    assert to_label[IGNORE_INDEX] == 0  # "unlabeled": ignored by the official evaluation


def test_train_id_to_label_id_hand_values():
    assert labels.train_id_to_label_id(19)[[0, 9, 13, 18]].tolist() == [7, 22, 26, 33]
    assert labels.train_id_to_label_id(16)[[9, 13, 15]].tolist() == [23, 28, 33]
    assert labels.train_id_to_label_id(13)[[3, 12]].tolist() == [19, 33]


def test_class_names_follow_the_protocols():
    assert labels.class_names(19)[:3] == ("road", "sidewalk", "building")
    assert labels.class_names(19)[-1] == "bicycle" and len(labels.class_names(19)) == 19
    assert "terrain" not in labels.class_names(16) and len(labels.class_names(16)) == 16
    assert labels.class_names(16)[9] == "sky"
    assert labels.class_names(13) == (
        "road", "sidewalk", "building", "traffic light", "traffic sign", "vegetation", "sky",
        "person", "rider", "car", "bus", "motorcycle", "bicycle",
    )
    with pytest.raises(ValueError, match="19, 16, 13"):
        labels.class_names(17)


def test_colorize_uses_cityscapes_colours():
    label_map = torch.tensor([[0, 10], [13, IGNORE_INDEX]])
    rgb = labels.colorize(label_map)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 2, 3)
    assert rgb.tolist() == [[[128, 64, 128], [70, 130, 180]], [[0, 0, 142], [0, 0, 0]]]
    assert labels.colorize(np.array([[9]]), num_classes=16).tolist() == [[[70, 130, 180]]]  # 16-class sky


def test_label_id_palette_colours_gta5_palette_indices():
    pal = np.array(labels.label_id_palette()).reshape(256, 3)
    assert pal[7].tolist() == [128, 64, 128] and pal[26].tolist() == [0, 0, 142] and pal[0].tolist() == [0, 0, 0]
