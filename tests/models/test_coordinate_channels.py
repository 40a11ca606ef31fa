"""Coordinate channels (CoordConv) in the U-Net: the maps, a grown U-Net that starts as the same function,
and the Stable Diffusion layouts refusing models they cannot describe (coordinate channels, a text
encoder without causal mask)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from latentdiffusion.checkpoints.diffusers_folder import save_diffusers
from latentdiffusion.checkpoints.native import save_native
from latentdiffusion.checkpoints.single_file import save_single_file
from latentdiffusion.components import build_components
from latentdiffusion.config import TINY
from latentdiffusion.errors import UserError
from latentdiffusion.models.unet import UNet, add_coordinate_channels, coordinate_maps
from latentdiffusion.pipelines.loading import load_components

SMALL = TINY.unet


def test_coordinate_maps_run_from_minus_one_to_one():
    maps = coordinate_maps(torch.zeros(2, 4, 3, 5))
    assert maps.shape == (2, 2, 3, 5)
    torch.testing.assert_close(maps[0, 0, 0], torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0]))  # x along a row
    torch.testing.assert_close(maps[1, 1, :, 4], torch.tensor([-1.0, 0.0, 1.0]))  # y down a column


def test_grown_unet_computes_the_same_then_learns_positions():
    torch.manual_seed(0)
    plain = UNet(SMALL).eval()
    grown = add_coordinate_channels(plain)
    assert grown.config.coordinate_channels and grown.conv_in.weight.shape[1] == SMALL.in_channels + 2
    x, context = torch.randn(2, 4, 8, 8), torch.randn(2, 3, 32)
    with torch.no_grad():
        torch.testing.assert_close(grown(x, 500.0, context), plain(x, 500.0, context))
        grown.conv_in.weight[:, 4:] = 1.0  # once the new weights move, the output depends on them
        assert not torch.allclose(grown(x, 500.0, context), plain(x, 500.0, context))
    assert add_coordinate_channels(grown) is grown


@pytest.mark.parametrize(
    ("config", "named"),
    [
        (replace(TINY, unet=replace(TINY.unet, coordinate_channels=True)), "coordinate channels"),
        (replace(TINY, text_encoder=replace(TINY.text_encoder, causal=False)), "causal mask"),
    ],
)
def test_stable_diffusion_layouts_refuse_extensions_and_native_keeps_them(tmp_path, config, named):
    components = build_components(config)
    with pytest.raises(UserError, match=rf"{named}.*native format"):
        save_diffusers(components, tmp_path / "diffusers")
    with pytest.raises(UserError, match=rf"{named}.*native format"):
        save_single_file(components, tmp_path / "model.safetensors")
    save_native(components, tmp_path / "native")
    loaded = load_components(str(tmp_path / "native"))
    assert loaded.config == components.config
    for module in ("unet", "text_encoder"):
        original = getattr(components, module).state_dict()
        for key, value in getattr(loaded, module).state_dict().items():
            torch.testing.assert_close(value, original[key], msg=key)
