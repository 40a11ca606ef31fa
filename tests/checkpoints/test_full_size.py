"""Full-size architectures on the meta device: every key maps one-to-one both ways, diffusers' own
converters agree with our generated tables, and full-size files are recognised from their headers."""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from latentdiffusion.checkpoints import autoencoder_keys, text_encoder_keys, unet_keys
from latentdiffusion.checkpoints.assemble import build_on_meta
from latentdiffusion.checkpoints.layout import read_layout, write_layout
from latentdiffusion.checkpoints.original_keys import (
    OPENCLIP_TEXT_PREFIX,
    autoencoder_layout,
    default_text_kind,
    text_layout,
    unet_layout,
)
from latentdiffusion.checkpoints.single_file import read_plan
from latentdiffusion.config import PRESETS

single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")

PRESET_NAMES = ("sd15", "sd15-inpaint", "sd21", "sd21-v", "sd-x4-upscaler")
# names as they appear in the released v1-5-pruned-emaonly file
SD15_KNOWN_KEYS = (
    "model.diffusion_model.time_embed.0.weight",
    "model.diffusion_model.input_blocks.0.0.weight",
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
    "model.diffusion_model.input_blocks.3.0.op.weight",
    "model.diffusion_model.input_blocks.4.0.skip_connection.weight",
    "model.diffusion_model.middle_block.1.proj_in.weight",
    "model.diffusion_model.middle_block.2.emb_layers.1.weight",
    "model.diffusion_model.output_blocks.2.1.conv.weight",
    "model.diffusion_model.output_blocks.5.2.conv.weight",
    "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight",
    "model.diffusion_model.out.2.bias",
    "first_stage_model.encoder.down.0.downsample.conv.weight",
    "first_stage_model.encoder.mid.attn_1.q.weight",
    "first_stage_model.decoder.up.3.block.2.conv2.weight",
    "first_stage_model.decoder.up.1.upsample.conv.weight",
    "first_stage_model.decoder.up.1.block.0.nin_shortcut.weight",
    "first_stage_model.post_quant_conv.weight",
    "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight",
    "cond_stage_model.transformer.text_model.final_layer_norm.bias",
)


def single_file_shapes(name: str) -> dict[str, tuple[int, ...]]:
    config = PRESETS[name]
    modules = build_on_meta(config)
    layouts = {
        "unet": unet_layout(config.unet),
        "autoencoder": autoencoder_layout(config.autoencoder),
        "text_encoder": text_layout(config.text_encoder, default_text_kind(config.text_encoder)),
    }
    state = {}
    for attribute, module in modules.items():
        state.update(write_layout(module.state_dict(), layouts[attribute]))
    return {k: tuple(v.shape) for k, v in state.items()}


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_every_key_maps_one_to_one_both_ways(name):
    config = PRESETS[name]
    modules = build_on_meta(config)
    layouts = {
        "unet": unet_layout(config.unet),
        "autoencoder": autoencoder_layout(config.autoencoder),
        "text_encoder": text_layout(config.text_encoder, default_text_kind(config.text_encoder)),
    }
    for attribute, module in modules.items():
        ours = module.state_dict()
        theirs = write_layout(ours, layouts[attribute])
        prefix = layouts[attribute].prefix
        assert all(k.startswith(prefix) for k in theirs)
        back = read_layout(theirs, layouts[attribute])
        assert back.keys() == ours.keys(), attribute
        assert all(back[k].shape == ours[k].shape for k in ours), attribute
        if attribute != "text_encoder":  # the text encoder fuses q/k/v in OpenCLIP files
            assert len(theirs) == len(ours)


def test_sd15_names_and_counts_are_those_of_the_released_file():
    shapes = single_file_shapes("sd15")
    assert set(SD15_KNOWN_KEYS) <= shapes.keys()
    assert shapes["first_stage_model.encoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
    counts = {
        p: sum(k.startswith(p) for k in shapes) for p in ("model.", "first_stage_model.", "cond_stage_model.")
    }
    assert counts == {"model.": 686, "first_stage_model.": 248, "cond_stage_model.": 196}


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_diffusers_converters_agree_with_our_tables(name):
    """diffusers' ldm -> diffusers converters, fed our single-file names, give diffusers' names."""
    config = PRESETS[name]
    modules = build_on_meta(config)
    ours = modules["unet"].state_dict()
    unet_config = {
        "layers_per_block": config.unet.num_res_blocks,
        "num_class_embeds": config.unet.num_class_embeds,
    }
    converted = single_file_utils.convert_ldm_unet_checkpoint(
        write_layout(ours, unet_layout(config.unet)), unet_config
    )
    expected = unet_keys.to_diffusers_state_dict(ours)
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in expected.items()}
    ours = modules["autoencoder"].state_dict()
    types = ["x"] * len(config.autoencoder.block_channels)
    converted = single_file_utils.convert_ldm_vae_checkpoint(
        write_layout(ours, autoencoder_layout(config.autoencoder)),
        {"down_block_types": types, "up_block_types": types},
    )
    expected = autoencoder_keys.to_diffusers_state_dict(ours)
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in expected.items()}


def test_openclip_split_agrees_with_diffusers():
    config = PRESETS["sd21"]
    ours = build_on_meta(config)["text_encoder"].state_dict()
    stored = write_layout(ours, text_layout(config.text_encoder, "openclip"))
    assert stored["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (3072, 1024)
    stub = SimpleNamespace(config=SimpleNamespace(hidden_size=1024))
    converted = single_file_utils.convert_open_clip_checkpoint(stub, stored, prefix=OPENCLIP_TEXT_PREFIX)
    expected = text_encoder_keys.to_hf_state_dict(ours)
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in expected.items()}


def write_header_only_safetensors(path, shapes: dict[str, tuple[int, ...]], dtype: str = "F16") -> int:
    """A valid safetensors file of zeros whose data section is a sparse hole: full size, no disk, no RAM."""
    header, offset = {}, 0
    for key in sorted(shapes):
        numel = 1
        for n in shapes[key]:
            numel *= n
        header[key] = {
            "dtype": dtype,
            "shape": list(shapes[key]),
            "data_offsets": [offset, offset + 2 * numel],
        }
        offset += 2 * numel
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return 8 + len(raw) + offset


def test_full_size_sd15_single_file_is_detected_without_yaml(tmp_path):
    path = tmp_path / "v1-5-pruned-emaonly.safetensors"
    shapes = single_file_shapes("sd15")
    shapes.update({"betas": (1000,), "alphas_cumprod": (1000,), "model_ema.decay": ()})
    size = write_header_only_safetensors(path, shapes)
    assert size > 2_000_000_000  # a real full-size fp16 file
    plan = read_plan(path)
    assert plan.variant == "sd1" and not plan.probe
    assert plan.config == replace(PRESETS["sd15"], name="v1-5-pruned-emaonly")


@pytest.mark.parametrize(
    ("name", "variant", "probe"),
    [("sd15-inpaint", "sd1-inpaint", False), ("sd21", "sd2", True), ("sd-x4-upscaler", "x4-upscaler", False)],
)
def test_variants_are_detected_from_headers(tmp_path, name, variant, probe):
    path = tmp_path / f"{name}.safetensors"
    write_header_only_safetensors(path, single_file_shapes(name))
    plan = read_plan(path)
    assert (plan.variant, plan.probe) == (variant, probe)
    expected = PRESETS[name]
    unet = replace(expected.unet, upcast_attention=plan.text_kind == "openclip")
    # a level without transformers has no self-attention to disable: its flag cannot be read back
    levels = unet.attention_levels
    assert [unet.only_cross_at(i) for i in levels] == [plan.config.unet.only_cross_at(i) for i in levels]
    unet = replace(unet, only_cross_attention=plan.config.unet.only_cross_attention)
    assert plan.config == replace(expected, name=name, unet=unet)


@pytest.mark.parametrize("stored_layers", [23, 24])
def test_sd2_text_tower_with_or_without_its_last_layer(tmp_path, stored_layers):
    """Released SD 2 files hold all 24 OpenCLIP layers; converted ones keep the 23 that run."""
    shapes = single_file_shapes("sd21")
    if stored_layers == 24:
        last = "cond_stage_model.model.transformer.resblocks.22."
        shapes.update({k.replace(".22.", ".23."): v for k, v in shapes.items() if k.startswith(last)})
        shapes["cond_stage_model.model.text_projection"] = (1024, 1024)
    path = tmp_path / "v2.safetensors"
    write_header_only_safetensors(path, shapes)
    assert read_plan(path, prediction_type="v_prediction").config.text_encoder == PRESETS["sd21"].text_encoder


def test_yaml_beside_the_file_is_honoured(tmp_path):
    path = tmp_path / "v2-1_768-ema-pruned.safetensors"
    write_header_only_safetensors(path, single_file_shapes("sd21"))
    shutil.copy(Path(__file__).parent / "data" / "v2-inference-v.yaml", path.with_suffix(".yaml"))
    plan = read_plan(path)
    assert not plan.probe
    expected = PRESETS["sd21-v"]
    assert plan.config == replace(
        expected, name=path.stem, unet=replace(expected.unet, upcast_attention=True)
    )


def test_prediction_type_override_skips_the_probe(tmp_path):
    path = tmp_path / "v2-1_768-ema-pruned.safetensors"
    write_header_only_safetensors(path, single_file_shapes("sd21"))
    plan = read_plan(path, prediction_type="v_prediction")
    assert not plan.probe
    assert plan.config.schedule.prediction_type == "v_prediction" and plan.config.sample_size == 768
