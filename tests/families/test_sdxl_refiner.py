"""The SDXL refiner against diffusers on tiny random models: img2img (StableDiffusionXLImg2ImgPipeline with
aesthetic scores) and the base-to-refiner hand-off (denoising_end / denoising_start on one latent)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from sdxl_fixtures import EIGHT_BIT, SCHEDULERS, SIZE, as_float

from latentdiffusion.errors import UserError
from latentdiffusion.families import MicroConditioning
from latentdiffusion.pipelines.metadata import parse_parameters

pytest.importorskip("diffusers")


def use_scheduler(pipe, sampler: str) -> None:
    import diffusers

    scheduler = getattr(diffusers, SCHEDULERS[sampler])
    pipe.scheduler = scheduler.from_config(pipe.scheduler.config, timestep_spacing="leading")


@pytest.fixture(scope="module")
def tiny_sd():
    from latentdiffusion.components import build_components
    from latentdiffusion.config import TINY
    from latentdiffusion.pipelines.pipeline import Pipeline

    return Pipeline(build_components(TINY))


@pytest.fixture(scope="module")
def picture() -> Image.Image:
    rng = np.random.default_rng(0)
    smooth = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(smooth).resize((SIZE, SIZE), Image.Resampling.BILINEAR)


@pytest.mark.parametrize("sampler", list(SCHEDULERS))
def test_refiner_img2img_matches_diffusers(sdxl, diffusers_sdxl, picture, sampler):
    ours, _ = sdxl("refiner")
    theirs = diffusers_sdxl("refiner", "StableDiffusionXLImg2ImgPipeline")
    use_scheduler(theirs, sampler)
    micro = {
        "original_size": (512, 384),
        "crops_coords_top_left": (16, 8),
        "negative_crops_coords_top_left": (0, 8),  # diffusers' refiner defaults it to (0, 0), not the crop
        "aesthetic_score": 7.5,
        "negative_aesthetic_score": 1.5,
    }
    prompts, negative = ["a red circle", "a blue square"], ["blurry", "dark"]
    expected = theirs(
        prompts,
        image=picture,
        strength=0.6,
        num_inference_steps=5,
        guidance_scale=5.0,
        negative_prompt=negative,
        generator=[torch.Generator().manual_seed(s) for s in (7, 8)],
        output_type="np",
        **micro,
    ).images
    images = ours.img2img(
        picture,
        prompts,
        negative,
        strength=0.6,
        steps=5,
        guidance_scale=5.0,
        sampler=sampler,
        seed=7,
        conditioning=MicroConditioning(**micro),
    )
    assert np.abs(as_float(images) - expected).max() <= EIGHT_BIT


@pytest.mark.parametrize("sampler", list(SCHEDULERS))
def test_base_to_refiner_hand_off_matches_diffusers(sdxl, diffusers_sdxl, sampler):
    """diffusers: the base with denoising_end and output_type="latent", then the refiner's img2img with
    denoising_start on that latent; ours: generate(refiner=..., refiner_switch=...)."""
    base, _ = sdxl("base")
    refiner, _ = sdxl("refiner")
    their_base = diffusers_sdxl("base", "StableDiffusionXLPipeline")
    their_refiner = diffusers_sdxl("refiner", "StableDiffusionXLImg2ImgPipeline")
    use_scheduler(their_base, sampler)
    use_scheduler(their_refiner, sampler)
    start = torch.randn(2, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(4))
    prompts, negative = ["a red circle", "a blue square"], ["blurry", "dark"]
    common = {"num_inference_steps": 10, "guidance_scale": 5.0, "negative_prompt": negative}
    micro = {"original_size": (512, 512), "target_size": (SIZE, SIZE)}
    latents = their_base(
        prompts,
        height=SIZE,
        width=SIZE,
        latents=start.clone(),
        denoising_end=0.7,
        output_type="latent",
        **common,
        **micro,
    ).images
    expected = their_refiner(
        prompts,
        image=latents,
        denoising_start=0.7,
        aesthetic_score=7.0,
        output_type="np",
        **common,
        **micro,
    ).images
    seen = []
    images = base.generate(
        prompts,
        negative,
        width=SIZE,
        height=SIZE,
        steps=10,
        guidance_scale=5.0,
        sampler=sampler,
        latents=start,
        conditioning=MicroConditioning(**micro, aesthetic_score=7.0),
        refiner=refiner,
        refiner_switch=0.7,
        callback=lambda step, steps, x, x0: seen.append((step, steps)),
    )
    assert np.abs(as_float(images) - expected).max() <= EIGHT_BIT
    assert seen == [(i, 10) for i in range(1, 11)]  # 7 steps of the base, 3 of the refiner
    settings = parse_parameters(images[0].info["parameters"])["settings"]
    assert (settings["Refiner"], settings["Refiner switch at"]) == (refiner.components.name, "0.7")


def test_refiner_switch_splits_the_schedule_where_diffusers_does(sdxl):
    """Leading spacing with steps offset 1: 10 steps are t = 901, 801, ..., 1; a switch at 0.8 cuts at
    t = 200 (base: 901..201, 8 steps), at 0.75 at t = 250 (7 steps), at 0.25 at 750 (2 steps)."""
    from latentdiffusion.pipelines.sampling import SamplingOptions, full_sigmas, switch_step

    base, _ = sdxl("base")
    options = SamplingOptions(steps=10, sampler="euler")
    sigmas = full_sigmas(base.components, options)
    assert [switch_step(base.components, options, sigmas, s) for s in (0.8, 0.75, 0.25, 0.01)] == [8, 7, 2, 0]


def test_refiner_as_a_text_to_image_model_is_refused(sdxl):
    refiner, _ = sdxl("refiner")
    with pytest.raises(UserError, match="the SDXL refiner refines images: use img2img or --refiner"):
        refiner.generate("a cat", width=SIZE, height=SIZE, steps=2)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"refiner_switch": 1.5}, "refiner_switch must be a number in \\(0, 1\\)"),
        ({"refiner_switch": 0}, "refiner_switch must be"),
    ],
)
def test_bad_refiner_settings_are_refused(sdxl, settings, message):
    base, _ = sdxl("base")
    refiner, _ = sdxl("refiner")
    with pytest.raises(UserError, match=message):
        base.generate("x", width=SIZE, height=SIZE, steps=2, refiner=refiner, **settings)


def test_a_refiner_in_other_latents_is_refused(sdxl, tiny_sd):
    base, _ = sdxl("base")
    with pytest.raises(UserError, match="works in other latents"):
        base.generate("x", width=SIZE, height=SIZE, steps=2, refiner=tiny_sd)


def test_cli_generate_with_a_refiner(sdxl, tmp_path, capsys):
    from latentdiffusion.cli.main import main
    from latentdiffusion.pipelines.metadata import read_parameters

    _, base_folder = sdxl("base")
    _, refiner_folder = sdxl("refiner")
    out = tmp_path / "refined.png"
    common = ["--steps", "4", "--seed", "2", "--precision", "fp32", "--quiet"]
    refine = ["--refiner", str(refiner_folder), "--refiner-switch", "0.5"]
    size = ["--size", str(SIZE)]
    code = main(["generate", "a cat", "--model", str(base_folder), *refine, *size, *common, "-o", str(out)])
    assert code == 0
    settings = parse_parameters(read_parameters(out))["settings"]
    assert settings["Refiner switch at"] == "0.5" and settings["Refiner"]
    refined = tmp_path / "img2img.png"
    assert (
        main(["img2img", str(out), "a cat", "--model", str(refiner_folder), *common, "-o", str(refined)]) == 0
    )
    assert Image.open(refined).size == (SIZE, SIZE)
    capsys.readouterr()
    assert main(["generate", "a cat", "--model", str(refiner_folder), *size, *common, "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "the SDXL refiner refines images: use img2img or --refiner" in err and len(err.splitlines()) == 1
