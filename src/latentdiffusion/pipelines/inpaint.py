"""Inpainting: repaint the masked part of an image, keep the rest. One entry point, two kinds of model.

* A 9-channel inpainting U-Net (Rombach et al. 2022, Sec. 4.5; SD-inpainting): the latent is
  concatenated with the latent-resolution mask and the latent of the masked image (masked pixels set to
  0), as diffusers' StableDiffusionInpaintPipeline feeds it.
* Any 4-channel model, by replacement (Song et al. 2021, "Score-Based Generative Modeling through SDEs",
  App. I.2; Lugmayr et al. 2022, "RePaint", Eq. 8 without resampling): before every denoiser call after
  the first, the known region of x is replaced by the encoded image noised to the current level with the
  starting noise, ``x0 + sigma * noise``; the known region of the x0 estimate is the encoded image; the
  final latent keeps the encoded image there. This is a denoiser wrapper, so every sampler works, and it
  matches diffusers' blending after each scheduler step. In the VE view the same formula is rectified
  flow's ``(1 - t) x0 + t noise`` divided by ``1 - t`` (diffusers' ``scale_noise``), so SD3 takes this path
  unchanged (16 channels; parity with StableDiffusion3InpaintPipeline).

Around the model: mask blur and paste-back (pixels outside the feathered mask come back exactly), mask
inversion, "only masked" (crop around the mask, work at the model's resolution, paste back), and the
content the masked area starts from when strength < 1 (original, latent noise, latent nothing).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from PIL import Image

from latentdiffusion.components import Components
from latentdiffusion.diffusion.noise import seeded_generators, seeded_noise
from latentdiffusion.diffusion.parameterization import append_dims
from latentdiffusion.errors import UserError
from latentdiffusion.pipelines.control import controlled, with_inpaint_inputs
from latentdiffusion.pipelines.image_to_image import (
    encode_latents,
    require_input_channels,
    strength_sigmas,
    validate_strength,
)
from latentdiffusion.pipelines.images import (
    composite,
    feather,
    fit_mask,
    images_to_tensor,
    latent_mask,
    mask_box,
    mask_to_tensor,
    pad_box,
    round_down,
)
from latentdiffusion.pipelines.request import Request
from latentdiffusion.pipelines.sampling import (
    GuidedDenoiser,
    bind_run,
    full_sigmas,
    guide,
    integrate,
    network_denoiser,
    start_scale,
)
from latentdiffusion.pipelines.text_to_image import decode_images, size_multiple, validate_size

MASKED_CONTENT = ("original", "noise", "nothing")
FILL_SEED_OFFSET = 0xF111  # "noise" fill draws from its own stream, not the starting noise's


@dataclass(frozen=True)
class MaskOptions:
    """How the mask is read and how the result is put back (docs/editing.md, "Masks")."""

    blur: float = 4.0  # std (pixels) of the Gaussian feather of the paste-back; 0 = hard edge
    invert: bool = False  # repaint the black part instead of the white part
    only_masked: bool = False  # work on a crop around the mask, at the model's resolution
    padding: int = 32  # pixels of context around the mask's bounding box for only_masked
    masked_content: str = "original"  # what the masked area starts from when strength < 1
    paste_back: bool = True  # pixels outside the feathered mask are the input's, exactly

    def validate(self) -> None:
        if not isinstance(self.blur, int | float) or not math.isfinite(self.blur) or not 0 <= self.blur <= 64:
            raise UserError(f"mask blur must be a number of pixels in [0, 64], got {self.blur!r}")
        if not isinstance(self.padding, int) or self.padding < 0:
            raise UserError(f"padding must be a whole number of pixels >= 0, got {self.padding!r}")
        if self.masked_content not in MASKED_CONTENT:
            known = ", ".join(MASKED_CONTENT)
            raise UserError(f"unknown masked content {self.masked_content!r}; use one of {known}")


def is_inpainting_model(components: Components) -> bool:
    """True for a U-Net that takes latent + mask + masked-image latent (9 channels for SD)."""
    latent = components.config.autoencoder.latent_channels
    return components.family.network_config(components.config).in_channels == 2 * latent + 1


class KnownRegionDenoiser:
    """D'(x, sigma): the known region (mask 0) of x replaced by ``x0 + sigma * noise`` below the
    starting level, and of the x0 estimate by ``x0`` (replacement, see the module docstring)."""

    def __init__(
        self,
        denoiser: GuidedDenoiser,
        x0: torch.Tensor,
        noise: torch.Tensor,
        mask: torch.Tensor,
        start: float,
    ) -> None:
        self.denoiser = denoiser
        self.x0, self.noise, self.mask = x0, noise, mask
        self.start = start  # the first call sees the starting state as it is, as diffusers does

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = append_dims(sigma, x).to(x.dtype)
        known = self.x0 + s * self.noise
        x = torch.where(s < self.start, self.mask * x + (1 - self.mask) * known, x)
        x0 = self.denoiser(x, sigma)
        return self.mask * x0 + (1 - self.mask) * self.x0

    def for_run(self, sigmas: torch.Tensor, steps_before: int = 0) -> KnownRegionDenoiser:
        """This wrapper around its denoiser placed on a run's steps (``sampling.bind_run``)."""
        inner = bind_run(self.denoiser, sigmas, steps_before)
        return KnownRegionDenoiser(inner, self.x0, self.noise, self.mask, self.start)


def fill_masked(x0: torch.Tensor, mask: torch.Tensor, content: str, seeds: Sequence[int]) -> torch.Tensor:
    """The starting latent's masked area: the image's own ("original"), unit noise ("noise"), or 0
    ("nothing"), as the web UI's masked-content options do in latent space."""
    if content == "original":
        return x0
    if content == "nothing":
        return x0 * (1 - mask)
    noise = seeded_noise(x0.shape, [s + FILL_SEED_OFFSET for s in seeds], x0.device, x0.dtype)
    return x0 * (1 - mask) + noise * mask


@torch.inference_mode()
def inpaint_latents(
    components: Components,
    images: torch.Tensor,
    mask: torch.Tensor,
    request: Request,
    *,
    strength: float,
    masked_content: str = "original",
) -> torch.Tensor:
    """Unit-scale latents of images [N, 3, H, W] in [-1, 1] repainted where ``mask`` [1, 1, H, W] is 1.

    Each image's generator (its seed) draws, in diffusers' order: the image's posterior sample (4-channel
    models, or strength < 1), the starting noise (unless ``request.latents`` gives it), then the masked
    image's posterior sample (9 channels).
    """
    options, seeds = request.options, request.seeds
    cond, uncond = request.conditioning(components, images.shape[-1], images.shape[-2])
    generators = seeded_generators(seeds)
    nine = is_inpainting_model(components)
    m = latent_mask(mask, components.config.autoencoder.downsampling_factor).expand(len(seeds), -1, -1, -1)
    sigmas = strength_sigmas(full_sigmas(components, options), strength, components.process.name)
    full = strength == 1
    x0 = encode_latents(components, images, generators) if not nine or not full else None
    channels = components.config.autoencoder.latent_channels
    noise = request.noise((len(seeds), channels, *m.shape[-2:]), m.device, generators)
    extra = None
    if nine:
        masked = encode_latents(components, images * (1 - mask), generators)
        extra = {"concat": torch.cat([m, masked], dim=1).to(components.dtype)}
    if x0 is not None:
        x0 = fill_masked(x0, m, masked_content, seeds)
    if len(sigmas) < 2:  # strength too small for one step (so x0 was encoded): the round trip
        return x0
    x = noise * start_scale(components, options, sigmas) if full else x0 + float(sigmas[0]) * noise
    model = controlled(components, request, sigmas, images.shape[-1], images.shape[-2])
    denoiser = guide(network_denoiser(model, options), cond, uncond, options, extra)
    if not nine:
        denoiser = KnownRegionDenoiser(denoiser, x0, noise, m, float(sigmas[0]))
    x = integrate(denoiser, x, sigmas, options, seeds, request.callback)
    return x if nine else m * x + (1 - m) * x0


def inpaint(
    components: Components,
    image: Image.Image,
    mask: Image.Image,
    request: Request,
    *,
    strength: float,
    mask_options: MaskOptions,
) -> list[Image.Image]:
    """Repaint the white part of ``mask`` (greyscale, same size or aspect as the RGB ``image``); one
    image per (prompt, negative prompt, seed) of ``request``."""
    request.options.validate()
    mask_options.validate()
    validate_strength(strength)
    if not is_inpainting_model(components):
        require_input_channels(components, 0, "inpainting")
    mask = fit_mask(mask, image.size)
    if mask_options.only_masked:
        if request.control:  # the hint would need the same crop as the image
            raise UserError("ControlNet (control) does not work with only_masked inpainting yet")
        return _inpaint_only_masked(components, image, mask, request, strength, mask_options)
    f = size_multiple(components)
    image, mask = round_down(image, f), round_down(mask, f, "mask")
    if request.control:  # an inpaint ControlNet's hint is made from the image and the mask
        request = with_inpaint_inputs(request, image, mask, mask_options.invert)
    binary = mask_to_tensor(mask, components.device, mask_options.invert)
    _require_masked_pixels(binary)
    generated = _generate(components, image, binary, request, strength, mask_options)
    if not mask_options.paste_back:
        return generated
    alpha = feather(binary, mask_options.blur)
    return [composite(image, g, alpha) for g in generated]


def _generate(
    components: Components,
    image: Image.Image,
    binary: torch.Tensor,
    request: Request,
    strength: float,
    mask_options: MaskOptions,
) -> list[Image.Image]:
    validate_size(components, image.width, image.height, len(request.seeds))
    with torch.inference_mode():
        images = images_to_tensor([image] * len(request.seeds), components.device, torch.float32)
        latents = inpaint_latents(
            components,
            images,
            binary,
            request,
            strength=strength,
            masked_content=mask_options.masked_content,
        )
        return decode_images(components, latents)


def _require_masked_pixels(binary: torch.Tensor) -> None:
    if not bool(binary.any()):
        raise UserError("the mask selects no pixels (white marks what to repaint; see invert_mask)")


def _inpaint_only_masked(
    components: Components,
    image: Image.Image,
    mask: Image.Image,
    request: Request,
    strength: float,
    mask_options: MaskOptions,
) -> list[Image.Image]:
    """Crop the feathered mask's box plus padding, scale it so its longer side is the model's size
    (never smaller than the crop), inpaint, scale back, and paste into the full image."""
    binary = mask_to_tensor(mask, torch.device("cpu"), mask_options.invert)
    _require_masked_pixels(binary)
    alpha = feather(binary, mask_options.blur)
    box = pad_box(mask_box(alpha), mask_options.padding, image.size)
    crop_size = (box[2] - box[0], box[3] - box[1])
    size = working_size(crop_size, components.config.sample_size, size_multiple(components))
    crop = image.crop(box).resize(size, Image.Resampling.LANCZOS)
    crop_mask = mask.crop(box).resize(size, Image.Resampling.BILINEAR)
    crop_binary = mask_to_tensor(crop_mask, components.device, mask_options.invert)
    _require_masked_pixels(crop_binary)
    inner = replace(mask_options, only_masked=False)
    generated = _generate(components, crop, crop_binary, request, strength, inner)
    results = []
    for g in generated:
        pasted = image.copy()
        pasted.paste(g.resize(crop_size, Image.Resampling.LANCZOS), box[:2])
        results.append(composite(image, pasted, alpha) if mask_options.paste_back else pasted)
    return results


def working_size(crop_size: tuple[int, int], model_size: int, multiple: int) -> tuple[int, int]:
    """The crop's size scaled (up only) so its longer side is at least ``model_size``, in multiples."""
    scale = max(1.0, model_size / max(crop_size))
    return tuple(max(multiple, round(side * scale / multiple) * multiple) for side in crop_size)
