"""What every pipeline does between text states and a decoded image: sampling options, the network
denoiser, classifier-free guidance and the sampler run (Rombach et al. 2022, Sec. 3.3; Ho & Salimans 2022).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from latentdiffusion.components import Components
from latentdiffusion.config import EPS_SCALING_RANGE, ModelConfig, ScheduleConfig
from latentdiffusion.diffusion.denoiser import Denoiser
from latentdiffusion.diffusion.guidance import ClassifierFreeGuidance, ComposedGuidance, SkipLayerGuidance
from latentdiffusion.diffusion.noise import randn_like, seeded_generators
from latentdiffusion.diffusion.process import NoiseProcess
from latentdiffusion.diffusion.schedules import (
    SPACINGS,
    TABLE_DISCRETISATION_NAMES,
    NoiseSchedule,
    to_unit_scale,
)
from latentdiffusion.errors import UserError
from latentdiffusion.pipelines.prompt_conditioning import PromptConditioning
from latentdiffusion.samplers import GRID_SAMPLERS, SAMPLERS, sample

StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]  # (step, steps, x, x0)
ConditionalDenoiser = Callable[..., torch.Tensor]  # (x, sigma, **cond) -> x0
GuidedDenoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, sigma) -> x0

# Stochastic samplers draw from a generator of their own, so their noise is not the starting noise again.
SAMPLER_SEED_OFFSET = 0x5EED
RESTART_SEED_OFFSET = 0x2E57  # restart sampling's fresh noise: streams of its own as well
MAX_RESTART_TIMES = 10
DISCRETISATIONS = ("karras", "exponential", *SPACINGS, *TABLE_DISCRETISATION_NAMES)


@dataclass(frozen=True)
class SamplingOptions:
    """How to integrate: sampler, number of steps, discretisation and guidance."""

    steps: int = 20
    sampler: str = "dpmpp_2m"
    # None: the model's default, else its schedule's own timestep spacing; or "karras", "exponential", or a
    # timestep spacing ("leading", "trailing", "linspace")
    sigmas: str | None = None
    guidance_scale: float = 7.5
    guidance_rescale: float = 0.0
    eta: float | None = None  # ddim: 0 is deterministic, 1 is DDPM-like; tcd: its gamma (0.3 unset)
    guidance_min_sigma: float = 0.0  # guide only at sigma >= this (ClassifierFreeGuidance.min_sigma)
    round_timesteps: bool = True  # False: fractional network timesteps off the training grid (Denoiser)
    skip_layer_guidance: SkipLayerGuidance | None = None  # made for_schedule (pipelines.request)
    grid: ScheduleConfig | None = None  # the model's training schedule, for LCM and TCD (model_options)
    # an LCM-distilled U-Net's time_cond_proj_dim: the guidance scale enters as its embedding (guide)
    guidance_embedding: int | None = None
    # Restart sampling (Xu et al. 2023): before the last step, noise the latent back up to the level
    # ``restart_steps`` steps earlier and integrate those steps again, ``restart_times`` times (0: off)
    restart_steps: int = 0
    restart_times: int = 1
    # Epsilon scaling (Ning et al. 2024): the guided noise estimate x - x0 is divided by this at every step
    # (``eps_scaled``); 1 = off
    eps_scaling: float = 1.0

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
        if not (math.isfinite(self.guidance_min_sigma) and self.guidance_min_sigma >= 0):
            raise UserError(
                f"guidance_min_sigma must be a finite number >= 0, got {self.guidance_min_sigma!r}"
            )
        if self.eta is not None and not (math.isfinite(self.eta) and self.eta >= 0):
            raise UserError(f"eta must be a finite number >= 0, got {self.eta!r}")
        if self.sampler == "tcd" and self.eta is not None and self.eta > 1:
            raise UserError(f"the tcd sampler's eta (TCD's gamma) must be between 0 and 1, got {self.eta!r}")
        low, high = EPS_SCALING_RANGE
        scaling = self.eps_scaling
        if isinstance(scaling, bool) or not isinstance(scaling, int | float) or not low <= scaling <= high:
            raise UserError(f"eps_scaling must be a number from {low} to {high} (1 = off), got {scaling!r}")
        if not isinstance(self.round_timesteps, bool):
            raise UserError(f"round_timesteps must be True or False, got {self.round_timesteps!r}")
        if self.skip_layer_guidance is not None:
            self.skip_layer_guidance.validate()
        self.validate_restart()

    def validate_restart(self) -> None:
        steps, times = self.restart_steps, self.restart_times
        if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps < self.steps:
            raise UserError(
                f"restart steps must be a whole number from 0 (off) to steps - 1 ({self.steps - 1}), "
                f"got {steps!r}"
            )
        if isinstance(times, bool) or not isinstance(times, int) or not 1 <= times <= MAX_RESTART_TIMES:
            raise UserError(
                f"restart times must be a whole number from 1 to {MAX_RESTART_TIMES}, got {times!r}"
            )
        if steps and self.grid is not None and self.grid.process != "discrete":
            raise UserError(
                "restart sampling noises the latent as a discrete-schedule model's sampler holds it "
                "(SD 1.x/2.x/XL, the shapes models); flow models (SD3) do not take it"
            )

    def sampler_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {}
        if self.eta is not None and self.sampler in ("ddim", "tcd"):
            options["eta"] = self.eta
        if self.sampler in GRID_SAMPLERS and self.grid is not None and self.grid.process == "discrete":
            options["schedule"] = NoiseSchedule.from_config(self.grid)
        elif self.sampler == "tcd":
            raise UserError("the tcd sampler steps on a discrete training schedule; flow models have none")
        return options


def model_options(
    config: ModelConfig,
    steps: int | None,
    sampler: str | None,
    sigmas: str | None,
    guidance_scale: float | None,
    guidance_rescale: float = 0.0,
    eta: float | None = None,
    *,
    round_timesteps: bool = True,
    restart: tuple[int, int] = (0, 1),
    eps_scaling: float | None = None,
) -> SamplingOptions:
    """Sampling options where every unset (None) steps, sampler, guidance scale or epsilon scaling is the
    model's own default (``ModelConfig.default_*``: 20 steps, DPM++ 2M, 7.5 and 1 (off) for Stable
    Diffusion; the shipped shapes model records its own); unset sigmas fall back to the model's later, in
    ``discretisation``; the guidance interval is the model's (``ModelConfig.guidance_min_sigma``);
    ``restart`` is restart sampling's (steps, times), (0, 1) off."""
    return SamplingOptions(
        config.default_steps if steps is None else steps,
        config.default_sampler if sampler is None else sampler,
        sigmas,
        config.default_guidance_scale if guidance_scale is None else guidance_scale,
        guidance_rescale,
        eta,
        config.guidance_min_sigma,
        round_timesteps,
        grid=config.schedule,
        guidance_embedding=getattr(getattr(config, "unet", None), "time_cond_proj_dim", None),
        restart_steps=restart[0],
        restart_times=restart[1],
        eps_scaling=config.default_eps_scaling if eps_scaling is None else eps_scaling,
    )


def discretisation(components: Components, options: SamplingOptions) -> str | None:
    """The noise-level discretisation to use: the one asked for, else the model's default (a diffusers
    folder's ``use_karras_sigmas`` sets "karras"), else None, the schedule's own timestep spacing."""
    return options.sigmas if options.sigmas is not None else components.config.default_sigmas


def full_sigmas(components: Components, options: SamplingOptions) -> torch.Tensor:
    """The noise levels of the whole run, as the model's noise process spaces them for the sampler."""
    kind = discretisation(components, options)
    process = components.process
    if process.name == "flow" and kind in SPACINGS:
        raise UserError(
            f"sigmas={kind!r} is a timestep spacing of discrete-schedule models; a flow model takes its own "
            "(leave sigmas unset), 'karras' or 'exponential'"
        )
    try:
        return process.sampling_sigmas(options.steps, options.sampler, kind)
    except ValueError as error:
        raise UserError(str(error)) from None


def start_scale(components: Components, options: SamplingOptions, sigmas: torch.Tensor) -> float:
    """The factor from unit-variance noise to the starting VE latent, as the diffusers scheduler with the
    spacing asked for (or the model's own) scales it (``NoiseProcess.initial_noise_scale``)."""
    kind = discretisation(components, options)
    return components.process.initial_noise_scale(sigmas, options.sampler, kind)


def from_unit_scale(
    components: Components, latents: torch.Tensor, sigma: torch.Tensor | float
) -> torch.Tensor:
    """A network-scale latent at noise level ``sigma`` -> the VE latent a sampler starts from."""
    return components.process.from_unit_scale(latents, sigma)


def switch_step(components: Components, options: SamplingOptions, sigmas: torch.Tensor, switch: float) -> int:
    """How many steps of ``sigmas`` come before the switch at ``switch`` (0..1) of the schedule: those
    whose network timestep is at least ``round((1 - switch) * T)``, as diffusers' SDXL pipelines cut the
    schedule for ``denoising_end`` (the steps before) and ``denoising_start`` (the steps after)."""
    process = components.process
    T = process.num_train_timesteps
    cutoff = round(T - switch * T)
    if process.name == "discrete":
        t = process.schedule.sigma_to_t(sigmas[:-1].double())  # float64: whole timesteps stay whole
        t = t.round() if options.round_timesteps else t.round(decimals=4)
    else:
        t = process.timestep(sigmas[:-1].double()).double().round(decimals=4)
    return int((t >= cutoff).sum())


def network_denoiser(components: Components, options: SamplingOptions) -> Denoiser:
    """D(x, sigma, **cond) -> x0 around the model's denoising network and noise process; the sampler stays
    in float32 while the network may run in reduced precision. A discrete-schedule network gets whole
    training timesteps unless ``options.round_timesteps`` is off (see ``Denoiser`` for which other tools
    do which); a flow network gets t * T."""
    prediction_type = components.config.schedule.prediction_type
    return Denoiser(
        components.network,
        components.process,
        prediction_type,
        round_timesteps=options.round_timesteps,
        dtype=components.dtype,
    )


def guide(
    denoiser: ConditionalDenoiser,
    cond: Mapping[str, torch.Tensor] | PromptConditioning,
    uncond: Mapping[str, torch.Tensor] | PromptConditioning,
    options: SamplingOptions,
    extra_cond: Mapping[str, torch.Tensor] | None = None,
) -> ClassifierFreeGuidance | ComposedGuidance:
    """Classifier-free guidance over ``denoiser`` between the family's ``cond`` and ``uncond`` (text
    context, pooled vector, ...); ``extra_cond`` (concat channels, class labels) goes to both passes.
    A ``PromptConditioning`` (prompt editing, alternation, ``AND``: ``Request.conditioning``) gives
    ``ComposedGuidance``, which ``integrate`` places on its run's steps.

    An LCM-distilled U-Net (``options.guidance_embedding``) takes the guidance scale w as an embedding
    of w - 1 (``timestep_cond``) in one conditional pass, as diffusers' LatentConsistencyModelPipeline."""
    if options.guidance_embedding is not None:
        return _embedded_guidance(denoiser, cond, options, extra_cond)
    if isinstance(cond, PromptConditioning):
        return ComposedGuidance(
            denoiser,
            cond,
            options.guidance_scale,
            options.guidance_rescale,
            min_sigma=options.guidance_min_sigma,
            skip_layer_guidance=options.skip_layer_guidance,
            extra_cond=extra_cond,
        )
    return ClassifierFreeGuidance(
        denoiser,
        {**cond, **(extra_cond or {})},
        {**uncond, **(extra_cond or {})},
        options.guidance_scale,
        options.guidance_rescale,
        min_sigma=options.guidance_min_sigma,
        skip_layer_guidance=options.skip_layer_guidance,
    )


def _embedded_guidance(
    denoiser: ConditionalDenoiser,
    cond: Mapping[str, torch.Tensor] | PromptConditioning,
    options: SamplingOptions,
    extra_cond: Mapping[str, torch.Tensor] | None,
) -> ClassifierFreeGuidance:
    from latentdiffusion.models.unet import guidance_embedding

    if isinstance(cond, PromptConditioning):
        raise UserError(
            "prompt editing, alternation and AND need guidance passes that an LCM-distilled model has not"
        )
    context = cond["context"]
    w = torch.full((context.shape[0],), options.guidance_scale - 1.0, device=context.device)
    extra = {**(extra_cond or {}), "timestep_cond": guidance_embedding(w, options.guidance_embedding)}
    return ClassifierFreeGuidance(denoiser, {**cond, **extra}, {**cond, **extra}, 1.0, 0.0)


def eps_scaled(denoiser: GuidedDenoiser, factor: float) -> GuidedDenoiser:
    """Epsilon scaling (Ning et al. 2024, "Elucidating the exposure bias in diffusion models"; ComfyUI's
    Epsilon Scaling node): the guided x0 estimate becomes x - (x - x0) / ``factor``, i.e. the noise the
    network sees in x is scaled by 1 / factor; > 1 keeps more of x (the paper's setting), < 1 removes
    more. With a zero-terminal-SNR schedule most of its effect is at the first step, whose noise level is
    huge: the next latent then holds less noise than its level says, so the first estimate weighs more."""
    if factor == 1:
        return denoiser

    def scaled(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return x - (x - denoiser(x, sigma)) / factor

    return scaled


def integrate(
    denoiser: GuidedDenoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    options: SamplingOptions,
    seeds: Sequence[int],
    callback: StepCallback | None = None,
    *,
    steps_before: int = 0,
    total_steps: int | None = None,
    process: NoiseProcess | None = None,
) -> torch.Tensor:
    """Run the sampler from ``x`` (a VE latent at ``sigmas[0]``) and return the network-scale latent
    (``process``'s scale; the discrete VP scale when None: the same wherever sigmas end at 0).

    The callback counts steps from ``steps_before + 1`` of ``total_steps`` (default: these steps alone),
    for runs made of several parts (a base model, then a refiner)."""
    sigmas = sigmas.to(x.device)
    unit = process.to_unit_scale if process is not None else to_unit_scale
    if len(sigmas) < 2:
        return unit(x, sigmas[-1])
    generators = seeded_generators([int(seed) + SAMPLER_SEED_OFFSET for seed in seeds])
    total = total_steps if total_steps is not None else steps_before + len(sigmas) - 1
    denoiser = eps_scaled(bind_run(denoiser, sigmas, steps_before), options.eps_scaling)
    run = functools.partial(
        sample, options.sampler, denoiser, generator=generators, **options.sampler_options()
    )
    restart = restart_steps(sigmas, options)
    if not restart:
        x = run(x, sigmas, callback=step_callback(callback, total, steps_before))
    else:
        x = run(x, sigmas[:-1], callback=step_callback(callback, total, steps_before))
        x = restart_segments(run, x, sigmas[-2 - restart : -1], options.restart_times, seeds)
        x = run(x, sigmas[-2:], callback=step_callback(callback, total, steps_before + len(sigmas) - 2))
    warn_if_not_finite(x, options)
    return unit(x, sigmas[-1])


def restart_steps(sigmas: torch.Tensor, options: SamplingOptions) -> int:
    """How many steps each restart re-runs in a run over ``sigmas``: the options' restart steps, at most
    the steps before the last one (img2img runs fewer steps than the whole schedule); 0 where the run does
    not end at sigma 0 (the base model's part of a run that a refiner finishes: the refiner restarts)."""
    if not options.restart_steps or float(sigmas[-1]) != 0.0:
        return 0
    return min(options.restart_steps, len(sigmas) - 2)


def restart_segments(
    run: Callable[..., torch.Tensor], x: torch.Tensor, segment: torch.Tensor, times: int, seeds: Sequence[int]
) -> torch.Tensor:
    """Restart sampling (Xu et al. 2023, "Restart Sampling for Improving Generative Processes"): ``times``
    times, add fresh noise that takes the VE latent ``x`` from the segment's last noise level up to its
    first (variance sigma_max^2 - sigma_min^2), then integrate the segment again. The noise of each
    image comes from a stream of its own seed, so a restarted image is reproducible."""
    sigma_max, sigma_min = float(segment[0]), float(segment[-1])
    scale = math.sqrt(sigma_max**2 - sigma_min**2)
    generators = seeded_generators([int(seed) + RESTART_SEED_OFFSET for seed in seeds])
    for _ in range(times):
        x = run(x + scale * randn_like(x, generators), segment, callback=None)
    return x


def bind_run(denoiser: GuidedDenoiser, sigmas: torch.Tensor, steps_before: int = 0) -> GuidedDenoiser:
    """A denoiser whose conditioning follows the steps (``ComposedGuidance``, or a wrapper that passes
    ``for_run`` on) placed on the run over ``sigmas`` starting at step ``steps_before``; any other
    denoiser as it is."""
    for_run = getattr(denoiser, "for_run", None)
    return for_run(sigmas, steps_before) if for_run is not None else denoiser


class NonFiniteWarning(UserWarning):
    """The sampler's output latent holds NaN or Inf: the decoded image will be black or noise."""


def warn_if_not_finite(x: torch.Tensor, options: SamplingOptions) -> None:
    """Warn (instead of saving a black image without a word) when the sampled latent is not finite:
    NaN or Inf in the weights or a LoRA, or a guidance scale so large that the guided step overflows.
    One reduction at the end of sampling, not a check per step."""
    if bool(torch.isfinite(x).all()):
        return
    warnings.warn(
        "the sampled latent holds NaN or Inf values, so the image will be black or noise: check the "
        f"guidance scale ({options.guidance_scale:g}), the prompt's weights, the model's weights and "
        "any LoRA",
        NonFiniteWarning,
        stacklevel=3,
    )


def step_callback(
    callback: StepCallback | None, steps: int, steps_before: int = 0
) -> Callable[..., None] | None:
    """Adapt a user callback (step counted from 1, total steps) to the samplers' (i, sigma, x, x0)."""
    if callback is None:
        return None

    def on_step(i: int, sigma: float, x: torch.Tensor, x0: torch.Tensor) -> None:
        callback(steps_before + i + 1, steps, x, x0)

    return on_step
