"""x4 super-resolution with a latent upscaler such as Stability AI's SD x4 upscaler.

The low-resolution image conditions the U-Net twice (Rombach et al. 2022, Sec. 4.4 and App. D.6;
noise conditioning augmentation of Ho et al. 2022, "Cascaded Diffusion Models", Sec. 4.1): it is
noised to ``noise_level`` with its own schedule, q(y_t | y) = N(sqrt(a_t) y, (1 - a_t) I) (Ho et al.
2020, Eq. 4), concatenated to the latent on channels, and ``noise_level`` itself enters as the U-Net's
class label. The latent has the low-resolution image's size; the autoencoder (factor 4, scale 0.08333)
decodes it to four times that. As in diffusers' StableDiffusionUpscalePipeline.

Large inputs run in overlapping tiles: every denoiser call evaluates the tiles and averages their x0
estimates with feathered weights (MultiDiffusion, Bar-Tal et al. 2023, Eq. 5, with the tapered weights
of Jimenez 2023, "Mixture of Diffusers"; ``vae_tiling.blend_tiles``), so the sampler still integrates
one seamless latent; the decoder runs on the same tiles and blends the same way
(``vae_tiling.TiledAutoencoder``).
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from latentdiffusion.components import Components
from latentdiffusion.config import ModelConfig, ScheduleConfig
from latentdiffusion.diffusion.noise import seeded_noise
from latentdiffusion.diffusion.schedules import NoiseSchedule
from latentdiffusion.errors import UserError
from latentdiffusion.pipelines.images import images_to_tensor, round_down
from latentdiffusion.pipelines.request import Request
from latentdiffusion.pipelines.sampling import (
    ConditionalDenoiser,
    full_sigmas,
    guide,
    integrate,
    network_denoiser,
    start_scale,
)
from latentdiffusion.pipelines.text_to_image import MAX_SIDE, decode_images, latent_shape, validate_size
from latentdiffusion.pipelines.vae_tiling import blend_tiles, with_tiled_autoencoder

# The x4 upscaler's noise augmentation (its CompVis config: ImageConcatWithNoiseAugmentation with
# linear_start 1e-4, linear_end 2e-2, whose "linear" is diffusers' "scaled_linear"; max_noise_level 350).
LOW_RES_SCHEDULE = ScheduleConfig(beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02)
MAX_NOISE_LEVEL = 350
AUGMENT_SEED_OFFSET = 0xA06  # the augmentation noise has a stream of its own, apart from the latent's
TILE_MULTIPLE = 8


def is_upscaler(config: ModelConfig) -> bool:
    """A U-Net that takes the latent plus an RGB image and a noise-level class label."""
    unet = config.unet
    return unet.num_class_embeds is not None and unet.in_channels == config.autoencoder.latent_channels + 3


def noise_augment(images: torch.Tensor, noise_level: int, noise: torch.Tensor) -> torch.Tensor:
    """sqrt(a) * y + sqrt(1 - a) * noise with a = alphas_cumprod[noise_level] of LOW_RES_SCHEDULE."""
    a = float(NoiseSchedule.from_config(LOW_RES_SCHEDULE).alphas_cumprod[noise_level])
    return a**0.5 * images + (1 - a) ** 0.5 * noise


def validate_upscale(components: Components, noise_level: int, tile_size: int | None, overlap: int) -> None:
    if not is_upscaler(components.config):
        raise UserError(
            f"model {components.name!r} is not an upscaler (it needs a U-Net with a noise-level class "
            "embedding and 3 extra input channels); load one, e.g. stabilityai's x4 upscaler"
        )
    top = min(MAX_NOISE_LEVEL, components.config.unet.num_class_embeds - 1)
    if isinstance(noise_level, bool) or not isinstance(noise_level, int) or not 0 <= noise_level <= top:
        raise UserError(f"noise_level must be a whole number in [0, {top}], got {noise_level!r}")
    if tile_size is not None and (
        not isinstance(tile_size, int) or tile_size < 32 or tile_size % TILE_MULTIPLE
    ):
        raise UserError(f"tile size must be a multiple of {TILE_MULTIPLE} >= 32, got {tile_size!r}")
    tile = tile_size or MAX_SIDE
    if not isinstance(overlap, int) or overlap < 0 or overlap % TILE_MULTIPLE or overlap >= tile:
        raise UserError(
            f"tile overlap must be a multiple of {TILE_MULTIPLE} in [0, tile size), got {overlap!r}"
        )


class TiledDenoiser:
    """D(x, sigma, **cond) evaluated tile by tile and blended (MultiDiffusion); ``cond["concat"]`` is
    cropped with x, the other entries (context, class labels) pass through."""

    def __init__(self, denoiser: ConditionalDenoiser, tile: int, overlap: int) -> None:
        self.denoiser = denoiser
        self.tile = tile
        self.overlap = overlap

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond: Any) -> torch.Tensor:
        def run(top: int, left: int, h: int, w: int) -> torch.Tensor:
            crop = (..., slice(top, top + h), slice(left, left + w))
            tile_cond = {k: v[crop] if k == "concat" else v for k, v in cond.items()}
            return self.denoiser(x[crop], sigma, **tile_cond)

        return blend_tiles(run, tuple(x.shape[-2:]), self.tile, self.overlap, 1).to(x.dtype)


@torch.inference_mode()
def upscale(
    components: Components,
    image: Image.Image,
    request: Request,
    *,
    noise_level: int,
    tile_size: int | None = 128,
    tile_overlap: int = 32,
) -> list[Image.Image]:
    """One upscaled image per (prompt, negative prompt, seed) of ``request``. ``tile_size`` (in input
    pixels) bounds the work per U-Net call; None runs the whole image at once."""
    options, seeds = request.options, request.seeds
    options.validate()
    if request.control:
        raise UserError(
            "ControlNet (control) does not work with upscale yet: use generate, img2img or inpaint"
        )
    validate_upscale(components, noise_level, tile_size, tile_overlap)
    f = components.config.autoencoder.downsampling_factor
    image = round_down(image, TILE_MULTIPLE)
    width, height = image.size
    if max(width, height) * f > MAX_SIDE:
        raise UserError(f"{width}x{height} upscaled x{f} exceeds the maximum side {MAX_SIDE}; crop the image")
    tile = tile_size if tile_size is not None and max(width, height) > tile_size else None
    validate_size(components, min(tile or width, width) * f, min(tile or height, height) * f, len(seeds))
    cond_text, uncond_text = request.conditioning(components, width * f, height * f)
    low = images_to_tensor([image] * len(seeds), components.device, torch.float32)
    augment = seeded_noise(low.shape, [s + AUGMENT_SEED_OFFSET for s in seeds], low.device)
    low = noise_augment(low, noise_level, augment)
    labels = torch.full((len(seeds),), noise_level, dtype=torch.long, device=components.device)
    sigmas = full_sigmas(components, options)
    noise = request.noise(latent_shape(components, len(seeds), width * f, height * f), components.device)
    x = noise * start_scale(components, options, sigmas)
    denoiser = network_denoiser(components, options)
    if tile is not None:
        denoiser = TiledDenoiser(denoiser, tile, tile_overlap)
    cond = {"concat": low.to(components.dtype), "class_labels": labels}
    guided = guide(denoiser, cond_text, uncond_text, options, cond)
    latents = integrate(guided, x, sigmas, options, seeds, request.callback)
    decoder = with_tiled_autoencoder(components, tile, tile_overlap) if tile is not None else components
    return decode_images(decoder, latents)
