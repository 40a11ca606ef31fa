"""Latent walks on the shipped default model: keyframes are the stills, in-between frames the interpolation
(``generate``'s variation noise where the prompt stays), smooth, with PNG info; bad input refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import latentdiffusion as ld
from latentdiffusion.errors import UserError
from latentdiffusion.pipelines.metadata import parse_parameters
from latentdiffusion.pipelines.walk import WalkPoint, frame_changes, interpolate_cond, keyframes, walk_points

RED = "a red circle on a blue background"
GREEN = "a green square on a yellow background"
BLUE = "a blue triangle on a white background"
STEPS = 2  # exactness holds at any step count; smoothness is measured at 4


@pytest.fixture(scope="module")
def pipe():
    return ld.load("default")


def pixels(image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image).copy())


def test_keyframes_are_exactly_the_stills(pipe):
    prompts, seeds = [RED, GREEN, BLUE], [1, 2, 3]
    frames = pipe.walk(prompts, seeds=seeds, frames=2, steps=STEPS, negative_prompt="blurry")
    assert len(frames) == 5  # (3 - 1) * 2 + 1
    for prompt, seed, frame in zip(prompts, seeds, frames[::2], strict=True):
        (still,) = pipe.generate(prompt, seed=seed, steps=STEPS, negative_prompt="blurry")
        assert torch.equal(pixels(frame), pixels(still))
        assert frame.info["parameters"].startswith(still.info["parameters"])
    assert not torch.equal(pixels(frames[1]), pixels(frames[0]))
    assert not torch.equal(pixels(frames[1]), pixels(frames[2]))


def test_a_seed_walk_frame_is_generates_variation_noise(pipe):
    """One prompt: an in-between frame starts from the slerp of the two seeds' noises, which is
    ``generate``'s variation noise with the frame's recorded variation seed and strength."""
    frames = pipe.walk(RED, seeds=[5, 9], frames=4, steps=STEPS)
    settings = parse_parameters(frames[1].info["parameters"])["settings"]
    assert settings["Variation seed"] == "9"
    assert float(settings["Variation seed strength"]) == 0.25
    (same,) = pipe.generate(RED, seed=5, steps=STEPS, variation_seed=9, variation_strength=0.25)
    assert torch.equal(pixels(frames[1]), pixels(same))


def test_walk_is_smooth_on_the_default_model(pipe):
    """The documented walk (a colour change, then a shape change, one seed, the model's 20 steps): no frame
    changes by more than 2x the median frame-to-frame change (measured: 1.4x; docs/video.md)."""
    keyframes = [RED, "a yellow circle on a blue background", "a yellow square on a blue background"]
    changes = frame_changes(pipe.walk(keyframes, seeds=7, frames=6))
    assert len(changes) == 12
    assert max(changes) <= 2 * float(np.median(changes))


def test_frames_record_their_place_in_the_walk(pipe):
    seen = []
    frames = pipe.walk([RED, GREEN], seeds=3, frames=2, steps=2, on_frame=lambda i, f: seen.append((i, f)))
    assert [i for i, _ in seen] == [0, 1, 2] and all(a is b for (_, a), b in zip(seen, frames, strict=True))
    middle = parse_parameters(frames[1].info["parameters"])
    assert middle["prompt"] == RED
    assert middle["settings"]["Walk frame"] == "2/3"
    assert middle["settings"]["Walk position"] == "0.5"
    assert middle["settings"]["Walk to"] == GREEN
    assert "Variation seed" not in middle["settings"]  # one seed for every keyframe
    last = parse_parameters(frames[2].info["parameters"])
    assert (last["prompt"], last["settings"]["Walk position"], last["settings"]["Seed"]) == (GREEN, "1", "3")
    assert "Walk to" not in last["settings"]


def test_progress_bar_counts_frames(pipe, capsys):
    pipe.walk(RED, seeds=[1, 2], frames=1, steps=1, progress=True)
    assert "2/2" in capsys.readouterr().err


def test_walk_points_and_keyframes():
    assert walk_points(3, 2) == [WalkPoint(0, 0.0), WalkPoint(0, 0.5), WalkPoint(1, 0.0), WalkPoint(1, 0.5),
                                 WalkPoint(2, 0.0)]  # fmt: skip
    assert WalkPoint(1, 0.25).position == 1.25
    assert keyframes("a", [1, 2, 3]) == (["a", "a", "a"], [1, 2, 3])
    assert keyframes(["a", "b"], 7) == (["a", "b"], [7, 7])
    assert keyframes(["a", "b"], [1, 2]) == (["a", "b"], [1, 2])


def test_cond_interpolation_covers_every_tensor_and_keeps_the_ends():
    a = {"context": torch.randn(1, 77, 8).half(), "y": torch.randn(1, 6)}
    b = {"context": torch.randn(1, 77, 8).half(), "y": torch.randn(1, 6)}
    middle = interpolate_cond(a, b, 0.25)
    assert middle["context"].dtype == torch.float16
    torch.testing.assert_close(middle["y"], 0.75 * a["y"] + 0.25 * b["y"])
    for t, end in ((0.0, a), (1.0, b)):
        assert all(torch.equal(interpolate_cond(a, b, t)[k], end[k]) for k in a)


@pytest.mark.parametrize(
    ("prompts", "seeds", "options", "message"),
    [
        ([RED], 1, {}, "at least two keyframes"),
        ([RED, GREEN, BLUE], [1, 2], {}, "one seed per prompt"),
        ([RED, GREEN], [1, -2], {}, "seeds must be whole numbers"),
        ([RED, GREEN], 1, {"frames": 0}, "frames .* must be a whole number >= 1"),
        ([RED, GREEN], 1, {"seed": 4}, "sets seed itself"),
        ([RED, GREEN], 1, {"latents": torch.zeros(1)}, "sets latents itself"),
        ([RED, GREEN], 1, {"width": 60}, "width must be a positive multiple of 8"),
        ([RED, GREEN], 1, {"sampler": "nope"}, "unknown sampler"),
    ],
)
def test_bad_walks_are_refused(pipe, prompts, seeds, options, message):
    with pytest.raises(UserError, match=message):
        pipe.walk(prompts, seeds=seeds, **options)


def test_frame_changes():
    from PIL import Image

    black, grey = Image.new("RGB", (4, 4)), Image.new("RGB", (4, 4), (10, 10, 10))
    assert frame_changes([black, grey, grey]) == [10.0, 0.0]
