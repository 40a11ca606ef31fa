"""Full-size ControlNets on the meta device: an SD 1.5 ControlNet and an SDXL one. The original single-file
keys we write are those diffusers' own converter (``convert_controlnet_checkpoint``) reads into its
full-size ControlNetModel (every key, every shape); the diffusers names match too; the SD 1.5 shapes alone
give back the config."""

from __future__ import annotations

import pytest
import torch

from latentdiffusion.checkpoints.controlnet import controlnet_from_diffusers_config, detect_controlnet
from latentdiffusion.checkpoints.layout import write_layout
from latentdiffusion.checkpoints.original_keys import controlnet_layout
from latentdiffusion.checkpoints.unet_keys import controlnet_to_diffusers
from latentdiffusion.config import PRESETS, ControlNetConfig
from latentdiffusion.models.controlnet import ControlNet

single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")

SDXL_CONTROLNET = {  # diffusers/controlnet-canny-sdxl-1.0's config.json, the parts that shape it
    "_class_name": "ControlNetModel",
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "conditioning_embedding_out_channels": [16, 32, 96, 256],
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "projection_class_embeddings_input_dim": 2816,
    "transformer_layers_per_block": [1, 2, 10],
    "use_linear_projection": True,
}


def shapes(state) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def on_meta(config: ControlNetConfig) -> ControlNet:
    with torch.device("meta"):
        return ControlNet(config)


def diffusers_on_meta(**config):
    from diffusers import ControlNetModel

    with torch.device("meta"):
        return ControlNetModel(**{k: v for k, v in config.items() if k != "_class_name"})


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_original_keys_are_what_diffusers_converter_reads(name):
    if name == "sd15":
        config, theirs = ControlNetConfig(PRESETS["sd15"].unet), diffusers_on_meta(cross_attention_dim=768)
    else:
        config, theirs = (
            controlnet_from_diffusers_config(SDXL_CONTROLNET, "sdxl"),
            diffusers_on_meta(**SDXL_CONTROLNET),
        )
    stored = write_layout(on_meta(config).state_dict(), controlnet_layout(config))
    converted = single_file_utils.convert_controlnet_checkpoint(stored, dict(theirs.config))
    expected = shapes(theirs.state_dict())
    if name == "sdxl":  # diffusers' converter does not read an SDXL ControlNet's label_emb: sgm's name
        assert shapes(stored)["control_model.label_emb.0.0.weight"] == (1280, 2816)
        expected = {k: v for k, v in expected.items() if not k.startswith("add_embedding.")}
    assert shapes(converted) == expected
    assert shapes(controlnet_to_diffusers(on_meta(config).state_dict())) == shapes(theirs.state_dict())


def test_sd15_controlnet_shapes_give_back_the_config():
    config = ControlNetConfig(PRESETS["sd15"].unet)
    stored = write_layout(on_meta(config).state_dict(), controlnet_layout(config, ""))
    assert "input_hint_block.14.weight" in stored and "zero_convs.11.0.weight" in stored
    assert shapes(stored)["middle_block_out.0.weight"] == (1280, 1280, 1, 1)
    detected = detect_controlnet(shapes(stored), "sd15 controlnet")
    assert detected.hint_channels == config.hint_channels
    assert ControlNet(detected).state_dict().keys() == on_meta(config).state_dict().keys()
    unet, expected = detected.unet, config.unet
    for field in (
        "model_channels",
        "channel_mult",
        "num_res_blocks",
        "attention_levels",
        "context_dim",
        "heads_at",
    ):
        if field == "heads_at":
            assert unet.heads_at(640) == expected.heads_at(640)
        else:
            assert getattr(unet, field) == getattr(expected, field)


def test_sdxl_controlnet_shapes_give_back_the_config():
    config = controlnet_from_diffusers_config(SDXL_CONTROLNET, "sdxl")
    stored = write_layout(on_meta(config).state_dict(), controlnet_layout(config, ""))
    detected = detect_controlnet(shapes(stored), "sdxl controlnet")
    assert ControlNet(detected).state_dict().keys() == on_meta(config).state_dict().keys()
    for level in range(3):
        assert detected.unet.depth_at(level) == config.unet.depth_at(level)
    width = 1280
    assert detected.unet.heads_at(width) == config.unet.heads_at(width) == 20
    assert (detected.unet.context_dim, detected.unet.adm_in_channels) == (2048, 2816)
