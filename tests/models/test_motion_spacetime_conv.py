"""Motion modules with a spatio-temporal convolution (``MotionConfig.spacetime_conv``, ``ldm train-motion
--spacetime-conv``): a fresh layer is the identity, the layer is the 3x3x3 convolution it states (so a frame
reads its neighbours' neighbourhoods, which temporal attention alone cannot), each clip's frames stay its
own, files keep the original layout and are recognised from their keys, and training trains it."""

from __future__ import annotations

import json

import torch

from latentdiffusion.checkpoints.motion_keys import load_motion_modules, save_motion_modules
from latentdiffusion.checkpoints.safe_io import read_state_dict
from latentdiffusion.config import TINY
from latentdiffusion.models.motion import MotionConfig, MotionModules, SpacetimeConv, VideoUNet
from latentdiffusion.models.unet import UNet
from latentdiffusion.training.motion import EXPORT_FILE

from ..training.test_motion_training import base  # noqa: F401
from .test_motion import random_motion
from .test_motion_text_attention import two_clips_and_the_second_alone

CONV = MotionConfig(block_channels=(32, 64), layers=1, max_frames=24, spacetime_conv=True)


def test_fresh_layer_is_the_identity():
    modules = MotionModules(CONV)
    x = torch.randn(6, 32, 5, 5)
    with torch.no_grad():
        assert torch.equal(modules.down_blocks[0][0].spacetime_conv(x, 3), x)
        assert torch.equal(modules.down_blocks[0][0](x, 3), x)


def test_layer_is_a_3x3x3_convolution_over_frames_and_pixels():
    layer = SpacetimeConv(8, 4)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    frames, x = 3, torch.randn(2 * 3, 8, 4, 5, generator=generator)
    with torch.no_grad():
        out = layer(x, frames)
        # by hand: frame 1, pixel (2, 3) of clip 1 from the 3x3x3 neighbourhood of the normalised input
        h = torch.nn.functional.silu(layer.norm(x.unflatten(0, (2, frames)).transpose(1, 2)))
        padded = torch.nn.functional.pad(h, (1, 1, 1, 1, 1, 1))
        patch = padded[1, :, 1:4, 2:5, 3:6]  # frames 0-2, rows 1-3, columns 2-4
        expected = (layer.conv.weight * patch).sum(dim=(1, 2, 3, 4)) + layer.conv.bias
    assert torch.allclose(out[3 + 1, :, 2, 3], x[3 + 1, :, 2, 3] + expected, atol=1e-5)
    # frame 2's pixel (0, 0) reads frame 1's pixel (1, 1), which per-pixel temporal attention never does
    probe = x.clone().requires_grad_(True)
    layer(probe, frames)[3 + 2, :, 0, 0].sum().backward()
    assert probe.grad[3 + 1, :, 1, 1].abs().sum() > 1e-3


def test_video_unet_keeps_each_clip_to_itself():
    unet = UNet(TINY.unet).eval()
    both, second = two_clips_and_the_second_alone(VideoUNet(unet, random_motion(CONV)))
    assert torch.allclose(both[1:], second, atol=1e-5)
    plain = random_motion(MotionConfig(block_channels=(32, 64), layers=1))
    assert not torch.allclose(two_clips_and_the_second_alone(VideoUNet(unet, plain))[0], both, atol=1e-3)


def test_file_round_trip_in_the_original_layout(tmp_path):
    modules = random_motion(CONV)
    path = save_motion_modules(modules, tmp_path / "mm.safetensors")
    keys = read_state_dict(path).keys()
    assert "down_blocks.0.motion_modules.0.temporal_transformer.spacetime_conv.conv.weight" in keys
    loaded = load_motion_modules(path)
    assert loaded.config == CONV
    x = torch.randn(4, 32, 4, 4)
    with torch.no_grad():
        assert torch.equal(loaded.down_blocks[0][0](x, 4), modules.down_blocks[0][0](x, 4))
    plain = save_motion_modules(
        random_motion(MotionConfig(block_channels=(32, 64), layers=1)), tmp_path / "p"
    )
    assert not load_motion_modules(plain).config.spacetime_conv


def test_cli_trains_the_convolution(base, tmp_path):  # noqa: F811
    from latentdiffusion.cli.main import main

    run = tmp_path / "run"
    flags = ["--frames", "3", "--data.holdout=1", "--batch_size=1", "--optim.warmup_steps=0", "--quiet"]
    assert (
        main(
            [
                "train-motion",
                "--model",
                str(base),
                "-o",
                str(run),
                "--max_steps=2",
                "--spacetime-conv",
                *flags,
            ]
        )
        == 0
    )
    assert json.loads((run / "motion.json").read_text())["spacetime_conv"] is True
    modules = load_motion_modules(run / "export" / EXPORT_FILE)
    assert modules.config.spacetime_conv
    assert modules.down_blocks[0][0].spacetime_conv.conv.weight.abs().sum() > 0  # it learned
