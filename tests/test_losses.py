"""Losses: CE, target pseudo-label CE, both distance-loss variants, the total (docs/method.md §5 and §7)."""
import math

import pytest
import torch

from cag.anchors import downsample_labels
from cag.losses import (anchor_distance_loss, cag_loss, segmentation_ce, shrink_by_tens,
                        target_pseudo_label_loss)

IGNORE = 255
LOG2 = math.log(2)


def two_pixel_logits():
    """Logits [1, 2, 1, 2]: pixel 0 = (0, 0) -> p = (1/2, 1/2); pixel 1 = (log 3, 0) -> p = (3/4, 1/4)."""
    return torch.tensor([[[[0.0, math.log(3)]], [[0.0, 0.0]]]], dtype=torch.float64, requires_grad=True)


# --- cross-entropy ---------------------------------------------------------------------------

def test_segmentation_ce_is_a_mean_over_non_ignored_pixels():
    logits = torch.cat([two_pixel_logits().detach(), torch.zeros(1, 2, 1, 1, dtype=torch.float64)], dim=-1)
    labels = torch.tensor([[[0, 0, IGNORE]]])
    expected = (LOG2 + math.log(4 / 3)) / 2
    assert segmentation_ce(logits, labels).item() == pytest.approx(expected)


def test_segmentation_ce_upsamples_bilinearly_with_align_corners():
    # class-0 logits (0, 2) upsampled 2 -> 4 with align_corners=True: 0, 2/3, 4/3, 2 (class 1 stays 0)
    logits = torch.tensor([[[[0.0, 2.0]], [[0.0, 0.0]]]], dtype=torch.float64)
    labels = torch.ones(1, 1, 4, dtype=torch.long)
    expected = sum(math.log(1 + math.exp(x)) for x in (0, 2 / 3, 4 / 3, 2)) / 4
    assert segmentation_ce(logits, labels).item() == pytest.approx(expected)


def test_segmentation_ce_all_ignored_is_a_connected_zero():
    logits = two_pixel_logits()
    loss = segmentation_ce(logits, torch.full((1, 1, 2), IGNORE))
    loss.backward()
    assert loss.item() == 0.0 and loss.requires_grad
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_segmentation_ce_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match=r"\[0, 2\) or 255"):
        segmentation_ce(two_pixel_logits(), torch.tensor([[[0, 2]]]))


def test_target_loss_modes_by_hand():
    anchor_labels = torch.tensor([[[0, IGNORE]]])  # CE = log 2
    prob_labels = torch.tensor([[[1, 1]]])  # CE = (log 2 + log 4) / 2 = 1.5 log 2
    logits = two_pixel_logits()
    assert target_pseudo_label_loss(logits, anchor_labels, prob_labels).item() == pytest.approx(1.25 * LOG2)
    assert target_pseudo_label_loss(logits, anchor_labels, None, mode="anchor").item() == pytest.approx(LOG2)
    assert target_pseudo_label_loss(logits, None, prob_labels, mode="probability").item() == pytest.approx(1.5 * LOG2)


def test_target_loss_with_an_all_ignored_map_keeps_half_weight():
    no_anchor_labels = torch.full((1, 1, 2), IGNORE)
    loss = target_pseudo_label_loss(two_pixel_logits(), no_anchor_labels, torch.tensor([[[1, 1]]]))
    assert loss.item() == pytest.approx(0.75 * LOG2)


def test_target_loss_is_not_upsampled_and_checks_inputs():
    logits = two_pixel_logits()
    with pytest.raises(ValueError, match="logits' resolution"):
        wrong_size = torch.zeros(1, 2, 4, dtype=torch.long)
        target_pseudo_label_loss(logits, wrong_size, torch.zeros(1, 1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="needs prob_labels"):
        target_pseudo_label_loss(logits, torch.zeros(1, 1, 2, dtype=torch.long), None)
    with pytest.raises(ValueError, match="mode"):
        target_pseudo_label_loss(logits, None, None, mode="prob")


# --- faithful distance loss ------------------------------------------------------------------
# One image, 1 x 8 pixels, D = 2. Pixels 0, 1 are class 0 and predicted 0: features (0.5, 1) and
# (0.5, 3), class mean v = (0.5, 2). Pixel 2 is class 1 with feature = anchor 1. Pixels 3..7 ignored.
# SmoothL1(v, a0 = (0, 0)) = mean(0.5 * 0.5^2, 2 - 0.5) = mean(0.125, 1.5) = 0.8125.

def faithful_case(anchor_0=(0.0, 0.0)):
    features = torch.full((1, 2, 1, 8), 9.0, dtype=torch.float64)
    features[0, :, 0, :3] = torch.tensor([[0.5, 0.5, 1.0], [1.0, 3.0, 1.0]], dtype=torch.float64)
    features.requires_grad_(True)
    labels = torch.tensor([[[0, 0, 1] + [IGNORE] * 5]])
    predictions = torch.tensor([[[0, 0, 1] + [0] * 5]])
    anchors = torch.tensor([anchor_0, (1.0, 1.0)], dtype=torch.float64)
    return features, labels, anchors, predictions


def test_faithful_loss_by_hand():
    features, labels, anchors, predictions = faithful_case()
    both_pairs = anchor_distance_loss(features, labels, anchors, predictions, min_pixels=1)
    assert both_pairs.item() == pytest.approx(10 * (0.8125 + 0.0) / 2)
    class_1_too_small = anchor_distance_loss(features, labels, anchors, predictions, min_pixels=2)
    assert class_1_too_small.item() == pytest.approx(10 * 0.8125)


def test_faithful_gradient_is_rescaled_by_twice_the_mask_fraction():
    # dL/dv = 10 * (0.5 / 2, 1 / 2) = (2.5, 5); dv/df_j = 1/2 on the 2 mask pixels;
    # rescale 2 * |mask| / (h w) = 2 * 2 / 8 = 0.5  ->  grad f_0 = grad f_1 = (0.625, 1.25)
    features, labels, anchors, predictions = faithful_case()
    anchor_distance_loss(features, labels, anchors, predictions, min_pixels=2).backward()
    expected = torch.zeros_like(features)
    expected[0, :, 0, 0] = expected[0, :, 0, 1] = torch.tensor([0.625, 1.25], dtype=torch.float64)
    torch.testing.assert_close(features.grad, expected)


def test_losses_above_five_are_divided_by_ten_until_at_most_five():
    shrunk = shrink_by_tens(torch.tensor([50.0, 51.0, 5.0, 0.3, 600.0]))
    torch.testing.assert_close(shrunk, torch.tensor([5.0, 0.51, 5.0, 0.3, 0.6]))


def test_large_distance_is_shrunk_in_value_and_gradient():
    # a0 = (0, -100): SmoothL1 = mean(0.125, 101.5) = 50.8125 -> 5.08125 -> 0.508125; L = 5.08125
    features, labels, anchors, predictions = faithful_case(anchor_0=(0.0, -100.0))
    loss = anchor_distance_loss(features, labels, anchors, predictions, min_pixels=2)
    assert loss.item() == pytest.approx(5.08125)
    loss.backward()
    torch.testing.assert_close(features.grad[0, :, 0, 0], torch.tensor([0.00625, 0.0125], dtype=torch.float64))


def test_faithful_loss_counts_only_pixels_the_student_gets_right():
    features, labels, anchors, _ = faithful_case()
    all_wrong = torch.where(labels == 0, 1, 0)
    loss = anchor_distance_loss(features, labels, anchors, all_wrong, min_pixels=1)
    loss.backward()
    assert loss.item() == 0.0 and loss.requires_grad
    assert not features.grad.isnan().any() and features.grad.abs().sum() == 0


def test_faithful_loss_needs_predictions():
    features, labels, anchors, _ = faithful_case()
    with pytest.raises(ValueError, match="predictions"):
        anchor_distance_loss(features, labels, anchors)


def test_faithful_gradcheck_where_the_rescale_is_one():
    # every kept mask covers 2 of 4 pixels, so 2 |mask| / (h w) = 1 and autograd is the true derivative
    generator = torch.Generator().manual_seed(0)
    features = torch.rand(2, 3, 2, 2, generator=generator, dtype=torch.float64, requires_grad=True)
    anchors = torch.rand(2, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[[0, 0], [1, 1]], [[1, 0], [1, 0]]])
    assert torch.autograd.gradcheck(
        lambda f, a: anchor_distance_loss(f, labels, a, labels, min_pixels=1), (features, anchors))


def test_faithful_gradcheck_on_anchors_whatever_the_rescale():
    features, labels, anchors, predictions = faithful_case()
    anchors.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a: anchor_distance_loss(features.detach(), labels, a, predictions, min_pixels=1), (anchors,))


# --- pixel-level L2 (the paper's reading) ----------------------------------------------------

def test_pixel_l2_by_hand():
    # pixel 0: (3, 4) vs a0 = (0, 0) -> 5; pixel 1: (1, 1) vs a1 = (1, 1) -> 0; pixel 2 ignored
    features = torch.tensor([[[[3.0, 1.0, 100.0]], [[4.0, 1.0, 100.0]]]], dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[[0, 1, IGNORE]]])
    anchors = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    loss = anchor_distance_loss(features, labels, anchors, variant="pixel_l2")
    assert loss.item() == pytest.approx(2.5)
    loss.backward()
    expected = torch.zeros_like(features)
    expected[0, :, 0, 0] = torch.tensor([0.3, 0.4], dtype=torch.float64)  # (3/5, 4/5) / 2 pixels
    torch.testing.assert_close(features.grad, expected)  # zero, not NaN, at distance 0


def test_pixel_l2_gradcheck():
    generator = torch.Generator().manual_seed(1)
    features = torch.rand(2, 3, 2, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    anchors = torch.rand(3, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[[0, 1, 2], [IGNORE, 0, 1]], [[2, 2, IGNORE], [1, 0, 0]]])
    assert torch.autograd.gradcheck(
        lambda f, a: anchor_distance_loss(f, labels, a, variant="pixel_l2"), (features, anchors))


def test_pixel_l2_all_ignored_is_a_connected_zero():
    features = torch.rand(1, 2, 2, 2, requires_grad=True)
    loss = anchor_distance_loss(features, torch.full((1, 2, 2), IGNORE), torch.rand(2, 2), variant="pixel_l2")
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(features.grad, torch.zeros_like(features))


def test_unknown_variant_is_refused():
    features, labels, anchors, predictions = faithful_case()
    with pytest.raises(ValueError, match="variant"):
        anchor_distance_loss(features, labels, anchors, predictions, variant="l2")


# --- the total objective ---------------------------------------------------------------------

def cag_inputs(seed=0, ignore_everything=False):
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).requires_grad_(True)

    def labels(*shape):
        values = torch.randint(0, 3, shape, generator=generator)
        return torch.full_like(values, IGNORE) if ignore_everything else values

    return dict(src_logits=rand(2, 3, 4, 4), src_labels=labels(2, 8, 8), src_features=rand(2, 5, 4, 4),
                tgt_logits=rand(2, 3, 4, 4), tgt_features=rand(2, 5, 4, 4),
                anchors=torch.randn(3, 5, generator=generator, dtype=torch.float64),
                anchor_labels=labels(2, 4, 4), prob_labels=labels(2, 4, 4))


def test_cag_loss_components_and_total():
    inputs = cag_inputs()
    parts = cag_loss(**inputs, lam=0.5, min_pixels=1)
    ce_source = segmentation_ce(inputs["src_logits"], inputs["src_labels"])
    ce_target = target_pseudo_label_loss(inputs["tgt_logits"], inputs["anchor_labels"], inputs["prob_labels"])
    dist_source = anchor_distance_loss(inputs["src_features"], downsample_labels(inputs["src_labels"], (4, 4)),
                                       inputs["anchors"], inputs["src_logits"].argmax(1), min_pixels=1)
    dist_target = anchor_distance_loss(inputs["tgt_features"], inputs["anchor_labels"], inputs["anchors"],
                                       inputs["tgt_logits"].argmax(1), min_pixels=1)
    for key, value in dict(ce_source=ce_source, ce_target=ce_target, dist_source=dist_source,
                           dist_target=dist_target).items():
        torch.testing.assert_close(parts[key], value)
    assert dist_source.item() > 0 and dist_target.item() > 0
    torch.testing.assert_close(parts["total"], ce_source + ce_target + 0.5 * (dist_source + dist_target))


def test_cag_loss_never_nan_when_everything_is_ignored():
    inputs = cag_inputs(ignore_everything=True)
    parts = cag_loss(**inputs)
    parts["total"].backward()
    assert all(value.item() == 0.0 for value in parts.values())
    for name in ("src_logits", "src_features", "tgt_logits", "tgt_features"):
        assert inputs[name].grad is not None and torch.isfinite(inputs[name].grad).all()


def test_cag_loss_needs_logits_and_features_at_the_same_stride():
    inputs = cag_inputs()
    inputs["src_features"] = torch.rand(2, 5, 2, 2)
    with pytest.raises(ValueError, match="src_logits"):
        cag_loss(**inputs)
