"""The parts of a latent diffusion model that every pipeline works on."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from latentdiffusion.config import ModelConfig
from latentdiffusion.diffusion.schedules import NoiseSchedule
from latentdiffusion.models.autoencoder import Autoencoder, build_autoencoder
from latentdiffusion.models.text_encoder import TextEncoder
from latentdiffusion.models.tokenizer import CLIPTokenizer
from latentdiffusion.models.unet import UNet


@dataclass
class Components:
    """A model's networks, tokenizer and noise schedule, plus the name written into image metadata."""

    config: ModelConfig
    unet: UNet
    autoencoder: Autoencoder
    text_encoder: TextEncoder
    tokenizer: CLIPTokenizer
    name: str
    preview_decoder: torch.nn.Module | None = None  # a trained progress-preview decoder, if the model has one

    @property
    def schedule(self) -> NoiseSchedule:
        return NoiseSchedule.from_config(self.config.schedule)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def eval(self) -> Components:
        for module in (self.unet, self.autoencoder, self.text_encoder):
            module.eval().requires_grad_(False)
        return self


def make_tokenizer(config: ModelConfig) -> CLIPTokenizer:
    text = config.text_encoder
    return CLIPTokenizer.from_bundled(pad_token_id=text.pad_token_id, max_length=text.max_length)


def build_components(config: ModelConfig, *, seed: int = 0, name: str | None = None) -> Components:
    """Networks with freshly initialised (random) weights: for tests, benchmarks and training."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet(config.unet)
        autoencoder = build_autoencoder(config.autoencoder)
        text_encoder = TextEncoder(config.text_encoder)
    return Components(
        config=config,
        unet=unet,
        autoencoder=autoencoder,
        text_encoder=text_encoder,
        tokenizer=make_tokenizer(config),
        name=name or config.name,
    ).eval()
