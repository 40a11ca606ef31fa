"""Text-to-image: prompt -> text states -> guided sampling in latent space -> decoded image.

Rombach et al. 2022, Sec. 3.3 (conditioning via cross-attention) with classifier-free guidance
(Ho & Salimans 2022). The pieces are small functions so that the editing pipelines reuse them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from latentdiffusion.diffusion.denoiser import Denoiser
from latentdiffusion.diffusion.guidance import ClassifierFreeGuidance
from latentdiffusion.diffusion.noise import seeded_generators, seeded_noise
from latentdiffusion.diffusion.schedules import initial_noise_scale, sampling_sigmas, to_unit_scale
from latentdiffusion.errors import UserError
from latentdiffusion.pipelines.components import Components
from latentdiffusion.pipelines.prompts import encode_prompts
from latentdiffusion.samplers import SAMPLERS, sample

StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]  # (step, steps, x, x0)

MAX_SIDE = 4096
# Stochastic samplers draw from a generator of their own, so their noise is not the starting noise again.
SAMPLER_SEED_OFFSET = 0x5EED
DISCRETISATIONS = ("karras", "exponential")


@dataclass(frozen=True)
class SamplingOptions:
    """How to integrate: sampler, number of steps, discretisation and guidance."""

    steps: int = 20
    sampler: str = "dpmpp_2m"
    sigmas: str | None = None  # None: the schedule's own timestep spacing; or "karras", "exponential"
    guidance_scale: float = 7.5
    guidance_rescale: float = 0.0
    eta: float | None = None  # ddim only: 0 is deterministic, 1 is DDPM-like

    def validate(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise UserError(f"steps must be a whole number >= 1, got {self.steps!r}")
        if self.sampler not in SAMPLERS:
            raise UserError(f"unknown sampler {self.sampler!r}; known: {', '.join(SAMPLERS)}")
        if self.sigmas is not None and self.sigmas not in DISCRETISATIONS:
            known = ", ".join(DISCRETISATIONS)
            raise UserError(f"unknown sigmas {self.sigmas!r}; use one of {known} or leave it unset")
        for name in ("guidance_scale", "guidance_rescale"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value):
                raise UserError(f"{name} must be a finite number, got {value!r}")
        if self.eta is not None and not (math.isfinite(self.eta) and self.eta >= 0):
            raise UserError(f"eta must be a finite number >= 0, got {self.eta!r}")

    def sampler_options(self) -> dict[str, float]:
        return {"eta": self.eta} if self.eta is not None and self.sampler == "ddim" else {}


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


def size_multiple(components: Components) -> int:
    """Image sides are multiples of 8 (as Stable Diffusion tools require) and of the latent factor."""
    return max(8, components.config.autoencoder.downsampling_factor)


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
    f = components.config.autoencoder.downsampling_factor
    return (num, components.config.unet.out_channels, height // f, width // f)


def initial_noise(
    components: Components, seeds: Sequence[int], width: int, height: int, latents: torch.Tensor | None
) -> torch.Tensor:
    """Unit-variance starting noise: ``latents`` as given, or drawn per image from its own seed."""
    shape = latent_shape(components, len(seeds), width, height)
    if latents is None:
        return seeded_noise(shape, seeds, device=components.device, dtype=torch.float32)
    if tuple(latents.shape) != shape:
        raise UserError(f"latents must have shape {list(shape)}, got {list(latents.shape)}")
    return latents.to(device=components.device, dtype=torch.float32)


def sample_latents(
    components: Components,
    context: torch.Tensor,
    uncond_context: torch.Tensor,
    noise: torch.Tensor,
    options: SamplingOptions,
    *,
    seeds: Sequence[int],
    callback: StepCallback | None = None,
    extra_cond: dict[str, torch.Tensor] | None = None,
    sigmas: torch.Tensor | None = None,
) -> torch.Tensor:
    """Integrate from ``noise`` to a unit-scale latent with the chosen sampler and guidance."""
    schedule = components.schedule
    if sigmas is None:
        sigmas = sampling_sigmas(
            schedule, components.config.schedule, options.steps, options.sampler, options.sigmas
        )
    sigmas = sigmas.to(noise.device)
    denoiser = Denoiser(components.unet, schedule, components.config.schedule.prediction_type)
    cond = {"context": context, **(extra_cond or {})}
    uncond = {"context": uncond_context, **(extra_cond or {})}
    guided = ClassifierFreeGuidance(denoiser, cond, uncond, options.guidance_scale, options.guidance_rescale)
    generators = seeded_generators([int(seed) + SAMPLER_SEED_OFFSET for seed in seeds])
    x = noise * initial_noise_scale(sigmas, components.config.schedule, options.sampler)
    step = _step_callback(callback, len(sigmas) - 1)
    x = sample(
        options.sampler, guided, x, sigmas, generator=generators, callback=step, **options.sampler_options()
    )
    return to_unit_scale(x, sigmas[-1])


def _step_callback(callback: StepCallback | None, steps: int) -> Callable[..., None] | None:
    if callback is None:
        return None

    def on_step(i: int, sigma: torch.Tensor, x: torch.Tensor, x0: torch.Tensor) -> None:
        callback(i + 1, steps, x, x0)

    return on_step


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
    prompts: Sequence[str],
    negative_prompts: Sequence[str],
    *,
    width: int,
    height: int,
    seeds: Sequence[int],
    options: SamplingOptions,
    latents: torch.Tensor | None = None,
    callback: StepCallback | None = None,
) -> list[Image.Image]:
    """One image per (prompt, negative prompt, seed) triple."""
    options.validate()
    validate_size(components, width, height, len(seeds))
    context = encode_prompts(components, prompts)
    uncond_context = encode_prompts(components, negative_prompts)
    noise = initial_noise(components, seeds, width, height, latents)
    x = sample_latents(components, context, uncond_context, noise, options, seeds=seeds, callback=callback)
    return decode_images(components, x)
