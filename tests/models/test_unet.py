"""UNet parity with diffusers' UNet2DConditionModel (the oracle) on tiny random configs, fp32."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from latentdiffusion.checkpoints.unet_keys import from_diffusers_state_dict, to_diffusers_state_dict
from latentdiffusion.config import PRESETS, UNetConfig
from latentdiffusion.models.attention import Attention
from latentdiffusion.models.layers import timestep_embedding
from latentdiffusion.models.unet import UNet

diffusers = pytest.importorskip("diffusers")

SD1 = UNetConfig(
    model_channels=32,
    channel_mult=(1, 2),
    num_res_blocks=2,
    attention_levels=(0, 1),
    num_heads=2,
    context_dim=32,
)
SD2 = UNetConfig(
    model_channels=32,
    channel_mult=(1, 2, 2),
    num_res_blocks=1,
    attention_levels=(0, 1, 2),
    num_heads=None,
    head_dim=16,
    transformer_depth=2,
    context_dim=32,
    use_linear_projection=True,
    norm_groups=16,
)
X4 = UNetConfig(
    in_channels=7,
    model_channels=32,
    channel_mult=(1, 2, 2),
    num_res_blocks=1,
    attention_levels=(1, 2),
    num_heads=2,
    context_dim=32,
    use_linear_projection=True,
    only_cross_attention=(True, True, False),
    num_class_embeds=10,
)
VARIANTS = {
    "sd1": SD1,
    "sd1-inpaint": replace(SD1, in_channels=9),
    "sd2": SD2,
    "sd2-inpaint": replace(SD2, in_channels=9),
    "x4-upscaler": X4,
}


def diffusers_unet(config: UNetConfig) -> torch.nn.Module:
    """diffusers' UNet2DConditionModel with the same architecture as ``UNet(config)``."""
    levels = range(len(config.channel_mult))
    widths = [config.model_channels * m for m in config.channel_mult]
    has_attention = [level in config.attention_levels for level in levels]
    # diffusers' (misnamed) attention_head_dim is a head count, per level for SD2
    heads = config.num_heads if config.head_dim is None else tuple(config.heads_at(w) for w in widths)
    return diffusers.UNet2DConditionModel(
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        block_out_channels=tuple(widths),
        layers_per_block=config.num_res_blocks,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attention)),
        attention_head_dim=heads,
        transformer_layers_per_block=config.transformer_depth,
        cross_attention_dim=config.context_dim,
        use_linear_projection=config.use_linear_projection,
        only_cross_attention=list(config.only_cross_attention) or False,
        num_class_embeds=config.num_class_embeds,
        norm_num_groups=config.norm_groups,
        norm_eps=config.norm_eps,
        upcast_attention=config.upcast_attention,
        flip_sin_to_cos=True,
        freq_shift=0,
    )


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturb every parameter so that norms and biases are not at their 1/0 defaults."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return module


def paired_unets(config: UNetConfig) -> tuple[UNet, torch.nn.Module]:
    torch.manual_seed(0)
    theirs = randomize_(diffusers_unet(config)).eval()
    ours = UNet(config).eval()
    ours.load_state_dict(from_diffusers_state_dict(theirs.state_dict()), strict=True)
    return ours, theirs


@pytest.mark.parametrize("name", list(VARIANTS))
def test_unet_matches_diffusers(name: str) -> None:
    config = VARIANTS[name]
    ours, theirs = paired_unets(config)
    generator = torch.Generator().manual_seed(1)
    size = (12, 10) if name == "x4-upscaler" else (16, 16)  # 10 is not a multiple of 4: odd skips
    x = torch.randn(2, config.in_channels, *size, generator=generator)
    context = torch.randn(2, 5, config.context_dim, generator=generator)
    t = torch.tensor([981.0, 500.5])
    labels = torch.tensor([3, 7]) if config.num_class_embeds else None
    with torch.no_grad():
        expected = theirs(x, t, context, class_labels=labels).sample
        actual = ours(x, t, context, class_labels=labels)
    assert actual.shape == (2, config.out_channels, *size)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def test_scalar_timestep_broadcasts() -> None:
    ours, _ = paired_unets(SD1)
    x = torch.randn(2, 4, 8, 8)
    context = torch.randn(2, 3, 32)
    with torch.no_grad():
        scalar = ours(x, 500.5, context)
        batch = ours(x, torch.tensor([500.5, 500.5]), context)
    torch.testing.assert_close(scalar, batch)


def test_class_labels_required() -> None:
    ours = UNet(X4)
    with pytest.raises(ValueError, match="class_labels"):
        ours(torch.randn(1, 7, 8, 8), 10.0, torch.randn(1, 3, 32))


def test_timestep_embedding_matches_diffusers() -> None:
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0.0, 1.5, 500.5, 999.0])
    for dim in (32, 33):
        expected = get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        torch.testing.assert_close(timestep_embedding(t, dim), expected)


def test_upcast_attention_in_bfloat16() -> None:
    torch.manual_seed(0)
    attention = Attention(32, 16, heads=2, upcast=True)
    x, context = torch.randn(1, 6, 32), torch.randn(1, 4, 16)
    expected = attention(x, context)
    actual = attention.to(torch.bfloat16)(x.bfloat16(), context.bfloat16())
    assert actual.dtype == torch.bfloat16
    torch.testing.assert_close(actual.float(), expected, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("preset", ["sd15", "sd21", "sd-x4-upscaler"])
def test_key_table_is_bijective_on_full_size_unets(preset: str) -> None:
    with torch.device("meta"):
        keys = UNet(PRESETS[preset].unet).state_dict().keys()
    state = dict.fromkeys(keys, 0)
    assert list(from_diffusers_state_dict(to_diffusers_state_dict(state))) == list(state)


def test_full_size_sd15_unet_on_meta() -> None:
    config = PRESETS["sd15"].unet
    with torch.device("meta"):
        ours = UNet(config)
        theirs = diffusers_unet(config)
    assert sum(p.numel() for p in ours.parameters()) == 859_520_964  # SD 1.5's UNet: 859.5M
    ours_shapes = {k: v.shape for k, v in to_diffusers_state_dict(ours.state_dict()).items()}
    assert ours_shapes == {k: v.shape for k, v in theirs.state_dict().items()}
