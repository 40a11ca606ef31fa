"""SDXL's key tables and config converters: the sgm single-file layout (U-Net with ``label_emb``, CLIP-L
and OpenCLIP bigG under ``conditioner.embedders``, bigG's transposed ``text_projection``), transformers'
CLIPTextModelWithProjection names and diffusers' config.json spellings, both ways. Full size on meta
tensors against the key list of a released SDXL base file (sd-mecha's ``sdxl-sgm`` model config)."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from mecha_keys import released_file_keys

from latentdiffusion.checkpoints import text_encoder_keys, unet_keys
from latentdiffusion.checkpoints.diffusers_configs import (
    text_encoder_from_hf,
    text_encoder_to_hf,
    unet_from_diffusers,
    unet_to_diffusers,
)
from latentdiffusion.checkpoints.layout import Layout, read_layout, write_layout
from latentdiffusion.checkpoints.original_keys import (
    SDXL_BIGG_PREFIX,
    SDXL_REFINER_BIGG_PREFIX,
    autoencoder_layout,
    sdxl_text_layouts,
    unet_layout,
)
from latentdiffusion.config import PRESETS, AutoencoderConfig, UNetConfig
from latentdiffusion.models.autoencoder import Autoencoder
from latentdiffusion.models.text_encoder import TextEncoder
from latentdiffusion.models.unet import UNet

SDXL_UNET, REFINER_UNET = PRESETS["sdxl"].unet, PRESETS["sdxl-refiner"].unet
CLIP_L, BIGG = PRESETS["sdxl"].text_encoder, PRESETS["sdxl"].text_encoder_2
# unet/config.json and text_encoder_2/config.json of stabilityai/stable-diffusion-xl-base-1.0 and the
# refiner's unet/config.json, as diffusers / transformers wrote them (the keys that matter here)
SDXL_UNET_JSON = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}
REFINER_UNET_JSON = {
    **SDXL_UNET_JSON,
    "attention_head_dim": [6, 12, 24, 24],
    "block_out_channels": [384, 768, 1536, 1536],
    "cross_attention_dim": 1280,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "projection_class_embeddings_input_dim": 2560,
    "transformer_layers_per_block": 4,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
}
BIGG_JSON = {
    "architectures": ["CLIPTextModelWithProjection"],
    "bos_token_id": 0,
    "eos_token_id": 2,
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "pad_token_id": 1,
    "projection_dim": 1280,
    "vocab_size": 49408,
}


def meta_state(module_class: type, config: object) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return module_class(config).state_dict()


def shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


# --- config.json <-> our configs ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("json", "expected"),
    [(SDXL_UNET_JSON, SDXL_UNET), (REFINER_UNET_JSON, REFINER_UNET)],
    ids=["base", "refiner"],
)
def test_unet_config_json_reads_and_writes_back(json, expected):
    config = unet_from_diffusers(json)
    assert config == expected
    written = unet_to_diffusers(config, sample_size=128)
    assert unet_from_diffusers(written) == config
    assert written["addition_embed_type"] == "text_time" and written["addition_time_embed_dim"] == 256
    assert written["projection_class_embeddings_input_dim"] == json["projection_class_embeddings_input_dim"]
    assert written["attention_head_dim"] == json["attention_head_dim"]
    # sgm's spelling, as diffusers' own single-file conversion writes it: levels without attention get 0
    assert written["transformer_layers_per_block"] == ([0, 2, 10] if json is SDXL_UNET_JSON else 4)


def test_written_unet_config_builds_diffusers_model_of_our_shapes():
    diffusers = pytest.importorskip("diffusers")
    config = replace(SDXL_UNET, model_channels=32, head_dim=16, transformer_depths=(0, 2, 3), context_dim=24)
    config = replace(config, adm_in_channels=20 + 6 * 256, norm_groups=8)
    theirs = diffusers.UNet2DConditionModel.from_config(unet_to_diffusers(config, sample_size=8))
    ours = unet_keys.to_diffusers_state_dict(UNet(config).state_dict())
    assert shapes(ours) == shapes(theirs.state_dict())


def test_mid_block_depth_of_its_own_is_written_where_diffusers_reads_it():
    config = replace(
        REFINER_UNET, transformer_depth=1, transformer_depths=(0, 4, 4, 0), transformer_depth_middle=6
    )
    written = unet_to_diffusers(config, sample_size=128)
    assert written["transformer_layers_per_block"] == [0, 4, 4, 6]
    assert unet_from_diffusers(written) == config
    with pytest.raises(ValueError, match="mid block"):
        unet_to_diffusers(replace(SDXL_UNET, transformer_depth_middle=3), sample_size=128)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"addition_time_embed_dim": 8}, "256 wide"),
        ({"addition_embed_type": "text"}, "addition_embed_type 'text'"),
        ({"transformer_layers_per_block": [[1], [2, 2], [10] * 10]}, "one number per level"),
        ({"reverse_transformer_layers_per_block": [[10] * 3, [2] * 3, [1] * 3]}, "reverse_transformer"),
    ],
)
def test_unsupported_unet_settings_are_refused_by_name(change, message):
    with pytest.raises(ValueError, match=message):
        unet_from_diffusers({**SDXL_UNET_JSON, **change})


def test_text_encoder_with_projection_config_json_reads_and_writes_back():
    config = text_encoder_from_hf(BIGG_JSON, pad_token_id=0)
    assert config == replace(BIGG, context_from_penultimate=False)  # SDXL's choice, not the file's
    written = text_encoder_to_hf(config)
    assert written["architectures"] == ["CLIPTextModelWithProjection"] and written["projection_dim"] == 1280
    assert text_encoder_from_hf(written, pad_token_id=0) == config
    plain = text_encoder_from_hf({**BIGG_JSON, "architectures": ["CLIPTextModel"]}, pad_token_id=0)
    assert plain.projection_dim is None
    assert text_encoder_to_hf(plain)["architectures"] == ["CLIPTextModel"]


# --- state dicts ------------------------------------------------------------------------------------


def test_label_emb_serves_sdxl_and_the_x4_upscaler():
    """``label_emb.0.0`` / ``label_emb.0.2`` are SDXL's vector MLP; a bare ``label_emb`` is the x4
    upscaler's class embedding: each reads back to its own module."""
    xl = write_layout(meta_state(UNet, SDXL_UNET), unet_layout(SDXL_UNET))
    assert shapes(xl)["model.diffusion_model.label_emb.0.0.weight"] == (1280, 2816)
    assert shapes(xl)["model.diffusion_model.label_emb.0.2.bias"] == (1280,)
    assert read_layout(xl, unet_layout(SDXL_UNET)).keys() == meta_state(UNet, SDXL_UNET).keys()
    x4 = UNetConfig(
        model_channels=32, channel_mult=(1, 2), attention_levels=(1,), num_heads=2, num_class_embeds=10
    )
    stored = write_layout(meta_state(UNet, x4), unet_layout(x4))
    assert "model.diffusion_model.label_emb.weight" in stored
    assert read_layout(stored, unet_layout(x4)).keys() == meta_state(UNet, x4).keys()


@pytest.mark.parametrize("unet", [SDXL_UNET, REFINER_UNET], ids=["base", "refiner"])
def test_unet_keys_map_one_to_one_to_diffusers_and_single_file(unet):
    ours = meta_state(UNet, unet)
    assert unet_keys.from_diffusers_state_dict(unet_keys.to_diffusers_state_dict(ours)).keys() == ours.keys()
    stored = write_layout(ours, unet_layout(unet))
    assert len(stored) == len(ours)
    back = read_layout(stored, unet_layout(unet))
    assert shapes(back) == shapes(ours)


def test_diffusers_single_file_converter_agrees_with_our_sdxl_table():
    single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")
    ours = meta_state(UNet, SDXL_UNET)
    config = {"layers_per_block": 2, "addition_embed_type": "text_time", "num_class_embeds": None}
    converted = single_file_utils.convert_ldm_unet_checkpoint(
        write_layout(ours, unet_layout(SDXL_UNET)), config
    )
    assert shapes(converted) == shapes(unet_keys.to_diffusers_state_dict(ours))


def tiny_bigg() -> TextEncoder:
    """A bigG-shaped encoder with a non-square projection, so that a missed transpose shows."""
    config = replace(BIGG, vocab_size=50, hidden_size=16, num_layers=3, num_heads=2, intermediate_size=32)
    torch.manual_seed(0)
    model = TextEncoder(replace(config, projection_dim=12))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


@pytest.mark.parametrize("prefix", [SDXL_BIGG_PREFIX, SDXL_REFINER_BIGG_PREFIX])
def test_openclip_layout_round_trip_with_transposed_projection(prefix):
    model = tiny_bigg()
    ours = model.state_dict()
    layouts = sdxl_text_layouts(None if prefix == SDXL_REFINER_BIGG_PREFIX else CLIP_L, model.config)
    layout = layouts["text_encoder_2"]
    assert layout.prefix == prefix
    stored = write_layout(ours, layout)
    assert torch.equal(stored[prefix + "text_projection"], ours["text_projection.weight"].T)  # [hidden, proj]
    assert stored[prefix + "transformer.resblocks.2.attn.in_proj_weight"].shape == (48, 16)
    stored[prefix + "logit_scale"] = torch.ones(())  # the contrastive head's temperature: dropped
    back = read_layout(stored, layout)
    assert back.keys() == ours.keys()
    assert all(torch.equal(back[k], ours[k]) for k in ours)
    fresh = TextEncoder(model.config)
    fresh.load_state_dict(back, strict=True)
    assert text_encoder_keys.to_openclip_state_dict(ours).keys() == {
        k[len(prefix) :] for k in stored if k != prefix + "logit_scale"
    }


def test_openclip_projection_is_dropped_without_projection_dim():
    """SD 2 files carry OpenCLIP's text_projection, which an encoder without projection_dim drops."""
    model = tiny_bigg()
    stored = text_encoder_keys.to_openclip_state_dict(model.state_dict())
    plain = replace(model.config, projection_dim=None, context_from_penultimate=False)
    back = text_encoder_keys.from_openclip_state_dict(stored, num_layers=3)
    TextEncoder(plain).load_state_dict(back, strict=True)


def test_diffusers_open_clip_converter_agrees_with_our_layout():
    single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")
    model = tiny_bigg()
    stored = write_layout(model.state_dict(), sdxl_text_layouts(CLIP_L, model.config)["text_encoder_2"])
    stub = SimpleNamespace(config=SimpleNamespace(hidden_size=16))
    converted = single_file_utils.convert_open_clip_checkpoint(stub, stored, prefix=SDXL_BIGG_PREFIX)
    expected = text_encoder_keys.to_hf_state_dict(model.state_dict())
    assert converted.keys() == expected.keys()
    assert all(torch.equal(converted[k], expected[k]) for k in expected)


def test_transformers_with_projection_names_round_trip():
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPTextConfig(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        projection_dim=12,
        bos_token_id=48,
        eos_token_id=49,
    )
    theirs = transformers.CLIPTextModelWithProjection(config).state_dict()
    ours = text_encoder_keys.from_hf_state_dict(theirs, projection=True)
    assert ours["text_projection.weight"].shape == (12, 16)
    model = TextEncoder(
        text_encoder_from_hf(config.to_dict() | {"architectures": ["CLIPTextModelWithProjection"]}, 0)
    )
    model.load_state_dict(ours, strict=True)
    assert text_encoder_keys.to_hf_state_dict(ours).keys() == {k for k in theirs if "position_ids" not in k}
    assert "text_projection.weight" not in text_encoder_keys.from_hf_state_dict(theirs)


# --- full size: a released SDXL base file's keys ---------------------------------------------------


def sdxl_file_keys() -> dict[str, tuple[tuple[int, ...], bool]]:
    """key -> (shape, optional) of an SDXL base sgm file (sd-mecha's list)."""
    entries = released_file_keys("sdxl-sgm")
    assert len(entries) > 2500
    return entries


def sdxl_base_layouts() -> dict[str, tuple[Layout, dict[str, torch.Tensor]]]:
    text = sdxl_text_layouts(CLIP_L, BIGG)
    return {
        "unet": (unet_layout(SDXL_UNET), meta_state(UNet, SDXL_UNET)),
        "autoencoder": (
            autoencoder_layout(AutoencoderConfig()),
            meta_state(Autoencoder, AutoencoderConfig()),
        ),
        "text_encoder": (text["text_encoder"], meta_state(TextEncoder, CLIP_L)),
        "text_encoder_2": (text["text_encoder_2"], meta_state(TextEncoder, BIGG)),
    }


def test_every_network_key_of_an_sdxl_base_file_maps_to_our_modules():
    file_keys = sdxl_file_keys()
    for name, (layout, ours) in sdxl_base_layouts().items():
        theirs = {k: v for k, v in file_keys.items() if k.startswith(layout.prefix)}
        # ours -> file: every key we write is in the file, with its shape; every required one is written
        written = shapes(write_layout(ours, layout))
        assert written == {k: theirs[k][0] for k in written}, name
        assert {k for k, (_, optional) in theirs.items() if not optional} <= written.keys(), name
        # file -> ours: every stored key (optional ones included) is read or deliberately dropped
        stored = {k: torch.empty(shape, device="meta") for k, (shape, _) in theirs.items()}
        assert shapes(read_layout(stored, layout)) == shapes(ours), name
    prefixes = tuple(layout.prefix for layout, _ in sdxl_base_layouts().values())
    rest = sorted(k for k in file_keys if not k.startswith(prefixes))
    assert all(
        not k.startswith(("model.diffusion_model.", "conditioner.", "first_stage_model.")) for k in rest
    )


def test_full_size_text_encoders_match_transformers_shapes():
    transformers = pytest.importorskip("transformers")
    for config, model_class in (
        (CLIP_L, transformers.CLIPTextModel),
        (BIGG, transformers.CLIPTextModelWithProjection),
    ):
        with torch.device("meta"):
            theirs = model_class(transformers.CLIPTextConfig(**text_encoder_to_hf(config))).state_dict()
        projection = config.projection_dim is not None
        theirs = text_encoder_keys.from_hf_state_dict(theirs, projection=projection)
        assert shapes(theirs) == shapes(meta_state(TextEncoder, config))
