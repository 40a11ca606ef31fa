"""Prompt editing, alternation and AND through the pipelines on tiny random models: the network sees each
step's plain prompt, plain prompts keep today's path bit for bit, and every pipeline takes the syntax."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiffusion.components import build_components
from latentdiffusion.config import TINY
from latentdiffusion.diffusion.guidance import ClassifierFreeGuidance, ComposedGuidance
from latentdiffusion.pipelines.hires import Hires, hires_fix
from latentdiffusion.pipelines.pipeline import Pipeline
from latentdiffusion.pipelines.prompt_conditioning import PromptConditioning
from latentdiffusion.pipelines.request import DEFAULTS, make_request
from latentdiffusion.pipelines.sampling import guide, integrate
from latentdiffusion.pipelines.text_to_image import encode_conditioning
from latentdiffusion.prompt_schedule import prompts_per_step, text_at_step
from latentdiffusion.samplers import SAMPLERS

SETTINGS = {"steps": 4, "seed": 3, "width": 32, "height": 32}


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    return Pipeline(build_components(TINY))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(int)


def request_for(pipe, prompt, negative=None, **options):
    return make_request(pipe.components, prompt, negative, {**DEFAULTS, **options}, None)


def test_plain_prompts_take_the_plain_path(pipe):
    request = request_for(pipe, ["a (red:1.2) cat", "a [dog]"], "blurry AND ugly", steps=5)
    cond, uncond = request.conditioning(pipe.components, 32, 32)
    assert isinstance(cond, dict) and isinstance(uncond, dict)
    assert isinstance(guide(lambda *a, **k: None, cond, uncond, request.options), ClassifierFreeGuidance)


def test_the_network_sees_each_steps_plain_prompt(pipe):
    prompt, negative = "a [red:blue:1] [cat|dog]", "[blurry::2]"
    request = request_for(pipe, prompt, negative, steps=4)
    conditioning, _ = request.conditioning(pipe.components, 32, 32)
    assert isinstance(conditioning, PromptConditioning)
    seen = []

    def network(x, sigma, context):
        seen.append(context.clone())
        return torch.zeros_like(x)

    guided = guide(network, conditioning, conditioning, request.options)
    sigmas = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.0])
    integrate(guided, torch.zeros(1, 4, 4, 4), sigmas, request.options, [0])
    texts = prompts_per_step(prompt, 4)
    negatives = prompts_per_step(negative, 4)
    assert texts == ["a red cat", "a red cat", "a blue dog", "a blue cat"]
    assert negatives == ["blurry", "blurry", "blurry", ""]
    for step, context in enumerate(seen):
        cond, uncond = encode_conditioning(pipe.components, [texts[step]], [negatives[step]], 32, 32)
        torch.testing.assert_close(context, torch.cat([uncond["context"], cond["context"]]))


def test_one_part_and_single_texts_equal_the_plain_prompt_bit_for_bit(pipe):
    plain = pixels(pipe.generate("a cat", **SETTINGS)[0])
    assert np.array_equal(plain, pixels(pipe.generate("a cat :1", **SETTINGS)[0]))
    assert np.array_equal(plain, pixels(pipe.generate("[a cat|a cat]", **SETTINGS)[0]))
    edited = pixels(pipe.generate("[a cat:a dog:0.5]", **SETTINGS)[0])
    assert not np.array_equal(edited, plain)
    assert not np.array_equal(edited, pixels(pipe.generate("a dog", **SETTINGS)[0]))


def test_and_weights_change_the_image_and_are_recorded_as_typed(pipe):
    prompt = "a cat :1.2 AND a dog :0.8"
    images = pipe.generate([prompt, "a cat"], negative_prompt="[ugly:blurry:2]", **SETTINGS)
    assert f"{prompt}\nNegative prompt: [ugly:blurry:2]\n" in images[0].info["parameters"]
    single = pipe.generate("a cat", negative_prompt="[ugly:blurry:2]", seed=4, steps=4, width=32, height=32)
    assert np.array_equal(pixels(images[1]), pixels(single[0]))  # image 1 of the batch has seed 4
    assert not np.array_equal(pixels(images[0]), pixels(pipe.generate("a cat", **SETTINGS)[0]))


def test_every_pipeline_takes_the_syntax(pipe):
    image = Image.new("RGB", (32, 32), (200, 40, 40))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    prompt = "[a red:a blue:0.5] square AND a circle :0.5"
    for sampler in SAMPLERS:  # the web UI refuses AND with DDIM and PLMS; every sampler takes it here
        pipe.generate(prompt, sampler=sampler, steps=2, width=32, height=32)
    pipe.img2img(image, prompt, strength=0.6, steps=4, seed=1)
    pipe.inpaint(image, mask, prompt, steps=4, seed=1)
    images, _, _ = hires_fix(pipe.components, prompt, None, 32, 32, Hires(scale=1.5, steps=2), steps=4)
    assert images[0].size == (48, 48)


def test_hires_second_pass_counts_its_own_steps(pipe):
    request = request_for(pipe, "[a:b:1.5]", steps=4)
    second = request.__class__(**{**request.__dict__, "first_pass_steps": 10})
    conditioning, _ = second.conditioning(pipe.components, 32, 32)
    rows = [conditioning(10 + i).cond["context"] for i in range(4)]  # the second pass starts at step 10
    assert torch.equal(rows[0], rows[1]) and torch.equal(rows[1], rows[2])
    assert not torch.equal(rows[2], rows[3])


def _fixture_module(name):
    path = Path(__file__).parents[1] / "families" / f"{name}_fixtures.py"
    spec = importlib.util.spec_from_file_location(f"prompt_editing_{name}_fixtures", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("family", "config"), [("sdxl", "TINY_SDXL"), ("sd3", "TINY_SD3")])
def test_sdxl_and_sd3_take_the_syntax(family, config):
    torch.manual_seed(0)
    model = Pipeline(build_components(getattr(_fixture_module(family), config), seed=1))
    settings = {"steps": 2, "seed": 0, "width": 64, "height": 64}
    plain = pixels(model.generate("a cat", **settings)[0])
    assert np.array_equal(plain, pixels(model.generate("a cat :1", **settings)[0]))
    composed = model.generate("[a cat:a dog:1] AND a hat :0.5", negative_prompt="[x|y]", **settings)[0]
    assert not np.array_equal(plain, pixels(composed))


def test_composed_guidance_is_what_guide_gives_for_scheduled_prompts(pipe):
    request = request_for(pipe, "a AND b", steps=2)
    conditioning, _ = request.conditioning(pipe.components, 32, 32)
    assert isinstance(
        guide(lambda *a, **k: None, conditioning, conditioning, request.options), ComposedGuidance
    )
    step = conditioning(0)
    assert step.owners == (0, 0) and step.weights == (1.0, 1.0) and step.cond["context"].shape[0] == 2


def test_controlnet_guess_mode_leaves_every_unconditional_row_alone_with_and_parts(pipe):
    from latentdiffusion.config import ControlNetConfig
    from latentdiffusion.models.controlnet import ControlNet
    from latentdiffusion.pipelines.control import ControlledUNet, ControlUnit

    from .conftest import randomise

    network = ControlNet(ControlNetConfig(TINY.unet, hint_channels=(16, 32)))
    randomise(network, 3)
    unet = pipe.components.unet
    unit = ControlUnit(network.eval(), torch.rand(1, 3, 32, 32), 1.0, 0.0, 1.0, guess_mode=True)
    controlled = ControlledUNet(unet, [unit], torch.tensor([999.0, 500.0]), batch=1)
    x, t = torch.randn(3, 4, 16, 16), torch.full((3,), 999.0)  # one image: uncond, two AND parts
    context = torch.randn(3, 77, TINY.unet.context_dim)
    with torch.inference_mode():
        out, plain = controlled(x, t, context), unet(x, t, context)
    assert torch.equal(out[0], plain[0])
    assert not torch.allclose(out[1:], plain[1:])


def test_deep_cache_takes_scheduled_prompts(pipe):
    images = pipe.generate("[a cat:a dog:0.5] AND a hat :0.5", cache_interval=2, **SETTINGS)
    assert images[0].size == (32, 32)


def test_a_refiner_continues_the_step_count(monkeypatch):
    fixtures = _fixture_module("sdxl")
    base = Pipeline(build_components(fixtures.TINY_SDXL, seed=1))
    refiner = Pipeline(build_components(fixtures.TINY_REFINER, seed=2))
    asked = []
    original = PromptConditioning.__call__

    def recording(self, step):
        asked.append(step)
        return original(self, step)

    monkeypatch.setattr(PromptConditioning, "__call__", recording)
    base.generate("[a:b:0.5]", steps=4, width=64, height=64, refiner=refiner, refiner_switch=0.5)
    assert asked == [0, 1, 2, 3]  # the base's two steps, then the refiner's (not 0, 1 again)


def test_the_x4_upscaler_takes_the_syntax_tiled():
    from .conftest import UPSCALER

    torch.manual_seed(0)
    model = Pipeline(build_components(UPSCALER))
    low = Image.new("RGB", (40, 40), (30, 120, 200))
    settings = {"steps": 1, "seed": 1, "noise_level": 20, "tile_size": 32, "tile_overlap": 8}
    plain = pixels(model.upscale(low, "a cat", **settings)[0])
    assert np.array_equal(plain, pixels(model.upscale(low, "a cat :1", **settings)[0]))
    composed = pixels(model.upscale(low, "[a cat:a dog:1] AND a hat :0.5", **settings)[0])
    assert composed.shape == plain.shape and not np.array_equal(composed, plain)


def test_has_prompt_syntax(pipe):
    assert request_for(pipe, ["a", "[a|b]"]).has_prompt_syntax()
    assert request_for(pipe, "a", "[x:y:2]").has_prompt_syntax()
    assert not request_for(pipe, "a (b:1.2)", "x AND y").has_prompt_syntax()


def test_img2img_counts_from_its_first_step_against_the_requested_steps(pipe, monkeypatch):
    asked = []
    original = PromptConditioning.__call__

    def recording(self, step):
        asked.append(text_at_step(self.parts[0][0][1], step))
        return original(self, step)

    monkeypatch.setattr(PromptConditioning, "__call__", recording)
    image = Image.new("RGB", (32, 32), (200, 40, 40))
    pipe.img2img(image, "[a:b:0.5]", strength=0.5, steps=8, seed=1, sampler="euler")
    # as the web UI: 4 of 8 steps run, counted from 0, against the 8-step schedule (switch after step 4)
    assert asked == [0, 0, 0, 0]  # row 0 ("a") every time
