"""Token merging (ToMe for SD): the matching against a direct re-statement of the algorithm, the U-Net
against tomesd's patch of diffusers' U-Net (the oracle), and the pipeline option."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from tests.models.test_unet import SD1, SD2, paired_unets

from latentdiffusion.config import UNetConfig
from latentdiffusion.errors import UserError
from latentdiffusion.models.token_merging import (
    MergePlan,
    TokenMerging,
    destination_mask,
    merging_tokens,
    plan_for,
)
from latentdiffusion.pipelines.token_merging import TokenMergingUNet, finest_attention_downsample


def looped_merge_then_unmerge(x: torch.Tensor, is_destination: torch.Tensor, remove: int) -> torch.Tensor:
    """unmerge(merge(x)) token by token: each source goes to its most cosine-similar destination, the
    ``remove`` most similar sources merge (ties: lower position first), every destination becomes the
    mean of itself and its merged sources, and a merged source reads its destination."""
    out = x.clone()
    destinations = [i for i in range(x.shape[1]) if is_destination[i]]
    sources = [i for i in range(x.shape[1]) if not is_destination[i]]
    for b in range(x.shape[0]):
        unit = x[b] / x[b].norm(dim=-1, keepdim=True)
        best = {s: max(destinations, key=lambda d, s=s: float(unit[s] @ unit[d])) for s in sources}
        similarity = {s: float(unit[s] @ unit[best[s]]) for s in sources}
        merged = sorted(sources, key=lambda s: -similarity[s])[:remove]
        for d in destinations:
            group = [d] + [s for s in merged if best[s] == d]
            out[b, d] = x[b, group].mean(dim=0)
        for s in merged:
            out[b, s] = out[b, best[s]]
    return out


@pytest.mark.parametrize(("height", "width", "remove"), [(6, 6, 10), (5, 7, 20), (4, 4, 12)])
def test_merge_then_unmerge_matches_the_algorithm(height: int, width: int, remove: int) -> None:
    generator = torch.Generator().manual_seed(height * width)
    x = torch.randn(2, height * width, 8, generator=generator)
    partition = torch.Generator().manual_seed(3)
    plan = MergePlan(x, height, width, (2, 2), remove, torch.Generator().manual_seed(3))
    expected = looped_merge_then_unmerge(x, destination_mask(height, width, (2, 2), partition), remove)
    merged = plan.merge(x)
    removable = height * width - (height // 2) * (width // 2)
    assert merged.shape == (2, height * width - min(remove, removable), 8)
    torch.testing.assert_close(plan.unmerge(merged), expected)


def test_destinations_one_per_whole_cell() -> None:
    mask = destination_mask(5, 7, (2, 2), torch.Generator().manual_seed(0)).view(5, 7)
    assert mask[:4, :6].unflatten(0, (2, 2)).unflatten(2, (3, 2)).sum(dim=(1, 3)).eq(1).all()
    assert not mask[4].any() and not mask[:, 6].any()  # rows and columns outside whole cells are sources
    top_left = destination_mask(4, 4, (2, 2), None).view(4, 4)
    assert top_left[::2, ::2].all() and top_left.sum() == 4


def test_plan_only_at_merged_levels_and_inside_the_context() -> None:
    tokens = torch.randn(1, 64, 4)
    settings = TokenMerging(0.5)
    assert plan_for(tokens) is None
    with merging_tokens(settings, (8, 8), 999.0):
        assert plan_for(tokens).merge(tokens).shape == (1, 32, 4)
        assert plan_for(torch.randn(1, 16, 4)) is None  # 4x4: downsampled twice, above max_downsample 1
    with merging_tokens(replace(settings, max_downsample=2), (8, 8), 999.0):
        assert plan_for(torch.randn(1, 16, 4)).merge(torch.randn(1, 16, 4)).shape == (1, 8, 4)
    assert plan_for(tokens) is None


def test_partition_is_drawn_from_the_timestep() -> None:
    x = torch.randn(1, 256, 4)
    settings = TokenMerging(0.5)

    def destinations(t: float) -> torch.Tensor:
        with merging_tokens(settings, (16, 16), t):
            return plan_for(x).destinations

    assert torch.equal(destinations(999.0), destinations(999.0))
    assert not torch.equal(destinations(999.0), destinations(500.0))


@pytest.mark.parametrize("ratio", [-0.1, 0.8, True, "half"])
def test_bad_ratio_is_refused(ratio: object) -> None:
    with pytest.raises(UserError, match="token merging ratio"):
        TokenMerging(ratio)  # type: ignore[arg-type]


def test_finest_attention_level() -> None:
    assert finest_attention_downsample(SD1) == 1
    sdxl_like = UNetConfig(channel_mult=(1, 2, 4), attention_levels=(1, 2), transformer_depths=(0, 2, 10))
    assert finest_attention_downsample(sdxl_like) == 2


@pytest.mark.parametrize(("name", "config"), [("sd1", SD1), ("sd2", SD2)])
def test_unet_matches_tomesd(name: str, config: UNetConfig) -> None:
    tomesd = pytest.importorskip("tomesd")
    ours, theirs = paired_unets(config)
    tomesd.apply_patch(theirs, ratio=0.5, use_rand=False)  # destinations at each cell's top left
    merged = TokenMergingUNet(ours, TokenMerging(0.5, random_destinations=False))
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, config.in_channels, 16, 16, generator=generator)
    context = torch.randn(2, 5, config.context_dim, generator=generator)
    t = torch.tensor([981.0, 500.5])
    with torch.no_grad():
        expected = theirs(x, t, context).sample
        actual = merged(x, t, context)
        plain = ours(x, t, context)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)
    assert (actual - plain).abs().max() > 1e-2  # merging changed the output: the comparison means something


def test_zero_ratio_is_the_plain_unet() -> None:
    ours, _ = paired_unets(SD1)
    x, context = torch.randn(1, 4, 16, 16), torch.randn(1, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            TokenMergingUNet(ours, TokenMerging(0.0))(x, 999.0, context), ours(x, 999.0, context)
        )
