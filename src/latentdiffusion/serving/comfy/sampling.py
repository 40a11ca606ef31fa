"""ComfyUI's KSampler and KSamplerAdvanced (``nodes.common_ksampler``) over our denoiser, guidance and
samplers.

As ComfyUI counts them: ``denoise`` d < 1 runs the last ``steps`` levels of a ``int(steps / d)``-step
schedule (img2img's noise level); KSamplerAdvanced runs levels ``start_at_step`` to ``end_at_step`` of
``steps`` and, unless it returns the leftover noise, ends that part at sigma 0. The noise is one CPU
draw from ``torch.manual_seed(seed)`` of the whole batch's latent shape (ComfyUI's ``prepare_noise``),
added to the latent at the first level: ``x = latent + sigma_0 * noise``, or ``sqrt(1 + sigma_0^2)``
for a run from the table's top level. On a discrete VP model the levels are ComfyUI's own for each
scheduler name (``comfy.schedulers``); a flow model and LCM keep the library's levels for the name's
counterpart (``names.SCHEDULERS``, ``pipelines.sampling.start_scale``). A latent with a noise mask
is inpainted by replacing its known region at every level (``pipelines.inpaint.KnownRegionDenoiser``,
as ComfyUI's ``KSamplerX0Inpaint``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from latentdiffusion.components import Components
from latentdiffusion.diffusion.denoiser import Denoiser
from latentdiffusion.diffusion.noise import seeded_generators
from latentdiffusion.diffusion.schedules import table_timestep
from latentdiffusion.errors import UserError
from latentdiffusion.families import ConditioningRequest
from latentdiffusion.pipelines.inpaint import KnownRegionDenoiser
from latentdiffusion.pipelines.sampling import (
    SAMPLER_SEED_OFFSET,
    SamplingOptions,
    eps_scaled,
    full_sigmas,
    guide,
    network_denoiser,
    start_scale,
    step_callback,
)
from latentdiffusion.samplers import GRID_SAMPLERS, sample
from latentdiffusion.serving.comfy import names
from latentdiffusion.serving.comfy.schedulers import comfy_sigmas, comfy_start_scale
from latentdiffusion.serving.comfy.values import Conditioning, Latent, Model

MAX_SCHEDULE = 10000  # steps / denoise may not ask for a longer schedule than ComfyUI's step limit
SEED_RANGE = 2**64  # ComfyUI's seeds are unsigned 64-bit; torch generators take the same range


@dataclass(frozen=True)
class Sampling:
    """One sampler node's settings."""

    seed: int
    steps: int
    cfg: float
    sampler_name: str
    scheduler: str
    denoise: float = 1.0
    add_noise: bool = True
    start: int | None = None  # KSamplerAdvanced's start_at_step / end_at_step
    end: int | None = None
    force_full_denoise: bool = False


@dataclass(frozen=True)
class Schedule:
    """The levels a sampler node runs: from the top of the schedule or not, to its end or cut short."""

    sigmas: torch.Tensor
    top: bool  # starts at the schedule's first level: the start scale of a run from pure noise
    cut: bool  # ends before the schedule does, with the leftover noise kept


def schedule(components: Components, options: SamplingOptions, setting: Sampling) -> Schedule:
    """The levels to run, as ComfyUI cuts them for ``denoise`` and KSamplerAdvanced's steps."""
    if setting.denoise < 1:
        total = int(setting.steps / setting.denoise) if setting.denoise > 0 else 0
        if total > MAX_SCHEDULE:
            raise UserError(
                f"steps / denoise asks for a schedule of {total} steps; the limit is {MAX_SCHEDULE}"
            )
        if total < 1:
            return Schedule(torch.zeros(1), False, False)
        sigmas = levels(components, _with_steps(options, total), setting.scheduler)
        return Schedule(sigmas[-(setting.steps + 1) :], total == setting.steps, False)
    sigmas = levels(components, options, setting.scheduler)
    cut = False
    if setting.end is not None and setting.end < len(sigmas) - 1:
        sigmas = sigmas[: setting.end + 1].clone()
        cut = not setting.force_full_denoise
        if setting.force_full_denoise:
            sigmas[-1] = 0
    start = setting.start or 0
    if start >= len(sigmas) - 1:
        return Schedule(sigmas[-1:], False, cut)
    return Schedule(sigmas[start:], start == 0, cut)


def table_levels(components: Components, options: SamplingOptions) -> bool:
    """Whether the run takes ComfyUI's table levels: a discrete VP model, any sampler but LCM (which
    keeps its distillation timesteps)."""
    return components.process.name == "discrete" and options.sampler not in GRID_SAMPLERS


def levels(components: Components, options: SamplingOptions, scheduler: str) -> torch.Tensor:
    """The whole schedule's levels: ComfyUI's own on a discrete model (``comfy.schedulers``), else the
    model's levels for the discretisation the name maps to."""
    if table_levels(components, options):
        return comfy_sigmas(scheduler, components.process.schedule.sigmas, options.steps)
    return full_sigmas(components, options)


def _with_steps(options: SamplingOptions, steps: int) -> SamplingOptions:
    return replace(options, steps=steps)


def sampling_options(model: Model, setting: Sampling) -> SamplingOptions:
    components = model.components
    choice = names.SAMPLERS[setting.sampler_name]
    return SamplingOptions(
        steps=setting.steps,
        sampler=choice.name,
        sigmas=names.discretisation(setting.scheduler, components.process.name),
        guidance_scale=setting.cfg,
        guidance_min_sigma=components.config.guidance_min_sigma,
        grid=components.config.schedule,  # LCM's boundary scalings need the training schedule
        eps_scaling=model.eps_scaling,  # the Epsilon Scaling node's, as ComfyUI (not the model's default)
    )


class TableTimestepDenoiser(Denoiser):
    """The Denoiser with ComfyUI's network timestep: the table entry nearest to sigma in float32 log
    sigma (``ModelSamplingDiscrete.timestep``). Rounding the interpolated timestep picks the same entry
    except at exact midpoints (e.g. "sgm_uniform" with 6 steps visits t = 832.5), where ComfyUI's float32
    distances decide."""

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return table_timestep(self.schedule.sigmas, sigma).to(sigma.dtype)


def _network_denoiser(components: Components, options: SamplingOptions) -> Denoiser:
    if not table_levels(components, options):
        return network_denoiser(components, options)
    return TableTimestepDenoiser(
        components.network,
        components.process,
        components.config.schedule.prediction_type,
        dtype=components.dtype,
    )


def _start_scale(components: Components, options: SamplingOptions, run: Schedule) -> float:
    sigma_0 = float(run.sigmas[0])
    if table_levels(components, options):
        return comfy_start_scale(sigma_0, components.process.schedule.sigmas)
    return start_scale(components, options, run.sigmas) if run.top else sigma_0


def noise_like(shape: torch.Size, seed: int) -> torch.Tensor:
    """ComfyUI's noise: one CPU draw of the whole batch from ``seed``."""
    generator = torch.Generator().manual_seed(seed % SEED_RANGE)
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)


def encode(
    positive: Conditioning,
    negative: Conditioning,
    batch: int,
    width: int,
    height: int,
    use_clip: Callable[[Conditioning], None],
) -> tuple[dict, dict]:
    """(cond, uncond) for ``batch`` images, each prompt encoded by its own CLIP (its LoRAs, its last
    layer) as the model's family encodes prompts."""
    request = ConditioningRequest(height, width)
    prompts, negatives = [positive.text] * batch, [negative.text] * batch
    use_clip(positive)
    clip = positive.clip.components
    cond, uncond = clip.family.encode(clip, prompts, negatives, request)
    if negative.clip != positive.clip:
        use_clip(negative)
        clip = negative.clip.components
        _, uncond = clip.family.encode(clip, prompts, negatives, request)
    return cond, uncond


def resized_mask(mask: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """A noise mask [N or 1, 1, H, W] at the latent's size and batch (bilinear, as ComfyUI)."""
    mask = mask.to(latents.device, torch.float32)
    if mask.ndim == 3:
        mask = mask[:, None]
    mask = F.interpolate(mask, size=latents.shape[-2:], mode="bilinear", align_corners=False)
    if mask.shape[0] != latents.shape[0]:
        mask = mask[:1].expand(latents.shape[0], -1, -1, -1)
    return mask.clamp(0, 1)


@torch.inference_mode()
def ksample(
    model: Model,
    positive: Conditioning,
    negative: Conditioning,
    latent: Latent,
    setting: Sampling,
    *,
    use_clip: Callable[[Conditioning], None],
    use_model: Callable[[Model], None],
    controlled: Callable[..., Components],
    callback: Callable[..., None] | None,
) -> torch.Tensor:
    """The sampled latent [N, C, h, w]: noise-free, or at its last level when the leftover noise is kept."""
    components = model.components
    options = sampling_options(model, setting)
    options.validate()
    latents = latent.resolve(components).to(components.device, torch.float32)
    run = schedule(components, options, setting)
    sigmas = run.sigmas
    if len(sigmas) < 2:
        return latents
    batch, width, height = latents.shape[0], latent.width, latent.height
    cond, uncond = encode(positive, negative, batch, width, height, use_clip)
    use_model(model)
    noise = noise_like(latents.shape, setting.seed).to(latents.device)
    if not setting.add_noise:
        noise = torch.zeros_like(noise)
    scale = _start_scale(components, options, run)
    x = latents + noise * scale
    network = controlled(components, positive, options, sigmas, width, height, batch)
    denoiser = guide(_network_denoiser(network, options), cond, uncond, options)
    denoiser = eps_scaled(denoiser, options.eps_scaling)
    mask = None
    if latent.noise_mask is not None:
        mask = resized_mask(latent.noise_mask, latents)
        denoiser = KnownRegionDenoiser(denoiser, latents, noise, mask, float(sigmas[0]))
    seeds = [(setting.seed + SAMPLER_SEED_OFFSET + i) % SEED_RANGE for i in range(batch)]
    choice = names.SAMPLERS[setting.sampler_name]
    x = sample(
        choice.name,
        denoiser,
        x,
        sigmas.to(x.device),
        generator=seeded_generators(seeds),
        callback=step_callback(callback, len(sigmas) - 1),
        **choice.options,
    )
    if not run.cut:  # DDIM and PLMS may end at sigma(t = 0), not at 0
        x = components.process.to_unit_scale(x, sigmas[-1])
    return x if mask is None else mask * x + (1 - mask) * latents
