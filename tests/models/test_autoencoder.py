"""Autoencoder parity with diffusers' AutoencoderKL (the oracle) on tiny random configs, fp32."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from latentdiffusion.checkpoints.autoencoder_keys import from_diffusers_state_dict, to_diffusers_state_dict
from latentdiffusion.config import PRESETS, AutoencoderConfig
from latentdiffusion.models.autoencoder import Autoencoder

diffusers = pytest.importorskip("diffusers")

CONFIG = AutoencoderConfig(
    block_channels=(32, 64, 64), num_res_blocks=1, norm_groups=16, scaling_factor=0.5, shift_factor=0.1
)


def diffusers_autoencoder(config: AutoencoderConfig) -> torch.nn.Module:
    levels = len(config.block_channels)
    return diffusers.AutoencoderKL(
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=config.block_channels,
        layers_per_block=config.num_res_blocks,
        latent_channels=config.latent_channels,
        norm_num_groups=config.norm_groups,
        scaling_factor=config.scaling_factor,
        shift_factor=config.shift_factor,
        use_quant_conv=config.use_quant_conv,
        use_post_quant_conv=config.use_quant_conv,
    )


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturb every parameter so that norms and biases are not at their 1/0 defaults."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return module


@pytest.fixture(scope="module")
def pair() -> tuple[Autoencoder, torch.nn.Module]:
    torch.manual_seed(0)
    theirs = randomize_(diffusers_autoencoder(CONFIG)).eval()
    ours = Autoencoder(CONFIG).eval()
    ours.load_state_dict(from_diffusers_state_dict(theirs.state_dict()), strict=True)
    return ours, theirs


def images(size: tuple[int, int] = (16, 16)) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.rand(2, 3, *size, generator=generator) * 2 - 1


@pytest.mark.parametrize("size", [(16, 16), (15, 13)])
@torch.no_grad()
def test_encode_matches_diffusers(pair, size) -> None:
    ours, theirs = pair
    x = images(size)
    expected = theirs.encode(x).latent_dist
    actual = ours.encode(x)
    torch.testing.assert_close(actual.mean, expected.mean, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(actual.logvar, expected.logvar, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(actual.kl(), expected.kl(), atol=1e-3, rtol=1e-4)
    sample = actual.sample(torch.Generator().manual_seed(2))
    torch.testing.assert_close(
        sample, expected.sample(torch.Generator().manual_seed(2)), atol=1e-4, rtol=1e-4
    )


@torch.no_grad()
def test_decode_matches_diffusers(pair) -> None:
    ours, theirs = pair
    z = torch.randn(2, 4, 4, 5, generator=torch.Generator().manual_seed(3))
    expected = theirs.decode(z).sample
    actual = ours.decode(z)
    assert actual.shape == (2, 3, 16, 20)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_latent_codec_applies_scale_and_shift(pair) -> None:
    ours, _ = pair
    x = images()
    posterior = ours.encode(x)
    latents = ours.to_latent(x)
    torch.testing.assert_close(latents, (posterior.mode() - 0.1) * 0.5)
    torch.testing.assert_close(ours.from_latent(latents), ours.decode(posterior.mode()))
    sampled = ours.to_latent(x, generator=torch.Generator().manual_seed(4), sample=True)
    expected = (posterior.sample(torch.Generator().manual_seed(4)) - 0.1) * 0.5
    torch.testing.assert_close(sampled, expected)


def test_legacy_diffusers_attention_names_load(pair) -> None:
    theirs = pair[1]
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for key, value in theirs.state_dict().items():
        for new, old in legacy.items():
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        state[key] = value
    assert any(".query." in key for key in state)
    Autoencoder(CONFIG).load_state_dict(from_diffusers_state_dict(state), strict=True)


def test_key_table_is_bijective_on_full_size_autoencoders() -> None:
    for preset in ("sd15", "sd-x4-upscaler"):
        config = PRESETS[preset].autoencoder
        with torch.device("meta"):
            ours = Autoencoder(config)
            theirs = diffusers_autoencoder(config)
        state = ours.state_dict()
        mapped = to_diffusers_state_dict(state)
        assert {k: v.shape for k, v in mapped.items()} == {k: v.shape for k, v in theirs.state_dict().items()}
        assert list(from_diffusers_state_dict(mapped)) == list(state)


@torch.no_grad()
def test_autoencoder_without_quant_convs_matches_diffusers() -> None:
    """SD3's first stage: 16 latent channels, no 1x1 convolutions around the latent, scale and shift."""
    config = replace(
        CONFIG, latent_channels=16, use_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609
    )
    theirs = randomize_(diffusers_autoencoder(config), seed=2).eval()
    ours = Autoencoder(config).eval()
    ours.load_state_dict(from_diffusers_state_dict(theirs.state_dict()), strict=True)
    assert not any("quant_conv" in key for key in ours.state_dict())
    x = images()
    torch.testing.assert_close(ours.encode(x).mean, theirs.encode(x).latent_dist.mean, atol=1e-5, rtol=1e-5)
    z = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours.decode(z), theirs.decode(z).sample, atol=1e-5, rtol=1e-5)
