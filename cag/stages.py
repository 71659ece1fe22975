"""The stages of the CAG-UDA schedule (method-spec sections 5 and 9), each a function.

``source_only`` trains on labelled source crops; ``warmup`` adds the global output-space
adversarial alignment (a reconstruction: the authors never released theirs); ``compute_anchors``
averages source features per class with the warm-up model (section 2); ``cag_stage`` trains a
student against a frozen pseudo-labeller with the CAG objective (sections 3-4); ``evaluate``
scores a checkpoint on a target split at full resolution (section 6). Every training stage runs
in :func:`cag.loop.run_loop`, so each one resumes after a crash.
"""
from __future__ import annotations

import copy
import json
import platform
import subprocess
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import distributed as dist
from .adversarial import FCDiscriminator, discriminator_loss, generator_adversarial_loss
from .anchors import AnchorAccumulator, downsample_labels, load_anchors, load_cag_uda_anchors, save_anchors
from .checkpoint import load_checkpoint, save_checkpoint
from .config import Config
from .evaluate import evaluate_model
from .labels import class_names
from .loop import Augmented, LoopSpec, Stream, run_loop
from .losses import cag_loss, segmentation_ce
from .models import build_model
from .pseudo_labels import anchor_pseudo_labels, probability_pseudo_labels


# ----------------------------------------------------------------------------- set-up


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; under torchrun each rank takes its LOCAL_RANK GPU."""
    import os

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device


def seed_everything(seed: int, device: torch.device) -> None:
    """Seed torch (and make CPU runs bit-reproducible; cuDNN autotuning on CUDA, method-spec 5)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        torch.use_deterministic_algorithms(True, warn_only=True)


def make_model(cfg: Config, device: torch.device, init=None) -> nn.Module:
    """Build the configured network and load ``init`` (a project or released checkpoint)."""
    extra = {} if cfg.model.arch == "deeplabv2" else {"output_stride": cfg.model.output_stride, "feature_dim": cfg.model.feature_dim}
    if cfg.model.aspp_rates is not None:
        extra["aspp_rates"] = tuple(cfg.model.aspp_rates)
    model = build_model(cfg.model.arch, num_classes=cfg.data.num_classes, backbone=cfg.model.backbone,
                        pretrained_backbone=cfg.model.pretrained_backbone, normalize=cfg.data.normalize, **extra)
    if init is not None:
        model.load_state_dict(read_model_state(init), strict=True)
    model.to(device)
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.train.compile:
        model.compile()
    return model


def read_model_state(path) -> dict:
    """The model weights in a project checkpoint (``best_val.pt``/``last.pt``) or a released one."""
    from .checkpoint import load_cag_uda_checkpoint

    ckpt = load_checkpoint(path)
    if isinstance(ckpt, dict) and "model" in ckpt:
        return ckpt["model"]
    if isinstance(ckpt, dict) and "modules" in ckpt:
        return ckpt["modules"]["model"]
    return load_cag_uda_checkpoint(path)


def _datasets():
    from . import data

    return data


def source_dataset(cfg: Config):
    """The labelled source set (GTA5 or SYNTHIA layout), without a transform."""
    data = _datasets()
    if cfg.data.source == "gta5":
        return data.GTA5(cfg.data.source_root, list_file=cfg.data.source_list, num_classes=cfg.data.num_classes)
    return data.Synthia(cfg.data.source_root, num_classes=cfg.data.num_classes, list_file=cfg.data.source_list)


def target_dataset(cfg: Config, split: str, labels: bool):
    """A Cityscapes-layout split, without a transform."""
    data = _datasets()
    list_file = cfg.data.target_train_list if split == "train" else None
    return data.Cityscapes(cfg.data.target_root, split=split, labels=labels, list_file=list_file, num_classes=cfg.data.num_classes)


def train_stream(cfg: Config, dataset, resize, batch_size: int, seed: int, device: torch.device) -> Stream:
    """Augmented, endless batches (method-spec 5: resize, random width, crop, flip, [0, 1])."""
    from .data import transforms

    transform = transforms.train_transform(
        resize=tuple(resize) if resize else None, base_width=cfg.data.base_width, scale=tuple(cfg.data.scale),
        crop=tuple(cfg.data.crop), flip=cfg.data.flip, normalize="none",
    )
    return Stream(Augmented(dataset, transform, seed), batch_size, seed, num_workers=cfg.data.num_workers,
                  pin_memory=device.type == "cuda")


def eval_dataset(cfg: Config, split: str):
    from .data import transforms

    return Augmented(target_dataset(cfg, split, labels=True),
                     transforms.eval_transform(resize=tuple(cfg.eval.resize) if cfg.eval.resize else None), cfg.seed)


def autocast(cfg: Config, device: torch.device):
    """bf16 autocast on CUDA when ``train.amp=bf16`` (method-spec 10 is fp32; issue 'speed')."""
    if cfg.train.amp == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def to_device(batch: dict, device: torch.device, channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    image = batch["image"].to(device, non_blocking=True)
    if channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    label = batch.get("label")
    return image, (label.to(device, non_blocking=True) if label is not None else None)


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel with synchronised BatchNorm when several ranks run."""
    if dist.world_size() == 1:
        return model
    model = dist.convert_sync_batchnorm(model, device.type).to(device)
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: torch.device) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})"
    return {"device": name, "torch": torch.__version__, "python": platform.python_version(),
            "world_size": dist.world_size(), "threads": torch.get_num_threads()}


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _validator(cfg: Config, model: nn.Module, device: torch.device):
    dataset = eval_dataset(cfg, cfg.data.val_split)

    def validate() -> dict:
        cm = evaluate_model(_unwrap(model), dataset, cfg.data.num_classes, device, batch_size=cfg.eval.batch_size,
                            max_images=cfg.train.val_max_images, amp=cfg.train.amp == "bf16", quiet=True,
                            num_workers=cfg.data.num_workers)
        return {"miou": cm.miou()}

    return validate


def _unwrap(model):
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _sgd(params, cfg: Config, lr: float) -> torch.optim.Optimizer:
    """SGD with momentum 0.9 and weight decay 2e-4 (method-spec 5, 'Optimiser / schedule')."""
    return torch.optim.SGD(params, lr=lr, momentum=cfg.train.momentum, weight_decay=cfg.train.weight_decay)


def _micro_batch(cfg: Config) -> int:
    """Images per forward pass: the batch split into ``train.grad_accum`` equal parts (validated in config)."""
    return cfg.train.batch_size // cfg.train.grad_accum


def _write_summary(stage_dir: Path, cfg: Config, state, device: torch.device, started: float, extra: dict) -> dict:
    summary = {
        "stage": stage_dir.name, "iters": state.iteration, "best_val_miou": state.best_val if state.best_iter >= 0 else None,
        "best_val_iter": state.best_iter, "nan_skips": state.nan_skips, "seed": cfg.seed, "commit": git_commit(),
        "wall_seconds": time.time() - started,
        "images_per_s": state.images_seen / state.train_seconds if state.train_seconds > 0 else None,
        "peak_memory_gib": peak_memory_gib(device), **environment(device), **extra, "config": cfg.to_dict(),
    }
    if dist.is_main():
        (stage_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True, default=str))
    return summary


# ----------------------------------------------------------------------------- stages


def supervised_stage(cfg: Config, stage_dir: Path, fingerprint: str, *, domain: str = "source", init=None) -> dict:
    """Source-only training (method-spec 9, step 2a), or the target-trained upper bound.

    Pixel cross-entropy on augmented labelled crops. ``domain="target"`` trains on the target
    train split's labels instead: the oracle no adaptation method may use.
    """
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed, device)
    started = time.time()
    model = wrap_ddp(make_model(cfg, device, init or cfg.model.init), device)
    dataset, resize = (source_dataset(cfg), cfg.data.source_resize) if domain == "source" else \
        (target_dataset(cfg, "train", labels=True), cfg.data.target_resize)
    micro = _micro_batch(cfg)
    stream = train_stream(cfg, dataset, resize, micro, cfg.seed, device)
    optimizer = _sgd(model.parameters(), cfg, cfg.source_only.lr)

    def step(i: int) -> dict:
        total = torch.zeros((), device=device)
        for _ in range(cfg.train.grad_accum):
            image, label = to_device(stream.next(), device, cfg.train.channels_last)
            with autocast(cfg, device):
                _, logits = model(image)
                loss = segmentation_ce(logits.float(), label) / cfg.train.grad_accum
            loss.backward()
            total = total + loss.detach()
        return {"total": total, "ce_source": total}

    model.train()
    state = run_loop(LoopSpec(
        stage_dir=stage_dir, iters=cfg.source_only.iters, modules={"model": model}, optimizers={"model": optimizer},
        base_lrs={"model": cfg.source_only.lr}, poly_horizon=cfg.source_only.poly_horizon or max(cfg.source_only.iters, 1),
        poly_power=cfg.train.poly_power, step=step, streams={"source": stream}, validate=_validator(cfg, model, device),
        val_interval=cfg.train.val_interval, checkpoint_interval=cfg.train.checkpoint_interval,
        log_interval=cfg.train.log_interval, nan_policy=cfg.train.nan_policy, max_nan_skips=cfg.train.max_nan_skips,
        images_per_step=cfg.train.batch_size, fingerprint=fingerprint, quiet=cfg.quiet, description=stage_dir.name,
    ))
    return _write_summary(stage_dir, cfg, state, device, started, {"domain": domain})


def _param_groups(model: nn.Module, head_mult: float) -> list[dict]:
    backbone = [p for n, p in model.named_parameters() if n.startswith("backbone.")]
    head = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
    return [{"params": backbone, "lr_mult": 1.0}, {"params": head, "lr_mult": head_mult}]


def _freeze_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def warmup_stage(cfg: Config, stage_dir: Path, fingerprint: str, init) -> dict:
    """The warm-up: source CE plus global output-space adversarial alignment (method-spec 5, 9 step 2b).

    A reconstruction, labelled so in the book: D is an AdaptSegNet ``FCDiscriminator`` on the
    softmax of the crop-size logits, trained with Adam (lr_d, betas 0.9/0.99); the network is
    trained with SGD, ``head_lr_mult`` on everything but the backbone, on
    CE_s + lambda_adv * L_adv(target looks like source).
    """
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed, device)
    started = time.time()
    model = make_model(cfg, device, init)
    disc = FCDiscriminator(cfg.data.num_classes, cfg.warmup.disc_channels).to(device)
    optimizer = _sgd(_param_groups(model, cfg.warmup.head_lr_mult), cfg, cfg.warmup.lr)
    model, disc = wrap_ddp(model, device), wrap_ddp(disc, device)
    optimizer_d = torch.optim.Adam(disc.parameters(), lr=cfg.warmup.lr_d, betas=(0.9, 0.99))
    micro = _micro_batch(cfg)
    source = train_stream(cfg, source_dataset(cfg), cfg.data.source_resize, micro, cfg.seed, device)
    target = train_stream(cfg, target_dataset(cfg, "train", labels=False), cfg.data.target_resize, micro, cfg.seed + 1, device)

    def step(i: int) -> dict:
        sums = {"ce_source": 0.0, "adv": 0.0, "disc": 0.0}
        for _ in range(cfg.train.grad_accum):
            xs, ys = to_device(source.next(), device, cfg.train.channels_last)
            xt, _ = to_device(target.next(), device, cfg.train.channels_last)
            disc.requires_grad_(False)
            with autocast(cfg, device):
                _, logits_s = model(xs)
                _, logits_t = model(xt)
                up_s = F.interpolate(logits_s.float(), size=ys.shape[-2:], mode="bilinear", align_corners=True)
                up_t = F.interpolate(logits_t.float(), size=xt.shape[-2:], mode="bilinear", align_corners=True)
                ce = segmentation_ce(up_s, ys)
                adv = generator_adversarial_loss(disc, up_t.softmax(1), cfg.warmup.gan)
            ((ce + cfg.warmup.lambda_adv * adv) / cfg.train.grad_accum).backward()
            disc.requires_grad_(True)
            with autocast(cfg, device):
                d_loss = discriminator_loss(disc, up_s.softmax(1), up_t.softmax(1), cfg.warmup.gan)
            (d_loss / cfg.train.grad_accum).backward()
            for key, value in (("ce_source", ce), ("adv", adv), ("disc", d_loss)):
                sums[key] = sums[key] + value.detach() / cfg.train.grad_accum
        sums["total"] = sums["ce_source"] + cfg.warmup.lambda_adv * sums["adv"]
        return sums

    model.train()
    if cfg.warmup.freeze_bn:
        _freeze_bn(model)
    state = run_loop(LoopSpec(
        stage_dir=stage_dir, iters=cfg.warmup.iters, modules={"model": model, "disc": disc},
        optimizers={"model": optimizer, "disc": optimizer_d}, base_lrs={"model": cfg.warmup.lr, "disc": cfg.warmup.lr_d},
        poly_horizon=cfg.warmup.poly_horizon or max(cfg.warmup.iters, 1), poly_power=cfg.train.poly_power, step=step,
        streams={"source": source, "target": target}, validate=_validator(cfg, model, device),
        val_interval=cfg.train.val_interval, checkpoint_interval=cfg.train.checkpoint_interval,
        log_interval=cfg.train.log_interval, nan_policy=cfg.train.nan_policy, max_nan_skips=cfg.train.max_nan_skips,
        images_per_step=2 * cfg.train.batch_size, fingerprint=fingerprint, quiet=cfg.quiet, description=stage_dir.name,
    ))
    return _write_summary(stage_dir, cfg, state, device, started, {"init": str(init)})


@torch.no_grad()
def compute_anchors(cfg: Config, stage_dir: Path, model_path) -> dict:
    """Category anchors from the warm-up model over source images (method-spec 2, ``cac.py``).

    No augmentation; images at ``anchors.resize`` (the released 1914x1052); ``anchors.num_images``
    images in a seeded shuffled order (released: 2,972 x 4); labels downsampled with nearest to
    the feature size; the faithful rule counts only pixels the model classifies correctly.
    With ``anchors.file`` set, the authors' shipped anchors are used instead. Under torchrun the
    pipeline calls this on rank 0 alone (a single pass over source images, no gradients).
    """
    from .data import transforms

    device = resolve_device(cfg.device)
    stage_dir.mkdir(parents=True, exist_ok=True)
    if cfg.anchors.file:
        anchors, counts = load_cag_uda_anchors(cfg.anchors.file)
        save_anchors(stage_dir / "anchors.pt", anchors, counts, source=str(cfg.anchors.file))
        return {"anchors": str(stage_dir / "anchors.pt"), "counts": counts.tolist(), "source": str(cfg.anchors.file)}
    model = make_model(cfg, device, model_path).eval()
    dataset = Augmented(source_dataset(cfg), transforms.eval_transform(
        resize=tuple(cfg.anchors.resize) if cfg.anchors.resize else None), cfg.seed)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    order = order[: cfg.anchors.num_images or len(order)]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, order), batch_size=cfg.anchors.batch_size,
                                         num_workers=cfg.data.num_workers)
    acc = AnchorAccumulator(cfg.data.num_classes, model.feature_dim, min_pixels=cfg.anchors.min_pixels,
                            count_cap=cfg.anchors.count_cap, mode=cfg.anchors.mode)
    from tqdm.auto import tqdm

    for batch in tqdm(loader, desc=stage_dir.name, disable=cfg.quiet, unit="batch"):
        image, label = to_device(batch, device)
        with autocast(cfg, device):
            features, logits = model(image)
        small = downsample_labels(label, features.shape[-2:])
        acc.update(features.float(), small, logits.argmax(1))
    save_anchors(stage_dir / "anchors.pt", acc.anchors, acc.counts, model=str(model_path), mode=cfg.anchors.mode)
    return {"anchors": str(stage_dir / "anchors.pt"), "counts": acc.counts.tolist(), "images": len(order)}


def cag_train_step(cfg: Config, student: nn.Module, teacher: nn.Module, anchors: torch.Tensor, anchor_counts: torch.Tensor,
                   xs: torch.Tensor, ys: torch.Tensor, xt: torch.Tensor, device: torch.device,
                   yt: torch.Tensor | None = None) -> dict:
    """Forward pass and losses of one CAG iteration (method-spec 3-4); the caller runs backward.

    The frozen pseudo-labeller labels the target crop (active targets, eq. 1-2, and probability
    pseudo-labels); the student sees the source and target crops in separate passes (per-domain
    BatchNorm statistics, as released) or one fused pass (``cag.fuse_forward``). Classes whose
    anchor count is 0 take part in neither the active-target test nor the distance losses.
    Given the target crop's labels ``yt`` (monitoring only, as the released ``calc_recall``;
    they never reach a loss), the precision of both pseudo-label maps is added to the result.
    """
    with torch.no_grad(), autocast(cfg, device):
        t_features, t_logits = teacher(xt)
    valid = anchor_counts > 0
    anchor_labels = anchor_pseudo_labels(t_features.float(), anchors, cfg.cag.delta_d, valid=valid)
    prob_labels = probability_pseudo_labels(t_logits.float(), cfg.cag.prob_threshold)
    with autocast(cfg, device):
        if cfg.cag.fuse_forward:
            features, logits = student(torch.cat([xs, xt]))
            fs, ft = features.split(len(xs))
            ls, lt = logits.split(len(xs))
        else:
            fs, ls = student(xs)
            ft, lt = student(xt)
    losses = cag_loss(ls.float(), ys, fs.float(), lt.float(), ft.float(), anchors, anchor_labels, prob_labels,
                      lam=cfg.cag.lam, pseudo_label_mode=cfg.cag.pseudo_labels,
                      distance_variant=cfg.cag.distance_loss, min_pixels=cfg.cag.min_pixels, anchor_valid=valid)
    losses["active_fraction"] = (anchor_labels != 255).float().mean()
    if yt is not None:
        small = downsample_labels(yt, anchor_labels.shape[-2:])
        for name, pseudo in (("anchor", anchor_labels), ("probability", prob_labels)):
            assigned = (pseudo != 255) & (small != 255)
            correct = (assigned & (pseudo == small)).sum()
            losses[f"precision_{name}"] = correct / assigned.sum().clamp(min=1)
    return losses


def cag_stage(cfg: Config, stage_dir: Path, fingerprint: str, init, anchors_path) -> dict:
    """One CAG stage (method-spec 3-5): student and frozen pseudo-labeller both start at ``init``.

    Each iteration the frozen model labels the same augmented target crop the student sees:
    active targets by the anchor margin test (eq. 1-2, ``cag.delta_d``) and probability
    pseudo-labels (``cag.prob_threshold``), combined per ``cag.pseudo_labels``; the student
    minimises CE_s + CE_t + lam * (L_dis_s + L_dis_t) with one SGD step.
    """
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed, device)
    started = time.time()
    student = make_model(cfg, device, init)
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    student = wrap_ddp(student, device)
    anchors, counts = load_anchors(anchors_path)
    anchors, counts = anchors.to(device), counts.to(device)
    optimizer = _sgd(student.parameters(), cfg, cfg.cag.lr)
    micro = _micro_batch(cfg)
    source = train_stream(cfg, source_dataset(cfg), cfg.data.source_resize, micro, cfg.seed, device)
    monitor = cfg.data.target_train_labels
    target = train_stream(cfg, target_dataset(cfg, "train", labels=monitor), cfg.data.target_resize, micro, cfg.seed + 1, device)

    def step(i: int) -> dict:
        sums: dict = {}
        for _ in range(cfg.train.grad_accum):
            xs, ys = to_device(source.next(), device, cfg.train.channels_last)
            xt, yt = to_device(target.next(), device, cfg.train.channels_last)
            losses = cag_train_step(cfg, student, teacher, anchors, counts, xs, ys, xt, device, yt if monitor else None)
            (losses["total"] / cfg.train.grad_accum).backward()
            for key, value in losses.items():
                sums[key] = sums.get(key, 0.0) + value.detach() / cfg.train.grad_accum
        return sums

    student.train()
    state = run_loop(LoopSpec(
        stage_dir=stage_dir, iters=cfg.cag.iters, modules={"model": student}, optimizers={"model": optimizer},
        base_lrs={"model": cfg.cag.lr}, poly_horizon=cfg.cag.poly_horizon, poly_power=cfg.train.poly_power, step=step,
        streams={"source": source, "target": target}, validate=_validator(cfg, student, device),
        val_interval=cfg.train.val_interval, checkpoint_interval=cfg.train.checkpoint_interval,
        log_interval=cfg.train.log_interval, nan_policy=cfg.train.nan_policy, max_nan_skips=cfg.train.max_nan_skips,
        images_per_step=2 * cfg.train.batch_size, fingerprint=fingerprint, quiet=cfg.quiet, description=stage_dir.name,
    ))
    return _write_summary(stage_dir, cfg, state, device, started, {"init": str(init), "anchors": str(anchors_path)})


def evaluate(cfg: Config, checkpoint, split: str) -> dict:
    """mIoU and per-class IoU of a checkpoint on a target split (method-spec 6).

    Full resolution, single scale unless ``eval.flip``/``eval.scales`` say otherwise; for a
    16-class model the standard 13-class mIoU* (from the 16 per-class IoUs) is added.
    """
    device = resolve_device(cfg.device)
    model = make_model(cfg, device, checkpoint).eval()
    cm = evaluate_model(model, eval_dataset(cfg, split), cfg.data.num_classes, device, batch_size=cfg.eval.batch_size,
                        flip=cfg.eval.flip, scales=tuple(cfg.eval.scales), amp=cfg.train.amp == "bf16", quiet=cfg.quiet,
                        num_workers=cfg.data.num_workers)
    names = class_names(cfg.data.num_classes)
    iou = cm.iou()
    result = {"path": str(checkpoint), "split": split, "miou": cm.miou(),
              "per_class_iou": {n: (None if torch.isnan(v) else float(v)) for n, v in zip(names, iou)}}
    if cfg.data.num_classes == 16:
        from .metrics import miou13_from_16

        result["miou13"] = float(miou13_from_16(iou))
    return result
