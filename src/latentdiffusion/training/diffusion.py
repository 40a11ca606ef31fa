"""Second-stage training: the text-conditioned latent denoiser (Rombach et al. 2022, Sec. 3.3, Eq. 2):

    L = E_{z0, c, eps, t} [ w(t) || target(z0, eps, t) - net(z_t, t, tau(c)) ||^2 ],
    z_t = sqrt(alpha_bar_t) z0 + sqrt(1 - alpha_bar_t) eps,

or, for a rectified-flow model (``model.schedule.process == "flow"``, Esser et al. 2024, SD3, Sec. 2-3),
z_t = (1 - t) z0 + t eps with logit-normal t, the velocity target eps - z0 and network timestep t * T
(``diffusion.process`` says which: its training times, add_noise, target and network timestep),

z0 the scaled latent of the frozen autoencoder, tau the text encoder (trained jointly or frozen), the
target eps (Ho et al. 2020, Eq. 14) or v (Salimans & Ho 2022), w the Min-SNR-gamma weight (Hang et al.
2023), eps optionally with offset noise (Guttenberg 2023). Zero-terminal-SNR comes with the schedule
(``model.schedule.rescale_zero_terminal_snr``, Lin et al. 2024). Pixel-space models
(``AutoencoderConfig.identity``, the paper's f = 1 baseline) train on z0 = the image itself: the identity
first stage's posterior has zero variance.

The condition tau(c) is the model family's (``Family.training_condition``): SD's text-encoder states, or
SDXL's two encoders' states and its vector y, with each image's original size and crop from the data
(``training.data.Geometry``) and the training resolution as target size, or SD3's joint CLIP/T5 context
and pooled vector. The denoising network is the family's (``Family.network_role``): the U-Net, or SD3's
MMDiT (``models.mmdit``), which takes the same (x_t, timestep, context, y).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from latentdiffusion.checkpoints.native import save_native
from latentdiffusion.components import Components
from latentdiffusion.diffusion.process import process_from_config
from latentdiffusion.errors import UserError
from latentdiffusion.families.base import Cond, ConditioningRequest, MicroConditioning
from latentdiffusion.models.attention import SpatialTransformer
from latentdiffusion.models.layers import ResBlock
from latentdiffusion.models.mmdit import JointBlock
from latentdiffusion.models.text_encoder import EncoderLayer
from latentdiffusion.training.autoencoder import reconstruction_loss
from latentdiffusion.training.data import (
    Batch,
    DataSplit,
    Geometry,
    LatentSource,
    MicroBatches,
    Preparation,
    StreamOrder,
)
from latentdiffusion.training.distributed import Distributed, barrier
from latentdiffusion.training.losses import min_snr_weight, vp_x0_eps
from latentdiffusion.training.task import StepRandom, Task, derive_seed, image_grid

LATENT_CACHE = "latents.pt"
EVAL_SEED_OFFSET = 2**40  # evaluation draws its noise from micro-batch numbers no training step reaches
# the diffusion.* settings that only DiffusionTask.per_sample_loss honours
DENOISING_LOSS_OPTIONS = ("pixel_weight", "input_perturbation")


@dataclass(frozen=True)
class Conditioning:
    """Extra U-Net inputs of a diffusion task: tensors concatenated to the noisy latent on channels
    (inpainting masks, an upscaler's low-resolution image) and keyword arguments (class labels)."""

    channels: tuple[torch.Tensor, ...] = ()
    kwargs: dict[str, torch.Tensor] = field(default_factory=dict)


class DiffusionTask(Task):
    """The denoising objective for a model of any family: the family turns captions (and each item's
    size and crop) into the condition (``Family.training_condition``) of its denoising network (the role
    ``Family.network_role``: "unet", or SD3's "transformer")."""

    name = "diffusion"
    # whether the task's objective is ``per_sample_loss`` (which honours DENOISING_LOSS_OPTIONS); a task
    # with an objective of its own refuses those settings rather than ignore them
    uses_denoising_loss = True

    def __init__(self, config, components: Components, device: torch.device) -> None:
        super().__init__(config, components, device)
        refused = [name for name in DENOISING_LOSS_OPTIONS if getattr(config.diffusion, name)]
        if refused and not self.uses_denoising_loss:
            raise UserError(f"{self.name} training has its own objective: drop diffusion.{refused[0]}")
        self.family = components.family
        self.family.check_training(components.config)
        # the family's text encoders that this model has (SD3 may be loaded without T5)
        self.text_roles = tuple(role for role in self.family.text_roles if role in components.modules)
        self.network_role = self.family.network_role
        self.network = components.network.to(device)
        self.autoencoder = components.autoencoder.to(device).eval().requires_grad_(False)
        self.process = process_from_config(config.model.schedule)
        self.networks = {self.network_role: self.network}
        self.networks.update({role: components.modules[role].to(device) for role in self.text_roles})
        self.cached = False

    @property
    def unet(self) -> nn.Module:
        """The denoising network (named for the U-Net, which most tasks and tests train)."""
        return self.network

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        params = list(self.network.parameters())
        if self.config.diffusion.train_text_encoder:
            params += [p for role in self.text_roles for p in self.trained_text_parameters(role)]
        return {"model": params}

    def trained_text_parameters(self, role: str) -> list[nn.Parameter]:
        """A text encoder's weights, less those the family's conditioning never runs."""
        idle = self.family.idle_text_modules(self.components).get(role, ())
        network = self.networks[role]
        skipped = {id(p) for path in idle for p in network.get_submodule(path).parameters()}
        return [p for p in network.parameters() if id(p) not in skipped]

    def checkpoint_block_types(self) -> tuple[type[nn.Module], ...]:
        return (ResBlock, SpatialTransformer, JointBlock, EncoderLayer)

    # ------------------------------------------------------------------------------------- latents

    @torch.no_grad()
    def latents(self, batch: Batch, random: StepRandom) -> torch.Tensor:
        """Scaled latents z0 of the batch: a sample of q(z | x), from cached moments or a fresh encode."""
        x = batch.x.to(self.device)
        if self.cached:
            mean, std = x.float().chunk(2, dim=1)
        else:
            posterior = self.autoencoder.encode(x)
            mean, std = posterior.mean.float(), posterior.std.float()
        z = mean + std * random.randn(*mean.shape[1:], device=self.device)
        ae = self.config.model.autoencoder
        return (z - ae.shift_factor) * ae.scaling_factor

    def prepare_data(self, split: DataSplit, run_dir: Path, info: Distributed) -> DataSplit:
        """Latent caching: encode the training items once (rank 0), then train on their moments."""
        if not self.config.data.cache_latents:
            return split
        if split.source is None or split.train_indices is None:
            raise_cache_error(self.config.data.dataset)
        path = run_dir / LATENT_CACHE
        if info.is_main and not path.is_file():
            self._write_cache(split, path)
        barrier(info)
        cache = torch.load(path, map_location="cpu", weights_only=True)
        self.cached = True
        source = LatentSource(cache["moments"].float(), cache["captions"], cached_geometries(cache))
        return DataSplit(source, torch.arange(source.size).numpy(), split.holdout, split.holdout_indices)

    @torch.no_grad()
    def _write_cache(self, split: DataSplit, path: Path) -> None:
        from latentdiffusion.files import atomic_write

        prepare = Preparation(self.config.data.resolution, self.config.data.center_crop)
        order = StreamOrder(split.train_indices.tolist(), 0, shuffle=False)
        dataset = MicroBatches(split.source, order, prepare, self.config.batch_size)
        moments, captions, geometries = [], [], []
        for k in range(-(-len(split.train_indices) // self.config.batch_size)):
            batch = dataset[k]
            x = batch.x.to(self.device)
            posterior = self.autoencoder.encode(x)
            mean = refine_latents(self.autoencoder, posterior.mean, x, self.config.data.refine_latents)
            # float16 halves the cache; the moments only seed a fresh posterior sample each step
            moments.append(torch.cat([mean, posterior.std], dim=1).half().cpu())
            captions += batch.captions
            geometries += batch.geometry
        count = len(split.train_indices)
        state = {"moments": torch.cat(moments)[:count], "captions": captions[:count]}
        state |= geometry_tensors(geometries[:count])
        atomic_write(path, lambda tmp: torch.save(state, tmp))

    # -------------------------------------------------------------------------------------- losses

    def losses(
        self, modules: dict[str, nn.Module], batch: Batch, random: StepRandom, step: int
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        loss, logs = self.denoising_loss(modules, batch, random)
        return {"model": loss}, logs

    def denoising_loss(
        self,
        modules: dict[str, nn.Module],
        batch: Batch,
        random: StepRandom,
        weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        loss = self.per_sample_loss(modules, batch, random, weights).mean()
        return loss, {"loss": loss.item()}

    def per_sample_loss(
        self,
        modules: dict[str, nn.Module],
        batch: Batch,
        random: StepRandom,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The denoising loss of each item [n] (min-SNR weighted when set); ``weights`` (broadcast to the
        latent [n, C, h, w]) weight the squared error of each latent element."""
        z0 = self.latents(batch, random)  # [n, C, h, w]
        conditioning = self.extra_conditioning(batch, z0, random)
        t = self.timesteps(random)  # [n]
        eps = random.randn(*z0.shape[1:], device=self.device)
        offset = self.config.diffusion.offset_noise
        if offset:
            eps = eps + offset * random.randn(z0.shape[1], 1, 1, device=self.device)
        z_t = self.process.add_noise(z0, self.perturbed(eps, random), t)
        prediction_type = self.config.model.schedule.prediction_type
        target = self.process.training_target(prediction_type, z0, eps, t)
        cond = self.condition(modules, batch)
        prediction = modules[self.network_role](
            torch.cat([z_t, *conditioning.channels], dim=1),
            self.process.network_timestep(t),
            **cond,
            **conditioning.kwargs,
        )
        error = (prediction.float() - target.float()).pow(2)
        per_sample = (error if weights is None else error * weights).mean(dim=(1, 2, 3))  # [n]
        gamma = self.config.diffusion.min_snr_gamma
        if gamma is not None:
            per_sample = per_sample * min_snr_weight(self.process.alphas_cumprod(t), gamma, prediction_type)
        if self.config.diffusion.pixel_weight:
            per_sample = per_sample + self.config.diffusion.pixel_weight * self.pixel_loss(
                batch, z_t, prediction, t
            )
        return per_sample

    def perturbed(self, eps: torch.Tensor, random: StepRandom) -> torch.Tensor:
        """The noise that makes the network's input: ``eps`` plus ``diffusion.input_perturbation`` times
        fresh noise, while the target stays ``eps``'s (Ning et al. 2023). At sampling time the network sees
        latents its own earlier steps got slightly wrong; trained on such inputs it learns to correct
        them (exposure bias)."""
        gamma = self.config.diffusion.input_perturbation
        if not gamma:
            return eps
        return eps + gamma * random.randn(*eps.shape[1:], device=self.device)

    def pixel_loss(
        self, batch: Batch, z_t: torch.Tensor, prediction: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """Per item [n]: the first stage's reconstruction loss (``autoencoder_loss``'s edge-weighted L1 and
        gradient terms) between the image and its x0 prediction decoded by the frozen autoencoder, for the
        items noised below ``diffusion.pixel_max_timestep`` (0 for the others). A latent MSE scores little
        of what the eye and a flat image's corners depend on; this term scores it in pixels, where the
        low-noise steps that finish an image decide it."""
        losses = torch.zeros(len(t), device=self.device)
        chosen = (t < self.config.diffusion.pixel_max_timestep).nonzero().flatten()
        if len(chosen) == 0:
            return losses
        alpha_bar = self.process.alphas_cumprod(t[chosen]).view(-1, 1, 1, 1).to(self.device)
        prediction_type = self.config.model.schedule.prediction_type
        x0, _ = vp_x0_eps(prediction_type, z_t[chosen].float(), prediction[chosen].float(), alpha_bar)
        dtype = next(self.autoencoder.parameters()).dtype
        images = self.autoencoder.from_latent(x0.to(dtype)).float()
        x = batch.x.to(self.device)[chosen].float()
        cfg = self.config.autoencoder_loss
        terms = [reconstruction_loss(x[i : i + 1], images[i : i + 1], cfg) for i in range(len(chosen))]
        return losses.index_put((chosen,), torch.stack(terms))

    def timesteps(self, random: StepRandom) -> torch.Tensor:
        """Training times [n] of the process (whole timesteps uniform for discrete VP, logit-normal t for
        flow), shifted towards high noise by ``diffusion.timestep_shift``."""
        return self.process.training_times(random, self.config.diffusion.timestep_shift, self.device)

    def extra_conditioning(self, batch: Batch, z0: torch.Tensor, random: StepRandom) -> Conditioning:
        """What the U-Net takes besides the noisy latent, time and text: none for text-to-image."""
        return Conditioning()

    def condition(self, modules: dict[str, nn.Module], batch: Batch) -> Cond:
        """The family's cond dict for the batch, through the (DDP-wrapped) text encoders when they train."""
        requests = self.condition_requests(batch)
        if self.config.diffusion.train_text_encoder:
            encoders = self.components.with_modules(**{role: modules[role] for role in self.text_roles})
            return self.family.training_condition(encoders, batch.captions, requests)
        with torch.no_grad():
            return self.family.training_condition(self.components, batch.captions, requests)

    def condition_requests(self, batch: Batch) -> list[ConditioningRequest]:
        """Per item: the target size is the training resolution; the original size and crop are the
        source image's where the data knows them, else (by ``MicroConditioning``'s defaults) the
        training resolution and (0, 0)."""
        side = self.config.data.resolution
        geometry = batch.geometry or [None] * len(batch)
        return [ConditioningRequest(side, side, micro_conditioning(g)) for g in geometry]

    # ---------------------------------------------------------------------------------- evaluation

    @torch.no_grad()
    def evaluate(self, batches: Sequence[Batch]) -> dict[str, float]:
        """Held-out denoising loss with fixed noise and timesteps (comparable across evaluations)."""
        if not batches:
            return {}
        modules = dict(self.networks)
        cached, self.cached = self.cached, False  # held-out items are pixels
        losses = []
        try:
            for i, batch in enumerate(batches):
                random = StepRandom(
                    self.config.seed, EVAL_SEED_OFFSET + i, len(batch), torch.arange(len(batch))
                )
                losses.append(self.held_out_loss(modules, batch, random).item())
        finally:
            self.cached = cached
        return {"loss": sum(losses) / len(losses)}

    def held_out_loss(self, modules: dict[str, nn.Module], batch: Batch, random: StepRandom) -> torch.Tensor:
        """The scalar loss ``evaluate`` averages over the held-out batches: the task's training objective."""
        return self.denoising_loss(modules, batch, random)[0]

    def components_for_sampling(self) -> Components:
        """A copy of the model in eval mode (the caller has applied the EMA weights)."""
        modules = {
            self.network_role: copy.deepcopy(_unwrapped(self.network)),
            "autoencoder": self.autoencoder,
        }
        modules.update({role: copy.deepcopy(_unwrapped(self.networks[role])) for role in self.text_roles})
        return Components(
            self.config.model, modules, dict(self.components.tokenizers), self.config.name
        ).eval()

    @torch.no_grad()
    def sample_grid(self, batches: Sequence[Batch]) -> Image.Image | None:
        """One image per fixed prompt, fixed seeds: the same grid at every step shows progress."""
        from latentdiffusion.pipelines.pipeline import Pipeline

        options = self.config.sample
        if not options.prompts:
            return None
        pipe = Pipeline(self.components_for_sampling())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.config.seed, 1))
            images = pipe.generate(
                list(options.prompts),
                steps=options.steps,
                guidance_scale=options.guidance_scale,
                sampler=options.sampler,
                seed=options.seed,
                width=self.config.data.resolution,
                height=self.config.data.resolution,
            )
        return image_grid(images, columns=min(len(images), 8))

    def export(self, path: Path, batches: Sequence[Batch]) -> Components:
        components = self.components_for_sampling()
        save_native(components, path)
        return components


def _unwrapped(module: nn.Module) -> nn.Module:
    """The network without activation-checkpoint wrappers (so that a copy runs at full speed)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    clone = module
    if any(isinstance(m, CheckpointWrapper) for m in module.modules()):
        clone = copy.deepcopy(module)
        for parent in list(clone.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, CheckpointWrapper):
                    setattr(parent, name, child._checkpoint_wrapped_module)
    return clone


def micro_conditioning(geometry: Geometry | None) -> MicroConditioning:
    if geometry is None:
        return MicroConditioning()
    return MicroConditioning(
        original_size=geometry.original_size, crops_coords_top_left=geometry.crop_top_left
    )


def geometry_tensors(geometries: Sequence[Geometry | None]) -> dict[str, torch.Tensor]:
    """The cache's record of the items' geometry ([N, 2] original sizes and crops), if all are known."""
    if not geometries or any(g is None for g in geometries):
        return {}
    return {
        "original_sizes": torch.tensor([g.original_size for g in geometries]),
        "crops": torch.tensor([g.crop_top_left for g in geometries]),
    }


def cached_geometries(cache: dict) -> list[Geometry] | None:
    if "original_sizes" not in cache:  # a cache written before geometry was recorded
        return None
    pairs = zip(cache["original_sizes"].tolist(), cache["crops"].tolist(), strict=True)
    return [Geometry(tuple(size), tuple(crop)) for size, crop in pairs]


def raise_cache_error(dataset: str) -> None:
    raise UserError(
        f"data.cache_latents needs a finite data set; {dataset} is "
        + ("streamed from tar shards" if dataset == "webdataset" else "infinite: set data.size")
    )


REFINE_LR = 0.05  # Adam's step on the (unscaled) latent; the encoder's latents have entries of about 1


def refine_latents(autoencoder: nn.Module, mean: torch.Tensor, x: torch.Tensor, steps: int) -> torch.Tensor:
    """``mean`` [N, C, h, w] moved by ``steps`` Adam steps on the decoder's mean squared error to the images
    ``x`` (the autoencoder stays as it is). An encoder trained on a narrow data set can map an image it
    never saw (a colour outside its training palette) to a latent that its decoder draws differently,
    while the decoder can still draw that image from a nearby latent; training on the refined latents
    teaches what decodes to the images, not what the encoder made of them."""
    if steps == 0:
        return mean
    z = mean.detach().float().clone().requires_grad_(True)
    optimiser = torch.optim.Adam([z], lr=REFINE_LR)
    with torch.enable_grad():
        for _ in range(steps):
            loss = (autoencoder.decode(z.to(mean.dtype)).float() - x.float()).pow(2).mean()
            (z.grad,) = torch.autograd.grad(loss, z)
            optimiser.step()
    return z.detach().to(mean.dtype)
