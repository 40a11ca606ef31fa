"""How much a text-conditioned denoiser relies on its captions.

The denoising loss on images with their own captions, against the same images, noise and noise levels with
each caption moved to the next image (a cyclic shift: no image keeps its own). A network that follows its
captions predicts worse with another image's (ratio > 1); one that ignores them scores a ratio of exactly 1,
whatever its loss. Read at fixed timesteps, it tells apart a model that has not yet learned to draw what
its caption says from one that has stopped listening to it: the diagnostic behind the pixel-space rows of
docs/latent-vs-pixel.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from latentdiffusion.components import Components
from latentdiffusion.diffusion.process import process_from_config
from latentdiffusion.errors import UserError
from latentdiffusion.families.base import ConditioningRequest

TIMESTEPS = (999, 900, 600, 300)


@dataclass(frozen=True)
class Reliance:
    """The mean squared error of the network's prediction (in its own parameterisation) at one timestep."""

    timestep: int
    own: float  # with each image's own caption
    moved: float  # with the next image's caption

    @property
    def ratio(self) -> float:
        return self.moved / self.own


def moved_captions(captions: Sequence[str]) -> list[str]:
    """Each caption moved to the next image (the last to the first)."""
    return [*captions[1:], captions[0]]


@torch.no_grad()
def caption_reliance(
    components: Components,
    images: torch.Tensor,
    captions: Sequence[str],
    timesteps: Sequence[int] = TIMESTEPS,
    seed: int = 0,
) -> list[Reliance]:
    """Reliance at each of ``timesteps`` (of a discrete-time model) for ``images`` [N, 3, H, W] in [-1, 1]
    and their ``captions`` (N >= 2, not all the same); one noise draw from ``seed`` serves every timestep
    and both caption orders. The networks run as given (loaded and built components are in eval mode)."""
    _check(components, images, captions, timesteps)
    config = components.config
    process = process_from_config(config.schedule)
    z0 = components.autoencoder.to_latent(images.float()).float()
    eps = torch.randn(z0.shape, generator=torch.Generator().manual_seed(seed))
    requests = [ConditioningRequest(images.shape[-2], images.shape[-1])] * len(captions)
    family, network = components.family, components.network
    conds = [family.training_condition(components, c, requests) for c in (captions, moved_captions(captions))]
    found = []
    for timestep in timesteps:
        t = torch.full((len(captions),), timestep, dtype=torch.long)
        z_t = process.add_noise(z0, eps, t)
        target = process.training_target(config.schedule.prediction_type, z0, eps, t)
        own, moved = (
            float((network(z_t, process.network_timestep(t), **cond).float() - target).pow(2).mean())
            for cond in conds
        )
        found.append(Reliance(timestep, own, moved))
    return found


def _check(components: Components, images: torch.Tensor, captions: Sequence[str], timesteps) -> None:
    if components.config.schedule.process != "discrete":
        raise UserError("caption reliance reads timesteps of a discrete-time model, not a flow model")
    if images.ndim != 4 or len(images) != len(captions):
        raise UserError(
            f"expected one caption per image, got {len(images)} images and {len(captions)} captions"
        )
    if len(set(captions)) < 2:
        raise UserError("caption reliance needs at least two different captions")
    count = components.config.schedule.num_train_timesteps
    bad = [t for t in timesteps if not 0 <= t < count]
    if bad:
        raise UserError(f"timesteps must be in [0, {count}), got {bad}")
