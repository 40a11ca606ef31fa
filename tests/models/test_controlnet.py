"""ControlNet network: parity with diffusers' ControlNetModel (our keys <-> diffusers keys and the original
single-file keys), and the U-Net's residual inputs against diffusers' UNet2DConditionModel."""

import pytest
import torch

from latentdiffusion.checkpoints.layout import read_layout, write_layout
from latentdiffusion.checkpoints.original_keys import controlnet_layout
from latentdiffusion.checkpoints.unet_keys import (
    controlnet_from_diffusers,
    controlnet_to_diffusers,
)
from latentdiffusion.checkpoints.unet_keys import from_diffusers_state_dict as unet_from_diffusers
from latentdiffusion.config import TINY, ControlNetConfig
from latentdiffusion.models.controlnet import ControlNet
from latentdiffusion.models.unet import UNet

CONFIG = ControlNetConfig(TINY.unet, hint_channels=(16, 32))  # a 2x hint encoder, as TINY's latents


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere: zero convolutions included, or the test proves nothing."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2 + (parameter == 1) * 1.0)


def diffusers_pair():
    from diffusers import ControlNetModel
    from tests.pipelines.conftest import diffusers_unet

    unet = diffusers_unet(TINY.unet)
    theirs = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=CONFIG.hint_channels)
    randomise(theirs, 7)
    randomise(unet, 8)
    return unet.eval(), theirs.eval()


def inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    context = torch.randn(2, 5, TINY.unet.context_dim, generator=g)
    hint = torch.rand(2, 3, 16, 16, generator=g)
    return x, torch.tensor([10.0, 700.0]), context, hint


@pytest.fixture(scope="module")
def pair():
    return diffusers_pair()


def test_zero_convolutions_are_randomised(pair):
    _, theirs = pair
    assert theirs.controlnet_mid_block.weight.abs().sum() > 0
    assert theirs.controlnet_cond_embedding.conv_out.weight.abs().sum() > 0


@torch.no_grad()
def test_controlnet_matches_diffusers(pair):
    _, theirs = pair
    ours = ControlNet(CONFIG).eval()
    ours.load_state_dict(controlnet_from_diffusers(theirs.state_dict()))
    x, t, context, hint = inputs()
    down, mid = ours(x, t, context, hint)
    expected = theirs(x, t, context, hint, conditioning_scale=1.0, return_dict=False)
    assert len(down) == len(expected[0])
    for a, b in zip(down, expected[0], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(mid, expected[1], atol=1e-5, rtol=1e-4)
    assert controlnet_to_diffusers(ours.state_dict()).keys() == theirs.state_dict().keys()


@pytest.mark.parametrize("prefix", ["control_model.", ""])
def test_original_layout_round_trip(pair, prefix):
    _, theirs = pair
    ours = controlnet_from_diffusers(theirs.state_dict())
    stored = write_layout(ours, controlnet_layout(CONFIG, prefix))
    # the names of cldm's ControlNet (SD 1.5 layout)
    for key in (
        "input_hint_block.0.weight",
        "input_hint_block.2.weight",
        "input_hint_block.4.weight",  # the stride-2 conv
        "input_hint_block.6.weight",  # the zero conv to model_channels
        "zero_convs.0.0.weight",
        "middle_block_out.0.bias",
        "input_blocks.0.0.weight",
        "input_blocks.1.0.in_layers.0.weight",
        "input_blocks.3.1.transformer_blocks.0.attn2.to_k.weight",
        "input_blocks.2.0.op.weight",
        "middle_block.1.proj_in.weight",
        "time_embed.0.weight",
    ):
        assert prefix + key in stored
    assert stored[prefix + "input_hint_block.6.weight"].shape[0] == TINY.unet.model_channels
    back = read_layout(stored, controlnet_layout(CONFIG, prefix))
    model = ControlNet(CONFIG)
    model.load_state_dict(back)  # strict: every key found its way back
    assert all(torch.equal(back[k], v) for k, v in ours.items())


@torch.no_grad()
def test_unet_residuals_match_diffusers(pair):
    unet, theirs = pair
    ours = UNet(TINY.unet).eval()
    ours.load_state_dict(unet_from_diffusers(unet.state_dict()))
    x, t, context, hint = inputs()
    down, mid = theirs(x, t, context, hint, conditioning_scale=0.7, return_dict=False)
    expected = unet(
        x, t, context, down_block_additional_residuals=down, mid_block_additional_residual=mid
    ).sample
    actual = ours(x, t, context, down_residuals=down, mid_residual=mid)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(actual, ours(x, t, context), atol=1e-3)


def test_residuals_and_deep_cache_are_refused_together():
    from latentdiffusion.models.unet import FeatureCache

    unet = UNet(TINY.unet)
    x, t, context, _ = inputs()
    with pytest.raises(ValueError, match="DeepCache"):
        unet(x, t, context, cache=FeatureCache(), mid_residual=torch.zeros(1))
