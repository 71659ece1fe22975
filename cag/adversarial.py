"""The warm-up's global output-space alignment (method-spec sections 5 and 9; a reconstruction).

The authors never released their warm-up (CAG_UDA issues #9, #11). Their code keeps an
AdaptSegNet-style ``FCDiscriminator`` and a BCE loss with source label 0 and target label 1,
and ProDA, which says it borrowed the warm-up from CAG_UDA, discriminates the softmax of the
segmentation output with lambda_adv = 0.01. This module rebuilds that: a patch discriminator
on class probabilities and the two adversarial objectives.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

SOURCE_LABEL = 0.0
TARGET_LABEL = 1.0


class FCDiscriminator(nn.Module):
    """Four 4x4 stride-2 convolutions with LeakyReLU(0.2) and a 1-channel patch classifier.

    AdaptSegNet's output-space discriminator (method-spec section 5, "Leftovers in the code").
    Input: class probabilities [B, C, H, W]; output: per-patch domain logits [B, 1, h, w].
    """

    def __init__(self, num_classes: int, channels: int = 64):
        super().__init__()
        widths = [num_classes, channels, channels * 2, channels * 4, channels * 8]
        layers: list[nn.Module] = []
        for cin, cout in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(cin, cout, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
        layers.append(nn.Conv2d(widths[-1], 1, 4, stride=2, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        return self.net(probs)


def _domain_loss(logits: torch.Tensor, label: float, gan: str) -> torch.Tensor:
    target = torch.full_like(logits, label)
    if gan == "lsgan":
        return F.mse_loss(logits, target)
    return F.binary_cross_entropy_with_logits(logits, target)


def generator_adversarial_loss(disc: nn.Module, target_probs: torch.Tensor, gan: str = "bce") -> torch.Tensor:
    """The segmentation network's term: make target outputs look like source outputs to D."""
    return _domain_loss(disc(target_probs), SOURCE_LABEL, gan)


def discriminator_loss(disc: nn.Module, source_probs: torch.Tensor, target_probs: torch.Tensor, gan: str = "bce") -> torch.Tensor:
    """D's term: source outputs labelled 0, target outputs 1 (gradients stop at the network)."""
    return 0.5 * (_domain_loss(disc(source_probs.detach()), SOURCE_LABEL, gan)
                  + _domain_loss(disc(target_probs.detach()), TARGET_LABEL, gan))
