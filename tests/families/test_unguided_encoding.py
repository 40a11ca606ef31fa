"""Unguided sampling (guidance scale 1) encodes the prompts once: the unconditional side is never read, so
the negative prompts are not encoded; the image is the one a different negative prompt gives. Guided
sampling encodes both sides, and equal prompt and negative prompt share one encoding in every family."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from sd3_fixtures import TINY_SD3
from sdxl_fixtures import TINY_SDXL

from latentdiffusion.components import build_components
from latentdiffusion.config import TINY
from latentdiffusion.pipelines.pipeline import Pipeline

CONFIGS = {"sd": TINY, "sdxl": TINY_SDXL, "sd3": TINY_SD3}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def counted(request):
    """(pipeline, calls): calls[role] counts the text encoder's passes (its token-embedding lookups: the
    CLIP encoders of some families are called through ``encode``, not ``forward``)."""
    components = build_components(CONFIGS[request.param], seed=1)
    calls = dict.fromkeys(components.family.text_roles, 0)
    for role in calls:

        def count(module, args, role=role):
            calls[role] += 1

        embeddings = [m for m in components.modules[role].modules() if isinstance(m, torch.nn.Embedding)]
        max(embeddings, key=lambda m: m.num_embeddings).register_forward_pre_hook(count)
    return Pipeline(components), calls


def generate(pipe: Pipeline, calls: dict, **options) -> tuple[np.ndarray, dict]:
    for role in calls:
        calls[role] = 0
    images = pipe.generate("a red circle", width=32, height=32, steps=2, seed=3, **options)
    return np.asarray(images[0]), dict(calls)


def test_guidance_one_encodes_the_prompt_alone_and_ignores_the_negative_prompt(counted):
    pipe, calls = counted
    plain, unguided = generate(pipe, calls, guidance_scale=1.0)
    other, _ = generate(pipe, calls, guidance_scale=1.0, negative_prompt="blue squares")
    _, guided = generate(pipe, calls, guidance_scale=3.0, negative_prompt="blue squares")
    assert all(guided[role] == 2 * unguided[role] >= 2 for role in calls)
    assert np.array_equal(plain, other)


def test_equal_prompt_and_negative_prompt_are_encoded_once(counted):
    pipe, calls = counted
    _, once = generate(pipe, calls, guidance_scale=3.0, negative_prompt="a red circle")
    assert all(once[role] >= 1 for role in calls)
    _, twice = generate(pipe, calls, guidance_scale=3.0, negative_prompt="a red circle ")
    assert all(twice[role] == 2 * once[role] for role in calls)
