"""Motion-module files: the key tables against diffusers' converter, v1/v2/v3 detection, MotionAdapter
configs, motion LoRA merging and refusals of files that are not motion modules."""

from __future__ import annotations

import json

import pytest
import torch

from latentdiffusion.checkpoints.motion_keys import (
    config_from_diffusers,
    from_diffusers,
    from_original,
    load_motion_modules,
    merge_motion_lora,
    save_motion_modules,
    to_diffusers,
    to_original,
    version,
)
from latentdiffusion.checkpoints.safe_io import save_safetensors
from latentdiffusion.errors import UserError
from latentdiffusion.models.motion import MotionConfig, MotionModules

SMALL = MotionConfig(block_channels=(32, 64), layers=1)


def random_modules(config: MotionConfig, seed: int = 0) -> MotionModules:
    modules = MotionModules(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in modules.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return modules


def test_original_layout_is_what_diffusers_converts_from():
    from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers

    state = random_modules(MotionConfig(block_channels=(32, 64), layers=1, mid_block=True)).state_dict()
    original = to_original(state)
    assert "mid_block.motion_modules.0.temporal_transformer.transformer_blocks.0.ff_norm.weight" in original
    converted = convert_animatediff_checkpoint_to_diffusers(dict(original))
    # diffusers drops the position tables (it makes its own); everything else lands on its names
    expected = {k: v for k, v in to_diffusers(state).items() if not k.endswith("pos_embed.pe")}
    assert converted.keys() == expected.keys()
    assert all(torch.equal(converted[k], expected[k]) for k in expected)
    assert from_original(original).keys() == state.keys()
    assert from_diffusers(to_diffusers(state)).keys() == state.keys()


@pytest.mark.parametrize(
    ("mid_block", "max_frames", "expected"), [(False, 24, "v1"), (True, 32, "v2"), (False, 32, "v3")]
)
def test_version_is_read_from_the_keys(tmp_path, mid_block, max_frames, expected):
    config = MotionConfig(block_channels=(32, 64), layers=1, mid_block=mid_block, max_frames=max_frames)
    modules = random_modules(config)
    path = save_motion_modules(modules, tmp_path / "mm.safetensors")
    loaded = load_motion_modules(path)
    assert loaded.config == config
    assert version(loaded.config) == expected
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in modules.state_dict().items())


def test_a_file_without_position_tables_gets_the_sinusoid(tmp_path):
    modules = MotionModules(SMALL)
    state = {k: v for k, v in to_original(modules.state_dict()).items() if "pos_encoder" not in k}
    save_safetensors(state, tmp_path / "mm.safetensors")
    loaded = load_motion_modules(tmp_path / "mm.safetensors")
    assert torch.equal(
        loaded.down_blocks[0][0].blocks[0].pos_embed.pe, modules.down_blocks[0][0].blocks[0].pos_embed.pe
    )


def test_motion_adapter_config_is_read():
    data = {
        "_class_name": "MotionAdapter",
        "block_out_channels": [320, 640, 1280, 1280],
        "motion_layers_per_block": 2,
        "motion_num_attention_heads": 8,
        "motion_max_seq_length": 32,
        "use_motion_mid_block": False,
        "motion_norm_num_groups": 32,
    }
    assert config_from_diffusers(data, "x") == MotionConfig()
    with pytest.raises(UserError, match="varies between levels"):
        config_from_diffusers({**data, "motion_layers_per_block": [2, 2, 3, 2]}, "x")
    with pytest.raises(UserError, match="not a MotionAdapter"):
        config_from_diffusers({**data, "_class_name": "UNetMotionModel"}, "x")
    with pytest.raises(UserError, match="own conv_in"):
        config_from_diffusers({**data, "conv_in_channels": 4}, "x")


def test_folder_whose_weights_disagree_with_its_config_is_refused(tmp_path):
    modules = MotionModules(SMALL)
    save_safetensors(to_diffusers(modules.state_dict()), tmp_path / "diffusion_pytorch_model.safetensors")
    config = {"block_out_channels": [32, 64], "motion_layers_per_block": 1, "use_motion_mid_block": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"do not fit config\.json"):
        load_motion_modules(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "use_motion_mid_block": False}))
    assert load_motion_modules(tmp_path).config == SMALL


def test_files_that_are_not_motion_modules_are_refused(tmp_path):
    save_safetensors({"conv_in.weight": torch.zeros(4, 4, 3, 3)}, tmp_path / "unet.safetensors")
    with pytest.raises(UserError, match="not an AnimateDiff motion module"):
        load_motion_modules(tmp_path / "unet.safetensors")
    with pytest.raises(UserError, match="not found"):
        load_motion_modules(tmp_path / "missing.ckpt")
    state = to_original(MotionModules(SMALL).state_dict())
    state["down_blocks.0.motion_modules.0.temporal_transformer.proj_in.weight"] = torch.zeros(3, 3)
    save_safetensors(state, tmp_path / "bad.safetensors")
    with pytest.raises(UserError, match="wrong shape"):
        load_motion_modules(tmp_path / "bad.safetensors")


def lora_file(path, modules: MotionModules, rank: int = 2, mid: bool = False) -> dict[str, torch.Tensor]:
    """An AnimateDiff motion LoRA on the first down module's attentions (and the mid block's)."""
    generator = torch.Generator().manual_seed(3)
    prefixes = ["down_blocks.0.motion_modules.0"] + (["mid_block.motion_modules.0"] if mid else [])
    state = {}
    for prefix in prefixes:
        for a in (0, 1):
            for name in ("to_q", "to_k", "to_v", "to_out"):
                block = f"{prefix}.temporal_transformer.transformer_blocks.0"
                key = f"{block}.attention_blocks.{a}.processor.{name}_lora"
                state[f"{key}.down.weight"] = torch.randn(
                    rank, 32 if "down" in prefix else 64, generator=generator
                )
                state[f"{key}.up.weight"] = torch.randn(
                    32 if "down" in prefix else 64, rank, generator=generator
                )
    torch.save(state, path)
    return state


def test_motion_lora_adds_strength_times_up_down(tmp_path):
    modules = random_modules(SMALL)
    before = {k: v.clone() for k, v in modules.state_dict().items()}
    lora = lora_file(tmp_path / "v2_lora_PanLeft.ckpt", modules, mid=True)
    assert merge_motion_lora(modules, tmp_path / "v2_lora_PanLeft.ckpt", 0.5) == 8  # mid entries skipped
    block = "down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0"
    prefix = f"{block}.attention_blocks.1.processor"
    delta = lora[f"{prefix}.to_out_lora.up.weight"] @ lora[f"{prefix}.to_out_lora.down.weight"]
    after = modules.state_dict()
    assert torch.allclose(
        after["down_blocks.0.0.blocks.0.attn2.to_out.weight"],
        before["down_blocks.0.0.blocks.0.attn2.to_out.weight"] + 0.5 * delta,
    )
    assert torch.equal(
        after["down_blocks.0.0.blocks.0.attn2.to_out.bias"],
        before["down_blocks.0.0.blocks.0.attn2.to_out.bias"],
    )
    assert torch.equal(
        after["up_blocks.0.0.blocks.0.attn1.to_q.weight"], before["up_blocks.0.0.blocks.0.attn1.to_q.weight"]
    )


def test_files_that_are_not_motion_loras_are_refused(tmp_path):
    modules = MotionModules(SMALL)
    torch.save({"lora_unet_down_blocks_0.lora_down.weight": torch.zeros(2, 4)}, tmp_path / "style.ckpt")
    with pytest.raises(UserError, match="not an AnimateDiff motion LoRA"):
        merge_motion_lora(modules, tmp_path / "style.ckpt")
    wide = MotionModules(MotionConfig(block_channels=(64, 64), layers=1))
    lora_file(tmp_path / "lora.ckpt", modules)
    with pytest.raises(UserError, match=r"does not fit|the layer is"):
        merge_motion_lora(wide, tmp_path / "lora.ckpt")
