"""Prompt editing and AND on the shipped default model: an edit halfway gives an image unlike either
prompt's, and one AND part of weight 1 is the plain prompt's image bit for bit."""

import numpy as np
import pytest

import latentdiffusion as ld
from latentdiffusion.checkpoints.native import NATIVE_CONFIG
from latentdiffusion.pipelines.loading import default_model_dir

pytestmark = pytest.mark.skipif(
    not (default_model_dir() / NATIVE_CONFIG).is_file(), reason="no default model is installed"
)
# guided at 3: at the model's default 1.5 the last steps decide this scene almost alone (the edited image
# is within 0.5 of the square's on average), which would leave nothing for the edit to show
SETTINGS = {"steps": 5, "seed": 0, "guidance_scale": 3.0}


def test_edit_halfway_and_a_single_part_on_the_default_model():
    pipe = ld.load("default")

    def pixels(prompt):
        return np.asarray(pipe.generate(prompt, **SETTINGS)[0]).astype(int)

    circle = pixels("a red circle on a blue background")
    square = pixels("a green square on a blue background")
    edited = pixels("[a red circle:a green square:0.5] on a blue background")
    assert np.abs(edited - circle).mean() > 1 and np.abs(edited - square).mean() > 1
    assert np.array_equal(circle, pixels("a red circle on a blue background :1"))
