"""Variation seeds: spherical interpolation between two seeds' noise."""

import math

import pytest
import torch

from latentdiffusion.diffusion.noise import seeded_noise, slerp, variation_noise

SHAPE = (3, 4, 8, 8)


def test_ends_are_the_two_seeds_noise():
    base = seeded_noise(SHAPE, [1, 2, 3])
    target = seeded_noise(SHAPE, [9, 9, 9])
    torch.testing.assert_close(variation_noise(SHAPE, [1, 2, 3], 9, 0.0), base)
    torch.testing.assert_close(variation_noise(SHAPE, [1, 2, 3], 9, 1.0), target, atol=1e-5, rtol=1e-5)


def test_slerp_of_orthogonal_unit_vectors_follows_the_arc():
    a = torch.tensor([[1.0, 0.0]])
    b = torch.tensor([[0.0, 1.0]])
    for t in (0.25, 0.5, 0.9):
        expected = torch.tensor([[math.cos(t * math.pi / 2), math.sin(t * math.pi / 2)]])
        torch.testing.assert_close(slerp(t, a, b), expected)


def test_slerp_keeps_the_norm_of_noise_where_a_straight_mix_loses_it():
    a, b = seeded_noise(SHAPE, [1, 2, 3]), seeded_noise(SHAPE, [4, 5, 6])
    mid = slerp(0.5, a, b)
    ratio = mid.flatten(1).norm(dim=1) / a.flatten(1).norm(dim=1)
    assert torch.all((ratio - 1).abs() < 0.05)
    straight = (0.5 * a + 0.5 * b).flatten(1).norm(dim=1) / a.flatten(1).norm(dim=1)
    assert torch.all(straight < 0.8)


def test_slerp_of_parallel_vectors_is_the_straight_mix():
    a = torch.tensor([[1.0, 2.0]])
    torch.testing.assert_close(slerp(0.3, a, 2 * a), 0.7 * a + 0.3 * 2 * a)


@pytest.mark.parametrize("strength", [0.1, 0.5])
def test_each_sample_moves_towards_the_same_target(strength):
    batch = variation_noise(SHAPE, [1, 2, 3], 7, strength)
    alone = variation_noise((1, *SHAPE[1:]), [2], 7, strength)
    torch.testing.assert_close(batch[1:2], alone)
