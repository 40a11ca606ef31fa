"""SD3's MMDiT key tables and config readers: diffusers' SD3Transformer2DModel names both ways, the original
single-file layout against diffusers' own converter (``convert_sd3_transformer_checkpoint_to_diffusers``),
full-size models on meta tensors (SD3 Medium against the key list of a released file, sd-mecha's
``sd3-comfyui`` model config; SD3.5 Large and Medium against diffusers' model), and the config given back
by state dicts of either layout and by config.json."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from mecha_keys import released_file_keys

from latentdiffusion.checkpoints.layout import read_layout, write_layout
from latentdiffusion.checkpoints.mmdit_keys import (
    MMDIT_PREFIX,
    mmdit_config_from_diffusers,
    mmdit_config_from_shapes,
    mmdit_config_to_diffusers,
    mmdit_from_diffusers,
    mmdit_layout,
    mmdit_to_diffusers,
)
from latentdiffusion.config import MMDiTConfig
from latentdiffusion.errors import UserError
from latentdiffusion.models.mmdit import MMDiT

diffusers = pytest.importorskip("diffusers")
single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")

# tiny variants; heads 64 wide where no q/k norm shows their width (as in every released model)
TINY = MMDiTConfig(
    in_channels=4,
    out_channels=6,
    depth=3,
    num_heads=2,
    head_dim=64,
    context_dim=24,
    pooled_dim=20,
    pos_embed_max_size=8,
    sample_size=8,
)
VARIANTS = {
    "sd3": TINY,
    "sd35-large": replace(TINY, num_heads=4, head_dim=8, qk_norm="rms_norm"),
    "sd35-medium": replace(
        TINY, depth=4, num_heads=4, head_dim=8, qk_norm="rms_norm", dual_attention_layers=(0, 2)
    ),
}
# the released transformers (stabilityai/stable-diffusion-3-medium-diffusers, -3.5-large, -3.5-medium):
# transformer/config.json as diffusers wrote it, and the config it describes
SD3_MEDIUM_JSON = {
    "_class_name": "SD3Transformer2DModel",
    "attention_head_dim": 64,
    "caption_projection_dim": 1536,
    "in_channels": 16,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 24,
    "out_channels": 16,
    "patch_size": 2,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 192,
    "sample_size": 128,
}
SD35_LARGE_JSON = {
    **SD3_MEDIUM_JSON,
    "caption_projection_dim": 2432,
    "num_attention_heads": 38,
    "num_layers": 38,
    "qk_norm": "rms_norm",
}
SD35_MEDIUM_JSON = {
    **SD3_MEDIUM_JSON,
    "dual_attention_layers": list(range(13)),
    "pos_embed_max_size": 384,
    "qk_norm": "rms_norm",
}
SD3_MEDIUM = MMDiTConfig(depth=24, num_heads=24, pos_embed_max_size=192)
SD35_LARGE = MMDiTConfig(depth=38, num_heads=38, pos_embed_max_size=192, qk_norm="rms_norm")
SD35_MEDIUM = MMDiTConfig(
    depth=24, num_heads=24, pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13))
)


def random_state(config: MMDiTConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=generator) for k, v in MMDiT(config).state_dict().items()}


def diffusers_model(config: MMDiTConfig) -> torch.nn.Module:
    settings = {k: v for k, v in mmdit_config_to_diffusers(config).items() if k != "_class_name"}
    return diffusers.SD3Transformer2DModel(**settings)


def shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- tiny models: exact round trips -------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_diffusers_names_round_trip_and_load_into_diffusers(variant):
    config = VARIANTS[variant]
    ours = random_state(config)
    theirs = mmdit_to_diffusers(ours)
    model = diffusers_model(config)
    model.load_state_dict(theirs)  # strict: every name and shape is diffusers'
    assert_same(mmdit_from_diffusers(model.state_dict()), ours)


def test_diffusers_adaptive_norms_store_scale_before_shift():
    ours = random_state(VARIANTS["sd3"])
    theirs = mmdit_to_diffusers(ours)
    shift, scale = ours["final.modulation.weight"].chunk(2)
    assert torch.equal(theirs["norm_out.linear.weight"], torch.cat([scale, shift]))
    shift, scale = ours["blocks.2.context.modulation.bias"].chunk(2)
    assert torch.equal(theirs["transformer_blocks.2.norm1_context.linear.bias"], torch.cat([scale, shift]))
    # adaLN-Zero modulations (six or nine chunks) keep their order
    assert torch.equal(
        theirs["transformer_blocks.1.norm1_context.linear.bias"], ours["blocks.1.context.modulation.bias"]
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_original_layout_is_what_diffusers_converts_into_the_same_model(variant):
    config = VARIANTS[variant]
    ours = random_state(config, seed=1)
    original = write_layout(ours, mmdit_layout())
    assert all(k.startswith(MMDIT_PREFIX) for k in original)
    converted = single_file_utils.convert_sd3_transformer_checkpoint_to_diffusers(dict(original))
    assert_same(converted, mmdit_to_diffusers(ours))
    assert_same(read_layout(original, mmdit_layout()), ours)


def test_original_layout_fuses_qkv_and_has_no_context_output_in_the_last_block():
    config = VARIANTS["sd35-medium"]
    ours = random_state(config)
    original = write_layout(ours, mmdit_layout(""))
    fused = original["joint_blocks.0.x_block.attn2.qkv.weight"]
    assert torch.equal(fused, torch.cat([ours[f"blocks.0.image.attn2.to_{p}.weight"] for p in "qkv"]))
    assert "joint_blocks.3.context_block.attn.qkv.bias" in original
    assert not any(k.startswith("joint_blocks.3.context_block.") and ".proj." in k for k in original)
    assert not any(k.startswith("joint_blocks.3.context_block.mlp") for k in original)
    assert "joint_blocks.3.context_block.attn.ln_k.weight" in original


# --- config inference ---------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_config_from_shapes_of_every_layout(variant):
    config = VARIANTS[variant]
    ours = random_state(config)
    layouts = {
        "ours": ours,
        "diffusers": mmdit_to_diffusers(ours),
        "original": write_layout(ours, mmdit_layout()),
        "original without prefix": write_layout(ours, mmdit_layout("")),
    }
    for name, state in layouts.items():
        assert mmdit_config_from_shapes(shapes(state), sample_size=8) == config, name


def test_config_from_shapes_refuses_what_is_not_an_mmdit():
    with pytest.raises(UserError, match="not an MMDiT"):
        mmdit_config_from_shapes({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)})
    state = shapes(write_layout(random_state(TINY), mmdit_layout()))
    del state["model.diffusion_model.context_embedder.weight"]
    with pytest.raises(UserError, match=r"context_embed\.weight"):
        mmdit_config_from_shapes(state)
    state = shapes(write_layout(random_state(TINY), mmdit_layout()))
    state["model.diffusion_model.pos_embed"] = (1, 60, 128)
    with pytest.raises(UserError, match="not a square grid"):
        mmdit_config_from_shapes(state)
    state["model.diffusion_model.pos_embed"] = (64,)  # of the wrong rank
    with pytest.raises(UserError, match="usable shape"):
        mmdit_config_from_shapes(state)


@pytest.mark.parametrize(
    ("json", "expected"),
    [(SD3_MEDIUM_JSON, SD3_MEDIUM), (SD35_LARGE_JSON, SD35_LARGE), (SD35_MEDIUM_JSON, SD35_MEDIUM)],
)
def test_released_config_json_reads_and_writes_back(json, expected):
    assert mmdit_config_from_diffusers(json) == expected
    assert mmdit_config_to_diffusers(expected) == {"qk_norm": None, "dual_attention_layers": [], **json}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"_class_name": "FluxTransformer2DModel"}, "not an SD3Transformer2DModel"),
        ({"caption_projection_dim": 1152}, "caption_projection_dim"),
        ({"qk_norm": "layer_norm"}, "qk_norm"),
        ({"num_layers": "24"}, "num_layers must be a whole number"),
        ({"patch_size": True}, "patch_size must be a whole number"),
        ({"dual_attention_layers": 12}, "dual_attention_layers must be a list"),
    ],
)
def test_unsupported_config_json_is_refused_by_name(change, message):
    with pytest.raises(UserError, match=message):
        mmdit_config_from_diffusers({**SD3_MEDIUM_JSON, **change})


def test_config_json_without_out_channels_means_in_channels():
    config = mmdit_config_from_diffusers({**SD3_MEDIUM_JSON, "in_channels": 8, "out_channels": None})
    assert config.out_channels == 8


# --- full size, on meta tensors -----------------------------------------------------------------------


def sd3_file_shapes() -> dict[str, tuple[int, ...]]:
    """key -> shape of the transformer entries of a released SD3 Medium single file (sd-mecha's list)."""
    entries = {
        k: shape for k, (shape, _) in released_file_keys("sd3-comfyui").items() if k.startswith(MMDIT_PREFIX)
    }
    assert len(entries) > 450
    return entries


def meta_state(config: MMDiTConfig) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return MMDiT(config).state_dict()


def test_every_key_of_a_released_sd3_medium_file_maps_to_our_modules():
    theirs = sd3_file_shapes()
    config = mmdit_config_from_shapes(theirs)
    assert config == SD3_MEDIUM
    ours = meta_state(config)
    assert shapes(write_layout(ours, mmdit_layout())) == theirs
    stored = {k: torch.empty(shape, device="meta") for k, shape in theirs.items()}
    assert shapes(read_layout(stored, mmdit_layout())) == shapes(ours)


@pytest.mark.parametrize("config", [SD3_MEDIUM, SD35_LARGE, SD35_MEDIUM], ids=["sd3-m", "sd35-l", "sd35-m"])
def test_full_size_diffusers_names_and_shapes(config):
    with torch.device("meta"):
        theirs = diffusers_model(config).state_dict()
    ours = meta_state(config)
    assert shapes(mmdit_to_diffusers(ours)) == shapes(theirs)
    assert shapes(mmdit_from_diffusers(theirs)) == shapes(ours)
    assert mmdit_config_from_shapes(shapes(theirs)) == config
    # the original layout of the same model is what diffusers' converter reads into it
    original = write_layout(ours, mmdit_layout())
    assert mmdit_config_from_shapes(shapes(original)) == config
    converted = single_file_utils.convert_sd3_transformer_checkpoint_to_diffusers(dict(original))
    assert shapes(converted) == shapes(theirs)
