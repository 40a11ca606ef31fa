"""img2img, inpainting (9- and 4-channel) and outpainting: parity with diffusers' pipelines on tiny random
models (same seeds -> same posterior samples and noise), what the mask keeps, sizes, and bad input."""

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiffusion.errors import UserError
from latentdiffusion.pipelines.images import feather, mask_to_tensor
from latentdiffusion.pipelines.metadata import parse_parameters
from latentdiffusion.pipelines.pipeline import Pipeline

SIZE = 32
EIGHT_BIT = 1 / 255 + 1e-6  # our images are 8-bit, diffusers' float: one rounding step at most
FAST = {"steps": 3, "guidance_scale": 5.0, "sampler": "euler"}


def as_float(images) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.float64) / 255 for image in images])


@pytest.fixture(scope="module")
def picture() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def mask() -> Image.Image:
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (8, 8, 24, 32))  # on the 8-pixel grid, where latent cells are whole
    return mask


@pytest.fixture(scope="module")
def sd(tiny_model):
    return Pipeline(tiny_model("sd").ours)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_img2img_matches_diffusers(sd, diffusers_pipeline, picture, sampler):
    theirs = diffusers_pipeline("StableDiffusionImg2ImgPipeline", "sd")
    _use_scheduler(theirs, sampler)
    expected = theirs(
        ["a cat", "a dog"],
        image=picture,
        strength=0.6,
        num_inference_steps=5,
        guidance_scale=5.0,
        negative_prompt=["blurry", "dark"],
        generator=[torch.Generator().manual_seed(s) for s in (7, 8)],
        output_type="np",
    ).images
    images = sd.img2img(
        picture,
        ["a cat", "a dog"],
        ["blurry", "dark"],
        strength=0.6,
        steps=5,
        guidance_scale=5.0,
        sampler=sampler,
        seed=7,
    )
    assert np.abs(as_float(images) - expected).max() <= EIGHT_BIT


def _use_scheduler(pipe, sampler: str) -> None:
    import diffusers

    names = {
        "ddim": "DDIMScheduler",
        "euler": "EulerDiscreteScheduler",
        "dpmpp_2m": "DPMSolverMultistepScheduler",
    }
    scheduler = getattr(diffusers, names[sampler])
    pipe.scheduler = scheduler.from_config(pipe.scheduler.config, timestep_spacing="leading")


@pytest.mark.parametrize(
    ("kind", "sampler", "strength"),
    [("inpaint", "ddim", 1.0), ("inpaint", "dpmpp_2m", 0.7), ("sd", "euler", 1.0), ("sd", "dpmpp_2m", 0.7)],
)
def test_inpainting_matches_diffusers(tiny_model, diffusers_pipeline, picture, mask, kind, sampler, strength):
    """9 channels: mask + masked-image latent concatenated; 4 channels: diffusers' re-noise-and-blend."""
    theirs = diffusers_pipeline("StableDiffusionInpaintPipeline", kind)
    _use_scheduler(theirs, sampler)
    expected = theirs(
        ["a cat"],
        image=picture,
        mask_image=mask,
        strength=strength,
        num_inference_steps=5,
        guidance_scale=5.0,
        negative_prompt=["blurry"],
        height=SIZE,
        width=SIZE,
        generator=[torch.Generator().manual_seed(3)],
        output_type="np",
    ).images
    ours = Pipeline(tiny_model(kind).ours)
    images = ours.inpaint(
        picture,
        mask,
        "a cat",
        "blurry",
        strength=strength,
        steps=5,
        guidance_scale=5.0,
        sampler=sampler,
        seed=3,
        mask_blur=0,
        paste_back=False,
    )
    assert np.abs(as_float(images) - expected).max() <= EIGHT_BIT


def test_four_channel_inpainting_keeps_the_known_latent(sd, picture, mask):
    """The final latent equals the encoded image (the same posterior sample) wherever the mask is 0."""
    from latentdiffusion.diffusion.noise import seeded_generators
    from latentdiffusion.pipelines.image_to_image import encode_latents
    from latentdiffusion.pipelines.images import images_to_tensor, latent_mask
    from latentdiffusion.pipelines.inpaint import inpaint_latents
    from latentdiffusion.pipelines.request import Request
    from latentdiffusion.pipelines.sampling import SamplingOptions

    components = sd.components
    images = images_to_tensor([picture], components.device, torch.float32)
    binary = mask_to_tensor(mask, components.device)
    options = SamplingOptions(steps=3, sampler="dpmpp_2m", guidance_scale=5.0)
    with torch.inference_mode():
        latents = inpaint_latents(
            components, images, binary, Request(["x"], [""], [4], options), strength=1.0
        )
        x0 = encode_latents(components, images, seeded_generators([4]))
    known = latent_mask(binary, 2).expand_as(latents) == 0
    assert torch.equal(latents[known], x0[known])
    assert not torch.allclose(latents[~known], x0[~known], atol=0.1)


@pytest.mark.parametrize("kind", ["sd", "inpaint"])
def test_paste_back_returns_the_exact_pixels_outside_the_feathered_mask(tiny_model, picture, mask, kind):
    pipe = Pipeline(tiny_model(kind).ours)
    result = np.asarray(pipe.inpaint(picture, mask, "x", mask_blur=2, **FAST)[0])
    alpha = feather(mask_to_tensor(mask, torch.device("cpu")), 2)[0, 0].numpy()
    original = np.asarray(picture)
    assert np.array_equal(result[alpha == 0], original[alpha == 0])
    assert (alpha[1, :] == 0).all() and (alpha[8:, 8:24] == 1).all()  # 3 sigma = 6 pixels of feather
    assert not np.array_equal(result[alpha == 1], original[alpha == 1])


def test_inverted_mask_repaints_the_other_part(sd, picture, mask):
    result = np.asarray(sd.inpaint(picture, mask, "x", mask_blur=0, invert_mask=True, **FAST)[0])
    inside = np.asarray(mask) > 0
    assert np.array_equal(result[inside], np.asarray(picture)[inside])


def test_only_masked_works_on_a_crop_and_pastes_it_back(sd):
    rng = np.random.default_rng(1)
    large = Image.fromarray(rng.integers(0, 256, (100, 90, 3), dtype=np.uint8))  # any size
    mask = Image.new("L", large.size, 0)
    mask.paste(255, (40, 50, 50, 60))
    seen = []
    images = sd.inpaint(
        large,
        mask,
        "x",
        only_masked=True,
        padding=4,
        mask_blur=1,
        callback=lambda step, steps, x, x0: seen.append(tuple(x.shape)),
        **FAST,
    )
    assert images[0].size == large.size
    assert seen[0] == (1, 4, 32, 32)  # the 24x24 crop (box, feather, padding) scaled up to 64x64
    result, original = np.asarray(images[0]), np.asarray(large)
    assert np.array_equal(result[:40], original[:40]) and np.array_equal(result[:, :30], original[:, :30])
    assert not np.array_equal(result[50:60, 40:50], original[50:60, 40:50])
    assert "Inpaint area: Only masked" in images[0].info["parameters"]


@pytest.mark.parametrize("content", ["noise", "nothing"])
def test_masked_content_changes_only_partial_strength_starts(sd, picture, mask, content):
    settings = {"mask_blur": 0, "strength": 0.5, **FAST}
    original = np.asarray(sd.inpaint(picture, mask, "x", **settings)[0])
    filled = np.asarray(sd.inpaint(picture, mask, "x", masked_content=content, **settings)[0])
    outside = np.asarray(mask) == 0
    assert np.array_equal(filled[outside], original[outside])
    assert not np.array_equal(filled[~outside], original[~outside])


def test_outpainting_extends_the_canvas_and_keeps_the_image(sd, picture):
    images = sd.outpaint(picture, "x", left=8, bottom=16, mask_blur=1, **FAST)
    result = np.asarray(images[0])
    assert images[0].size == (SIZE + 8, SIZE + 16)
    inner = result[: SIZE - 3, 8 + 3 :]  # away from the feathered seam
    assert np.array_equal(inner, np.asarray(picture)[: SIZE - 3, 3:])
    settings = parse_parameters(images[0].info["parameters"])["settings"]
    assert settings["Outpaint"] == "left=8 right=0 top=0 bottom=16"
    assert settings["Size"] == "40x48"


def test_several_prompts_and_images_each_get_their_seed(sd, picture):
    images = sd.img2img(picture, ["a", "b"], strength=0.5, num_images=2, seed=10, **FAST)
    seeds = [parse_parameters(image.info["parameters"])["settings"]["Seed"] for image in images]
    assert seeds == ["10", "11", "12", "13"]
    assert "Denoising strength: 0.5" in images[0].info["parameters"]
    alone = sd.img2img(picture, "b", strength=0.5, seed=13, **FAST)[0]
    assert np.abs(np.asarray(alone, dtype=int) - np.asarray(images[3], dtype=int)).max() <= 1


def test_sizes_round_down_to_multiples_of_8_with_a_warning(sd):
    odd = Image.new("RGB", (37, 43), (200, 30, 30))
    with pytest.warns(UserWarning, match="cropped to 32x40"):
        image = sd.img2img(odd, "x", strength=0.3, **FAST)[0]
    assert image.size == (32, 40)


def test_non_rgb_images_are_converted(sd, tmp_path):
    path = tmp_path / "grey.png"
    Image.new("LA", (SIZE, SIZE), (128, 50)).save(path)
    image = sd.img2img(path, "x", strength=0.3, **FAST)[0]
    assert image.mode == "RGB" and image.size == (SIZE, SIZE)


def test_a_mask_of_the_same_aspect_is_resized_with_a_warning(sd, picture):
    small = Image.new("L", (16, 16), 0)
    small.paste(255, (4, 4, 12, 16))
    with pytest.warns(UserWarning, match="resized"):
        assert sd.inpaint(picture, small, "x", **FAST)[0].size == (SIZE, SIZE)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda p, img, m: p.img2img(img, "x", strength=1.5), "strength must be in"),
        (lambda p, img, m: p.img2img(img, "x", strength=float("nan")), "strength must be a number"),
        (lambda p, img, m: p.img2img("/no/such/file.png", "x"), "no such file"),
        (lambda p, img, m: p.inpaint(img, Image.new("L", (32, 16)), "x"), "give a mask of the image's size"),
        (lambda p, img, m: p.inpaint(img, Image.new("L", (32, 32)), "x"), "selects no pixels"),
        (lambda p, img, m: p.inpaint(img, m, "x", masked_content="blur"), "unknown masked content"),
        (lambda p, img, m: p.inpaint(img, m, "x", mask_blur=-1), "mask blur"),
        (lambda p, img, m: p.outpaint(img, "x", left=4), "multiple of 8"),
        (lambda p, img, m: p.outpaint(img, "x"), "at least one of"),
        (lambda p, img, m: p.upscale(img, "x"), "not an upscaler"),
        (lambda p, img, m: p.img2img(img, "x", num_images=0), "num_images"),
    ],
)
def test_bad_input_raises_user_errors(sd, picture, mask, call, message):
    with pytest.raises(UserError, match=message):
        call(sd, picture, mask)


def test_unreadable_files_are_user_errors(sd, tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"not a png")
    with pytest.raises(UserError, match="cannot read image"):
        sd.img2img(path, "x")
    with pytest.raises(UserError, match="cannot read mask"):
        sd.inpaint(Image.new("RGB", (SIZE, SIZE)), path, "x")
