"""Hires fix: generate at the model's size, enlarge, and refine at the target size with img2img.

A model asked for an image much larger than it was trained on repeats its subjects; the web UI's "hires
fix" (AUTOMATIC1111's ``StableDiffusionProcessingTxt2Img.sample_hr_pass``) instead samples at the
first-pass size, enlarges the result, and runs SDEdit (Meng et al. 2022, Alg. 1) at the target size so
that the model adds detail without changing the composition. The result is enlarged either as a latent
(``LATENT_MODES``: torch interpolation, no decoding in between) or as an image (``upscale_images``, e.g.
Lanczos or an upscaler model), in which case it is encoded again. As in the web UI:

- the target is ``hr_scale`` times the first-pass size, or ``hr_resize_x`` x ``hr_resize_y`` (one of
  them 0: kept in proportion; both given: enlarged to cover, then cropped to the centre in latent cells);
- the second pass runs exactly ``hr_second_pass_steps`` steps (0: the first pass's count): the last
  ones of a schedule of ``int(steps / min(denoising_strength, 0.999))`` steps;
- each image's second-pass noise comes from its own seed again, at the target size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from latentdiffusion.components import Components
from latentdiffusion.diffusion.noise import seeded_generators, variation_noise
from latentdiffusion.errors import UserError
from latentdiffusion.pipelines.image_to_image import encode_latents, validate_strength
from latentdiffusion.pipelines.images import images_to_tensor
from latentdiffusion.pipelines.request import Request, common_options, make_request
from latentdiffusion.pipelines.sampling import full_sigmas, guide, integrate, network_denoiser, start_scale
from latentdiffusion.pipelines.text_to_image import (
    decode_images,
    latent_format,
    latent_shape,
    require_text_to_image_model,
    validate_size,
)
from latentdiffusion.pipelines.vae_tiling import with_tiled_autoencoder

# The web UI's latent upscale modes: name -> (torch interpolation mode, antialias).
LATENT_MODES = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
# Plain image resamplers, always available (an upscaler model is passed in as ``upscale_images``).
RESAMPLERS = {"Lanczos": Image.Resampling.LANCZOS, "Nearest": Image.Resampling.NEAREST}
MAX_STRENGTH = 0.999  # the web UI's cap: at strength 1 the schedule would need infinitely many steps

ImageUpscaler = Callable[[list[Image.Image], int, int], list[Image.Image]]


@dataclass(frozen=True)
class Hires:
    """The second pass: target size (``scale``, or ``resize_x`` / ``resize_y``), how to enlarge
    (``upscaler``: a ``LATENT_MODES`` or ``RESAMPLERS`` name, or any name ``upscale_images`` knows),
    ``steps`` (0: as the first pass), ``strength`` and, unset, the first pass's sampler and prompts."""

    scale: float = 2.0
    resize_x: int = 0
    resize_y: int = 0
    upscaler: str = "Latent"
    steps: int = 0
    strength: float = 0.7
    sampler: str | None = None
    sigmas: str | None = None
    prompt: str | None = None
    negative_prompt: str | None = None


@dataclass(frozen=True)
class Target:
    """The enlarged size before cropping and the latent cells cropped off (the web UI's truncate_x/y)."""

    width: int
    height: int
    crop_x: int = 0
    crop_y: int = 0

    def final_size(self, factor: int) -> tuple[int, int]:
        return (self.width // factor - self.crop_x) * factor, (self.height // factor - self.crop_y) * factor


def target_size(width: int, height: int, hires: Hires, factor: int) -> Target:
    """The web UI's ``hr_upscale_to_x/y`` and ``truncate_x/y`` for a first pass of ``width`` x ``height``."""
    x, y = hires.resize_x, hires.resize_y
    if x == 0 and y == 0:
        return Target(int(width * hires.scale), int(height * hires.scale))
    if y == 0:
        return Target(x, x * height // width)
    if x == 0:
        return Target(y * width // height, y)
    wider = width / height < x / y  # the target is wider: match widths, crop the height
    up = Target(x, x * height // width) if wider else Target(y * width // height, y)
    return replace(up, crop_x=(up.width - x) // factor, crop_y=(up.height - y) // factor)


def validate_hires(hires: Hires, upscalers: Sequence[str]) -> None:
    validate_strength(hires.strength)
    if not isinstance(hires.scale, int | float) or not 0 < hires.scale <= 8:
        raise UserError(f"hr_scale must be a number in (0, 8], got {hires.scale!r}")
    for name, side in (("hr_resize_x", hires.resize_x), ("hr_resize_y", hires.resize_y)):
        if isinstance(side, bool) or not isinstance(side, int) or side < 0:
            raise UserError(f"{name} must be a whole number >= 0 (0: from hr_scale), got {side!r}")
    if isinstance(hires.steps, bool) or not isinstance(hires.steps, int) or hires.steps < 0:
        raise UserError(f"hr_second_pass_steps must be a whole number >= 0, got {hires.steps!r}")
    known = [*LATENT_MODES, *RESAMPLERS, *upscalers]
    if hires.upscaler not in known:
        raise UserError(f"unknown hires upscaler {hires.upscaler!r}; known: {', '.join(known)}")
    if hires.upscaler in LATENT_MODES and hires.strength == 0:
        raise UserError("a latent upscale needs denoising_strength > 0 (the enlarged latent is blurred)")


def resample(
    images: list[Image.Image], width: int, height: int, method: Image.Resampling
) -> list[Image.Image]:
    return [image.resize((width, height), method) for image in images]


def second_pass_sigmas(components: Components, request: Request, steps: int, strength: float) -> torch.Tensor:
    """The last ``steps`` steps of a schedule of ``int(steps / min(strength, 0.999))`` (the web UI's
    ``setup_img2img_steps`` with its steps given): exactly ``steps`` run, from the level ``strength``
    selects. Strength 0: no step."""
    if strength == 0:
        return full_sigmas(components, request.options)[-1:]
    total = int(steps / min(strength, MAX_STRENGTH))
    sigmas = full_sigmas(components, replace(request.options, steps=total))
    return sigmas[total - steps :]


def first_pass(components: Components, request: Request, width: int, height: int, total: int) -> torch.Tensor:
    """Text-to-image up to the latent (unit scale), as ``text_to_image`` samples it."""
    cond, uncond = request.conditioning(components, width, height)
    noise = request.noise(latent_shape(components, len(request.seeds), width, height), components.device)
    sigmas = full_sigmas(components, request.options)
    x = noise * start_scale(components, request.options, sigmas)
    denoiser = guide(network_denoiser(components, request.options), cond, uncond, request.options)
    return integrate(denoiser, x, sigmas, request.options, request.seeds, request.callback, total_steps=total)


def second_pass(
    components: Components,
    request: Request,
    x0: torch.Tensor,
    sigmas: torch.Tensor,
    generators: Sequence[torch.Generator] | None,
    steps_before: int,
) -> list[Image.Image]:
    """SDEdit from unit-scale latents ``x0`` over ``sigmas`` (the image-to-image tail), decoded."""
    if len(sigmas) < 2:
        return decode_images(components, x0)
    height, width = (side * latent_format(components).factor for side in x0.shape[-2:])
    cond, uncond = request.conditioning(components, width, height)
    x = x0 + float(sigmas[0]) * request.noise(x0.shape, x0.device, generators)
    denoiser = guide(network_denoiser(components, request.options), cond, uncond, request.options)
    total = steps_before + len(sigmas) - 1
    latents = integrate(
        denoiser,
        x,
        sigmas,
        request.options,
        request.seeds,
        request.callback,
        steps_before=steps_before,
        total_steps=total,
    )
    return decode_images(components, latents)


def enlarge(
    components: Components,
    latents: torch.Tensor,
    target: Target,
    hires: Hires,
    seeds: Sequence[int],
    upscale_images: ImageUpscaler | None,
) -> tuple[torch.Tensor, list[torch.Generator] | None]:
    """First-pass latents -> unit-scale latents at the target size (cropped); for an image upscaler also
    the generators that drew the posterior samples, which then draw the second pass's noise."""
    f = latent_format(components).factor
    size = (target.height // f, target.width // f)
    if hires.upscaler in LATENT_MODES:
        mode, antialias = LATENT_MODES[hires.upscaler]
        up, generators = F.interpolate(latents.float(), size=size, mode=mode, antialias=antialias), None
    else:
        images = decode_images(components, latents)
        if hires.upscaler in RESAMPLERS:
            images = resample(images, target.width, target.height, RESAMPLERS[hires.upscaler])
        else:
            assert upscale_images is not None  # validate_hires named it
            images = upscale_images(images, target.width, target.height)
        images = [
            i if i.size == (target.width, target.height) else i.resize((target.width, target.height))
            for i in images
        ]
        generators = seeded_generators(seeds)
        pixels = images_to_tensor(images, components.device, torch.float32)
        up = encode_latents(components, pixels, generators)
    top, left = target.crop_y // 2, target.crop_x // 2
    return up[
        ..., top : size[0] - (target.crop_y + 1) // 2, left : size[1] - (target.crop_x + 1) // 2
    ], generators


@torch.inference_mode()
def hires_fix(
    components: Components,
    prompt: str | Sequence[str],
    negative_prompt: str | Sequence[str] | None,
    width: int,
    height: int,
    hires: Hires,
    *,
    upscale_images: ImageUpscaler | None = None,
    upscaler_names: Sequence[str] = (),
    variation: tuple[Sequence[int], float] | None = None,
    **options: Any,
) -> tuple[list[Image.Image], Request, Target]:
    """Images of ``prompt`` at ``width`` x ``height`` enlarged and refined by ``hires``; also the first
    pass's request (prompts, seeds, options) and the target, for the PNG info. ``options`` are
    ``request.CommonOptions`` (no ``latents``: the noise comes from the seeds, or ``variation`` =
    (one variation seed per image, strength), each image's noise moved towards its own
    variation seed's as ``Pipeline.generate`` moves it); ``upscale_images(images, width, height)``
    is the image upscaler for names in ``upscaler_names``."""
    validate_hires(hires, upscaler_names)
    given = common_options("hires_fix", options)
    if given["latents"] is not None or given["control"]:
        raise UserError("the hires fix takes neither latents nor ControlNet units")
    request = make_request(components, prompt, negative_prompt, given, given["callback"])
    require_text_to_image_model(components)
    f = latent_format(components).factor
    target = target_size(width, height, hires, f)
    final = target.final_size(f)
    validate_size(components, width, height, len(request.seeds))
    validate_size(components, *final, len(request.seeds))
    steps = hires.steps or request.options.steps
    tiled = with_tiled_autoencoder(components)
    first = _with_noise(components, request, width, height, variation)
    second = _second_request(components, request, hires, steps, final, variation)
    sigmas = second_pass_sigmas(components, second, steps, hires.strength)
    total = request.options.steps + len(sigmas) - 1
    latents = first_pass(components, first, width, height, total)
    x0, generators = enlarge(tiled, latents, target, hires, request.seeds, upscale_images)
    return second_pass(tiled, second, x0, sigmas, generators, request.options.steps), request, target


def _with_noise(
    components: Components,
    request: Request,
    width: int,
    height: int,
    variation: tuple[Sequence[int], float] | None,
) -> Request:
    """The request with variation noise at this size (``diffusion.noise.variation_noise``, image i
    towards ``variation[0][i]``), if there is a variation."""
    if variation is None or variation[1] == 0:
        return request
    seeds, strength = variation
    if len(seeds) != len(request.seeds):
        raise UserError(f"{len(seeds)} variation seeds for {len(request.seeds)} images")
    shape = latent_shape(components, 1, width, height)
    noise = [variation_noise(shape, [s], v, strength) for s, v in zip(request.seeds, seeds, strict=True)]
    return replace(request, latents=torch.cat(noise))


def _second_request(
    components: Components,
    request: Request,
    hires: Hires,
    steps: int,
    final: tuple[int, int],
    variation: tuple[Sequence[int], float] | None,
) -> Request:
    """The second pass: its own sampler and prompts if given; noise at the final size from the same seeds."""
    options = request.options
    if hires.sampler is not None:
        options = replace(options, sampler=hires.sampler, sigmas=hires.sigmas)
    n = len(request.seeds)
    prompts = request.prompts if hires.prompt is None else [hires.prompt] * n
    negatives = request.negative_prompts if hires.negative_prompt is None else [hires.negative_prompt] * n
    second = replace(
        request,
        prompts=prompts,
        negative_prompts=negatives,
        options=replace(options, steps=steps),
        first_pass_steps=options.steps,
    )
    second.options.validate()
    return _with_noise(components, second, *final, variation)
