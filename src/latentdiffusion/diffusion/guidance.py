"""Classifier-free guidance (Ho & Salimans 2022) with optional guidance rescale (Lin et al. 2024) and
skip-layer guidance (SLG, Stability AI's SD3.5 reference sampling).

Guidance combines two predictions of one network, with and without the condition, in one batched
call. Because eps, v and x0 are affine in each other at fixed (x, sigma), combining x0 estimates is the
same as combining the network outputs. The rescale is not affine-invariant, so it is computed on the
network's own prediction type (eps or v), exactly as diffusers' ``rescale_noise_cfg`` does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from latentdiffusion.diffusion.parameterization import append_dims, prediction_to_x0, x0_to_prediction
from latentdiffusion.errors import UserError

ConditionalDenoiser = Callable[..., Tensor]  # (x, sigma, **cond) -> x0


def rescale_guidance(guided: Tensor, cond: Tensor, rescale: float) -> Tensor:
    """Lin et al. 2024, Sec. 3.4, Eq. 15-16: match the per-sample std of the guided prediction to the
    conditional one, then blend with weight ``rescale`` (std over all dimensions but the batch)."""
    dims = list(range(1, guided.ndim))
    std_cond = cond.std(dim=dims, keepdim=True)
    std_guided = guided.std(dim=dims, keepdim=True)
    return rescale * guided * (std_cond / std_guided) + (1 - rescale) * guided


def _batch_conditions(uncond: Mapping[str, Any], cond: Mapping[str, Any]) -> dict[str, Any]:
    """uncond and cond entries stacked on the batch dimension (uncond first); non-tensors pass through."""
    if set(uncond) != set(cond):
        raise ValueError(f"cond and uncond need the same entries, got {sorted(cond)} and {sorted(uncond)}")
    return {k: torch.cat([uncond[k], cond[k]]) if isinstance(cond[k], Tensor) else cond[k] for k in cond}


@dataclass(frozen=True)
class SkipLayerGuidance:
    """Skip-layer guidance: x0 += scale * (x0_cond - x0_cond_without_layers), pushing the guided estimate
    away from what the conditional pass gives with the transformer blocks ``layers`` left out (SD3.5
    Medium: blocks 7, 8, 9 at scale 2.8), as diffusers' StableDiffusion3Pipeline does with
    ``skip_guidance_layers``, ``skip_layer_guidance_scale``, ``_start`` and ``_stop``.

    It acts on step i of a run of n steps when ``start * n < i < stop * n`` (i from 0, both bounds
    strict), and only on steps that classifier-free guidance runs on. The guidance wrapper knows noise
    levels, not step numbers, so ``for_schedule`` turns those steps into the interval of noise levels
    they start from (``noise_levels``, lowest and highest); a sampler's intermediate evaluations inside that
    interval get it too. Diffusers adds the term to the combined velocity; the velocity (like eps and v)
    is affine in x0 at fixed (x, sigma) and the term's weights sum to zero, so adding it to the x0
    estimates gives the same step.
    """

    layers: tuple[int, ...] = (7, 8, 9)
    scale: float = 2.8
    start: float = 0.01
    stop: float = 0.2
    noise_levels: tuple[float, float] | None = None  # the sigmas it acts on (lowest, highest): for_schedule

    def validate(self) -> None:
        layers = self.layers
        if not isinstance(layers, tuple | list) or not layers:
            raise UserError(f"skip-layer guidance needs at least one layer (block index), got {layers!r}")
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
            raise UserError(f"skip-layer guidance layers must be block indices >= 0, got {list(layers)!r}")
        for name in ("scale", "start", "stop"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise UserError(f"skip-layer guidance {name} must be a finite number, got {value!r}")
        if not 0 <= self.start < self.stop <= 1:
            raise UserError(
                "skip-layer guidance start and stop are fractions of the steps with 0 <= start < stop <= 1, "
                f"got {self.start} and {self.stop}"
            )

    def steps(self, n: int) -> range:
        """The indices i of the n steps it acts on: ``start * n < i < stop * n``."""
        first = math.floor(self.start * n) + 1
        last = math.ceil(self.stop * n) - 1
        return range(first, max(first, min(last, n - 1) + 1))

    def for_schedule(self, sigmas: Tensor) -> SkipLayerGuidance | None:
        """This guidance for a run over ``sigmas`` [n + 1] (descending): with the noise levels of the
        steps it acts on, or None when it acts on none."""
        active = self.steps(len(sigmas) - 1)
        if not active:
            return None
        levels = sigmas[active.start : active.stop]
        return replace(
            self, layers=tuple(self.layers), noise_levels=(float(levels.min()), float(levels.max()))
        )

    def acts_at(self, sigma: float) -> bool:
        levels = self.noise_levels
        return levels is not None and levels[0] <= sigma <= levels[1]


class ClassifierFreeGuidance:
    """(x, sigma) -> x0 = uncond + scale * (cond - uncond) (Ho & Salimans 2022, Eq. 6, on x0 estimates).

    ``scale == 1`` runs the conditional pass only. ``rescale`` > 0 applies guidance rescale on the
    network's prediction type (taken from ``denoiser.prediction_type`` if not given). ``min_sigma`` > 0
    guides only the steps at noise levels sigma >= min_sigma and runs the conditional pass alone below it
    (guidance in a limited interval, Kynkäänniemi et al. 2024): the layout is decided at high noise, while
    guidance at low noise mostly over-shoots colours.

    ``skip_layer_guidance`` (made ``for_schedule``) adds SLG on the guided steps at its noise levels: one
    more conditional pass with ``skip_layers`` given to the network (which must take that argument),
    then ``x0 += slg.scale * (x0_cond - x0_skip)`` before any rescale.
    """

    def __init__(
        self,
        denoiser: ConditionalDenoiser,
        cond: Mapping[str, Any],
        uncond: Mapping[str, Any],
        scale: float,
        rescale: float = 0.0,
        prediction_type: str | None = None,
        min_sigma: float = 0.0,
        skip_layer_guidance: SkipLayerGuidance | None = None,
    ) -> None:
        self.denoiser = denoiser
        self.cond = dict(cond)
        self.uncond = dict(uncond)
        self.scale = scale
        self.rescale = rescale
        self.min_sigma = min_sigma
        if skip_layer_guidance is not None and skip_layer_guidance.noise_levels is None:
            raise ValueError("give SkipLayerGuidance.for_schedule(sigmas): the noise levels it acts on")
        self.skip_layer_guidance = skip_layer_guidance
        self.prediction_type = prediction_type or getattr(denoiser, "prediction_type", "epsilon")
        self._both = _batch_conditions(uncond, cond) if scale != 1 else None

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        sigma = torch.as_tensor(sigma, device=x.device).expand(x.shape[0])
        if self._both is None or (self.min_sigma and float(sigma.max()) < self.min_sigma):
            return self.denoiser(x, sigma, **self.cond)
        x0_uncond, x0_cond = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), **self._both).chunk(
            2
        )
        x0 = x0_uncond + self.scale * (x0_cond - x0_uncond)
        slg = self.skip_layer_guidance
        if slg is not None and slg.acts_at(float(sigma.max())):
            x0_skip = self.denoiser(x, sigma, **self.cond, skip_layers=tuple(slg.layers))
            x0 = x0 + slg.scale * (x0_cond - x0_skip)
        return self._rescaled(x, sigma, x0, x0_cond) if self.rescale else x0

    def _rescaled(self, x: Tensor, sigma: Tensor, x0: Tensor, x0_cond: Tensor) -> Tensor:
        s, kind = append_dims(sigma, x), self.prediction_type
        guided = x0_to_prediction(kind, x, x0, s)
        rescaled = rescale_guidance(guided, x0_to_prediction(kind, x, x0_cond, s), self.rescale)
        return prediction_to_x0(kind, x, rescaled, s)


@dataclass(frozen=True)
class StepConditions:
    """One step's conditioning for composable guidance: ``uncond`` has one row per image, ``cond`` one
    row per (image, part), part row j belonging to image ``owners[j]`` with weight ``weights[j]``."""

    uncond: Mapping[str, Any]
    cond: Mapping[str, Any]
    owners: tuple[int, ...]
    weights: tuple[float, ...]

    @property
    def single(self) -> bool:
        """One part of weight 1 per image, in image order: plain classifier-free guidance."""
        return self.owners == tuple(range(len(self.owners))) and all(w == 1 for w in self.weights)


StepConditioning = Callable[[int], StepConditions]  # step index -> that step's conditions


class ComposedGuidance:
    """Classifier-free guidance whose conditioning changes with the step and may have several weighted
    parts per image (AUTOMATIC1111's prompt editing, alternation and ``AND``):
    x0 = uncond + sum_j w_j * scale * (cond_j - uncond) (Liu et al. 2022, "Compositional Visual
    Generation with Composable Diffusion Models", the conjunction operator; Ho & Salimans 2022, Eq. 6
    for one part of weight 1, computed exactly as ``ClassifierFreeGuidance`` computes it).

    ``conditions(step)`` gives step ``step``'s ``StepConditions``. The guidance sees noise levels, so
    ``for_run(sigmas)`` (done by ``pipelines.sampling.integrate``) fixes the run's levels: a call at
    sigma belongs to the last step whose level is at or above sigma. A sampler's intermediate
    evaluations (DPM++ 2S's midpoint, UniPC) use their step's conditioning; Heun's and DPM2's
    correction at the next level uses the next step's (as every evaluation at that level does).

    All rows go through the network in one batch: the images' unconditional rows first, then the
    part rows. ``extra_cond`` entries with one row per image (concat channels, class labels) follow
    their rows. ``min_sigma``, ``rescale`` and skip-layer guidance are as in ``ClassifierFreeGuidance``
    (below ``min_sigma`` the parts are composed at scale 1; the rescale's conditional estimate is that
    composition at scale 1; skip-layer guidance needs one part of weight 1 per image).
    """

    def __init__(
        self,
        denoiser: ConditionalDenoiser,
        conditions: StepConditioning,
        scale: float,
        rescale: float = 0.0,
        prediction_type: str | None = None,
        min_sigma: float = 0.0,
        skip_layer_guidance: SkipLayerGuidance | None = None,
        extra_cond: Mapping[str, Any] | None = None,
        *,
        run: tuple[tuple[float, ...], int] | None = None,
    ) -> None:
        self.denoiser = denoiser
        self.conditions = conditions
        self.scale, self.rescale, self.min_sigma = scale, rescale, min_sigma
        self.prediction_type = prediction_type or getattr(denoiser, "prediction_type", "epsilon")
        self.skip_layer_guidance = skip_layer_guidance
        self.extra_cond = dict(extra_cond or {})
        self.run = run  # (the run's noise levels, steps before it) once for_run

    def for_run(self, sigmas: Tensor, steps_before: int = 0) -> ComposedGuidance:
        """This guidance for a sampler run over ``sigmas`` whose first step is step ``steps_before``."""
        levels = tuple(float(s) for s in sigmas[:-1])
        return ComposedGuidance(
            self.denoiser,
            self.conditions,
            self.scale,
            self.rescale,
            self.prediction_type,
            self.min_sigma,
            self.skip_layer_guidance,
            self.extra_cond,
            run=(levels, steps_before),
        )

    def step_at(self, sigma: float) -> int:
        """The step a call at noise level ``sigma`` belongs to (see the class docstring)."""
        if self.run is None:
            raise ValueError("ComposedGuidance needs for_run(sigmas) before sampling (integrate does it)")
        levels, before = self.run
        tolerance = 1e-5 * sigma
        inside = sum(1 for level in levels if level >= sigma - tolerance)
        return before + max(inside - 1, 0)

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        sigma = torch.as_tensor(sigma, device=x.device).expand(x.shape[0])
        level = float(sigma.max())
        step = self.conditions(self.step_at(level))
        scale = 1.0 if self.min_sigma and level < self.min_sigma else self.scale
        if step.single and scale == 1:
            return self.denoiser(x, sigma, **step.cond, **self.extra_cond)
        owners = torch.tensor(step.owners, device=x.device)
        both = self._batched(step, owners, x.shape[0])
        x0_all = self.denoiser(torch.cat([x, x[owners]]), torch.cat([sigma, sigma[owners]]), **both)
        x0_uncond, x0_parts = x0_all[: x.shape[0]], x0_all[x.shape[0] :]
        if step.single:
            x0 = x0_uncond + scale * (x0_parts - x0_uncond)
            x0_cond = x0_parts
        else:
            x0 = self._composed(x0_uncond, x0_parts, step, scale)
            x0_cond = self._composed(x0_uncond, x0_parts, step, 1.0) if self.rescale else x0
        x0 = self._skip_layers(x, sigma, level, step, x0, x0_parts, scale)
        return self._rescaled(x, sigma, x0, x0_cond) if self.rescale else x0

    def _batched(self, step: StepConditions, owners: Tensor, batch: int) -> dict[str, Any]:
        """The unconditional rows, then the part rows, entry by entry; per-image extras follow."""
        both = _batch_conditions(step.uncond, step.cond)
        for key, value in self.extra_cond.items():
            per_image = isinstance(value, Tensor) and value.ndim > 0 and value.shape[0] == batch
            both[key] = torch.cat([value, value[owners]]) if per_image else value
        return both

    @staticmethod
    def _composed(x0_uncond: Tensor, x0_parts: Tensor, step: StepConditions, scale: float) -> Tensor:
        x0 = x0_uncond.clone()
        for j, (i, weight) in enumerate(zip(step.owners, step.weights, strict=True)):
            x0[i] += (x0_parts[j] - x0_uncond[i]) * (weight * scale)
        return x0

    def _skip_layers(
        self,
        x: Tensor,
        sigma: Tensor,
        level: float,
        step: StepConditions,
        x0: Tensor,
        x0_parts: Tensor,
        scale: float,
    ) -> Tensor:
        """Skip-layer guidance on a guided step (one part of weight 1 per image): as
        ``ClassifierFreeGuidance`` adds it."""
        slg = self.skip_layer_guidance
        if slg is None or scale == 1 or not slg.acts_at(level):
            return x0
        if not step.single:
            raise UserError("skip-layer guidance does not combine with AND parts or part weights")
        x0_skip = self.denoiser(x, sigma, **step.cond, **self.extra_cond, skip_layers=tuple(slg.layers))
        return x0 + slg.scale * (x0_parts - x0_skip)

    def _rescaled(self, x: Tensor, sigma: Tensor, x0: Tensor, x0_cond: Tensor) -> Tensor:
        s, kind = append_dims(sigma, x), self.prediction_type
        guided = x0_to_prediction(kind, x, x0, s)
        rescaled = rescale_guidance(guided, x0_to_prediction(kind, x, x0_cond, s), self.rescale)
        return prediction_to_x0(kind, x, rescaled, s)
