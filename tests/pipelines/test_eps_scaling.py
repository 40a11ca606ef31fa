"""Epsilon scaling (Ning et al. 2024): the guided noise estimate divided by a factor at every step, off
unless asked for or set by the model, recorded in PNG info, its bad values refused (requests, model files,
the CLI)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from latentdiffusion.components import build_components
from latentdiffusion.config import TINY
from latentdiffusion.errors import UserError
from latentdiffusion.pipelines.metadata import parse_parameters
from latentdiffusion.pipelines.pipeline import Pipeline
from latentdiffusion.pipelines.sampling import SamplingOptions, eps_scaled, integrate
from latentdiffusion.samplers import sample

SIZE = 32
FAST = {"steps": 4, "guidance_scale": 3.0, "sampler": "euler", "width": SIZE, "height": SIZE, "seed": 2}


def toy_denoiser(x, sigma):
    return torch.tanh(x) * 0.7


def test_the_estimate_keeps_x_and_divides_the_noise_by_the_factor():
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor(2.0)
    x0 = toy_denoiser(x, sigma)
    torch.testing.assert_close(eps_scaled(toy_denoiser, 0.8)(x, sigma), x - (x - x0) / 0.8)
    assert eps_scaled(toy_denoiser, 1.0) is toy_denoiser


def test_a_run_integrates_the_scaled_denoiser():
    sigmas = torch.tensor([8.0, 3.0, 1.0, 0.3, 0.0])
    x = torch.randn(1, 2, 3, 3, generator=torch.Generator().manual_seed(1))
    options = SamplingOptions(steps=4, sampler="dpmpp_2m", eps_scaling=1.1)
    expected = sample("dpmpp_2m", eps_scaled(toy_denoiser, 1.1), x, sigmas)
    torch.testing.assert_close(integrate(toy_denoiser, x, sigmas, options, [0]), expected)
    plain = integrate(toy_denoiser, x, sigmas, replace(options, eps_scaling=1.0), [0])
    assert not torch.allclose(plain, expected)


@pytest.fixture(scope="module")
def pipes():
    plain = build_components(TINY)
    scaled = replace(plain, config=replace(plain.config, default_eps_scaling=0.9))
    return Pipeline(plain), Pipeline(scaled)


def test_off_by_default_the_models_own_value_and_a_request_overrides_it(pipes):
    plain, scaled = pipes
    off = plain.generate("a cat", **FAST)[0]
    asked = plain.generate("a cat", eps_scaling=0.9, **FAST)[0]
    own = scaled.generate("a cat", **FAST)[0]
    overridden = scaled.generate("a cat", eps_scaling=1.0, **FAST)[0]
    assert asked.tobytes() == own.tobytes() != off.tobytes()
    assert overridden.tobytes() == off.tobytes()
    assert parse_parameters(own.info["parameters"])["settings"]["Eps scaling"] == "0.9"
    assert "Eps scaling" not in parse_parameters(off.info["parameters"])["settings"]


@pytest.mark.parametrize("factor", [0.0, 0.49, 1.6, float("nan"), "1", True])
def test_bad_factors_are_refused(pipes, factor):
    with pytest.raises(UserError, match=r"eps_scaling must be a number from 0\.5 to 1\.5"):
        pipes[0].generate("a cat", eps_scaling=factor, **FAST)


def test_a_model_file_with_a_bad_factor_is_refused(tmp_path):
    from latentdiffusion.checkpoints.native import NATIVE_CONFIG, load_native, save_native

    folder = tmp_path / "m"
    save_native(build_components(TINY), folder)
    path = folder / NATIVE_CONFIG
    document = json.loads(path.read_text())
    document["config"]["default_eps_scaling"] = 40.0
    path.write_text(json.dumps(document))
    with pytest.raises(UserError, match="default_eps_scaling = 40"):
        load_native(folder)


def test_eval_shapes_passes_it_on(eval_shapes_settings):
    assert eval_shapes_settings("--eps-scaling", "0.995")["eps_scaling"] == 0.995
    assert eval_shapes_settings()["eps_scaling"] is None  # the model's own


def test_the_cli_refuses_a_bad_factor(tmp_path, capsys):
    from latentdiffusion.cli.main import main

    out = tmp_path / "x.png"
    code = main(
        ["generate", "a cat", "--model", "preset:tiny", "--steps", "1", "--eps-scaling", "3", "-o", str(out)]
    )
    assert code == 2 and "eps_scaling must be a number from 0.5 to 1.5" in capsys.readouterr().err
    assert not out.exists()
