"""Fully sharded data parallelism for the training loop (Zhao et al. 2023, "PyTorch FSDP: Experiences on
Scaling Fully Sharded Data Parallel"), with torch's per-parameter sharding (``fully_shard``).

With ``distributed.strategy=fsdp`` under torchrun, each trainable network is sharded in units: every block
of ``Task.checkpoint_block_types`` (ResBlock, SpatialTransformer, MMDiT JointBlock, text-encoder layer),
then the rest of the network. Each process keeps 1/N of every parameter, its gradient and its optimiser
state (DTensor shards along dim 0); a unit's parameters are all-gathered for its forward and backward and
freed after, and gradients are reduce-scattered (averaged) into the shards: the same mean gradient as DDP.
On CUDA with ``precision=bf16`` the units compute in bfloat16 and reduce in float32
(``MixedPrecisionPolicy``); on CPU (gloo) they stay float32. Activation checkpointing
(``gradient_checkpointing``) wraps the blocks first; the state-dict keys stay the model's. A network
with LoRA adapters is sharded the same way, its frozen weights with the adapters. With gradient
accumulation each micro-batch is reduce-scattered into the sharded gradients (which add up): skipping
those reductions would keep whole gradients on every process until the step's last micro-batch.

Checkpoints hold full state dicts, gathered to CPU on every process and written by rank 0: network
weights under their usual names (the same as a DDP run's), the EMA shadows whole, and the optimiser state
in torch.distributed.checkpoint's full form (``get_optimizer_state_dict``: per-parameter state keyed by
the parameter's name under its network, e.g. ``unet.out.2.weight``, and ``param_groups`` listing names).
An FSDP run therefore resumes under any number of processes (not under DDP: the strategy is part of the
run's config). Evaluation, sample grids and the export run on rank 0 on a plain copy of the task whose
networks receive the gathered (EMA) weights, so the exported model files are those of any other run.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from latentdiffusion.training.distributed import Distributed
from latentdiffusion.training.task import Task

ParameterNames = dict[str, list[str]]  # optimiser group -> "network.parameter" names
CHECKPOINT_WRAPPED = "_checkpoint_wrapped_module."


def full_options(**extra: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **extra)


# -------------------------------------------------------------------------------------- sharding


def shard_network(
    network: nn.Module, block_types: tuple[type[nn.Module], ...], info: Distributed, precision: str
) -> nn.Module:
    """``fully_shard`` each block of ``block_types`` (innermost first), then ``network``. Frozen blocks
    are units too (a LoRA run's ResBlocks): else their weights would be gathered with the network's rest,
    all at once."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    if precision == "bf16" and info.device.type == "cuda":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        policy = MixedPrecisionPolicy()
    blocks = [m for m in network.modules() if m is not network and isinstance(m, block_types)]
    for block in reversed(blocks):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(network, mesh=mesh, mp_policy=policy)
    return network


def parameter_names(networks: dict[str, nn.Module], groups: dict[str, list[nn.Parameter]]) -> ParameterNames:
    """The names (``network.parameter``) of every selected parameter, to find them again after sharding
    replaces them by DTensor parameters."""
    names = {
        id(p): f"{net}.{name}" for net, module in networks.items() for name, p in module.named_parameters()
    }
    return {group: [names[id(p)] for p in params] for group, params in groups.items()}


def parameters_by_name(
    networks: dict[str, nn.Module], names: ParameterNames
) -> dict[str, list[nn.Parameter]]:
    found = {f"{net}.{name}": p for net, module in networks.items() for name, p in module.named_parameters()}
    return {group: [found[name] for name in group_names] for group, group_names in names.items()}


def is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor (all-gathered from a DTensor's shards: every process must call)."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


# ------------------------------------------------------------------------------------ state dicts


def network_state(network: nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict on CPU (all processes call; every one receives it)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(network, options=full_options(cpu_offload=True))


def load_network_state(network: nn.Module, state: dict[str, torch.Tensor]) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(network, state, options=full_options())


def optimizer_state(networks: dict[str, nn.Module], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimiser's full state keyed by parameter names (all processes call)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(
        nn.ModuleDict(networks), optimizer, options=full_options(cpu_offload=True)
    )


def load_optimizer_state(
    networks: dict[str, nn.Module], optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(nn.ModuleDict(networks), optimizer, state, options=full_options())


def local_views(params: list[nn.Parameter]) -> list[torch.Tensor]:
    """This process's shards of ``params`` (views: writing them writes the parameters). The EMA works on
    these, so that its per-step update is plain tensor arithmetic instead of DTensor dispatch."""
    return [p.to_local() if is_sharded(p) else p for p in params]


def whole(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The full tensor whose shard ``local`` is, sharded as the parameter ``like`` (all processes call)."""
    from torch.distributed.tensor import DTensor

    if not is_sharded(like):
        return local
    spec = {"shape": like.shape, "stride": like.stride()}
    return DTensor.from_local(local, like.device_mesh, like.placements, **spec).full_tensor()


def ema_state(ema, params: list[nn.Parameter]) -> dict[str, Any]:
    """An ``EMA`` over ``local_views(params)`` with its shadows made whole (all processes call)."""
    shadow = [whole(s, p).cpu() for s, p in zip(ema.shadow, params, strict=True)]
    return ema.state_dict() | {"shadow": shadow}


def load_ema_state(ema, state: dict[str, Any], params: list[nn.Parameter]) -> None:
    """Load whole shadows into an ``EMA`` over ``local_views(params)``: each process keeps its shards."""
    from torch.distributed.tensor import distribute_tensor

    ema.load_state_dict(state)
    ema.shadow = [
        distribute_tensor(s.to(p.device), p.device_mesh, p.placements, src_data_rank=None).to_local().clone()
        if is_sharded(p)
        else s
        for s, p in zip(ema.shadow, params, strict=True)
    ]


def clip_grad_norm_(params: list[nn.Parameter], max_norm: float) -> float:
    """Scale the gradients of sharded ``params`` to a global norm of at most ``max_norm`` (as
    ``torch.nn.utils.clip_grad_norm_``), summing the shards' squares in one all-reduce; the norm before."""
    import torch.distributed as dist

    grads = [g.to_local() if is_sharded(g) else g for g in (p.grad for p in params) if g is not None]
    if not grads:
        return 0.0
    squares = torch.stack([g.float().pow(2).sum() for g in grads]).sum()
    dist.all_reduce(squares)
    norm = squares.sqrt()
    scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    torch._foreach_mul_(grads, scale.to(grads[0].dtype))
    return float(norm)


# ------------------------------------------------------------------------------- plain task copy


def meta_copy(task: Task, sharded: Iterable[str]) -> Task:
    """A copy of ``task`` whose ``sharded`` networks hold meta (storage-free) parameters, for rank 0 to
    evaluate, sample and export with gathered weights; every other module and tokenizer is shared."""
    sharded = set(sharded)
    memo: dict[int, Any] = {}
    for name, network in task.networks.items():
        for p in network.parameters():
            memo[id(p)] = (
                p if name not in sharded else nn.Parameter(torch.empty_like(p, device="meta"), False)
            )
    for module in task.components.modules.values():
        if all(module is not n for n in task.networks.values()):
            memo[id(module)] = module
    for tokenizer in task.components.tokenizers.values():
        memo[id(tokenizer)] = tokenizer
    return copy.deepcopy(task, memo)


def fill(network: nn.Module, state: dict[str, torch.Tensor], device: torch.device) -> None:
    """Give a meta copy's parameters the weights of ``state`` (and its buffers their saved values)."""
    for name, _ in list(network.named_parameters()):
        module_name, _, leaf = name.rpartition(".")
        module = network.get_submodule(module_name)
        key = name.replace(CHECKPOINT_WRAPPED, "")  # state-dict names skip activation-checkpoint wrappers
        module._parameters[leaf] = nn.Parameter(state[key].to(device), requires_grad=False)
    network.load_state_dict(state)


def empty(network: nn.Module) -> None:
    """Free a filled copy's weights again (back to meta)."""
    for name, p in list(network.named_parameters()):
        module_name, _, leaf = name.rpartition(".")
        module = network.get_submodule(module_name)
        module._parameters[leaf] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
