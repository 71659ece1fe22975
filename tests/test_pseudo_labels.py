"""ATI and PLA: anchor distances, the delta_d rule, probability pseudo-labels, quality (docs/method.md §3)."""
import math

import pytest
import torch

from cag.pseudo_labels import (anchor_distances, anchor_gaps, anchor_pseudo_labels, nearest_anchor_margin,
                               probability_pseudo_labels, pseudo_label_quality, quality_rates,
                               smallest_anchor_gap)

IGNORE = 255

# Two anchors on the x axis and four pixels on it (all values exact in binary):
#   pixel x:   1.0    -1.0    0.75   4.5
#   d0 = |x|:  1.0     1.0    0.75   4.5
#   d1=|x-4|:  3.0     5.0    3.25   0.5
#   margin:    2.0     4.0    2.5    4.0     nearest: 0, 0, 0, 1
ANCHORS = torch.tensor([[0.0, 0.0], [4.0, 0.0]])
PIXEL_X = [1.0, -1.0, 0.75, 4.5]


def line_features():
    features = torch.zeros(1, 2, 1, 4)
    features[0, 0, 0] = torch.tensor(PIXEL_X)
    return features


def test_distances_are_euclidean_not_squared():
    features = torch.zeros(1, 2, 1, 1)
    anchors = torch.tensor([[1.0, 0.0], [0.0, 3.5], [3.0, 4.0]])
    assert anchor_distances(features, anchors).flatten().tolist() == [1.0, 3.5, 5.0]


def test_distances_match_brute_force_on_arbitrary_size():
    generator = torch.Generator().manual_seed(0)
    features = torch.rand(2, 8, 3, 5, generator=generator)
    anchors = torch.rand(3, 8, generator=generator)
    expected = (features[:, None] - anchors[None, :, :, None, None]).norm(dim=2)
    distances = anchor_distances(features, anchors)
    assert distances.shape == (2, 3, 3, 5)
    torch.testing.assert_close(distances, expected)


def test_distances_of_bf16_features_are_float32():
    features = line_features().bfloat16()
    distances = anchor_distances(features, ANCHORS)
    assert distances.dtype == torch.float32
    assert distances[0, :, 0].tolist() == [[1.0, 1.0, 0.75, 4.5], [3.0, 5.0, 3.25, 0.5]]


def test_distances_reject_mismatched_dims():
    with pytest.raises(ValueError, match="same D"):
        anchor_distances(torch.zeros(1, 3, 2, 2), torch.zeros(2, 4))


def test_margin_is_second_nearest_minus_nearest():
    nearest, margin = nearest_anchor_margin(anchor_distances(line_features(), ANCHORS))
    assert nearest.tolist() == [[[0, 0, 0, 1]]]
    assert margin.tolist() == [[[2.0, 4.0, 2.5, 4.0]]]


def test_margin_exactly_delta_d_is_active():
    labels = anchor_pseudo_labels(line_features(), ANCHORS, delta_d=2.5)
    assert labels.tolist() == [[[IGNORE, 0, 0, 1]]]
    assert labels.dtype == torch.long


def test_margin_below_delta_d_is_ignored():
    assert anchor_pseudo_labels(line_features(), ANCHORS, delta_d=2.75).tolist() == [[[IGNORE, 0, IGNORE, 1]]]


def test_per_class_delta_d_is_indexed_by_the_nearest_class():
    strict_for_class_0 = anchor_pseudo_labels(line_features(), ANCHORS, delta_d=torch.tensor([5.0, 2.5]))
    assert strict_for_class_0.tolist() == [[[IGNORE, IGNORE, IGNORE, 1]]]
    strict_for_class_1 = anchor_pseudo_labels(line_features(), ANCHORS, delta_d=torch.tensor([2.5, 4.5]))
    assert strict_for_class_1.tolist() == [[[IGNORE, 0, 0, IGNORE]]]


def test_per_class_delta_d_must_have_one_value_per_class():
    with pytest.raises(ValueError, match="delta_d"):
        anchor_pseudo_labels(line_features(), ANCHORS, delta_d=torch.tensor([1.0, 2.0, 3.0]))


def test_custom_ignore_index():
    assert anchor_pseudo_labels(line_features(), ANCHORS, ignore_index=250).tolist() == [[[250, 0, 0, 1]]]


def test_single_anchor_makes_every_pixel_active():
    labels = anchor_pseudo_labels(torch.rand(2, 3, 2, 3), torch.rand(1, 3), delta_d=1e6)
    assert labels.tolist() == torch.zeros(2, 2, 3, dtype=torch.long).tolist()


def test_anchor_pseudo_labels_on_arbitrary_size_match_a_sorting_oracle():
    generator = torch.Generator().manual_seed(1)
    features = torch.rand(2, 4, 5, 7, generator=generator)
    anchors = torch.rand(3, 4, generator=generator)
    delta_d = 0.1
    labels = anchor_pseudo_labels(features, anchors, delta_d=delta_d)
    assert labels.shape == (2, 5, 7)
    for b in range(2):
        for i in range(5):
            for j in range(7):
                distances = sorted((math.dist(features[b, :, i, j].tolist(), a.tolist()), c)
                                   for c, a in enumerate(anchors))
                active = distances[1][0] - distances[0][0] >= delta_d
                assert labels[b, i, j].item() == (distances[0][1] if active else IGNORE)
    assert (labels == IGNORE).any() and (labels != IGNORE).any()


def test_anchor_gaps_by_hand():
    # anchors (0,0), (3,0), (3,4), (10,0): gaps 3, 3, 4, 7; without anchor 1: 5, inf, 5, sqrt(65)
    anchors = torch.tensor([[0.0, 0.0], [3.0, 0.0], [3.0, 4.0], [10.0, 0.0]])
    assert anchor_gaps(anchors).tolist() == [3.0, 3.0, 4.0, 7.0]
    valid = torch.tensor([True, False, True, True])
    assert anchor_gaps(anchors, valid).tolist() == pytest.approx([5.0, math.inf, 5.0, math.sqrt(65)], rel=1e-12)
    assert anchor_gaps(anchors, torch.tensor([False, False, True, False])).tolist() == [math.inf] * 4
    # the smallest gap and its pair: 3 between 0 and 1 (lowest index first); without anchor 1,
    # 5 between 0 and 2 (anchor 1, 3 from anchor 0, is not a neighbour when it is invalid)
    assert smallest_anchor_gap(anchors) == (3.0, (0, 1))
    assert smallest_anchor_gap(anchors, valid) == (pytest.approx(5.0, rel=1e-12), (0, 2))
    assert smallest_anchor_gap(anchors[[3, 2]]) == (pytest.approx(math.sqrt(65), rel=1e-12), (0, 1))
    with pytest.raises(ValueError, match="at least two"):
        smallest_anchor_gap(anchors, torch.tensor([False, False, True, False]))


def test_no_margin_exceeds_the_gap_of_its_nearest_anchor():
    """The triangle inequality (docs/method.md §3): margin <= gap of the nearest anchor, reached
    by a pixel on the anchor itself; a delta_d above a class's gap leaves it no active pixel."""
    generator = torch.Generator().manual_seed(3)
    anchors = torch.rand(5, 8, generator=generator) * 4
    features = torch.cat([torch.rand(1, 8, 1, 400, generator=generator) * 4,
                          anchors.T[None, :, None, :]], dim=3)  # the last 5 pixels sit on the anchors
    nearest, margin = nearest_anchor_margin(anchor_distances(features, anchors))
    bound = anchor_gaps(anchors).float()[nearest]
    assert (margin <= bound + 1e-5).all() and (margin < bound - 1e-3).any()
    assert torch.allclose(margin[0, 0, -5:], anchor_gaps(anchors).float(), atol=1e-5)
    gaps = anchor_gaps(anchors)
    closest = int(gaps.argmin())
    labels = anchor_pseudo_labels(features, anchors, delta_d=float(gaps[closest]) * 1.0001)
    assert not (labels == closest).any() and (labels == int(gaps.argmax())).any()


def logits_from_probabilities(rows):
    """Logits [1, C, 1, N] whose softmax at pixel n is rows[n]."""
    return torch.tensor(rows).log().T[None, :, None, :]


def test_probability_pseudo_labels_threshold():
    logits = logits_from_probabilities([[0.96, 0.04], [0.5, 0.5], [0.03, 0.97]])
    assert probability_pseudo_labels(logits).tolist() == [[[0, IGNORE, 1]]]


def test_probability_threshold_is_strict():
    equal_logits = torch.zeros(1, 2, 1, 1)  # softmax exactly 0.5, 0.5
    assert probability_pseudo_labels(equal_logits, threshold=0.5).tolist() == [[[IGNORE]]]


def test_probability_pseudo_labels_per_class_threshold():
    logits = logits_from_probabilities([[0.96, 0.04], [0.5, 0.5], [0.03, 0.97]])
    labels = probability_pseudo_labels(logits, threshold=torch.tensor([0.97, 0.9]))
    assert labels.tolist() == [[[IGNORE, IGNORE, 1]]]


def test_low_thresholds_pick_the_most_probable_passing_class():
    logits = logits_from_probabilities([[0.45, 0.55]])
    assert probability_pseudo_labels(logits, threshold=torch.tensor([0.4, 0.5])).tolist() == [[[1]]]
    assert probability_pseudo_labels(logits, threshold=torch.tensor([0.4, 0.6])).tolist() == [[[0]]]


# --- quality ---------------------------------------------------------------------------------

PSEUDO = torch.tensor([[[0, 0, 1, IGNORE, 1, 0]]])
TARGET = torch.tensor([[[0, 1, 1, 1, IGNORE, 0]]])


def test_quality_counts_and_rates_by_hand():
    # evaluated (target valid): pixels 0, 1, 2, 3, 5 -> pseudo [0, 0, 1, -, 0], target [0, 1, 1, 1, 0]
    quality = pseudo_label_quality(PSEUDO, TARGET, num_classes=2)
    assert quality["correct"].tolist() == [2, 1]
    assert quality["assigned"].tolist() == [3, 1]
    assert quality["ground_truth"].tolist() == [2, 3]
    assert quality["labelled"].tolist() == [2, 2]  # class 1: pixel 2 right, pixel 1 wrongly labelled 0
    assert (quality["active"].item(), quality["evaluated"].item()) == (4, 5)
    assert quality["precision"].tolist() == pytest.approx([2 / 3, 1.0])
    assert quality["recall"].tolist() == pytest.approx([1.0, 1 / 3])
    assert quality["coverage"].tolist() == pytest.approx([1.0, 2 / 3])
    assert quality["active_fraction"].item() == pytest.approx(0.8)


def test_quality_rate_of_an_unassigned_class_is_nan():
    quality = pseudo_label_quality(PSEUDO, TARGET, num_classes=3)
    assert math.isnan(quality["precision"][2].item()) and math.isnan(quality["recall"][2].item())


def test_quality_counts_sum_over_batches():
    halves = [pseudo_label_quality(PSEUDO[..., s], TARGET[..., s], 2) for s in (slice(0, 3), slice(3, 6))]
    summed = {k: halves[0][k] + halves[1][k] for k in ("correct", "assigned", "ground_truth", "labelled", "active", "evaluated")}
    whole = pseudo_label_quality(PSEUDO, TARGET, 2)
    for key, value in quality_rates(summed).items():
        torch.testing.assert_close(value, whole[key])


def test_quality_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match="pseudo"):
        pseudo_label_quality(torch.tensor([[[5]]]), torch.tensor([[[0]]]), 2)
