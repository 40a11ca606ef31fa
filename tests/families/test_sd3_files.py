"""SD3 / SD3.5 files and conditioning: our saves read by diffusers' StableDiffusion3Pipeline and read back
exactly, single files round-tripped, and the prompt conditioning equal to the reference pipeline's."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from sd3_fixtures import TINY_SD3, TINY_SD3_WITHOUT_T5, TINY_SD35

from latentdiffusion.checkpoints.formats import save_components
from latentdiffusion.families import ConditioningRequest
from latentdiffusion.pipelines.loading import load_components

diffusers = pytest.importorskip("diffusers")

PROMPTS = ["a red circle on a blue background", "a large yellow square, photo"]
NEGATIVES = ["", "blurry"]


def same_weights(ours, theirs) -> None:
    assert ours.modules.keys() == theirs.modules.keys()
    for role, module in ours.modules.items():
        mine, read = module.state_dict(), theirs.modules[role].state_dict()
        assert mine.keys() == read.keys(), role
        for key, tensor in mine.items():
            assert torch.equal(tensor, read[key]), f"{role}.{key}"


@pytest.mark.parametrize("config", [TINY_SD3, TINY_SD35, TINY_SD3_WITHOUT_T5], ids=lambda c: c.name)
def test_diffusers_folder_round_trip(sd3_models, config):
    components, folder = sd3_models(config)
    loaded = load_components(str(folder))
    assert loaded.config.family == "sd3"
    assert loaded.config.transformer == config.transformer
    assert loaded.config.text_encoder_3 == config.text_encoder_3
    assert loaded.config.schedule == config.schedule
    same_weights(components, loaded)


@pytest.mark.parametrize("config", [TINY_SD3, TINY_SD35], ids=lambda c: c.name)
def test_single_file_round_trip(sd3_models, config, tmp_path):
    components, _ = sd3_models(config)
    path = tmp_path / "model.safetensors"
    save_components(components, path, "single-file")
    loaded = load_components(str(path))
    assert loaded.config.transformer.depth == config.transformer.depth
    same_weights(components, loaded)


@pytest.mark.parametrize("config", [TINY_SD3, TINY_SD3_WITHOUT_T5], ids=lambda c: c.name)
@torch.no_grad()
def test_conditioning_matches_diffusers(sd3_models, diffusers_sd3, config):
    components, _ = sd3_models(config)
    pipe = diffusers_sd3(config)
    theirs = pipe.encode_prompt(
        prompt=PROMPTS,
        prompt_2=None,
        prompt_3=None,
        negative_prompt=NEGATIVES,
        do_classifier_free_guidance=True,
        max_sequence_length=256,
    )
    context, negative_context, pooled, negative_pooled = theirs
    cond, uncond = components.family.encode(components, PROMPTS, NEGATIVES, ConditioningRequest(32, 32))
    torch.testing.assert_close(cond["context"], context, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(uncond["context"], negative_context, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cond["y"], pooled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(uncond["y"], negative_pooled, atol=1e-5, rtol=1e-5)
