"""Our samplers over the rectified-flow denoiser against diffusers' flow schedulers, on a toy velocity
network and the same starting noise.

diffusers' loops are written as its SD3 pipelines run them: the latent is not scaled, the network gets
the scheduler's timesteps, ``scheduler.step`` moves the latent. Tolerances are absolute on unit-scale
latents (|x| reaches ~3) on CPU float32.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from latentdiffusion.config import ScheduleConfig
from latentdiffusion.diffusion.denoiser import Denoiser
from latentdiffusion.diffusion.process import FLOW_SIGMA_MAX, process_from_config
from latentdiffusion.samplers import SAMPLERS, sample

FLOW = ScheduleConfig(process="flow", prediction_type="flow", shift=3.0)  # SD3's scheduler_config.json
# Starting from t = 1 at the cap sigma = 4096 instead of infinity moves the first step by t_next v / 4096:
# below 5 / 4096 for this toy network, whose |v| <= |x| + 1.14 < 5 on this noise (process.FLOW_SIGMA_MAX).
CAP_TOLERANCE = 5 / FLOW_SIGMA_MAX


class ToyVelocityNetwork:
    """A fixed random 1x1 convolution inside a tanh, plus smooth functions of t: deterministic, cheap,
    nonlinear, and close to a real velocity (eps - x0 ~ x_t - a bounded x0 guess)."""

    def __init__(self, channels: int = 4, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.weight = 0.3 * torch.randn(channels, channels, generator=g)
        self.bias = 0.5 * torch.randn(channels, generator=g)

    def __call__(self, x: Tensor, t: Tensor, **cond: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1, 1, 1) / 1000
        mixed = torch.einsum("oc,bchw->bohw", self.weight.to(x.dtype), x) + self.bias.view(1, -1, 1, 1)
        out = x - 0.8 * torch.tanh(mixed) * (1 + 0.3 * torch.cos(3 * t)) + 0.1 * torch.sin(5 * t)
        return out.to(x.dtype)


@pytest.fixture(scope="module")
def noise():
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))


def diffusers_scheduler(name: str):
    import diffusers

    common = dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=FLOW.shift)
    if name == "euler":
        return diffusers.FlowMatchEulerDiscreteScheduler(shift=FLOW.shift)
    if name == "dpmpp_2m":
        return diffusers.DPMSolverMultistepScheduler(**common)
    return diffusers.UniPCMultistepScheduler(**common)


def run_diffusers(
    name: str, x: Tensor, steps: int, start: int = 0, network: ToyVelocityNetwork | None = None
):
    """The scheduler loop from step ``start``. The network gets t * T from the scheduler's own sigmas:
    FlowMatchEuler's timesteps are exactly those, while DPMSolverMultistep/UniPC truncate theirs to whole
    numbers (SD3 is sampled at fractional t)."""
    scheduler = diffusers_scheduler(name)
    scheduler.set_timesteps(steps)
    scheduler.set_begin_index(start)
    network = network or ToyVelocityNetwork()
    for i, t in enumerate(scheduler.timesteps[start:], start=start):
        timestep = scheduler.sigmas[i] * scheduler.config.num_train_timesteps
        x = scheduler.step(network(x, timestep.expand(x.shape[0])), t, x).prev_sample
    return x


def run_ours(
    name: str,
    noise: Tensor,
    steps: int,
    sigmas: Tensor | None = None,
    network: ToyVelocityNetwork | None = None,
) -> Tensor:
    process = process_from_config(FLOW)
    sigmas = process.sampling_sigmas(steps, name) if sigmas is None else sigmas
    x = noise * process.initial_noise_scale(sigmas, name)
    denoiser = Denoiser(network or ToyVelocityNetwork(), process, FLOW.prediction_type)
    out = sample(name, denoiser, x, sigmas)
    return process.to_unit_scale(out, sigmas[-1])


@pytest.mark.parametrize("steps", [1, 4, 28])
def test_dpmpp_2m_matches_flow_dpm_solver(noise, steps):
    """DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_prediction) starts below t = 1: no cap."""
    assert (run_ours("dpmpp_2m", noise, steps) - run_diffusers("dpmpp_2m", noise, steps)).abs().max() < 1e-5


@pytest.mark.parametrize("name", ["euler", "unipc"])
@pytest.mark.parametrize("steps", [1, 4, 28])
def test_runs_from_pure_noise_match_within_the_cap(noise, name, steps):
    gap = (run_ours(name, noise, steps) - run_diffusers(name, noise, steps)).abs().max()
    assert gap < CAP_TOLERANCE


def test_cap_keeps_decoded_images_within_1_255_of_diffusers():
    """SD3's latent format (16 channels, scale 1.5305, shift 0.0609) through a random-weight decoder of
    SD3's shape: the cap's latent gap is far below one 8-bit level of the image."""
    from dataclasses import replace

    from latentdiffusion.config import SD3_AUTOENCODER
    from latentdiffusion.models.autoencoder import Autoencoder

    config = replace(SD3_AUTOENCODER, block_channels=(32, 32), norm_groups=8, num_res_blocks=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        decoder = Autoencoder(config).eval()
    noise = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    network = ToyVelocityNetwork(channels=16)
    ours = run_ours("euler", noise, 28, network=network)
    theirs = run_diffusers("euler", noise, 28, network=network)
    assert (ours - theirs).abs().max() > 1e-4  # the cap's gap is there ...
    with torch.no_grad():
        images = [
            ((decoder.decode(z / config.scaling_factor + config.shift_factor) + 1) / 2).clamp(0, 1)
            for z in (ours, theirs)
        ]
    assert (images[0] - images[1]).abs().max() < 0.5 / 255  # ... and invisible in the image


@pytest.mark.parametrize("steps", [4, 28])
def test_euler_matches_flow_match_euler_from_the_capped_start(noise, steps):
    """The gap above is the cap's alone: started from the capped level t_c = 4096 / 4097 (with the
    network told t = 1, as ours is), FlowMatchEuler's loop gives our latents."""
    import diffusers

    process = process_from_config(FLOW)
    sigmas = process.sampling_sigmas(steps, "euler")
    times = (sigmas.double() / (1 + sigmas.double())).float()
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0)  # the times are shifted already
    scheduler.set_timesteps(sigmas=times[:-1].tolist())
    network, x = ToyVelocityNetwork(), noise.clone()
    for i, t in enumerate(scheduler.timesteps):
        timestep = torch.tensor(1000.0) if i == 0 else t
        x = scheduler.step(network(x, timestep.expand(2)), t, x).prev_sample
    assert (run_ours("euler", noise, steps) - x).abs().max() < 1e-5


@pytest.mark.parametrize("name", ["euler", "dpmpp_2m"])
@pytest.mark.parametrize("start", [3, 14])
def test_img2img_starts_match(noise, name, start):
    """Image-to-image: diffusers starts from scale_noise(x0) = t noise + (1 - t) x0 at step ``start``;
    we from the VE latent x0 + sigma noise at the same level."""
    process = process_from_config(FLOW)
    sigmas = process.sampling_sigmas(28, name)
    image = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    t = sigmas[start].double() / (1 + sigmas[start].double())
    theirs = run_diffusers(name, (t * noise + (1 - t) * image).float(), 28, start=start)
    ours = process.to_unit_scale(
        sample(
            name,
            Denoiser(ToyVelocityNetwork(), process, "flow"),
            image + sigmas[start] * noise,
            sigmas[start:],
        ),
        0.0,
    )
    assert (ours - theirs).abs().max() < 1e-5


@pytest.mark.parametrize("name", [name for name in SAMPLERS if name != "tcd"])  # TCD: discrete grids only
@pytest.mark.parametrize("discretisation", [None, "karras"])
def test_every_sampler_runs_on_flow(noise, name, discretisation):
    process = process_from_config(FLOW)
    sigmas = process.sampling_sigmas(6, name, discretisation)
    x = noise * process.initial_noise_scale(sigmas, name, discretisation)
    generator = torch.Generator().manual_seed(4)
    denoiser = Denoiser(ToyVelocityNetwork(), process, "flow")
    out = process.to_unit_scale(sample(name, denoiser, x, sigmas, generator=generator), sigmas[-1])
    assert out.shape == noise.shape and torch.isfinite(out).all()
    euler = run_ours("euler", noise, 6, sigmas)  # every sampler lands near Euler's latent
    assert (out - euler).abs().mean() < 1.0


def test_too_many_steps_for_the_cap_are_refused():
    process = process_from_config(FLOW)
    process.sampling_sigmas(1000, "euler")
    with pytest.raises(ValueError, match="use fewer steps"):
        process.sampling_sigmas(2000, "euler")
