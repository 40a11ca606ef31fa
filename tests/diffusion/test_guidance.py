"""Classifier-free guidance (+ rescale) against the formula of diffusers' pipelines."""

from __future__ import annotations

import pytest
import torch

from latentdiffusion.config import ScheduleConfig
from latentdiffusion.diffusion.denoiser import Denoiser
from latentdiffusion.diffusion.guidance import ClassifierFreeGuidance
from latentdiffusion.diffusion.schedules import NoiseSchedule

SCHEDULE = NoiseSchedule.from_config(ScheduleConfig())


class ContextNetwork:
    """A toy eps / v network whose output depends on the context; counts its calls."""

    def __init__(self):
        self.batches = []

    def __call__(self, x, t, context):
        self.batches.append(x.shape[0])
        return torch.tanh(x) * (1 + context.mean(dim=(1, 2)).view(-1, 1, 1, 1)) + 0.01 * t.view(-1, 1, 1, 1)


def diffusers_rescale_noise_cfg(noise_cfg, noise_pred_text, guidance_rescale):
    """Transcription of diffusers' ``rescale_noise_cfg`` (pipeline_stable_diffusion.py)."""
    std_text = noise_pred_text.std(dim=list(range(1, noise_pred_text.ndim)), keepdim=True)
    std_cfg = noise_cfg.std(dim=list(range(1, noise_cfg.ndim)), keepdim=True)
    noise_pred_rescaled = noise_cfg * (std_text / std_cfg)
    return guidance_rescale * noise_pred_rescaled + (1 - guidance_rescale) * noise_cfg


def diffusers_guided_x0(network, prediction_type, x, sigma, cond, uncond, scale, rescale):
    """The SD pipeline's guidance on the network output, then the scheduler's conversion to x0."""
    s = sigma.view(-1, 1, 1, 1)
    x_in = torch.cat([x, x]) / (1 + s.repeat(2, 1, 1, 1) ** 2).sqrt()
    t = SCHEDULE.sigma_to_t(torch.cat([sigma, sigma]))
    out_uncond, out_text = network(x_in, t, context=torch.cat([uncond, cond])).chunk(2)
    out = out_uncond + scale * (out_text - out_uncond)
    if rescale > 0:
        out = diffusers_rescale_noise_cfg(out, out_text, rescale)
    if prediction_type == "epsilon":
        return x - s * out
    return x / (s**2 + 1) - out * s / (s**2 + 1).sqrt()  # EulerDiscreteScheduler's v -> x0


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("rescale", [0.0, 0.7])
def test_guidance_matches_diffusers_formula_in_one_batched_call(prediction_type, rescale):
    g = torch.Generator().manual_seed(0)
    x = 5 * torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64)
    sigma = torch.tensor([5.0, 0.7], dtype=torch.float64)
    cond, uncond = torch.randn(2, 6, 8, generator=g), torch.zeros(2, 6, 8)
    network = ContextNetwork()
    denoiser = Denoiser(network, SCHEDULE, prediction_type, round_timesteps=False)  # as EulerDiscrete
    guided = ClassifierFreeGuidance(denoiser, {"context": cond}, {"context": uncond}, 7.5, rescale)
    x0 = guided(x, sigma)
    assert network.batches == [4]
    expected = diffusers_guided_x0(ContextNetwork(), prediction_type, x, sigma, cond, uncond, 7.5, rescale)
    torch.testing.assert_close(x0, expected)


def test_scale_one_runs_the_conditional_pass_only():
    network = ContextNetwork()
    cond = {"context": torch.ones(2, 6, 8)}
    guided = ClassifierFreeGuidance(
        Denoiser(network, SCHEDULE), cond, {"context": torch.zeros(2, 6, 8)}, 1.0, 0.5
    )
    x, sigma = torch.randn(2, 4, 3, 3), torch.tensor([1.0, 2.0])
    torch.testing.assert_close(guided(x, sigma), Denoiser(ContextNetwork(), SCHEDULE)(x, sigma, **cond))
    assert network.batches == [2]


def test_cond_and_uncond_must_have_the_same_entries():
    with pytest.raises(ValueError, match="same entries"):
        ClassifierFreeGuidance(lambda x, s, **c: x, {"context": torch.ones(1)}, {}, 7.5)


def test_guidance_interval_guides_only_at_high_noise():
    network = ContextNetwork()
    cond, uncond = {"context": torch.ones(2, 6, 8)}, {"context": torch.zeros(2, 6, 8)}
    guided = ClassifierFreeGuidance(Denoiser(network, SCHEDULE), cond, uncond, 3.0, min_sigma=5.0)
    always = ClassifierFreeGuidance(Denoiser(ContextNetwork(), SCHEDULE), cond, uncond, 3.0)
    x = torch.randn(2, 4, 3, 3)
    high, low = torch.tensor([8.0, 8.0]), torch.tensor([2.0, 2.0])
    torch.testing.assert_close(guided(x, high), always(x, high))  # sigma >= min_sigma: guided, one batch
    torch.testing.assert_close(guided(x, low), Denoiser(ContextNetwork(), SCHEDULE)(x, low, **cond))
    assert not torch.allclose(guided(x, low), always(x, low))
    assert network.batches == [4, 2, 2]  # below min_sigma only the conditional pass runs
