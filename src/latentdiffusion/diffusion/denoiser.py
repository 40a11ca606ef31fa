"""The denoiser D(x, sigma) -> x0 that every sampler integrates, wrapped around a network.

Karras et al. 2022 (EDM), Sec. 5 and Table 1: the network is a function of its own-scale input
``x * c_in(sigma)`` and its timestep; its eps / v / x0 / velocity output is converted to an x0 estimate in
VE space. The noise process (``diffusion.process``: discrete VP or rectified flow) says what c_in, the
timestep and the conversion are.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from latentdiffusion.diffusion.parameterization import append_dims
from latentdiffusion.diffusion.process import DiscreteVP, NoiseProcess, check_prediction_type
from latentdiffusion.diffusion.schedules import NoiseSchedule

Network = Callable[..., Tensor]  # network(x, t, context=..., class_labels=...) -> eps / v / x0


class Denoiser:
    """D(x, sigma, **cond) -> x0 for a network trained on a noise process (a bare ``NoiseSchedule`` is
    its discrete VP process).

    ``cond["concat"]``, if given, is concatenated on channels after the input scaling (inpainting,
    upscaling); the other entries are passed to the network as keyword arguments. ``dtype`` casts the
    network input (e.g. a float16 U-Net under a float32 sampler).

    Discrete VP only: ``round_timesteps`` (the default) feeds the network the nearest whole training
    timestep, the only ones it saw in training; the noise level the sampler integrates is unchanged.
    Noise levels off the training grid (Karras or exponential ramps, linspace spacing) then give the
    network an integer t, as
    ComfyUI, Stability's sgm (``quantize_c_noise``) and diffusers' DPMSolverMultistep/Singlestep,
    UniPC and DEIS schedulers with ``use_karras_sigmas`` do. ``round_timesteps=False`` feeds the
    fractional t interpolated in log sigma (k-diffusion's ``quantize=False``), as AUTOMATIC1111 does with
    its default settings and diffusers' Euler, Euler ancestral, Heun and LMS schedulers do for every
    discretisation. (Diffusers' multistep schedulers truncate, not round, exponential-ramp timesteps:
    matched by neither.) On the training grid (leading / trailing spacing) both give the same t, up to
    float rounding. Rectified flow feeds t * T unrounded, as SD3 is trained and sampled.
    """

    def __init__(
        self,
        network: Network,
        process: NoiseProcess | NoiseSchedule,
        prediction_type: str = "epsilon",
        *,
        round_timesteps: bool = True,
        dtype: torch.dtype | None = None,
    ) -> None:
        if isinstance(process, NoiseSchedule):
            process = DiscreteVP(schedule=process)
        check_prediction_type(process.name, prediction_type)
        self.network = network
        self.process = process
        self.prediction_type = prediction_type
        self.round_timesteps = round_timesteps
        self.dtype = dtype

    @property
    def schedule(self) -> NoiseSchedule | None:
        """The discrete schedule, for a discrete VP process (None for flow)."""
        return getattr(self.process, "schedule", None)

    def timestep(self, sigma: Tensor) -> Tensor:
        return self.process.timestep(sigma, self.round_timesteps)

    def __call__(self, x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        sigma = torch.as_tensor(sigma, device=x.device).expand(x.shape[0])  # [batch]
        s = append_dims(sigma, x)
        x_in = (x * self.process.c_in(s)).to(self.dtype or x.dtype)
        concat = cond.pop("concat", None)
        if concat is not None:
            x_in = torch.cat([x_in, concat.to(x_in.dtype)], dim=1)
        prediction = self.network(x_in, self.timestep(sigma), **cond)
        return self.process.to_x0(self.prediction_type, x, prediction.to(x.dtype), s)
