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
