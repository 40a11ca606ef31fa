"""Training a latent x4 upscaler (Rombach et al. 2022, Sec. 4.4, "Super-Resolution with Latent Diffusion"):

    L = E_{x, c, eps, t, s, eta} [ w(t) || target(z0, eps, t) - net([z_t, y_s], t, s, tau(c)) ||^2 ],
    z0 = E(x),  y = bicubic_f(x),  y_s = sqrt(alpha'_s) y + sqrt(1 - alpha'_s) eta,  s ~ U{0, ..., S},

the denoising objective of ``training.diffusion`` (Eq. 2) with the low-resolution image concatenated to
the latent on channels. x is the training image, E the frozen autoencoder (factor f), y the image shrunk
by f with antialiased bicubic resampling (the "bicubic degradation with 4x downsampling" of LDM Sec. 4.4
and SR3, Saharia et al. 2022; it matches PIL's ``Image.resize(..., BICUBIC)``, so a user's downscaled
picture is what the model saw in training). y is noised to a random level s of the x4 upscaler's
augmentation schedule (noise conditioning augmentation, Ho et al. 2022, "Cascaded Diffusion Models",
Sec. 4.1) and s is the U-Net's class label, exactly as ``pipelines.upscale`` conditions at inference.
The text encoder tau is the upscaler's own, trained jointly with caption dropout.

The export is a native model folder: ``ld.load(folder).upscale(image, prompt)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from latentdiffusion.components import Components
from latentdiffusion.diffusion.schedules import NoiseSchedule
from latentdiffusion.pipelines.upscale import LOW_RES_SCHEDULE, MAX_NOISE_LEVEL
from latentdiffusion.training.config import TrainConfig
from latentdiffusion.training.data import Batch, DataSplit
from latentdiffusion.training.diffusion import Conditioning, DiffusionTask
from latentdiffusion.training.distributed import Distributed
from latentdiffusion.training.task import StepRandom, derive_seed, image_grid

EVAL_IMAGES = 8  # held-out images upscaled for eval/psnr and the sample grid
EVAL_NOISE_LEVEL = 20  # the noise level `ldm upscale` and Pipeline.upscale use by default


def downsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Pixels [N, C, H, W] in [-1, 1] -> [N, C, H / factor, W / factor] by antialiased bicubic
    resampling, clipped to [-1, 1] like the overshoot of PIL's 8-bit bicubic resize."""
    y = F.interpolate(x, scale_factor=1 / factor, mode="bicubic", antialias=True, align_corners=False)
    return y.clamp(-1.0, 1.0)


def augment_low_res(
    y: torch.Tensor, levels: torch.Tensor, eta: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """sqrt(a_s) y + sqrt(1 - a_s) eta with a per-sample level s (``pipelines.upscale.noise_augment``)."""
    a = alphas_cumprod[levels].to(y.dtype).view(-1, 1, 1, 1)
    return a.sqrt() * y + (1 - a).sqrt() * eta


class UpscalerTask(DiffusionTask):
    """The diffusion task with the low-resolution image and its noise level as extra conditioning."""

    name = "upscaler"

    def __init__(self, config: TrainConfig, components: Components, device: torch.device) -> None:
        super().__init__(config, components, device)
        low_res = NoiseSchedule.from_config(LOW_RES_SCHEDULE).alphas_cumprod
        self.low_res_alphas = low_res.to(device=device, dtype=torch.float32)
        self.factor = config.model.autoencoder.downsampling_factor
        self.top_level = min(MAX_NOISE_LEVEL, config.model.unet.num_class_embeds - 1)

    def prepare_data(self, split: DataSplit, run_dir: Path, info: Distributed) -> DataSplit:
        return split  # no latent cache: every step needs the pixels for the low-resolution input

    def extra_conditioning(self, batch: Batch, z0: torch.Tensor, random: StepRandom) -> Conditioning:
        """The training image shrunk by f (``downsample``), noised to a random augmentation level s; the
        U-Net sees it concatenated to the latent and s as its class label."""
        x = batch.x.to(self.device).float()  # [n, 3, H, W]
        levels = random.randint(self.top_level + 1, device=self.device)  # [n]
        eta = random.randn(3, *z0.shape[2:], device=self.device)
        y = augment_low_res(downsample(x, self.factor), levels, eta, self.low_res_alphas)
        return Conditioning(channels=(y.to(z0.dtype),), kwargs={"class_labels": levels})

    # ---------------------------------------------------------------------------------- evaluation

    @torch.no_grad()
    def evaluate(self, batches: Sequence[Batch]) -> dict[str, float]:
        """Held-out denoising loss, and PSNR of upscaled held-out images against the originals beside
        the PSNR of bicubic upscaling (the baseline a useful upscaler beats)."""
        from latentdiffusion.metrics import psnr
        from latentdiffusion.pipelines.images import images_to_tensor

        scores = super().evaluate(batches)
        if not batches:
            return scores
        x, low, upscaled = self.upscale_held_out(batches)
        bicubic = [image.resize(upscaled[0].size, Image.Resampling.BICUBIC) for image in low]
        as_tensor = lambda images: images_to_tensor(images, x.device, torch.float32)  # noqa: E731
        scores["psnr"] = psnr(as_tensor(upscaled), x).mean().item()
        scores["psnr_bicubic"] = psnr(as_tensor(bicubic), x).mean().item()
        return scores

    @torch.no_grad()
    def sample_grid(self, batches: Sequence[Batch]) -> Image.Image | None:
        """Held-out images by column; rows: the low-resolution input (pixels enlarged), its bicubic
        enlargement, the upscaler's output, the original."""
        from latentdiffusion.pipelines.text_to_image import tensor_to_images

        if not batches:
            return None
        x, low, upscaled = self.upscale_held_out(batches)
        size = upscaled[0].size
        rows = [
            [image.resize(size, Image.Resampling.NEAREST) for image in low],
            [image.resize(size, Image.Resampling.BICUBIC) for image in low],
            upscaled,
            tensor_to_images(x),
        ]
        return image_grid([image for row in rows for image in row], columns=len(low))

    def upscale_held_out(
        self, batches: Sequence[Batch]
    ) -> tuple[torch.Tensor, list[Image.Image], list[Image.Image]]:
        """Originals [k, 3, H, W], their 8-bit low-resolution images and the upscaler's outputs, with
        the sample settings and fixed seeds (EMA weights, applied by the caller)."""
        from latentdiffusion.pipelines.pipeline import Pipeline
        from latentdiffusion.pipelines.text_to_image import tensor_to_images

        x = torch.cat([batch.x for batch in batches])[:EVAL_IMAGES].float()
        captions = [caption for batch in batches for caption in batch.captions][:EVAL_IMAGES]
        low = tensor_to_images(downsample(x, self.factor))
        pipe, options = Pipeline(self.components_for_sampling()), self.config.sample
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.config.seed, 1))
            upscaled = [
                pipe.upscale(
                    image,
                    caption,
                    noise_level=EVAL_NOISE_LEVEL,
                    steps=options.steps,
                    guidance_scale=options.guidance_scale,
                    sampler=options.sampler,
                    seed=options.seed + i,
                    tile_size=None,
                )[0]
                for i, (image, caption) in enumerate(zip(low, captions, strict=True))
            ]
        return x.to(self.device), low, upscaled
