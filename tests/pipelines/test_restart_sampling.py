"""Restart sampling (Xu et al. 2023): the noise each restart adds, the steps it runs again, that it is off
unless asked for, reproducible, recorded in PNG info, and its bad values refused."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from latentdiffusion.cli.common import restart_spec
from latentdiffusion.config import ScheduleConfig
from latentdiffusion.diffusion.noise import seeded_noise
from latentdiffusion.errors import UserError
from latentdiffusion.pipelines.metadata import parse_parameters
from latentdiffusion.pipelines.pipeline import Pipeline
from latentdiffusion.pipelines.sampling import (
    RESTART_SEED_OFFSET,
    SamplingOptions,
    integrate,
    restart_segments,
)
from latentdiffusion.samplers import sample

SIZE = 32
FAST = {"steps": 5, "guidance_scale": 3.0, "sampler": "euler"}


def test_each_restart_adds_the_noise_between_the_segments_ends_and_runs_the_segment_again():
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    segment = torch.tensor([2.0, 1.0, 0.5])
    seen = []

    def run(latent, sigmas, callback):
        seen.append((latent.clone(), sigmas.clone()))
        return latent * 0.5  # what the "sampler" makes of it

    out = restart_segments(run, x, segment, 2, [7, 8])
    first = seeded_noise((2, 4, 3, 3), [7 + RESTART_SEED_OFFSET, 8 + RESTART_SEED_OFFSET])
    scale = math.sqrt(2.0**2 - 0.5**2)
    assert len(seen) == 2 and all(torch.equal(s, segment) for _, s in seen)
    torch.testing.assert_close(seen[0][0], x + scale * first)
    # the second restart draws the next noise of the same per-image streams
    second = seen[1][0] - 0.5 * seen[0][0]
    assert second.std() > 0.5 * scale and not torch.allclose(second / scale, first)
    torch.testing.assert_close(out, 0.5 * seen[1][0])


def levels_called(options: SamplingOptions, sigmas: torch.Tensor) -> list[float]:
    calls = []

    def denoiser(x, sigma):
        calls.append(round(float(sigma.flatten()[0]), 6))
        return torch.zeros_like(x)

    integrate(denoiser, torch.randn(1, 1, 2, 2), sigmas, options, [0])
    return calls


def test_the_restarted_steps_are_the_last_ones_before_the_final_step():
    sigmas = torch.tensor([10.0, 6.0, 4.0, 2.0, 1.0, 0.5, 0.0])
    plain = SamplingOptions(steps=6, sampler="euler")
    assert levels_called(plain, sigmas) == [10.0, 6.0, 4.0, 2.0, 1.0, 0.5]
    restarted = replace(plain, restart_steps=3, restart_times=2)
    main, again, last = [10.0, 6.0, 4.0, 2.0, 1.0], [4.0, 2.0, 1.0], [0.5]
    assert levels_called(restarted, sigmas) == main + again + again + last
    # a run shorter than the restart (img2img) restarts from its own first level
    assert levels_called(restarted, sigmas[-3:]) == [1.0, 1.0, 1.0, 0.5]
    # a run that does not end at 0 (the base model's half, a refiner finishes) does not restart
    assert levels_called(restarted, sigmas[:4]) == [10.0, 6.0, 4.0]


def test_without_restart_the_run_is_the_samplers_own():
    sigmas = torch.tensor([8.0, 3.0, 1.0, 0.3, 0.0])
    x = torch.randn(1, 2, 3, 3, generator=torch.Generator().manual_seed(1))

    def denoiser(x, sigma):
        return torch.tanh(x) * 0.7

    options = SamplingOptions(steps=4, sampler="dpmpp_2m")
    assert torch.equal(integrate(denoiser, x, sigmas, options, [0]), sample("dpmpp_2m", denoiser, x, sigmas))


@pytest.fixture(scope="module")
def sd(tiny_model):
    return Pipeline(tiny_model("sd").ours)


def test_restart_changes_the_image_reproducibly_and_is_recorded(sd):
    plain = sd.generate("a cat", width=SIZE, height=SIZE, seed=3, **FAST)[0]
    first = sd.generate("a cat", width=SIZE, height=SIZE, seed=3, restart=(2, 2), **FAST)[0]
    again = sd.generate("a cat", width=SIZE, height=SIZE, seed=3, restart=(2, 2), **FAST)[0]
    off = sd.generate("a cat", width=SIZE, height=SIZE, seed=3, restart=0, **FAST)[0]
    assert first.tobytes() == again.tobytes() and first.tobytes() != plain.tobytes()
    assert off.tobytes() == plain.tobytes()
    assert parse_parameters(first.info["parameters"])["settings"]["Restart"] == "2x2"
    assert "Restart" not in parse_parameters(plain.info["parameters"])["settings"]


def test_img2img_restarts_within_its_own_steps(sd):
    picture = sd.generate("a dog", width=SIZE, height=SIZE, seed=1, **FAST)[0]
    run = {"strength": 0.5, "seed": 4, **FAST}  # 2 of the 5 steps: the restart re-runs the first one
    plain = sd.img2img(picture, "a cat", **run)[0]
    restarted = [sd.img2img(picture, "a cat", restart=(4, 1), **run)[0] for _ in range(2)]
    assert restarted[0].tobytes() == restarted[1].tobytes() != plain.tobytes()


@pytest.mark.parametrize(
    ("restart", "message"),
    [
        ((5, 1), "restart steps must be"),
        ((2, 0), "restart times must be"),
        ((2, 11), "restart times must be"),
        ((-1, 1), "restart steps must be"),
        ("2x2", "restart must be STEPS"),
        ((1.5, 1), "restart steps must be"),
    ],
)
def test_bad_restarts_are_refused(sd, restart, message):
    with pytest.raises(UserError, match=message):
        sd.generate("a cat", width=SIZE, height=SIZE, restart=restart, **FAST)


def test_flow_models_refuse_restart():
    options = SamplingOptions(steps=10, restart_steps=2, grid=ScheduleConfig(process="flow"))
    with pytest.raises(UserError, match="flow models"):
        options.validate()


def test_cli_restart_spec():
    assert restart_spec("6") == (6, 1) and restart_spec("6x2") == (6, 2) and restart_spec("4X3") == (4, 3)
    for bad in ("six", "6x", "x2"):
        with pytest.raises(Exception, match="STEPSxTIMES"):
            restart_spec(bad)


def test_eval_shapes_generates_with_the_restart_asked_for(eval_shapes_settings):
    assert eval_shapes_settings("--restart", "3x2")["restart"] == (3, 2)
