"""``Components``: a loaded model's networks by role, its tokenizers, its config and name.

Roles are the names diffusers gives a pipeline's parts ("unet", "autoencoder", "text_encoder",
"text_encoder_2", ...); which roles a model has is its family's business (``latentdiffusion.families``).
Every model has a denoising network ("unet") and an autoencoder; pipelines reach the text encoders only
through the family's conditioning. This module sits below both ``checkpoints`` and ``pipelines``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from latentdiffusion.config import ModelConfig
from latentdiffusion.diffusion.process import NoiseProcess, process_from_config
from latentdiffusion.diffusion.schedules import NoiseSchedule

if TYPE_CHECKING:
    from latentdiffusion.families.base import Family
    from latentdiffusion.models.tokenizer import CLIPTokenizer


@dataclass
class Components:
    """A model's networks (by role), tokenizers (by the role of the text encoder they feed) and noise
    process, plus the name written into image metadata."""

    config: ModelConfig
    modules: dict[str, torch.nn.Module]
    tokenizers: dict[str, CLIPTokenizer] = field(default_factory=dict)
    name: str = ""
    preview_decoder: torch.nn.Module | None = None  # a trained progress-preview decoder, if the model has one

    @property
    def family(self) -> Family:
        from latentdiffusion.families import family_of

        return family_of(self.config)

    @property
    def network(self) -> torch.nn.Module:
        """The denoising network: the U-Net, or SD3's transformer (the family's ``network_role``)."""
        return self.modules[self.family.network_role]

    @property
    def unet(self) -> torch.nn.Module:
        """The U-Net, for what only a U-Net model has (ControlNet, DeepCache, the x4 upscaler)."""
        from latentdiffusion.errors import UserError

        if "unet" not in self.modules:
            raise UserError(f"{self.family.description} models have no U-Net for this feature")
        return self.modules["unet"]

    @property
    def autoencoder(self) -> torch.nn.Module:
        return self.modules["autoencoder"]

    @property
    def text_encoder(self) -> torch.nn.Module | None:
        """The first text encoder, where the model has one (training and LoRA code of SD-style models)."""
        return self.modules.get("text_encoder")

    @property
    def tokenizer(self) -> CLIPTokenizer | None:
        return self.tokenizers.get("text_encoder")

    @property
    def process(self) -> NoiseProcess:
        """The noise process the denoising network was trained on (discrete VP or rectified flow)."""
        return process_from_config(self.config.schedule)

    @property
    def schedule(self) -> NoiseSchedule:
        """The discrete VP training schedule (models of the discrete process only)."""
        if self.config.schedule.process != "discrete":
            process = self.config.schedule.process
            raise ValueError(f"a {process!r} model has no discrete schedule; use Components.process")
        return NoiseSchedule.from_config(self.config.schedule)

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.network.parameters()).dtype

    def with_modules(self, **modules: torch.nn.Module) -> Components:
        """A shallow copy in which the given roles hold other modules (wrappers, grown networks)."""
        twin = copy.copy(self)
        twin.modules = {**self.modules, **modules}
        return twin

    def eval(self) -> Components:
        for module in self.modules.values():
            module.eval().requires_grad_(False)
        return self


def build_components(config: ModelConfig, *, seed: int = 0, name: str | None = None) -> Components:
    """Networks with freshly initialised (random) weights: for tests, benchmarks and training."""
    from latentdiffusion.families import family_of

    family = family_of(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        modules = family.build(config)
    return Components(config, modules, family.tokenizers(config), name or config.name).eval()
