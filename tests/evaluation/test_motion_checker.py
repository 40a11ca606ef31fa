"""The moving-shapes checker on the world's own clips, corrupted clips and synthetic tracks."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from latentdiffusion.evaluation.motion_checker import (
    acceptance_on_rendered,
    check_clip,
    measure_clip,
    summarise,
)
from latentdiffusion.training.moving_shapes import (
    MovingShapesDataset,
    clip_for_prompt,
    frames_to_tensor,
    render_clip,
)
from latentdiffusion.training.shapes import Scene, ShapeSpec, render


def _noisy(frames: list[Image.Image], seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    noisy = []
    for frame in frames:
        pixels = np.asarray(frame, dtype=np.float32) + rng.normal(0, 6, size=(64, 64, 3))
        noisy.append(Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8)))
    return noisy


def _frames(prompt: str, seed: int = 0) -> list[Image.Image]:
    return render_clip(clip_for_prompt(prompt, seed))


def test_accepts_the_worlds_own_clips():
    assert acceptance_on_rendered(6)["all"] == 1.0
    assert acceptance_on_rendered(4, seed=3, perturb=True)["all"] == 1.0
    dataset = MovingShapesDataset(7)
    for index in range(2):  # as tensors, and with pixel noise
        clip, text = dataset.clip_and_caption(index)
        frames = render_clip(clip)
        assert check_clip(frames_to_tensor(frames), text)["all"], text
        assert check_clip(_noisy(frames, index), text)["all"], text


def test_a_static_clip_moves_nowhere():
    prompt = "a red circle moving right on a blue background"
    still = [_frames(prompt)[0]] * 16
    result = check_clip(still, prompt)
    assert not result["direction"] and not result["all"]
    assert result["colour"] and result["shape"] and result["background"] and result["consistency"]
    assert measure_clip(still).mean_frame_change == 0.0
    bouncing = "a red circle bouncing left and right on a blue background"
    assert not check_clip(still, bouncing)["direction"]


@pytest.mark.parametrize(
    ("prompt", "verdict"),
    [
        ("a green square moving left quickly on a white background", "direction"),
        ("a yellow triangle moving up slowly on a black background", "direction"),
        ("a purple circle moving down and growing on a orange background", "growth"),
        ("a gray square moving right and shrinking on a red background", "growth"),
    ],
)
def test_a_reversed_clip_is_rejected(prompt, verdict):
    frames = _frames(prompt, seed=3)
    assert check_clip(frames, prompt)["all"]
    result = check_clip(frames[::-1], prompt)
    assert not result[verdict] and not result["all"]
    assert result["consistency"]  # still one smooth object: only the stated motion is wrong


def test_wrong_words_are_rejected():
    frames = _frames("a red circle moving right quickly on a blue background", seed=1)
    assert not check_clip(frames, "a red circle moving up quickly on a blue background")["direction"]
    assert not check_clip(frames, "a red circle moving right slowly on a blue background")["speed"]
    assert not check_clip(frames, "a red square moving right on a blue background")["shape"]
    assert not check_clip(frames, "a green circle moving right on a blue background")["colour"]
    assert not check_clip(frames, "a red circle moving right on a gray background")["background"]
    assert not check_clip(frames, "a red circle moving right and growing on a blue background")["growth"]
    assert not check_clip(frames, "a red circle bouncing left and right on a blue background")["direction"]
    bounce = _frames("a red circle bouncing up and down on a blue background", seed=2)
    assert check_clip(bounce, "a red circle bouncing up and down on a blue background")["all"]
    assert not check_clip(bounce, "a red circle bouncing left and right on a blue background")["direction"]


def test_an_object_that_changes_colour_is_inconsistent():
    prompt = "a red circle moving right on a blue background"
    frames = _frames(prompt, seed=4)
    clip = clip_for_prompt(prompt, 4)
    recoloured = [
        render(Scene((ShapeSpec("orange" if t >= 10 else o.colour, o.shape, o.centre, o.extent),), "blue"))
        for t, o in enumerate(clip.frames)
    ]
    assert check_clip(frames, prompt)["all"]
    result = check_clip(recoloured, prompt)
    assert result["colour"] and not result["consistency"] and not result["all"]


def _synthetic(centres: list[tuple[float, float]], extents: list[float]) -> list[Image.Image]:
    return [
        render(Scene((ShapeSpec("white", "square", c, e),), "black"))
        for c, e in zip(centres, extents, strict=True)
    ]


def test_synthetic_tracks():
    prompt = "a white square moving right on a black background"
    smooth = _synthetic([(12 + 2 * t, 30.0) for t in range(16)], [14.0] * 16)
    assert check_clip(smooth, prompt)["all"]
    track = measure_clip(smooth)
    assert np.allclose(np.diff(track.centres()[:, 0]), 2.0, atol=0.2)
    assert np.allclose(track.centres()[:, 1], 30.0, atol=0.2)
    jump = _synthetic([(12 + 2 * t + 12 * (t >= 8), 30.0) for t in range(16)], [14.0] * 16)
    assert not check_clip(jump, prompt)["consistency"]  # a 14 px jump between two frames
    pulse = _synthetic([(12 + 2 * t, 30.0) for t in range(16)], [14.0 + 8 * (t == 8) for t in range(16)])
    assert not check_clip(pulse, prompt)["consistency"]  # area x2 for one frame
    short = _synthetic([(20 + 0.4 * t, 30.0) for t in range(16)], [14.0] * 16)
    assert not check_clip(short, prompt)["direction"]  # 6 px: below the minimum travel
    diagonal = _synthetic([(12 + 2 * t, 12 + 2.5 * t) for t in range(16)], [14.0] * 16)
    assert not check_clip(diagonal, prompt)["direction"]  # mostly downwards
    empty = [Image.new("RGB", (64, 64), (20, 20, 20))] * 16
    result = check_clip(empty, prompt)
    assert not result["direction"] and not result["consistency"] and not result["colour"]


def test_bad_input():
    with pytest.raises(ValueError, match="moving-shapes grammar"):
        check_clip(
            _frames("a red circle moving right on a blue background")[:2], "a red circle on a blue background"
        )
    with pytest.raises(ValueError, match="at least 2 frames"):
        measure_clip(_frames("a red circle moving right on a blue background")[:1])


def test_summarise_counts_only_stated_verdicts():
    summary = summarise([{"speed": True, "all": True}, {"speed": False, "all": False}, {"all": True}])
    assert summary == {"speed": 0.5, "all": pytest.approx(2 / 3)}


def test_held_out_evaluation_of_an_animating_pipeline():
    from latentdiffusion.evaluation.motion_eval import HELD_OUT_SEED, evaluate_motion, held_out_prompts

    prompts = held_out_prompts(3)
    assert prompts == held_out_prompts(3, HELD_OUT_SEED) and len(set(prompts)) == 3

    class Rendering:  # a stand-in pipeline that animates by rendering the world's own clip
        def animate(self, prompt, *, motion_module, frames, seed, **options):
            assert motion_module == "mm.safetensors" and options == {"steps": 2}
            return render_clip(clip_for_prompt(prompt, seed, frames))

    report = evaluate_motion(Rendering(), "mm.safetensors", prompts, steps=2)
    assert report.rates["all"] == 1.0 and report.clips == 3 and report.mean_frame_change > 0

    class Still(Rendering):
        def animate(self, prompt, **kwargs):
            return [super().animate(prompt, **kwargs)[0]] * 16

    still = evaluate_motion(Still(), "mm.safetensors", prompts, steps=2)
    assert still.rates["direction"] == 0.0 and still.mean_frame_change == 0.0
    with pytest.raises(ValueError, match="moving-shapes grammar"):
        evaluate_motion(Still(), "mm.safetensors", ["a red circle on a blue background"])


def test_the_command_passes_steps_and_guidance_to_the_pipeline(monkeypatch, capsys):
    import latentdiffusion as ld
    from latentdiffusion.evaluation import motion_eval

    seen, evaluate = {}, motion_eval.evaluate_motion

    def fake_evaluate(pipe, module, prompts, *, frames, seed, on_clip, clip_options, **options):
        seen.update(module=module, prompts=len(prompts), options=options, clip_options=clip_options)
        return evaluate(Renderer(), module, prompts[:1], frames=frames, seed=seed, on_clip=on_clip)

    class Renderer:
        def animate(self, prompt, *, motion_module, frames, seed, **options):
            return render_clip(clip_for_prompt(prompt, seed, frames))

    monkeypatch.setattr(ld, "load", lambda model, loras: object())
    monkeypatch.setattr(motion_eval, "evaluate_motion", fake_evaluate)
    motion_eval.main(["--clips", "2", "--motion-module", "m.safetensors", "--steps", "3", "--guidance", "4"])
    options = {"steps": 3, "guidance_scale": 4.0}
    assert seen == {"module": "m.safetensors", "prompts": 2, "options": options, "clip_options": None}
    clip_line, summary = capsys.readouterr().out.splitlines()[:2]
    assert re.search(r"moved \([+-]\d+, [+-]\d+\) px, failed", clip_line), clip_line  # the world's own clip
    assert summary.startswith("1 clips:")


def test_own_still_starts_each_clip_from_the_still_of_its_own_prompt():
    from latentdiffusion.evaluation.motion_eval import evaluate_motion, own_still

    asked = []

    class Renderer:
        def animate(self, prompt, *, motion_module, frames, seed, **options):
            asked.append(options)
            return render_clip(clip_for_prompt(prompt, seed, frames))

    prompt = "a red circle moving right on a blue background"
    evaluate_motion(Renderer(), "m", [prompt], frames=4)
    evaluate_motion(Renderer(), "m", [prompt], frames=4, clip_options=own_still)
    assert asked == [{}, {"first_frame_prompt": prompt}]
