"""Motion training with ``--contrast-margin``: each clip is also denoised under its caption with the motion
reversed, in the same batch, and a hinge asks that loss to exceed the clip's own by the margin."""

from __future__ import annotations

import json

import pytest
import torch

from latentdiffusion.errors import UserError
from latentdiffusion.pipelines.loading import load_components
from latentdiffusion.training.motion import MotionOptions, MotionTask, train_motion
from latentdiffusion.training.moving_shapes import reversed_motion_prompt
from latentdiffusion.training.task import StepRandom

from .test_motion_training import base, clip_batch, config_for  # noqa: F401  (the tiny base model)


@pytest.mark.parametrize(
    ("prompt", "reversed_prompt"),
    [
        ("a red circle moving right on a blue background", "a red circle moving left on a blue background"),
        (
            "a red square moving up quickly on a white background",
            "a red square moving down quickly on a white background",
        ),
        (
            "a green triangle bouncing left and right and growing on a black background",
            "a green triangle bouncing up and down and shrinking on a black background",
        ),
        ("a red circle on a blue background", None),  # a still caption: nothing to reverse
    ],
)
def test_reversed_motion_prompt(prompt, reversed_prompt):
    assert reversed_motion_prompt(prompt) == reversed_prompt
    if reversed_prompt:
        assert reversed_motion_prompt(reversed_prompt) == prompt


def task_with(base, margin: float) -> MotionTask:  # noqa: F811
    options = MotionOptions(frames=4, text_attention=True, contrast_margin=margin)
    return MotionTask(config_for(base), load_components(str(base)), torch.device("cpu"), options)


def test_the_second_half_is_the_same_clips_under_other_captions(base):  # noqa: F811
    task, batch = task_with(base, 0.0), clip_batch(2)
    modules = dict(task.networks)

    def random():
        return StepRandom(0, 3, 2, torch.arange(2))

    with torch.no_grad():
        plain = task.clip_loss(modules, batch, random())
        same = task.clip_loss(modules, batch, random(), batch.captions)
        other = task.clip_loss(modules, batch, random(), [reversed_motion_prompt(c) for c in batch.captions])
    assert same.shape == other.shape == (4,)
    assert torch.allclose(same[:2], plain, atol=1e-6) and torch.allclose(same[2:], plain, atol=1e-6)
    assert torch.allclose(other[:2], plain, atol=1e-6)  # the own captions' losses come first, unchanged
    assert not torch.allclose(other[2:], plain)  # the reversed captions denoise differently


def gradient(task: MotionTask, loss: torch.Tensor) -> torch.Tensor:
    task.motion.zero_grad()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in task.motion.parameters() if p.grad is not None])


def test_the_hinge_adds_to_the_loss_and_to_the_modules_gradient(base):  # noqa: F811
    task, batch = task_with(base, 10.0), clip_batch(2)  # a margin no fresh model meets
    modules = dict(task.networks)

    def random():
        return StepRandom(0, 3, 2, torch.arange(2))

    losses, metrics = task.losses(modules, batch, random(), 0)
    assert metrics["hinge"] > 0 and metrics["loss"] > 0 and abs(metrics["gap"]) < 10
    assert losses["motion"].item() == pytest.approx(metrics["loss"] + metrics["hinge"], rel=1e-5)
    with_hinge = gradient(task, losses["motion"])
    plain = gradient(task, task.clip_loss(modules, batch, random()).mean())
    assert with_hinge.abs().sum() > 0 and not torch.allclose(with_hinge, plain)


def test_training_logs_the_gap_and_a_bad_margin_is_refused(base, tmp_path):  # noqa: F811
    options = MotionOptions(frames=4, contrast_margin=0.1)
    train_motion(config_for(base, max_steps="2"), tmp_path / "run", options)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in lines if "gap" in r]
    assert logged and all(
        torch.isfinite(torch.tensor([r["gap"], r["hinge"], r["loss"]])).all() for r in logged
    )
    with pytest.raises(UserError, match="--contrast-margin"):
        train_motion(
            config_for(base, max_steps="1"), tmp_path / "bad", MotionOptions(frames=4, contrast_margin=-1)
        )
