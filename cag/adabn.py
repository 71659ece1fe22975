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


def target_images(cfg, split: str = "train"):
    """The target ``split`` of ``cfg`` as the evaluation sees it, without labels.

    The images go through the configuration's evaluation transform (``eval.resize``, else full
    resolution; no crop, no flip), as ``cag.stages.eval_dataset`` prepares them for scoring,
    so the statistics are those of the images the adapted model is then scored on. Labels are
    not even opened (``labels=False``).
    """
    from .data import transforms
    from .loop import Augmented
    from .stages import target_dataset

    return Augmented(target_dataset(cfg, split, labels=False),
                     transforms.eval_transform(resize=tuple(cfg.eval.resize) if cfg.eval.resize else None), cfg.seed)


def adapt_checkpoint(cfg, checkpoint, out, split: str = "train"):
    """AdaBN of a saved model: ``checkpoint``'s BatchNorm statistics re-estimated on target ``split``.

    Loads the model weights of ``checkpoint`` (a project ``last.pt``/``best_val.pt`` or a
    released file) with the project's safe loader (:func:`cag.stages.make_model`, which checks
    every key and shape against the configured network), runs :func:`adapt_batchnorm` over the
    target ``split`` of ``cfg`` (by default the *train* split, the unlabelled target images an
    adaptation method may read; never the split it is scored on) in batches of
    ``eval.batch_size`` through :func:`target_images`, and writes the adapted weights to ``out``
    atomically (:func:`cag.checkpoint.save_checkpoint`, ``format: cag-model/1``, loadable as
    ``model.init`` or by :func:`cag.stages.evaluate`). Returns ``out``.
    """
    from pathlib import Path

    from .checkpoint import save_checkpoint
    from .data.datasets import collate, loader_workers
    from .stages import make_model, resolve_device

    device = resolve_device(cfg.device)
    model = make_model(cfg, device, checkpoint)
    dataset = target_images(cfg, split)
    workers = loader_workers(cfg.data.num_workers, -(-len(dataset) // cfg.eval.batch_size))
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.eval.batch_size, shuffle=False, num_workers=workers,
                                         collate_fn=collate)
    adapt_batchnorm(model, (batch["image"] for batch in loader), device)
    out = Path(out)
    save_checkpoint(out, {"format": "cag-model/1", "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                          "adabn": {"source": str(checkpoint), "split": split, "images": len(dataset)}})
    return out
