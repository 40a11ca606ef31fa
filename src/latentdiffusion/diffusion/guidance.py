"""Classifier-free guidance (Ho & Salimans 2022) with optional guidance rescale (Lin et al. 2024).

Guidance combines two predictions of one network, with and without the condition, in one batched
call. Because eps, v and x0 are affine in each other at fixed (x, sigma), combining x0 estimates is the
same as combining the network outputs. The rescale is not affine-invariant, so it is computed on the
network's own prediction type (eps or v), exactly as diffusers' ``rescale_noise_cfg`` does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from latentdiffusion.diffusion.parameterization import append_dims, prediction_to_x0, x0_to_prediction

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


class ClassifierFreeGuidance:
    """(x, sigma) -> x0 = uncond + scale * (cond - uncond) (Ho & Salimans 2022, Eq. 6, on x0 estimates).

    ``scale == 1`` runs the conditional pass only. ``rescale`` > 0 applies guidance rescale on the
    network's prediction type (taken from ``denoiser.prediction_type`` if not given). ``min_sigma`` > 0
    guides only the steps at noise levels sigma >= min_sigma and runs the conditional pass alone below it
    (guidance in a limited interval, Kynkäänniemi et al. 2024): the layout is decided at high noise, while
    guidance at low noise mostly over-shoots colours.
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
    ) -> None:
        self.denoiser = denoiser
        self.cond = dict(cond)
        self.uncond = dict(uncond)
        self.scale = scale
        self.rescale = rescale
        self.min_sigma = min_sigma
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
        return self._rescaled(x, sigma, x0, x0_cond) if self.rescale else x0

    def _rescaled(self, x: Tensor, sigma: Tensor, x0: Tensor, x0_cond: Tensor) -> Tensor:
        s, kind = append_dims(sigma, x), self.prediction_type
        guided = x0_to_prediction(kind, x, x0, s)
        rescaled = rescale_guidance(guided, x0_to_prediction(kind, x, x0_cond, s), self.rescale)
        return prediction_to_x0(kind, x, rescaled, s)
