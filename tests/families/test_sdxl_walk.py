"""Latent walks on a tiny random SDXL model: the pooled vector ``y`` is interpolated with the context,
keyframes of different 75-token chunk counts are padded to a common length in between and are still
exactly the stills at the ends."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sdxl_fixtures import TINY_SDXL

from latentdiffusion.components import build_components
from latentdiffusion.pipelines.pipeline import Pipeline
from latentdiffusion.pipelines.request import common_options, make_request
from latentdiffusion.pipelines.text_to_image import encode_conditioning
from latentdiffusion.pipelines.walk import Segments, WalkPoint

SHORT = "a red circle"
LONG = "a blue square on a green field, " * 12  # more than 75 tokens: two chunks


@pytest.fixture(scope="module")
def pipe():
    components = build_components(TINY_SDXL)
    generator = torch.Generator().manual_seed(0)  # random changes to every weight, as conftest.randomise
    with torch.no_grad():
        for module in components.modules.values():
            for parameter in module.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return Pipeline(components)


def test_every_cond_tensor_is_interpolated_at_the_longer_chunk_count(pipe):
    components = pipe.components
    keys = make_request(components, [SHORT, LONG], "blurry", common_options("walk", {}), None)
    cond, uncond = Segments(keys, 32, 32).conditioning(WalkPoint(0, 0.25), components)
    pair, pair_uncond = encode_conditioning(components, [SHORT, LONG], ["blurry"] * 2, 32, 32)
    assert set(cond) == {"context", "y"}
    assert cond["context"].shape == (1, 2 * 77, 64 + 128)
    for key in cond:
        torch.testing.assert_close(
            cond[key].float(), 0.75 * pair[key][:1].float() + 0.25 * pair[key][1:].float()
        )
        torch.testing.assert_close(uncond[key], pair_uncond[key][:1])  # the same negative prompt on both
    assert not torch.allclose(cond["y"], pair["y"][:1])


def test_sdxl_keyframes_are_exactly_the_stills(pipe):
    frames = pipe.walk([SHORT, LONG], seeds=[1, 2], frames=2, steps=2, width=32, height=32)
    for prompt, seed, frame in ((SHORT, 1, frames[0]), (LONG, 2, frames[2])):
        (still,) = pipe.generate(prompt, seed=seed, steps=2, width=32, height=32)
        assert np.array_equal(np.asarray(frame), np.asarray(still))
