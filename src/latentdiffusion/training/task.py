"""What the training loop trains: the ``Task`` interface and the seeded per-step randomness.

A task owns the networks of one stage and turns a micro-batch into one loss per optimiser. The loop
(``training.loop``) owns everything else: optimisers, EMA, DDP, checkpoints, logging. Fine-tuning
reuses the loop by passing a model-building hook and a trainable-parameter selection hook to ``train``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from latentdiffusion.components import Components
from latentdiffusion.training.config import DataConfig, OptimConfig, TrainConfig
from latentdiffusion.training.data import Batch, DataSplit, open_source
from latentdiffusion.training.distributed import Distributed


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from non-negative integers (numpy's SeedSequence), for torch.Generator."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0] >> np.uint64(1))


class StepRandom:
    """The random numbers of one global micro-batch.

    Every draw is made for all ``global_batch`` items of the micro-batch from one generator seeded by
    ``(seed, micro_batch)`` and then indexed by this process's item positions, so the result depends on
    neither the number of processes nor on how the run was interrupted and resumed.
    """

    def __init__(self, seed: int, micro_batch: int, global_batch: int, positions: torch.Tensor) -> None:
        self.generator = torch.Generator().manual_seed(derive_seed(seed, micro_batch))
        self.global_batch, self.positions = global_batch, positions

    def randn(self, *shape: int, device: torch.device | None = None) -> torch.Tensor:
        """Standard normal [n, *shape] in float32."""
        full = torch.randn((self.global_batch, *shape), generator=self.generator)
        return full[self.positions].to(device)

    def rand(self, *shape: int, device: torch.device | None = None) -> torch.Tensor:
        """Uniform in [0, 1), [n, *shape] float32."""
        full = torch.rand((self.global_batch, *shape), generator=self.generator)
        return full[self.positions].to(device)

    def randint(self, high: int, device: torch.device | None = None) -> torch.Tensor:
        """Uniform integers in [0, high), [n] long."""
        full = torch.randint(high, (self.global_batch,), generator=self.generator)
        return full[self.positions].to(device)


class Task:
    """The stage-specific half of a training run. Subclasses set ``networks`` and implement ``losses``."""

    name = "task"

    def __init__(self, config: TrainConfig, components: Components, device: torch.device) -> None:
        self.config, self.components, self.device = config, components, device
        self.networks: dict[str, nn.Module] = {}  # name -> network whose trainable weights are checkpointed

    @property
    def ema_networks(self) -> tuple[str, ...]:
        """Networks whose trainable weights get an EMA (and are exported averaged)."""
        return tuple(self.networks)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Default trainable-parameter selection: optimiser name -> parameters."""
        raise NotImplementedError

    def learning_rate(self, group: str) -> float:
        return self.config.optim.lr

    def optim_config(self, group: str) -> OptimConfig:
        """The optimiser settings of ``group`` (its learning rate aside: ``learning_rate``)."""
        return self.config.optim

    def forward_modules(self) -> dict[str, nn.Module]:
        """Modules the loop wraps in DDP (when distributed) and hands to ``losses`` by name."""
        return dict(self.networks)

    def checkpoint_block_types(self) -> tuple[type[nn.Module], ...]:
        """Module types wrapped in activation checkpointing when ``gradient_checkpointing`` is on."""
        return ()

    def open_data(self, config: DataConfig, seed: int) -> DataSplit:
        """The training data (``training.data.open_source``); a task with its own data replaces it."""
        return open_source(config, seed)

    def prepare_data(self, split: DataSplit, run_dir: Path, info: Distributed) -> DataSplit:
        """A hook to replace the training source (latent caching); the default keeps it."""
        return split

    def losses(
        self, modules: dict[str, nn.Module], batch: Batch, random: StepRandom, step: int
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """One loss per parameter group (a group may be absent this step) and scalar logs."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, batches: Sequence[Batch]) -> dict[str, float]:
        return {}

    @torch.no_grad()
    def sample_grid(self, batches: Sequence[Batch]) -> Image.Image | None:
        return None

    def export(self, path: Path, batches: Sequence[Batch]) -> Components:
        """Write the model (EMA weights applied by the caller) where ``ld.load(path)`` reads it."""
        raise NotImplementedError


def image_grid(
    images: Sequence[Image.Image], columns: int, background: str | tuple[int, int, int] = (0, 0, 0)
) -> Image.Image:
    """Tile equally sized images row by row on a ``background`` canvas."""
    width, height = images[0].size
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * width, rows * height), background)
    for i, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((i % columns) * width, (i // columns) * height))
    return grid
