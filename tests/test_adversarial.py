"""The warm-up's adversarial objectives (cag.adversarial) against hand-derived values.

Label convention (AdaptSegNet, kept by the released code): source = 0, target = 1. The
segmentation network's term pushes target outputs towards the *source* label; the
discriminator's term labels source outputs 0 and target outputs 1. The discriminators here
return logits known exactly (a real ``FCDiscriminator`` whose weights are zero and whose last
bias is a chosen constant, or a stub that echoes a channel of its input), so every loss value
is written down by hand:

- BCE with logits: loss(z, label 0) = softplus(z) = log(1 + e^z); loss(z, 1) = softplus(-z).
- LSGAN: loss(z, label) = (z - label)^2.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from cag.adversarial import (SOURCE_LABEL, TARGET_LABEL, FCDiscriminator, discriminator_loss,
                             generator_adversarial_loss)

LOG3 = math.log(3.0)


def constant_discriminator(num_classes: int, logit: float) -> FCDiscriminator:
    """A real FCDiscriminator whose output is ``logit`` at every patch: all weights and biases
    0 (LeakyReLU(0) = 0) except the classifier's bias."""
    disc = FCDiscriminator(num_classes, channels=4)
    with torch.no_grad():
        for p in disc.parameters():
            p.zero_()
        disc.net[-1].bias.fill_(logit)
    return disc


class EchoDiscriminator(nn.Module):
    """Returns channel 0 of its input as the domain logit, so source and target inputs can be
    given different, known logits."""

    def forward(self, probs):
        return probs[:, :1]


def test_label_constants_are_source_zero_target_one():
    """Guards against swapping the released convention (source 0, target 1)."""
    assert (SOURCE_LABEL, TARGET_LABEL) == (0.0, 1.0)


def test_fc_discriminator_downsamples_by_32_to_one_logit_per_patch():
    disc = FCDiscriminator(3, channels=4)
    assert disc(torch.rand(2, 3, 64, 96)).shape == (2, 1, 2, 3)


def test_generator_bce_pushes_target_towards_the_source_label():
    """Guards against the generator's label flipped to target (or 1).

    D says logit log 3 (sigmoid = 3/4, "target" with probability 3/4) on the target outputs.
    The generator's loss is BCE against the source label 0: softplus(log 3) = log(1 + 3) = log 4;
    with the label flipped it would be softplus(-log 3) = log(4/3).
    """
    disc = constant_discriminator(3, LOG3)
    probs = torch.full((2, 3, 32, 32), 1 / 3, requires_grad=True)
    loss = generator_adversarial_loss(disc, probs, gan="bce")
    assert loss.item() == pytest.approx(math.log(4.0), rel=1e-6)
    # the loss reaches the segmentation network's output (the generator is trained through it)
    loss.backward()
    assert probs.grad is not None


def test_generator_bce_gradient_lowers_the_target_logit():
    """Guards against the generator's label flipped: d loss / d logit = sigmoid(z) - label,
    which is +3/4 at z = log 3 for the source label 0 (descent lowers D's "target" logit);
    the flipped label would give -1/4."""
    logit = torch.full((1, 1, 2, 2), LOG3, requires_grad=True)

    class Passthrough(nn.Module):
        def forward(self, probs):
            return logit.expand(probs.shape[0], 1, 2, 2)

    generator_adversarial_loss(Passthrough(), torch.zeros(1, 3, 8, 8), gan="bce").backward()
    # mean over 4 patches: each patch gets (3/4) / 4
    assert logit.grad.flatten().tolist() == pytest.approx([0.75 / 4] * 4, rel=1e-6)


def test_generator_lsgan_targets_the_source_label():
    """Guards against the LSGAN generator's label flipped: logit 0.25 everywhere gives
    (0.25 - 0)^2 = 0.0625 for the source label; flipped, (0.25 - 1)^2 = 0.5625."""
    disc = constant_discriminator(3, 0.25)
    loss = generator_adversarial_loss(disc, torch.full((1, 3, 32, 64), 1 / 3), gan="lsgan")
    assert loss.item() == pytest.approx(0.0625, rel=1e-6)


def test_discriminator_bce_labels_source_zero_and_target_one():
    """Guards against the discriminator's labels swapped or made equal.

    Source logit log 3: BCE against 0 = softplus(log 3) = log 4. Target logit log 7: BCE
    against 1 = softplus(-log 7) = log(8/7). Loss = (log 4 + log(8/7)) / 2 = log(32/7) / 2.
    Swapped: (log(4/3) + log 8) / 2; both source: (log 4 + log 8) / 2; both target:
    (log(4/3) + log(8/7)) / 2, all different.
    """
    source = torch.zeros(2, 3, 4, 4)
    source[:, 0] = LOG3
    target = torch.zeros(2, 3, 4, 4)
    target[:, 0] = math.log(7.0)
    loss = discriminator_loss(EchoDiscriminator(), source, target, gan="bce")
    assert loss.item() == pytest.approx(0.5 * math.log(32 / 7), rel=1e-6)


def test_discriminator_lsgan_labels_source_zero_and_target_one():
    """Guards against the LSGAN discriminator's labels swapped or made equal.

    Source logit 0.25, target logit 0.75: ((0.25 - 0)^2 + (0.75 - 1)^2) / 2 = 0.0625.
    Swapped: ((0.25 - 1)^2 + (0.75 - 0)^2) / 2 = 0.5625; equal labels: 0.3125.
    """
    source = torch.zeros(1, 3, 4, 4)
    source[:, 0] = 0.25
    target = torch.zeros(1, 3, 4, 4)
    target[:, 0] = 0.75
    loss = discriminator_loss(EchoDiscriminator(), source, target, gan="lsgan")
    assert loss.item() == pytest.approx(0.0625, rel=1e-6)


def test_discriminator_loss_does_not_reach_the_segmentation_outputs():
    """D's update must not train the segmentation network: the probabilities are detached,
    while D's own parameters get a gradient."""
    disc = constant_discriminator(3, LOG3)
    source = torch.full((1, 3, 32, 32), 1 / 3, requires_grad=True)
    target = torch.full((1, 3, 32, 32), 1 / 3, requires_grad=True)
    loss = discriminator_loss(disc, source, target)
    # both halves see logit log 3: (softplus(log 3) + softplus(-log 3)) / 2 = (log 4 + log(4/3)) / 2
    assert loss.item() == pytest.approx(0.5 * math.log(16 / 3), rel=1e-6)
    loss.backward()
    assert source.grad is None and target.grad is None
    # d loss / d bias = mean over patches of (sigmoid(z) - label) / 2 summed over halves = (3/4 + (3/4 - 1)) / 2
    assert disc.net[-1].bias.grad.item() == pytest.approx(0.25, rel=1e-6)
