"""The sampler registry and the contract every sampler keeps (no mutation, callbacks, dtype, device)."""

from __future__ import annotations

import math

import pytest
import torch

from latentdiffusion.config import ScheduleConfig
from latentdiffusion.diffusion.schedules import SAMPLER_FAMILIES, NoiseSchedule, sigmas_karras
from latentdiffusion.samplers import GRID_SAMPLERS, SAMPLERS, sample
from latentdiffusion.samplers.common import ancestral_sigmas
from latentdiffusion.samplers.multistep import lms_coefficient

NAMES = [
    "ddim",
    "ddpm",
    "plms",
    "euler",
    "euler_ancestral",
    "heun",
    "dpm_2",
    "dpm_2_ancestral",
    "lms",
    "dpmpp_2m",
    "dpmpp_2m_sde",
    "unipc",
    "lcm",
    "tcd",
]
# Samplers on a discrete training grid get the standard SD schedule.
GRID = {"schedule": NoiseSchedule.from_config(ScheduleConfig())}


def grid_options(name: str) -> dict:
    return GRID if name in GRID_SAMPLERS else {}


def shrink(x, sigma):
    return x / (1 + sigma.reshape(-1, *[1] * (x.ndim - 1)) ** 2)


def test_registry_names():
    assert list(SAMPLERS) == NAMES
    assert set(SAMPLER_FAMILIES) == set(SAMPLERS)  # sampling_sigmas knows every sampler


def test_unknown_sampler_is_refused_with_the_known_names():
    with pytest.raises(ValueError, match=r"unknown sampler 'nope'; known: ddim, ddpm"):
        sample("nope", shrink, torch.zeros(1, 2), torch.tensor([1.0, 0.0]))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sampler_keeps_inputs_and_dtype_and_reports_each_step(name, dtype):
    sigmas = torch.cat([sigmas_karras(5, 0.1, 10.0), torch.zeros(1, dtype=torch.float64)]).to(dtype)
    x = 10 * torch.randn(3, 2, 4, 4, dtype=dtype)
    x_before, sigmas_before = x.clone(), sigmas.clone()
    seen = []
    out = sample(
        name,
        shrink,
        x,
        sigmas,
        generator=[torch.Generator().manual_seed(i) for i in range(3)],
        callback=lambda i, sigma, x_i, x0: seen.append((i, sigma, x_i.shape, x0.dtype)),
        **grid_options(name),
    )
    assert torch.equal(x, x_before) and torch.equal(sigmas, sigmas_before)
    assert out.dtype == dtype and out.shape == x.shape and torch.isfinite(out).all()
    assert [i for i, *_ in seen] == list(range(5))
    assert [sigma for _, sigma, *_ in seen] == pytest.approx(sigmas[:-1].tolist())
    assert all(shape == x.shape and x0_dtype == dtype for *_, shape, x0_dtype in seen)


@pytest.mark.parametrize("name", ["ddpm", "euler_ancestral", "dpmpp_2m_sde", "lcm", "tcd"])
def test_stochastic_sampler_noise_depends_on_each_sample_generator(name):
    sigmas = torch.tensor([10.0, 3.0, 1.0, 0.3, 0.0])
    x = 10 * torch.randn(3, 4)
    generators = [torch.Generator().manual_seed(s) for s in (7, 8, 9)]
    together = sample(name, shrink, x, sigmas, generator=generators, **grid_options(name))
    alone = sample(
        name, shrink, x[1:2], sigmas, generator=[torch.Generator().manual_seed(8)], **grid_options(name)
    )
    torch.testing.assert_close(together[1:2], alone)


def test_sigmas_must_be_a_descending_list():
    with pytest.raises(ValueError, match="descending"):
        sample("euler", shrink, torch.zeros(1, 2), torch.tensor([1.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match="strictly descending"):
        sample("dpmpp_2m", shrink, torch.zeros(1, 2), torch.tensor([2.0, 1.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="1-D"):
        sample("euler", shrink, torch.zeros(1, 2), torch.tensor([1.0]))


def test_lms_coefficients_are_exact_integrals():
    from scipy import integrate

    levels = [14.6, 9.1, 5.4, 3.1, 1.7, 0.0]
    i, order = 4, 4
    for j in range(order):

        def basis(tau, j=j):
            others = [levels[i - k] for k in range(order) if k != j]
            return math.prod((tau - o) / (levels[i - j] - o) for o in others)

        expected = integrate.quad(basis, levels[i], levels[i + 1], epsabs=1e-13, epsrel=1e-13)[0]
        assert lms_coefficient(levels, i, j, order) == pytest.approx(expected, rel=1e-10, abs=1e-12)
    assert sum(lms_coefficient(levels, i, j, order) for j in range(order)) == pytest.approx(-1.7)


def test_ancestral_step_sizes():
    sigma_down, sigma_up = ancestral_sigmas(2.0, 1.0, eta=1.0)
    assert sigma_down**2 + sigma_up**2 == pytest.approx(1.0)
    assert sigma_up == pytest.approx((1.0 * (4.0 - 1.0) / 4.0) ** 0.5)
    assert ancestral_sigmas(2.0, 1.0, eta=0.0) == (1.0, 0.0)
    assert ancestral_sigmas(2.0, 0.0) == (0.0, 0.0)


def test_unipc_rejects_unknown_variant():
    with pytest.raises(ValueError, match="variant"):
        sample("unipc", shrink, torch.zeros(1, 2), torch.tensor([1.0, 0.0]), variant="bh3")


def test_tcd_needs_a_training_schedule_and_gamma_in_range():
    sigmas = torch.tensor([10.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="schedule="):
        sample("tcd", shrink, torch.zeros(1, 2), sigmas)
    with pytest.raises(ValueError, match="between 0 and 1"):
        sample("tcd", shrink, torch.zeros(1, 2), sigmas, eta=1.5, **GRID)
