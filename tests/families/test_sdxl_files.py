"""SDXL files in every layout: single files (base and refiner) and diffusers folders round-trip exactly,
are recognised from their keys and shapes alone, and diffusers' own readers load our saves."""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import pytest
import torch

import latentdiffusion as ld
from latentdiffusion.checkpoints.formats import save_components
from latentdiffusion.checkpoints.safe_io import read_state_dict, save_safetensors

pytest.importorskip("diffusers")

KINDS = ("base", "refiner", "inpaint")


def assert_same_weights(a, b) -> None:
    assert a.components.modules.keys() == b.components.modules.keys()
    for role, module in a.components.modules.items():
        theirs = b.components.modules[role].state_dict()
        ours = module.state_dict()
        assert ours.keys() == theirs.keys(), role
        for key, value in ours.items():
            assert torch.equal(value, theirs[key]), f"{role}.{key}"


@pytest.mark.parametrize("kind", KINDS)
def test_diffusers_folder_round_trip(sdxl, kind):
    ours, folder = sdxl(kind)
    back = ld.load(folder)
    assert back.config.family == ours.config.family
    assert back.config == replace(ours.config, name=back.config.name)
    assert_same_weights(back, ours)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [None, torch.float16, torch.bfloat16])
def test_single_file_round_trip_from_keys_alone(sdxl, kind, dtype, tmp_path):
    """Without our config metadata the keys and shapes describe the model completely."""
    ours, _ = sdxl(kind)
    path = tmp_path / "model.safetensors"
    save_components(ours.components, path, "single-file", dtype=dtype)
    assert not path.with_suffix(".yaml").exists()
    bare = tmp_path / "bare.safetensors"
    save_safetensors(read_state_dict(path), bare)  # no metadata
    for source, size in ((path, ours.config.sample_size), (bare, 1024)):  # keys do not say the size
        back = ld.load(source)
        assert back.config == replace(ours.config, name=back.config.name, sample_size=size)
        expected = ld.load(path, dtype=dtype) if dtype is not None else ours
        assert_same_weights(back if dtype is None else ld.load(source, dtype=dtype), expected)


def test_single_file_keys_are_the_original_layout(sdxl, tmp_path):
    ours, _ = sdxl("base")
    path = tmp_path / "base.safetensors"
    save_components(ours.components, path, "single-file")
    keys = read_state_dict(path).keys()
    assert "model.diffusion_model.label_emb.0.0.weight" in keys
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in keys
    assert "conditioner.embedders.1.model.text_projection" in keys
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    assert "first_stage_model.decoder.conv_out.weight" in keys
    refiner, _ = sdxl("refiner")
    save_components(refiner.components, tmp_path / "refiner.safetensors", "single-file")
    assert "conditioner.embedders.0.model.text_projection" in read_state_dict(
        tmp_path / "refiner.safetensors"
    )


@pytest.mark.parametrize(
    ("kind", "pipeline"),
    [("base", "StableDiffusionXLPipeline"), ("refiner", "StableDiffusionXLImg2ImgPipeline")],
)
def test_our_single_file_loads_in_diffusers(sdxl, kind, pipeline, tmp_path):
    """diffusers' from_single_file, configured from our saved folder, gets our tensors."""
    import diffusers

    from latentdiffusion.checkpoints import autoencoder_keys, text_encoder_keys, unet_keys

    ours, folder = sdxl(kind)
    path = tmp_path / f"{kind}.safetensors"
    save_components(ours.components, path, "single-file")
    theirs = getattr(diffusers, pipeline).from_single_file(
        str(path), config=str(folder), local_files_only=True
    )
    modules = ours.components.modules
    readers = {
        "unet": ("unet", unet_keys.from_diffusers_state_dict),
        "autoencoder": ("vae", autoencoder_keys.from_diffusers_state_dict),
        "text_encoder": ("text_encoder", text_encoder_keys.from_hf_state_dict),
        "text_encoder_2": ("text_encoder_2", partial(text_encoder_keys.from_hf_state_dict, projection=True)),
    }
    for role, module in modules.items():
        name, read = readers[role]
        loaded = read(getattr(theirs, name).state_dict())
        for key, value in module.state_dict().items():
            assert torch.equal(loaded[key], value), f"{role}.{key}"


def test_diffusers_reads_our_folder_as_the_right_pipeline(sdxl):
    import diffusers

    for kind, name in (
        ("base", "StableDiffusionXLPipeline"),
        ("refiner", "StableDiffusionXLImg2ImgPipeline"),
    ):
        _, folder = sdxl(kind)
        pipe = diffusers.DiffusionPipeline.from_pretrained(folder)
        assert type(pipe).__name__ == name


def test_ldm_convert_in_every_direction(sdxl, tmp_path):
    """native -> single file -> diffusers -> native through the command line, every tensor kept."""
    from latentdiffusion.checkpoints.native import save_native
    from latentdiffusion.cli.main import main

    ours, _ = sdxl("base")
    save_native(ours.components, tmp_path / "native")
    steps = [
        (tmp_path / "native", tmp_path / "model.safetensors", "single-file"),
        (tmp_path / "model.safetensors", tmp_path / "diffusers", "diffusers"),
        (tmp_path / "diffusers", tmp_path / "back", "native"),
    ]
    for source, target, kind in steps:
        assert main(["convert", str(source), str(target), "--format", kind]) == 0
    back = ld.load(tmp_path / "back")
    assert back.config.family == "sdxl"
    assert_same_weights(back, ours)
