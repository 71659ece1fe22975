"""CAG-UDA losses (method-spec 4): L = L_CE^s + L_CE^t + lam * (L_dis^s + L_dis^t).

- :func:`segmentation_ce`: pixel cross-entropy, mean over non-ignored pixels (L_CE^s).
- :func:`target_pseudo_label_loss`: CE on the target pseudo-labels at stride 4 (L_CE^t).
- :func:`anchor_distance_loss`: the distance loss pulling features to the anchors (L_dis);
  ``"faithful"`` is the released class-mean SmoothL1, ``"pixel_l2"`` the paper's reading.
- :func:`cag_loss`: the total objective of one adaptation iteration.

Every loss is a graph-connected zero, never NaN, when it has nothing to average.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cag.anchors import class_masks, downsample_labels, masked_class_sums
from cag.labels import IGNORE_INDEX

PSEUDO_LABEL_MODES = ("both", "anchor", "probability")
DISTANCE_VARIANTS = ("faithful", "pixel_l2")


def _check_labels(name: str, labels: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    bad = ((labels < 0) | (labels >= num_classes)) & (labels != ignore_index)
    if bad.any():
        raise ValueError(f"{name}: label values must be in [0, {num_classes}) or {ignore_index}; "
                         f"found {sorted(labels[bad].unique().tolist())[:10]}")


def _check_spatial(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.shape[0] != b.shape[0] or a.shape[-2:] != b.shape[-2:]:
        raise ValueError(f"{name_a} {tuple(a.shape)} and {name_b} {tuple(b.shape)} must share batch size and h x w")


def segmentation_ce(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Pixel cross-entropy averaged over non-ignored pixels (method-spec 4.1, L_CE^s).

    Logits [B, C, h, w] of another size than labels [B, H, W] are first upsampled bilinearly
    with align_corners=True (the source CE at crop size). All pixels ignored: a zero that is
    still connected to the graph.
    """
    _check_labels("labels", labels, logits.shape[1], ignore_index)
    if logits.shape[-2:] != labels.shape[-2:]:
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=True)
    total = F.cross_entropy(logits, labels.long(), ignore_index=ignore_index, reduction="sum")
    return total / (labels != ignore_index).sum().clamp(min=1)


def target_pseudo_label_loss(logits: torch.Tensor, anchor_labels: torch.Tensor | None,
                             prob_labels: torch.Tensor | None, mode: str = "both",
                             ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Target CE on pseudo-labels at the logits' resolution, stride 4 (method-spec 4.2, L_CE^t).

    ``"both"`` (released default): (CE(anchor PLA) + CE(probability PLA)) / 2, each a mean over
    its own labelled pixels; ``"anchor"`` (the paper's PLA) or ``"probability"`` alone.
    """
    if mode not in PSEUDO_LABEL_MODES:
        raise ValueError(f"mode must be one of {PSEUDO_LABEL_MODES}; got {mode!r}")
    given = {"anchor_labels": anchor_labels, "prob_labels": prob_labels}
    used = {"both": ("anchor_labels", "prob_labels"), "anchor": ("anchor_labels",),
            "probability": ("prob_labels",)}[mode]
    terms = [_pseudo_label_ce(logits, given[name], name, mode, ignore_index) for name in used]
    return sum(terms) / len(terms)


def _pseudo_label_ce(logits, labels, name, mode, ignore_index):
    if labels is None:
        raise ValueError(f"mode={mode!r} needs {name}")
    if logits.shape[-2:] != labels.shape[-2:]:
        raise ValueError(f"{name} {tuple(labels.shape)} must be at the logits' resolution "
                         f"{tuple(logits.shape[-2:])} (the target CE is not upsampled)")
    return segmentation_ce(logits, labels, ignore_index)


class GradientRescale(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``scale`` (released
    ``NormalisationPoolingFunction``, method-spec 4.3)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(scale)
        return x.clone()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (scale,) = ctx.saved_tensors
        return grad_output * scale, None


def shrink_by_tens(losses: torch.Tensor) -> torch.Tensor:
    """Divides each loss by 10 while it exceeds 5 (released ``class_vectors_alignment``).

    Value and gradient are both scaled; a loss of 50 becomes 5.0, 51 becomes 0.51.
    """
    while True:
        too_large = (losses > 5) & losses.isfinite()
        if not too_large.any():
            return losses
        losses = torch.where(too_large, losses / 10, losses)


def faithful_distance_loss(features: torch.Tensor, labels: torch.Tensor, anchors: torch.Tensor,
                           predictions: torch.Tensor, min_pixels: int = 10) -> torch.Tensor:
    """The released distance loss: SmoothL1 between class means and anchors (method-spec 4.3).

    Per image n and class t: mask = (label == t) & (prediction == t), skipped below
    ``min_pixels``; v_nt = class mean over the mask, with its gradient rescaled by
    ``2 * mask.sum() / (h * w)``; l_nt = SmoothL1(v_nt, a_t) (beta 1, mean over D), divided by 10 while
    > 5; L = 10 * sum(l_nt) / #pairs.
    """
    _check_spatial("features", features, "labels", labels)
    _check_spatial("features", features, "predictions", predictions)
    batch, _, height, width = features.shape
    sums, pixels = masked_class_sums(features, class_masks(labels, anchors.shape[0], predictions))
    kept = pixels >= max(min_pixels, 1)
    means = sums[kept] / pixels[kept].unsqueeze(-1)
    scale = (2 * pixels[kept] / (height * width)).unsqueeze(-1)
    means = GradientRescale.apply(means, scale)
    classes = kept.nonzero()[:, 1]
    targets = anchors.to(device=features.device, dtype=sums.dtype)[classes]
    pair_losses = shrink_by_tens(F.smooth_l1_loss(means, targets, beta=1.0, reduction="none").mean(dim=-1))
    return 10 * pair_losses.sum() / max(len(classes), 1)


def pixel_l2_distance_loss(features: torch.Tensor, labels: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """The paper's reading of L_dis: mean over labelled pixels j of ||f_j - a_{y_j}||_2.

    Poster: "L2 norm distance loss", abstract: "anchor-based pixel-level distance loss"
    (method-spec 4, decision). Non-squared, like eq. (1); pixels labelled ignore do not count.
    """
    _check_spatial("features", features, "labels", labels)
    labelled = (labels >= 0) & (labels < anchors.shape[0])
    pixel_features = features.permute(0, 2, 3, 1)[labelled]
    targets = anchors.to(device=features.device, dtype=pixel_features.dtype)[labels[labelled].long()]
    distances = torch.linalg.vector_norm(pixel_features - targets, dim=-1)
    return distances.sum() / max(distances.numel(), 1)


def anchor_distance_loss(features: torch.Tensor, labels: torch.Tensor, anchors: torch.Tensor,
                         predictions: torch.Tensor | None = None, variant: str = "faithful",
                         min_pixels: int = 10) -> torch.Tensor:
    """Anchor distance loss L_dis (method-spec 4.3) on features [B, D, h, w], labels [B, h, w].

    ``variant="faithful"`` (default): :func:`faithful_distance_loss`, which needs the student's
    own argmax ``predictions`` [B, h, w]; ``variant="pixel_l2"``: :func:`pixel_l2_distance_loss`
    (predictions and ``min_pixels`` unused).
    """
    if variant == "faithful":
        if predictions is None:
            raise ValueError("variant='faithful' needs predictions (the student's argmax at feature resolution)")
        return faithful_distance_loss(features, labels, anchors, predictions, min_pixels)
    if variant == "pixel_l2":
        return pixel_l2_distance_loss(features, labels, anchors)
    raise ValueError(f"variant must be one of {DISTANCE_VARIANTS}; got {variant!r}")


def cag_loss(src_logits: torch.Tensor, src_labels: torch.Tensor, src_features: torch.Tensor,
             tgt_logits: torch.Tensor, tgt_features: torch.Tensor, anchors: torch.Tensor,
             anchor_labels: torch.Tensor, prob_labels: torch.Tensor | None, lam: float = 0.7,
             pseudo_label_mode: str = "both", distance_variant: str = "faithful",
             ignore_index: int = IGNORE_INDEX, min_pixels: int = 10,
             anchor_valid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Total CAG objective L = CE_s + CE_t + lam * (L_dis^s + L_dis^t) (method-spec 4.4).

    Student logits and features are at stride 4; ``src_labels`` at crop size. The source CE
    upsamples the logits; the source distance loss uses the labels downsampled (nearest) to
    the feature size. The target distance loss uses the anchor pseudo-labels. The distance
    masks use the student's own detached argmax. ``anchor_valid`` (bool [C]) keeps classes
    without an anchor out of the distance losses. Returns total, ce_source, ce_target,
    dist_source, dist_target.
    """
    _check_spatial("src_logits", src_logits, "src_features", src_features)
    _check_spatial("tgt_logits", tgt_logits, "tgt_features", tgt_features)
    src_small_labels = downsample_labels(src_labels, src_features.shape[-2:])
    if anchor_valid is not None:
        has_anchor = torch.cat([anchor_valid.to(src_labels.device), anchor_valid.new_zeros(1).to(src_labels.device)])
        index = torch.where(src_small_labels < anchors.shape[0], src_small_labels, anchors.shape[0])
        src_small_labels = torch.where(has_anchor[index], src_small_labels, torch.full_like(src_small_labels, ignore_index))
    parts = {
        "ce_source": segmentation_ce(src_logits, src_labels, ignore_index),
        "ce_target": target_pseudo_label_loss(tgt_logits, anchor_labels, prob_labels, pseudo_label_mode,
                                              ignore_index),
        "dist_source": anchor_distance_loss(src_features, src_small_labels, anchors,
                                            src_logits.detach().argmax(dim=1), distance_variant, min_pixels),
        "dist_target": anchor_distance_loss(tgt_features, anchor_labels, anchors,
                                            tgt_logits.detach().argmax(dim=1), distance_variant, min_pixels),
    }
    total = parts["ce_source"] + parts["ce_target"] + lam * (parts["dist_source"] + parts["dist_target"])
    return {"total": total, **parts}
