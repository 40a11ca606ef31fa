"""AdamW or Adafactor with linear warm-up and cosine decay (Loshchilov & Hutter 2019; Shazeer & Stern
2018; Loshchilov & Hutter 2017, Eq. 5)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from latentdiffusion.training.config import OptimConfig


class WarmupCosine:
    """lr multiplier at optimiser step s: linear warm-up to 1 over ``warmup`` steps, then a half cosine
    from 1 down to ``min_ratio`` at ``total`` steps (``cosine=False``: constant 1 after the warm-up).

    A class, not a lambda, so that ``LambdaLR.state_dict`` saves it with the checkpoint.
    """

    def __init__(self, warmup: int, total: int, min_ratio: float, cosine: bool = True) -> None:
        self.warmup, self.total, self.min_ratio, self.cosine = warmup, total, min_ratio, cosine

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if not self.cosine or self.total <= self.warmup:
            return 1.0
        progress = min(1.0, (step - self.warmup) / (self.total - self.warmup))
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(
    parameters: Iterable[torch.nn.Parameter], config: OptimConfig, lr: float | None = None
) -> torch.optim.Optimizer:
    """``config.name``'s optimiser over the trainable ``parameters``; ``lr`` overrides ``config.lr``."""
    params = [p for p in parameters if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters for the optimiser")
    return OPTIMIZERS[config.name](params, config, lr if lr is not None else config.lr)


def _adamw(params: list[torch.nn.Parameter], config: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """Two moments per parameter (8 bytes of state per fp32 weight)."""
    return torch.optim.AdamW(
        params, lr=lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay
    )


def _adafactor(params: list[torch.nn.Parameter], config: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """Adafactor (Shazeer & Stern 2018) without momentum: a matrix's second moment is kept as row and
    column means over its last two dimensions, a vector's whole, decayed by 1 - t^-0.8; no first moment.

    torch scales each step by max(eps2, RMS(weight)) (the paper's relative step size). With eps2 = 1
    that factor is 1 for every weight with RMS <= 1 (all of a diffusion network's at initialisation), so
    ``lr`` is an absolute step bound as for AdamW and the fine-tuning learning rates carry over; with
    torch's eps2 = 1e-3, zero-initialised weights (LoRA up-projections, ControlNet's zero convolutions)
    would move by only 1e-3 * lr per step. ``eps`` floors the root of the second moment, as for AdamW.
    The per-tensor loop (``foreach=False``) avoids the foreach path's extra copy of all gradients.
    """
    return torch.optim.Adafactor(
        params, lr=lr, eps=(config.eps, 1.0), weight_decay=config.weight_decay, foreach=False
    )


OPTIMIZERS = {"adamw": _adamw, "adafactor": _adafactor}  # keys: training.config.OPTIMIZERS


def state_numel(shape: tuple[int, ...], name: str) -> int:
    """Elements of optimiser state (step counters aside) that ``name`` keeps for a parameter of ``shape``:
    AdamW two moments of its size; Adafactor, for two or more dimensions, one row and one column mean over
    the last two per leading index, else one second moment of its size. Meta tensors' shapes suffice."""
    numel = math.prod(shape)
    if name == "adamw":
        return 2 * numel
    if name != "adafactor":
        raise ValueError(f"unknown optimiser {name!r}")
    if len(shape) < 2:
        return numel
    *leading, rows, cols = shape
    return math.prod(leading) * (rows + cols)


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: OptimConfig, max_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    multiplier = WarmupCosine(
        config.warmup_steps, max_steps, config.min_lr_ratio, config.schedule == "cosine"
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
