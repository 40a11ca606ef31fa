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


def slerp(t: float, a: Tensor, b: Tensor) -> Tensor:
    """Spherical interpolation (Shoemake 1985) per sample between noise ``a`` (t = 0) and ``b`` (t = 1).

    Gaussian noise lies near a sphere of radius sqrt(dim); a straight line between two draws passes inside
    it (a mix at t = 1/2 has only 1/sqrt(2) of the norm), a great-circle arc does not.
    """
    flat_a, flat_b = a.flatten(1), b.flatten(1)
    cos = (flat_a * flat_b).sum(1) / (flat_a.norm(dim=1) * flat_b.norm(dim=1))
    omega = torch.acos(cos.clamp(-1.0, 1.0))
    sin = torch.sin(omega)
    nearly_parallel = sin.abs() < 1e-4
    safe_sin = torch.where(nearly_parallel, torch.ones_like(sin), sin)
    weight_a = torch.where(nearly_parallel, 1 - t, torch.sin((1 - t) * omega) / safe_sin)
    weight_b = torch.where(nearly_parallel, torch.full_like(sin, t), torch.sin(t * omega) / safe_sin)
    view = (-1,) + (1,) * (a.dim() - 1)
    return weight_a.view(view) * a + weight_b.view(view) * b


def variation_noise(
    shape: Sequence[int],
    seeds: Sequence[int],
    variation_seed: int,
    strength: float,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Noise of ``seeds`` moved ``strength`` of the way (0..1, on the sphere) towards the noise of
    ``variation_seed``: small strengths give variations of each seed's image, 1 gives the variation
    seed's image. Every sample moves towards the same variation seed's noise."""
    base = seeded_noise(shape, seeds, device, dtype)
    target = seeded_noise(shape, [variation_seed] * len(seeds), device, dtype)
    return slerp(strength, base, target)
