"""Active target identification (ATI) and pseudo-label assignment (PLA) (docs/method.md §3).

Paper eq. (1): d_ijc = || f_c^s - f(x_i^t)_j ||_2, the (not squared) Euclidean distance between
target feature j of image i and anchor c. Eq. (2): pixel j is active when the second-nearest
anchor is more than ``delta_d`` farther than the nearest (strictly: d_ij,second - d_ij,nearest >
Delta_d); the released code, and :func:`anchor_pseudo_labels`, also accept a margin of exactly
``delta_d`` (>=; docs/paper-vs-code.md, row 7). An active pixel takes the nearest anchor's class,
an inactive one is ignored. The released code also builds a probability
pseudo-label (softmax > 0.95) and averages both CEs (see :mod:`cag.losses`).
"""
from __future__ import annotations

import torch

from cag.labels import IGNORE_INDEX


def anchor_distances(features: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Euclidean distances [B, C, h, w] from features [B, D, h, w] to anchors [C, D] (eq. (1)).

    Computed in float32 by ``torch.cdist`` without the matrix-multiply shortcut, so each
    distance is sqrt(sum (f - a)^2) evaluated directly (exact ties stay exact) and no
    [B, C, D, h, w] tensor is ever built.
    """
    if features.dim() != 4 or anchors.dim() != 2 or features.shape[1] != anchors.shape[1]:
        raise ValueError(f"need features [B, D, h, w] and anchors [C, D] with the same D; "
                         f"got {tuple(features.shape)} and {tuple(anchors.shape)}")
    batch, dim, height, width = features.shape
    pixels = features.float().flatten(2).transpose(1, 2)
    centres = anchors.to(device=features.device, dtype=torch.float32).unsqueeze(0)
    distances = torch.cdist(pixels, centres, compute_mode="donot_use_mm_for_euclid_dist")
    return distances.transpose(1, 2).reshape(batch, anchors.shape[0], height, width)


def nearest_anchor_margin(distances: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest class [B, h, w] and margin (second-nearest minus nearest distance) [B, h, w].

    Uses ``topk(2, largest=False)`` (docs/paper-vs-code.md row 17). With a single anchor there is no
    competitor, so eq. (2)'s "for every other class" holds vacuously: the margin is +inf.
    Among equally near anchors the lowest class index is the nearest (``argmin``).
    """
    nearest = distances.argmin(dim=1)
    if distances.shape[1] == 1:
        return nearest, torch.full_like(distances[:, 0], float("inf"))
    two_smallest = distances.topk(2, dim=1, largest=False).values
    return nearest, two_smallest[:, 1] - two_smallest[:, 0]


def anchor_gaps(anchors: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Each anchor's distance to its closest other anchor, [C] float64: the bound on eq. (2)'s margin.

    For a pixel whose nearest anchor is c the margin (second-nearest minus nearest distance) is
    at most ``gaps[c]`` (triangle inequality, docs/method.md §3), so a ``delta_d`` above
    ``gaps[c]`` leaves class c without a single active pixel. Only ``valid`` anchors (bool [C];
    default all) count; an invalid class, and a lone valid anchor, get +inf. Distances are
    computed directly in float64 (no matrix-multiply shortcut).
    """
    points = anchors.double()
    keep = torch.ones(len(points), dtype=torch.bool, device=points.device) if valid is None \
        else torch.as_tensor(valid, device=points.device).bool()
    distances = torch.cdist(points, points, compute_mode="donot_use_mm_for_euclid_dist")
    distances.fill_diagonal_(float("inf"))
    distances[:, ~keep] = float("inf")
    gaps = distances.min(dim=1).values
    gaps[~keep] = float("inf")
    return gaps


def smallest_anchor_gap(anchors: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[float, tuple[int, int]]:
    """The smallest of the :func:`anchor_gaps` and its pair of classes (c, c's closest other anchor).

    A ``delta_d`` above it silences both classes of the pair (docs/method.md §3); the benchmark's
    Delta_d sweep is set in fractions of it. Among equal gaps the lowest class index comes first.
    Raises ValueError with fewer than two valid anchors.
    """
    gaps = anchor_gaps(anchors, valid)
    first = int(torch.argmin(gaps))
    if not torch.isfinite(gaps[first]):
        raise ValueError("smallest_anchor_gap: fewer than two valid anchors; at least two are needed")
    points = anchors.double()
    row = torch.cdist(points[first:first + 1], points, compute_mode="donot_use_mm_for_euclid_dist")[0]
    row[first] = float("inf")
    if valid is not None:
        row[~torch.as_tensor(valid, device=row.device).bool()] = float("inf")
    return float(gaps[first]), (first, int(torch.argmin(row)))


def per_class_values(value, classes: torch.Tensor, num_classes: int, name: str) -> torch.Tensor:
    """A scalar, or a per-class tensor [C] looked up at ``classes``, as a float tensor."""
    table = torch.as_tensor(value, dtype=torch.float32, device=classes.device)
    if table.dim() == 0:
        return table.expand(classes.shape)
    if tuple(table.shape) != (num_classes,):
        raise ValueError(f"{name} must be a float or a tensor [C] = [{num_classes}]; got shape {tuple(table.shape)}")
    return table[classes]


@torch.no_grad()
def anchor_pseudo_labels(features: torch.Tensor, anchors: torch.Tensor, delta_d=2.5,
                         ignore_index: int = IGNORE_INDEX, valid: torch.Tensor | None = None) -> torch.Tensor:
    """CA-based pseudo-labels [B, h, w] (paper eq. (2), released ``cluster_arg``).

    Active: margin >= delta_d (a margin exactly at delta_d is active, as in the released code;
    the paper writes ">"). ``delta_d`` is a float or a per-class tensor [C] indexed by the
    nearest class. Active pixels get the nearest class, inactive ones ``ignore_index``.
    With a single anchor every pixel is active and labelled 0. ``valid`` (bool [C]) leaves out
    classes that have no anchor (no source pixel ever reached the anchor rule): they are
    infinitely far, so they are never assigned and never the runner-up.
    """
    distances = anchor_distances(features, anchors)
    if valid is not None:
        far = torch.tensor(float("inf"), device=distances.device)
        distances = torch.where(valid.to(distances.device).view(1, -1, 1, 1), distances, far)
    nearest, margin = nearest_anchor_margin(distances)
    threshold = per_class_values(delta_d, nearest, anchors.shape[0], "delta_d")
    return torch.where(margin >= threshold, nearest, torch.full_like(nearest, ignore_index))


@torch.no_grad()
def probability_pseudo_labels(logits: torch.Tensor, threshold=0.95, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Probability-based pseudo-labels [B, h, w] (docs/method.md §4, released ``threshold_arg``).

    Label c where softmax p_c > threshold_c, else ``ignore_index``; ``threshold`` is a float or
    a per-class tensor [C]. With thresholds >= 0.5 at most one class can pass, as in the
    released code; below 0.5 the most probable passing class wins (the released code took
    the lowest passing class index).
    """
    probabilities = logits.float().softmax(dim=1)
    classes = torch.arange(logits.shape[1], device=logits.device).view(1, -1, 1, 1)
    thresholds = per_class_values(threshold, classes, logits.shape[1], "threshold")
    passing = probabilities > thresholds
    best_probability, best_class = torch.where(passing, probabilities, -1.0).max(dim=1)
    return torch.where(passing.any(dim=1), best_class, torch.full_like(best_class, ignore_index))


def _check_label_values(name: str, labels: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    bad = ((labels < 0) | (labels >= num_classes)) & (labels != ignore_index)
    if bad.any():
        raise ValueError(f"{name} holds values outside [0, {num_classes}) other than ignore {ignore_index}: "
                         f"{sorted(labels[bad].unique().tolist())[:10]}")


@torch.no_grad()
def pseudo_label_quality(pseudo: torch.Tensor, target: torch.Tensor, num_classes: int,
                         ignore_index: int = IGNORE_INDEX) -> dict[str, torch.Tensor]:
    """Per-class precision and recall of pseudo-labels against ground truth (released ``calc_recall``).

    Only pixels with a valid ground truth are evaluated. Counts (int64, summable over
    batches): ``correct`` [C] (pseudo == target == c), ``assigned`` [C] (pseudo == c),
    ``ground_truth`` [C] (target == c), ``labelled`` [C] (target == c with any pseudo-label,
    right or wrong), ``active`` and ``evaluated`` (scalars: pixels with a pseudo-label, pixels
    evaluated). Rates from :func:`quality_rates` are added.
    """
    if pseudo.shape != target.shape:
        raise ValueError(f"pseudo {tuple(pseudo.shape)} and target {tuple(target.shape)} must have the same shape")
    _check_label_values("pseudo", pseudo, num_classes, ignore_index)
    _check_label_values("target", target, num_classes, ignore_index)
    evaluated = target != ignore_index
    pseudo, target = pseudo[evaluated].long(), target[evaluated].long()
    active = pseudo != ignore_index
    counts = {
        "correct": torch.bincount(target[pseudo == target], minlength=num_classes),
        "assigned": torch.bincount(pseudo[active], minlength=num_classes),
        "ground_truth": torch.bincount(target, minlength=num_classes),
        "labelled": torch.bincount(target[active], minlength=num_classes),
        "active": active.sum(),
        "evaluated": torch.tensor(target.numel(), device=target.device),
    }
    return {**counts, **quality_rates(counts)}


def quality_rates(counts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rates from (possibly batch-summed) quality counts; NaN where a denominator is 0.

    precision_c = correct_c / assigned_c, recall_c = correct_c / ground_truth_c (the share of
    class c that gets the right label), coverage_c = labelled_c / ground_truth_c (the share that
    gets any label; present when the counts have ``labelled``), active_fraction = active / evaluated.
    """
    def ratio(numerator, denominator):
        return numerator.double() / denominator.double()

    rates = {
        "precision": ratio(counts["correct"], counts["assigned"]),
        "recall": ratio(counts["correct"], counts["ground_truth"]),
        "active_fraction": ratio(counts["active"], counts["evaluated"]),
    }
    if "labelled" in counts:
        rates["coverage"] = ratio(counts["labelled"], counts["ground_truth"])
    return rates
