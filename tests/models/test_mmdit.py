"""SD3's MMDiT against diffusers' SD3Transformer2DModel (the oracle), tiny and fp32, with every weight random
(the zero-initialised adaLN-Zero modulations and final layer included): SD3 (no q/k norm), SD3.5 Large style
(RMS q/k norm) and SD3.5 Medium style (q/k norm and MMDiT-X dual attention), on a non-square latent
smaller than the positional-embedding grid, with and without skipped layers."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from latentdiffusion.checkpoints.mmdit_keys import mmdit_config_to_diffusers, mmdit_from_diffusers
from latentdiffusion.config import MMDiTConfig
from latentdiffusion.models.mmdit import MMDiT

diffusers = pytest.importorskip("diffusers")

# 4 heads of 8, context 24 wide, pooled 20 wide, an 8x8 patch grid; 6 output channels so that in != out
TINY = MMDiTConfig(
    in_channels=4,
    out_channels=6,
    patch_size=2,
    depth=3,
    num_heads=4,
    head_dim=8,
    context_dim=24,
    pooled_dim=20,
    pos_embed_max_size=8,
    sample_size=8,
)
VARIANTS = {
    "sd3": TINY,
    "sd35-large": replace(TINY, qk_norm="rms_norm"),
    "sd35-medium": replace(TINY, depth=4, qk_norm="rms_norm", dual_attention_layers=(0, 2)),
}


def randomize_(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Every tensor random in place: norm weights around 1, the rest (zero-initialised modulations and
    output layer, the positional embedding) around 0."""
    generator = torch.Generator().manual_seed(seed)
    for key, value in state.items():
        noise = torch.randn(value.shape, generator=generator) * 0.2
        is_norm_weight = ".norm" in key and ".linear" not in key
        value.copy_(noise + 1 if is_norm_weight else noise)
    return state


def diffusers_pair(config: MMDiTConfig, seed: int = 0) -> tuple[MMDiT, torch.nn.Module]:
    """diffusers' SD3Transformer2DModel of ``config`` with random weights, and ours loaded from it."""
    settings = {k: v for k, v in mmdit_config_to_diffusers(config).items() if k != "_class_name"}
    theirs = diffusers.SD3Transformer2DModel(**settings).eval()
    state = randomize_(theirs.state_dict(), seed)
    ours = MMDiT(config).eval()
    ours.load_state_dict(mmdit_from_diffusers(state))
    return ours, theirs


def inputs(config: MMDiTConfig, height: int = 6, width: int = 4, seed: int = 1) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, config.in_channels, height, width, generator=generator)
    t = torch.tensor([999.0, 312.5])
    context = torch.randn(2, 7, config.context_dim, generator=generator)
    y = torch.randn(2, config.pooled_dim, generator=generator)
    return x, t, context, y


def assert_matches(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape
    scale = theirs.abs().max().item()
    assert scale > 0.1  # the random weights reach the output
    assert (ours - theirs).abs().max().item() <= 1e-5 * max(1.0, scale)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("skip_layers", [(), (1,), (0, 2)])
@torch.no_grad()
def test_matches_diffusers(variant, skip_layers):
    config = VARIANTS[variant]
    ours, theirs = diffusers_pair(config)
    x, t, context, y = inputs(config)  # 3x2 patches: the centre of the 8x8 grid
    expected = theirs(x, context, y, t, skip_layers=list(skip_layers)).sample
    assert_matches(ours(x, t, context, y, skip_layers=skip_layers), expected)


@torch.no_grad()
def test_last_block_skipped_and_full_grid_match_diffusers():
    config = VARIANTS["sd35-medium"]
    ours, theirs = diffusers_pair(config, seed=3)
    x, t, context, y = inputs(config, height=16, width=16)  # the whole 8x8 grid
    for skip in ([], [3]):
        assert_matches(
            ours(x, t, context, y, skip_layers=skip), theirs(x, context, y, t, skip_layers=skip).sample
        )


def test_every_weight_matters_to_the_parity_test():
    """The randomised modulations are not zero, so the parity above exercises the adaLN-Zero paths."""
    ours, _ = diffusers_pair(VARIANTS["sd35-medium"])
    for name in (
        "blocks.0.image.modulation.weight",
        "blocks.3.context.modulation.bias",
        "final.linear.weight",
    ):
        assert ours.state_dict()[name].abs().min() > 0


@torch.no_grad()
def test_positional_embedding_is_cut_from_the_grid_centre():
    ours = MMDiT(TINY)
    size, dim = TINY.pos_embed_max_size, TINY.hidden_size
    grid = torch.arange(size * size * dim, dtype=torch.float32).reshape(1, size * size, dim)
    ours.pos_embed.copy_(grid)
    ours.patch_embed.weight.zero_()
    ours.patch_embed.bias.zero_()
    tokens = ours.embed_patches(torch.zeros(1, TINY.in_channels, 6, 4))  # 3 rows, 2 columns of patches
    rows, cols = torch.meshgrid(torch.arange(2, 5), torch.arange(3, 5), indexing="ij")  # top 2, left 3
    expected = grid[0, (rows * size + cols).flatten()]
    assert torch.equal(tokens[0], expected)


@torch.no_grad()
def test_scalar_timestep_and_single_pooled_row_broadcast():
    ours = MMDiT(TINY).eval()
    randomize_(ours.state_dict(), 4)
    x, _, context, y = inputs(TINY)
    t = torch.tensor(500.0)
    full = ours(x, t.expand(2), context, y[:1].expand(2, -1))
    assert torch.allclose(ours(x, t, context, y[:1]), full, atol=1e-6)
    assert torch.allclose(ours(x, 500.0, context, y[:1]), full, atol=1e-6)


@pytest.mark.parametrize(
    ("height", "width", "message"),
    [(5, 4, "not a multiple of the patch size 2"), (18, 4, "exceeds the positional-embedding grid")],
)
def test_unusable_latent_sizes_are_clear_errors(height, width, message):
    _, t, context, y = inputs(TINY)
    with pytest.raises(ValueError, match=message):
        MMDiT(TINY)(torch.zeros(2, 4, height, width), t, context, y)


def test_bad_inputs_and_configs_are_clear_errors():
    model = MMDiT(TINY)
    x, t, context, y = inputs(TINY)
    with pytest.raises(ValueError, match="skip_layers \\[3\\]"):
        model(x, t, context, y, skip_layers=(3,))
    with pytest.raises(ValueError, match="context must be"):
        model(x, t, context[..., :8], y)
    with pytest.raises(ValueError, match="y must be"):
        model(x, t, context, y[:, :8])
    with pytest.raises(ValueError, match="qk_norm"):
        MMDiT(replace(TINY, qk_norm="layer_norm"))
    with pytest.raises(ValueError, match="dual_attention_layers \\[5\\]"):
        MMDiT(replace(TINY, dual_attention_layers=(5,)))


def test_last_block_context_stream_is_pre_only():
    model = MMDiT(VARIANTS["sd35-medium"])
    last, first = model.blocks[-1].context, model.blocks[0]
    assert last.mlp is None and last.attn.to_out is None and last.modulation.out_features == 2 * 32
    assert first.image.attn2 is not None and first.image.modulation.out_features == 9 * 32
    assert model.blocks[1].image.attn2 is None


def test_patch_tokens_are_contiguous():
    """Non-contiguous tokens would make every linear layer copy its input (about 15% slower on CPU)."""
    tokens = MMDiT(TINY).embed_patches(torch.zeros(2, TINY.in_channels, 6, 4))
    assert tokens.is_contiguous()


@torch.no_grad()
def test_bfloat16_with_float32_embeddings_stays_near_float32():
    """The precision module's bf16 path: weights bf16 except the embedding MLPs (time_embed,
    pooled_embed), which stay float32; the q/k RMS norms compute in float32."""
    ours, _ = diffusers_pair(VARIANTS["sd35-medium"], seed=5)
    x, t, context, y = inputs(VARIANTS["sd35-medium"])
    reference = ours(x, t, context, y)
    ours.to(torch.bfloat16)
    ours.time_embed.float()
    ours.pooled_embed.float()
    out = ours(x.bfloat16(), t, context.bfloat16(), y)
    assert out.dtype == torch.bfloat16
    error = (out.float() - reference).abs().max() / reference.abs().max()
    assert error < 0.05
