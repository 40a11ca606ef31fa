"""Loading ControlNet files: a diffusers ControlNet folder and original single files (with and without the
``control_model.`` prefix) give the network diffusers computes; bad files are one clear error each."""

import json
from dataclasses import replace

import pytest
import torch
from PIL import Image

import latentdiffusion as ld
from latentdiffusion.checkpoints.controlnet import load_controlnet
from latentdiffusion.checkpoints.layout import write_layout
from latentdiffusion.checkpoints.original_keys import controlnet_layout
from latentdiffusion.checkpoints.safe_io import save_safetensors
from latentdiffusion.checkpoints.unet_keys import controlnet_from_diffusers
from latentdiffusion.components import build_components
from latentdiffusion.config import TINY, ControlNetConfig
from latentdiffusion.errors import UserError
from latentdiffusion.pipelines.pipeline import Pipeline

HINT_CHANNELS = (16, 32)
# SD-style heads (8 per level) so that the single-file detection reads them back
UNET = replace(TINY.unet, num_heads=8)


def randomise(module: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2 + (parameter == 1) * 1.0)


def diffusers_controlnet(unet_config=UNET):
    from diffusers import ControlNetModel
    from tests.pipelines.conftest import diffusers_unet

    unet = diffusers_unet(unet_config)
    theirs = ControlNetModel(
        block_out_channels=unet.config.block_out_channels,
        down_block_types=unet.config.down_block_types,
        layers_per_block=unet_config.num_res_blocks,
        cross_attention_dim=unet_config.context_dim,
        attention_head_dim=unet_config.num_heads,
        norm_num_groups=unet_config.norm_groups,
        conditioning_embedding_out_channels=HINT_CHANNELS,
    )
    randomise(theirs, 3)
    return theirs.eval()


def inputs(context_dim=UNET.context_dim):
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(1, 4, 8, 8, generator=g),
        torch.tensor([500.0]),
        torch.randn(1, 5, context_dim, generator=g),
        torch.rand(1, 3, 16, 16, generator=g),
    )


@torch.no_grad()
def check_same(ours, theirs):
    x, t, context, hint = inputs()
    down, mid = ours(x, t, context, hint)
    expected = theirs(x, t, context, hint, return_dict=False)
    for a, b in zip([*down, mid], [*expected[0], expected[1]], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_diffusers_folder(tmp_path):
    theirs = diffusers_controlnet()
    theirs.save_pretrained(tmp_path / "cn")
    ours = load_controlnet(tmp_path / "cn")
    assert ours.control_config.hint_channels == HINT_CHANNELS
    check_same(ours.eval(), theirs)


@pytest.mark.parametrize("prefix", ["control_model.", ""])
def test_original_single_file(tmp_path, prefix):
    theirs = diffusers_controlnet()
    config = ControlNetConfig(UNET, hint_channels=HINT_CHANNELS)
    stored = write_layout(controlnet_from_diffusers(theirs.state_dict()), controlnet_layout(config, prefix))
    save_safetensors({k: v.contiguous() for k, v in stored.items()}, tmp_path / "cn.safetensors")
    ours = load_controlnet(tmp_path / "cn.safetensors")
    assert ours.config.context_dim == UNET.context_dim
    assert ours.control_config.hint_channels == HINT_CHANNELS
    check_same(ours.eval(), theirs)


def test_controlnet_of_another_family_by_path_is_one_clear_error(tmp_path):
    """An SDXL-like ControlNet (wider text states) on the SD model: one UserError naming the mismatch."""
    wide = replace(UNET, context_dim=64)
    diffusers_controlnet(wide).save_pretrained(tmp_path / "xl")
    pipe = Pipeline(build_components(TINY))
    hint = Image.new("RGB", (32, 32))
    with pytest.raises(UserError, match=r"another base model.*text width 64"):
        pipe.generate("a cat", width=32, height=32, steps=2, control=[ld.Control(tmp_path / "xl", hint)])


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_controlnet(tmp_path / "missing")
    (tmp_path / "weights.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError):
        load_controlnet(tmp_path / "weights.safetensors")
    save_safetensors({"a.weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(UserError, match="not a ControlNet"):
        load_controlnet(tmp_path / "other.safetensors")
    folder = tmp_path / "folder"
    diffusers_controlnet().save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "block_out_channels": [32, 48]}))
    with pytest.raises(UserError):
        load_controlnet(folder)
    (folder / "config.json").write_text(json.dumps({**config, "global_pool_conditions": True}))
    with pytest.raises(UserError, match="global_pool"):
        load_controlnet(folder)


def test_pickled_pth_file_is_read_safely(tmp_path):
    theirs = diffusers_controlnet()
    config = ControlNetConfig(UNET, hint_channels=HINT_CHANNELS)
    stored = write_layout(controlnet_from_diffusers(theirs.state_dict()), controlnet_layout(config))
    torch.save({k: v.contiguous() for k, v in stored.items()}, tmp_path / "cn.pth")
    check_same(load_controlnet(tmp_path / "cn.pth").eval(), theirs)
