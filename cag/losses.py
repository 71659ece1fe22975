"""CAG-UDA losses (docs/method.md §5 and §7): L = L_CE^s + L_CE^t + lam * (L_dis^s + L_dis^t).

- :func:`segmentation_ce`: pixel cross-entropy, mean over non-ignored pixels (L_CE^s).
- :func:`target_pseudo_label_loss`: CE on the target pseudo-labels at stride 4 (L_CE^t).
- :func:`anchor_distance_loss`: the distance loss pulling features to the anchors (L_dis);
  ``"faithful"`` is the released class-mean SmoothL1, ``"pixel_l2"`` the paper's reading.
- :func:`cag_loss`: the total objective of one adaptation iteration.

Every loss is a graph-connected zero, never NaN, when it has nothing to average.

Global normalisation (several processes, gradient accumulation): every loss also takes a
``denominator`` (``denominators`` for the composite ones). A plain call divides the loss's sum by
its own count, the mean above; given a denominator, the sum over this call's items is divided by
it instead. The counting functions (:func:`labelled_pixel_count`, :func:`pseudo_label_counts`,
:func:`distance_loss_count`, :func:`cag_loss_counts`) count exactly what each loss divides by,
and :func:`cag.distributed.global_denominators` turns the counts of one optimiser step on every
rank into the denominators that make the losses means over the whole global batch.
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


def _divide(total: torch.Tensor, denominator) -> torch.Tensor:
    return total / torch.as_tensor(denominator, device=total.device).to(total.dtype)


def labelled_pixel_count(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The number of pixels :func:`segmentation_ce` averages over: those not labelled ``ignore_index``."""
    return (labels != ignore_index).sum()


def segmentation_ce(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                    denominator: torch.Tensor | float | None = None) -> torch.Tensor:
    """Pixel cross-entropy averaged over non-ignored pixels (docs/method.md §7, L_CE^s).

    Logits [B, C, h, w] of another size than labels [B, H, W] are first upsampled bilinearly
    with align_corners=True (the source CE at crop size). All pixels ignored: a zero that is
    still connected to the graph. With ``denominator`` the pixel sum is divided by it instead
    of by :func:`labelled_pixel_count` (global normalisation, see the module docstring).
    """
    _check_labels("labels", labels, logits.shape[1], ignore_index)
    if logits.shape[-2:] != labels.shape[-2:]:
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=True)
    total = F.cross_entropy(logits, labels.long(), ignore_index=ignore_index, reduction="sum")
    if denominator is not None:
        return _divide(total, denominator)
    return total / labelled_pixel_count(labels, ignore_index).clamp(min=1)


_PSEUDO_LABEL_MAPS = {"both": ("anchor", "probability"), "anchor": ("anchor",), "probability": ("probability",)}


def _used_pseudo_labels(anchor_labels, prob_labels, mode: str) -> dict:
    if mode not in PSEUDO_LABEL_MODES:
        raise ValueError(f"mode must be one of {PSEUDO_LABEL_MODES}; got {mode!r}")
    given = {"anchor": ("anchor_labels", anchor_labels), "probability": ("prob_labels", prob_labels)}
    used = {key: given[key] for key in _PSEUDO_LABEL_MAPS[mode]}
    for name, labels in used.values():
        if labels is None:
            raise ValueError(f"mode={mode!r} needs {name}")
    return used


def pseudo_label_counts(anchor_labels: torch.Tensor | None, prob_labels: torch.Tensor | None, mode: str = "both",
                        ignore_index: int = IGNORE_INDEX) -> dict[str, torch.Tensor]:
    """The labelled pixels of each pseudo-label map ``mode`` uses ({"anchor": n, "probability": n}),
    what each of :func:`target_pseudo_label_loss`'s CE terms averages over."""
    return {key: labelled_pixel_count(labels, ignore_index)
            for key, (_, labels) in _used_pseudo_labels(anchor_labels, prob_labels, mode).items()}


def target_pseudo_label_loss(logits: torch.Tensor, anchor_labels: torch.Tensor | None,
                             prob_labels: torch.Tensor | None, mode: str = "both",
                             ignore_index: int = IGNORE_INDEX, denominators: dict | None = None) -> torch.Tensor:
    """Target CE on pseudo-labels at the logits' resolution, stride 4 (docs/method.md §4, L_CE^t).

    ``"both"`` (released default): (CE(anchor PLA) + CE(probability PLA)) / 2, each a mean over
    its own labelled pixels; ``"anchor"`` (the paper's PLA) or ``"probability"`` alone.
    ``denominators`` ({"anchor": ..., "probability": ...}, the keys of
    :func:`pseudo_label_counts`) replace each map's own labelled-pixel count.
    """
    used = _used_pseudo_labels(anchor_labels, prob_labels, mode)
    terms = [_pseudo_label_ce(logits, labels, name, ignore_index, None if denominators is None else denominators[key])
             for key, (name, labels) in used.items()]
    return sum(terms) / len(terms)


def _pseudo_label_ce(logits, labels, name, ignore_index, denominator):
    if logits.shape[-2:] != labels.shape[-2:]:
        raise ValueError(f"{name} {tuple(labels.shape)} must be at the logits' resolution "
                         f"{tuple(logits.shape[-2:])} (the target CE is not upsampled)")
    return segmentation_ce(logits, labels, ignore_index, denominator)


class GradientRescale(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``scale`` (released
    ``NormalisationPoolingFunction``, docs/method.md §5)."""

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


def _kept_pairs(pixels: torch.Tensor, min_pixels: int) -> torch.Tensor:
    """The (image, class) pairs of the faithful distance loss: masks of at least ``min_pixels`` (and 1) pixels."""
    return pixels >= max(min_pixels, 1)


def _labelled(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The pixels of the pixel_l2 distance loss: a class label, not ignore."""
    return (labels >= 0) & (labels < num_classes)


def distance_loss_count(labels: torch.Tensor, num_classes: int, predictions: torch.Tensor | None = None,
                        variant: str = "faithful", min_pixels: int = 10) -> torch.Tensor:
    """What :func:`anchor_distance_loss` averages over: its (image, class) pairs (``"faithful"``,
    which needs the same ``predictions``) or its labelled pixels (``"pixel_l2"``)."""
    if variant == "faithful":
        if predictions is None:
            raise ValueError("variant='faithful' needs predictions (the student's argmax at feature resolution)")
        _check_spatial("labels", labels, "predictions", predictions)
        return _kept_pairs(class_masks(labels, num_classes, predictions).sum(dim=(1, 2)), min_pixels).sum()
    if variant == "pixel_l2":
        return _labelled(labels, num_classes).sum()
    raise ValueError(f"variant must be one of {DISTANCE_VARIANTS}; got {variant!r}")


def faithful_distance_loss(features: torch.Tensor, labels: torch.Tensor, anchors: torch.Tensor,
                           predictions: torch.Tensor, min_pixels: int = 10,
                           denominator: torch.Tensor | float | None = None) -> torch.Tensor:
    """The released distance loss: SmoothL1 between class means and anchors (docs/method.md §5).

    Per image n and class t: mask = (label == t) & (prediction == t), skipped below
    ``min_pixels``; v_nt = class mean over the mask, with its gradient rescaled by
    ``2 * mask.sum() / (h * w)``; l_nt = SmoothL1(v_nt, a_t) (beta 1, mean over D), divided by 10 while
    > 5; L = 10 * sum(l_nt) / #pairs. With ``denominator``, ``10 * sum(l_nt) / denominator``
    (every l_nt depends on its own image only, so the pairs of several calls add up).
    """
    _check_spatial("features", features, "labels", labels)
    _check_spatial("features", features, "predictions", predictions)
    batch, _, height, width = features.shape
    sums, pixels = masked_class_sums(features, class_masks(labels, anchors.shape[0], predictions))
    kept = _kept_pairs(pixels, min_pixels)
    means = sums[kept] / pixels[kept].unsqueeze(-1)
    scale = (2 * pixels[kept] / (height * width)).unsqueeze(-1)
    means = GradientRescale.apply(means, scale)
    classes = kept.nonzero()[:, 1]
    targets = anchors.to(device=features.device, dtype=sums.dtype)[classes]
    pair_losses = shrink_by_tens(F.smooth_l1_loss(means, targets, beta=1.0, reduction="none").mean(dim=-1))
    if denominator is not None:
        return _divide(10 * pair_losses.sum(), denominator)
    return 10 * pair_losses.sum() / max(len(classes), 1)


def pixel_l2_distance_loss(features: torch.Tensor, labels: torch.Tensor, anchors: torch.Tensor,
                           denominator: torch.Tensor | float | None = None) -> torch.Tensor:
    """The paper's reading of L_dis: mean over labelled pixels j of ||f_j - a_{y_j}||_2.

    Poster: "L2 norm distance loss", abstract: "anchor-based pixel-level distance loss"
    (docs/method.md §5.2). Non-squared, like eq. (1); pixels labelled ignore do not count.
    With ``denominator`` the sum over pixels is divided by it instead.
    """
    _check_spatial("features", features, "labels", labels)
    labelled = _labelled(labels, anchors.shape[0])
    pixel_features = features.permute(0, 2, 3, 1)[labelled]
    targets = anchors.to(device=features.device, dtype=pixel_features.dtype)[labels[labelled].long()]
    distances = torch.linalg.vector_norm(pixel_features - targets, dim=-1)
    if denominator is not None:
        return _divide(distances.sum(), denominator)
    return distances.sum() / max(distances.numel(), 1)


def anchor_distance_loss(features: torch.Tensor, labels: torch.Tensor, anchors: torch.Tensor,
                         predictions: torch.Tensor | None = None, variant: str = "faithful",
                         min_pixels: int = 10, denominator: torch.Tensor | float | None = None) -> torch.Tensor:
    """Anchor distance loss L_dis (docs/method.md §5) on features [B, D, h, w], labels [B, h, w].

    ``variant="faithful"`` (default): :func:`faithful_distance_loss`, which needs the student's
    own argmax ``predictions`` [B, h, w]; ``variant="pixel_l2"``: :func:`pixel_l2_distance_loss`
    (predictions and ``min_pixels`` unused). ``denominator`` replaces
    :func:`distance_loss_count` as the divisor.
    """
    if variant == "faithful":
        if predictions is None:
            raise ValueError("variant='faithful' needs predictions (the student's argmax at feature resolution)")
        return faithful_distance_loss(features, labels, anchors, predictions, min_pixels, denominator)
    if variant == "pixel_l2":
        return pixel_l2_distance_loss(features, labels, anchors, denominator)
    raise ValueError(f"variant must be one of {DISTANCE_VARIANTS}; got {variant!r}")


def source_distance_labels(src_labels: torch.Tensor, size, num_classes: int,
                           anchor_valid: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The labels of L_dis^s: ``src_labels`` downsampled (nearest) to the feature ``size``, with the
    classes that have no anchor (``anchor_valid`` false) set to ``ignore_index``."""
    small = downsample_labels(src_labels, size)
    if anchor_valid is None:
        return small
    has_anchor = torch.cat([anchor_valid.to(src_labels.device), anchor_valid.new_zeros(1).to(src_labels.device)])
    index = torch.where(small < num_classes, small, num_classes)
    return torch.where(has_anchor[index], small, torch.full_like(small, ignore_index))


def cag_loss_counts(src_labels: torch.Tensor, src_feature_size, anchor_labels: torch.Tensor,
                    prob_labels: torch.Tensor | None, num_classes: int, src_predictions: torch.Tensor | None = None,
                    tgt_predictions: torch.Tensor | None = None, pseudo_label_mode: str = "both",
                    distance_variant: str = "faithful", ignore_index: int = IGNORE_INDEX, min_pixels: int = 10,
                    anchor_valid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """What each term of :func:`cag_loss` averages over, for the same inputs.

    Keys ``ce_source`` (non-ignored source pixels at crop size), ``ce_target_anchor`` /
    ``ce_target_probability`` (labelled pixels of each pseudo-label map ``pseudo_label_mode``
    uses), ``dist_source`` and ``dist_target`` (:func:`distance_loss_count`: (image, class) pairs
    for ``"faithful"``, which needs the student's argmax ``src_predictions``/``tgt_predictions``
    at the feature size; labelled pixels for ``"pixel_l2"``). Summed over micro-batches and
    ranks by :func:`cag.distributed.global_denominators`, they give ``cag_loss(denominators=...)``.
    """
    src_small_labels = source_distance_labels(src_labels, src_feature_size, num_classes, anchor_valid, ignore_index)
    counts = {"ce_source": labelled_pixel_count(src_labels, ignore_index)}
    for key, value in pseudo_label_counts(anchor_labels, prob_labels, pseudo_label_mode, ignore_index).items():
        counts[f"ce_target_{key}"] = value
    counts["dist_source"] = distance_loss_count(src_small_labels, num_classes, src_predictions, distance_variant, min_pixels)
    counts["dist_target"] = distance_loss_count(anchor_labels, num_classes, tgt_predictions, distance_variant, min_pixels)
    return counts


def cag_loss(src_logits: torch.Tensor, src_labels: torch.Tensor, src_features: torch.Tensor,
             tgt_logits: torch.Tensor, tgt_features: torch.Tensor, anchors: torch.Tensor,
             anchor_labels: torch.Tensor, prob_labels: torch.Tensor | None, lam: float = 0.7,
             pseudo_label_mode: str = "both", distance_variant: str = "faithful",
             ignore_index: int = IGNORE_INDEX, min_pixels: int = 10,
             anchor_valid: torch.Tensor | None = None, denominators: dict | None = None,
             src_predictions: torch.Tensor | None = None,
             tgt_predictions: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Total CAG objective L = CE_s + CE_t + lam * (L_dis^s + L_dis^t) (docs/method.md §7).

    Student logits and features are at stride 4; ``src_labels`` at crop size. The source CE
    upsamples the logits; the source distance loss uses the labels downsampled (nearest) to
    the feature size. The target distance loss uses the anchor pseudo-labels. The distance
    masks use the student's own detached argmax (``src_predictions``/``tgt_predictions`` when
    given: the same argmax computed beforehand). ``anchor_valid`` (bool [C]) keeps classes
    without an anchor out of the distance losses. ``denominators`` (the keys of
    :func:`cag_loss_counts`) replace each term's own count. Returns total, ce_source,
    ce_target, dist_source, dist_target.
    """
    _check_spatial("src_logits", src_logits, "src_features", src_features)
    _check_spatial("tgt_logits", tgt_logits, "tgt_features", tgt_features)
    src_small_labels = source_distance_labels(src_labels, src_features.shape[-2:], anchors.shape[0], anchor_valid,
                                              ignore_index)
    if src_predictions is None:
        src_predictions = src_logits.detach().argmax(dim=1)
    if tgt_predictions is None:
        tgt_predictions = tgt_logits.detach().argmax(dim=1)
    den = (lambda key: None) if denominators is None else denominators.__getitem__
    target_den = None if denominators is None else \
        {key: den(f"ce_target_{key}") for key in _PSEUDO_LABEL_MAPS.get(pseudo_label_mode, ())}
    parts = {
        "ce_source": segmentation_ce(src_logits, src_labels, ignore_index, den("ce_source")),
        "ce_target": target_pseudo_label_loss(tgt_logits, anchor_labels, prob_labels, pseudo_label_mode,
                                              ignore_index, target_den),
        "dist_source": anchor_distance_loss(src_features, src_small_labels, anchors, src_predictions,
                                            distance_variant, min_pixels, den("dist_source")),
        "dist_target": anchor_distance_loss(tgt_features, anchor_labels, anchors, tgt_predictions,
                                            distance_variant, min_pixels, den("dist_target")),
    }
    total = parts["ce_source"] + parts["ce_target"] + lam * (parts["dist_source"] + parts["dist_target"])
    return {"total": total, **parts}
