"""One request path: every ``Pipeline`` method takes the same common options (``request.CommonOptions``)
and reports progress and settings the same way; ``latents`` is each method's noise."""

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiffusion.diffusion.noise import randn, seeded_generators
from latentdiffusion.errors import UserError
from latentdiffusion.pipelines.metadata import parse_parameters
from latentdiffusion.pipelines.pipeline import Pipeline
from latentdiffusion.pipelines.request import DEFAULTS

SIZE = 32
FAST = {"steps": 4, "guidance_scale": 3.0, "sampler": "euler"}


@pytest.fixture(scope="module")
def sd(tiny_model):
    return Pipeline(tiny_model("sd").ours)


@pytest.fixture(scope="module")
def picture() -> Image.Image:
    rng = np.random.default_rng(2)
    return Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def mask() -> Image.Image:
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (8, 8, 24, 24))
    return mask


def calls(picture, mask):
    """Each method, as a function of the common options."""
    return {
        "generate": lambda pipe, **o: pipe.generate("x", width=SIZE, height=SIZE, **o),
        "img2img": lambda pipe, **o: pipe.img2img(picture, "x", strength=0.5, **o),
        "inpaint": lambda pipe, **o: pipe.inpaint(picture, mask, "x", **o),
        "outpaint": lambda pipe, **o: pipe.outpaint(picture, "x", right=8, **o),
    }


METHODS = ["generate", "img2img", "inpaint", "outpaint"]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_reports_progress_and_settings_alike(sd, picture, mask, method):
    seen = []
    images = calls(picture, mask)[method](
        sd,
        negative_prompt="blurry",
        seed=5,
        num_images=2,
        sigmas="karras",
        round_timesteps=False,
        callback=lambda step, steps, x, x0: seen.append((step, steps)),
        **FAST,
    )
    steps = 2 if method == "img2img" else 4  # img2img runs int(steps * strength)
    assert seen == [(i, steps) for i in range(1, steps + 1)]  # the whole batch steps together
    assert len(images) == 2
    settings = [parse_parameters(image.info["parameters"]) for image in images]
    assert [s["settings"]["Seed"] for s in settings] == ["5", "6"]
    assert settings[0]["negative_prompt"] == "blurry"
    assert settings[0]["settings"]["Sampler"] == "Euler Karras"
    assert settings[0]["settings"]["Timesteps"] == "fractional"


@pytest.mark.parametrize("method", METHODS)
def test_fractional_timesteps_change_images_only_off_the_grid(sd, picture, mask, method):
    call = calls(picture, mask)[method]
    plain = call(sd, sigmas="karras", **FAST)[0]
    fractional = call(sd, sigmas="karras", round_timesteps=False, **FAST)[0]
    assert "Timesteps" not in plain.info["parameters"]  # the default is not recorded
    assert not np.array_equal(np.asarray(plain), np.asarray(fractional))
    on_grid = call(sd, round_timesteps=False, **FAST)[0]  # leading spacing: whole timesteps anyway
    assert np.abs(np.asarray(on_grid, dtype=int) - np.asarray(call(sd, **FAST)[0], dtype=int)).max() <= 1


def test_unknown_options_are_type_errors_as_in_python(sd, picture, mask):
    for method, call in calls(picture, mask).items():
        with pytest.raises(TypeError, match=f"{method}\\(\\) got an unexpected keyword argument 'stesp'"):
            call(sd, stesp=3)


def test_the_common_options_are_documented_with_their_defaults():
    from latentdiffusion.pipelines.request import CommonOptions

    assert set(CommonOptions.__annotations__) == set(DEFAULTS)
    for name in DEFAULTS:
        assert f"``{name}" in CommonOptions.__doc__


def _seeded_img2img_noise(pipe, picture, seed):
    """The noise img2img draws for ``seed``: after the image's posterior sample, from the same generator."""
    from latentdiffusion.pipelines.image_to_image import encode_latents
    from latentdiffusion.pipelines.images import images_to_tensor

    generators = seeded_generators([seed])
    with torch.inference_mode():
        x0 = encode_latents(pipe.components, images_to_tensor([picture], "cpu", torch.float32), generators)
    return randn(x0.shape, generators, "cpu", torch.float32)


def test_img2img_latents_are_the_noise_added_to_the_image(sd, picture):
    noise = _seeded_img2img_noise(sd, picture, 7)
    seeded = sd.img2img(picture, "x", strength=0.6, seed=7, **FAST)[0]
    given = sd.img2img(picture, "x", strength=0.6, seed=7, latents=noise, **FAST)[0]
    assert np.array_equal(np.asarray(seeded), np.asarray(given))
    other = sd.img2img(picture, "x", strength=0.6, seed=7, latents=-noise, **FAST)[0]
    assert not np.array_equal(np.asarray(seeded), np.asarray(other))


def test_four_channel_inpaint_latents_are_the_noise(sd, picture, mask):
    """Strength 1: the starting noise (drawn after the image's posterior sample, as in img2img)."""
    noise = _seeded_img2img_noise(sd, picture, 3)
    settings = {"mask_blur": 0, "seed": 3, **FAST}
    seeded = sd.inpaint(picture, mask, "x", **settings)[0]
    given = sd.inpaint(picture, mask, "x", latents=noise, **settings)[0]
    assert np.array_equal(np.asarray(seeded), np.asarray(given))


def test_generate_latents_are_the_starting_noise(sd):
    noise = torch.randn(1, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(9))
    seeded = sd.generate("x", width=SIZE, height=SIZE, seed=9, **FAST)[0]
    given = sd.generate("x", width=SIZE, height=SIZE, seed=1, latents=noise, **FAST)[0]
    assert np.array_equal(np.asarray(seeded), np.asarray(given))


@pytest.mark.parametrize("method", METHODS)
def test_latents_of_the_wrong_shape_are_refused(sd, picture, mask, method):
    with pytest.raises(UserError, match="latents must have shape"):
        calls(picture, mask)[method](sd, latents=torch.zeros(1, 4, 3, 3), **FAST)


@pytest.mark.parametrize(
    ("options", "message"),
    [({"seed": "1"}, "seed must be a whole number"), ({"num_images": 0}, "num_images")],
)
def test_bad_common_options_are_user_errors(sd, picture, mask, options, message):
    for call in calls(picture, mask).values():
        with pytest.raises(UserError, match=message):
            call(sd, **options)


def test_timestep_spacing_can_be_asked_for_and_is_recorded(sd):
    image = sd.generate("x", width=SIZE, height=SIZE, sigmas="trailing", **FAST)[0]
    settings = parse_parameters(image.info["parameters"])["settings"]
    assert settings["Sampler"] == "Euler" and settings["Timestep spacing"] == "trailing"
    default = sd.generate("x", width=SIZE, height=SIZE, **FAST)[0]
    assert not np.array_equal(np.asarray(image), np.asarray(default))
