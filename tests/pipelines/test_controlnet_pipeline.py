"""ControlNet end to end: parity with diffusers' StableDiffusionControlNetPipeline on the tiny SD model
(random weights, zero convolutions included), and the errors of bad control input."""

import numpy as np
import pytest
import torch
from PIL import Image

import latentdiffusion as ld
from latentdiffusion.checkpoints.unet_keys import controlnet_from_diffusers
from latentdiffusion.config import TINY, ControlNetConfig
from latentdiffusion.errors import UserError
from latentdiffusion.models.controlnet import ControlNet
from latentdiffusion.pipelines.pipeline import Pipeline

from .conftest import ddim_scheduler, randomise

SIZE = 32
HINT_CHANNELS = (16, 32)  # TINY's autoencoder downsamples 2x


def hint(seed: int) -> Image.Image:
    array = np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    return Image.fromarray(array)


@pytest.fixture(scope="module")
def controlnets(tiny_model):
    """Two diffusers ControlNets copied from the tiny U-Net's shape, random weights, and ours."""
    from diffusers import ControlNetModel

    pairs = []
    for seed in (11, 12):
        theirs = ControlNetModel.from_unet(
            tiny_model("sd").unet, conditioning_embedding_out_channels=HINT_CHANNELS
        )
        randomise(theirs, seed)
        ours = ControlNet(ControlNetConfig(TINY.unet, hint_channels=HINT_CHANNELS))
        ours.load_state_dict(controlnet_from_diffusers(theirs.state_dict()))
        pairs.append((ours.eval(), theirs.eval()))
    return pairs


def diffusers_controlnet_pipeline(model, controlnet, scheduler: str):
    import diffusers

    pipe = diffusers.StableDiffusionControlNetPipeline(
        vae=model.vae,
        text_encoder=model.text_encoder,
        tokenizer=model.tokenizer,
        unet=model.unet,
        controlnet=controlnet,
        scheduler=ddim_scheduler(model.ours.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    cls = getattr(diffusers, scheduler)
    pipe.scheduler = cls.from_config(pipe.scheduler.config, timestep_spacing="leading")
    pipe.set_progress_bar_config(disable=True)
    return pipe


CASES = {
    "strength": dict(units=[dict(strength=0.6)]),
    "window": dict(units=[dict(strength=1.3, start=0.2, end=0.7)]),
    "guess": dict(units=[dict(strength=0.8, guess_mode=True)]),
    "two": dict(units=[dict(strength=0.7, start=0.0, end=0.6), dict(strength=0.5, start=0.3, end=1.0)]),
}
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
}


@pytest.mark.parametrize(
    ("case", "sampler"), [(c, "ddim") for c in CASES] + [("window", "euler"), ("two", "dpmpp_2m")]
)
def test_controlnet_generation_matches_diffusers(tiny_model, controlnets, case, sampler):
    model = tiny_model("sd")
    units = CASES[case]["units"]
    guess = any(u.get("guess_mode", False) for u in units)
    nets = [controlnets[i] for i in range(len(units))]
    images = [hint(20 + i) for i in range(len(units))]
    theirs_net = nets[0][1] if len(units) == 1 else [n[1] for n in nets]
    pipe = diffusers_controlnet_pipeline(model, theirs_net, SCHEDULERS[sampler])
    latents = torch.randn(2, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(3))
    pick = (lambda values: values[0]) if len(units) == 1 else (lambda values: values)
    expected = pipe(
        ["a red circle", "a blue square"],
        image=pick(images),
        negative_prompt=["blurry", ""],
        height=SIZE,
        width=SIZE,
        num_inference_steps=6,
        guidance_scale=5.0,
        latents=latents.clone(),
        controlnet_conditioning_scale=pick([u.get("strength", 1.0) for u in units]),
        control_guidance_start=pick([u.get("start", 0.0) for u in units]),
        control_guidance_end=pick([u.get("end", 1.0) for u in units]),
        guess_mode=guess,
        output_type="np",
    ).images
    controls = [
        ld.Control(net[0], image, **unit) for net, image, unit in zip(nets, images, units, strict=True)
    ]
    ours = Pipeline(model.ours).generate(
        ["a red circle", "a blue square"],
        negative_prompt=["blurry", ""],
        width=SIZE,
        height=SIZE,
        steps=6,
        guidance_scale=5.0,
        sampler=sampler,
        latents=latents,
        control=controls,
    )
    actual = np.stack([np.asarray(image, dtype=np.float64) / 255 for image in ours])
    assert np.abs(actual - expected).max() <= 1 / 255 + 1e-6
    plain = Pipeline(model.ours).generate(
        "a red circle",
        width=SIZE,
        height=SIZE,
        steps=6,
        guidance_scale=5.0,
        sampler=sampler,
        latents=latents[:1],
    )[0]
    assert np.abs(np.asarray(plain, dtype=np.float64) / 255 - actual[0]).max() > 2 / 255  # the control acts


def test_controlnet_for_another_family_is_one_clear_error(tiny_model):
    from dataclasses import replace

    other = ControlNet(ControlNetConfig(replace(TINY.unet, context_dim=64), hint_channels=HINT_CHANNELS))
    with pytest.raises(UserError, match="another base model"):
        Pipeline(tiny_model("sd").ours).generate(
            "a cat", width=SIZE, height=SIZE, steps=2, control=[ld.Control(other, hint(1))]
        )


@pytest.mark.parametrize(
    ("control", "message"),
    [
        ("not a unit", "ld.Control"),
        ([object()], "ld.Control"),
    ],
)
def test_control_must_be_units(tiny_model, control, message):
    with pytest.raises(UserError, match=message):
        Pipeline(tiny_model("sd").ours).generate("a cat", width=SIZE, height=SIZE, steps=2, control=control)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(start=0.5, end=0.5), "start < end"),
        (dict(strength=float("nan")), "strength"),
        (dict(end=2), "end"),
    ],
)
def test_bad_unit_settings(tiny_model, controlnets, options, message):
    unit = ld.Control(controlnets[0][0], hint(1), **options)
    with pytest.raises(UserError, match=message):
        Pipeline(tiny_model("sd").ours).generate("a cat", width=SIZE, height=SIZE, steps=2, control=[unit])


def test_deep_cache_with_control_is_refused(tiny_model, controlnets):
    unit = ld.Control(controlnets[0][0], hint(1))
    with pytest.raises(UserError, match="DeepCache"):
        Pipeline(tiny_model("sd").ours).generate(
            "a cat", width=SIZE, height=SIZE, steps=2, cache_interval=2, control=[unit]
        )


def test_img2img_and_inpaint_take_control(tiny_model, controlnets):
    """The request path carries control into img2img and inpainting (parity there is still to come)."""
    pipe = Pipeline(tiny_model("sd").ours)
    unit = ld.Control(controlnets[0][0], hint(1), strength=2.0)
    image, mask = hint(5), Image.new("L", (SIZE, SIZE), 255)
    for run in (
        lambda **kw: pipe.img2img(image, "a cat", strength=0.8, steps=4, **kw),
        lambda **kw: pipe.inpaint(image, mask, "a cat", steps=4, **kw),
    ):
        plain, controlled = run()[0], run(control=[unit])[0]
        assert np.abs(np.asarray(plain, dtype=float) - np.asarray(controlled, dtype=float)).max() > 2


def shapes_image() -> Image.Image:
    from PIL import ImageDraw

    image = Image.new("RGB", (48, 40), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((4, 4, 24, 30), fill="red")
    draw.rectangle((26, 10, 44, 36), fill="blue")
    return image


@pytest.mark.parametrize("thresholds", [(100, 200), (20, 60)])
def test_canny_equals_opencv(thresholds):
    import cv2

    from latentdiffusion.pipelines.control import hint_image

    low, high = thresholds
    image = shapes_image()
    unit = ld.Control(None, image, preprocessor="canny", low_threshold=low, high_threshold=high)
    edges = np.asarray(hint_image(unit))
    expected = cv2.Canny(np.asarray(image), low, high)
    assert edges.shape == (40, 48, 3)
    assert all(np.array_equal(edges[:, :, c], expected) for c in range(3))
    assert expected.any()


def test_canny_hint_generates(tiny_model, controlnets):
    unit = ld.Control(controlnets[0][0], shapes_image(), preprocessor="canny")
    image = Pipeline(tiny_model("sd").ours).generate(
        "a cat", width=SIZE, height=SIZE, steps=2, control=[unit]
    )[0]
    assert image.size == (SIZE, SIZE)


def test_canny_without_opencv_says_what_to_install(monkeypatch):
    import sys

    from latentdiffusion.pipelines.control import hint_image

    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(UserError, match=r"latentdiffusion\[control\]"):
        hint_image(ld.Control(None, shapes_image(), preprocessor="canny"))


def test_unknown_preprocessor_lists_the_known_ones(tiny_model, controlnets):
    unit = ld.Control(controlnets[0][0], hint(1), preprocessor="depth")
    with pytest.raises(UserError, match=r"known: none, canny.*must be supplied"):
        Pipeline(tiny_model("sd").ours).generate("a cat", width=SIZE, height=SIZE, steps=2, control=[unit])


def test_unreadable_hint_image(tiny_model, controlnets, tmp_path):
    (tmp_path / "hint.png").write_bytes(b"not an image")
    for source in (tmp_path / "hint.png", tmp_path / "missing.png"):
        unit = ld.Control(controlnets[0][0], source)
        with pytest.raises(UserError):
            Pipeline(tiny_model("sd").ours).generate(
                "a cat", width=SIZE, height=SIZE, steps=2, control=[unit]
            )


@pytest.mark.parametrize(
    "unit", [dict(strength=0.8, start=0.1, end=0.7), dict(strength=0.6, guess_mode=True)]
)
def test_controlnet_img2img_matches_diffusers(tiny_model, controlnets, unit):
    import diffusers

    model = tiny_model("sd")
    theirs = diffusers.StableDiffusionControlNetImg2ImgPipeline(
        vae=model.vae,
        text_encoder=model.text_encoder,
        tokenizer=model.tokenizer,
        unet=model.unet,
        controlnet=controlnets[0][1],
        scheduler=ddim_scheduler(model.ours.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    theirs.set_progress_bar_config(disable=True)
    picture, control_image = hint(30), hint(31)
    expected = theirs(
        ["a cat", "a dog"],
        image=picture,
        control_image=control_image,
        strength=0.6,
        num_inference_steps=8,
        guidance_scale=5.0,
        negative_prompt=["blurry", "dark"],
        generator=[torch.Generator().manual_seed(s) for s in (7, 8)],
        controlnet_conditioning_scale=unit["strength"],
        control_guidance_start=unit.get("start", 0.0),
        control_guidance_end=unit.get("end", 1.0),
        guess_mode=unit.get("guess_mode", False),
        output_type="np",
    ).images
    images = Pipeline(model.ours).img2img(
        picture,
        ["a cat", "a dog"],
        ["blurry", "dark"],
        strength=0.6,
        steps=8,
        guidance_scale=5.0,
        sampler="ddim",
        seed=7,
        control=[ld.Control(controlnets[0][0], control_image, **unit)],
    )
    actual = np.stack([np.asarray(image, dtype=np.float64) / 255 for image in images])
    assert np.abs(actual - expected).max() <= 1 / 255 + 1e-6


@pytest.mark.parametrize(("kind", "strength"), [("sd", 1.0), ("inpaint", 1.0), ("inpaint", 0.7)])
def test_controlnet_inpaint_matches_diffusers(tiny_model, controlnets, kind, strength):
    import diffusers

    model = tiny_model(kind)
    theirs = diffusers.StableDiffusionControlNetInpaintPipeline(
        vae=model.vae,
        text_encoder=model.text_encoder,
        tokenizer=model.tokenizer,
        unet=model.unet,
        controlnet=controlnets[0][1],
        scheduler=ddim_scheduler(model.ours.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    theirs.set_progress_bar_config(disable=True)
    picture, control_image = hint(40), hint(41)
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (8, 8, 24, 32))  # on the 8-pixel grid, where latent cells are whole
    unit = dict(strength=0.9, start=0.0, end=0.8)
    expected = theirs(
        ["a cat"],
        image=picture,
        mask_image=mask,
        control_image=control_image,
        strength=strength,
        num_inference_steps=5,
        guidance_scale=5.0,
        negative_prompt=["blurry"],
        height=SIZE,
        width=SIZE,
        generator=[torch.Generator().manual_seed(3)],
        controlnet_conditioning_scale=unit["strength"],
        control_guidance_end=unit["end"],
        output_type="np",
    ).images
    images = Pipeline(model.ours).inpaint(
        picture,
        mask,
        "a cat",
        "blurry",
        strength=strength,
        steps=5,
        guidance_scale=5.0,
        sampler="ddim",
        seed=3,
        mask_blur=0,
        paste_back=False,
        control=[ld.Control(controlnets[0][0], control_image, **unit)],
    )
    actual = np.stack([np.asarray(image, dtype=np.float64) / 255 for image in images])
    assert np.abs(actual - expected).max() <= 1 / 255 + 1e-6


def test_only_masked_inpainting_with_control_is_refused(tiny_model, controlnets):
    unit = ld.Control(controlnets[0][0], hint(1))
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (8, 8, 16, 16))
    with pytest.raises(UserError, match="only_masked"):
        Pipeline(tiny_model("sd").ours).inpaint(
            hint(2), mask, "a cat", steps=2, only_masked=True, control=[unit]
        )


def test_png_info_records_each_unit(tiny_model, controlnets):
    from latentdiffusion.pipelines.metadata import parse_parameters

    units = [
        ld.Control(controlnets[0][0], shapes_image(), strength=0.5, preprocessor="canny", end=0.8),
        ld.Control(controlnets[1][0], hint(1), guess_mode=True),
    ]
    image = Pipeline(tiny_model("sd").ours).generate(
        "a cat", width=SIZE, height=SIZE, steps=2, control=units
    )[0]
    settings = parse_parameters(image.info["parameters"])["settings"]
    assert settings["ControlNet 0"] == (
        "Module: canny, Model: ControlNet, Weight: 0.5, Resize Mode: Crop and Resize, Threshold A: 100, "
        "Threshold B: 200, Guidance Start: 0, Guidance End: 0.8, Pixel Perfect: False, Control Mode: Balanced"
    )
    assert settings["ControlNet 1"].endswith(
        "Guidance End: 1, Pixel Perfect: False, Control Mode: Balanced, Guess Mode: True"
    )
