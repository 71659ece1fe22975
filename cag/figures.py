"""Figures for the book, each returning a ``matplotlib.figure.Figure``.

Figures are built without ``pyplot``: no global figure state, nothing shown twice in a
notebook (the inline backend renders a returned ``Figure``), and no backend is forced.
"""
from __future__ import annotations

import numpy as np
import torch

from .labels import colorize


def image_array(image) -> np.ndarray:
    """A dataset image (uint8 or float [3, H, W] tensor or array; float in [0, 1] or [0, 255])
    as uint8 [H, W, 3] for display."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an image of shape [3, H, W], got {list(image.shape)}")
    image = image.transpose(1, 2, 0)
    if image.dtype == np.uint8:
        return image
    scale = 255.0 if float(image.max(initial=0.0)) <= 1.0 else 1.0
    return np.clip(np.rint(image.astype(np.float64) * scale), 0, 255).astype(np.uint8)


def show_domains(source_dataset, target_dataset, n: int = 4, num_classes: int = 19):
    """Source and target samples with their colour-coded labels, one sample pair per row.

    The two domains of the benchmark (data-formats.md 4.1): columns are source image, source
    label, target image, target label. Datasets yield dicts with ``image`` ([3, H, W]) and
    ``label`` (train ids [H, W], 255 = ignore, drawn black); the first ``n`` items are shown.
    """
    from matplotlib.figure import Figure

    rows = min(n, len(source_dataset), len(target_dataset))
    if rows < 1:
        raise ValueError("show_domains needs at least one item in each dataset and n >= 1")
    first = image_array(source_dataset[0]["image"])
    aspect = first.shape[1] / first.shape[0]
    fig = Figure(figsize=(4 * 2.2 * aspect, rows * 2.2 + 0.8), layout="constrained")
    axes = fig.subplots(rows, 4, squeeze=False)
    titles = ("source image", "source label", "target image", "target label")
    for row in range(rows):
        panels = []
        for dataset in (source_dataset, target_dataset):
            item = dataset[row]
            panels += [image_array(item["image"]), colorize(item["label"], num_classes)]
        for col, panel in enumerate(panels):
            axes[row, col].imshow(panel, interpolation="nearest")
            axes[row, col].set_axis_off()
            if row == 0:
                axes[row, col].set_title(titles[col])
    fig.suptitle("Source (synthetic) and target (real) domains: images with their colour-coded "
                 "ground-truth labels")
    return fig
