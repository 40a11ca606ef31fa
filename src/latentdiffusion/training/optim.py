"""AdamW with linear warm-up and cosine decay (Loshchilov & Hutter 2019; 2017, Eq. 5)."""

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
) -> torch.optim.AdamW:
    params = [p for p in parameters if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters for the optimiser")
    return torch.optim.AdamW(
        params,
        lr=lr if lr is not None else config.lr,
        betas=config.betas,
        eps=config.eps,
        weight_decay=config.weight_decay,
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: OptimConfig, max_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    multiplier = WarmupCosine(
        config.warmup_steps, max_steps, config.min_lr_ratio, config.schedule == "cosine"
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
