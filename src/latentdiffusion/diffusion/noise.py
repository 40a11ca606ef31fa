"""Seeded Gaussian noise: an image depends on its own seed, not on the batch it is drawn in or the device.

Each sample draws from its own CPU ``torch.Generator`` in float32 and is then moved and cast, so the
same seed gives the same noise on every device and in every dtype (and matches diffusers' pipelines
called with a list of CPU generators, in float32).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

Generators = torch.Generator | Sequence[torch.Generator] | None


def seeded_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per sample; pass the list on to a sampler to keep each sample's stream its own."""
    return [torch.Generator().manual_seed(int(seed)) for seed in seeds]


def randn(
    shape: Sequence[int], generator: Generators, device: torch.device | str, dtype: torch.dtype
) -> Tensor:
    """Standard normal noise of ``shape`` from no generator (global RNG), one generator, or one per sample."""
    if generator is None:
        return torch.randn(tuple(shape), device=device, dtype=dtype)
    if isinstance(generator, torch.Generator):
        noise = torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=torch.float32)
        return noise.to(device=device, dtype=dtype)
    if len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
    per_sample = [randn((1, *shape[1:]), g, device, dtype) for g in generator]
    return torch.cat(per_sample)


def randn_like(x: Tensor, generator: Generators = None) -> Tensor:
    """Noise shaped like ``x`` on its device and dtype (fresh noise for ancestral and SDE samplers)."""
    return randn(x.shape, generator, x.device, x.dtype)


def seeded_noise(
    shape: Sequence[int],
    seeds: Sequence[int],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Noise of ``shape`` whose sample i is drawn from ``torch.Generator().manual_seed(seeds[i])``."""
    if len(seeds) != shape[0]:
        raise ValueError(f"got {len(seeds)} seeds for a batch of {shape[0]}")
    return randn(shape, seeded_generators(seeds), device, dtype)
