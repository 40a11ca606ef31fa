"""The shipped default model: it loads offline and its images follow a handful of fixed prompts.

A regression anywhere in the engine (models, samplers, guidance, loading, decoding) shows up here as
images the shapes checker no longer accepts.
"""

import pytest

import latentdiffusion as ld
from latentdiffusion.evaluation.shapes_checker import check, summarise
from latentdiffusion.pipelines.loading import NATIVE_CONFIG, default_model_dir

PROMPTS = [
    "a red circle on a blue background",
    "a large yellow square on a black background",
    "a small white triangle on a green background",
    "a blue circle in the top left on a white background",
    "a green square in the bottom right on a gray background",
    "a purple triangle in the center on a yellow background",
    "a orange circle left of a blue square on a white background",
    "a red square above a green triangle on a black background",
]

pytestmark = pytest.mark.skipif(
    not (default_model_dir() / NATIVE_CONFIG).is_file(), reason="no default model is installed"
)


@pytest.fixture(scope="module")
def images():
    pipe = ld.load("default")
    return pipe.generate(PROMPTS, width=64, height=64, steps=20, seed=0)


# What the shipped model (3000 training steps) reaches on these prompts: background 8/8, colour and
# shape 6/8 each. A broken engine produces noise, which the checker rejects on every attribute.
MINIMUM = {"background": 0.875, "colour": 0.625, "shape": 0.625}


def test_default_model_follows_fixed_prompts(images):
    scores = summarise([check(image, prompt) for image, prompt in zip(images, PROMPTS, strict=True)])
    for attribute, minimum in MINIMUM.items():
        assert scores[attribute] >= minimum, scores


def test_default_model_metadata(images):
    assert "Model: default" in images[0].info["parameters"]
