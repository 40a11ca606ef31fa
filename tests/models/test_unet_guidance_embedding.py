"""LCM-distilled U-Nets' guidance embedding (time_cond_proj_dim): parity with diffusers'
UNet2DConditionModel(time_cond_proj_dim=...) and its pipeline's guidance-scale embedding."""

from dataclasses import replace

import pytest
import torch

from latentdiffusion.checkpoints.unet_keys import from_diffusers_state_dict
from latentdiffusion.config import TINY
from latentdiffusion.models.unet import UNet, guidance_embedding

COND_DIM = 17  # odd: the embedding's zero padding is exercised


def diffusers_lcm_unet(config):
    from diffusers import UNet2DConditionModel
    from tests.pipelines.conftest import diffusers_unet

    base = diffusers_unet(config)
    return UNet2DConditionModel.from_config(base.config, time_cond_proj_dim=COND_DIM)


@pytest.mark.parametrize("dim", [COND_DIM, 256])
def test_guidance_embedding_matches_diffusers(dim):
    from diffusers import LatentConsistencyModelPipeline

    w = torch.tensor([0.0, 1.5, 7.0])
    expected = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
    torch.testing.assert_close(guidance_embedding(w, dim), expected, rtol=0, atol=1e-6)


def test_unet_with_timestep_cond_matches_diffusers():
    config = replace(TINY.unet, time_cond_proj_dim=COND_DIM)
    theirs = diffusers_lcm_unet(config).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in theirs.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1 + (parameter == 1) * 1.0)
    ours = UNet(config).eval()
    ours.load_state_dict(from_diffusers_state_dict(theirs.state_dict()))
    x = torch.randn(2, config.in_channels, 16, 16, generator=generator)
    context = torch.randn(2, 7, config.context_dim, generator=generator)
    t = torch.tensor([999.0, 259.0])
    cond = guidance_embedding(torch.tensor([7.0, 3.0]), COND_DIM)
    with torch.no_grad():
        expected = theirs(x, t, encoder_hidden_states=context, timestep_cond=cond).sample
        actual = ours(x, t, context, timestep_cond=cond)
        without = ours(x, t, context)
    torch.testing.assert_close(actual, expected, rtol=0, atol=2e-5)
    assert (without - actual).abs().max() > 1e-3  # the embedding reaches the output


def test_timestep_cond_is_refused_by_a_unet_without_it():
    ours = UNet(TINY.unet).eval()
    x, context = torch.randn(1, 4, 8, 8), torch.randn(1, 3, TINY.unet.context_dim)
    with pytest.raises(ValueError, match="time_cond_proj_dim"):
        ours(x, torch.tensor([10.0]), context, timestep_cond=torch.zeros(1, 8))
