"""What bf16 autocast changes in CAG's decisions and losses, measured against float32.

``train.precision`` is one switch for the numerics of a run (:data:`cag.config.PRECISIONS`):
``released`` is float32 with TF32 off, NCHW and eager, as the released code ran; ``fast`` turns
on bf16 autocast, TF32, channels-last and ``torch.compile`` together. Channels-last and
``torch.compile`` change the speed, not the arithmetic (up to the order of float additions).
bf16 autocast changes the arithmetic on every device, so its effect can be measured here, on
the CPU: :func:`bf16_effect` runs the frozen pseudo-labeller and the CAG objective on the same
images in float32 and under bf16 autocast and reports how many pixels change their pseudo-label
and how much each loss term moves. TF32 exists only on NVIDIA GPUs (Ampere and later), so its
effect can only be measured on one.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from .config import Config

LOSS_TERMS = ("ce_source", "ce_target", "dist_source", "dist_target", "total")


def _numerics(cfg: Config, amp: str) -> Config:
    """``cfg`` with the released numerics, except autocast ``amp`` (``"none"`` or ``"bf16"``)."""
    variant = copy.deepcopy(cfg)
    variant.train.precision = "custom"
    variant.train.amp, variant.train.tf32, variant.train.channels_last, variant.train.compile = amp, False, False, False
    return variant


def _relative(a: float, b: float) -> float:
    """``abs(b - a) / abs(a)``; 0 when both are 0, inf when only ``a`` is."""
    if a == b:
        return 0.0
    return abs(b - a) / abs(a) if a != 0 else float("inf")


@torch.no_grad()
def bf16_effect(cfg: Config, checkpoint, anchors, target_images: torch.Tensor, source_images: torch.Tensor,
                source_labels: torch.Tensor, batch_size: int = 8, device="cpu") -> dict:
    """Pseudo-labels and CAG losses of one model in float32 and under bf16 autocast, compared.

    ``checkpoint`` is the model a CAG stage starts from (its student and frozen pseudo-labeller
    both start there), ``anchors`` an anchors file (this project's or the authors' ``category_anchors``) or a pair
    (anchors [C, D], counts [C]); ``target_images`` [N, 3, H, W] are the images to pseudo-label,
    ``source_images`` [M, 3, H, W] with ``source_labels`` [M, H, W] feed the source terms. The
    images go through in batches of ``batch_size`` (one source and one target batch at a time,
    as a training step pairs them), each batch twice: with ``cfg``'s settings in float32, then
    under bf16 autocast. Both passes use :func:`cag.stages.cag_pseudo_labels` and
    :func:`cag.stages.cag_train_step` (hence :func:`cag.losses.cag_loss`), with the network in
    eval mode (no dropout, BatchNorm's running statistics) as student and pseudo-labeller, so
    that precision is the only difference between the two passes.

    Returns ``pixels`` (pseudo-label pixels compared); ``anchor_label_changed`` and
    ``probability_label_changed``, the fractions of those pixels whose anchor pseudo-label
    (active-target decision, paper eq. 1-2: a class or ignored) or probability pseudo-label
    differs between the passes; ``active_fraction`` and ``probability_fraction`` per pass (the
    pixels that get a label); per loss term of ``LOSS_TERMS``, ``losses`` (mean over the
    batches per pass), ``loss_relative_difference`` (``abs(bf16 - fp32) / abs(fp32)`` of those means) and
    ``loss_max_batch_relative_difference`` (the largest such difference of a single batch).
    """
    from . import stages
    from .anchors import read_anchors_file

    device = torch.device(device)
    if isinstance(anchors, (str, Path)):
        anchors = read_anchors_file(anchors)
    anchor_vectors, anchor_counts = (t.to(device) for t in anchors)
    if len(source_images) != len(source_labels):
        raise ValueError(f"source_images ({len(source_images)}) and source_labels ({len(source_labels)}) "
                         "must hold the same number of items")
    batches = min(len(target_images), len(source_images)) // batch_size
    if batches == 0:
        raise ValueError(f"need at least batch_size={batch_size} target and source images; got "
                         f"{len(target_images)} and {len(source_images)}")
    variants = {"fp32": _numerics(cfg, "none"), "bf16": _numerics(cfg, "bf16")}
    model = stages.make_model(variants["fp32"], device, checkpoint).eval()
    changed = {"anchor": 0, "probability": 0}
    labelled = {name: {"anchor": 0, "probability": 0} for name in variants}
    sums = {name: dict.fromkeys(LOSS_TERMS, 0.0) for name in variants}
    worst = dict.fromkeys(LOSS_TERMS, 0.0)
    pixels = 0
    for b in range(batches):
        part = slice(b * batch_size, (b + 1) * batch_size)
        xt, xs, ys = target_images[part].to(device), source_images[part].to(device), source_labels[part].to(device)
        maps, losses = {}, {}
        for name, variant in variants.items():
            maps[name] = stages.cag_pseudo_labels(variant, model, anchor_vectors, anchor_counts, xt, device)
            step = stages.cag_train_step(variant, model, model, anchor_vectors, anchor_counts, xs, ys, xt, device,
                                         pseudo_labels=maps[name])
            losses[name] = {term: float(step[term]) for term in LOSS_TERMS}
            for kind, labels in zip(("anchor", "probability"), maps[name]):
                labelled[name][kind] += int((labels != 255).sum())
            for term in LOSS_TERMS:
                sums[name][term] += losses[name][term]
        for kind, a, b16 in zip(("anchor", "probability"), maps["fp32"], maps["bf16"]):
            changed[kind] += int((a != b16).sum())
        pixels += maps["fp32"][0].numel()
        for term in LOSS_TERMS:
            worst[term] = max(worst[term], _relative(losses["fp32"][term], losses["bf16"][term]))
    means = {name: {term: value / batches for term, value in terms.items()} for name, terms in sums.items()}
    return {
        "images": batches * batch_size, "pixels": pixels,
        "anchor_label_changed": changed["anchor"] / pixels,
        "probability_label_changed": changed["probability"] / pixels,
        "active_fraction": {name: labelled[name]["anchor"] / pixels for name in variants},
        "probability_fraction": {name: labelled[name]["probability"] / pixels for name in variants},
        "losses": means,
        "loss_relative_difference": {term: _relative(means["fp32"][term], means["bf16"][term]) for term in LOSS_TERMS},
        "loss_max_batch_relative_difference": worst,
    }


def bf16_effect_of_run(cfg: Config, images: int = 64, stage: int = 1, batch_size: int = 8) -> dict:
    """:func:`bf16_effect` at the start of CAG stage ``stage`` of the run of ``cfg`` (finished up to its anchors).

    The model is the one the stage starts from (:meth:`cag.pipeline.Pipeline.model_of`), the
    anchors are the run's; the first ``images`` target train images (unaugmented, as stored, at
    ``data.target_resize``) are pseudo-labelled, and the first ``images`` source images with their
    labels (as the anchor pass reads them) feed the source terms. The result adds ``checkpoint``
    and ``anchors`` (the files used).
    """
    from . import analysis, stages
    from .data import transforms
    from .loop import Augmented
    from .pipeline import Pipeline

    pipeline = Pipeline(cfg)
    previous = "warmup" if stage == 1 else f"stage{stage - 1}"
    missing = [s for s in ("anchors", previous) if pipeline.done(s) is None]
    if missing:
        raise FileNotFoundError(f"{pipeline.run_dir}: {', '.join(missing)} not finished for this configuration; "
                                f"run `python -m cag run CONFIG --until anchors` (and the stages before stage{stage}) first")
    checkpoint = pipeline.model_of(previous)
    anchors = pipeline.stage_dir("anchors") / "anchors.pt"
    resize = tuple(cfg.data.target_resize) if cfg.data.target_resize else None
    target = Augmented(stages.target_dataset(cfg, "train", labels=False), transforms.eval_transform(resize=resize), cfg.seed)
    target_images = torch.stack([target[i]["image"] for i in range(min(images, len(target)))])
    source = analysis.source_eval_dataset(cfg)
    source_images, source_labels = analysis.stack_items(source, range(min(images, len(source))))
    result = bf16_effect(cfg, checkpoint, anchors, target_images, source_images, source_labels, batch_size=batch_size)
    return {"checkpoint": str(checkpoint), "anchors": str(anchors), **result}
