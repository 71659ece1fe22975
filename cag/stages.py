"""The stages of the CAG-UDA schedule (docs/method.md §6-§8), each a function.

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
from .anchors import AnchorAccumulator, downsample_labels, load_anchors, read_anchors_file, save_anchors
from .checkpoint import load_checkpoint, save_checkpoint
from .config import Config
from .evaluate import evaluate_model
from .labels import class_names
from .data.datasets import loader_workers
from .loop import Augmented, LoopSpec, Stream, collate, run_loop
from .losses import cag_loss, cag_loss_counts, labelled_pixel_count, segmentation_ce
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


def backend_flags(device_type: str, tf32: bool = False) -> dict:
    """Set the process-wide numerics flags of a run on ``device_type``; return what was set.

    CUDA: cuDNN autotuning on and TF32 for float32 matmuls and cuDNN convolutions
    exactly as ``tf32`` says; PyTorch's own default allows TF32 in cuDNN convolutions, so the
    released float32 (``train.precision=released``) switches it off. CPU: deterministic algorithms
    (bit-reproducible runs); TF32 does not exist there and its flags are left alone.
    """
    if device_type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        return {"cudnn.benchmark": True, "cuda.matmul.allow_tf32": tf32, "cudnn.allow_tf32": tf32}
    torch.use_deterministic_algorithms(True, warn_only=True)
    return {"deterministic_algorithms": True}


def seed_everything(seed: int, device: torch.device, tf32: bool = False) -> dict:
    """Seed Python, numpy and torch, and set the backend flags (:func:`backend_flags`).

    TF32 stays off unless ``tf32`` asks for it (the stages pass ``train.tf32``, which
    ``train.precision=fast`` turns on). Returns the flags set.
    """
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return backend_flags(device.type, tf32)


def check_initialisation(cfg: Config, init=None) -> None:
    """Refuse a ResNet network that nothing initialises: no ImageNet backbone, no ``init`` checkpoint.

    The released code always starts the backbone from torchvision's ImageNet weights; a silent
    random start would train for days towards another result. ``model.from_scratch=true`` asks
    for random weights on purpose; the ``tiny`` backbone of the built-in benchmark has no
    ImageNet weights and always starts from scratch. Raises ConfigError naming the key, the file
    expected and how to get it.
    """
    from .config import ConfigError
    from .models import IMAGENET_WEIGHT_FILES

    model = cfg.model
    files = IMAGENET_WEIGHT_FILES.get(model.backbone)
    if files is None or init is not None or model.pretrained_backbone is not None or model.from_scratch:
        return
    raise ConfigError(
        f"model.pretrained_backbone: not set, so the {model.backbone} backbone would start from random weights "
        f"(the released code always starts from torchvision's ImageNet weights). Set "
        f"model.pretrained_backbone=/path/to/{files[0]} (torchvision's ImageNet file; {files[1]} is its pre-0.13 "
        f"name, the file the released code loads): on a machine with internet, python -c \"import torchvision; torchvision.models.{model.backbone}(weights='IMAGENET1K_V1')\" "
        f"downloads it into the torch hub cache (~/.cache/torch/hub/checkpoints/, or $TORCH_HOME/hub/checkpoints/); "
        f"copy it from there. To start the whole network from a checkpoint instead, set model.init=FILE; to train "
        f"from random weights on purpose, set model.from_scratch=true")


def make_model(cfg: Config, device: torch.device, init=None) -> nn.Module:
    """Build the configured network and load ``init`` (a project or released checkpoint).

    Refuses a ResNet that nothing initialises (:func:`check_initialisation`). ``train.channels_last``
    and ``train.compile`` (both on with ``train.precision=fast``) apply to the model returned; on
    CUDA the TF32 flags are set to ``train.tf32`` here too, so that evaluation and the anchor pass
    run with the numerics of the training stages.
    """
    check_initialisation(cfg, init)
    if device.type == "cuda":
        backend_flags("cuda", cfg.train.tf32)
    extra = {} if cfg.model.arch == "deeplabv2" else {"output_stride": cfg.model.output_stride, "feature_dim": cfg.model.feature_dim}
    if cfg.model.aspp_rates is not None:
        extra["aspp_rates"] = tuple(cfg.model.aspp_rates)
    model = build_model(cfg.model.arch, num_classes=cfg.data.num_classes, backbone=cfg.model.backbone,
                        pretrained_backbone=cfg.model.pretrained_backbone, normalize=cfg.data.normalize, **extra)
    if init is not None:
        model.load_state_dict(read_model_state(init, model), strict=True)
    model.to(device)
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.train.compile:
        model.compile()
    return model


def read_model_state(path, model: nn.Module | None = None) -> dict:
    """The model weights in a project checkpoint (``best_val.pt``/``last.pt``) or a released one.

    With ``model`` the weights are checked against its state dict (CheckpointError naming the
    file and the differing keys and shapes); a released file is otherwise checked against the
    released network (:func:`cag.checkpoint.load_cag_uda_checkpoint`).
    """
    from .checkpoint import check_state_dict, load_cag_uda_checkpoint, released_model_state, strip_module_prefix

    ckpt = load_checkpoint(path)
    if isinstance(ckpt, dict) and "model" in ckpt:
        state = ckpt["model"]
    elif isinstance(ckpt, dict) and "modules" in ckpt:
        state = ckpt["modules"]["model"]
    elif model is None:
        return load_cag_uda_checkpoint(path)
    else:
        state = strip_module_prefix(released_model_state(ckpt, path))
    if model is not None:
        check_state_dict(state, model.state_dict(), path)
    return state


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
    """Augmented, endless batches (docs/data.md §6: resize, random width, crop, flip, [0, 1])."""
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
    """bf16 autocast (on any device) when ``train.amp`` is ``bf16``, i.e. with ``train.precision=fast``;
    the released numerics (``train.precision=released``, the default) are float32."""
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
    """SGD with momentum 0.9 and weight decay 2e-4 (docs/method.md §7-§8)."""
    return torch.optim.SGD(params, lr=lr, momentum=cfg.train.momentum, weight_decay=cfg.train.weight_decay)


def _micro_batch(cfg: Config) -> int:
    """Images per forward pass: the batch split into ``train.grad_accum`` equal parts (validated in config).

    Every loss of a step is normalised once for the whole step: each micro-batch's
    loss is its *sum* over items divided by a denominator from
    :func:`cag.distributed.global_denominators`, the items of all micro-batches of the step on
    all ranks, so ``grad_accum=k`` on N processes optimises exactly the objective of one
    process holding the global batch (up to BatchNorm, whose statistics are per forward pass).
    The counts must be known before the first backward, so a step first fetches all its
    micro-batches; see each stage for where its counts come from.
    """
    return cfg.train.batch_size // cfg.train.grad_accum


def _step_batches(cfg: Config, stream: Stream, device: torch.device) -> list[tuple]:
    """The ``train.grad_accum`` micro-batches of one step, fetched before any forward pass."""
    return [to_device(stream.next(), device, cfg.train.channels_last) for _ in range(cfg.train.grad_accum)]


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
    """Source-only training (docs/method.md §8), or the target-trained reference (the oracle).

    Pixel cross-entropy on augmented labelled crops. ``domain="target"`` trains on the target
    train split's labels instead: the oracle no adaptation method may use. The CE is a mean
    over the non-ignored pixels of the whole step (all micro-batches, all ranks), counted from
    the labels before the first forward pass: no extra cost.
    """
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed, device, tf32=cfg.train.tf32)
    started = time.time()
    model = wrap_ddp(make_model(cfg, device, init or cfg.model.init), device)
    dataset, resize = (source_dataset(cfg), cfg.data.source_resize) if domain == "source" else \
        (target_dataset(cfg, "train", labels=True), cfg.data.target_resize)
    micro = _micro_batch(cfg)
    stream = train_stream(cfg, dataset, resize, micro, cfg.seed, device)
    optimizer = _sgd(model.parameters(), cfg, cfg.source_only.lr)

    def step(i: int) -> dict:
        batches = _step_batches(cfg, stream, device)
        den = dist.global_denominators({"ce_source": sum(labelled_pixel_count(label) for _, label in batches)})
        total = torch.zeros((), device=device)
        for image, label in batches:
            with autocast(cfg, device):
                _, logits = model(image)
                loss = segmentation_ce(logits.float(), label, denominator=den["ce_source"])
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
    """The warm-up: source CE plus global output-space adversarial alignment (docs/method.md §6).

    A reconstruction, labelled so in the book: D is an AdaptSegNet ``FCDiscriminator`` on the
    softmax of the crop-size logits, trained with Adam (lr_d, betas 0.9/0.99); the network is
    trained with SGD, ``head_lr_mult`` on everything but the backbone, on
    CE_s + lambda_adv * L_adv(target looks like source). The CE is a mean over the step's
    non-ignored source pixels, L_adv and D's two terms means over the step's patch logits
    (:meth:`cag.adversarial.FCDiscriminator.patch_count`), all counted over every micro-batch and rank before
    the first forward pass (no extra cost).
    """
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed, device, tf32=cfg.train.tf32)
    started = time.time()
    model = make_model(cfg, device, init)
    disc = FCDiscriminator(cfg.data.num_classes, cfg.warmup.disc_channels).to(device)
    model, disc = wrap_ddp(model, device), wrap_ddp(disc, device)
    # after wrap_ddp, which replaces the BatchNorm layers (and their parameters) under DDP
    optimizer = _sgd(_param_groups(_unwrap(model), cfg.warmup.head_lr_mult), cfg, cfg.warmup.lr)
    optimizer_d = torch.optim.Adam(disc.parameters(), lr=cfg.warmup.lr_d, betas=(0.9, 0.99))
    micro = _micro_batch(cfg)
    source = train_stream(cfg, source_dataset(cfg), cfg.data.source_resize, micro, cfg.seed, device)
    target = train_stream(cfg, target_dataset(cfg, "train", labels=False), cfg.data.target_resize, micro, cfg.seed + 1, device)

    def patches(images: torch.Tensor) -> int:  # D sees class probabilities at the images' size
        return _unwrap(disc).patch_count((len(images), cfg.data.num_classes, *images.shape[-2:]))

    def step(i: int) -> dict:
        batches = list(zip(_step_batches(cfg, source, device), _step_batches(cfg, target, device)))
        den = dist.global_denominators({
            "ce_source": sum(labelled_pixel_count(ys) for (_, ys), _ in batches),
            "disc_source": sum(patches(ys) for (_, ys), _ in batches),
            "disc_target": sum(patches(xt) for _, (xt, _) in batches),
        })
        sums = {"ce_source": 0.0, "adv": 0.0, "disc": 0.0}
        for (xs, ys), (xt, _) in batches:
            disc.requires_grad_(False)
            with autocast(cfg, device):
                _, logits_s = model(xs)
                _, logits_t = model(xt)
                up_s = F.interpolate(logits_s.float(), size=ys.shape[-2:], mode="bilinear", align_corners=True)
                up_t = F.interpolate(logits_t.float(), size=xt.shape[-2:], mode="bilinear", align_corners=True)
                ce = segmentation_ce(up_s, ys, denominator=den["ce_source"])
                adv = generator_adversarial_loss(disc, up_t.softmax(1), cfg.warmup.gan, denominator=den["disc_target"])
            (ce + cfg.warmup.lambda_adv * adv).backward()
            disc.requires_grad_(True)
            with autocast(cfg, device):
                d_loss = discriminator_loss(disc, up_s.softmax(1), up_t.softmax(1), cfg.warmup.gan,
                                            denominators=(den["disc_source"], den["disc_target"]))
            d_loss.backward()
            for key, value in (("ce_source", ce), ("adv", adv), ("disc", d_loss)):
                sums[key] = sums[key] + value.detach()
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


def anchor_dataset(cfg: Config):
    """The source images of the anchor pass, without augmentation.

    With ``anchors.resize`` the image (bilinear) and its label (nearest) are resized together,
    as the released GTA5 loader does, so GTA5's frames of other sizes (1914x1046 among the
    1914x1052 ones) share a batch with the rest; the label is then downsampled to the feature
    size. Without it every frame keeps its own size.
    """
    from .data import transforms

    steps = [transforms.Resize(tuple(cfg.anchors.resize))] if cfg.anchors.resize else []
    return Augmented(source_dataset(cfg), transforms.Compose([*steps, transforms.ToFloat()]), cfg.seed)


@torch.no_grad()
def compute_anchors(cfg: Config, stage_dir: Path, model_path) -> dict:
    """Category anchors from the warm-up model over source images (docs/method.md §2, ``cac.py``).

    No augmentation; images at ``anchors.resize`` (the released 1914x1052); ``anchors.num_images``
    images in a seeded shuffled order (released: 2,972 x 4); labels downsampled with nearest to
    the feature size; the faithful rule counts only pixels the model classifies correctly.
    With ``anchors.file`` set, the authors' shipped anchors are used instead. Under torchrun the
    pipeline calls this on rank 0 alone (a single pass over source images, no gradients).
    The result records the (W, H) of the images and feature maps of the pass.
    """
    device = resolve_device(cfg.device)
    stage_dir.mkdir(parents=True, exist_ok=True)
    if cfg.anchors.file:
        anchors, counts = read_anchors_file(cfg.anchors.file)
        save_anchors(stage_dir / "anchors.pt", anchors, counts, source=str(cfg.anchors.file))
        return {"anchors": str(stage_dir / "anchors.pt"), "counts": counts.tolist(), "source": str(cfg.anchors.file)}
    model = make_model(cfg, device, model_path).eval()
    dataset = anchor_dataset(cfg)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    order = order[: cfg.anchors.num_images or len(order)]
    workers = loader_workers(cfg.data.num_workers, -(-len(order) // cfg.anchors.batch_size))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, order), batch_size=cfg.anchors.batch_size,
                                         num_workers=workers, collate_fn=collate)
    acc = AnchorAccumulator(cfg.data.num_classes, model.feature_dim, min_pixels=cfg.anchors.min_pixels,
                            count_cap=cfg.anchors.count_cap, mode=cfg.anchors.mode)
    from tqdm.auto import tqdm

    sizes = set()
    for batch in tqdm(loader, desc=stage_dir.name, disable=cfg.quiet, unit="batch"):
        image, label = to_device(batch, device)
        with autocast(cfg, device):
            features, logits = model(image)
        small = downsample_labels(label, features.shape[-2:])
        acc.update(features.float(), small, logits.argmax(1))
        sizes.add((image.shape[-1], image.shape[-2], features.shape[-1], features.shape[-2]))
    save_anchors(stage_dir / "anchors.pt", acc.anchors, acc.counts, model=str(model_path), mode=cfg.anchors.mode)
    return {"anchors": str(stage_dir / "anchors.pt"), "counts": acc.counts.tolist(), "images": len(order),
            "image_sizes_wh": sorted({s[:2] for s in sizes}), "feature_sizes_wh": sorted({s[2:] for s in sizes})}


def cag_pseudo_labels(cfg: Config, teacher: nn.Module, anchors: torch.Tensor, anchor_counts: torch.Tensor,
                      xt: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen pseudo-labeller's two maps for target crops ``xt``, [B, h, w]: active targets by
    the anchor margin test (paper eq. 1-2, classes with anchor count 0 excluded) and probability
    pseudo-labels (``threshold_arg`` in the released ``models/adaptation_model.py``)."""
    with torch.no_grad(), autocast(cfg, device):
        t_features, t_logits = teacher(xt)
    anchor_labels = anchor_pseudo_labels(t_features.float(), anchors, cfg.cag.delta_d, valid=anchor_counts > 0)
    prob_labels = probability_pseudo_labels(t_logits.float(), cfg.cag.prob_threshold)
    return anchor_labels, prob_labels


def _student_forward(cfg: Config, student: nn.Module, xs: torch.Tensor, xt: torch.Tensor, device: torch.device):
    """The student's (features, logits) on the source and on the target crops: fs, ls, ft, lt."""
    with autocast(cfg, device):
        if cfg.cag.fuse_forward:
            features, logits = student(torch.cat([xs, xt]))
            fs, ft = features.split(len(xs))
            ls, lt = logits.split(len(xs))
        else:
            fs, ls = student(xs)
            ft, lt = student(xt)
    return fs, ls, ft, lt


def _cag_counts(cfg: Config, anchors: torch.Tensor, anchor_counts: torch.Tensor, ys: torch.Tensor, source_size,
                pseudo_labels: tuple, predictions: tuple) -> dict:
    """:func:`cag.losses.cag_loss_counts` for the configured CAG objective."""
    return cag_loss_counts(ys, source_size, *pseudo_labels, anchors.shape[0], *predictions,
                           pseudo_label_mode=cfg.cag.pseudo_labels, distance_variant=cfg.cag.distance_loss,
                           min_pixels=cfg.cag.min_pixels, anchor_valid=anchor_counts > 0)


@torch.no_grad()
def _student_predictions(cfg: Config, student: nn.Module, batches: list, device: torch.device) -> list[tuple]:
    """The student's argmax on the source and target crops of every micro-batch of a step,
    before the step's first backward: what the faithful distance loss's (image, class) pairs
    are counted on when ``train.grad_accum > 1``.

    The same forward passes as the step then runs with gradients, in the same order and mode:
    BatchNorm on batch statistics (its running averages are restored afterwards, so they are
    updated once per micro-batch, as without this pass) and dropout with the same random draws
    (the random state is restored afterwards; CPU, and CUDA's current device). The step then
    uses these predictions for its masks, so the counted pairs are exactly the pairs summed.
    """
    saved = [buffer.clone() for buffer in student.buffers()]
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        predictions = [tuple(logits.float().argmax(dim=1) for logits in _student_forward(cfg, student, xs, xt, device)[1::2])
                       for xs, _, xt, _ in batches]
    for buffer, value in zip(student.buffers(), saved):
        buffer.copy_(value)
    return predictions


def cag_train_step(cfg: Config, student: nn.Module, teacher: nn.Module, anchors: torch.Tensor, anchor_counts: torch.Tensor,
                   xs: torch.Tensor, ys: torch.Tensor, xt: torch.Tensor, device: torch.device,
                   yt: torch.Tensor | None = None, *, pseudo_labels: tuple | None = None,
                   predictions: tuple | None = None, denominators: dict | None = None) -> dict:
    """Forward pass and losses of one CAG iteration (docs/method.md §3-§7); the caller runs backward.

    The frozen pseudo-labeller labels the target crop (active targets, eq. 1-2, and probability
    pseudo-labels); the student sees the source and target crops in separate passes (per-domain
    BatchNorm statistics, as released) or one fused pass (``cag.fuse_forward``). Classes whose
    anchor count is 0 take part in neither the active-target test nor the distance losses.
    Given the target crop's labels ``yt`` (monitoring only, as the released ``calc_recall``;
    they never reach a loss), the precision of both pseudo-label maps is added to the result.

    Normalisation: each loss term is this call's sum over its items (pixels, or (image, class)
    pairs) divided by its entry of ``denominators`` (:func:`cag.distributed.global_denominators`
    of the counts of :func:`cag.losses.cag_loss_counts`). ``denominators=None``: this call's own
    counts, taken on its pseudo-labels and the student's argmax after the forward pass and
    summed over ranks, so with one process the terms are the plain means. :func:`cag_stage`
    with ``train.grad_accum > 1`` passes the denominators of all the step's micro-batches, with
    the ``pseudo_labels`` (anchor, probability) and student ``predictions`` (source, target)
    they were counted on.
    """
    valid = anchor_counts > 0
    if pseudo_labels is None:
        pseudo_labels = cag_pseudo_labels(cfg, teacher, anchors, anchor_counts, xt, device)
    anchor_labels, prob_labels = pseudo_labels
    fs, ls, ft, lt = _student_forward(cfg, student, xs, xt, device)
    if predictions is None:
        predictions = (ls.detach().float().argmax(dim=1), lt.detach().float().argmax(dim=1))
    if denominators is None:
        denominators = dist.global_denominators(
            _cag_counts(cfg, anchors, anchor_counts, ys, fs.shape[-2:], pseudo_labels, predictions))
    losses = cag_loss(ls.float(), ys, fs.float(), lt.float(), ft.float(), anchors, anchor_labels, prob_labels,
                      lam=cfg.cag.lam, pseudo_label_mode=cfg.cag.pseudo_labels,
                      distance_variant=cfg.cag.distance_loss, min_pixels=cfg.cag.min_pixels, anchor_valid=valid,
                      denominators=denominators, src_predictions=predictions[0],
                      tgt_predictions=predictions[1])
    losses["active_fraction"] = (anchor_labels != 255).float().mean()
    if yt is not None:
        small = downsample_labels(yt, anchor_labels.shape[-2:])
        for name, pseudo in (("anchor", anchor_labels), ("probability", prob_labels)):
            assigned = (pseudo != 255) & (small != 255)
            correct = (assigned & (pseudo == small)).sum()
            losses[f"precision_{name}"] = correct / assigned.sum().clamp(min=1)
    return losses


_CAG_TERMS = ("total", "ce_source", "ce_target", "dist_source", "dist_target")


def cag_stage(cfg: Config, stage_dir: Path, fingerprint: str, init, anchors_path) -> dict:
    """One CAG stage (docs/method.md §3-§8): student and frozen pseudo-labeller both start at ``init``.

    Each iteration the frozen model labels the same augmented target crop the student sees:
    active targets by the anchor margin test (eq. 1-2, ``cag.delta_d``) and probability
    pseudo-labels (``cag.prob_threshold``), combined per ``cag.pseudo_labels``; the student
    minimises CE_s + CE_t + lam * (L_dis_s + L_dis_t) with one SGD step.

    Every term is a mean over the whole step, all micro-batches and ranks (see
    :func:`cag_train_step`). With ``train.grad_accum = 1`` the counts come from the step's own
    forward pass: no extra cost. With ``grad_accum = k > 1`` they are needed before the first
    backward: the teacher labels all k target micro-batches first (no extra teacher passes,
    only the k pseudo-label maps held at once), and for the faithful distance loss, whose pairs
    depend on the student's own argmax, ``_student_predictions`` runs one extra student
    forward pass without gradients per micro-batch (its activations are not kept; the pixel_l2
    variant needs none when source and target crops share a size). One all-reduce of the counts
    per step under DDP.
    """
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed, device, tf32=cfg.train.tf32)
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
        k = cfg.train.grad_accum
        batches = [(xs, ys, xt, yt) for (xs, ys), (xt, yt) in
                   zip(_step_batches(cfg, source, device), _step_batches(cfg, target, device))]
        pseudo, predictions, den = [None] * k, [None] * k, None
        if k > 1:  # the step's counts before its first backward
            pseudo = [cag_pseudo_labels(cfg, teacher, anchors, counts, xt, device) for _, _, xt, _ in batches]
            if cfg.cag.distance_loss == "faithful" or any(xs.shape[-2:] != xt.shape[-2:] for xs, _, xt, _ in batches):
                predictions = _student_predictions(cfg, student, batches, device)
            sizes = [p[0].shape[-2:] if p is not None else labels[0].shape[-2:] for p, labels in zip(predictions, pseudo)]
            per_batch = [_cag_counts(cfg, anchors, counts, ys, size, labels, p or (None, None))
                         for (_, ys, _, _), size, labels, p in zip(batches, sizes, pseudo, predictions)]
            den = dist.global_denominators({key: sum(c[key] for c in per_batch) for key in per_batch[0]})
        sums: dict = {}
        for (xs, ys, xt, yt), labels, p in zip(batches, pseudo, predictions):
            losses = cag_train_step(cfg, student, teacher, anchors, counts, xs, ys, xt, device, yt if monitor else None,
                                    pseudo_labels=labels, predictions=p, denominators=den)
            losses["total"].backward()
            for key, value in losses.items():  # the loss terms add up over micro-batches; the monitors are averaged
                sums[key] = sums.get(key, 0.0) + value.detach() / (1 if key in _CAG_TERMS else k)
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


def evaluate(cfg: Config, checkpoint, split: str, confusion: bool = False) -> dict:
    """mIoU and per-class IoU of a checkpoint on a target split (docs/method.md §12).

    Full resolution, single scale unless ``eval.flip``/``eval.scales`` say otherwise; for a
    16-class model the standard 13-class mIoU* (from the 16 per-class IoUs) is added.
    ``confusion=True`` adds the confusion matrix (rows: true class, columns: prediction; a CPU
    tensor, not JSON) under ``"confusion"``.
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
    if confusion:
        result["confusion"] = cm.matrix.cpu()
    return result
