"""Per-sample seeded noise: a sample depends on its seed only."""

from __future__ import annotations

import pytest
import torch

from latentdiffusion.diffusion.noise import randn_like, seeded_generators, seeded_noise


def test_sample_i_comes_from_its_own_seed():
    noise = seeded_noise((3, 4, 8, 8), [11, 12, 13])
    for i, seed in enumerate([11, 12, 13]):
        expected = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(noise[i : i + 1], expected)


def test_noise_does_not_depend_on_the_batch_or_dtype():
    alone = seeded_noise((1, 4, 8, 8), [12])
    in_batch = seeded_noise((3, 4, 8, 8), [40, 12, 7], dtype=torch.float64)
    torch.testing.assert_close(in_batch[1:2], alone.double())
    assert in_batch.dtype == torch.float64


def test_randn_like_from_none_one_or_per_sample_generators():
    x = torch.zeros(2, 3, dtype=torch.float64)
    assert randn_like(x).shape == (2, 3)
    one = randn_like(x, torch.Generator().manual_seed(1))
    assert torch.equal(one, torch.randn(2, 3, generator=torch.Generator().manual_seed(1)).double())
    per_sample = randn_like(x, seeded_generators([5, 6]))
    assert torch.equal(per_sample[1:], torch.randn(1, 3, generator=torch.Generator().manual_seed(6)).double())


def test_generator_count_must_match_the_batch():
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        randn_like(torch.zeros(3, 1), seeded_generators([1, 2]))
    with pytest.raises(ValueError, match="seeds"):
        seeded_noise((2, 1), [1])
