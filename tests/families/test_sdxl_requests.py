"""SDXL requests beyond the reference pipeline's defaults: few-step (Turbo/Lightning-style) sampling with
trailing timesteps and no guidance, against diffusers; image sizes and what they must be a multiple of."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from sdxl_fixtures import EIGHT_BIT, SIZE, as_float

from latentdiffusion.errors import UserError
from latentdiffusion.pipelines.metadata import parse_parameters
from latentdiffusion.pipelines.pipeline import Pipeline

pytest.importorskip("diffusers")

SCHEDULERS = {"euler": "EulerDiscreteScheduler", "euler_ancestral": "EulerAncestralDiscreteScheduler"}


def trailing_model(pipe: Pipeline) -> Pipeline:
    """The same networks read as a few-step model whose schedule spaces timesteps "trailing"."""
    config = pipe.config
    schedule = replace(config.schedule, timestep_spacing="trailing")
    return Pipeline(replace(pipe.components, config=replace(config, schedule=schedule)))


def unet_batches(pipe: Pipeline) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    batches: list[int] = []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    return batches, handle


@pytest.mark.parametrize(("sampler", "steps"), [("euler", 4), ("euler", 2), ("euler_ancestral", 1)])
@pytest.mark.parametrize("spacing_from", ["model", "request"])
def test_few_step_unguided_sampling_matches_diffusers(sdxl, diffusers_sdxl, sampler, steps, spacing_from):
    """Trailing timesteps from t = 999 and guidance 1 (one conditional pass per step), as SDXL-Lightning
    (Euler, 2-8 steps) and SDXL-Turbo (Euler ancestral, 1 step: no noise is added on the step to 0)
    run; diffusers disables guidance at guidance_scale <= 1 and Turbo's card says 0.0, ours says 1."""
    import diffusers

    base, _ = sdxl("base")
    ours = trailing_model(base) if spacing_from == "model" else base
    request = {} if spacing_from == "model" else {"sigmas": "trailing"}
    theirs = diffusers_sdxl("base", "StableDiffusionXLPipeline")
    scheduler = getattr(diffusers, SCHEDULERS[sampler])
    theirs.scheduler = scheduler.from_config(theirs.scheduler.config, timestep_spacing="trailing")
    start = torch.randn(2, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(11))
    prompts = ["a red circle", "a blue square"]
    expected = theirs(
        prompts,
        height=SIZE,
        width=SIZE,
        num_inference_steps=steps,
        guidance_scale=0.0,
        latents=start.clone(),
        output_type="np",
    ).images
    batches, handle = unet_batches(ours)
    try:
        images = ours.generate(
            prompts,
            width=SIZE,
            height=SIZE,
            steps=steps,
            guidance_scale=1,
            sampler=sampler,
            latents=start,
            **request,
        )
    finally:
        handle.remove()
    assert np.abs(as_float(images) - expected).max() <= EIGHT_BIT
    assert batches == [2] * steps  # no unconditional pass
    settings = parse_parameters(images[0].info["parameters"])["settings"]
    assert (settings["Steps"], settings["CFG scale"]) == (str(steps), "1")


def test_few_step_sampling_from_the_command_line(sdxl, tmp_path):
    """A single file carries no scheduler config: --sigmas trailing asks for the spacing."""
    from latentdiffusion.cli.main import main
    from latentdiffusion.pipelines.metadata import read_parameters

    _, folder = sdxl("base")
    out = tmp_path / "lightning.png"
    args = ["--sampler", "euler", "--steps", "4", "--cfg", "1", "--sigmas", "trailing", "--size", str(SIZE)]
    assert main(["generate", "a cat", "--model", str(folder), *args, "--quiet", "-o", str(out)]) == 0
    settings = parse_parameters(read_parameters(out))["settings"]
    assert settings["Timestep spacing"] == "trailing" and settings["Sampler"] == "Euler"


@pytest.mark.parametrize(("width", "height"), [(100, 64), (64, 60), (4, 64)])
def test_sizes_off_the_multiple_are_one_user_error_naming_it(sdxl, width, height):
    base, _ = sdxl("base")
    with pytest.raises(UserError, match=r"must be a positive multiple of 8, got (100|60|4)$"):
        base.generate("x", width=width, height=height, steps=1)


def test_any_multiple_of_eight_works_with_the_sdxl_factor(sdxl):
    """SDXL's autoencoder shrinks 8x and its U-Net halves twice: a 72x40 image has a 9x5 latent, which
    the U-Net downsamples to 3x2 and brings back to the skip connections' sizes."""
    from latentdiffusion.components import build_components
    from latentdiffusion.config import AutoencoderConfig

    base, _ = sdxl("base")
    factor_eight = replace(
        base.config, autoencoder=AutoencoderConfig(block_channels=(32,) * 4, num_res_blocks=1)
    )
    pipe = Pipeline(build_components(factor_eight))
    seen = []
    image = pipe.generate(
        "x", width=72, height=40, steps=1, callback=lambda step, steps, x, x0: seen.append(x.shape)
    )[0]
    assert image.size == (72, 40) and seen == [(1, 4, 5, 9)]


def test_a_larger_latent_factor_sets_the_multiple(sdxl):
    from latentdiffusion.components import build_components
    from latentdiffusion.config import AutoencoderConfig

    base, _ = sdxl("base")
    factor_sixteen = replace(
        base.config, autoencoder=AutoencoderConfig(block_channels=(32,) * 5, num_res_blocks=1)
    )
    pipe = Pipeline(build_components(factor_sixteen))
    with pytest.raises(UserError, match="width must be a positive multiple of 16, got 72"):
        pipe.generate("x", width=72, height=64, steps=1)
    with pytest.raises(UserError, match="left must be a whole multiple of 16 pixels"):
        pipe.outpaint(Image.new("RGB", (64, 64)), "x", left=8, steps=1)
