"""First-stage training: the KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, Sec. 3.1
and App. G), with the objective of Esser et al. 2021 (Sec. 3.1, Eq. 5-7):

    L = |x - D(z)|_1 (+ perceptual) + w_kl * KL(q(z|x) || N(0, I)) + lambda * w_disc * L_GAN,

z = mean + std * eps sampled from q(z | x), lambda the adaptive weight, the GAN term (PatchGAN, hinge)
switched on after ``disc_start`` steps, when reconstructions are already good.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from latentdiffusion.checkpoints.native import save_native
from latentdiffusion.components import Components, build_components
from latentdiffusion.config import TextEncoderConfig, UNetConfig
from latentdiffusion.errors import UserError
from latentdiffusion.metrics import psnr, ssim
from latentdiffusion.models.attention import SpatialSelfAttention
from latentdiffusion.models.autoencoder import Autoencoder, DiagonalGaussian
from latentdiffusion.models.layers import ResBlock
from latentdiffusion.pipelines.text_to_image import tensor_to_images
from latentdiffusion.training.data import Batch
from latentdiffusion.training.losses import (
    PatchDiscriminator,
    adaptive_weight,
    edge_weighted_l1,
    generator_loss,
    gradient_l1,
    hinge_discriminator_loss,
)
from latentdiffusion.training.perceptual import load_perceptual_loss
from latentdiffusion.training.task import StepRandom, Task, image_grid

GRID_IMAGES = 8  # held-out images shown (original above reconstruction) in each sample grid
# The autoencoder's tensors that a decoder-only run trains (AutoencoderTask.decoder_only).
DECODER_SIDE = ("decoder.", "post_quant_conv.")
# The smallest U-Net and text encoder a model folder can hold: stand-ins beside a trained autoencoder in a
# folder meant only as a first stage (``save_first_stage``), ~0.4 M parameters, nearly all the token table.
PLACEHOLDER_UNET = UNetConfig(
    model_channels=8,
    channel_mult=(1,),
    num_res_blocks=1,
    attention_levels=(),
    num_heads=1,
    context_dim=8,
    norm_groups=4,
)
PLACEHOLDER_TEXT_ENCODER = TextEncoderConfig(hidden_size=8, num_layers=1, num_heads=1, intermediate_size=8)


class Reconstruction(nn.Module):
    """x -> (D(z), q(z | x)) with z = mean + std * eps for given eps: the autoencoder's training forward,
    as one module so that DDP can wrap it."""

    def __init__(self, autoencoder: Autoencoder) -> None:
        super().__init__()
        self.autoencoder = autoencoder

    def forward(self, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, DiagonalGaussian]:
        posterior = self.autoencoder.encode(x)
        z = posterior.mean + posterior.std * eps.to(posterior.mean.dtype)
        return self.autoencoder.decode(z), posterior


def remap_colours(x: torch.Tensor, random: StepRandom, share: float) -> torch.Tensor:
    """Images [n, 3, H, W] in [-1, 1], a ``share`` of them with each channel c mapped to a_c x + b_c:
    a_c uniform in [-1, 1] (a flip reverses the channel), b_c uniform within what keeps [-1, 1]. Flat
    fills stay flat and edges stay edges, in colours the data may never use."""
    chosen = random.rand(device=x.device) < share
    u = random.rand(2, x.shape[1], device=x.device)  # [n, 2, C]
    a = 2 * u[:, 0] - 1
    b = (1 - a.abs()) * (2 * u[:, 1] - 1)
    mapped = a[:, :, None, None] * x + b[:, :, None, None]
    return torch.where(chosen[:, None, None, None], mapped, x)


def reconstruction_loss(x: torch.Tensor, reconstruction: torch.Tensor, cfg) -> torch.Tensor:
    """The pixel terms of the reconstruction loss: (edge-weighted) L1, plus the image-gradient L1 and
    MSE when their weights are set (``AutoencoderLossConfig``)."""
    rec = edge_weighted_l1(x, reconstruction, cfg.edge_weight, cfg.edge_radius)
    if cfg.gradient_weight:
        rec = rec + cfg.gradient_weight * gradient_l1(x, reconstruction)
    if cfg.mse_weight:
        rec = rec + cfg.mse_weight * (x - reconstruction).pow(2).mean()
    return rec


class AutoencoderTask(Task):
    name = "autoencoder"

    def __init__(self, config, components: Components, device: torch.device) -> None:
        super().__init__(config, components, device)
        loss = config.autoencoder_loss
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed + 1)
            discriminator = PatchDiscriminator(
                config.model.autoencoder.out_channels, loss.disc_channels, loss.disc_layers
            )
        self.autoencoder = components.autoencoder.to(device)
        self.discriminator = discriminator.to(device)
        self.reconstruction = Reconstruction(self.autoencoder)
        self.networks = {"autoencoder": self.autoencoder, "discriminator": self.discriminator}
        self.perceptual = load_perceptual_loss(loss.perceptual_weights, device)

    @property
    def ema_networks(self) -> tuple[str, ...]:
        return ("autoencoder",)  # the discriminator is thrown away after training

    @property
    def decoder_only(self) -> bool:
        """Only the decoder side trains (``autoencoder_loss.train_encoder=false``): the encoder and quant
        convolution stay --init's, so do the latents and their scale, and every model trained on them
        takes the new decoder as it is (a decoder fine-tune in the manner of SD's ft-EMA / ft-MSE VAEs)."""
        return not self.config.autoencoder_loss.train_encoder

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        named = self.autoencoder.named_parameters()
        return {
            "autoencoder": [p for n, p in named if not self.decoder_only or n.startswith(DECODER_SIDE)],
            "discriminator": list(self.discriminator.parameters()),
        }

    def learning_rate(self, group: str) -> float:
        disc_lr = self.config.autoencoder_loss.disc_lr
        return disc_lr if group == "discriminator" and disc_lr is not None else self.config.optim.lr

    def forward_modules(self) -> dict[str, nn.Module]:
        return {"autoencoder": self.reconstruction, "discriminator": self.discriminator}

    def checkpoint_block_types(self) -> tuple[type[nn.Module], ...]:
        return (ResBlock, SpatialSelfAttention)

    def losses(
        self, modules: dict[str, nn.Module], batch: Batch, random: StepRandom, step: int
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        cfg = self.config.autoencoder_loss
        x = batch.x.to(self.device)
        if cfg.colour_remap > 0:
            x = remap_colours(x, random, cfg.colour_remap)
        latent_shape = self._latent_shape(x)
        reconstruction, posterior = modules["autoencoder"](x, random.randn(*latent_shape, device=self.device))
        rec = reconstruction_loss(x, reconstruction.float(), cfg)
        if self.perceptual is not None:
            rec = rec + cfg.perceptual_weight * self.perceptual(x, reconstruction.float()).mean()
        # KL summed over latent elements, divided by the pixel count like the L1 mean, so that kl_weight
        # means what it means in LDM's configs (there both terms are sums over pixels and latents).
        kl = posterior.kl().float().mean() / x[0].numel()
        total = cfg.l1_weight * rec + cfg.kl_weight * kl
        logs = {"rec_loss": rec.item(), "kl": kl.item() * x[0].numel()}
        losses: dict[str, torch.Tensor] = {}
        if step >= cfg.disc_start:
            g_loss = generator_loss(self.discriminator(reconstruction))  # raw module: D is fixed here
            weight = adaptive_weight(rec, g_loss, self.autoencoder.decoder.conv_out.weight) * cfg.disc_weight
            total = total + weight * g_loss
            logits = modules["discriminator"](torch.cat([x, reconstruction.detach()]))
            real, fake = logits.float().chunk(2)
            losses["discriminator"] = hinge_discriminator_loss(real, fake)
            logs |= {
                "g_loss": g_loss.item(),
                "d_weight": weight.item(),
                "d_loss": losses["discriminator"].item(),
            }
        losses["autoencoder"] = total
        logs["loss"] = total.item()
        return losses, logs

    def _latent_shape(self, x: torch.Tensor) -> tuple[int, int, int]:
        f = self.config.model.autoencoder.downsampling_factor
        return self.config.model.autoencoder.latent_channels, x.shape[-2] // f, x.shape[-1] // f

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """D(mode of q(z | x)) in float32."""
        self.autoencoder.eval()
        try:
            return self.autoencoder.decode(self.autoencoder.encode(x.to(self.device)).mode()).float()
        finally:
            self.autoencoder.train()

    @torch.no_grad()
    def evaluate(self, batches: Sequence[Batch]) -> dict[str, float]:
        """PSNR and SSIM of held-out reconstructions (posterior mode), images in [-1, 1]."""
        if not batches:
            return {}
        scores = [
            (psnr(b.x, r.clamp(-1, 1).cpu()), ssim(b.x, r.clamp(-1, 1).cpu()))
            for b in batches
            for r in [self.reconstruct(b.x)]
        ]
        return {
            "psnr": torch.cat([p for p, _ in scores]).mean().item(),
            "ssim": torch.cat([s for _, s in scores]).mean().item(),
        }

    @torch.no_grad()
    def sample_grid(self, batches: Sequence[Batch]) -> Image.Image | None:
        if not batches:
            return None
        x = torch.cat([b.x for b in batches])[:GRID_IMAGES]
        images = tensor_to_images(x) + tensor_to_images(self.reconstruct(x).cpu())
        return image_grid(images, columns=len(x))

    @torch.no_grad()
    def latent_scale(self, batches: Sequence[Batch]) -> float:
        """1 / std of posterior samples over the held-out set: latent diffusion's rescaling to unit
        variance (Rombach et al. 2022, Sec. 4.3.2 and App. G)."""
        if not batches:
            return self.config.model.autoencoder.scaling_factor
        generator = torch.Generator().manual_seed(self.config.seed)
        self.autoencoder.eval()
        z = torch.cat(
            [self.autoencoder.encode(b.x.to(self.device)).sample(generator).float().cpu() for b in batches]
        )
        self.autoencoder.train()
        return float(1.0 / z.std())

    def export(self, path: Path, batches: Sequence[Batch]) -> Components:
        """The whole model folder (``ld.load`` reads it); only its autoencoder is trained, the U-Net and
        text encoder are the preset's random initialisation. ``ldm train --autoencoder`` takes it. The
        latent scale is measured on ``batches``, or kept from --init when the encoder did not train."""
        scale = (
            self.config.model.autoencoder.scaling_factor if self.decoder_only else self.latent_scale(batches)
        )
        model = replace(
            self.config.model, autoencoder=replace(self.config.model.autoencoder, scaling_factor=scale)
        )
        components = build_components(model, seed=self.config.seed, name=self.config.name)
        components.autoencoder.load_state_dict(self.autoencoder.state_dict())
        save_native(components, path)
        return components


def save_first_stage(source: str, path: Path, *, dtype: torch.dtype | None = torch.float16) -> Components:
    """The autoencoder of the model ``source`` (e.g. an autoencoder run's ``export``) as a small model
    folder for ``ldm train --autoencoder PATH``: the autoencoder's weights (fp16 by default) beside an
    untrained placeholder U-Net and text encoder (``PLACEHOLDER_UNET``, ``PLACEHOLDER_TEXT_ENCODER``), so
    that every reader of model folders takes it while it stays a few MB; it generates no images."""
    from latentdiffusion.pipelines.loading import load_components

    trained = load_components(source)
    latent = trained.config.autoencoder.latent_channels
    unet = replace(PLACEHOLDER_UNET, in_channels=latent, out_channels=latent, coordinate_channels=False)
    model = replace(trained.config, unet=unet, text_encoder=PLACEHOLDER_TEXT_ENCODER)
    components = build_components(model, seed=0, name=trained.name)
    components.autoencoder.load_state_dict(trained.autoencoder.state_dict())
    save_native(components, path, dtype=dtype)
    return components


def install_decoder(source: str, folder: Path) -> list[Path]:
    """Write the decoder side of model ``source``'s autoencoder (a decoder-only run's export) into the
    native model folder ``folder`` and its bundled refiner, each tensor in its file's own dtype, every other
    tensor kept as stored; returns the weight files rewritten. Refused unless ``source`` has the same
    autoencoder (architecture and latent scale) and encoder weights as each of them, so that the latents the
    models were trained on are the ones the new decoder reads."""
    from latentdiffusion.checkpoints.native import (
        NATIVE_WEIGHTS,
        bundled_refiner,
        read_native_config,
        role_prefix,
    )
    from latentdiffusion.checkpoints.safe_io import read_state_dict, save_safetensors
    from latentdiffusion.pipelines.loading import load_components

    trained = load_components(source)
    state = trained.autoencoder.state_dict()
    prefix = role_prefix("autoencoder")
    refiner = bundled_refiner(Path(folder))
    rewritten = {}
    for model in [Path(folder)] + ([refiner[0]] if refiner else []):
        if read_native_config(model).autoencoder != trained.config.autoencoder:
            raise UserError(f"{source} has another autoencoder than {model}: its decoder cannot go there")
        path = model / NATIVE_WEIGHTS
        stored = dict(read_state_dict(path))
        for key, value in state.items():
            old = stored[prefix + key]
            if key.startswith(DECODER_SIDE):
                stored[prefix + key] = value.to(old.dtype)
            elif not torch.equal(value.to(old.dtype), old):
                raise UserError(
                    f"{source} encodes differently from {model} ({key}): only a decoder trained "
                    "with autoencoder_loss.train_encoder=false on that model's encoder fits it"
                )
        rewritten[path] = stored
    for path, stored in rewritten.items():  # written once every file is known to fit
        save_safetensors(stored, path)
    return list(rewritten)
