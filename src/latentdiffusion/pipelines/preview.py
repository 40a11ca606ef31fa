"""Fast approximate previews of the image being sampled, without running the autoencoder's decoder.

Each latent pixel of Stable Diffusion's autoencoder describes an f x f patch of the image, and its
channels are close to a linear code of the patch's mean colour, so rgb ~ W z + b at latent resolution
(the approximation behind the "latent preview" of the popular SD front ends). We fit W [3, C] and
b [3] by least squares (``torch.linalg.lstsq``) on pairs (latent of an image, the image averaged over
f x f patches) made with the model's own encoder from smooth random colour images, so the previewer
fits whichever autoencoder is loaded. A preview costs one 1x1 projection: microseconds, against the
seconds of a full decode. It shows composition and colour, not detail.

A model folder may also carry a trained preview decoder (``models.preview_decoder``, trained with
``ldm train-preview``): when the loaded model has one, previews come from it instead, with shapes and
edges at a small fraction of the real decoder's cost. A model loaded with a tiny autoencoder (TAESD,
``pipelines.tiny_vae``) previews through that, at full detail for about the same cost.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from latentdiffusion.components import Components
from latentdiffusion.models.tiny_autoencoder import TinyAutoencoder
from latentdiffusion.pipelines.sampling import StepCallback

PreviewCallback = Callable[[int, int, list[Image.Image]], None]  # (step, steps, one image per sample)
FIT_IMAGES = 8
FIT_SIZE = 64  # pixels per side of the fitting images
_fitted: weakref.WeakKeyDictionary[torch.nn.Module, LatentPreviewer] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class LatentPreviewer:
    """rgb = weight @ z + bias per latent pixel: diffusion-space latents -> images in [-1, 1]."""

    weight: torch.Tensor  # [3, latent_channels]
    bias: torch.Tensor  # [3]

    def to_rgb(self, latents: torch.Tensor) -> torch.Tensor:
        """[N, C, h, w] latents -> [N, 3, h, w] approximate images, clamped to [-1, 1]."""
        weight = self.weight.to(latents.device)[:, :, None, None]
        rgb = F.conv2d(latents.float(), weight, self.bias.to(latents.device))
        return rgb.clamp(-1, 1)

    def __call__(self, latents: torch.Tensor, scale: int = 1) -> list[Image.Image]:
        """PIL previews, ``scale`` times the latent size (bilinear)."""
        from latentdiffusion.pipelines.text_to_image import tensor_to_images

        rgb = self.to_rgb(latents)
        if scale > 1:
            rgb = F.interpolate(rgb, scale_factor=scale, mode="bilinear", align_corners=False)
        return tensor_to_images(rgb)


def smooth_colour_images(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """[n, 3, size, size] images in [-1, 1]: random 4x4 colour grids, bilinearly enlarged, so that the
    fit sees the whole colour cube in flat and graded regions."""
    grid = torch.rand(n, 3, 4, 4, generator=generator) * 2 - 1
    return F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=True)


@torch.inference_mode()
def fit_previewer(autoencoder: torch.nn.Module, factor: int, *, seed: int = 0) -> LatentPreviewer:
    """Least-squares fit of ``LatentPreviewer`` to an autoencoder with downsampling ``factor`` (anything
    with ``to_latent(images)``; see the module docstring)."""
    vae, f = autoencoder, factor
    parameter = next(vae.parameters())
    images = smooth_colour_images(FIT_IMAGES, FIT_SIZE, torch.Generator().manual_seed(seed))
    latents = vae.to_latent(images.to(parameter.device, parameter.dtype)).float().cpu()  # [n, C, h, w]
    targets = F.avg_pool2d(images, f)  # [n, 3, h, w]: each latent pixel's patch colour
    z = latents.permute(0, 2, 3, 1).flatten(0, 2)  # [n*h*w, C]
    design = torch.cat([z, torch.ones(len(z), 1)], dim=1)  # [n*h*w, C + 1]: the bias column
    solution = torch.linalg.lstsq(
        design.double(), targets.permute(0, 2, 3, 1).flatten(0, 2).double()
    ).solution
    return LatentPreviewer(weight=solution[:-1].T.float().contiguous(), bias=solution[-1].float())


@dataclass(frozen=True)
class DecoderPreviewer:
    """Previews from a trained preview decoder (``models.preview_decoder``)."""

    decoder: torch.nn.Module

    @torch.inference_mode()
    def __call__(self, latents: torch.Tensor, scale: int = 1) -> list[Image.Image]:
        """PIL previews, ``scale`` times the latent size (the decoder's own factor needs no resizing)."""
        from latentdiffusion.pipelines.text_to_image import tensor_to_images

        rgb = self.decoder(latents.float().cpu())
        if scale != self.decoder.factor:
            size = (latents.shape[-2] * scale, latents.shape[-1] * scale)
            rgb = F.interpolate(rgb, size=size, mode="bilinear", align_corners=False, antialias=True)
        return tensor_to_images(rgb)


@dataclass(frozen=True)
class TinyAutoencoderPreviewer:
    """Previews from a tiny autoencoder (TAESD) that the model was loaded with (``pipelines.tiny_vae``),
    on the autoencoder's device and in its dtype."""

    autoencoder: TinyAutoencoder

    @torch.inference_mode()
    def __call__(self, latents: torch.Tensor, scale: int = 1) -> list[Image.Image]:
        """PIL previews, ``scale`` times the latent size (resized when that is not the decoder's factor)."""
        from latentdiffusion.pipelines.text_to_image import tensor_to_images

        weight = next(self.autoencoder.parameters())
        rgb = self.autoencoder.from_latent(latents.to(weight.device, weight.dtype)).float()
        if scale != self.autoencoder.factor:
            size = (latents.shape[-2] * scale, latents.shape[-1] * scale)
            rgb = F.interpolate(rgb, size=size, mode="bilinear", align_corners=False, antialias=True)
        return tensor_to_images(rgb)


Previewer = LatentPreviewer | DecoderPreviewer | TinyAutoencoderPreviewer


def previewer_for(components: Components) -> Previewer:
    """The model's tiny autoencoder when it was loaded with one; else its trained preview decoder when it
    has one; otherwise the linear previewer of its autoencoder, fitted on first use and kept with it."""
    if isinstance(components.autoencoder, TinyAutoencoder):
        return TinyAutoencoderPreviewer(components.autoencoder)
    if components.preview_decoder is not None:
        return DecoderPreviewer(components.preview_decoder)
    vae = components.autoencoder
    if vae not in _fitted:
        _fitted[vae] = fit_previewer(vae, components.config.autoencoder.downsampling_factor)
    return _fitted[vae]


def with_preview(
    components: Components, callback: StepCallback | None, preview: PreviewCallback | None
) -> StepCallback | None:
    """A step callback that also hands ``preview`` one approximate image per sample (from x0), at the
    image's size, each step."""
    if preview is None:
        return callback
    previewer = previewer_for(components)
    factor = components.config.autoencoder.downsampling_factor

    def on_step(step: int, steps: int, x: torch.Tensor, x0: torch.Tensor) -> None:
        if callback is not None:
            callback(step, steps, x, x0)
        preview(step, steps, previewer(x0, scale=factor))

    return on_step
