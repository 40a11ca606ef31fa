"""Text-to-image end to end: parity with diffusers' StableDiffusionPipeline, seeds, callbacks, errors."""

import numpy as np
import pytest
import torch

from latentdiffusion.components import build_components
from latentdiffusion.config import TINY
from latentdiffusion.errors import UserError
from latentdiffusion.pipelines.pipeline import Pipeline

SIZE = 32


@pytest.fixture(scope="module")
def pipelines(tiny_model, diffusers_pipeline):
    """Our tiny pipeline and diffusers' StableDiffusionPipeline holding the same random weights."""
    return Pipeline(tiny_model("sd").ours), diffusers_pipeline("StableDiffusionPipeline", "sd")


SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "heun": "HeunDiscreteScheduler",
}


@pytest.mark.parametrize("sampler", list(SCHEDULERS))
def test_guided_generation_matches_diffusers(pipelines, sampler):
    import diffusers

    ours, theirs = pipelines
    scheduler = getattr(diffusers, SCHEDULERS[sampler])
    # Spacing stated explicitly: from_config does not carry it over between every pair of schedulers.
    theirs.scheduler = scheduler.from_config(theirs.scheduler.config, timestep_spacing="leading")
    latents = torch.randn(2, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(3))
    prompts, negative = ["a red circle", "a blue square, high quality"], ["blurry", ""]
    expected = theirs(
        prompts,
        negative_prompt=negative,
        height=SIZE,
        width=SIZE,
        num_inference_steps=6,
        guidance_scale=5.0,
        latents=latents.clone(),
        output_type="np",
    ).images
    images = ours.generate(
        prompts,
        negative_prompt=negative,
        width=SIZE,
        height=SIZE,
        steps=6,
        guidance_scale=5.0,
        sampler=sampler,
        latents=latents,
    )
    actual = np.stack([np.asarray(image, dtype=np.float64) / 255 for image in images])
    assert np.abs(actual - expected).max() <= 1 / 255 + 1e-6  # one 8-bit rounding step at most


def test_guidance_rescale_matches_diffusers(pipelines):
    from diffusers import EulerDiscreteScheduler

    ours, theirs = pipelines
    theirs.scheduler = EulerDiscreteScheduler.from_config(theirs.scheduler.config, timestep_spacing="leading")
    latents = torch.randn(1, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(4))
    expected = theirs(
        "a cat",
        height=SIZE,
        width=SIZE,
        num_inference_steps=4,
        guidance_scale=6.0,
        guidance_rescale=0.7,
        latents=latents.clone(),
        output_type="np",
    ).images[0]
    image = ours.generate(
        "a cat",
        width=SIZE,
        height=SIZE,
        steps=4,
        guidance_scale=6.0,
        sampler="euler",
        guidance_rescale=0.7,
        latents=latents,
    )[0]
    assert np.abs(np.asarray(image, dtype=np.float64) / 255 - expected).max() <= 1 / 255 + 1e-6


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler_ancestral"])
def test_an_image_does_not_depend_on_its_batch(pipelines, sampler):
    ours, _ = pipelines
    settings = {"width": SIZE, "height": SIZE, "steps": 3, "sampler": sampler}
    batch = ours.generate("a green triangle", seed=10, num_images=3, **settings)
    alone = ours.generate("a green triangle", seed=11, num_images=1, **settings)
    difference = np.abs(np.asarray(batch[1], dtype=int) - np.asarray(alone[0], dtype=int)).max()
    assert difference <= 1
    assert not np.array_equal(np.asarray(batch[0]), np.asarray(batch[1])), "each image has its own seed"


def test_callback_sees_every_step_and_parameters_are_recorded(pipelines):
    ours, _ = pipelines
    seen = []
    image = ours.generate(
        "x",
        width=SIZE,
        height=SIZE,
        steps=5,
        sampler="heun",
        seed=7,
        sigmas="karras",
        callback=lambda step, steps, x, x0: seen.append((step, steps, tuple(x0.shape))),
    )[0]
    assert [s[0] for s in seen] == [1, 2, 3, 4, 5]
    assert {s[1] for s in seen} == {5}
    assert "Steps: 5, Sampler: Heun Karras, CFG scale: 7.5, Seed: 7, Size: 32x32" in image.info["parameters"]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"width": 36}, "multiple of 8"),
        ({"steps": 0}, "steps must be"),
        ({"guidance_scale": float("inf")}, "finite"),
        ({"sampler": "magic"}, "known: ddim"),
        ({"latents": torch.zeros(1, 4, 3, 3)}, "latents must have shape"),
        ({"num_images": 0}, "num_images"),
    ],
)
def test_bad_settings_raise_user_errors(pipelines, settings, message):
    ours, _ = pipelines
    arguments = {"width": SIZE, "height": SIZE, "steps": 2, **settings}
    with pytest.raises(UserError, match=message):
        ours.generate("x", **arguments)


def test_memory_estimate_refuses_impossible_requests(pipelines, monkeypatch):
    from latentdiffusion.pipelines import text_to_image

    ours, _ = pipelines
    monkeypatch.setattr(text_to_image, "available_memory", lambda: 10_000_000)
    with pytest.raises(UserError, match="GiB of memory"):
        ours.generate("x", width=2048, height=2048, steps=1)


def test_generate_refuses_models_that_need_an_input_image():
    from dataclasses import replace

    config = replace(TINY, unet=replace(TINY.unet, in_channels=9))
    with pytest.raises(UserError, match="inpainting or upscaling model"):
        Pipeline(build_components(config)).generate("x", width=SIZE, height=SIZE, steps=1)


def test_long_prompt_with_short_negative(pipelines):
    ours, _ = pipelines
    long_prompt = ", ".join(["a red circle on a blue background"] * 12)  # > 75 tokens: two chunks
    image = ours.generate(long_prompt, negative_prompt="blurry", width=SIZE, height=SIZE, steps=1)[0]
    assert image.size == (SIZE, SIZE)


def test_model_default_discretisation_applies_when_none_is_asked():
    from dataclasses import replace

    karras_model = Pipeline(build_components(replace(TINY, default_sigmas="karras")))
    plain_model = Pipeline(build_components(TINY))
    settings = {"width": SIZE, "height": SIZE, "steps": 3, "seed": 1}
    image = karras_model.generate("x", **settings)[0]
    assert "Sampler: DPM++ 2M Karras" in image.info["parameters"]
    by_default = np.asarray(image)
    assert np.array_equal(by_default, np.asarray(plain_model.generate("x", sigmas="karras", **settings)[0]))
    assert not np.array_equal(by_default, np.asarray(plain_model.generate("x", **settings)[0]))


def test_unset_sampling_settings_are_the_models_defaults():
    from dataclasses import replace

    tuned = replace(TINY, default_steps=3, default_sampler="euler", default_guidance_scale=2.5)
    pipe = Pipeline(build_components(tuned))
    settings = {"width": SIZE, "height": SIZE, "seed": 1}
    image = pipe.generate("x", **settings)[0]
    assert "Steps: 3, Sampler: Euler, CFG scale: 2.5" in image.info["parameters"]
    spelled_out = pipe.generate("x", steps=3, sampler="euler", guidance_scale=2.5, **settings)[0]
    assert np.array_equal(np.asarray(image), np.asarray(spelled_out))
    img2img = pipe.img2img(image, "x", strength=0.5, seed=1)[0]
    assert "Steps: 3, Sampler: Euler, CFG scale: 2.5" in img2img.info["parameters"]
    assert "CFG scale: 4" in pipe.generate("x", guidance_scale=4, **settings)[0].info["parameters"]
    interval = Pipeline(build_components(replace(tuned, guidance_min_sigma=5.0)))
    assert "CFG min sigma: 5.0" in interval.generate("x", **settings)[0].info["parameters"]
    assert "CFG min sigma" not in interval.generate("x", guidance_scale=1, **settings)[0].info["parameters"]


@pytest.fixture(scope="module")
def tiny_pipe():
    torch.manual_seed(0)
    return Pipeline(build_components(TINY))


def test_variation_seed_moves_images_towards_the_variation_seeds_image(tiny_pipe):
    base = tiny_pipe.generate("a cat", steps=2, seed=1, guidance_scale=1.0)[0]
    target = tiny_pipe.generate("a cat", steps=2, seed=5, guidance_scale=1.0)[0]
    small = tiny_pipe.generate(
        "a cat", steps=2, seed=1, guidance_scale=1.0, variation_seed=5, variation_strength=0.1
    )
    full = tiny_pipe.generate(
        "a cat", steps=2, seed=1, guidance_scale=1.0, variation_seed=5, variation_strength=1.0
    )
    as_array = lambda image: np.asarray(image, dtype=np.float64)  # noqa: E731
    assert np.abs(as_array(full[0]) - as_array(target)).max() <= 1
    to_base = np.abs(as_array(small[0]) - as_array(base)).mean()
    to_target = np.abs(as_array(small[0]) - as_array(target)).mean()
    assert 0 < to_base < to_target
    assert "Variation seed: 5, Variation seed strength: 0.1" in small[0].info["parameters"]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"variation_seed": 5, "variation_strength": 1.5}, "variation_strength"),
        ({"variation_seed": "x", "variation_strength": 0.5}, "variation_seed"),
    ],
)
def test_bad_variation_settings_are_refused(tiny_pipe, settings, message):
    with pytest.raises(UserError, match=message):
        tiny_pipe.generate("a cat", steps=1, **settings)
