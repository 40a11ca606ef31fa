"""ControlNet resize modes, pixel perfect and control modes (AUTOMATIC1111's ControlNet extension).

The control modes are checked against diffusers: a ControlNet's residual k is its zero convolution k
applied to a feature map, so scaling that convolution's weight and bias by c scales the residual by c.
"My prompt is more important" (residual k times ``0.825 ** (12 - k)``) must equal diffusers' plain
pipeline on a copy whose zero convolutions carry those factors, and "ControlNet is more important" (the
same factors, conditional half only) diffusers' guess mode (factors ``logspace(-1, 0, K + 1)[k]``) on a
copy whose zero convolutions carry the ratio of the two.
"""

import copy

import numpy as np
import pytest
import torch
from PIL import Image

import latentdiffusion as ld
from latentdiffusion.errors import UserError
from latentdiffusion.pipelines.control import CONTROL_MODES, hint_array, hint_tensor
from latentdiffusion.pipelines.pipeline import Pipeline
from latentdiffusion.pipelines.preprocessors import fit_hint

# the tiny model's ControlNets (ours and diffusers', same random weights) and helpers
from .test_controlnet_pipeline import SIZE, controlnets, diffusers_controlnet_pipeline, hint  # noqa: F401

cv2 = pytest.importorskip("cv2")


def stripes(width: int = 40, height: int = 20) -> np.ndarray:
    """Three vertical colour bands (red, green, blue) over a 40 x 20 map, and a grey bottom row."""
    array = np.zeros((height, width, 3), np.uint8)
    bands = np.array([(255, 0, 0), (0, 255, 0), (0, 0, 255)], np.uint8)
    array[:] = bands[np.minimum(np.arange(width) * 3 // width, 2)][None]
    array[-1] = 128
    return array


def nearest(array: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.asarray(Image.fromarray(array).resize((width, height), Image.Resampling.NEAREST))


def test_just_resize_stretches():
    assert np.array_equal(fit_hint(stripes(), 32, 32, "Just Resize"), nearest(stripes(), 32, 32))


def test_crop_and_resize_covers_and_crops_the_centre():
    """40 x 20 to 32 x 32: scaled by max(32/40, 32/20) = 1.6 to 64 x 32, columns 16..47 kept."""
    fitted = fit_hint(stripes(), 32, 32, "Crop and Resize")
    assert fitted.shape == (32, 32, 3)
    assert np.array_equal(fitted, nearest(stripes(), 64, 32)[:, 16:48])


def test_resize_and_fill_fits_inside_on_the_border_colour():
    """40 x 20 to 32 x 32: scaled by min(0.8, 1.6) to 32 x 16, rows 8..23; the rest is the per-channel
    median of the border pixels."""
    fitted = fit_hint(stripes(), 32, 32, "Resize and Fill")
    assert np.array_equal(fitted[8:24], nearest(stripes(), 32, 16))
    border = np.concatenate([stripes()[0], stripes()[-1], stripes()[:, 0], stripes()[:, -1]])
    colour = np.median(border, axis=0).astype(np.uint8)
    assert (fitted[:8] == colour).all() and (fitted[24:] == colour).all()


def test_many_colour_hints_use_lanczos():
    picture = np.random.default_rng(0).integers(0, 256, (20, 40, 3), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(picture).resize((32, 32), Image.Resampling.LANCZOS))
    assert np.array_equal(fit_hint(picture, 32, 32, "Just Resize"), expected)


def test_inpaint_hint_tensor_sets_masked_pixels_to_minus_one():
    image = np.full((16, 16, 3), 51, np.uint8)
    mask = np.zeros((16, 16), np.uint8)
    mask[4:8, 4:12] = 255
    tensor = hint_tensor(np.concatenate([image, mask[:, :, None]], axis=2), 16, 16, "Crop and Resize")
    expected = torch.full((1, 3, 16, 16), 0.2)
    expected[:, :, 4:8, 4:12] = -1
    assert torch.allclose(tensor, expected)


def test_pixel_perfect_runs_the_preprocessor_at_the_output_scale():
    """A 48 x 40 picture for a 96 x 80 output: canny runs on the picture enlarged to 96 x 80 (bicubic)."""
    picture = Image.new("RGB", (48, 40), "white")
    picture.paste((200, 30, 30), (6, 6, 30, 30))
    unit = ld.Control(None, picture, preprocessor="canny", pixel_perfect=True)
    edges = hint_array(unit, 96, 80)
    enlarged = cv2.resize(np.asarray(picture), (96, 80), interpolation=cv2.INTER_CUBIC)
    assert np.array_equal(edges[:, :, 0], cv2.Canny(enlarged, 100, 200))
    assert hint_array(ld.Control(None, picture, preprocessor="canny"), 96, 80).shape == (40, 48, 3)


@pytest.mark.parametrize(
    ("given", "expected"),
    [(0, "Balanced"), ("1", CONTROL_MODES[1]), ("controlnet", CONTROL_MODES[2]), ("balanced", "Balanced")],
)
def test_control_mode_names(given, expected):
    assert ld.Control(None, hint(1), control_mode=given).modes[1] == expected


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(control_mode="loud"), "unknown control mode 'loud'; use one of 'Balanced' \\(0\\)"),
        (dict(resize_mode=3), "unknown resize mode 3"),
        (dict(guess_mode=True, control_mode=2), "give one of them"),
        (dict(pixel_perfect="yes"), "pixel_perfect"),
    ],
)
def test_bad_modes(options, message):
    with pytest.raises(UserError, match=message):
        ld.Control(None, hint(1), **options).validate()


def scaled_zero_convs(controlnet, factors: list[float]):
    """A copy of diffusers' ControlNet whose residual k comes out ``factors[k]`` times larger."""
    scaled = copy.deepcopy(controlnet)
    convs = [*scaled.controlnet_down_blocks, scaled.controlnet_mid_block]
    assert len(convs) == len(factors)
    with torch.no_grad():
        for conv, factor in zip(convs, factors, strict=True):
            conv.weight.mul_(factor)
            conv.bias.mul_(factor)
    return scaled


def soft_weights(count: int) -> list[float]:
    return [0.825 ** float(12 - k) for k in range(count)]


@pytest.mark.parametrize("mode", [1, 2])
def test_control_modes_match_diffusers_with_rescaled_zero_convolutions(tiny_model, controlnets, mode):  # noqa: F811
    model = tiny_model("sd")
    ours, theirs = controlnets[0]
    count = len(theirs.controlnet_down_blocks) + 1
    if mode == 1:  # prompt more important: soft weights on both halves = diffusers' plain pipeline
        factors, guess = soft_weights(count), False
    else:  # ControlNet more important: soft weights, conditional half only = diffusers' guess mode
        logspace = torch.logspace(-1, 0, count).tolist()
        factors, guess = [s / g for s, g in zip(soft_weights(count), logspace, strict=True)], True
    pipe = diffusers_controlnet_pipeline(model, scaled_zero_convs(theirs, factors), "DDIMScheduler")
    latents = torch.randn(1, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(5))
    expected = pipe(
        "a red circle",
        image=hint(7),
        negative_prompt="blurry",
        height=SIZE,
        width=SIZE,
        num_inference_steps=5,
        guidance_scale=6.0,
        latents=latents.clone(),
        controlnet_conditioning_scale=1.4,
        guess_mode=guess,
        output_type="np",
    ).images
    unit = ld.Control(ours, hint(7), strength=1.4, control_mode=CONTROL_MODES[mode])
    run = Pipeline(model.ours).generate
    options = dict(width=SIZE, height=SIZE, steps=5, guidance_scale=6.0, sampler="ddim", latents=latents)
    image = run("a red circle", "blurry", control=[unit], **options)[0]
    actual = np.asarray(image, dtype=np.float64)[None] / 255
    assert np.abs(actual - expected).max() <= 1 / 255 + 1e-6
    balanced = run("a red circle", "blurry", control=[ld.Control(ours, hint(7), strength=1.4)], **options)[0]
    assert np.abs(np.asarray(balanced, dtype=np.float64) / 255 - actual[0]).max() > 2 / 255


def test_png_info_records_modes(tiny_model, controlnets):  # noqa: F811
    from latentdiffusion.pipelines.metadata import parse_parameters

    unit = ld.Control(
        controlnets[0][0],
        hint(2),
        preprocessor="blur_gaussian",
        threshold_a=3,
        resize_mode="Resize and Fill",
        control_mode=1,
        pixel_perfect=True,
    )
    image = Pipeline(tiny_model("sd").ours).generate("a", width=SIZE, height=SIZE, steps=1, control=[unit])[0]
    assert parse_parameters(image.info["parameters"])["settings"]["ControlNet 0"] == (
        "Module: blur_gaussian, Model: ControlNet, Weight: 1, Resize Mode: Resize and Fill, Threshold A: 3, "
        "Guidance Start: 0, Guidance End: 1, Pixel Perfect: True, Control Mode: My prompt is more important"
    )
