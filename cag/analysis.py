"""The computations the book's chapters show, one small function each.

Nothing here trains or changes a rule of the method: every function reads a model, a dataset
or a run directory and measures what the paper claims, with the package's own rules
(:mod:`cag.anchors`, :mod:`cag.pseudo_labels`, :mod:`cag.losses`, :mod:`cag.metrics`). The
notebooks in ``book/`` call these functions and plot their results with :mod:`cag.figures`.

Conventions: features and labels are at feature resolution (stride 4 for DeepLab-v3+), labels
are downsampled with nearest as for the anchors (docs/method.md §2); 255 is ignore
everywhere; nothing assumes 19 classes or a crop size.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import torch

from .anchors import downsample_labels
from .config import Config, ConfigError, load_config
from .labels import IGNORE_INDEX, class_names
from .losses import anchor_distance_loss
from .pseudo_labels import (
    anchor_distances,
    anchor_pseudo_labels,
    nearest_anchor_margin,
    probability_pseudo_labels,
    pseudo_label_quality,
    quality_rates,
)

#: The configuration file of each book profile: the built-in benchmark on CPU, or real data.
PROFILES = {"ci": "configs/synthetic.yaml", "paper": "configs/gta5_to_cityscapes.yaml"}
#: The device each profile runs on unless a chapter's ``device`` parameter says otherwise.
PROFILE_DEVICES = {"ci": "cpu", "paper": "auto"}
#: The configuration keys a chapter's ``iters`` parameter sets: every training stage's length.
ITERATION_KEYS = ("source_only.iters", "warmup.iters", "cag.iters")
#: The count keys that ``quality_rates`` turns into rates; they add up over batches.
QUALITY_COUNTS = ("correct", "assigned", "ground_truth", "labelled", "active", "evaluated")


# ----------------------------------------------------------------------------- set-up


def repo_root(start=None) -> Path:
    """The repository root: the nearest folder at or above ``start`` (default: the working
    directory) that holds ``cag/__init__.py`` and ``configs/``.

    Notebooks run from ``book/`` under nbval and from the root under papermill; both find the
    same root, and the chapters change into it so that the configurations' relative paths
    (``data/...``, ``runs/...``) mean the same thing in every run.
    """
    start = Path(start or Path.cwd()).resolve()
    for folder in (start, *start.parents):
        if (folder / "cag" / "__init__.py").is_file() and (folder / "configs").is_dir():
            return folder
    raise FileNotFoundError(f"no cag repository (a folder with cag/__init__.py and configs/) at or above {start}")


def book_config(profile: str = "ci", config=None, source_root=None, target_root=None, device=None,
                seed=None, iters=None, batch_size=None, overrides=None, root=None) -> Config:
    """The validated run configuration of a chapter's ``parameters`` cell (papermill).

    ``profile`` picks the configuration file (:data:`PROFILES`) and the device
    (:data:`PROFILE_DEVICES`); ``config`` names another file. The named parameters map to
    configuration keys (``source_root`` -> ``data.source_root``, ``iters`` -> every key of
    :data:`ITERATION_KEYS`, ``batch_size`` -> ``train.batch_size``); ``overrides`` is a dict of
    dotted keys, applied last. Everything goes through :func:`cag.config.load_config`, so a
    misspelt key fails before any work starts. The ``ci`` profile runs quietly (no progress bars
    in the committed outputs). In Jupyter, an input error shows as its one-line message
    instead of a traceback (:class:`cag.errors.UserInputError`).
    """
    if profile not in PROFILES:
        raise ConfigError(f"profile: {profile!r} is not one of {', '.join(PROFILES)}")
    root = Path(root) if root is not None else repo_root()
    params = {"device": device or PROFILE_DEVICES[profile], "quiet": profile == "ci"}
    named = {"data.source_root": source_root, "data.target_root": target_root, "seed": seed,
             "train.batch_size": batch_size}
    params.update({key: value for key, value in named.items() if value is not None})
    if iters is not None:
        params.update(dict.fromkeys(ITERATION_KEYS, iters))
    params.update(overrides or {})
    return load_config(root / (config or PROFILES[profile]), params=params)


def trains_controls(profile: str = "ci", controls: bool | None = None) -> bool:
    """Whether a chapter trains its control run (chapter 3: the warm-up without its adversarial
    term; chapter 6: stage 1 without the distance loss). ``controls=None`` means: in the ``ci``
    profile, where a control costs seconds, yes; in the ``paper`` profile, where it costs one more
    warm-up or CAG stage of the released schedule, only when asked (``controls=True``, or
    ``python -m cag.book paper-run --controls``)."""
    if profile not in PROFILES:
        raise ConfigError(f"profile: {profile!r} is not one of {', '.join(PROFILES)}")
    return profile == "ci" if controls is None else bool(controls)


# ----------------------------------------------------------------------------- run records


def read_metrics(stage_dir, kind: str | None = None) -> list[dict]:
    """The records of a stage's ``metrics.jsonl`` (written by :func:`cag.loop.run_loop`), in
    order; with ``kind`` only those of that kind (``train``, ``val`` or ``nan_skip``)."""
    path = Path(stage_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics; has the stage run?")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if kind is None or r.get("kind") == kind]


def results_table(summary: dict, split: str, checkpoint: str = "last") -> dict[str, float]:
    """``{stage: mIoU}`` of one split and checkpoint kind from a run's ``summary.json``
    (:meth:`cag.pipeline.Pipeline.evaluate_all`; docs/paper-vs-code.md row 33: last and best both kept)."""
    return {r["stage"]: r["miou"] for r in summary["results"]
            if r["split"] == split and r["checkpoint"] == checkpoint}


def iou_delta(before: dict, after: dict) -> dict:
    """Per-class IoU change ``after - before`` over the classes of ``before`` (docs/method.md §12:
    per-class IoU); None where either side has no value (a class absent from the split)."""
    return {name: None if before.get(name) is None or after.get(name) is None else after[name] - before[name]
            for name in before}


def row_normalised(matrix: torch.Tensor) -> torch.Tensor:
    """A confusion matrix (rows truth, columns prediction) with each row divided by its sum:
    entry (t, p) is the share of class-t pixels predicted as p; NaN rows for absent classes."""
    matrix = matrix.double()
    return matrix / matrix.sum(dim=1, keepdim=True)


# ----------------------------------------------------------------------------- data and features


def source_eval_dataset(cfg: Config):
    """The source set as the anchor computation reads it (docs/method.md §2): no
    augmentation, images and labels (train ids) at ``anchors.resize`` (None: as stored);
    :func:`cag.stages.anchor_dataset`."""
    from .stages import anchor_dataset

    return anchor_dataset(cfg)


def stack_items(dataset, indices) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [B, 3, H, W] and labels [B, H, W] of the dataset items at ``indices`` (all of one size)."""
    items = [dataset[i] for i in indices]
    return torch.stack([item["image"] for item in items]), torch.stack([item["label"] for item in items])


def first_items(dataset, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`stack_items` of the first ``n`` items, or of all of them when the dataset has fewer."""
    return stack_items(dataset, range(min(n, len(dataset))))


@torch.no_grad()
def features_and_logits(model, images: torch.Tensor, device, batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's ``(features, logits)`` (docs/method.md §11: the anchor feature ``cls_feat`` and
    the classifier output, both at stride 4) for a stack of images, in eval mode, on the CPU."""
    model.eval()
    outputs = [model(chunk.to(device)) for chunk in images.split(batch_size)]
    return (torch.cat([f.float().cpu() for f, _ in outputs]), torch.cat([l.float().cpu() for _, l in outputs]))


def labelled_pixels(features: torch.Tensor, labels: torch.Tensor, max_pixels: int | None = None,
                    seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel features [N, D] and their classes [N] from features [B, D, h, w] and full-size
    labels [B, H, W]: labels downsampled with nearest to the feature size (docs/method.md §2,
    step 4), ignored pixels dropped, then at most ``max_pixels`` kept by a seeded draw."""
    small = downsample_labels(labels, features.shape[-2:])
    points = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
    classes = small.reshape(-1)
    keep = (classes != IGNORE_INDEX).nonzero().squeeze(1)
    if max_pixels is not None and keep.numel() > max_pixels:
        draw = torch.randperm(keep.numel(), generator=torch.Generator().manual_seed(seed))[:max_pixels]
        keep = keep[draw.sort().values]
    return points[keep], classes[keep]


def pca(points: torch.Tensor, k: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [D] and the top-``k`` principal axes [k, D] of points [N, D] (SVD of the centred
    points), each axis signed so that its largest-magnitude entry is positive (a fixed sign
    makes the pictures the same on every machine)."""
    points = points.double()
    mean = points.mean(dim=0)
    axes = torch.linalg.svd(points - mean, full_matrices=False).Vh[:k]
    signs = torch.sign(axes.gather(1, axes.abs().argmax(dim=1, keepdim=True)))
    return mean.float(), (axes * signs).float()


def project(points: torch.Tensor, mean: torch.Tensor, axes: torch.Tensor) -> torch.Tensor:
    """Coordinates [N, k] of points [N, D] on the principal ``axes`` [k, D] around ``mean``."""
    return (points.float() - mean) @ axes.T


def feature_rgb(features: torch.Tensor, mean: torch.Tensor, axes: torch.Tensor) -> torch.Tensor:
    """A feature map [D, h, w] as an RGB picture [h, w, 3] in [0, 1]: its coordinates on three
    principal axes, each stretched between its 2nd and 98th percentile."""
    coords = project(features.flatten(1).T, mean, axes[:3])
    low, high = coords.quantile(0.02, dim=0), coords.quantile(0.98, dim=0)
    rgb = ((coords - low) / (high - low).clamp(min=1e-6)).clamp(0, 1)
    return rgb.T.reshape(3, *features.shape[1:]).permute(1, 2, 0)


# ----------------------------------------------------------------------------- anchors


def anchor_separation(anchors: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Pairwise Euclidean distances [C, C] between category anchors (docs/method.md §2: the
    released anchors lie 4.78 to 13.91 apart, the scale on which Delta_d = 2.5 acts); rows and
    columns of classes without an anchor (count 0) are NaN."""
    distances = torch.cdist(anchors.double(), anchors.double())
    missing = counts <= 0
    distances[missing] = math.nan
    distances[:, missing] = math.nan
    return distances


@torch.no_grad()
def anchors_by_rule(model, dataset, num_classes: int, device, min_pixels: int = 10, count_cap: int = 3000,
                    modes=("faithful", "global"), batch_size: int = 16, max_images: int | None = None) -> dict:
    """Anchors [C, D] of the same model and source images under each anchor rule (docs/method.md §2):
    ``faithful`` (the released ``cac.py``) and ``global`` (the paper's plain centroid), one
    :class:`cag.anchors.AnchorAccumulator` per rule fed the same batches, in dataset order."""
    from .anchors import AnchorAccumulator

    n = len(dataset) if max_images is None else min(max_images, len(dataset))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(n)), batch_size=batch_size)
    model.eval()
    accumulators = {mode: AnchorAccumulator(num_classes, model.feature_dim, min_pixels, count_cap, mode) for mode in modes}
    for batch in loader:
        features, logits = model(batch["image"].to(device))
        labels = downsample_labels(batch["label"].to(device), features.shape[-2:])
        for accumulator in accumulators.values():
            accumulator.update(features.float(), labels, logits.argmax(1))
    return {mode: accumulator.anchors.cpu() for mode, accumulator in accumulators.items()}


def nearest_anchor_report(points: torch.Tensor, classes: torch.Tensor, anchors: torch.Tensor,
                          counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """How well pixel features sit at their class's anchor (paper eq. (1) distances), per class c:

    ``accuracy`` [C]: share of class-c pixels whose nearest anchor is c's; ``distance`` [C]:
    their mean distance to c's anchor; ``pixels`` [C]: their count. Classes without an anchor
    (count 0) are never the nearest, and their accuracy and distance are NaN, as are those of
    classes without pixels.
    """
    num_classes = anchors.shape[0]
    distances = anchor_distances(points.T[None, :, :, None], anchors)[0, :, :, 0]
    missing = counts.to(distances.device) <= 0
    nearest = distances.masked_fill(missing[:, None], math.inf).argmin(dim=0)
    own = distances.gather(0, classes[None]).squeeze(0)
    pixels = torch.bincount(classes, minlength=num_classes).double()
    hits = torch.bincount(classes[nearest == classes], minlength=num_classes).double()
    total = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, classes, own.double())
    accuracy, distance = hits / pixels, total / pixels
    accuracy[missing], distance[missing] = math.nan, math.nan
    return {"accuracy": accuracy, "distance": distance, "pixels": pixels}


def nearest_anchor_overall(report: dict[str, torch.Tensor], counts: torch.Tensor) -> tuple[float, float]:
    """One number each for a :func:`nearest_anchor_report`, over the pixels of classes that have
    an anchor: the share whose nearest anchor is their class's, and their mean distance to it."""
    weights = report["pixels"] * (counts.to(report["pixels"].device) > 0)
    total = weights.sum()
    return (float((report["accuracy"].nan_to_num() * weights).sum() / total),
            float((report["distance"].nan_to_num() * weights).sum() / total))


def feature_space_panel(model, images: torch.Tensor, labels: torch.Tensor, anchors: torch.Tensor,
                        counts: torch.Tensor, mean: torch.Tensor, axes: torch.Tensor, device, title: str,
                        max_pixels: int = 5000) -> tuple[dict, dict[str, torch.Tensor]]:
    """The labelled pixels of ``images`` under ``model``, projected on the anchors' principal axes
    (``mean``, ``axes`` from :func:`pca`), as a panel for ``figures.plot_feature_space``, and
    their :func:`nearest_anchor_report`."""
    features, _ = features_and_logits(model, images, device)
    points, classes = labelled_pixels(features, labels, max_pixels=max_pixels)
    has_anchor = counts > 0
    panel = {"title": title, "points": project(points, mean, axes), "classes": classes,
             "anchors": project(anchors[has_anchor], mean, axes), "anchor_classes": has_anchor.nonzero().squeeze(1)}
    return panel, nearest_anchor_report(points, classes, anchors, counts)


# ----------------------------------------------------------------------------- pseudo-labels


@torch.no_grad()
def pseudo_label_maps(features: torch.Tensor, logits: torch.Tensor, anchors: torch.Tensor, counts: torch.Tensor,
                      delta_d=2.5, prob_threshold=0.95) -> dict[str, torch.Tensor]:
    """The frozen pseudo-labeller's maps for a batch, as :func:`cag.stages.cag_train_step` builds
    them (docs/method.md §3), all [B, h, w]:

    ``anchor``: eq. (2) active-target labels (255 = inactive; classes without an anchor are
    excluded); ``probability``: softmax > ``prob_threshold`` labels; ``nearest`` and
    ``margin``: the nearest anchor's class and the second-nearest minus nearest distance
    (eq. (1)), the two quantities eq. (2) tests against Delta_d.
    """
    valid = counts.to(features.device) > 0
    distances = anchor_distances(features, anchors)
    distances = torch.where(valid.view(1, -1, 1, 1), distances, distances.new_tensor(math.inf))
    nearest, margin = nearest_anchor_margin(distances)
    return {
        "anchor": anchor_pseudo_labels(features, anchors, delta_d, valid=valid),
        "probability": probability_pseudo_labels(logits, prob_threshold),
        "nearest": nearest,
        "margin": margin,
    }


def sum_quality(total: dict | None, batch: dict) -> dict:
    """Adds one batch's :func:`cag.pseudo_labels.pseudo_label_quality` counts to a running total
    and recomputes the rates (:func:`cag.pseudo_labels.quality_rates`)."""
    counts = {key: batch[key].cpu() + (total[key] if total else 0) for key in QUALITY_COUNTS}
    return {**counts, **quality_rates(counts)}


@torch.no_grad()
def split_pseudo_label_quality(model, dataset, anchors: torch.Tensor, counts: torch.Tensor, num_classes: int,
                               device, delta_ds=(2.5,), prob_threshold=0.95, batch_size: int = 16,
                               max_images: int | None = None) -> dict:
    """Per-class precision and recall of a pseudo-labeller's labels over a labelled target split.

    The released code logs the same with ``calc_recall`` (docs/method.md §3; target labels are read
    for this monitoring only, never by a loss). Each image is labelled whole (no crop), ground
    truth is downsampled with nearest to the feature size. Returns ``{"probability": quality,
    "anchor": {delta_d: quality}}``, each quality a :func:`cag.pseudo_labels.pseudo_label_quality`
    dict summed over the split: ``precision`` [C], ``recall`` [C] (the share of
    class-c pixels that received the right pseudo-label) and ``active_fraction``.
    """
    n = len(dataset) if max_images is None else min(max_images, len(dataset))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(n)), batch_size=batch_size)
    anchors, counts = anchors.to(device), counts.to(device)
    model.eval()
    probability, anchor = None, dict.fromkeys(delta_ds)
    for batch in loader:
        features, logits = model(batch["image"].to(device))
        target = downsample_labels(batch["label"].to(device), features.shape[-2:])
        prob_labels = probability_pseudo_labels(logits.float(), prob_threshold)
        probability = sum_quality(probability, pseudo_label_quality(prob_labels, target, num_classes))
        for delta in delta_ds:
            labels = anchor_pseudo_labels(features.float(), anchors, delta, valid=counts > 0)
            anchor[delta] = sum_quality(anchor[delta], pseudo_label_quality(labels, target, num_classes))
    return {"probability": probability, "anchor": anchor}


def mean_precision_recall(quality: dict) -> tuple[float, float]:
    """Pixel-weighted precision (correct / assigned) and recall (correct / ground truth) over
    all classes of a summed quality dict: the two sides of the Delta_d trade-off (docs/method.md §3)."""
    correct = float(quality["correct"].sum())
    assigned, truth = float(quality["assigned"].sum()), float(quality["ground_truth"].sum())
    return (correct / assigned if assigned else math.nan, correct / truth if truth else math.nan)


def stage_labellers(cfg: Config) -> list[tuple[int, Path, Path]]:
    """(stage k, frozen pseudo-labeller checkpoint, anchor file) of every CAG stage of a finished run
    (the benchmark's ``pseudo_labels.csv``: :func:`pseudo_label_counts`, :func:`pseudo_label_rows`)."""
    from .pipeline import Pipeline

    pipeline = Pipeline(cfg)
    out = []
    for k in range(1, cfg.cag.stages + 1):
        labeller = pipeline.model_of("warmup" if k == 1 else f"stage{k - 1}")
        anchors = pipeline.stage_dir("anchors") / "anchors.pt"
        if cfg.anchors.recompute_per_stage and k > 1:
            anchors = pipeline.stage_dir(f"stage{k}") / "anchors" / "anchors.pt"
        out.append((k, labeller, anchors))
    return out


def labeller_quality(cfg: Config, labeller: Path, anchors_path: Path, delta_ds, max_images: int | None = None,
                     cache_dir: Path | None = None) -> dict:
    """:func:`split_pseudo_label_quality` of the checkpoint ``labeller`` over target train.

    With ``cache_dir`` (a run's ``chapter_cache/``) the result is kept there and a later call for
    the same labeller, anchors and settings and a subset of the margins reads it: chapter 7 asks
    for the warm-up labeller that chapter 5 measured (up to 500 full-size images in the paper
    profile). The key holds the labeller's and the anchor file's path, size and modification
    time, the split's root and length, ``max_images``, the batch size and the threshold.
    """
    from .anchors import load_anchors
    from .stages import eval_dataset, make_model, resolve_device

    dataset = eval_dataset(cfg, "train")
    files = [(str(Path(f).resolve()), Path(f).stat().st_size, Path(f).stat().st_mtime_ns) for f in (labeller, anchors_path)]
    key = {"files": files, "root": str(cfg.data.target_root), "images": len(dataset), "max_images": max_images,
           "batch_size": cfg.eval.batch_size, "prob_threshold": float(cfg.cag.prob_threshold)}
    delta_ds = [float(d) for d in delta_ds]
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"labeller-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]}.pt"
        if path.is_file():
            kept = torch.load(path, weights_only=True)
            if kept["key"] == key and set(delta_ds) <= set(kept["quality"]["anchor"]):
                return {"probability": kept["quality"]["probability"],
                        "anchor": {d: kept["quality"]["anchor"][d] for d in delta_ds}}
    device = resolve_device(cfg.device)
    anchors, counts = load_anchors(anchors_path)
    quality = split_pseudo_label_quality(make_model(cfg, device, labeller).eval(), dataset, anchors, counts,
                                         cfg.data.num_classes, device, delta_ds=delta_ds,
                                         prob_threshold=cfg.cag.prob_threshold, batch_size=cfg.eval.batch_size,
                                         max_images=max_images)
    quality = {"probability": {k: v.cpu() for k, v in quality["probability"].items()},
               "anchor": {d: {k: v.cpu() for k, v in q.items()} for d, q in quality["anchor"].items()}}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        torch.save({"key": key, "quality": quality}, partial)
        os.replace(partial, path)
    return quality


def pseudo_label_counts(cfg: Config, labeller: Path, anchors_path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Per-class pseudo-label counts of a frozen labeller over the target train split.

    Both rules of docs/method.md §3 at the stage's settings, ``anchor`` (eq. 1-2, margin
    ``cag.delta_d``) and ``probability`` (softmax > ``cag.prob_threshold``), each a
    :func:`cag.pseudo_labels.pseudo_label_quality` dict summed over the split by
    :func:`split_pseudo_label_quality` (whole images, labels downsampled by
    nearest). The labels exist on disk for this measurement only; no training run reads them.
    """
    from .anchors import load_anchors
    from .stages import eval_dataset, make_model, resolve_device

    device = resolve_device(cfg.device)
    anchors, anchor_counts = load_anchors(anchors_path)
    quality = split_pseudo_label_quality(make_model(cfg, device, labeller), eval_dataset(cfg, "train"), anchors,
                                         anchor_counts, cfg.data.num_classes, device, delta_ds=(cfg.cag.delta_d,),
                                         prob_threshold=cfg.cag.prob_threshold, batch_size=cfg.eval.batch_size)
    return {"anchor": quality["anchor"][cfg.cag.delta_d], "probability": quality["probability"]}


def pseudo_label_rows(counts: dict[str, dict[str, torch.Tensor]], num_classes: int, **fields) -> list[dict]:
    """One row per rule and class present in the ground truth or the pseudo-labels.

    precision = correct / assigned, recall = correct / ground truth, coverage = labelled /
    ground truth (the share of the class's pixels that get any pseudo-label, right or wrong).
    """
    rows = []
    for rule, c in counts.items():
        for index, name in enumerate(class_names(num_classes)):
            gt, assigned = int(c["ground_truth"][index]), int(c["assigned"][index])
            correct, labelled = int(c["correct"][index]), int(c["labelled"][index])
            if gt == 0 and assigned == 0:
                continue
            rows.append({**fields, "rule": rule, "class": name, "ground_truth_pixels": gt,
                         "assigned_pixels": assigned, "correct_pixels": correct, "labelled_pixels": labelled,
                         "precision": correct / assigned if assigned else None,
                         "recall": correct / gt if gt else None, "coverage": labelled / gt if gt else None})
    return rows


# ----------------------------------------------------------------------------- losses


def distance_loss_gradients(features: torch.Tensor, labels: torch.Tensor, anchors: torch.Tensor,
                            predictions: torch.Tensor, variant: str = "faithful",
                            min_pixels: int = 10) -> torch.Tensor:
    """Per-pixel gradient norm [B, h, w] of the distance loss L_dis with respect to the features
    (docs/method.md §5): with ``faithful`` every pixel of a kept (image, class) pair gets a push
    proportional to 2 / (h w), so large regions get more in total; with ``pixel_l2`` every
    labelled pixel gets the same unit-norm push divided by the number of labelled pixels."""
    features = features.detach().clone().requires_grad_(True)
    anchor_distance_loss(features, labels, anchors, predictions, variant=variant, min_pixels=min_pixels).backward()
    return torch.linalg.vector_norm(features.grad, dim=1)


# ----------------------------------------------------------------------------- tables


def markdown_table(header, rows, digits: int = 3) -> str:
    """A Markdown table; floats rounded to ``digits``, None and NaN shown as an en dash."""
    def cell(value):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "–"
        return f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
