"""ComfyUI's schedulers, level for level: each checked against an independent numpy transcription of its
definition in ComfyUI (``comfy/samplers.py``, ``ModelSamplingDiscrete``), and against diffusers where
diffusers has the same discretisation (to float32 rounding: diffusers builds its table from float32
alphas_cumprod, ComfyUI from float64).

diffusers' ``use_beta_sigmas`` is not ComfyUI's "beta" (it spaces sigma itself between the ends at Beta
quantiles; ComfyUI picks table entries at Beta-quantile timesteps), and its "linspace" spacing
interpolates sigma, not log sigma, so neither is compared.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch

from latentdiffusion.config import ScheduleConfig
from latentdiffusion.diffusion.denoiser import Denoiser
from latentdiffusion.diffusion.schedules import NoiseSchedule, table_timestep
from latentdiffusion.serving.comfy.sampling import TableTimestepDenoiser
from latentdiffusion.serving.comfy.schedulers import SCHEDULERS, comfy_sigmas, comfy_start_scale

T = 1000


@pytest.fixture(scope="module")
def table():
    return NoiseSchedule.from_config(ScheduleConfig()).sigmas


def reference_table():
    """ComfyUI's table from SD's betas ("linear" there: linear in sqrt(beta) from 0.00085 to 0.012)."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, T, dtype=np.float64) ** 2
    a = np.cumprod(1.0 - betas)
    sigmas = np.sqrt((1 - a) / a)
    return sigmas.astype(np.float32), np.log(sigmas).astype(np.float32)


def ref_sigma(t):
    _, log_sigmas = reference_table()
    t = np.clip(np.float32(t), 0, T - 1)
    lo, hi = int(np.floor(t)), int(np.ceil(t))
    w = np.float32(t - np.floor(t))
    return float(np.exp((np.float32(1) - w) * log_sigmas[lo] + w * log_sigmas[hi]))


def reference(name, steps):
    sigmas, _ = reference_table()
    lo, hi = float(sigmas[0]), float(sigmas[-1])
    if name in ("normal", "sgm_uniform"):
        ts = np.linspace(T - 1, 0, steps + 1)[:-1] if name == "sgm_uniform" else np.linspace(T - 1, 0, steps)
        out = [ref_sigma(t) for t in ts.astype(np.float32)]
    elif name == "simple":
        out = [float(sigmas[-(1 + int(x * (T / steps)))]) for x in range(steps)]
    elif name == "ddim_uniform":
        out = [float(s) for s in sigmas[1 :: max(T // steps, 1)]][::-1]
    elif name == "beta":
        ts = np.rint(scipy.stats.beta.ppf(1 - np.linspace(0, 1, steps, endpoint=False), 0.6, 0.6) * (T - 1))
        out = [float(sigmas[int(t)]) for i, t in enumerate(ts) if i == 0 or t != ts[i - 1]]
    elif name == "karras":
        ramp = np.linspace(0, 1, steps, dtype=np.float32)
        out = list((hi ** (1 / 7) + ramp * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7)
    elif name == "exponential":
        out = list(np.exp(np.linspace(math.log(hi), math.log(lo), steps, dtype=np.float32)))
    elif name == "kl_optimal":
        ramp = np.arange(steps, dtype=np.float32) / max(steps - 1, 1)
        out = list(np.tan(ramp * math.atan(lo) + (1 - ramp) * math.atan(hi)))
    elif name == "linear_quadratic":
        return np.array(linear_quadratic(steps), dtype=np.float32) * np.float32(hi)
    return np.array([*out, 0.0], dtype=np.float32)


def linear_quadratic(steps, threshold=0.025):
    """Mochi's schedule as ComfyUI writes it: 1 - (linear to the threshold, then quadratic to 1)."""
    if steps == 1:
        return [1.0, 0.0]
    n = steps // 2
    q = steps - n
    d = n - threshold * steps
    c2, c1 = d / (n * q**2), threshold / n - 2 * d / q**2
    rising = [i * threshold / n for i in range(n)] + [
        c2 * i * i + c1 * i + c2 * n * n for i in range(n, steps)
    ]
    return [1.0 - v for v in [*rising, 1.0]]


@pytest.mark.parametrize("name", list(SCHEDULERS))
@pytest.mark.parametrize("steps", [1, 3, 10, 20, 37])
def test_levels_equal_comfyui_definitions(table, name, steps):
    ours = comfy_sigmas(name, table, steps).numpy()
    expected = reference(name, steps)
    assert ours.dtype == np.float32 and ours[-1] == 0
    assert len(ours) == len(expected), (ours, expected)
    np.testing.assert_allclose(ours, expected, rtol=2e-6, atol=0)
    if name in ("simple", "ddim_uniform", "beta"):  # picked from the table: bit for bit
        assert np.array_equal(ours, expected)
    if name != "beta":
        assert len(ours) == steps + 1


def test_worked_values(table):
    """A few levels computed by hand: normal starts at the table top and ends at sigma(t=0)."""
    normal = comfy_sigmas("normal", table, 4)
    assert float(normal[0]) == pytest.approx(14.614642, rel=1e-6)
    assert float(normal[-2]) == pytest.approx(0.0291672, rel=1e-5)
    assert comfy_sigmas("beta", table, 200).shape[0] < 201  # quantiles round onto the same timestep


def test_karras_and_exponential_match_diffusers_full_range_ramps(table):
    import diffusers

    for kind in ("karras", "exponential"):
        scheduler = diffusers.EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            timestep_spacing="linspace",
            **{f"use_{kind}_sigmas": True},
        )
        scheduler.set_timesteps(12)
        np.testing.assert_allclose(comfy_sigmas(kind, table, 12).numpy(), scheduler.sigmas.numpy(), rtol=2e-5)


@pytest.mark.parametrize("steps", [4, 10, 25])
def test_table_picks_match_diffusers_spacings(table, steps):
    """simple = "trailing" and ddim_uniform = DDIM's "leading" (offset 1) when steps divide T."""
    import diffusers

    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    trailing = diffusers.EulerDiscreteScheduler(**common, timestep_spacing="trailing")
    trailing.set_timesteps(steps)
    torch.testing.assert_close(comfy_sigmas("simple", table, steps), trailing.sigmas, rtol=1e-5, atol=0)
    leading = diffusers.DDIMScheduler(**common, timestep_spacing="leading", steps_offset=1)
    leading.set_timesteps(steps)
    a = leading.alphas_cumprod[leading.timesteps]
    torch.testing.assert_close(
        comfy_sigmas("ddim_uniform", table, steps)[:-1], ((1 - a) / a).sqrt(), rtol=1e-5, atol=0
    )


def test_network_timestep_is_comfyuis_nearest_entry_in_log_sigma(table):
    """ComfyUI evaluates its network at argmin |log sigma - log table|: our Denoiser's rounded timestep."""
    sigmas = torch.exp(
        torch.empty(2000).uniform_(math.log(0.03), math.log(14.6), generator=torch.Generator().manual_seed(0))
    )
    _, log_sigmas = reference_table()
    expected = np.abs(np.log(sigmas.numpy())[None] - log_sigmas[:, None]).argmin(axis=0)
    denoiser = Denoiser(lambda x, t: x, NoiseSchedule.from_config(ScheduleConfig()), "epsilon")
    ours = denoiser.timestep(sigmas).round().long().numpy()
    assert (ours == expected).mean() > 0.999  # ties within float rounding may fall either way
    assert np.array_equal(table_timestep(table, sigmas).numpy(), expected)


def test_start_scale_is_comfyuis_noise_scaling(table):
    top = float(table.float()[-1])
    assert comfy_start_scale(top, table) == pytest.approx(math.sqrt(1 + top**2))
    assert comfy_start_scale(3.0, table) == 3.0


@pytest.mark.parametrize("name", ["sgm_uniform", "beta", "linear_quadratic", "kl_optimal"])
def test_table_schedulers_are_library_discretisations(table, name):
    """``--sigmas beta`` etc.: the library's sampling_sigmas gives ComfyUI's levels for any sampler."""
    from latentdiffusion.diffusion.schedules import sampling_sigmas

    config = ScheduleConfig()
    schedule = NoiseSchedule.from_config(config)
    for sampler in ("euler", "dpmpp_2m", "ddim"):
        assert torch.equal(sampling_sigmas(schedule, config, 9, sampler, name), comfy_sigmas(name, table, 9))


def test_pipeline_takes_a_table_discretisation(tiny_pipe):
    image = tiny_pipe.generate("a red cube", steps=3, sampler="dpm_2", sigmas="kl_optimal")[0]
    assert image.size == (64, 64)


@pytest.mark.parametrize("name", ["normal", "sgm_uniform", "karras", "exponential", "kl_optimal", "beta"])
def test_network_timesteps_of_every_level_are_comfyuis(table, name):
    """At every level ComfyUI's schedulers visit (steps 1 to 60), the API's denoiser feeds the network
    ComfyUI's timestep; the library's rounded timestep differs only at exact midpoints between entries
    (which "normal" and "sgm_uniform" visit when steps - 1 or steps divide 999 to a half)."""
    schedule = NoiseSchedule.from_config(ScheduleConfig())
    api = TableTimestepDenoiser(lambda x, t: x, schedule, "epsilon")
    rounded = Denoiser(lambda x, t: x, schedule, "epsilon")
    # ComfyUI's own arithmetic, in torch (at exact midpoints numpy's float32 log may round the other way)
    log_sigmas = table.log().float()
    differ = 0
    for steps in range(1, 61):
        levels = comfy_sigmas(name, table, steps)[:-1]
        expected = (levels.log()[None] - log_sigmas[:, None]).abs().argmin(dim=0).numpy()
        assert np.array_equal(api.timestep(levels).long().numpy(), expected), (name, steps)
        differ += int((rounded.timestep(levels).long().numpy() != expected).sum())
    assert differ <= 40 if name in ("normal", "sgm_uniform") else differ == 0
