"""The benchmark suite (benchmarks/NOTES.md): ``python -m cag.bench [--device cuda] [--smoke] [--out FILE.json]``.

Measures, on whatever device it runs on, and prints a table and writes JSON records of:

- ``train_step_<arch>``: one CAG iteration as ``run_loop`` runs it for ``cag_stage`` (poly lr,
  :func:`cag.stages.cag_train_step`, backward, the finite check, the SGD step) at the released crop
  and batch, per *mode* (fp32, TF32, bf16 + channels_last, compiled) and per optimisation lead of
  ``benchmarks/NOTES.md``; each with its speed-up over the fp32 eager step of the same run;
- ``eval_full_res``: :func:`cag.evaluate.evaluate_model` over full-resolution PNG frames (decode,
  forward, upsample, argmax, confusion matrix), and ``eval_full_res_preloaded`` without the decode;
- ``pseudo_labels``: the pseudo-label kernel (distances, active test, assignment) at 4 x 256 x 128 x 224;
- ``data_pipeline``: decode and augmentation of full-size frames in one process with one thread,
  i.e. per DataLoader worker;
- ``cpu_profile_<stage>``: a short run of the built-in benchmark's stages (``configs/synthetic.yaml``,
  tiny model) and, with ``--full-pipeline``, the whole built-in pipeline (``cpu_pipeline``);
- ``released_schedule_estimate``: the released schedule's GPU-hours at the measured speeds.

Every record carries ``name``, ``mode``, ``device``, ``images_per_s``, ``ms_per_step``, ``peak_gib``,
``date``, ``torch`` and ``commit`` plus the library versions and the shapes it ran at. Timings live
here, never in tests. ``--smoke`` runs every part at toy sizes for a few iterations (``make test``).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Callable

import torch

from . import loop, stages
from .config import Config, load_config
from .labels import IGNORE_INDEX

REQUIRED_FIELDS = ("name", "mode", "device", "images_per_s", "ms_per_step", "peak_gib", "date", "torch", "commit")
BENCHMARKS = ("pseudo_labels", "train_step", "eval_full_res", "data_pipeline", "cpu_profile")
ARCHS = ("deeplabv3plus", "deeplabv2")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


# ----------------------------------------------------------------------------- modes and sizes


@dataclasses.dataclass(frozen=True)
class Mode:
    """One way to run the training step: precision, layout, compilation and the leads of NOTES.md.

    ``amp``/``channels_last``/``fuse_forward`` are the package's own config keys (``train.amp``,
    ``train.channels_last``, ``cag.fuse_forward``); ``compile`` (the student's ``torch.compile``
    mode), ``teacher_compile``, ``teacher_bf16``, ``fused_sgd`` and ``one_sync`` are bench-only
    experiments. ``fp32`` is what ``train.precision=released`` runs, ``bf16_cl_compile`` what
    ``train.precision=fast`` runs.
    """

    name: str
    amp: str = "none"
    tf32: bool = False
    channels_last: bool = False
    compile: str | None = None
    teacher_compile: bool = False
    fuse_forward: bool = False
    teacher_bf16: bool = False
    fused_sgd: bool = False
    one_sync: bool = False
    cuda_only: bool = False


_BF16 = dict(amp="bf16", tf32=True, channels_last=True)
_MODE_LIST = [
    Mode("fp32"),
    Mode("tf32", tf32=True, cuda_only=True),
    Mode("bf16_cl", **_BF16),
    Mode("bf16_cl_compile", **_BF16, compile="default"),
    # The optimisation ladder of NOTES.md: each lead adds one change to the one before.
    Mode("lead1_one_sync", **_BF16, one_sync=True),
    Mode("lead2_fused_sgd", **_BF16, one_sync=True, fused_sgd=True),
    Mode("lead3_fused_fwd", **_BF16, one_sync=True, fused_sgd=True, fuse_forward=True),
    Mode("lead4_teacher_bf16", **_BF16, one_sync=True, fused_sgd=True, fuse_forward=True, teacher_bf16=True),
    Mode("lead5_compile", **_BF16, one_sync=True, fused_sgd=True, fuse_forward=True, teacher_bf16=True,
         compile="default", teacher_compile=True),
    Mode("lead6_cuda_graphs", **_BF16, one_sync=True, fused_sgd=True, fuse_forward=True, teacher_bf16=True,
         compile="reduce-overhead", teacher_compile=True, cuda_only=True),
]
MODES = {mode.name: mode for mode in _MODE_LIST}
STANDARD_MODES = ("fp32", "tf32", "bf16_cl", "bf16_cl_compile")
SMOKE_MODES = ("fp32", "bf16_cl", "lead4_teacher_bf16", "bf16_cl_compile")
LEAD_MODES = ("lead1_one_sync", "lead2_fused_sgd", "lead3_fused_fwd", "lead4_teacher_bf16", "lead5_compile")
EVAL_MODES = ("fp32", "tf32", "bf16_cl")


@dataclasses.dataclass(frozen=True)
class Profile:
    """The sizes of one run: ``released`` (the GPU table), ``cpu`` (this machine's scale), ``smoke``.

    ``train_config`` (+ overrides) sets the network, crop and batch of the step and evaluation;
    ``data_config`` the augmentation of the data-pipeline measurement. Frame sizes are (H, W).
    """

    name: str
    train_config: str
    train_overrides: tuple = ()
    data_config: str = "gta5_to_cityscapes.yaml"
    data_overrides: tuple = ()
    gta5_hw: tuple = (1052, 1914)
    cityscapes_hw: tuple = (1024, 2048)
    frames: int = 8
    data_rounds: int = 3
    eval_images: int = 64
    kernel_shape: tuple = (4, 256, 128, 224)
    kernel_classes: int = 19
    kernel_iters: int = 50
    warmup: int = 5
    iters: int = 20
    cpu_profile: tuple = ()


_SHORT_RUN = ("data.synthetic.n_source=64", "data.synthetic.n_target_train=64", "data.synthetic.n_target_val=20",
              "data.synthetic.n_target_test=20", "source_only.iters=20", "warmup.iters=20", "cag.iters=20",
              "cag.stages=1", "anchors.num_images=64", "train.checkpoint_interval=20")
PROFILES = {
    "released": Profile("released", "gta5_to_cityscapes.yaml", warmup=3, iters=15, cpu_profile=_SHORT_RUN),
    "cpu": Profile("cpu", "synthetic.yaml", ("eval.batch_size=1",), frames=4, data_rounds=2, eval_images=4,
                   kernel_iters=5, warmup=2, iters=10, cpu_profile=_SHORT_RUN),
    "smoke": Profile("smoke", "synthetic.yaml", ("train.batch_size=2",), data_config="synthetic.yaml",
                     gta5_hw=(64, 128), cityscapes_hw=(64, 128), frames=2, data_rounds=1, eval_images=2,
                     kernel_shape=(2, 16, 16, 28), kernel_iters=2, warmup=1, iters=2,
                     cpu_profile=("data.synthetic.n_source=8", "data.synthetic.n_target_train=8",
                                  "data.synthetic.n_target_val=2", "data.synthetic.n_target_test=2",
                                  "train.batch_size=2", "source_only.iters=2", "warmup.iters=2", "cag.iters=2",
                                  "cag.stages=1", "anchors.num_images=4", "anchors.batch_size=2",
                                  "eval.batch_size=2", "train.checkpoint_interval=2")),
}


# ----------------------------------------------------------------------------- environment


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """``torch.cuda.get_device_name()`` on CUDA, ``cpu`` otherwise (the records' ``device`` field)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _version(module: str) -> str | None:
    try:
        return getattr(__import__(module), "__version__", None)
    except ImportError:
        return None


def versions() -> dict:
    """Library versions a timing depends on."""
    return {
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": _version("triton"), "numpy": _version("numpy"), "pillow": _version("PIL"), "opencv": _version("cv2"),
    }


def commit_is_dirty() -> bool | None:
    """Whether tracked files differ from the commit (so ``commit`` alone does not identify the code)."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                             text=True, timeout=5, cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def run_context(device: torch.device, profile: Profile, compile_backend: str) -> dict:
    """The fields every record of one run shares: device, date, versions, commit, host, sizes."""
    return {
        "device": device_name(device), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "commit": stages.git_commit(), "commit_dirty": commit_is_dirty(),
        "versions": versions(), "host_cpu": cpu_name(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
        "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "profile": profile.name, "compile_backend": compile_backend,
    }


# ----------------------------------------------------------------------------- measuring


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timings end at a synchronisation)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    """Start a new peak-memory window (CUDA allocator peak, or the process's VmHWM on Linux)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_gib(device: torch.device) -> float:
    """Peak since :func:`reset_peak`: ``max_memory_allocated`` on CUDA, resident-set high-water mark on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def peak_kind(device: torch.device) -> str:
    """What :func:`peak_gib` measured on this device (recorded with every peak)."""
    return "cuda_max_allocated" if device.type == "cuda" else "cpu_process_high_water_mark"


def time_calls(fn: Callable, warmup: int, iters: int, device: torch.device) -> tuple[float, float]:
    """(ms per call, peak GiB) over ``iters`` calls after ``warmup`` untimed ones; one sync at each end."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    reset_peak(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    synchronize(device)
    return 1000 * (time.perf_counter() - start) / max(iters, 1), peak_gib(device)


def _is_bool_index(func, args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return func is torch.ops.aten.index.Tensor and any(
        isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in indices)


#: aten ops that make the host wait for the device (or, for ``lift_fresh``, copy a Python number to it).
SYNC_OPS = {
    "item_or_bool": torch.ops.aten._local_scalar_dense.default,
    "nonzero": torch.ops.aten.nonzero.default,
    "masked_select": torch.ops.aten.masked_select.default,
    "scalar_to_device": torch.ops.aten.lift_fresh.default,
}


def count_host_syncs(fn: Callable, device: torch.device) -> dict:
    """Synchronising calls made by one ``fn()``: ``{"total": n, ...by kind}``.

    On CUDA, the warnings of ``torch.cuda.set_sync_debug_mode("warn")``. Elsewhere, the aten ops
    that synchronise on CUDA, counted with a dispatch mode: ``.item()``/``bool()``, ``nonzero``,
    boolean-mask indexing, ``masked_select``, and tensors made from Python numbers (a blocking
    host-to-device copy on CUDA).
    """
    if device.type == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize(device)
        return {"total": sum("synchroniz" in str(w.message) for w in caught)}
    from torch.utils._python_dispatch import TorchDispatchMode

    counts = dict.fromkeys([*SYNC_OPS, "bool_index"], 0)
    kinds = {op: kind for kind, op in SYNC_OPS.items()}

    class Counter(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in kinds:
                counts[kinds[func]] += 1
            elif _is_bool_index(func, args):
                counts["bool_index"] += 1
            return func(*args, **(kwargs or {}))

    with Counter():
        fn()
    return {"total": sum(counts.values()), **counts}


def images_per_s(images: int, ms: float) -> float:
    """Throughput of ``images`` per call of ``ms`` milliseconds."""
    return 1000.0 * images / ms if ms > 0 else float("inf")


@contextlib.contextmanager
def backend_flags(mode: Mode, device: torch.device):
    """TF32 as the mode says (cuDNN convs default to TF32, so fp32 must switch it off), cuDNN autotuning on CUDA."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    torch.backends.cuda.matmul.allow_tf32 = mode.tf32
    torch.backends.cudnn.allow_tf32 = mode.tf32
    torch.backends.cudnn.benchmark = device.type == "cuda"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved


@contextlib.contextmanager
def threads(n: int):
    """Run with ``n`` intra-op threads, as a DataLoader worker does (it sets one)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def release_memory(device: torch.device) -> None:
    """Free what the last measurement left (compiled graphs, cached blocks) before the next one."""
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- the training step


def base_config(name: str, overrides=(), params: dict | None = None) -> Config:
    """A configuration from ``configs/<name>`` with overrides (the released or the built-in benchmark's)."""
    return load_config(CONFIGS / name, overrides=list(overrides), params=params)


def step_config(profile: Profile, arch: str, mode: Mode, device: torch.device, **params) -> Config:
    """The profile's configuration with the mode's package-level keys and ``arch``.

    Speed does not depend on the weights, so the network starts from random ones
    (``model.from_scratch``); ``train.precision=custom`` takes the mode's amp, TF32 and layout
    (the mode compiles the model itself, so ``train.compile`` stays off).
    """
    model = {"model.arch": arch, "model.from_scratch": True}
    if arch == "deeplabv2":
        model["model.output_stride"] = 8
    return base_config(profile.train_config, profile.train_overrides, {
        **model, "device": device.type, "train.precision": "custom", "train.amp": mode.amp, "train.tf32": mode.tf32,
        "train.channels_last": mode.channels_last, "cag.fuse_forward": mode.fuse_forward, "data.num_workers": 0,
        "quiet": True, **params})


def compile_module(module: torch.nn.Module, mode: Mode, backend: str) -> torch.nn.Module:
    """``torch.compile`` with the mode's compile mode (inductor) or just ``backend`` (e.g. ``eager``)."""
    kwargs = {"mode": mode.compile} if backend == "inductor" else {}
    return torch.compile(module, backend=backend, **kwargs)


def make_teacher(student: torch.nn.Module, mode: Mode, backend: str) -> torch.nn.Module:
    """The frozen pseudo-labeller as ``cag_stage`` makes it; bf16 weights and compiled if the mode says so."""
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    if mode.teacher_bf16:
        teacher.to(torch.bfloat16)
    return compile_module(teacher, mode, backend) if mode.teacher_compile else teacher


def make_optimizer(student: torch.nn.Module, cfg: Config, mode: Mode) -> torch.optim.Optimizer:
    """The stage's SGD (docs/method.md §7-§8); with ``fused_sgd`` the single-kernel fused implementation."""
    if not mode.fused_sgd:
        return stages._sgd(student.parameters(), cfg, cfg.cag.lr)
    return torch.optim.SGD(student.parameters(), lr=cfg.cag.lr, momentum=cfg.train.momentum,
                           weight_decay=cfg.train.weight_decay, fused=True)


def finite_one_sync(losses: dict, modules: dict) -> bool:
    """``cag.loop._finite`` with one host sync: every loss and each gradient's max-abs, stacked."""
    grads = [p.grad for m in modules.values() for p in m.parameters() if p.grad is not None]
    values = [v.detach().float().reshape(()) for v in losses.values()]
    values += [n.float() for n in torch._foreach_norm(grads, float("inf"))] if grads else []
    return bool(torch.isfinite(torch.stack(values)).all())


def synthetic_batch(cfg: Config, device: torch.device, generator: torch.Generator) -> tuple:
    """Random source crops with labels and target crops at ``data.crop`` (the step alone: no loading)."""
    width, height = cfg.data.crop
    shape = (cfg.train.batch_size, 3, height, width)
    labels = torch.randint(0, cfg.data.num_classes, (cfg.train.batch_size, height, width), generator=generator)
    labels[:, : height // 8] = IGNORE_INDEX
    xs, ys = stages.to_device({"image": torch.rand(shape, generator=generator), "label": labels}, device,
                              cfg.train.channels_last)
    xt, _ = stages.to_device({"image": torch.rand(shape, generator=generator)}, device, cfg.train.channels_last)
    return xs, ys, xt


def synthetic_anchors(num_classes: int, dim: int, device: torch.device, generator: torch.Generator) -> tuple:
    """Non-negative anchors [C, D] (features are post-ReLU) and positive counts [C]."""
    anchors = torch.rand(num_classes, dim, generator=generator)
    return anchors.to(device), torch.full((num_classes,), 100, device=device)


def train_iteration(cfg: Config, mode: Mode, student, teacher, optimizer, anchors, counts, batch, device,
                    iteration: int = 0) -> dict:
    """One CAG iteration as ``run_loop`` runs ``cag_stage``'s step (docs/method.md §3-§8).

    Poly lr, :func:`cag.stages.cag_train_step`, backward, the loop's finite check
    (``cag.loop._finite``, or :func:`finite_one_sync` with ``mode.one_sync``), SGD step, zero_grad.
    """
    for group in optimizer.param_groups:
        group["lr"] = loop.poly_lr(cfg.cag.lr, iteration, cfg.cag.poly_horizon, cfg.train.poly_power)
    xs, ys, xt = batch
    losses = stages.cag_train_step(cfg, student, teacher, anchors, counts, xs, ys, xt, device)
    losses["total"].backward()
    finite = finite_one_sync if mode.one_sync else loop._finite
    if finite(losses, {"model": student}):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return losses


def bench_train_step(profile: Profile, arch: str, mode: Mode, device: torch.device, backend: str) -> dict:
    """``train_step_<arch>`` in ``mode``: ms per iteration, images/s (source + target crops), peak, host syncs."""
    cfg = step_config(profile, arch, mode, device)
    with backend_flags(mode, device):
        torch.manual_seed(cfg.seed)
        generator = torch.Generator().manual_seed(cfg.seed)
        student = stages.make_model(cfg, device).train()
        teacher = make_teacher(student, mode, backend)
        optimizer = make_optimizer(student, cfg, mode)
        anchors, counts = synthetic_anchors(cfg.data.num_classes, student.feature_dim, device, generator)
        batch = synthetic_batch(cfg, device, generator)
        model = compile_module(student, mode, backend) if mode.compile else student
        losses = {}

        def step():
            losses.update(train_iteration(cfg, mode, model, teacher, optimizer, anchors, counts, batch, device))

        start = time.perf_counter()
        step()
        synchronize(device)
        first_s = time.perf_counter() - start
        ms, peak = time_calls(step, profile.warmup - 1, profile.iters, device)
        syncs = count_host_syncs(step, device)
    images = 2 * cfg.train.batch_size
    return {
        "name": f"train_step_{arch}", "mode": mode.name, "images_per_s": images_per_s(images, ms), "ms_per_step": ms,
        "peak_gib": peak, "peak_kind": peak_kind(device), "host_syncs_per_step": syncs, "first_step_s": first_s,
        "loss_total": float(losses["total"].detach()), "iters": profile.iters, "warmup": profile.warmup,
        "options": dataclasses.asdict(mode),
        "shape": {"arch": arch, "backbone": cfg.model.backbone, "crop_wh": list(cfg.data.crop),
                  "batch": cfg.train.batch_size, "images_per_step": images, "num_classes": cfg.data.num_classes},
    }


# ----------------------------------------------------------------------------- frames on disk


def write_frames(root: Path, profile: Profile, quiet: bool) -> list[dict]:
    """Full-size GTA5-layout source and Cityscapes-layout val frames of the built-in benchmark, under ``root``.

    The evaluation and data-pipeline measurements read them; no record of its own (returns []).
    """
    from .data import synthetic

    def params(size):
        return {"preset": "class", "strength": synthetic.resolve_strength("class", None), "size": list(size),
                "synthia": False}

    start = time.perf_counter()
    for i in range(profile.frames):
        synthetic.write_sample(root, "source", "train", i, params(profile.gta5_hw))
        synthetic.write_sample(root, "target", "val", i, params(profile.cityscapes_hw))
    if not quiet:
        print(f"wrote {2 * profile.frames} frames in {time.perf_counter() - start:.1f} s to {root}", flush=True)
    return []


class Repeated(torch.utils.data.Dataset):
    """``n`` items cycling through ``base`` (to score more images than frames were written)."""

    def __init__(self, base, n: int):
        self.base, self.n = base, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        return self.base[index % len(self.base)]


class Preloaded(torch.utils.data.Dataset):
    """The items of ``base`` decoded once and kept in memory."""

    def __init__(self, base):
        self.items = [base[i] for i in range(len(base))]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.items[index]


# ----------------------------------------------------------------------------- evaluation


def bench_eval(profile: Profile, mode: Mode, device: torch.device, frames: Path, preloaded: bool = False) -> dict:
    """``eval_full_res``: :func:`cag.evaluate.evaluate_model` on full-resolution val frames (docs/method.md §12).

    From PNG as the pipeline evaluates (decode in the main process, forward, upsample, argmax,
    confusion matrix), or ``preloaded`` to leave decoding out. ``ms_per_step`` is per image.
    """
    from .evaluate import evaluate_model

    cfg = step_config(profile, "deeplabv3plus", mode, device, **{"data.target_root": str(frames / "target")})
    dataset = stages.eval_dataset(cfg, "val")
    if preloaded:
        dataset = Preloaded(dataset)
    with backend_flags(mode, device):
        torch.manual_seed(cfg.seed)
        model = stages.make_model(cfg, device).eval()

        def score(n):
            return evaluate_model(model, Repeated(dataset, n), cfg.data.num_classes, device,
                                  batch_size=cfg.eval.batch_size, amp=cfg.train.amp == "bf16", quiet=True)

        score(min(2 * cfg.eval.batch_size, profile.eval_images))
        ms, peak = time_calls(lambda: score(profile.eval_images), 0, 1, device)
    per_image_ms = ms / profile.eval_images
    height, width = profile.cityscapes_hw
    return {
        "name": "eval_full_res_preloaded" if preloaded else "eval_full_res", "mode": mode.name,
        "images_per_s": images_per_s(1, per_image_ms), "ms_per_step": per_image_ms,
        "peak_gib": peak, "peak_kind": peak_kind(device), "seconds_per_500_images": per_image_ms * 500 / 1000,
        "options": dataclasses.asdict(mode),
        "shape": {"arch": cfg.model.arch, "backbone": cfg.model.backbone, "image_hw": [height, width],
                  "batch": cfg.eval.batch_size, "images": profile.eval_images, "distinct_frames": profile.frames},
    }


# ----------------------------------------------------------------------------- pseudo-label kernel


def kernel_inputs(shape, num_classes: int, device: torch.device) -> tuple:
    """Features [B, D, h, w] (non-negative, as after ReLU), anchors [C, D], all classes valid."""
    generator = torch.Generator().manual_seed(0)
    features = torch.rand(shape, generator=generator).to(device)
    anchors = torch.rand(num_classes, shape[1], generator=generator).to(device)
    return features, anchors, torch.ones(num_classes, dtype=torch.bool, device=device)


def kernel_parts(features, anchors, valid, delta_d: float = 2.5) -> dict:
    """The kernel's three stages as separate callables: distances (eq. 1), active test and assignment (eq. 2)."""
    from . import pseudo_labels as pl

    distances = pl.anchor_distances(features, anchors)
    nearest, margin = pl.nearest_anchor_margin(distances)
    return {
        "distances": lambda: pl.anchor_distances(features, anchors),
        "active_test": lambda: pl.nearest_anchor_margin(distances),
        "assignment": lambda: torch.where(margin >= delta_d, nearest, torch.full_like(nearest, IGNORE_INDEX)),
    }


def distances_by_matmul(features: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Bench-only variant of eq. (1): ``torch.cdist``'s matrix-multiply form (not tie-exact)."""
    batch, _, height, width = features.shape
    pixels = features.float().flatten(2).transpose(1, 2)
    distances = torch.cdist(pixels, anchors.float().unsqueeze(0), compute_mode="use_mm_for_euclid_dist")
    return distances.transpose(1, 2).reshape(batch, anchors.shape[0], height, width)


def labels_by_matmul(features, anchors, delta_d=2.5, valid=None):
    """:func:`cag.pseudo_labels.anchor_pseudo_labels` with :func:`distances_by_matmul` (bench-only)."""
    from . import pseudo_labels as pl

    nearest, margin = pl.nearest_anchor_margin(distances_by_matmul(features, anchors))
    return torch.where(margin >= delta_d, nearest, torch.full_like(nearest, IGNORE_INDEX))


def bench_pseudo_labels(profile: Profile, variant: str, device: torch.device, backend: str) -> dict:
    """``pseudo_labels``: :func:`cag.pseudo_labels.anchor_pseudo_labels` at ``profile.kernel_shape`` (docs/method.md §3).

    Variants: ``fp32`` (the package's kernel, with its three parts timed too), ``fp32_compile``,
    ``fp32_matmul`` (bench-only matrix-multiply distances).
    """
    from .pseudo_labels import anchor_pseudo_labels

    features, anchors, valid = kernel_inputs(profile.kernel_shape, profile.kernel_classes, device)
    kernels = {"fp32": anchor_pseudo_labels, "fp32_matmul": labels_by_matmul}
    kernel = kernels.get(variant) or torch.compile(anchor_pseudo_labels, backend=backend)

    def call():
        return kernel(features, anchors, 2.5, valid=valid)

    synchronize(device)
    base = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    with torch.no_grad():
        ms, peak = time_calls(call, max(profile.warmup, 3), profile.kernel_iters, device)
        parts = {} if variant != "fp32" else {name: time_calls(fn, 1, profile.kernel_iters, device)[0]
                                              for name, fn in kernel_parts(features, anchors, valid).items()}
        syncs = count_host_syncs(call, device)
    batch, dim, height, width = profile.kernel_shape
    return {
        "name": "pseudo_labels", "mode": variant, "images_per_s": images_per_s(batch, ms), "ms_per_step": ms,
        "peak_gib": peak, "peak_kind": peak_kind(device), "inputs_gib": base if device.type == "cuda" else None,
        "parts_ms": parts, "host_syncs_per_step": syncs,
        "shape": {"batch": batch, "dim": dim, "hw": [height, width], "num_classes": profile.kernel_classes},
    }


# ----------------------------------------------------------------------------- data pipeline


def data_config(profile: Profile, frames: Path) -> Config:
    """The augmentation configuration of the data-pipeline measurement, reading ``frames``."""
    return base_config(profile.data_config, profile.data_overrides, {
        "data.source_root": str(frames / "source"), "data.target_root": str(frames / "target"),
        "data.num_workers": 0, "device": "cpu", "quiet": True})


def time_items(fetch: Callable[[int], object], n: int) -> float:
    """Seconds per item of ``fetch(i)`` for i in range(n)."""
    start = time.perf_counter()
    for i in range(n):
        fetch(i)
    return (time.perf_counter() - start) / n


def pipeline_parts(dataset, transform, n: int) -> dict:
    """Milliseconds per frame of each part: PNG decodes, the dataset item (checks, label mapping), each transform."""
    from .data import io

    samples = [dataset.samples[i % len(dataset)] for i in range(n)]
    parts = {"read_image": time_items(lambda i: io.read_image(samples[i].image), n)}
    if samples[0].label is not None:
        parts["read_label"] = time_items(lambda i: dataset.read_label_ids(samples[i].label), n)
    with contextlib.suppress(ImportError):
        import cv2

        parts["read_image_cv2"] = time_items(lambda i: cv2.imread(str(samples[i].image), cv2.IMREAD_COLOR), n)
    items = [dataset[i % len(dataset)] for i in range(n)]
    parts["dataset_item"] = time_items(lambda i: dataset[i % len(dataset)], n)
    generator = torch.Generator().manual_seed(0)
    for step in transform.transforms:
        outputs, start = [], time.perf_counter()
        for item in items:
            outputs.append(step(item["image"], item.get("label"), generator=generator))
        parts[repr(step)] = (time.perf_counter() - start) / n
        items = [{"image": image, "label": label} for image, label in outputs]
    return {k: 1000 * v for k, v in parts.items()}


def bench_data_pipeline(profile: Profile, frames: Path) -> list[dict]:
    """``data_pipeline``: frames per second of one worker (one process, one thread; docs/data.md §6).

    ``gta5_decode``: dataset items (PNG decode, checks, label mapping); ``gta5_decode_augment`` and
    ``cityscapes_decode_augment``: the training stream (resize, random width, crop, flip, [0, 1],
    collate) as :func:`cag.stages.train_stream` builds it, with its parts timed.
    """
    cfg = data_config(profile, frames)
    n = profile.frames * profile.data_rounds
    records = []
    reset_peak(torch.device("cpu"))
    with threads(1):
        source = stages.source_dataset(cfg)
        target = stages.target_dataset(cfg, "val", labels=False)
        decode = time_items(lambda i: source[i % len(source)], n)
        records.append({"mode": "gta5_decode", "seconds": decode, "hw": profile.gta5_hw})
        for mode, dataset, resize, hw in (("gta5_decode_augment", source, cfg.data.source_resize, profile.gta5_hw),
                                          ("cityscapes_decode_augment", target, cfg.data.target_resize,
                                           profile.cityscapes_hw)):
            stream = stages.train_stream(cfg, dataset, resize, 1, cfg.seed, torch.device("cpu"))
            seconds = time_items(lambda i: stream.next(), n)
            parts = pipeline_parts(dataset, stream.loader.dataset.transform, min(n, profile.frames))
            records.append({"mode": mode, "seconds": seconds, "hw": hw, "parts_ms": parts})
    peak = peak_gib(torch.device("cpu"))
    return [{
        "name": "data_pipeline", "mode": r["mode"], "device": "cpu", "images_per_s": 1 / r["seconds"],
        "ms_per_step": 1000 * r["seconds"], "peak_gib": peak, "peak_kind": "cpu_process_high_water_mark",
        "parts_ms": r.get("parts_ms", {}),
        "shape": {"frame_hw": list(r["hw"]), "crop_wh": list(cfg.data.crop), "base_width": cfg.data.base_width,
                  "frames": profile.frames, "rounds": profile.data_rounds, "workers": 1, "threads": 1},
    } for r in records]


# ----------------------------------------------------------------------------- CPU profile


def images_through(stage: str, stage_dir: Path, cfg: Config) -> int | None:
    """Images the anchor pass or the evaluation stage went through (training stages report their own rate)."""
    syn = cfg.data.synthetic
    if stage == "anchors":
        return min(cfg.anchors.num_images or syn.n_source, syn.n_source)
    if stage == "evaluate":
        sizes = {cfg.data.val_split: syn.n_target_val, cfg.data.test_split: syn.n_target_test}
        return sum(sizes[r["split"]] for r in json.loads((stage_dir / "results.json").read_text())["results"])
    return None


def stage_record(name: str, stage_dir: Path, wall: float, cfg: Config) -> dict:
    """A ``cpu_profile`` record: a training stage's rate from its ``summary.json``, else images / wall time."""
    summary_path = stage_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    rate = summary.get("images_per_s")
    per_step = {"source_only": cfg.train.batch_size}.get(name, 2 * cfg.train.batch_size)
    images = images_through(name, stage_dir, cfg)
    if images is not None:
        rate, per_step = images / wall, None
    return {
        "name": f"cpu_profile_{name}", "mode": "fp32", "device": "cpu", "images_per_s": rate,
        "ms_per_step": 1000 * per_step / rate if rate and per_step else None, "peak_gib": summary.get("peak_memory_gib"),
        "peak_kind": "cpu_process_max_rss", "wall_s": wall, "iters": summary.get("iters"),
    }


@contextlib.contextmanager
def restored_determinism():
    """``seed_everything`` turns on deterministic algorithms on CPU; put the setting back afterwards."""
    saved = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])


def bench_cpu_profile(profile: Profile, work: Path, full: bool = False) -> list[dict]:
    """``cpu_profile_<stage>``: the built-in benchmark's stages on CPU (``configs/synthetic.yaml``).

    A short run (the profile's iteration and image counts), or with ``full`` the whole pipeline
    as ``make book`` runs it, generation of the data included (``cpu_pipeline``).
    """
    from .pipeline import Pipeline, stage_names

    root = work / ("full" if full else "short")
    overrides = () if full else profile.cpu_profile
    cfg = base_config("synthetic.yaml", overrides, {
        "out_dir": str(root / "runs"), "device": "cpu", "quiet": True,
        "data.synthetic.root": str(root / "data"), "data.source_root": str(root / "data" / "source"),
        "data.target_root": str(root / "data" / "target")})
    pipeline = Pipeline(cfg)
    records = []
    with restored_determinism():
        start = time.perf_counter()
        pipeline.prepare_data()
        generated = time.perf_counter() - start
        for stage in stage_names(cfg):
            t0 = time.perf_counter()
            pipeline.run_stage(stage)
            records.append(stage_record(stage, pipeline.stage_dir(stage), time.perf_counter() - t0, cfg))
        total = time.perf_counter() - start
    if full:
        summary = json.loads((cfg.run_dir / "summary.json").read_text())
        return [{"name": "cpu_pipeline", "mode": "fp32", "device": "cpu", "images_per_s": None, "ms_per_step": None,
                 "peak_gib": summary.get("peak_memory_gib"), "peak_kind": "cpu_process_max_rss", "wall_s": total,
                 "generate_s": generated, "miou": summary.get("miou"),
                 "stages": {r["name"].removeprefix("cpu_profile_"): {k: r[k] for k in ("wall_s", "images_per_s")}
                            for r in records}}]
    return records


# ----------------------------------------------------------------------------- the released schedule


def schedule_estimate(records: list[dict], cfg: Config | None = None) -> list[dict]:
    """GPU-hours of the released schedule (docs/method.md §7-§9) at this run's measured speeds.

    Every training iteration (source-only, warm-up, the CAG stages) is costed as one CAG step
    of the mode (an upper bound: source-only does less), every validation as
    ``val_images`` full-resolution images, the anchor pass as ``anchors.num_images`` images at
    the evaluation speed of the same mode (``bf16_cl``'s for modes evaluation was not timed in).
    Only records measured at the released sizes (profile ``released``) are costed.
    """
    cfg = cfg or Config()
    val_images = 500
    eval_rate = {r["mode"]: r["images_per_s"] for r in records
                 if r["name"] == "eval_full_res" and r.get("images_per_s")}
    iters = cfg.source_only.iters + cfg.warmup.iters + cfg.cag.stages * cfg.cag.iters
    vals = iters // cfg.train.val_interval
    out = []
    for r in records:
        rate = eval_rate.get(r["mode"]) or eval_rate.get("bf16_cl")
        costed = r["name"] == "train_step_deeplabv3plus" and r.get("profile") == "released"
        if not (costed and r.get("ms_per_step") and rate):
            continue
        seconds = iters * r["ms_per_step"] / 1000 + (vals * val_images + cfg.anchors.num_images) / rate
        shared = {k: r.get(k) for k in ("device", "date", "torch", "commit", "commit_dirty", "versions", "profile")}
        out.append({**shared, "name": "released_schedule_estimate", "mode": r["mode"],
                    "images_per_s": r["images_per_s"], "ms_per_step": r["ms_per_step"], "peak_gib": r["peak_gib"],
                    "gpu_hours": seconds / 3600, "estimate": True,
                    "inputs": {"train_iters": iters, "validations": vals, "val_images": val_images,
                               "anchor_images": cfg.anchors.num_images, "eval_images_per_s": rate}})
    return out


# ----------------------------------------------------------------------------- records, table, JSON


def add_speedups(records: list[dict]) -> list[dict]:
    """``speedup_vs_fp32`` = fp32 ms / this record's ms, against the ``fp32`` record of the same name."""
    fp32 = {r["name"]: r["ms_per_step"] for r in records if r["mode"] == "fp32" and r.get("ms_per_step")}
    for r in records:
        base = fp32.get(r["name"])
        r["speedup_vs_fp32"] = base / r["ms_per_step"] if base and r.get("ms_per_step") else None
    return records


def error_record(name: str, mode: str, error: BaseException) -> dict:
    """What a failed measurement leaves: the required fields empty and the error."""
    return {"name": name, "mode": mode, "images_per_s": None, "ms_per_step": None, "peak_gib": None,
            "error": f"{type(error).__name__}: {error}"}


def _cell(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(records: list[dict]) -> str:
    """The records as a fixed-width text table."""
    header = f"{'name':<30} {'mode':<26} {'device':<24} {'img/s':>9} {'ms/step':>9} {'peak GiB':>9} {'x fp32':>7}"
    lines = [header, "-" * len(header)]
    for r in records:
        note = f"  ERROR {r['error']}" if r.get("error") else ""
        lines.append(f"{r['name']:<30} {r['mode']:<26} {str(r.get('device'))[:24]:<24} "
                     f"{_cell(r.get('images_per_s'), 1):>9} {_cell(r.get('ms_per_step'), 2):>9} "
                     f"{_cell(r.get('peak_gib'), 2):>9} {_cell(r.get('speedup_vs_fp32'), 2):>7}{note}")
    return "\n".join(lines)


def write_records(path: Path, records: list[dict]) -> None:
    """Write the records as a JSON list, atomically (``<path>.tmp`` then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(records, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(path)


def finish(records: list[dict]) -> list[dict]:
    """Speed-ups and the schedule estimate added to the measured records."""
    measured = [r for r in records if r["name"] != "released_schedule_estimate"]
    add_speedups(measured)
    return measured + schedule_estimate(measured)


# ----------------------------------------------------------------------------- planning and running


@dataclasses.dataclass
class Unit:
    """One measurement: its name and mode (for error records) and what produces its records."""

    name: str
    mode: str
    run: Callable[[], dict | list[dict]]
    device: torch.device


def train_units(profile: Profile, archs, modes, device: torch.device, backend: str) -> list[Unit]:
    """Training-step measurements: every arch in every mode; the leads on DeepLab-v3+ alone."""
    return [Unit(f"train_step_{arch}", mode.name,
                 lambda a=arch, m=mode: bench_train_step(profile, a, m, device, backend), device)
            for arch in archs for mode in modes if arch == "deeplabv3plus" or not mode.name.startswith("lead")]


def kernel_units(profile: Profile, variants, device: torch.device, backend: str) -> list[Unit]:
    """Pseudo-label kernel measurements, one per variant."""
    return [Unit("pseudo_labels", v, lambda v=v: bench_pseudo_labels(profile, v, device, backend), device)
            for v in variants]


def plan(args, device: torch.device, profile: Profile, work: Path) -> list[Unit]:
    """The measurements in priority order, so that ``--budget-s`` drops the least wanted ones.

    The standard eager table, evaluation, data pipeline and CPU profile first; then the standard
    compiled modes; then the eager optimisation leads; the compiled leads last.
    """
    only, backend, frames, cpu = set(args.only), args.compile_backend, work / "frames", torch.device("cpu")
    archs = args.archs if "train_step" in only else []
    modes = [MODES[m] for m in args.modes if device.type == "cuda" or not MODES[m].cuda_only]
    standard = [m for m in modes if not m.name.startswith("lead")]
    leads = [m for m in modes if m.name.startswith("lead")]
    units = kernel_units(profile, ("fp32", "fp32_matmul") if "pseudo_labels" in only else (), device, backend)
    if only & {"eval_full_res", "data_pipeline"}:
        units.append(Unit("frames", "-", lambda: write_frames(frames, profile, args.quiet), cpu))
    units += train_units(profile, archs, [m for m in standard if not m.compile], device, backend)
    if "eval_full_res" in only:
        units += [Unit("eval_full_res", name, lambda m=MODES[name]: bench_eval(profile, m, device, frames), device)
                  for name in args.eval_modes if device.type == "cuda" or not MODES[name].cuda_only]
        units.append(Unit("eval_full_res_preloaded", "bf16_cl",
                          lambda: bench_eval(profile, MODES["bf16_cl"], device, frames, preloaded=True), device))
    if "data_pipeline" in only:
        units.append(Unit("data_pipeline", "-", lambda: bench_data_pipeline(profile, frames), cpu))
    if "cpu_profile" in only:
        units.append(Unit("cpu_profile", "fp32", lambda: bench_cpu_profile(profile, work), cpu))
        if args.full_pipeline:
            units.append(Unit("cpu_pipeline", "fp32", lambda: bench_cpu_profile(profile, work, full=True), cpu))
    units += train_units(profile, archs, [m for m in standard if m.compile], device, backend)
    units += train_units(profile, archs, [m for m in leads if not m.compile], device, backend)
    units += train_units(profile, archs, [m for m in leads if m.compile], device, backend)
    return units + kernel_units(profile, ("fp32_compile",) if "pseudo_labels" in only else (), device, backend)


def run_units(units: list[Unit], context: dict, budget_s: float | None = None, quiet: bool = False,
              on_record: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Run each unit, turning a failure into an error record; stop starting units after ``budget_s``."""
    records: list[dict] = []
    start = time.perf_counter()
    for unit in units:
        if budget_s is not None and time.perf_counter() - start > budget_s:
            print(f"time budget of {budget_s:.0f} s spent: skipped {unit.name} {unit.mode}", file=sys.stderr, flush=True)
            continue
        if not quiet:
            print(f"[bench {time.perf_counter() - start:6.1f} s] {unit.name} {unit.mode}", file=sys.stderr, flush=True)
        try:
            result = unit.run()
        except Exception as error:  # noqa: BLE001 - one failed mode must not lose the others
            traceback.print_exc()
            result = error_record(unit.name, unit.mode, error)
        finally:
            release_memory(unit.device)
        new = result if isinstance(result, list) else [result]
        records += [{**context, **r} for r in new]
        if on_record is not None:
            on_record(finish(records))
    return finish(records)


def resolve(device_arg: str) -> torch.device:
    """``auto`` -> CUDA when present; ``cuda`` without a GPU is an error."""
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    if device_arg == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch (torch.cuda.is_available() is False)")
    return torch.device("cuda", torch.cuda.current_device()) if device_arg == "cuda" else torch.device("cpu")


def _csv(choices):
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        unknown = [t for t in items if t not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)}; choose from {', '.join(choices)}")
        return items
    return parse


def parser() -> argparse.ArgumentParser:
    """The command line of ``python -m cag.bench``."""
    p = argparse.ArgumentParser(prog="python -m cag.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--out", type=Path, help="write the records as JSON here (e.g. benchmarks/results/DATE-h100.json)")
    p.add_argument("--smoke", action="store_true", help="toy sizes, a few iterations (make test)")
    p.add_argument("--profile", choices=sorted(PROFILES),
                   help="sizes (default: released on CUDA, cpu on CPU, smoke with --smoke)")
    p.add_argument("--only", type=_csv(BENCHMARKS), help=f"comma list of {', '.join(BENCHMARKS)}")
    p.add_argument("--modes", type=_csv(tuple(MODES)), help="training-step modes (default: standard + leads)")
    p.add_argument("--eval-modes", type=_csv(EVAL_MODES), default=list(EVAL_MODES))
    p.add_argument("--archs", type=_csv(ARCHS), default=list(ARCHS))
    p.add_argument("--iters", type=int, help="timed iterations per training-step mode")
    p.add_argument("--warmup", type=int, help="untimed iterations before them (at least 1)")
    p.add_argument("--compile-backend", help="torch.compile backend (default: inductor; eager for --smoke on CPU)")
    p.add_argument("--full-pipeline", action="store_true", help="also time the whole built-in pipeline (minutes)")
    p.add_argument("--budget-s", type=float, help="start no new measurement after this many seconds")
    p.add_argument("--work-dir", type=Path, help="where frames and runs are written (default: a temporary folder)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: as set by OMP_NUM_THREADS)")
    p.add_argument("--quiet", action="store_true")
    return p


def defaults(args, device: torch.device) -> argparse.Namespace:
    """Fill the options left unset from the device and ``--smoke``."""
    args.profile = args.profile or ("smoke" if args.smoke else "released" if device.type == "cuda" else "cpu")
    args.only = args.only or [b for b in BENCHMARKS if b != "cpu_profile" or device.type == "cpu"]
    args.modes = args.modes or list(SMOKE_MODES if args.smoke else (*STANDARD_MODES, *LEAD_MODES))
    args.compile_backend = args.compile_backend or ("eager" if args.smoke and device.type == "cpu" else "inductor")
    return args


def main(argv=None) -> int:
    """Plan, run, print the table, write the JSON; exit code 1 when a measurement failed, 2 when
    an input (``--out``, ``--work-dir``) is unusable (:mod:`cag.errors`)."""
    from .errors import cli_main

    return cli_main(_main, argv)


def _main(argv) -> int:
    from .errors import writable_folder

    args = parser().parse_args(argv)
    if args.out:
        writable_folder(Path(args.out).parent, "--out: the results folder")
    if args.work_dir:
        writable_folder(args.work_dir, "--work-dir")
    device = resolve(args.device)
    args = defaults(args, device)
    profile = PROFILES[args.profile]
    if args.iters is not None or args.warmup is not None:
        profile = dataclasses.replace(profile, iters=args.iters or profile.iters,
                                      warmup=max(1, args.warmup or profile.warmup))
    save = (lambda records: write_records(args.out, records)) if args.out else None
    with contextlib.ExitStack() as stack:
        stack.enter_context(threads(args.threads or torch.get_num_threads()))
        work = args.work_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cag-bench-")))
        context = run_context(device, profile, args.compile_backend)
        records = run_units(plan(args, device, profile, work), context, args.budget_s, args.quiet, save)
    if save:
        save(records)
    print(format_table(records))
    if args.out:
        print(f"wrote {len(records)} records to {args.out}")
    return 1 if any(r.get("error") for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
