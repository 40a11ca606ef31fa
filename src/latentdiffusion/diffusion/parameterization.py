"""What the network predicts (eps, x0 or v) and how it is scaled, in VE terms.

With ``x = x0 + sigma * eps`` (VE, Karras et al. 2022) the network sees the unit-scale input
``x * c_in`` with ``c_in = 1 / sqrt(1 + sigma^2)`` (= sqrt(alphas_cumprod)); in VP terms
``alpha = c_in`` and ``sigma_vp = sigma * c_in``. v-prediction is ``v = alpha * eps - sigma_vp * x0``
(Salimans & Ho 2022, Sec. 4 and App. D).

Rectified flow (Esser et al. 2024, SD3) predicts the velocity ``v = eps - x0`` of
``x_t = (1 - t) x0 + t eps``; with sigma = t / (1 - t) its input is ``x_t = x / (1 + sigma)`` and
``x0 = x_t - t v = (x - sigma v) / (1 + sigma)`` (prediction type "flow", ``diffusion.process``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")


def append_dims(sigma: Tensor | float, x: Tensor) -> Tensor:
    """Noise levels [batch] (or a scalar) -> a tensor that broadcasts against ``x`` [batch, ...]."""
    sigma = torch.as_tensor(sigma, device=x.device)
    return sigma.reshape(sigma.shape + (1,) * (x.ndim - sigma.ndim))


def c_in(sigma: Tensor) -> Tensor:
    """Input scaling 1 / sqrt(1 + sigma^2): the VE latent back at unit scale (Karras et al. 2022, Table 1)."""
    return (sigma**2 + 1).rsqrt()


def x0_from_eps(x: Tensor, eps: Tensor, sigma: Tensor) -> Tensor:
    return x - sigma * eps


def x0_from_v(x: Tensor, v: Tensor, sigma: Tensor) -> Tensor:
    """x0 = alpha * x_vp - sigma_vp * v with x_vp = c_in * x (Salimans & Ho 2022, Eq. 29)."""
    scale = c_in(sigma)
    return scale**2 * x - sigma * scale * v


def x0_from_x0(x: Tensor, x0: Tensor, sigma: Tensor) -> Tensor:
    return x0


def eps_from_x0(x: Tensor, x0: Tensor, sigma: Tensor) -> Tensor:
    return (x - x0) / sigma


def v_from_x0(x: Tensor, x0: Tensor, sigma: Tensor) -> Tensor:
    scale = c_in(sigma)
    return (scale**2 * x - x0) / (sigma * scale)


def x0_from_flow(x: Tensor, v: Tensor, sigma: Tensor) -> Tensor:
    """x0 = x_t - t v with x_t = x / (1 + sigma), t = sigma / (1 + sigma) (rectified flow)."""
    return (x - sigma * v) / (1 + sigma)


def flow_from_x0(x: Tensor, x0: Tensor, sigma: Tensor) -> Tensor:
    """v = eps - x0 with eps = (x - x0) / sigma."""
    return (x - x0) / sigma - x0


_TO_X0: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "epsilon": x0_from_eps,
    "v_prediction": x0_from_v,
    "sample": x0_from_x0,
    "flow": x0_from_flow,
}
_FROM_X0: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "epsilon": eps_from_x0,
    "v_prediction": v_from_x0,
    "sample": x0_from_x0,
    "flow": flow_from_x0,
}


def check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in _TO_X0:
        known = ", ".join(PREDICTION_TYPES)
        raise ValueError(f"unknown prediction_type {prediction_type!r}; known: {known}")


def prediction_to_x0(prediction_type: str, x: Tensor, prediction: Tensor, sigma: Tensor) -> Tensor:
    """The x0 estimate from a network output; ``x`` is the VE latent, ``sigma`` broadcasts against it."""
    check_prediction_type(prediction_type)
    return _TO_X0[prediction_type](x, prediction, sigma).to(x.dtype)


def x0_to_prediction(prediction_type: str, x: Tensor, x0: Tensor, sigma: Tensor) -> Tensor:
    """The network output that would have given ``x0`` (inverse of ``prediction_to_x0``)."""
    check_prediction_type(prediction_type)
    return _FROM_X0[prediction_type](x, x0, sigma).to(x.dtype)


def training_target(prediction_type: str, x0: Tensor, eps: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """The regression target for a network trained on x_vp = sqrt(a) x0 + sqrt(1 - a) eps.

    ``alphas_cumprod`` broadcasts against ``x0``. eps: Ho et al. 2020 (Eq. 14); v: Salimans & Ho 2022.
    """
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "sample":
        return x0
    if prediction_type == "flow":
        raise ValueError(
            "the flow target belongs to the flow process (process.RectifiedFlow.training_target)"
        )
    return (alphas_cumprod.sqrt() * eps - (1 - alphas_cumprod).sqrt() * x0).to(x0.dtype)
