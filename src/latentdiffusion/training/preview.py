"""Training the preview decoder (``models.preview_decoder``) by distillation from a frozen autoencoder:

    L = E_x || P(z) - D(z) ||_1,   z = E(x) in diffusion space (the model's scaling and shift applied),

so the preview of a latent looks like what the real decoder D would make of it, at a few hundred times
less compute. Only P trains. The export is the preview file alone (``models.preview_decoder.PREVIEW_FILE``):
copied into a native model folder with the same autoencoder, ``pipelines.preview`` uses it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from latentdiffusion.components import Components
from latentdiffusion.models.preview_decoder import PREVIEW_FILE, PreviewDecoder, save_preview_decoder
from latentdiffusion.training.config import TrainConfig
from latentdiffusion.training.data import Batch
from latentdiffusion.training.task import StepRandom, Task, image_grid

PREVIEW_CHANNELS = 32
GRID_IMAGES = 8


class PreviewTask(Task):
    name = "preview"

    def __init__(self, config: TrainConfig, components: Components, device: torch.device) -> None:
        super().__init__(config, components, device)
        ae = config.model.autoencoder
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed + 2)
            decoder = PreviewDecoder(ae.latent_channels, ae.downsampling_factor, PREVIEW_CHANNELS)
        self.decoder = decoder.to(device)
        self.autoencoder = components.autoencoder.to(device).eval().requires_grad_(False)
        self.networks = {"preview": self.decoder}

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"preview": list(self.decoder.parameters())}

    @torch.no_grad()
    def teacher(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Diffusion-space latents of images x and the real decoder's images of them."""
        z = self.autoencoder.to_latent(x.to(self.device)).float()
        return z, self.autoencoder.from_latent(z).float().clamp(-1, 1)

    def losses(
        self, modules: dict[str, nn.Module], batch: Batch, random: StepRandom, step: int
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        z, target = self.teacher(batch.x)
        loss = (modules["preview"](z) - target).abs().mean()
        return {"preview": loss}, {"loss": loss.item()}

    @torch.no_grad()
    def evaluate(self, batches: Sequence[Batch]) -> dict[str, float]:
        """PSNR of previews against the real decoder's images, and of the linear previewer (the baseline)."""
        from latentdiffusion.metrics import psnr
        from latentdiffusion.pipelines.preview import fit_previewer

        if not batches:
            return {}
        z, target = self.teacher(torch.cat([b.x for b in batches]))
        linear = fit_previewer(self.autoencoder, self.decoder.factor).to_rgb(z)
        linear = nn.functional.interpolate(linear, scale_factor=self.decoder.factor, mode="nearest")
        return {
            "psnr": psnr(self.decoder(z), target).mean().item(),
            "psnr_linear": psnr(linear, target).mean().item(),
        }

    @torch.no_grad()
    def sample_grid(self, batches: Sequence[Batch]) -> Image.Image | None:
        """Held-out images by column; rows: the real decoder's image, the preview."""
        from latentdiffusion.pipelines.text_to_image import tensor_to_images

        if not batches:
            return None
        z, target = self.teacher(torch.cat([b.x for b in batches])[:GRID_IMAGES])
        images = tensor_to_images(target) + tensor_to_images(self.decoder(z))
        return image_grid(images, columns=len(target))

    def export(self, path: Path, batches: Sequence[Batch]) -> Components:
        save_preview_decoder(self.decoder, Path(path) / PREVIEW_FILE)
        return self.components
