"""Several processes, one machine or several (torchrun): DDP helpers and a CPU-capable SyncBN.

``torchrun --nproc_per_node=N -m cag run ...`` sets RANK/WORLD_SIZE/LOCAL_RANK; every rank
trains on its share of each global batch, gradients are averaged by DistributedDataParallel,
BatchNorm statistics are synchronised (docs/paper-vs-code.md row 34: SyncBN under DDP), metrics are
all-reduced, and rank 0 alone logs and writes checkpoints. Every loss is divided by its item
count over all ranks (and all micro-batches of a step), not by each rank's own count
(:func:`global_denominators`), so N processes optimise the objective of one process holding
the global batch.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn as nn


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def init_from_env(device_type: str) -> bool:
    """Join the process group torchrun describes in the environment; False when run alone."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend)
    return True


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def broadcast_object(obj):
    """Rank 0's value of a picklable object on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """The mean over ranks of a tensor (for logging)."""
    if world_size() == 1:
        return value
    value = value.clone()
    dist.all_reduce(value)
    return value / world_size()


def global_denominators(counts: dict) -> dict[str, torch.Tensor]:
    """This rank's loss denominators that make every loss a mean over the whole global batch.

    ``counts`` maps each loss term to the number of items it averages over on this rank
    (non-ignored pixels, (image, class) pairs, discriminator patches), summed over the
    micro-batches of one optimiser step. The counts are summed over ranks (one all_reduce of
    one small integer tensor, no gradient) into N; the denominator returned is
    ``max(N, 1) / world_size``. A rank that divides the *sum* of a term over its micro-batch by
    this denominator contributes ``world_size * sum / N``; DistributedDataParallel averages the
    gradients over ranks and the micro-batches' backward passes add up, so the optimiser sees
    the gradient of (sum over every item of the global batch) / N: the objective of one process
    holding the whole batch, whatever the number of ranks and of micro-batches, and however
    unevenly ignore pixels fall between them. A count of 0 gives 1 (every sum is 0 then).

    One process and one micro-batch: the denominator is the local count (clamped to 1), so a
    loss divided by it is exactly the plain mean.
    """
    if not counts:
        return {}
    keys = list(counts)
    first = next((c for c in counts.values() if isinstance(c, torch.Tensor)), None)
    device = first.device if first is not None else torch.device("cpu")
    total = torch.stack([torch.as_tensor(counts[k], device=device).detach().to(torch.int64).reshape(()) for k in keys])
    world = world_size()
    if world > 1:
        dist.all_reduce(total)
    denominators = total.clamp(min=1).to(torch.float32) / world
    return dict(zip(keys, denominators.unbind()))


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose batch statistics span every rank, on any device (gloo included).

    ``torch.nn.SyncBatchNorm`` refuses CPU tensors; this layer all-reduces the per-channel
    sum, sum of squares and count with differentiable collectives, so the forward pass and the
    gradients equal those of one process holding the whole global batch.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or world_size() == 1:
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        count = torch.tensor([x.numel() / x.shape[1]], device=x.device, dtype=x.dtype)
        stats = torch.cat([x.sum(dim=(0, 2, 3)), (x * x).sum(dim=(0, 2, 3)), count])
        stats = all_reduce(stats)
        c = x.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = stats[c:2 * c] / n - mean * mean
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_(var.detach() * n / (n - 1), self.momentum)
        y = (x - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + self.eps)
        return y * self.weight[None, :, None, None] + self.bias[None, :, None, None]


def convert_sync_batchnorm(module: nn.Module, device_type: str) -> nn.Module:
    """SyncBatchNorm on CUDA, :class:`GlobalBatchNorm2d` elsewhere; unchanged for one process."""
    if world_size() == 1:
        return module
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert_global(module)


def _convert_global(module: nn.Module) -> nn.Module:
    out = module
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, GlobalBatchNorm2d):
        out = GlobalBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        out.load_state_dict(module.state_dict())
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _convert_global(child))
    return out
