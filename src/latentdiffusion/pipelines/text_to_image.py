"""Text-to-image: prompt -> text states -> guided sampling in latent space -> decoded image.

Rombach et al. 2022, Sec. 3.3 (conditioning via cross-attention) with classifier-free guidance
(Ho & Salimans 2022). The pieces are small functions so that the editing pipelines reuse them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from latentdiffusion.components import Components
from latentdiffusion.errors import UserError
from latentdiffusion.families import ConditioningRequest, LatentFormat, MicroConditioning
from latentdiffusion.pipelines.control import controlled
from latentdiffusion.pipelines.request import Request
from latentdiffusion.pipelines.sampling import (
    GuidedDenoiser,
    full_sigmas,
    guide,
    integrate,
    network_denoiser,
    start_scale,
    switch_step,
)

if TYPE_CHECKING:
    from latentdiffusion.pipelines.pipeline import Pipeline

MAX_SIDE = 4096
REFINER_SEED_OFFSET = 0x2EF1  # the refiner's stochastic samplers draw noise apart from the base's


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
    """A rough upper bound of working memory: the denoising network's activations for the guided batch
    (a U-Net's first-level width per latent pixel, or a transformer's width per patch) plus the decoder."""
    f = components.config.autoencoder.downsampling_factor
    latent_pixels = (width // f) * (height // f)
    element = torch.finfo(components.dtype).bits // 8
    network = components.family.network_config(components.config)
    width_per_pixel = getattr(network, "model_channels", None) or network.hidden_size // network.patch_size**2
    unet = 2 * num_images * latent_pixels * width_per_pixel * 40 * element
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


@dataclass(frozen=True)
class Refiner:
    """A second model that finishes the base model's latent (Podell et al. 2023, Sec. 2.5: the SDXL
    refiner, trained on the low noise levels): the base runs the steps before ``switch`` (0..1) of the
    schedule and the refiner the rest, as diffusers' ``denoising_end`` / ``denoising_start``."""

    components: Components
    switch: float = 0.8

    def validate(self, base: Components, request: Request) -> None:
        """A clear error unless this refiner can finish ``base``'s latents for ``request``."""
        if (
            isinstance(self.switch, bool)
            or not isinstance(self.switch, int | float)
            or not 0 < self.switch < 1
        ):
            raise UserError(
                f"refiner_switch must be a number in (0, 1), the part of the schedule the base model runs "
                f"(1: the base alone); got {self.switch!r}"
            )
        refiner = self.components
        if (
            refiner.family.network_config(refiner.config).in_channels
            != refiner.config.autoencoder.latent_channels
        ):
            raise UserError(f"model {refiner.name!r} takes extra input channels and cannot refine latents")
        if latent_format(refiner) != latent_format(base):
            raise UserError(
                f"the refiner {refiner.name!r} works in other latents than {base.name!r} "
                f"({latent_format(refiner)} vs {latent_format(base)}): refine the image with img2img instead"
            )
        if request.control:
            raise UserError("ControlNet (control) does not work with a refiner yet: leave one of them out")


def chosen_refiner(
    pipe: Pipeline, refiner: Pipeline | None, switch: float | None, control: bool
) -> tuple[Pipeline | None, float]:
    """The refiner that finishes ``pipe``'s text-to-image request and its switch: ``refiner`` (at
    ``switch``, default 0.8), else the pipeline's bundled refiner (at its own switch unless ``switch``
    says otherwise; not under ControlNet, whose control the refiner would not see); none at switch 1."""
    from latentdiffusion.pipelines.pipeline import DEFAULT_REFINER_SWITCH

    if refiner is None and not control:
        refiner, switch = pipe.refiner, pipe.refiner_switch if switch is None else switch
    switch = DEFAULT_REFINER_SWITCH if switch is None else switch
    return (None, switch) if switch == 1 else (refiner, switch)


def refiner_pass(
    pipe: Pipeline, refiner: Pipeline | None, switch: float | None, control: bool
) -> tuple[Refiner | None, dict[str, Any]]:
    """The refiner pass of the ``chosen_refiner`` and its PNG-info settings (None and none without one)."""
    from latentdiffusion.pipelines.vae_tiling import with_tiled_autoencoder

    refiner, switch = chosen_refiner(pipe, refiner, switch, control)
    if refiner is None:
        return None, {}
    settings = {"Refiner": refiner.components.name, "Refiner switch at": switch}
    return Refiner(with_tiled_autoencoder(refiner.served()), switch), settings


@torch.inference_mode()
def text_to_image(
    components: Components,
    request: Request,
    *,
    width: int,
    height: int,
    refiner: Refiner | None = None,
) -> list[Image.Image]:
    """One image per (prompt, negative prompt, seed) of ``request``; with a ``refiner``, the base model
    stops at the switch and the refiner finishes the same latent (no decoding in between)."""
    latents = text_to_image_latents(components, request, width=width, height=height, refiner=refiner)
    return decode_images(components if refiner is None else refiner.components, latents)


def integrate_with_refiner(
    components: Components,
    refiner: Refiner,
    denoiser: GuidedDenoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    request: Request,
    width: int,
    height: int,
    window: Callable[[torch.Tensor], torch.Tensor] = lambda sigmas: sigmas,
) -> torch.Tensor:
    """Integrate ``x`` over ``sigmas`` with the base model's ``denoiser`` up to the refiner's switch and
    with the refiner after it; returns the unit-scale latents. ``sigmas`` is ``window`` of the base's whole
    schedule (the whole of it for text-to-image, its last part for img2img), and the refiner runs the same
    window of its own schedule from the switch on (none of the base's steps when the window starts below
    the switch)."""
    options = request.options
    base_steps = switch_step(components, options, sigmas, refiner.switch)
    refiner_sigmas = window(full_sigmas(refiner.components, options))
    refiner_sigmas = refiner_sigmas[
        switch_step(refiner.components, options, refiner_sigmas, refiner.switch) :
    ]
    total = base_steps + len(refiner_sigmas) - 1
    if base_steps == 0 and torch.equal(sigmas[0].cpu(), refiner_sigmas[0].cpu()):
        handed = x  # the run starts below the switch: the refiner's alone, from the same latent
    else:
        latents = integrate(
            denoiser, x, sigmas[: base_steps + 1], options, request.seeds, request.callback, total_steps=total
        )
        handed = refiner.components.process.from_unit_scale(latents, refiner_sigmas[0])
    return refine(refiner.components, request, handed, refiner_sigmas, width, height, base_steps, total)


@torch.inference_mode()
def text_to_image_latents(
    components: Components, request: Request, *, width: int, height: int, refiner: Refiner | None = None
) -> torch.Tensor:
    """The unit-scale latents [B, C, h, w] that ``text_to_image`` decodes."""
    request.options.validate()
    if refiner is not None:
        refiner.validate(components, request)
    components, denoiser, x, sigmas = _start(components, request, width, height)
    if refiner is None:
        return integrate(denoiser, x, sigmas, request.options, request.seeds, request.callback)
    return integrate_with_refiner(components, refiner, denoiser, x, sigmas, request, width, height)


def _start(components: Components, request: Request, width: int, height: int):
    """(components with the request's ControlNets, guided denoiser, starting latents, sigmas)."""
    options = request.options
    validate_size(components, width, height, len(request.seeds))
    require_text_to_image_model(components)
    cond, uncond = request.conditioning(components, width, height)
    noise = request.noise(latent_shape(components, len(request.seeds), width, height), components.device)
    sigmas = full_sigmas(components, options)
    components = controlled(components, request, sigmas, width, height)
    x = noise * start_scale(components, options, sigmas)
    return components, guide(network_denoiser(components, options), cond, uncond, options), x, sigmas


def refine(
    components: Components,
    request: Request,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    width: int,
    height: int,
    steps_before: int,
    total_steps: int,
) -> torch.Tensor:
    """Continue the latent ``x`` (at ``sigmas[0]`` in the refiner's scale) with the refiner over its
    ``sigmas`` (its part of the schedule); returns the unit-scale latents.

    The base hands its latent over in the unit (VP) scale, scaled to the refiner's first noise level; with
    the same schedule and options on both sides that level is the one the base stopped at. Stochastic
    samplers draw fresh noise from streams of their own (seed + ``REFINER_SEED_OFFSET``)."""
    options = request.options
    cond, uncond = request.conditioning(components, width, height)
    x = x.to(components.device)
    denoiser = guide(network_denoiser(components, options), cond, uncond, options)
    seeds = [seed + REFINER_SEED_OFFSET for seed in request.seeds]
    return integrate(
        denoiser,
        x,
        sigmas,
        options,
        seeds,
        request.callback,
        steps_before=steps_before,
        total_steps=total_steps,
    )


def require_text_to_image_model(components: Components) -> None:
    """A U-Net that takes extra input channels (inpainting, upscaling), or one its family trained on part
    of the schedule only (the SDXL refiner), cannot start from noise alone."""
    refusal = components.family.text_to_image_refusal
    if refusal is not None:
        raise UserError(f"model {components.name!r}: {refusal}")
    config = components.config
    network = components.family.network_config(config)
    if network.in_channels != config.autoencoder.latent_channels or getattr(
        network, "num_class_embeds", None
    ):
        raise UserError(
            f"model {components.name!r} is an inpainting or upscaling model: use inpaint/outpaint/upscale"
        )
