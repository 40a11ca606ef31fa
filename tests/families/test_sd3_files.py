"""SD3 / SD3.5 files and conditioning: our saves read by diffusers' StableDiffusion3Pipeline and read back
exactly, single files round-tripped, and the prompt conditioning equal to the reference pipeline's."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from sd3_fixtures import TINY_SD3, TINY_SD3_WITHOUT_T5, TINY_SD35

from latentdiffusion.checkpoints.formats import save_components
from latentdiffusion.checkpoints.safe_io import save_safetensors
from latentdiffusion.checkpoints.single_file import single_file_state
from latentdiffusion.components import build_components
from latentdiffusion.config import PRESETS, TINY
from latentdiffusion.errors import UserError
from latentdiffusion.families import ConditioningRequest, family_of
from latentdiffusion.pipelines.loading import load_components
from latentdiffusion.pipelines.pipeline import Pipeline


def latent_format_of(config):
    return family_of(config).latent_format(config)


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


def test_loading_without_t5_reads_no_t5_weights(sd3_models, tmp_path):
    components, folder = sd3_models(TINY_SD3)
    path = tmp_path / "model.safetensors"
    save_components(components, path, "single-file")
    for source in (str(folder), str(path)):
        loaded = load_components(source, t5=False)
        assert loaded.config.text_encoder_3 is None
        assert "text_encoder_3" not in loaded.modules and "text_encoder_3" not in loaded.tokenizers
        cond, _ = loaded.family.encode(loaded, PROMPTS, NEGATIVES, ConditioningRequest(32, 32))
        assert cond["context"][:, 77:].abs().max() == 0  # zeros where T5's states would be


def test_asking_for_t5_when_the_model_has_none_is_one_error(sd3_models):
    _, folder = sd3_models(TINY_SD3_WITHOUT_T5)
    with pytest.raises(UserError, match="has no T5 text encoder"):
        load_components(str(folder), t5=True)
    with pytest.raises(UserError, match="have no text_encoder_3 that can be left out"):
        load_components("preset:tiny", t5=False)


# 64-wide heads everywhere, as detection from names and shapes assumes
DETECTABLE = replace(
    TINY_SD3,
    text_encoder=replace(TINY_SD3.text_encoder, hidden_size=64, num_heads=1, projection_dim=64),
    text_encoder_2=replace(TINY_SD3.text_encoder_2, hidden_size=128, num_heads=2, projection_dim=128),
    text_encoder_3=replace(TINY_SD3.text_encoder_3, hidden_size=192),
    transformer=replace(TINY_SD3.transformer, num_heads=1, head_dim=64, context_dim=192, pooled_dim=192),
)


def test_single_file_without_metadata_is_detected(tmp_path):
    """A file as other tools write it (no config metadata): the family, every network's config and the
    settings shapes cannot tell (activations, padding, latent scale and shift, flow schedule) come out."""
    components = build_components(DETECTABLE)
    path = tmp_path / "model.safetensors"
    save_safetensors(single_file_state(components), path)
    loaded = load_components(str(path))
    for part in ("transformer", "text_encoder", "text_encoder_2", "autoencoder", "schedule"):
        assert getattr(loaded.config, part) == replace(
            getattr(DETECTABLE, part), **({"sample_size": 128} if part == "transformer" else {})
        ), part
    assert loaded.config.text_encoder_3 == replace(DETECTABLE.text_encoder_3, max_length=256)
    same_weights(components, loaded)


def test_a_4_channel_autoencoder_with_a_16_channel_transformer_is_one_error(tmp_path):
    components = build_components(DETECTABLE)
    sd = build_components(TINY)
    state = {k: v for k, v in single_file_state(components).items() if not k.startswith("first_stage_model.")}
    state.update({k: v for k, v in single_file_state(sd).items() if k.startswith("first_stage_model.")})
    path = tmp_path / "mixed.safetensors"
    save_safetensors(state, path)
    with pytest.raises(UserError, match="4 latent channels and the transformer takes 16"):
        load_components(str(path))


def test_sizes_are_multiples_of_16(sd3_models):
    assert latent_format_of(PRESETS["sd3-medium"]).size_multiple == 16
    components, _ = sd3_models(TINY_SD3)  # a 2x autoencoder: multiples of 8 (the floor for every model)
    with pytest.raises(UserError, match="width must be a positive multiple of 8"):
        Pipeline(components).generate("a cat", width=36, height=32, steps=1)
