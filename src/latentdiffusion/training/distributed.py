"""torch.distributed set-up for runs launched by ``torchrun`` (gloo on CPU, nccl on CUDA).

Data parallelism is DistributedDataParallel (Li et al. 2020): every process holds the whole model, sees
its own share of each global batch, and gradients are averaged across processes before each step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

CPU = torch.device("cpu")


@dataclass(frozen=True)
class Distributed:
    """This process's place in the job; ``world_size == 1`` means no process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = CPU
    owns_group: bool = False  # this module started the process group (and so ends it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: str = "cpu") -> Distributed:
    """Join the process group named by torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK), if any."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    target = torch.device(device)
    if target.type == "cuda" and world_size > 1:
        target = torch.device("cuda", local_rank)
        torch.cuda.set_device(target)
    owns = world_size > 1 and not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if target.type == "cuda" else "gloo")
    return Distributed(rank, world_size, local_rank, target, owns)


def teardown(info: Distributed) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def wrap(module: nn.Module, info: Distributed) -> nn.Module:
    """DDP around ``module`` when distributed and it has trainable parameters; otherwise ``module``."""
    if not info.enabled or not any(p.requires_grad for p in module.parameters()):
        return module
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids)


def all_reduce_mean(values: dict[str, float], info: Distributed) -> dict[str, float]:
    """Average scalar logs over processes (one collective for all keys, in sorted order)."""
    if not info.enabled or not values:
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=_comm_device(info))
    dist.all_reduce(tensor)
    return {k: float(v) / info.world_size for k, v in zip(keys, tensor.tolist(), strict=True)}


def all_reduce_sum(value: int, info: Distributed) -> int:
    if not info.enabled:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=_comm_device(info))
    dist.all_reduce(tensor)
    return int(tensor.item())


def all_gather_int(value: int, info: Distributed) -> list[int]:
    """Every process's ``value``, by rank."""
    if not info.enabled:
        return [value]
    tensor = torch.zeros(info.world_size, dtype=torch.float64, device=_comm_device(info))
    tensor[info.rank] = value
    dist.all_reduce(tensor)
    return [int(v) for v in tensor.tolist()]


def barrier(info: Distributed) -> None:
    if info.enabled:
        dist.barrier()


def _comm_device(info: Distributed) -> torch.device:
    return info.device if info.device.type == "cuda" else torch.device("cpu")
