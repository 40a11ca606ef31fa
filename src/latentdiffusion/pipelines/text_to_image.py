"""Text-to-image: prompt -> text states -> guided sampling in latent space -> decoded image.

Rombach et al. 2022, Sec. 3.3 (conditioning via cross-attention) with classifier-free guidance
(Ho & Salimans 2022). The pieces are small functions so that the editing pipelines reuse them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from latentdiffusion.components import Components
from latentdiffusion.errors import UserError
from latentdiffusion.families import ConditioningRequest, LatentFormat, MicroConditioning
from latentdiffusion.pipelines.request import Request
from latentdiffusion.pipelines.sampling import (
    full_sigmas,
    guide,
    integrate,
    network_denoiser,
    start_scale,
)

MAX_SIDE = 4096


def validate_size(components: Components, width: int, height: int, num_images: int) -> None:
    """Refuse sizes the autoencoder cannot tile exactly, and sizes that cannot fit in memory."""
    f = size_multiple(components)
    for name, side in (("width", width), ("height", height)):
        if not isinstance(side, int) or side < f or side % f:
            raise UserError(f"{name} must be a positive multiple of {f}, got {side!r}")
        if side > MAX_SIDE:
            raise UserError(f"{name} {side} is larger than the maximum {MAX_SIDE}")
    if not isinstance(num_images, int) or num_images < 1:
        raise UserError(f"num_images must be a whole number >= 1, got {num_images!r}")
    need, have = estimated_bytes(components, width, height, num_images), available_memory()
    if have is not None and need > have:
        raise UserError(
            f"{num_images} image(s) of {width}x{height} need about {need / 2**30:.1f} GiB of memory, "
            f"only {have / 2**30:.1f} GiB is available: use a smaller size or fewer images"
        )


def latent_format(components: Components) -> LatentFormat:
    return components.family.latent_format(components.config)


def size_multiple(components: Components) -> int:
    """Image sides are multiples of 8 (as Stable Diffusion tools require) and of the latent factor."""
    return latent_format(components).size_multiple


def encode_conditioning(
    components: Components,
    prompts: Sequence[str],
    negative_prompts: Sequence[str],
    width: int,
    height: int,
    micro: MicroConditioning | None = None,
) -> tuple[dict, dict]:
    """(cond, uncond) for guidance, as the model's family makes them from prompts and the image size."""
    request = ConditioningRequest(height, width, micro or MicroConditioning())
    return components.family.encode(components, prompts, negative_prompts, request)


def estimated_bytes(components: Components, width: int, height: int, num_images: int) -> int:
    """A rough upper bound of working memory: U-Net activations for the guided batch plus the decoder."""
    f = components.config.autoencoder.downsampling_factor
    latent_pixels = (width // f) * (height // f)
    element = torch.finfo(components.dtype).bits // 8
    unet = 2 * num_images * latent_pixels * components.config.unet.model_channels * 40 * element
    decoder = num_images * width * height * components.config.autoencoder.block_channels[0] * 6 * element
    return unet + decoder


def available_memory() -> int | None:
    """Bytes of memory the OS can hand out now (MemAvailable), where it reports it."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def latent_shape(components: Components, num: int, width: int, height: int) -> tuple[int, ...]:
    latents = latent_format(components)
    return (num, latents.channels, height // latents.factor, width // latents.factor)


def decode_images(components: Components, latents: torch.Tensor) -> list[Image.Image]:
    """Decode unit-scale latents to 8-bit RGB images."""
    vae = components.autoencoder
    dtype = next(vae.parameters()).dtype
    images = vae.from_latent(latents.to(dtype))
    return tensor_to_images(images)


def tensor_to_images(images: torch.Tensor) -> list[Image.Image]:
    """[N, 3, H, W] in [-1, 1] -> PIL images (rounded, not truncated)."""
    array = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    array = array.permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in array]


@torch.inference_mode()
def text_to_image(
    components: Components,
    request: Request,
    *,
    width: int,
    height: int,
) -> list[Image.Image]:
    """One image per (prompt, negative prompt, seed) of ``request``."""
    options = request.options
    options.validate()
    validate_size(components, width, height, len(request.seeds))
    require_text_to_image_model(components)
    cond, uncond = request.conditioning(components, width, height)
    noise = request.noise(latent_shape(components, len(request.seeds), width, height), components.device)
    sigmas = full_sigmas(components, options)
    x = noise * start_scale(components, options, sigmas)
    denoiser = guide(network_denoiser(components, options), cond, uncond, options)
    latents = integrate(denoiser, x, sigmas, options, request.seeds, request.callback)
    return decode_images(components, latents)


def require_text_to_image_model(components: Components) -> None:
    """A U-Net that takes extra input channels (inpainting, upscaling) cannot start from noise alone."""
    config = components.config
    if config.unet.in_channels != config.autoencoder.latent_channels or config.unet.num_class_embeds:
        raise UserError(
            f"model {components.name!r} is an inpainting or upscaling model: use inpaint/outpaint/upscale"
        )
