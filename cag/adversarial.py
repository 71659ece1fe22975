"""The warm-up's global output-space alignment (docs/method.md §6; a reconstruction).

The authors never released their warm-up (docs/method.md §6: ``RogerZhangzz/CAG_UDA#7``,
``RogerZhangzz/CAG_UDA#11``). Their code keeps an
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

    AdaptSegNet's output-space discriminator (docs/method.md §6).
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

    def patch_count(self, shape) -> int:
        """The number of patch logits ``forward`` returns for an input of ``shape`` [B, C, H, W],
        from the convolutions' arithmetic, without running them: what the domain losses average over."""
        batch, _, height, width = shape
        for layer in self.net:
            if isinstance(layer, nn.Conv2d):
                height, width = (
                    (size + 2 * pad - dil * (k - 1) - 1) // stride + 1
                    for size, pad, dil, k, stride in zip((height, width), layer.padding, layer.dilation,
                                                         layer.kernel_size, layer.stride))
        return batch * layer.out_channels * height * width


def _domain_loss(logits: torch.Tensor, label: float, gan: str, denominator=None) -> torch.Tensor:
    target = torch.full_like(logits, label)
    if gan == "lsgan":
        loss = F.mse_loss(logits, target)
    else:
        loss = F.binary_cross_entropy_with_logits(logits, target)
    if denominator is None:
        return loss
    # mean x (patches / denominator): the patch sum over the denominator, and exactly the mean
    # when the denominator is this call's own patch count
    return loss * (torch.tensor(float(logits.numel()), device=loss.device, dtype=loss.dtype)
                   / torch.as_tensor(denominator, device=loss.device).to(loss.dtype))


def generator_adversarial_loss(disc: nn.Module, target_probs: torch.Tensor, gan: str = "bce",
                               denominator=None) -> torch.Tensor:
    """The segmentation network's term: make target outputs look like source outputs to D.

    A mean over D's patch logits; with ``denominator``, their sum divided by it instead (global
    normalisation, :func:`cag.distributed.global_denominators`).
    """
    return _domain_loss(disc(target_probs), SOURCE_LABEL, gan, denominator)


def discriminator_loss(disc: nn.Module, source_probs: torch.Tensor, target_probs: torch.Tensor, gan: str = "bce",
                       denominators: tuple | None = None) -> torch.Tensor:
    """D's term: source outputs labelled 0, target outputs 1 (gradients stop at the network).

    Half the source mean plus half the target mean over patches; ``denominators`` (source,
    target) replace the two patch counts.
    """
    den_s, den_t = denominators if denominators is not None else (None, None)
    return 0.5 * (_domain_loss(disc(source_probs.detach()), SOURCE_LABEL, gan, den_s)
                  + _domain_loss(disc(target_probs.detach()), TARGET_LABEL, gan, den_t))
