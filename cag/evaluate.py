"""Full-resolution evaluation (docs/method.md §12).

Single scale, no flip by default; the model in eval mode; stride-4 logits upsampled bilinearly
(align_corners=True) to the label size, then argmax; one confusion matrix over the whole split.
Horizontal flip and multi-scale average the softmax over the variants.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import distributed as dist
from .data.datasets import collate, loader_workers
from .metrics import ConfusionMatrix


def predict_probs(model: nn.Module, image: torch.Tensor, size, flip: bool = False, scales=(1.0,)) -> torch.Tensor:
    """Softmax at ``size`` (H, W), averaged over the flips and scales asked for."""
    total = 0.0
    count = 0
    for scale in scales:
        x = image if scale == 1.0 else F.interpolate(image, scale_factor=scale, mode="bilinear", align_corners=True)
        for flipped in ((False, True) if flip else (False,)):
            inp = x.flip(-1) if flipped else x
            _, logits = model(inp)
            logits = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=True)
            probs = logits.softmax(1)
            total = total + (probs.flip(-1) if flipped else probs)
            count += 1
    return total / count


@torch.no_grad()
def evaluate_model(model: nn.Module, dataset, num_classes: int, device, batch_size: int = 1, flip: bool = False,
                   scales=(1.0,), max_images: int | None = None, amp: bool = False, quiet: bool = False,
                   num_workers: int = 0) -> ConfusionMatrix:
    """Accumulate the confusion matrix of ``model`` over ``dataset`` (items with ``image``, ``label``).

    Under DDP each rank scores its share and the matrices are summed. The train/eval mode of
    every sub-module is restored afterwards (a frozen-BN warm-up stays frozen). ``num_workers``
    loader processes decode the images (full-size PNGs are the bottleneck on a GPU); the result
    does not depend on it.
    """
    from tqdm.auto import tqdm

    modes = {m: m.training for m in model.modules()}
    model.eval()
    n = len(dataset) if max_images is None else min(max_images, len(dataset))
    indices = list(range(n))[dist.rank()::dist.world_size()]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size,
                                         num_workers=loader_workers(num_workers, -(-len(indices) // batch_size)),
                                         pin_memory=torch.device(device).type == "cuda",
                                         collate_fn=collate)
    cm = ConfusionMatrix(num_classes, device=device)
    ctx = torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if amp else nullcontext()
    for batch in tqdm(loader, desc="evaluate", disable=quiet or not dist.is_main(), unit="img", leave=False):
        image = batch["image"].to(device, non_blocking=True)
        label = batch["label"].to(device, non_blocking=True)
        with ctx:
            probs = predict_probs(model, image, label.shape[-2:], flip=flip, scales=scales)
        cm.update(probs.argmax(1), label)
    cm.all_reduce()
    for m, training in modes.items():
        m.train(training)
    return cm
