"""Parameterisations (eps / x0 / v) and the Denoiser wrapper around a discrete-time network."""

from __future__ import annotations

import pytest
import torch

from latentdiffusion.config import ScheduleConfig
from latentdiffusion.diffusion.denoiser import Denoiser
from latentdiffusion.diffusion.parameterization import (
    append_dims,
    c_in,
    prediction_to_x0,
    training_target,
    x0_to_prediction,
)
from latentdiffusion.diffusion.schedules import NoiseSchedule

SCHEDULE = NoiseSchedule.from_config(ScheduleConfig())


@pytest.fixture
def example():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    return x0, eps, sigma


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_training_targets_convert_back_to_x0(example, prediction_type):
    x0, eps, sigma = example
    s = append_dims(sigma, x0)
    alphas_cumprod = c_in(s) ** 2
    x_ve = x0 + s * eps
    target = training_target(prediction_type, x0, eps, alphas_cumprod)
    torch.testing.assert_close(prediction_to_x0(prediction_type, x_ve, target, s), x0)
    torch.testing.assert_close(x0_to_prediction(prediction_type, x_ve, x0, s), target)


def test_v_is_salimans_and_ho_velocity(example):
    x0, eps, sigma = example
    s = append_dims(sigma, x0)
    alpha, sigma_vp = c_in(s), s * c_in(s)
    v = training_target("v_prediction", x0, eps, alpha**2)
    torch.testing.assert_close(v, alpha * eps - sigma_vp * x0)


class RecordingNetwork:
    def __init__(self, output):
        self.output, self.calls = output, []

    def __call__(self, x, t, **cond):
        self.calls.append((x, t, cond))
        return self.output(x, t)


def test_denoiser_scales_input_maps_sigma_to_t_and_passes_cond():
    x = torch.randn(2, 4, 3, 3)
    sigma = SCHEDULE.sigmas[[100, 900]].float()
    concat = torch.randn(2, 5, 3, 3)
    context = torch.randn(2, 7, 8)
    network = RecordingNetwork(lambda x_in, t: torch.zeros(2, 4, 3, 3))
    x0 = Denoiser(network, SCHEDULE, "epsilon")(x, sigma, concat=concat, context=context)
    (x_in, t, cond) = network.calls[0]
    scale = (1 + sigma**2).rsqrt().view(2, 1, 1, 1)
    torch.testing.assert_close(x_in[:, :4], x * scale)
    assert torch.equal(x_in[:, 4:], concat)
    torch.testing.assert_close(t, torch.tensor([100.0, 900.0]), rtol=0, atol=1e-3)
    assert t.dtype == torch.float32 and set(cond) == {"context"} and cond["context"] is context
    torch.testing.assert_close(x0, x)  # zero noise prediction: x0 = x


def test_denoiser_converts_eps_and_v_to_x0():
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 4, generator=g), torch.randn(2, 4, generator=g)
    sigma = torch.tensor([0.5, 3.0])
    s = sigma.view(2, 1)
    x = x0 + s * eps
    eps_net = RecordingNetwork(lambda x_in, t: eps)
    torch.testing.assert_close(Denoiser(eps_net, SCHEDULE, "epsilon")(x, sigma), x0)
    v = c_in(s) * eps - s * c_in(s) * x0
    v_net = RecordingNetwork(lambda x_in, t: v)
    torch.testing.assert_close(Denoiser(v_net, SCHEDULE, "v_prediction")(x, sigma), x0)


def test_denoiser_rounds_timesteps_by_default_and_casts_the_network_input():
    network = RecordingNetwork(lambda x_in, t: torch.zeros_like(x_in))
    sigma = SCHEDULE.t_to_sigma(torch.tensor([10.4, 500.6])).float()
    x = torch.randn(2, 4)
    out = Denoiser(network, SCHEDULE, dtype=torch.float64)(x, sigma)
    x_in, t, _ = network.calls[0]
    assert t.tolist() == [10.0, 501.0] and x_in.dtype == torch.float64 and out.dtype == torch.float32


def test_denoiser_feeds_fractional_timesteps_when_asked():
    network = RecordingNetwork(lambda x_in, t: torch.zeros_like(x_in))
    sigma = SCHEDULE.t_to_sigma(torch.tensor([10.4, 500.6])).float()
    Denoiser(network, SCHEDULE, round_timesteps=False)(torch.randn(2, 4), sigma)
    t = network.calls[0][1]
    torch.testing.assert_close(t, SCHEDULE.sigma_to_t(sigma))
    # t_to_sigma interpolates in sigma, sigma_to_t in log sigma: near, not exact, inverses
    torch.testing.assert_close(t, torch.tensor([10.4, 500.6]), atol=1e-2, rtol=0)


def test_denoiser_accepts_a_scalar_sigma_and_refuses_unknown_prediction_types():
    network = RecordingNetwork(lambda x_in, t: torch.zeros_like(x_in))
    Denoiser(network, SCHEDULE)(torch.randn(3, 4), torch.tensor(2.0))
    assert network.calls[0][1].shape == (3,)
    with pytest.raises(ValueError, match="unknown prediction_type"):
        Denoiser(network, SCHEDULE, "flow")
