"""Decode (and encode) with a tiny autoencoder (TAESD) instead of the model's own: fast final images on
a CPU, where at one to four steps the full decoder costs more than the denoising network, and cheap
previews (``pipelines.preview``).

``use_tiny_autoencoder`` puts the TAESD in the model's autoencoder role, so every pipeline (text to
image, image to image, inpainting, hires fix, previews) uses it; the full autoencoder is dropped. Which
TAESD fits is the family's latent format: taesd (SD 1.x/2.x) and taesdxl (SDXL) make 4-channel latents,
taesd3 (SD3/3.5) and taef1 (FLUX) 16; a mismatch is refused.
"""

from __future__ import annotations

from pathlib import Path

from latentdiffusion.components import Components
from latentdiffusion.errors import UserError
from latentdiffusion.models.tiny_autoencoder import TinyAutoencoder

SUGGESTIONS = {4: "taesd (SD 1.x/2.x) or taesdxl (SDXL)", 16: "taesd3 (SD3) or taef1 (FLUX)"}


def check_fits(components: Components, tiny: TinyAutoencoder, source: str) -> None:
    """Refuse a TAESD whose latents are not the model's: channels and the image/latent factor."""
    latents = components.family.latent_format(components.config)
    config = tiny.config
    if config.latent_channels != latents.channels:
        hint = SUGGESTIONS.get(latents.channels, f"one made for {latents.channels}-channel latents")
        raise UserError(
            f"tiny autoencoder {source} decodes {config.latent_channels}-channel latents but model "
            f"{components.name!r} ({components.family.description}) makes {latents.channels}-channel ones: "
            f"use {hint}"
        )
    factors = {tiny.factor} | ({config.downsampling_factor} if tiny.encoder is not None else set())
    if factors != {latents.factor}:
        raise UserError(
            f"tiny autoencoder {source} scales images by {sorted(factors)} but model {components.name!r} "
            f"has latents {latents.factor}x smaller than its images"
        )


def use_tiny_autoencoder(components: Components, path: str | Path) -> Components:
    """``components`` with the TAESD at ``path`` (any layout of ``checkpoints.tiny_autoencoder_keys``)
    as its autoencoder, in the dtype and on the device of the model's own."""
    from latentdiffusion.checkpoints.tiny_autoencoder_keys import load_tiny_autoencoder

    tiny = load_tiny_autoencoder(path)
    check_fits(components, tiny, str(path))
    reference = next(components.autoencoder.parameters(), None)
    if reference is not None:
        tiny.to(device=reference.device, dtype=reference.dtype)
    return components.with_modules(autoencoder=tiny)


def has_tiny_autoencoder(components: Components) -> bool:
    return isinstance(components.modules.get("autoencoder"), TinyAutoencoder)
