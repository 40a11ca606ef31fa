"""Skip-layer guidance (SLG): the guidance wrapper's formula and noise-level window on a toy denoiser
(exact answers), parity with diffusers' StableDiffusion3Pipeline(skip_guidance_layers=...) on a tiny
SD3.5 model, the request path's refusals, PNG info and the ``ldm generate --slg-*`` flags."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sd3_fixtures import SIZE, TINY_SD35_DEEP
from sdxl_fixtures import EIGHT_BIT, as_float

import latentdiffusion as ld
from latentdiffusion.cli.main import main
from latentdiffusion.components import build_components
from latentdiffusion.config import PRESETS
from latentdiffusion.diffusion.guidance import ClassifierFreeGuidance, SkipLayerGuidance
from latentdiffusion.errors import UserError
from latentdiffusion.pipelines.metadata import parse_parameters, read_parameters
from latentdiffusion.pipelines.pipeline import Pipeline

PROMPTS = ["a red circle on a blue background", "a large yellow square"]
NEGATIVES = ["", "blurry"]


def toy_denoiser(x, sigma, context, skip_layers=()):
    """x0 = context * x / (1 + sigma), minus 1 per skipped layer, so each term of SLG is visible."""
    return context * x / (1 + sigma.view(-1, 1)) - len(skip_layers)


@pytest.mark.parametrize(
    ("steps", "start", "stop"),
    [(n, a, b) for n in range(1, 31) for a, b in [(0.01, 0.2), (0.2, 0.5), (0, 1)]],
)
def test_steps_are_diffusers_strict_comparison(steps, start, stop):
    expected = [i for i in range(steps) if i > steps * start and i < steps * stop]
    assert list(SkipLayerGuidance(start=start, stop=stop).steps(steps)) == expected


def test_guidance_adds_the_skip_term_on_the_window_only():
    sigmas = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.0])  # 5 steps: start 0.2, stop 0.8 -> steps 2, 3
    slg = SkipLayerGuidance(layers=(1, 2), scale=0.5, start=0.2, stop=0.8).for_schedule(sigmas)
    assert slg.noise_levels == (1.0, 2.0)
    cond, uncond = {"context": torch.tensor([[3.0]])}, {"context": torch.tensor([[1.0]])}
    guided = ClassifierFreeGuidance(toy_denoiser, cond, uncond, 2.0, skip_layer_guidance=slg)
    x = torch.tensor([[6.0]])
    for sigma in sigmas[:-1]:
        c, u = 3 * 6 / (1 + sigma), 6 / (1 + sigma)
        skip = 2.0 if 1.0 <= sigma <= 2.0 else 0.0  # x0_cond - x0_skip = len(layers)
        expected = u + 2.0 * (c - u) + 0.5 * skip
        assert float(guided(x, sigma.view(1))) == pytest.approx(float(expected), abs=1e-6)


def test_guidance_refuses_a_skip_layer_guidance_without_its_noise_levels():
    with pytest.raises(ValueError, match="for_schedule"):
        ClassifierFreeGuidance(toy_denoiser, {}, {}, 2.0, skip_layer_guidance=SkipLayerGuidance())


@pytest.mark.parametrize(
    ("steps", "start", "stop"),
    [(10, 0.01, 0.2), (8, 0.2, 0.7)],  # diffusers' defaults: step 1 of 10; then steps 2..5 of 8
)
def test_generation_matches_diffusers(sd3_models, diffusers_sd3, steps, start, stop):
    components, _ = sd3_models(TINY_SD35_DEEP)
    theirs = diffusers_sd3(TINY_SD35_DEEP)
    start_latents = torch.randn(2, 16, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(3))
    slg = dict(skip_layer_guidance_scale=2.8, skip_layer_guidance_start=start, skip_layer_guidance_stop=stop)
    settings = dict(negative_prompt=NEGATIVES, height=SIZE, width=SIZE, guidance_scale=4.0)
    expected = theirs(
        PROMPTS,
        num_inference_steps=steps,
        latents=start_latents.clone(),
        skip_guidance_layers=[1, 2],
        output_type="np",
        **settings,
        **slg,
    ).images
    without = theirs(
        PROMPTS, num_inference_steps=steps, latents=start_latents.clone(), output_type="np", **settings
    )
    assert np.abs(expected - without.images).max() > 0.02  # SLG changes the image
    images = Pipeline(components).generate(
        PROMPTS,
        steps=steps,
        sampler="euler",
        latents=start_latents,
        skip_layer_guidance=ld.SkipLayerGuidance(layers=(1, 2), scale=2.8, start=start, stop=stop),
        **settings,
    )
    assert np.abs(as_float(images) - expected).max() <= EIGHT_BIT
    assert parse_parameters(images[0].info["parameters"])["settings"]["SLG"] == (
        f"layers 1,2, scale 2.8, start {start:g}, stop {stop:g}"
    )


def test_skip_layer_guidance_on_no_step_changes_nothing(sd3_models):
    pipe = Pipeline(sd3_models(TINY_SD35_DEEP)[0])
    settings = dict(steps=3, guidance_scale=4.0, sampler="euler", seed=1, width=SIZE, height=SIZE)
    plain = pipe.generate("x", **settings)[0]
    slg = pipe.generate("x", skip_layer_guidance=ld.SkipLayerGuidance(layers=(1,)), **settings)[0]
    assert np.array_equal(np.asarray(plain), np.asarray(slg))  # 3 steps: none inside (0.03, 0.6)
    assert "SLG" not in slg.info["parameters"]


def test_img2img_takes_skip_layer_guidance(sd3_models):
    pipe = Pipeline(sd3_models(TINY_SD35_DEEP)[0])
    picture = pipe.generate("x", steps=2, width=SIZE, height=SIZE, seed=2)[0]
    settings = dict(strength=0.9, steps=8, guidance_scale=4.0, sampler="euler", seed=1)
    plain = pipe.img2img(picture, "x", **settings)[0]
    slg = ld.SkipLayerGuidance(layers=(1, 2), start=0.2, stop=0.7)
    guided = pipe.img2img(picture, "x", skip_layer_guidance=slg, **settings)[0]
    assert not np.array_equal(np.asarray(plain), np.asarray(guided))
    assert "SLG: " in guided.info["parameters"]


def test_skip_layer_guidance_with_a_unet_model_is_refused():
    pipe = Pipeline(build_components(PRESETS["tiny"]))
    with pytest.raises(UserError, match="skip-layer guidance needs a transformer"):
        pipe.generate("x", steps=1, skip_layer_guidance=ld.SkipLayerGuidance(layers=(1,)))


@pytest.mark.parametrize(
    ("slg", "message"),
    [
        (SkipLayerGuidance(layers=(1, 4)), r"layers \[4\] are not blocks"),
        (SkipLayerGuidance(layers=()), "at least one layer"),
        (SkipLayerGuidance(layers=(-1,)), "block indices >= 0"),
        (SkipLayerGuidance(layers=(1,), start=0.5, stop=0.2), "0 <= start < stop <= 1"),
        (SkipLayerGuidance(layers=(1,), scale=float("nan")), "scale must be a finite number"),
        ({"layers": (1,)}, "takes ld.SkipLayerGuidance"),
    ],
)
def test_bad_skip_layer_guidance_is_a_user_error(sd3_models, slg, message):
    pipe = Pipeline(sd3_models(TINY_SD35_DEEP)[0])
    with pytest.raises(UserError, match=message):
        pipe.generate("x", steps=2, width=SIZE, height=SIZE, skip_layer_guidance=slg)


def test_cli_flags_reach_the_image(sd3_models, tmp_path, capsys):
    _, folder = sd3_models(TINY_SD35_DEEP)
    out = tmp_path / "slg.png"
    args = f"generate x --model {folder} --steps 8 --cfg 4 --size {SIZE}x{SIZE} --quiet -o {out}".split()
    assert (
        main([*args, "--slg-layers", "1,2", "--slg-scale", "2", "--slg-start", "0.2", "--slg-stop", "0.7"])
        == 0
    )
    settings = parse_parameters(read_parameters(out))["settings"]
    assert settings["SLG"] == "layers 1,2, scale 2, start 0.2, stop 0.7"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--slg-layers", "7,x"], "expected block indices"),
        (["--slg-layers", "1", "--slg-scale", "inf"], "expected a finite number"),
        (["--slg-scale", "2"], "--slg-scale needs --slg-layers"),
        (["--slg-layers", "1"], "skip-layer guidance needs a transformer"),
        (["--slg-layers", "1", "--slg-start", "0.5", "--slg-stop", "0.1"], "0 <= start < stop <= 1"),
    ],
)
def test_cli_bad_values_are_one_line_and_exit_2(tmp_path, capsys, flags, message):
    args = [
        "generate",
        "x",
        "--model",
        "preset:tiny",
        "--steps",
        "1",
        "--quiet",
        "-o",
        str(tmp_path / "a.png"),
    ]
    try:
        code = main([*args, *flags])
    except SystemExit as exit:  # argparse's own errors
        code = exit.code
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.count("\n") == 1


def test_cli_inpaint_takes_the_flags(sd3_models, tmp_path):
    from PIL import Image

    _, folder = sd3_models(TINY_SD35_DEEP)
    Image.new("RGB", (SIZE, SIZE), (200, 40, 40)).save(tmp_path / "in.png")
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (8, 8, 24, 24))
    mask.save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    args = (
        f"inpaint {tmp_path / 'in.png'} {tmp_path / 'mask.png'} x --model {folder} --steps 8 --cfg 4 -o {out}"
    )
    assert (
        main([*args.split(), "--quiet", "--slg-layers", "2", "--slg-start", "0.2", "--slg-stop", "0.7"]) == 0
    )
    settings = parse_parameters(read_parameters(out))["settings"]
    assert settings["SLG"] == "layers 2, scale 2.8, start 0.2, stop 0.7"
