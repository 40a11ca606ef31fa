"""The SDXL parts of the U-Net against diffusers' UNet2DConditionModel (the oracle), tiny and fp32:
per-level transformer depths, the mid block's own depth, and the vector conditioning y
(``add_embedding``, addition_embed_type "text_time")."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from latentdiffusion.checkpoints.unet_keys import from_diffusers_state_dict, to_diffusers_state_dict
from latentdiffusion.config import PRESETS, UNetConfig
from latentdiffusion.models.layers import timestep_embedding
from latentdiffusion.models.unet import FeatureCache, UNet, vector_conditioning

diffusers = pytest.importorskip("diffusers")

POOLED, TIME_DIM, TIME_IDS = 20, 8, 6  # pooled width, micro-conditioning sinusoid width, ids per sample
# SDXL base in miniature: no attention on level 0, depths (0, 2, 3) and so a mid block of depth 3,
# 8-wide heads, linear projections, y = pooled text embedding + 6 sinusoids
TINY_XL = UNetConfig(
    model_channels=16,
    channel_mult=(1, 2, 4),
    num_res_blocks=2,
    attention_levels=(1, 2),
    num_heads=None,
    head_dim=8,
    transformer_depths=(0, 2, 3),
    context_dim=24,
    use_linear_projection=True,
    adm_in_channels=POOLED + TIME_IDS * TIME_DIM,
    norm_groups=8,
)


def diffusers_xl_unet(config: UNetConfig, middle: int | None = None) -> torch.nn.Module:
    """diffusers' SDXL-style U-Net of ``config``'s shape; ``middle`` overrides the last level's depth
    entry (which diffusers also gives its mid block) for a config whose last level has no attention."""
    widths = [config.model_channels * m for m in config.channel_mult]
    attention = [level in config.attention_levels for level in range(len(widths))]
    depths = [max(config.depth_at(level), 1) for level in range(len(widths))]
    if middle is not None:
        depths[-1] = middle
    return diffusers.UNet2DConditionModel(
        block_out_channels=tuple(widths),
        layers_per_block=config.num_res_blocks,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        attention_head_dim=tuple(w // config.head_dim for w in widths),
        transformer_layers_per_block=tuple(depths),
        cross_attention_dim=config.context_dim,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_DIM,
        projection_class_embeddings_input_dim=config.adm_in_channels,
        norm_num_groups=config.norm_groups,
    )


def paired(config: UNetConfig, middle: int | None = None) -> tuple[UNet, torch.nn.Module]:
    torch.manual_seed(0)
    theirs = diffusers_xl_unet(config, middle).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # norms and biases away from their 1/0 defaults
        for p in theirs.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    ours = UNet(config).eval()
    ours.load_state_dict(from_diffusers_state_dict(theirs.state_dict()), strict=True)
    return ours, theirs


def inputs(config: UNetConfig, batch: int = 2) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    sizes = torch.tensor(
        [[1024.0, 768.0, 0.0, 64.0, 1024.0, 1024.0], [512.0, 512.0, 16.0, 0.0, 896.0, 1152.0]]
    )
    return {
        "x": torch.randn(batch, 4, 16, 12, generator=generator),
        "t": torch.tensor([981.0, 250.5])[:batch],
        "context": torch.randn(batch, 7, config.context_dim, generator=generator),
        "pooled": torch.randn(batch, POOLED, generator=generator),
        "time_ids": sizes[:batch],
    }


def test_micro_conditioning_sinusoid_is_diffusers_add_time_proj() -> None:
    _, theirs = paired(TINY_XL)
    ids = inputs(TINY_XL)["time_ids"].flatten()
    torch.testing.assert_close(timestep_embedding(ids, TIME_DIM), theirs.add_time_proj(ids), atol=0, rtol=0)


@pytest.mark.parametrize(
    ("config", "middle"),
    [
        (TINY_XL, None),
        # the refiner's shape: a last level without attention, so the mid block's depth is its own
        (
            replace(
                TINY_XL,
                channel_mult=(1, 2, 2, 4),
                transformer_depths=(0, 2, 1, 0),
                transformer_depth_middle=2,
            ),
            2,
        ),
    ],
    ids=["base", "last-level-without-attention"],
)
def test_sdxl_unet_matches_diffusers(config: UNetConfig, middle: int | None) -> None:
    ours, theirs = paired(config, middle)
    assert len(ours.mid_block.attention.blocks) == config.middle_depth
    assert [len(a.blocks) for a in ours.down_blocks[1].attentions] == [2, 2]
    given = inputs(config)
    y = vector_conditioning(given["pooled"], given["time_ids"], TIME_DIM)
    assert y.shape == (2, config.adm_in_channels) and y.dtype == torch.float32
    added = {"text_embeds": given["pooled"], "time_ids": given["time_ids"]}
    with torch.no_grad():
        expected = theirs(given["x"], given["t"], given["context"], added_cond_kwargs=added).sample
        actual = ours(given["x"], given["t"], given["context"], y=y)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_deepcache_runs_with_vector_conditioning() -> None:
    ours, _ = paired(TINY_XL)
    given = inputs(TINY_XL)
    y = vector_conditioning(given["pooled"], given["time_ids"], TIME_DIM)
    cache = FeatureCache(branch=1)
    with torch.no_grad():
        plain = ours(given["x"], given["t"], given["context"], y=y)
        full = ours(given["x"], given["t"], given["context"], cache=cache, y=y)
        cache.reuse = True
        shallow = ours(given["x"], given["t"], given["context"], cache=cache, y=y)
    torch.testing.assert_close(full, plain, atol=0, rtol=0)
    torch.testing.assert_close(shallow, plain, atol=0, rtol=0)  # same step: the cached features are exact


def test_y_of_batch_one_broadcasts() -> None:
    ours = UNet(TINY_XL).eval()
    given = inputs(TINY_XL)
    y = vector_conditioning(given["pooled"][:1], given["time_ids"][:1], TIME_DIM)
    with torch.no_grad():
        one = ours(given["x"], given["t"], given["context"], y=y)
        both = ours(given["x"], given["t"], given["context"], y=y.expand(2, -1))
    torch.testing.assert_close(one, both)


def test_missing_or_unexpected_y_is_a_clear_error() -> None:
    given = inputs(TINY_XL)
    with pytest.raises(ValueError, match="pass y"):
        UNet(TINY_XL)(given["x"], given["t"], given["context"])
    with pytest.raises(ValueError, match=r"y must be \[2, 68\]"):
        UNet(TINY_XL)(given["x"], given["t"], given["context"], y=torch.zeros(2, 67))
    plain = UNet(replace(TINY_XL, adm_in_channels=None))
    assert plain.add_embedding is None
    with pytest.raises(ValueError, match="no vector conditioning"):
        plain(given["x"], given["t"], given["context"], y=torch.zeros(2, 68))


def test_vector_mlp_stays_float32_in_a_bfloat16_unet() -> None:
    """The fast path keeps the time and vector MLPs in float32 and runs the rest in bfloat16."""
    ours, _ = paired(TINY_XL)
    given = inputs(TINY_XL)
    y = vector_conditioning(given["pooled"], given["time_ids"], TIME_DIM)
    with torch.no_grad():
        expected = ours(given["x"], given["t"], given["context"], y=y)
        ours.to(torch.bfloat16)
        ours.time_embedding.float()
        ours.add_embedding.float()
        emb = ours.embed(given["x"].bfloat16(), given["t"], y=y)
        actual = ours(given["x"].bfloat16(), given["t"], given["context"].bfloat16(), y=y)
    assert emb.dtype == torch.bfloat16 and actual.dtype == torch.bfloat16
    torch.testing.assert_close(actual.float(), expected, atol=0.1, rtol=0.05)


def test_depth_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="one entry per level"):
        UNet(replace(TINY_XL, transformer_depths=(2, 3)))
    with pytest.raises(ValueError, match=r"attention levels \[1\]"):
        UNet(replace(TINY_XL, transformer_depths=(0, 0, 3)))
    with pytest.raises(ValueError, match="mid block"):
        UNet(replace(TINY_XL, transformer_depth_middle=0))


def test_default_depths_are_unchanged() -> None:
    config = UNetConfig(transformer_depth=2)
    assert [config.depth_at(level) for level in range(4)] == [2, 2, 2, 2] and config.middle_depth == 2
    assert TINY_XL.middle_depth == 3 and TINY_XL.depth_at(-1) == 3


def test_full_size_sdxl_unets_on_meta_match_diffusers() -> None:
    """SDXL base (2.57B parameters) and refiner U-Nets: every parameter and shape of diffusers' own."""
    base, refiner = PRESETS["sdxl"].unet, PRESETS["sdxl-refiner"].unet
    for config, params in ((base, 2_567_463_684), (refiner, 2_259_526_660)):
        with torch.device("meta"):
            ours = UNet(config)
            theirs = diffusers.UNet2DConditionModel(
                block_out_channels=[config.model_channels * m for m in config.channel_mult],
                down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
                + ["DownBlock2D"] * (len(config.channel_mult) - 3),
                up_block_types=["UpBlock2D"] * (len(config.channel_mult) - 3)
                + ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                attention_head_dim=[config.model_channels * m // 64 for m in config.channel_mult],
                transformer_layers_per_block=[1, 2, 10] if config is base else 4,
                cross_attention_dim=config.context_dim,
                use_linear_projection=True,
                addition_embed_type="text_time",
                addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=config.adm_in_channels,
            )
        assert sum(p.numel() for p in ours.parameters()) == params
        ours_shapes = {k: v.shape for k, v in to_diffusers_state_dict(ours.state_dict()).items()}
        assert ours_shapes == {k: v.shape for k, v in theirs.state_dict().items()}
