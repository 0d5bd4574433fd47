"""Data-parallel training helpers (torch.distributed; no-ops in a single process).

Under DDP each rank computes its loss on its share of the global batch and the gradients are
averaged over ranks. That equals one process on the whole batch only if every normaliser of a loss
(the box count, the sum of confidence weights, ...) is the global one: `global_mean` gives a
normaliser's mean over ranks, and a loss divided by it averages to the global loss. A loss summed
without a normaliser is multiplied by `world_size()` for the same reason.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def global_mean(x: Tensor | float) -> Tensor | float:
    """The mean of a normaliser over all ranks (detached; `x` itself in a single process)."""
    if not is_distributed():
        return x
    t = (x.detach().clone() if torch.is_tensor(x) else torch.tensor(float(x))).float().to(_device())
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return t.to(x.device) if torch.is_tensor(x) else float(t)


def all_ranks(flag: Tensor) -> bool:
    """Whether a 0-d bool tensor is True on every rank (one all-reduce in a data-parallel run; the
    flag's own value otherwise)."""
    if not is_distributed():
        return bool(flag)
    value = flag.to(torch.float32).reshape(1)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def average_across_ranks(values: Tensor) -> Tensor:
    """A 1-d tensor of per-rank values averaged over ranks (epoch loss means for the log)."""
    if not is_distributed():
        return values
    out = values.detach().clone().float().to(_device())
    dist.all_reduce(out)
    return (out / dist.get_world_size()).to(values.device)


def _device() -> torch.device:
    """Where collectives run: NCCL needs CUDA tensors, gloo takes CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def wrap_ddp(module: torch.nn.Module, device: torch.device, find_unused_parameters: bool = False) -> torch.nn.Module:
    """DistributedDataParallel over `module`. On CUDA, BatchNorm layers that still train become
    SyncBatchNorm (statistics over the global batch); on CPU (gloo) there is no SyncBatchNorm, so each
    rank normalises by its own share unless the model uses `model.frozen_bn`. `find_unused_parameters`
    (see may_leave_parameters_unused): DDP then marks what a step did not use as ready instead of
    failing the next step with "Expected to have finished reduction in the prior iteration"."""
    if device.type == "cuda":
        module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return DistributedDataParallel(
        module,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=find_unused_parameters,
    )


def may_leave_parameters_unused(detector: torch.nn.Module, aux_loss: bool) -> bool:
    """Whether a training step of `detector` may leave some of its parameters out of the loss: the
    per-layer heads of the earlier decoder layers without the auxiliary losses, and the denoising label
    embedding (DINO, RT-DETR) on a rank whose share of the batch holds no box. DDP's search for unused
    parameters costs a pass over the autograd graph per step, so it is on only then."""
    return not aux_loss or getattr(getattr(detector, "cfg", None), "dn_number", 0) > 0
