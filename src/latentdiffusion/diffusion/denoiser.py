"""The denoiser D(x, sigma) -> x0 that every sampler integrates, wrapped around a discrete-time network.

Karras et al. 2022 (EDM), Sec. 5 and Table 1 ("VP" column): the network is a function of the
unit-scale input ``x * c_in`` and the training timestep ``t = sigma_to_t(sigma)``; its eps / v / x0
output is converted to an x0 estimate in VE space.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from latentdiffusion.diffusion.parameterization import (
    append_dims,
    c_in,
    check_prediction_type,
    prediction_to_x0,
)
from latentdiffusion.diffusion.schedules import NoiseSchedule

Network = Callable[..., Tensor]  # network(x, t, context=..., class_labels=...) -> eps / v / x0


class Denoiser:
    """D(x, sigma, **cond) -> x0 for a network trained on a discrete VP schedule.

    ``cond["concat"]``, if given, is concatenated on channels after the input scaling (inpainting,
    upscaling); the other entries are passed to the network as keyword arguments. ``dtype`` casts the
    network input (e.g. a float16 U-Net under a float32 sampler).

    ``round_timesteps`` (the default) feeds the network the nearest whole training timestep, the only
    ones it saw in training; the noise level the sampler integrates is unchanged. Noise levels off the
    training grid (Karras or exponential ramps, linspace spacing) then give the network an integer t, as
    ComfyUI, Stability's sgm (``quantize_c_noise``) and diffusers' DPMSolverMultistep/Singlestep,
    UniPC and DEIS schedulers with ``use_karras_sigmas`` do. ``round_timesteps=False`` feeds the
    fractional t interpolated in log sigma (k-diffusion's ``quantize=False``), as AUTOMATIC1111 does with
    its default settings and diffusers' Euler, Euler ancestral, Heun and LMS schedulers do for every
    discretisation. (Diffusers' multistep schedulers truncate, not round, exponential-ramp timesteps:
    matched by neither.) On the training grid (leading / trailing spacing) both give the same t, up to
    float rounding.
    """

    def __init__(
        self,
        network: Network,
        schedule: NoiseSchedule,
        prediction_type: str = "epsilon",
        *,
        round_timesteps: bool = True,
        dtype: torch.dtype | None = None,
    ) -> None:
        check_prediction_type(prediction_type)
        self.network = network
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.round_timesteps = round_timesteps
        self.dtype = dtype

    def timestep(self, sigma: Tensor) -> Tensor:
        t = self.schedule.sigma_to_t(sigma)
        return (t.round() if self.round_timesteps else t).float()

    def __call__(self, x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        sigma = torch.as_tensor(sigma, device=x.device).expand(x.shape[0])  # [batch]
        s = append_dims(sigma, x)
        x_in = (x * c_in(s)).to(self.dtype or x.dtype)
        concat = cond.pop("concat", None)
        if concat is not None:
            x_in = torch.cat([x_in, concat.to(x_in.dtype)], dim=1)
        prediction = self.network(x_in, self.timestep(sigma), **cond)
        return prediction_to_x0(self.prediction_type, x, prediction.to(x.dtype), s)
