"""Motion modules that attend to the prompt (AnimateDiff's "Temporal_Cross" block type,
``MotionConfig.cross_attention_dim``, ``ldm train-motion --text-attention``): the batched cross-attention
equals the original's per-pixel one, the modules read the text states, files keep the original layout and
say what they are, models with other text widths are refused, and training resumes exactly."""

from __future__ import annotations

import pytest
import torch

from latentdiffusion.checkpoints.motion_keys import (
    BLOCK_TYPES_KEY,
    CROSS_TYPES,
    from_original,
    load_motion_modules,
    save_motion_modules,
    to_original,
)
from latentdiffusion.checkpoints.safe_io import read_metadata, save_safetensors
from latentdiffusion.config import TINY
from latentdiffusion.errors import UserError
from latentdiffusion.models.motion import MotionConfig, MotionModules, VideoUNet
from latentdiffusion.models.unet import UNet

from .test_motion import random_motion

CROSS = MotionConfig(block_channels=(32, 64), layers=1, max_frames=24, cross_attention_dim=48)


def per_pixel_reference(module, x: torch.Tensor, frames: int, context: torch.Tensor) -> torch.Tensor:
    """The module as AnimateDiff's original code runs a "Temporal_Cross" attention: the text states
    repeated for every pixel's sequence of frames."""
    n, channels, height, width = x.shape
    batch = n // frames
    h = module.norm(x.unflatten(0, (batch, frames)).transpose(1, 2))
    h = module.proj_in(h.permute(0, 3, 4, 2, 1).reshape(batch * height * width, frames, channels))
    repeated = context.repeat_interleave(height * width, dim=0)  # [B * H * W, S, D]
    for block in module.blocks:
        h = h + block.attn1(block.pos_embed(block.norm1(h)))
        h = h + block.attn2(block.pos_embed(block.norm2(h)), repeated)
        h = h + block.ff(block.norm3(h))
    h = module.proj_out(h).reshape(batch, height, width, frames, channels).permute(0, 3, 4, 1, 2)
    return x + h.reshape(n, channels, height, width)


def test_batched_cross_attention_equals_the_per_pixel_one():
    module = random_motion(CROSS).down_blocks[1][0]
    frames, generator = 5, torch.Generator().manual_seed(3)
    x = torch.randn(2 * frames, 64, 3, 4, generator=generator)
    context = torch.randn(2, 7, 48, generator=generator)
    with torch.no_grad():
        ours = module(x, frames, context)
        reference = per_pixel_reference(module, x, frames, context)
    assert torch.allclose(ours, reference, atol=1e-5)
    with torch.no_grad():  # and it reads the text: other states, another output
        assert not torch.allclose(module(x, frames, context.flip(0)), ours, atol=1e-3)


def test_fresh_modules_are_the_identity_and_need_the_text():
    modules = MotionModules(CROSS)
    x = torch.randn(4, 32, 4, 4)
    with torch.no_grad():
        assert torch.equal(modules.down_blocks[0][0](x, 4, torch.randn(1, 3, 48)), x)
    with pytest.raises(ValueError, match="pass its text states"):
        modules.hook(4)


def two_clips_and_the_second_alone(network: VideoUNet) -> tuple[torch.Tensor, torch.Tensor]:
    """``network``'s output for two random clips of 3 frames (timesteps 10 and 900, their own text states)
    in one call, and for the second clip alone."""
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 3, 8, 8, generator=generator)
    context = torch.randn(2, 5, 32, generator=generator)
    with torch.no_grad():
        both = network(x, torch.tensor([10, 900]), context=context)
        second = network(x[1:], torch.tensor([900]), context=context[1:])
    return both, second


def test_video_unet_passes_each_samples_text_to_the_modules():
    unet = UNet(TINY.unet).eval()
    config = MotionConfig(block_channels=(32, 64), layers=1, max_frames=24, cross_attention_dim=32)
    both, second = two_clips_and_the_second_alone(VideoUNet(unet, random_motion(config)))
    assert torch.allclose(both[1:], second, atol=1e-5)  # a sample's frames see its own text only


def test_a_module_for_another_text_width_is_refused():
    unet = UNet(TINY.unet)  # text states 32 wide
    with pytest.raises(UserError, match="text states of width 48, this model's are 32"):
        VideoUNet(unet, MotionModules(CROSS))


def test_file_keeps_the_original_layout_and_says_what_it_is(tmp_path):
    modules = random_motion(CROSS)
    path = save_motion_modules(modules, tmp_path / "mm.safetensors")
    assert read_metadata(path)[BLOCK_TYPES_KEY] == CROSS_TYPES
    loaded = load_motion_modules(path)
    assert loaded.config == CROSS
    ours = modules.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in loaded.state_dict().items())
    raw = to_original(ours)
    key = "down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.1."
    key += "to_k.weight"
    assert tuple(raw[key].shape) == (32, 48)
    # without the metadata a key projection of another width than the module still tells it
    save_safetensors(raw, tmp_path / "bare.safetensors")
    assert load_motion_modules(tmp_path / "bare.safetensors").config == CROSS
    assert from_original(raw).keys() == ours.keys()


def test_metadata_settles_a_text_width_equal_to_the_modules(tmp_path):
    config = MotionConfig(block_channels=(32, 64), layers=1, max_frames=24, cross_attention_dim=32)
    path = save_motion_modules(random_motion(config), tmp_path / "mm.safetensors")
    assert load_motion_modules(path).config == config
    plain = MotionConfig(block_channels=(32, 64), layers=1, max_frames=24)
    path = save_motion_modules(random_motion(plain), tmp_path / "plain.safetensors")
    assert load_motion_modules(path).config == plain


def test_unknown_block_types_are_refused(tmp_path):
    raw = to_original(random_motion(CROSS).state_dict())
    save_safetensors(raw, tmp_path / "odd.safetensors", {BLOCK_TYPES_KEY: "Temporal_Self,Spatial_Cross"})
    with pytest.raises(UserError, match="unsupported attention_block_types"):
        load_motion_modules(tmp_path / "odd.safetensors")


def test_a_clip_with_text_attention_modules_depends_on_the_prompt(tmp_path):
    import latentdiffusion as ld

    config = MotionConfig(block_channels=(32, 64), layers=1, max_frames=24, cross_attention_dim=32)
    path = save_motion_modules(random_motion(config), tmp_path / "mm.safetensors")
    pipe = ld.load("preset:tiny")
    options = dict(width=32, height=32, steps=2, seed=5, motion_module=path, frames=8, context=6, overlap=2)
    clip = pipe.animate("a red square", **options)  # guided (cond and uncond in one batch), in windows
    other = pipe.animate("a blue circle", **options)
    assert len(clip) == 8
    assert any(a.tobytes() != b.tobytes() for a, b in zip(clip, other, strict=True))
