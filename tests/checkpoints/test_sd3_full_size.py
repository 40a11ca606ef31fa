"""Full-size SD3 Medium, SD3.5 Large and SD3.5 Medium single files on the meta device: every key and shape
we write for SD3 Medium is the released file's (sd-mecha's ``sd3-comfyui`` list: MMDiT, autoencoder,
CLIP-L, bigG, T5-XXL), and for every preset the names and shapes alone give back the released config."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from mecha_keys import released_file_keys

from latentdiffusion.checkpoints.assemble import build_on_meta
from latentdiffusion.checkpoints.layout import ignored, read_layout, write_layout
from latentdiffusion.checkpoints.original_keys import UNUSED_TOP_LEVEL
from latentdiffusion.config import PRESETS
from latentdiffusion.families import family_of

UNUSED = (
    "text_encoders.clip_l.logit_scale",
    "text_encoders.clip_g.logit_scale",
    "text_encoders.t5xxl.logit_scale",
)


def written(name: str) -> dict[str, tuple[int, ...]]:
    """key -> shape of everything we write for preset ``name``, built on meta."""
    config = PRESETS[name]
    layouts = family_of(config).single_file_layouts(config)
    state = {}
    for role, module in build_on_meta(config).items():
        state.update(write_layout(module.state_dict(), layouts[role]))
    return {k: tuple(v.shape) for k, v in state.items()}


def test_every_key_of_a_released_sd3_medium_file_is_ours():
    released = released_file_keys("sd3-comfyui")
    theirs = {k: shape for k, (shape, _) in released.items() if not ignored(k, UNUSED_TOP_LEVEL)}
    # read but unused: CLIP's temperatures and ComfyUI's sampling buffer
    assert sorted(set(released) - set(theirs)) == [
        "model.model_sampling.sigmas",
        "text_encoders.clip_g.logit_scale",
        "text_encoders.clip_l.logit_scale",
        "text_encoders.t5xxl.logit_scale",
    ]
    assert len(theirs) > 1600
    ours = written("sd3-medium")
    assert sorted(set(theirs) - set(ours)) == [] and sorted(set(ours) - set(theirs)) == []
    assert ours == theirs


@pytest.mark.parametrize("name", ["sd3-medium", "sd35-large", "sd35-medium"])
def test_names_and_shapes_give_back_the_released_config(name):
    config = PRESETS[name]
    detected = family_of(config).single_file_config(written(name), "file", name)
    assert detected == config


@pytest.mark.parametrize("name", ["sd35-large", "sd35-medium"])
def test_read_and_write_are_inverse_on_full_size_models(name):
    config = PRESETS[name]
    layouts = family_of(config).single_file_layouts(config)
    for role, module in build_on_meta(config).items():
        ours = module.state_dict()
        back = read_layout(write_layout(ours, layouts[role]), layouts[role])
        assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in ours.items()}, role


def test_without_t5_the_file_has_no_t5_keys():
    config = replace(PRESETS["sd3-medium"], text_encoder_3=None)
    layouts = family_of(config).single_file_layouts(config)
    assert "text_encoder_3" not in layouts
    assert all(
        isinstance(v, torch.Tensor) for v in build_on_meta(config)["transformer"].state_dict().values()
    )
