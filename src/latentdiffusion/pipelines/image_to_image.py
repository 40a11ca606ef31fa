"""Image-to-image: SDEdit (Meng et al. 2022, "SDEdit: Guided Image Synthesis and Editing with Stochastic
Differential Equations", Sec. 3 and Alg. 1) in the latent space of Rombach et al. 2022.

The input image is encoded, noised to the level that ``strength`` selects, and integrated back to
sigma = 0 with the usual samplers and guidance. ``strength`` picks the tail of the sampler's noise
levels exactly as diffusers' img2img pipelines do: of ``steps`` steps the last ``int(steps * strength)``
run (a flow model: all but ``int(steps - steps * strength)``), so the result matches diffusers'
StableDiffusionImg2ImgPipeline (and StableDiffusion3Img2ImgPipeline) given the same seeds.

The pieces (denoiser, guidance, integration, encoding) are shared with inpainting and upscaling.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from PIL import Image

from latentdiffusion.components import Components
from latentdiffusion.diffusion.noise import seeded_generators
from latentdiffusion.errors import UserError
from latentdiffusion.pipelines.control import controlled
from latentdiffusion.pipelines.images import images_to_tensor
from latentdiffusion.pipelines.request import Request
from latentdiffusion.pipelines.sampling import (
    full_sigmas,
    guide,
    integrate,
    network_denoiser,
)
from latentdiffusion.pipelines.text_to_image import (
    Refiner,
    decode_images,
    integrate_with_refiner,
    validate_size,
)


def validate_strength(strength: float) -> None:
    if isinstance(strength, bool) or not isinstance(strength, int | float) or not math.isfinite(strength):
        raise UserError(f"strength must be a number in [0, 1], got {strength!r}")
    if not 0 <= strength <= 1:
        raise UserError(f"strength must be in [0, 1] (0 keeps the image, 1 replaces it), got {strength}")


def require_input_channels(components: Components, extra: int, what: str) -> None:
    """Refuse a U-Net whose input is not the latent plus ``extra`` conditioning channels."""
    latent = components.config.autoencoder.latent_channels
    have = components.family.network_config(components.config).in_channels
    if have != latent + extra:
        raise UserError(
            f"{what} needs a U-Net with {latent + extra} input channels; model {components.name!r} has {have}"
        )


def strength_sigmas(sigmas: torch.Tensor, strength: float, process: str = "discrete") -> torch.Tensor:
    """The last ``strength_steps`` steps of ``sigmas`` [steps + 1] (diffusers' ``get_timesteps``).

    Returns ``sigmas[-1:]`` (no step at all) when that number is 0.
    """
    steps = len(sigmas) - 1
    return sigmas[steps - strength_steps(steps, strength, process) :]


def strength_steps(steps: int, strength: float, process: str = "discrete") -> int:
    """How many of ``steps`` an img2img start at ``strength`` runs, as diffusers' pipelines count them:
    ``int(steps * strength)`` for a discrete-schedule model (SD 1.x/2.x, SDXL); for a flow model (SD3)
    the skipped steps ``int(steps - steps * strength)`` are rounded down instead, so 4 of 5 steps run at
    strength 0.7 (SD: 3)."""
    if process == "flow":
        return steps - int(max(steps - steps * strength, 0))
    return min(int(steps * strength), steps)


def encode_latents(
    components: Components, images: torch.Tensor, generators: Sequence[torch.Generator]
) -> torch.Tensor:
    """Unit-scale latents [N, C, h, w] (float32) of images [N, 3, H, W] in [-1, 1]: one posterior sample
    per image from its own generator, as diffusers draws them when given a list of generators."""
    vae = components.autoencoder
    dtype = next(vae.parameters()).dtype
    latents = [
        vae.to_latent(images[i : i + 1].to(dtype), generator=generator, sample=True)
        for i, generator in enumerate(generators)
    ]
    return torch.cat(latents).float()


@torch.inference_mode()
def image_to_image(
    components: Components,
    image: Image.Image,
    request: Request,
    *,
    strength: float,
    refiner: Refiner | None = None,
) -> list[Image.Image]:
    """SDEdit: one image per (prompt, negative prompt, seed) of ``request``, each starting from ``image``
    (RGB, sides multiples of 8). Image i's generator (seed i) draws its posterior sample, then its noise
    (unless ``request.latents`` gives the noise). With a ``refiner`` (of the same latents), the steps of
    the run below the refiner's switch are the refiner's, as in ``text_to_image``: all of them when
    ``strength`` starts the run below the switch."""
    options = request.options
    options.validate()
    validate_strength(strength)
    if refiner is not None:
        refiner.validate(components, request)
    require_input_channels(components, 0, "img2img")
    validate_size(components, image.width, image.height, len(request.seeds))
    cond, uncond = request.conditioning(components, image.width, image.height)
    images = images_to_tensor([image] * len(request.seeds), components.device, torch.float32)
    generators = seeded_generators(request.seeds)
    x0 = encode_latents(components, images, generators)

    def window(sigmas: torch.Tensor) -> torch.Tensor:
        return strength_sigmas(sigmas, strength, components.process.name)

    sigmas = window(full_sigmas(components, options))
    if len(sigmas) < 2:  # no step to run: the autoencoder's round trip
        return decode_images(components, x0)
    x = x0 + float(sigmas[0]) * request.noise(x0.shape, x0.device, generators)
    model = controlled(components, request, sigmas, image.width, image.height)
    denoiser = guide(network_denoiser(model, options), cond, uncond, options)
    if refiner is None:
        latents = integrate(denoiser, x, sigmas, options, request.seeds, request.callback)
        return decode_images(components, latents)
    width, height = image.size
    latents = integrate_with_refiner(components, refiner, denoiser, x, sigmas, request, width, height, window)
    return decode_images(refiner.components, latents)
