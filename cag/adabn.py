"""AdaBN: a trained network's BatchNorm statistics re-estimated on the target domain.

AdaBN (Li, Wang, Shi, Liu, Hou, "Revisiting Batch Normalization For Practical Domain
Adaptation", arXiv 1603.04779) keeps every weight of a source-trained network and replaces the
running mean and variance of each BatchNorm layer by the statistics of target images. It trains
nothing and reads no target label, so it is the control that tells how much of a domain shift
normalisation statistics alone undo: an adaptation method is worth its cost only by what it adds
beyond it.
"""
from __future__ import annotations

import itertools

import torch
from torch import nn

_BATCHNORM = nn.modules.batchnorm._BatchNorm


def batchnorm_layers(model: nn.Module) -> list[nn.Module]:
    """Every BatchNorm layer of ``model`` (1-d, 2-d, 3-d and synchronised ones)."""
    return [m for m in model.modules() if isinstance(m, _BATCHNORM)]


@torch.no_grad()
def adapt_batchnorm(model: nn.Module, images, device=None) -> nn.Module:
    """Re-estimate every BatchNorm layer's running mean and variance on ``images`` (AdaBN).

    ``images`` is an iterable of image batches ``[B, 3, H, W]`` (or of ``(images, ...)`` tuples,
    as a DataLoader of a labelled dataset yields; the labels are never read). The statistics are
    reset, then accumulated as the plain average over the batches (``momentum=None``): with
    batches of equal size the mean is that of all the images' activations and the variance the
    average of the batches' variances (PyTorch's cumulative BatchNorm statistics); the order of
    the batches does not matter. Only the BatchNorm layers run in training mode: dropout and every
    other layer stay in evaluation mode, so the statistics are those the network sees at test
    time. Weights, biases and the layers' momenta are unchanged; the model is returned in
    evaluation mode.
    """
    layers = batchnorm_layers(model)
    if not layers:
        raise ValueError("adapt_batchnorm: the model has no BatchNorm layer to adapt")
    batches = iter(images)
    first = next(batches, None)
    if first is None:  # checked before the statistics are reset: the model stays as it was
        raise ValueError("adapt_batchnorm: no images to estimate the statistics from")
    device = device or next(model.parameters()).device
    momenta = [bn.momentum for bn in layers]
    model.eval()
    for bn in layers:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    try:
        for batch in itertools.chain([first], batches):
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(x.to(device))
    finally:
        for bn, momentum in zip(layers, momenta):
            bn.momentum = momentum
        model.eval()
    return model
