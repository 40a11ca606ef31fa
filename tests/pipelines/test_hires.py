"""The hires fix (``pipelines.hires``): target sizes and crops as the web UI computes them (worked
examples of its ``hr_upscale_to_x/y`` and ``truncate_x/y``), exactly the asked second-pass steps, the
latent and image paths, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import latentdiffusion as ld
from latentdiffusion.errors import UserError
from latentdiffusion.pipelines.hires import (
    Hires,
    Target,
    enlarge,
    hires_fix,
    second_pass_sigmas,
    target_size,
)
from latentdiffusion.pipelines.request import common_options, make_request


@pytest.fixture(scope="module")
def tiny():
    return ld.load("preset:tiny")


@pytest.mark.parametrize(
    ("size", "hires", "target", "final"),
    [
        ((512, 512), Hires(scale=2), Target(1024, 1024), (1024, 1024)),
        ((512, 768), Hires(scale=1.5), Target(768, 1152), (768, 1152)),
        ((512, 768), Hires(resize_x=1024), Target(1024, 1536), (1024, 1536)),
        ((512, 768), Hires(resize_y=1024), Target(682, 1024), (680, 1024)),
        # both given, the target wider than the image: widths match, 512 px of height cropped (64 cells)
        ((512, 768), Hires(resize_x=1024, resize_y=1024), Target(1024, 1536, 0, 64), (1024, 1024)),
        # the target taller: heights match, the width cropped
        ((768, 512), Hires(resize_x=640, resize_y=640), Target(960, 640, 40, 0), (640, 640)),
    ],
)
def test_target_sizes_are_the_web_uis(size, hires, target, final):
    assert target_size(*size, hires, 8) == target
    assert target.final_size(8) == final


@pytest.mark.parametrize(("steps", "strength"), [(2, 0.3), (7, 0.7), (5, 1.0), (10, 0.05)])
def test_the_second_pass_runs_exactly_the_steps_asked(tiny, steps, strength):
    request = make_request(tiny.components, "a", None, common_options("t", {"steps": steps}), None)
    sigmas = second_pass_sigmas(tiny.components, request, steps, strength)
    assert len(sigmas) - 1 == steps and float(sigmas[-1]) == 0
    full = int(steps / min(strength, 0.999))  # the tail of this longer schedule
    assert torch.equal(sigmas, _full(tiny, full)[full - steps :])
    assert len(second_pass_sigmas(tiny.components, request, steps, 0)) == 1  # strength 0: no step


def _full(pipe, steps):
    from latentdiffusion.pipelines.sampling import full_sigmas

    request = make_request(pipe.components, "a", None, common_options("t", {"steps": steps}), None)
    return full_sigmas(pipe.components, request.options)


def test_latent_modes_interpolate_and_crop_the_latent(tiny):
    latents = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(0))
    hires = Hires(upscaler="Latent (bicubic antialiased)")
    target = Target(48, 40, crop_x=2, crop_y=1)  # latent 20x24, minus 1 row and 2 columns
    up, generators = enlarge(tiny.components, latents, target, hires, [0], None)
    full = F.interpolate(latents, size=(20, 24), mode="bicubic", antialias=True)
    assert generators is None and torch.equal(up, full[..., 0:19, 1:23])


def test_image_upscalers_are_called_with_the_target_size(tiny):
    seen = []

    def upscale(images, width, height):
        seen.append((len(images), width, height))
        return [image.resize((width, height)) for image in images]

    hires = Hires(scale=1.5, upscaler="Mine", steps=1, strength=0.5)
    images, request, target = hires_fix(
        tiny.components,
        "a",
        None,
        64,
        48,
        hires,
        upscale_images=upscale,
        upscaler_names=["Mine"],
        steps=1,
        seed=3,
        num_images=2,
    )
    assert seen == [(2, 96, 72)] and [image.size for image in images] == [(96, 72)] * 2
    assert request.seeds == [3, 4] and target == Target(96, 72)


def test_strength_and_seed_change_the_second_pass(tiny):
    def run(strength, seed):
        hires = Hires(scale=2, upscaler="Lanczos", steps=2, strength=strength)
        return np.asarray(hires_fix(tiny.components, "a", None, 32, 32, hires, steps=2, seed=seed)[0][0])

    weak = run(0.3, 1)
    assert weak.shape == (64, 64, 3) and np.array_equal(weak, run(0.3, 1))
    assert not np.array_equal(weak, run(0.9, 1)) and not np.array_equal(weak, run(0.3, 2))


@pytest.mark.parametrize(
    ("hires", "message"),
    [
        (Hires(upscaler="R-ESRGAN 4x+"), "unknown hires upscaler"),
        (Hires(strength=0), "latent upscale needs denoising_strength > 0"),
        (Hires(strength=1.5), "strength"),
        (Hires(scale=0), "hr_scale"),
        (Hires(resize_x=-8), "hr_resize_x"),
        (Hires(steps=-1), "hr_second_pass_steps"),
        (Hires(scale=1.1), "multiple of"),  # 64 * 1.1 = 70: not a multiple of 8
    ],
)
def test_bad_input_is_one_clear_error(tiny, hires, message):
    with pytest.raises(UserError, match=message):
        hires_fix(tiny.components, "a", None, 64, 64, hires, steps=1)
