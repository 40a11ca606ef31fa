"""What flows along a ComfyUI graph's links here: MODEL, CLIP, VAE, CONDITIONING, LATENT, IMAGE, MASK
and CONTROL_NET values, each small and immutable.

They follow ComfyUI's meaning, not its layout: a MODEL or CLIP is the loaded model plus the LoRAs a
LoraLoader chain put on it (merged only while a node uses it, ``lora.WeightPatcher``); CONDITIONING is
the prompt text, encoded by the model's family when a sampler knows the image size (SDXL conditions on
it); an empty LATENT knows its size but gets its channels from the model that samples it (ComfyUI's
latents are always 4 x H/8 x W/8; ours follow the family's latent format). IMAGE is ComfyUI's
[N, H, W, 3] float tensor in [0, 1]; MASK is [N, H, W] in [0, 1] (1: repaint).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from latentdiffusion.components import Components

LoRAs = tuple[tuple[Path, float], ...]  # (file, strength) in the order the loaders applied them


@dataclass(frozen=True, eq=False)  # the same value when it comes from the same node
class Model:
    """MODEL: the denoising network of ``components`` with ``loras`` at their model strengths."""

    components: Components
    loras: LoRAs = ()
    eps_scaling: float = 1.0  # the Epsilon Scaling node's factor (1: off)


@dataclass(frozen=True, eq=False)  # the same value when it comes from the same node
class Clip:
    """CLIP: the text encoders of ``components`` with ``loras`` at their CLIP strengths."""

    components: Components
    loras: LoRAs = ()


@dataclass(frozen=True, eq=False)  # the same value when it comes from the same node
class Vae:
    """VAE: the autoencoder of ``components``."""

    components: Components


@dataclass(frozen=True)
class ControlHint:
    """One ControlNet applied to a conditioning (ControlNetApplyAdvanced)."""

    network: Any  # models.controlnet.ControlNet
    name: str
    image: Image.Image
    strength: float
    start: float
    end: float


@dataclass(frozen=True)
class Conditioning:
    """CONDITIONING: a prompt to encode with ``clip``, and the ControlNets applied to it."""

    text: str
    clip: Clip
    controls: tuple[ControlHint, ...] = ()


@dataclass(frozen=True)
class Latent:
    """LATENT: ``samples`` [N, C, h, w] in the model's latent space (noise-free, or at the noise level a
    KSamplerAdvanced left it), or None for an empty latent of ``batch`` x ``width`` x ``height`` pixels;
    ``noise_mask`` [N or 1, 1, H, W] (1: denoise) from SetLatentNoiseMask or VAEEncodeForInpaint."""

    samples: torch.Tensor | None
    width: int
    height: int
    batch: int = 1
    noise_mask: torch.Tensor | None = field(default=None, compare=False)

    def resolve(self, components: Components) -> torch.Tensor:
        """The samples, zeros of the model's latent shape for an empty latent."""
        if self.samples is not None:
            return self.samples
        from latentdiffusion.pipelines.text_to_image import latent_shape

        shape = latent_shape(components, self.batch, self.width, self.height)
        return torch.zeros(shape, device=components.device)


def pil_to_image(images: list[Image.Image]) -> torch.Tensor:
    """PIL images (one size) -> IMAGE [N, H, W, 3] float32 in [0, 1]."""
    arrays = [np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0 for image in images]
    return torch.from_numpy(np.stack(arrays))


def image_to_pil(image: torch.Tensor) -> list[Image.Image]:
    """IMAGE [N, H, W, C] in [0, 1] -> 8-bit RGB PIL images (rounded)."""
    array = (image[..., :3].float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in array]


def image_to_tensor(image: torch.Tensor, device: torch.device) -> torch.Tensor:
    """IMAGE [N, H, W, C] in [0, 1] -> [N, 3, H, W] in [-1, 1], the autoencoder's input."""
    return (image[..., :3].permute(0, 3, 1, 2).to(device, torch.float32) * 2 - 1).contiguous()


def mask_from_alpha(picture: Image.Image) -> torch.Tensor:
    """MASK [1, H, W] of an image with alpha: 1 - alpha (transparent pixels are repainted, as ComfyUI's
    LoadImage reads them); without alpha, ComfyUI's empty 64 x 64 mask."""
    if "A" not in picture.getbands():
        return torch.zeros(1, 64, 64)
    alpha = np.asarray(picture.getchannel("A"), dtype=np.float32) / 255.0
    return (1.0 - torch.from_numpy(alpha))[None]
