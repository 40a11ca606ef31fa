"""Motion modules and the clip network: temporal transformer parity with diffusers, where the U-Net runs
them, sliding context windows against hand-computed averages, and per-clip seeded noise."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from latentdiffusion.checkpoints.motion_keys import detect_config, from_diffusers
from latentdiffusion.config import TINY
from latentdiffusion.diffusion.noise import seeded_noise
from latentdiffusion.errors import UserError
from latentdiffusion.models.motion import (
    ContextWindows,
    MotionConfig,
    MotionModules,
    TemporalTransformer,
    VideoUNet,
    sinusoidal_positions,
)
from latentdiffusion.models.unet import UNet

TINY_MOTION = MotionConfig(block_channels=(32, 64), layers=1, mid_block=True, max_frames=24)


def random_motion(config: MotionConfig = TINY_MOTION, seed: int = 0) -> MotionModules:
    modules = MotionModules(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in modules.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return modules.eval()


def test_position_table_matches_diffusers():
    from diffusers.models.embeddings import SinusoidalPositionalEmbedding

    assert torch.allclose(sinusoidal_positions(24, 64), SinusoidalPositionalEmbedding(64, 24).pe)


def test_temporal_transformer_matches_diffusers():
    from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D

    theirs = AnimateDiffTransformer3D(
        num_attention_heads=8,
        attention_head_dim=8,
        in_channels=64,
        norm_num_groups=32,
        double_self_attention=True,
        positional_embeddings="sinusoidal",
        num_positional_embeddings=24,
    ).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in theirs.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    prefixed = {f"down_blocks.1.motion_modules.0.{k}": v for k, v in theirs.state_dict().items()}
    state = from_diffusers(prefixed)
    ours = MotionModules(TINY_MOTION).down_blocks[1][0]
    ours.load_state_dict({k.removeprefix("down_blocks.1.0."): v for k, v in state.items()})
    x = torch.randn(2 * 5, 64, 3, 4, generator=generator)  # two clips of five frames
    with torch.no_grad():
        assert torch.allclose(ours(x, 5), theirs(x, num_frames=5), atol=1e-5)


def test_hook_runs_a_module_after_every_layer_in_unet_order():
    calls = []

    def hook(path, block, layer, h):
        calls.append((path, block, layer, h.shape[1]))
        return h

    unet = UNet(TINY.unet).eval()
    with torch.no_grad():
        unet(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.randn(2, 3, 32), after_layer=hook)
    # down: one ResBlock per level; mid: after its attention; up: two ResBlocks per level, deepest first
    assert calls == [
        ("down", 0, 0, 32), ("down", 1, 0, 64), ("mid", 0, 0, 64),
        ("up", 0, 0, 64), ("up", 0, 1, 64), ("up", 1, 0, 32), ("up", 1, 1, 32),
    ]  # fmt: skip
    modules = MotionModules(TINY_MOTION)
    for path, block, layer, channels in calls:
        assert modules.module_at(path, block, layer).norm.num_channels == channels


def test_window_schedule_covers_the_clip_and_ends_at_its_end():
    windows = ContextWindows(4, 1)
    assert windows.windows(3) == [[0, 1, 2]]
    assert windows.windows(10) == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    assert windows.windows(9) == [[0, 1, 2, 3], [3, 4, 5, 6], [5, 6, 7, 8]]
    assert ContextWindows(16, 4).windows(24) == [list(range(0, 16)), list(range(8, 24))]
    assert ContextWindows(4, 0, "pyramid").weights(4).tolist() == [1, 2, 2, 1]
    assert ContextWindows(5, 0, "pyramid").weights(5).tolist() == [1, 2, 3, 2, 1]


class WindowMean(nn.Module):
    """A stand-in U-Net whose output for every frame is the mean of its window's frames (of one sample),
    so that which frames were denoised together shows in the result."""

    config = TINY.unet

    def forward(self, x, t, context, after_layer):
        clips = x.unflatten(0, (2, -1))  # two clips per call in these tests
        return clips.mean(1, keepdim=True).expand_as(clips).flatten(0, 1)


@pytest.mark.parametrize(("weighting", "weights"), [("uniform", (1, 1, 1, 1)), ("pyramid", (1, 2, 2, 1))])
def test_window_predictions_are_averaged_by_hand_computed_weights(weighting, weights):
    network = VideoUNet(WindowMean(), MotionModules(TINY_MOTION), ContextWindows(4, 2, weighting))
    x = torch.arange(2 * 6, dtype=torch.float32).reshape(2, 1, 6, 1, 1)  # frames 0..5 hold 0..5 (+6)
    out = network(x, torch.zeros(2), context=torch.zeros(2, 1, 32))[0, 0, :, 0, 0]
    # windows [0..3] (mean 1.5) and [2..5] (mean 3.5); frames 2 and 3 are in both
    w = weights
    shared = [(w[2] * 1.5 + w[0] * 3.5) / (w[2] + w[0]), (w[3] * 1.5 + w[1] * 3.5) / (w[3] + w[1])]
    assert out.tolist() == pytest.approx([1.5, 1.5, *shared, 3.5, 3.5])


def test_windows_equal_the_full_run_when_frames_do_not_interact():
    """Motion modules with proj_out 0 are the identity: every frame is denoised alone, so any windows
    must give the full run's output."""
    torch.manual_seed(0)
    unet = UNet(TINY.unet).eval()
    motion = MotionModules(TINY_MOTION)  # proj_out starts at zero (AnimateDiff's initialisation)
    for parameter in [p for name, p in motion.named_parameters() if "proj_out" not in name or "ff" in name]:
        nn.init.normal_(parameter, std=0.2)
    assert all(not m.proj_out.weight.any() for m in motion.modules() if isinstance(m, TemporalTransformer))
    x, context = torch.randn(2, 4, 7, 8, 8), torch.randn(2, 3, 32)
    with torch.no_grad():
        full = VideoUNet(unet, motion)(x, torch.tensor([10, 500]), context=context)
        windowed = VideoUNet(unet, motion, ContextWindows(4, 1))(x, torch.tensor([10, 500]), context=context)
    assert torch.allclose(windowed, full, atol=1e-5)


def test_windows_change_a_clip_whose_frames_interact():
    torch.manual_seed(0)
    unet, motion = UNet(TINY.unet).eval(), random_motion()
    x, context, t = torch.randn(1, 4, 7, 8, 8), torch.randn(1, 3, 32), torch.tensor([10])
    with torch.no_grad():
        full = VideoUNet(unet, motion)(x, t, context=context)
        windowed = VideoUNet(unet, motion, ContextWindows(4, 1))(x, t, context=context)
    assert (windowed - full).abs().max() > 1e-3


def test_frames_beyond_the_position_table_are_refused():
    network = VideoUNet(UNet(TINY.unet), MotionModules(TINY_MOTION))
    with pytest.raises(UserError, match="at most 24 at once"):
        network(torch.randn(1, 4, 25, 8, 8), torch.tensor([1]), context=torch.randn(1, 3, 32))


def test_modules_for_other_widths_are_refused():
    with pytest.raises(UserError, match="level widths"):
        VideoUNet(UNet(TINY.unet), MotionModules(MotionConfig(block_channels=(32, 64, 128), layers=1)))


def test_clip_noise_depends_on_its_own_seed_only():
    both = seeded_noise((2, 4, 5, 8, 8), [7, 8])
    alone = seeded_noise((1, 4, 5, 8, 8), [8])
    assert torch.equal(both[1:], alone)
    assert torch.equal(alone[0], torch.randn(1, 4, 5, 8, 8, generator=torch.Generator().manual_seed(8))[0])


def test_detected_config_round_trips():
    state = MotionModules(TINY_MOTION).state_dict()
    assert detect_config({k: tuple(v.shape) for k, v in state.items()}, "t") == TINY_MOTION
