"""The resumable training loop shared by every stage, and its data plumbing.

One loop serves source-only, warm-up and CAG stages: each stage supplies a ``step`` function
that maps a source and a target batch to its losses. The loop owns what must survive a crash
(docs/method.md §7-§8): the model, optimizers, the poly schedule, the random
number state and the position in both data streams go into an atomically written checkpoint
every ``train.checkpoint_interval`` iterations, so that killing the process and running the
same command again continues where it stopped and, on CPU, ends with the same weights.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset

from . import distributed as dist
from .checkpoint import load_checkpoint, save_checkpoint
from .data.datasets import collate, loader_workers, sample_seed
from .errors import TrainingStopped


class Augmented(Dataset):
    """Applies a joint transform to a dataset's items with a per-(epoch, index) generator.

    Indexed by ``(epoch, index)`` pairs from :class:`ResumableBatchSampler`, so the same sample
    in the same epoch always gets the same crop and flip (determinism and exact resume).
    """

    def __init__(self, base: Dataset, transform: Callable, seed: int):
        self.base, self.transform, self.seed = base, transform, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        item = dict(self.base[index])
        generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index))
        item["image"], label = self.transform(item["image"], item.get("label"), generator=generator)
        if label is not None:
            item["label"] = label
        return item


class ResumableBatchSampler:
    """Epoch-wise shuffled batches of ``(epoch, index)``; this rank's share of each global batch.

    The permutation of epoch ``e`` is drawn from ``seed`` and ``e`` alone; ``start`` skips the
    batches of the current epoch that were already consumed before a restart. Under DDP each
    global batch of ``batch_size * world`` indices is split into contiguous per-rank slices, so
    N processes see exactly the samples one process would see with the global batch.
    """

    def __init__(self, n: int, batch_size: int, seed: int, shuffle: bool = True, rank: int = 0, world: int = 1):
        if n < batch_size * world:
            raise ValueError(f"dataset of {n} items is smaller than one global batch ({batch_size} x {world} ranks)")
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.rank, self.world = rank, world
        self.epoch, self.start = 0, 0

    def __len__(self) -> int:
        return self.n // (self.batch_size * self.world) - self.start

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)).tolist()
        else:
            order = list(range(self.n))
        global_batch = self.batch_size * self.world
        for b in range(self.start, self.n // global_batch):
            chunk = order[b * global_batch:(b + 1) * global_batch]
            mine = chunk[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
            yield [(self.epoch, i) for i in mine]


class Stream:
    """An endless iterator over a loader that remembers (epoch, batches consumed) for resume.

    Ports the released code's endless ``DataProvider`` (the release's `data/DataProvider.py`). The loader
    has its own generator: starting an iterator draws a worker seed, which must not come from
    the global generator that dropout uses, or a resumed run would draw one number more.
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, num_workers: int = 0, pin_memory: bool = False):
        self.sampler = ResumableBatchSampler(len(dataset), batch_size, seed, rank=dist.rank(), world=dist.world_size())
        workers = loader_workers(num_workers, len(self.sampler))
        self.loader = DataLoader(
            dataset, batch_sampler=self.sampler, num_workers=workers, pin_memory=pin_memory,
            persistent_workers=workers > 0, generator=torch.Generator().manual_seed(seed), collate_fn=collate,
        )
        self.consumed = 0
        self._it = None

    def state_dict(self) -> dict:
        return {"epoch": self.sampler.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
        self._it = None

    def next(self) -> dict:
        if self._it is None:
            self.sampler.start = self.consumed
            self._it = iter(self.loader)
        try:
            batch = next(self._it)
        except StopIteration:
            self.sampler.epoch += 1
            self.consumed = 0
            self.sampler.start = 0
            self._it = iter(self.loader)
            batch = next(self._it)
        self.consumed += 1
        return batch


def poly_lr(base_lr: float, iteration: int, horizon: int, power: float = 0.9) -> float:
    """Poly schedule stepped before each iteration: lr_i = lr * (1 - i/horizon)^power (docs/method.md §7-§8)."""
    return base_lr * max(0.0, 1.0 - iteration / horizon) ** power


class NonFiniteLoss(TrainingStopped, RuntimeError):
    """A loss or gradient became NaN or infinite."""


@dataclass
class LoopState:
    """Everything a stage's loop carries between iterations besides the modules."""

    iteration: int = 0
    best_val: float = -math.inf
    best_iter: int = -1
    nan_skips: int = 0
    images_seen: int = 0
    train_seconds: float = 0.0
    running: dict = field(default_factory=dict)  # loss sums since the last log line
    extra: dict = field(default_factory=dict)


def _record(line: str) -> dict | None:
    """A ``metrics.jsonl`` record, or None for a line that a crash cut short."""
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


class MetricsLog:
    """``metrics.jsonl`` (one JSON object per line) and TensorBoard events, written by rank 0."""

    def __init__(self, stage_dir: Path, resume_iter: int | None):
        self.path = stage_dir / "metrics.jsonl"
        self.enabled = dist.is_main()
        self.writer = None
        if not self.enabled:
            return
        if resume_iter is not None and self.path.exists():
            kept = [l for l in self.path.read_text().splitlines()
                    if (r := _record(l)) is not None and r.get("iter", 0) <= resume_iter]
            self.path.write_text("".join(l + "\n" for l in kept))
        elif self.path.exists():
            self.path.unlink()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(stage_dir / "tensorboard"))
        except ImportError:
            self.writer = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "iter":
                    self.writer.add_scalar(f"{record.get('kind', 'train')}/{key}", value, record["iter"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


@dataclass
class LoopSpec:
    """What a stage hands to :func:`run_loop`."""

    stage_dir: Path
    iters: int
    modules: dict
    optimizers: dict
    base_lrs: dict
    poly_horizon: int
    poly_power: float
    step: Callable[[int], dict]  # forward + backward of iteration i; returns detached-able losses
    streams: dict
    validate: Callable[[], dict] | None
    val_interval: int
    checkpoint_interval: int
    log_interval: int
    nan_policy: str = "stop"
    max_nan_skips: int = 10
    images_per_step: int = 1
    fingerprint: str = ""
    quiet: bool = False
    description: str = "train"


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _unwrap(module):
    return module.module if hasattr(module, "module") else module


def _save_training_state(spec: LoopSpec, state: LoopState) -> None:
    if not dist.is_main():
        return
    save_checkpoint(spec.stage_dir / "last.pt", {
        "format": "cag-training-state/1",
        "fingerprint": spec.fingerprint,
        "iter": state.iteration,
        "modules": {k: _unwrap(m).state_dict() for k, m in spec.modules.items()},
        "optimizers": {k: o.state_dict() for k, o in spec.optimizers.items()},
        "streams": {k: s.state_dict() for k, s in spec.streams.items()},
        "rng": _rng_state(),
        "loop": {"best_val": state.best_val, "best_iter": state.best_iter, "nan_skips": state.nan_skips,
                 "images_seen": state.images_seen, "train_seconds": state.train_seconds,
                 "running": {k: torch.as_tensor(v).detach().cpu() for k, v in state.running.items()}},
    })


def _remove_partial_writes(stage_dir: Path) -> None:
    """Delete the temporary files of checkpoint writes that a crash cut short (``.NAME.pt.*.tmp``)."""
    for tmp in stage_dir.glob(".*.pt.*.tmp"):
        tmp.unlink(missing_ok=True)


def _restore(spec: LoopSpec, state: LoopState) -> bool:
    path = spec.stage_dir / "last.pt"
    if not path.exists():
        return False
    ckpt = load_checkpoint(path)
    if ckpt.get("fingerprint") != spec.fingerprint:
        raise RuntimeError(f"{path}: written for a different configuration or inputs; move the stage directory aside")
    for key, module in spec.modules.items():
        _unwrap(module).load_state_dict(ckpt["modules"][key])
    for key, opt in spec.optimizers.items():
        opt.load_state_dict(ckpt["optimizers"][key])
    for key, stream in spec.streams.items():
        stream.load_state_dict(ckpt["streams"][key])
    _set_rng_state(ckpt["rng"])
    loop = ckpt["loop"]
    state.iteration = int(ckpt["iter"])
    state.best_val, state.best_iter = float(loop["best_val"]), int(loop["best_iter"])
    state.nan_skips, state.images_seen = int(loop["nan_skips"]), int(loop["images_seen"])
    state.train_seconds = float(loop["train_seconds"])
    state.running = dict(loop.get("running", {}))
    return True


def _finite(losses: dict, modules: dict) -> bool:
    if not all(torch.isfinite(v).all() for v in losses.values()):
        return False
    for module in modules.values():
        for p in module.parameters():
            if p.grad is not None and not torch.isfinite(p.grad).all():
                return False
    return True


def run_loop(spec: LoopSpec) -> LoopState:
    """Train for ``spec.iters`` iterations, resuming from ``last.pt`` when it exists.

    Every ``checkpoint_interval`` iterations and at the end the full training state is written
    atomically to ``last.pt``; every ``val_interval`` iterations ``validate()`` runs and the best
    model so far (on the target validation split) is written to ``best_val.pt``. A non-finite
    loss or gradient stops the run with the last good checkpoint intact, or with
    ``nan_policy="skip"`` skips the step and counts it.
    """
    from tqdm.auto import tqdm

    spec.stage_dir.mkdir(parents=True, exist_ok=True)
    if dist.is_main():
        _remove_partial_writes(spec.stage_dir)
    state = LoopState()
    resumed = _restore(spec, state)
    log = MetricsLog(spec.stage_dir, state.iteration if resumed else None)
    if resumed and not spec.quiet and dist.is_main():
        print(f"[{spec.description}] resuming at iteration {state.iteration} from {spec.stage_dir / 'last.pt'}", flush=True)
    bar = tqdm(total=spec.iters, initial=state.iteration, desc=spec.description, unit="it",
               disable=spec.quiet or not dist.is_main(), dynamic_ncols=True, mininterval=1.0)
    try:
        while state.iteration < spec.iters:
            i = state.iteration
            for key, opt in spec.optimizers.items():
                lr = poly_lr(spec.base_lrs[key], i, spec.poly_horizon, spec.poly_power)
                for group in opt.param_groups:
                    group["lr"] = lr * group.get("lr_mult", 1.0)
            t0 = time.perf_counter()
            losses = spec.step(i)
            if _finite(losses, spec.modules):
                for opt in spec.optimizers.values():
                    opt.step()
            else:
                state.nan_skips += 1
                bad = {k: float(v) for k, v in losses.items()}
                if spec.nan_policy == "stop" or state.nan_skips > spec.max_nan_skips:
                    raise NonFiniteLoss(
                        f"[{spec.description}] non-finite loss or gradient at iteration {i}: {bad}; "
                        f"the last good checkpoint is {spec.stage_dir / 'last.pt'}")
                log.write({"kind": "nan_skip", "iter": i + 1, **bad})
            for opt in spec.optimizers.values():
                opt.zero_grad(set_to_none=True)
            state.iteration = i + 1
            state.images_seen += spec.images_per_step * dist.world_size()
            state.train_seconds += time.perf_counter() - t0
            for key, value in losses.items():
                state.running[key] = state.running.get(key, 0.0) + value.detach()
            if state.iteration % spec.log_interval == 0 or state.iteration == spec.iters:
                count = spec.log_interval if state.iteration % spec.log_interval == 0 else state.iteration % spec.log_interval
                means = {k: float(dist.all_reduce_mean(v / count)) for k, v in state.running.items()}
                state.running = {}
                lr = spec.optimizers[next(iter(spec.optimizers))].param_groups[0]["lr"]
                log.write({"kind": "train", "iter": state.iteration, "lr": lr, **means})
                bar.set_postfix({k: f"{v:.3f}" for k, v in means.items() if k in ("total", "ce_source", "ce_target")})
            bar.update(1)
            if spec.validate is not None and (state.iteration % spec.val_interval == 0 or state.iteration == spec.iters):
                result = spec.validate()
                log.write({"kind": "val", "iter": state.iteration, "miou": result["miou"]})
                if result["miou"] > state.best_val:
                    state.best_val, state.best_iter = result["miou"], state.iteration
                    if dist.is_main():
                        save_checkpoint(spec.stage_dir / "best_val.pt", {
                            "format": "cag-model/1", "model": _unwrap(spec.modules["model"]).state_dict(),
                            "iter": state.iteration, "val_miou": result["miou"],
                            "selected_on": "target validation split"})
            if state.iteration % spec.checkpoint_interval == 0 or state.iteration == spec.iters:
                _save_training_state(spec, state)
                dist.barrier()
    finally:
        bar.close()
        log.close()
    return state
