"""LyCORIS updates (models.lycoris): each kind's Delta W equals the closed form written out here with
einsum / kron, and the LyCORIS package's own weight-delta functions where it is installed; DoRA's merge
equals the decomposition written out here and LyCORIS's at strength 1."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from latentdiffusion.models.lycoris import Full, LoConTucker, LoHa, LoKr, dora_weight, merge_into


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed + sum(shape)))


OUT, IN, K, R = 6, 4, 3, 2


def loha_matrix(alpha=1.0) -> LoHa:  # a Linear [OUT, IN]
    return LoHa(randn(OUT, R), randn(R, IN, seed=1), randn(OUT, R, seed=2), randn(R, IN, seed=3), alpha=alpha)


def loha_tucker(alpha=None) -> LoHa:  # a conv [OUT, IN, K, K]
    w1_a, w1_b, w2_a, w2_b = randn(R, OUT), randn(R, IN, seed=1), randn(R, OUT, seed=2), randn(R, IN, seed=3)
    return LoHa(w1_a, w1_b, w2_a, w2_b, randn(R, R, K, K, seed=4), randn(R, R, K, K, seed=5), alpha=alpha)


def locon_tucker(alpha=1.0) -> LoConTucker:
    return LoConTucker(randn(R, IN, 1, 1), randn(R, R, K, K, seed=1), randn(OUT, R, 1, 1, seed=2), alpha)


# a LoKr of [OUT, IN] = [2 * 3, 2 * 2] and of a conv [OUT, IN, K, K]
LOKR = {
    "whole": lambda: LoKr(w1=randn(2, 2), w2=randn(3, 2, seed=1), alpha=7.0),  # alpha ignored: gamma 1
    "w1-pair": lambda: LoKr(w1_a=randn(2, R), w1_b=randn(R, 2, seed=1), w2=randn(3, 2, seed=2), alpha=1.0),
    "w2-pair": lambda: LoKr(w1=randn(2, 2), w2_a=randn(3, R, seed=1), w2_b=randn(R, 2, seed=2), alpha=3.0),
    "conv-pair": lambda: LoKr(w1=randn(2, 2), w2_a=randn(3, R, seed=1), w2_b=randn(R, 2, K, K, seed=2)),
    "conv-tucker": lambda: LoKr(
        w1=randn(2, 2), w2_a=randn(R, 3, seed=1), w2_b=randn(R, 2, seed=2), t2=randn(R, R, K, K, seed=3)
    ),
}


def lokr_closed_form(w: LoKr) -> torch.Tensor:
    w1 = w.w1 if w.w1 is not None else w.w1_a @ w.w1_b
    if w.w2 is not None:
        w2, rank = w.w2, (w.w1_b.shape[0] if w.w1_b is not None else None)
    elif w.t2 is not None:
        w2, rank = torch.einsum("abkl,ac,bd->cdkl", w.t2, w.w2_a, w.w2_b), w.w2_b.shape[0]
    else:
        w2, rank = (w.w2_a @ w.w2_b.flatten(1)).reshape(3, *w.w2_b.shape[1:]), w.w2_b.shape[0]
    gamma = 1.0 if w.alpha is None or rank is None else w.alpha / rank
    w1 = w1.reshape(*w1.shape, *[1] * (w2.ndim - 2))
    return gamma * torch.kron(w1, w2.contiguous())


def test_loha_is_the_hadamard_product_of_two_low_rank_products():
    w = loha_matrix(alpha=1.0)
    expected = (w.w1_a @ w.w1_b) * (w.w2_a @ w.w2_b) / R
    torch.testing.assert_close(w.delta(), expected)


def test_loha_tucker_rebuilds_each_factor_from_its_core():
    w = loha_tucker()
    first = torch.einsum("abkl,ao,bi->oikl", w.t1, w.w1_a, w.w1_b)
    second = torch.einsum("abkl,ao,bi->oikl", w.t2, w.w2_a, w.w2_b)
    assert w.delta().shape == (OUT, IN, K, K)
    torch.testing.assert_close(w.delta(), first * second)


def test_locon_tucker_contracts_mid_with_up_and_down():
    w = locon_tucker(alpha=1.0)
    expected = torch.einsum("oa,abkl,bi->oikl", w.up.flatten(1), w.mid, w.down.flatten(1)) / R
    torch.testing.assert_close(w.delta(), expected)


@pytest.mark.parametrize("case", list(LOKR))
def test_lokr_is_a_kronecker_product_scaled_by_the_factored_halfs_rank(case):
    w = LOKR[case]()
    torch.testing.assert_close(w.delta(), lokr_closed_form(w))
    assert w.delta().flatten(1).shape == (OUT, IN * (K * K if "conv" in case else 1))


def test_lokr_conv_halves_agree_with_a_4d_kronecker_product():
    """A conv LoKr's matrix form [a c, b d k k] is the 4-D product [a c, b d, k, k] flattened."""
    w = LOKR["conv-pair"]()
    w2 = (w.w2_a @ w.w2_b.flatten(1)).reshape(3, 2, K, K)
    torch.testing.assert_close(w.delta().reshape(OUT, IN, K, K), torch.kron(w.w1[:, :, None, None], w2))


def test_full_is_the_stored_difference_with_its_bias():
    w = Full(randn(OUT, IN), randn(OUT, seed=1))
    layer = nn.Linear(IN, OUT)
    before_w, before_b = layer.weight.detach().clone(), layer.bias.detach().clone()
    merge_into(layer, w.delta(), 0.5, None, w.bias_delta())
    torch.testing.assert_close(layer.weight.detach(), before_w + 0.5 * w.diff)
    torch.testing.assert_close(layer.bias.detach(), before_b + 0.5 * w.diff_b)


def test_mismatched_hadamard_factors_are_reported():
    w = LoHa(randn(OUT, R), randn(R, IN), randn(OUT + 1, R), randn(R, IN))
    with pytest.raises(ValueError, match="Hadamard factors"):
        w.shape  # noqa: B018


# -------------------------------------------------------------------------------------------- DoRA


def dora_closed_form(weight, delta, magnitude, rows: bool) -> torch.Tensor:
    merged = weight + delta
    if rows:  # one norm per output row
        norm = merged.flatten(1).norm(dim=1).reshape(-1, *[1] * (merged.ndim - 1))
    else:  # one norm per input column, over the outputs and the kernel
        norm = merged.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, *[1] * (merged.ndim - 2))
    return magnitude.reshape(norm.shape) * merged / norm


@pytest.mark.parametrize("rows", [True, False])
@pytest.mark.parametrize("kernel", [(), (K, K)])
def test_dora_merge_is_the_magnitude_times_the_normalised_weight(rows, kernel):
    layer = nn.Conv2d(IN, OUT, K) if kernel else nn.Linear(IN, OUT)
    weight, delta = layer.weight.detach().clone(), 0.1 * randn(OUT, IN, *kernel)
    magnitude = (1 + randn(OUT, seed=4).abs()) if rows else (1 + randn(1, IN, *[1] * len(kernel)).abs())
    expected = dora_closed_form(weight, delta, magnitude, rows)
    torch.testing.assert_close(dora_weight(weight, delta, magnitude), expected, atol=1e-6, rtol=1e-5)
    merge_into(layer, delta, 0.25, magnitude)  # a strength interpolates between W and the DoRA weight
    torch.testing.assert_close(
        layer.weight.detach(), weight + 0.25 * (expected - weight), atol=1e-6, rtol=1e-5
    )


# ------------------------------------------------------------------- the LyCORIS package as oracle


@pytest.fixture(scope="module")
def lycoris():
    pytest.importorskip("lycoris")
    from lycoris.functional import general, locon, loha, lokr

    return {"locon": locon, "loha": loha, "lokr": lokr, "general": general}


def test_loha_and_locon_match_lycoris(lycoris):
    w = loha_matrix(alpha=1.0)
    theirs = lycoris["loha"].diff_weight(w.w1_b, w.w1_a, w.w2_b, w.w2_a, None, None, gamma=1.0 / R)
    torch.testing.assert_close(w.delta(), theirs.reshape(OUT, IN))
    w = loha_tucker()
    theirs = lycoris["loha"].diff_weight(w.w1_b, w.w1_a, w.w2_b, w.w2_a, w.t1, w.t2, gamma=1.0)
    torch.testing.assert_close(w.delta(), theirs)
    w = locon_tucker(alpha=1.0)
    theirs = lycoris["locon"].diff_weight(w.down, w.up, w.mid, gamma=1.0 / R)
    torch.testing.assert_close(w.delta(), theirs)


@pytest.mark.parametrize("case", ["whole", "w1-pair", "w2-pair", "conv-pair"])
def test_lokr_matches_lycoris(lycoris, case):
    """LyCORIS's ``lokr.diff_weight`` takes alpha as gamma and divides by the factored half's rank."""
    w = LOKR[case]()
    alpha = w.alpha if w.alpha is not None else R
    theirs = lycoris["lokr"].diff_weight(w.w1, w.w1_a, w.w1_b, w.w2, w.w2_a, w.w2_b, None, gamma=alpha)
    torch.testing.assert_close(w.delta(), theirs.reshape(w.delta().shape))


@pytest.mark.parametrize("rows", [True, False])
def test_dora_matches_lycoris_at_strength_one(lycoris, rows):
    weight, delta = randn(OUT, IN, K, K), 0.1 * randn(OUT, IN, K, K, seed=1)
    magnitude = 1 + (randn(OUT, 1, 1, 1) if rows else randn(1, IN, 1, 1)).abs()
    theirs = lycoris["general"].weight_decompose(
        weight + delta, magnitude, 1, wd_on_out=rows, backend="torch"
    )
    torch.testing.assert_close(dora_weight(weight, delta, magnitude), theirs, atol=1e-6, rtol=1e-5)
