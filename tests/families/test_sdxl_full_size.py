"""Full-size SDXL base and refiner on the meta device: the single-file keys we write are those diffusers'
own converters read into diffusers' full-size models (every key, every shape, none left over), and the
shapes alone give back the released models' configs."""

from __future__ import annotations

from functools import cache

import pytest
import torch

from latentdiffusion.checkpoints import text_encoder_keys, unet_keys
from latentdiffusion.checkpoints.assemble import build_on_meta
from latentdiffusion.checkpoints.diffusers_configs import text_encoder_to_hf, unet_to_diffusers
from latentdiffusion.checkpoints.layout import read_layout, write_layout
from latentdiffusion.config import PRESETS
from latentdiffusion.families import family_of

single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")

PRESET_NAMES = ("sdxl", "sdxl-refiner")


def shapes(state) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


@cache
def single_file(name: str) -> dict[str, torch.Tensor]:
    """Every tensor of a full-size single file of preset ``name``, on meta, in the original layout."""
    config = PRESETS[name]
    layouts = family_of(config).single_file_layouts(config)
    state = {}
    for role, module in build_on_meta(config).items():
        state.update(write_layout(module.state_dict(), layouts[role]))
    return state


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_the_keys_and_shapes_alone_give_the_released_config(name):
    config = PRESETS[name]
    found = None
    for family in (family_of(PRESETS[n]) for n in PRESET_NAMES):
        found = found or family.single_file_config(shapes(single_file(name)), "file", config.name)
    assert found == config


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_every_key_maps_both_ways_with_none_left_over(name):
    config = PRESETS[name]
    layouts = family_of(config).single_file_layouts(config)
    stored = single_file(name)
    claimed = set()
    for role, module in build_on_meta(config).items():
        ours = module.state_dict()
        own = {k: v for k, v in stored.items() if k.startswith(layouts[role].prefix)}
        claimed |= own.keys()
        assert shapes(read_layout(own, layouts[role])) == shapes(ours), role
    assert claimed == stored.keys()


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_diffusers_converters_read_our_unet_into_its_full_size_model(name):
    from diffusers import UNet2DConditionModel

    config = PRESETS[name]
    stored = single_file(name)
    diffusers_config = unet_to_diffusers(config.unet, config.sample_size // 8)
    converted = single_file_utils.convert_ldm_unet_checkpoint(stored, diffusers_config)
    with torch.device("meta"):
        theirs = UNet2DConditionModel(**{k: v for k, v in diffusers_config.items() if not k.startswith("_")})
    assert shapes(converted) == shapes(theirs.state_dict())
    ours = build_on_meta(config)["unet"].state_dict()
    assert shapes(unet_keys.from_diffusers_state_dict(converted)) == shapes(ours)


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_diffusers_reads_our_bigg_into_its_full_size_model(name):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = PRESETS[name]
    prefix = family_of(config).single_file_layouts(config)["text_encoder_2"].prefix
    stored = {k: v for k, v in single_file(name).items() if k.startswith(prefix)}
    with torch.device("meta"):
        theirs = CLIPTextModelWithProjection(CLIPTextConfig(**text_encoder_to_hf(config.text_encoder_2)))
    converted = single_file_utils.convert_open_clip_checkpoint(theirs, stored, prefix=prefix)
    expected = text_encoder_keys.from_hf_state_dict(theirs.state_dict(), projection=True)
    assert shapes(text_encoder_keys.from_hf_state_dict(converted, projection=True)) == shapes(expected)
