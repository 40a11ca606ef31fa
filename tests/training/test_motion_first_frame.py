"""Motion modules that animate a given first frame (``ldm train-motion --first-frame``): in every U-Net call
frame 0 is the clean first frame at timestep 0, training scores only the later frames, the module file
records it, and a text-to-video clip starts with the still the model makes for its prompt and seed."""

from __future__ import annotations

import pytest
import torch

from latentdiffusion.checkpoints.motion_keys import (
    FIRST_FRAME_KEY,
    load_motion_modules,
    save_motion_modules,
    to_original,
)
from latentdiffusion.checkpoints.safe_io import read_metadata, save_safetensors
from latentdiffusion.errors import UserError
from latentdiffusion.models.motion import ContextWindows, MotionConfig, MotionModules, VideoUNet
from latentdiffusion.pipelines.loading import load_components
from latentdiffusion.training.motion import EXPORT_FILE, MotionOptions, MotionTask
from latentdiffusion.training.task import StepRandom

from .test_motion_training import base, clip_batch, config_for, straight_and_resumed  # noqa: F401

FIRST = MotionOptions(frames=4, first_frame=True)
TINY_MOTION = MotionConfig(block_channels=(32, 64), layers=1, max_frames=24, first_frame=True)


def randomised(modules: MotionModules, seed: int = 0) -> MotionModules:
    """``modules`` with their zero-initialised output projections randomised (a fresh module is the
    identity, which would hide what the frames exchange)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in modules.named_parameters():
            if "proj_out" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return modules


def test_frame_zero_is_the_given_frame_at_timestep_zero(base):  # noqa: F811
    task = MotionTask(config_for(base), load_components(str(base)), torch.device("cpu"), FIRST)
    cond = task.condition({}, clip_batch())
    x, first = torch.randn(1, 4, 4, 8, 8), torch.randn(1, 4, 8, 8)
    t = torch.tensor([700])
    with torch.no_grad():
        # fresh modules are the identity: every frame is the U-Net's own, frame 0 the given one at t = 0
        video = VideoUNet(task.unet, task.motion)(x, t, first_frame=first, **cond)
        assert torch.allclose(video[:, :, 0], task.unet(first, torch.tensor([0]), **cond), atol=1e-5)
        assert torch.allclose(video[:, :, 2], task.unet(x[:, :, 2], t, **cond), atol=1e-5)
        # with modules that mix the frames, x's own frame 0 is never read; the given frame is
        network = VideoUNet(task.unet, randomised(task.motion))
        a = network(x, t, first_frame=first, **cond)
        other_x0 = torch.cat([torch.randn(1, 4, 1, 8, 8), x[:, :, 1:]], dim=2)
        assert torch.equal(a, network(other_x0, t, first_frame=first, **cond))
        b = network(x, t, first_frame=torch.randn(1, 4, 8, 8), **cond)
        assert not torch.allclose(a[:, :, 1:], b[:, :, 1:], atol=1e-4)


def test_windows_do_not_carry_the_first_frame(base):  # noqa: F811
    task = MotionTask(config_for(base), load_components(str(base)), torch.device("cpu"), FIRST)
    network = VideoUNet(task.unet, task.motion, ContextWindows(length=4, overlap=1))
    cond = task.condition({}, clip_batch())
    with pytest.raises(UserError, match="do not carry the first frame yet"):
        network(torch.randn(1, 4, 6, 8, 8), torch.tensor([500]), first_frame=torch.randn(1, 4, 8, 8), **cond)


def test_training_gives_frame_zero_clean_and_scores_the_rest(base, tmp_path, interrupt_after):  # noqa: F811
    task = MotionTask(config_for(base), load_components(str(base)), torch.device("cpu"), FIRST)
    seen = {}
    forward = VideoUNet.forward

    def spy(self, x, t, **cond):
        seen["first"] = cond["first_frame"]
        out = forward(self, x, t, **cond)
        seen["out"] = out
        return out

    latents = task.clip_latents
    task.clip_latents = lambda x, random: seen.setdefault("z0", latents(x, random))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(VideoUNet, "forward", spy)
        loss = task.clip_loss(task.networks, clip_batch(), StepRandom(0, 0, 1, torch.arange(1)))
    assert torch.equal(seen["first"], seen["z0"][:1])  # [F, C, h, w] of one clip: its frame 0, clean
    assert loss.shape == (1,) and torch.isfinite(loss).all()
    config = config_for(base, max_steps="2")
    straight, resumed = straight_and_resumed(config, tmp_path, FIRST, interrupt_after)
    a = load_motion_modules(straight.export_dir / EXPORT_FILE)
    b = load_motion_modules(resumed.export_dir / EXPORT_FILE)
    assert a.config.first_frame and b.config.first_frame
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_the_loss_leaves_frame_zero_out(base):  # noqa: F811
    """The prediction for frame 0 (of a frame the network was given) does not enter the loss."""
    task = MotionTask(config_for(base), load_components(str(base)), torch.device("cpu"), FIRST)
    forward = VideoUNet.forward
    losses = []
    for scale in (1.0, 100.0):

        def scaled(self, x, t, scale=scale, **cond):
            out = forward(self, x, t, **cond).clone()
            out[:, :, 0] *= scale
            return out

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(VideoUNet, "forward", scaled)
            losses.append(task.clip_loss(task.networks, clip_batch(), StepRandom(0, 0, 1, torch.arange(1))))
    assert torch.equal(losses[0], losses[1])


def test_the_file_records_it_and_a_bad_value_is_refused(tmp_path):
    path = save_motion_modules(MotionModules(TINY_MOTION), tmp_path / "mm.safetensors")
    assert read_metadata(path)[FIRST_FRAME_KEY] == "true"
    assert load_motion_modules(path).config == TINY_MOTION
    plain = MotionConfig(block_channels=(32, 64), layers=1, max_frames=24)
    assert FIRST_FRAME_KEY not in read_metadata(save_motion_modules(MotionModules(plain), tmp_path / "p.st"))
    save_safetensors(
        to_original(MotionModules(plain).state_dict()), tmp_path / "bad.safetensors", {FIRST_FRAME_KEY: "1"}
    )
    with pytest.raises(UserError, match="first_frame must be true or false"):
        load_motion_modules(tmp_path / "bad.safetensors")


def test_a_clip_starts_with_the_still_of_its_prompt_and_seed(tmp_path):
    import numpy as np

    import latentdiffusion as ld

    pipe = ld.load("preset:tiny")
    path = save_motion_modules(randomised(MotionModules(TINY_MOTION)), tmp_path / "mm.safetensors")
    options = dict(width=32, height=32, steps=3, seed=5)
    clip = pipe.animate("a red square", motion_module=path, frames=4, **options)
    still = np.asarray(pipe.generate("a red square", **options)[0]).astype(int)
    # the same computation in a batch of 4 frames and of 1 image: on some CPUs the kernels round the
    # last bits differently, which moves a pixel by one level at most
    assert np.abs(np.asarray(clip[0]).astype(int) - still).max() <= 1
    plain = save_motion_modules(
        randomised(MotionModules(MotionConfig(block_channels=(32, 64), layers=1))), tmp_path / "p.safetensors"
    )
    other = pipe.animate("a red square", motion_module=plain, frames=4, **options)
    assert np.abs(np.asarray(other[0]).astype(int) - still).mean() > 10  # a plain module's first frame moves
    with pytest.raises(UserError, match="which do not carry the first frame yet"):
        pipe.animate("a red square", motion_module=path, frames=6, context=4, overlap=1, **options)


def test_a_first_frame_prompt_names_the_still(tmp_path):
    import numpy as np

    import latentdiffusion as ld
    from latentdiffusion.pipelines.metadata import parse_parameters

    pipe = ld.load("preset:tiny")
    path = save_motion_modules(randomised(MotionModules(TINY_MOTION)), tmp_path / "mm.safetensors")
    options = dict(width=32, height=32, steps=3, seed=5)
    clip = pipe.animate(
        "a red square", motion_module=path, frames=3, first_frame_prompt="a blue circle", **options
    )
    assert np.array_equal(np.asarray(clip[0]), np.asarray(pipe.generate("a blue circle", **options)[0]))
    settings = parse_parameters(clip[0].info["parameters"])["settings"]
    assert settings["First frame prompt"] == "a blue circle"
    plain = MotionModules(MotionConfig(block_channels=(32, 64), layers=1))
    with pytest.raises(UserError, match="a first-frame prompt is for modules that animate a first frame"):
        pipe.animate("a red square", motion_module=plain, frames=3, first_frame_prompt="x", **options)
    picture = clip[0]
    with pytest.raises(UserError, match="without a given first frame"):
        pipe.animate(
            "a red square", motion_module=path, frames=3, first_frame=picture, first_frame_prompt="x"
        )


def test_image_to_video_starts_from_the_given_image(tmp_path):
    import numpy as np

    import latentdiffusion as ld
    from latentdiffusion.cli.main import main

    pipe = ld.load("preset:tiny")
    path = save_motion_modules(randomised(MotionModules(TINY_MOTION)), tmp_path / "mm.safetensors")
    picture = pipe.generate("a blue circle", width=32, height=24, steps=3, seed=1)[0]
    picture.save(tmp_path / "first.png")
    clip = pipe.animate("a blue circle", motion_module=path, frames=3, steps=2, seed=2, first_frame=picture)
    assert clip[0].size == (32, 24) and clip[0].info["parameters"].count("First frame: image") == 1
    vae = pipe.components.autoencoder
    from latentdiffusion.pipelines.images import images_to_tensor
    from latentdiffusion.pipelines.text_to_image import tensor_to_images

    with torch.no_grad():
        round_trip = tensor_to_images(
            vae.from_latent(vae.to_latent(images_to_tensor([picture], "cpu", torch.float32)))
        )
    assert np.array_equal(
        np.asarray(clip[0]), np.asarray(round_trip[0])
    )  # the image, through the autoencoder
    plain = MotionConfig(block_channels=(32, 64), layers=1)
    plain_path = save_motion_modules(MotionModules(plain), tmp_path / "plain.safetensors")
    with pytest.raises(UserError, match="does not animate a given first frame"):
        pipe.animate("a blue circle", motion_module=plain_path, frames=3, steps=2, first_frame=picture)
    with pytest.raises(UserError, match="the first frame is 32x24, the clip 32x32"):
        pipe.animate("a blue circle", motion_module=path, frames=3, steps=2, first_frame=picture, height=32)
    model = tmp_path / "model"
    pipe.save(model)
    out = tmp_path / "clip.gif"
    args = ["video", "a blue circle", "--model", str(model), "--motion-module", str(path), "--frames", "3"]
    args += ["--steps", "2", "--first-frame", str(tmp_path / "first.png"), "-o", str(out), "--quiet"]
    assert main(args) == 0 and out.is_file()
    assert main([*args[:-3], "--first-frame", str(tmp_path / "missing.png"), "-o", str(out)]) != 0
