"""Models saved by diffusers load here and compute what diffusers computes; our writers round-trip exactly.

For each tiny random variant (see conftest): diffusers folder -> ours (U-Net, autoencoder, text encoder
and a full guided generation against diffusers on the same latents); ours -> single file (our writer)
-> diffusers' own ``from_single_file`` (with the saved folder as its local config, so nothing touches
the network) reproduces the original tensors; ours -> single file / diffusers folder -> ours again
reproduces every tensor.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

import latentdiffusion as ld
from latentdiffusion.checkpoints.formats import save_components
from latentdiffusion.checkpoints.safe_io import read_state_dict, save_safetensors
from latentdiffusion.diffusion.denoiser import Denoiser
from latentdiffusion.diffusion.guidance import ClassifierFreeGuidance
from latentdiffusion.diffusion.schedules import initial_noise_scale, sampling_sigmas, to_unit_scale
from latentdiffusion.samplers import sample

diffusers = pytest.importorskip("diffusers")

VARIANTS = ("sd1", "sd2-v", "sd1-inpaint")
PROMPT, NEGATIVE = "a red circle on a blue square", "blurry"


def assert_same_tensors(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    sa = {k: v for k, v in sa.items() if not k.endswith("position_ids")}
    sb = {k: v for k, v in sb.items() if not k.endswith("position_ids")}
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def assert_same_pipelines(ours, theirs) -> None:
    for attribute in ("unet", "vae", "text_encoder"):
        assert_same_tensors(getattr(ours, attribute), getattr(theirs, attribute))


@pytest.fixture(scope="module")
def loaded(cases):
    return {name: ld.load(case.folder) for name, case in cases.items()}


@pytest.fixture(scope="module")
def single_files(loaded, tmp_path_factory):
    root = tmp_path_factory.mktemp("single-files")
    paths = {}
    for name, pipe in loaded.items():
        paths[name] = root / f"{name}.safetensors"
        pipe.save(paths[name], format="single-file")
    return paths


@pytest.mark.parametrize("name", VARIANTS)
@torch.no_grad()
def test_networks_from_diffusers_folder_match(cases, loaded, name):
    case, ours = cases[name], loaded[name]
    theirs = case.pipe
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, theirs.unet.config.in_channels, 8, 8, generator=g)
    context = torch.randn(2, 7, 64, generator=g)
    t = torch.tensor([981.0, 500.0])
    expected = theirs.unet(x, t, context).sample
    torch.testing.assert_close(ours.unet(x, t, context), expected, atol=1e-4, rtol=1e-4)
    images = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
    torch.testing.assert_close(
        ours.vae.encode(images).mean, theirs.vae.encode(images).latent_dist.mean, atol=1e-4, rtol=1e-4
    )
    z = torch.randn(1, 4, 8, 8, generator=g)
    torch.testing.assert_close(ours.vae.decode(z), theirs.vae.decode(z).sample, atol=1e-4, rtol=1e-4)
    ids = ours.tokenizer([PROMPT, ""])
    assert torch.equal(
        ids,
        theirs.tokenizer([PROMPT, ""], padding="max_length", max_length=77, return_tensors="pt").input_ids,
    )
    torch.testing.assert_close(ours.text_encoder(ids), theirs.text_encoder(ids)[0], atol=1e-5, rtol=1e-5)
    assert ours.config.schedule.prediction_type == case.prediction_type
    assert ours.config.sample_size == 16


@pytest.mark.parametrize("name", VARIANTS)
def test_our_single_file_loads_in_diffusers(cases, single_files, name):
    """diffusers' own single-file loader, configured from the local folder, gets the original tensors."""
    case = cases[name]
    kind = type(case.pipe)
    theirs = kind.from_single_file(
        str(single_files[name]), config=str(case.folder), local_files_only=True, safety_checker=None
    )
    assert_same_pipelines(theirs, case.pipe)


@pytest.mark.parametrize("name", VARIANTS)
def test_single_file_round_trip(loaded, single_files, name, tmp_path):
    ours = loaded[name]
    back = ld.load(single_files[name])
    assert_same_pipelines(back, ours)
    assert back.config == replace(ours.config, name=back.config.name)
    # without our metadata the CompVis yaml beside the file describes the model completely
    bare = tmp_path / f"{name}.safetensors"
    save_safetensors(read_state_dict(single_files[name]), bare)
    bare.with_suffix(".yaml").write_text(single_files[name].with_suffix(".yaml").read_text())
    from_yaml = ld.load(bare)
    assert_same_pipelines(from_yaml, ours)
    for part in ("unet", "autoencoder", "text_encoder", "schedule"):
        assert getattr(from_yaml.config, part) == getattr(ours.config, part), part


@pytest.mark.parametrize("name", ["sd1", "sd2-v"])
def test_diffusers_folder_round_trip(cases, loaded, name, tmp_path):
    ours = loaded[name]
    ours.save(tmp_path / "out", format="diffusers")
    theirs = type(cases[name].pipe).from_pretrained(tmp_path / "out", safety_checker=None)
    assert_same_pipelines(theirs, cases[name].pipe)
    assert theirs.scheduler.config.prediction_type == cases[name].prediction_type
    back = ld.load(tmp_path / "out")
    assert_same_pipelines(back, ours)
    assert back.config == replace(ours.config, name=back.config.name)


def test_fp16_conversion_round_trip(loaded, tmp_path):
    ours = loaded["sd2-v"]
    save_components(ours.components, tmp_path / "half.safetensors", "single-file", dtype=torch.float16)
    assert {v.dtype for v in read_state_dict(tmp_path / "half.safetensors").values()} == {torch.float16}
    back = ld.load(tmp_path / "half.safetensors", dtype=torch.float16)
    for attribute in ("unet", "vae", "text_encoder"):
        expected = {k: v.half() for k, v in getattr(ours, attribute).state_dict().items()}
        actual = getattr(back, attribute).state_dict()
        assert all(torch.equal(actual[k], expected[k]) for k in expected)


def _their_latents(pipe, noise: torch.Tensor, steps: int, **extra) -> torch.Tensor:
    out = pipe(
        PROMPT,
        negative_prompt=NEGATIVE,
        height=16,
        width=16,
        num_inference_steps=steps,
        guidance_scale=7.5,
        latents=noise.clone(),
        output_type="latent",
        **extra,
    )
    return out.images


def our_latents(
    components, noise: torch.Tensor, steps: int, concat: torch.Tensor | None = None
) -> torch.Tensor:
    """Guided DPM++ 2M with the schedule's own spacing, written with the maths-level pieces only."""
    tokenizer, encoder = components.tokenizer, components.text_encoder
    extra = {} if concat is None else {"concat": concat}
    cond = {"context": encoder(tokenizer([PROMPT])), **extra}
    uncond = {"context": encoder(tokenizer([NEGATIVE])), **extra}
    schedule = components.config.schedule
    sigmas = sampling_sigmas(components.schedule, schedule, steps, "dpmpp_2m", None)
    denoiser = Denoiser(components.unet, components.schedule, schedule.prediction_type)
    guided = ClassifierFreeGuidance(denoiser, cond, uncond, 7.5, 0.0)
    x = noise * initial_noise_scale(sigmas, schedule, "dpmpp_2m")
    return to_unit_scale(sample("dpmpp_2m", guided, x, sigmas), sigmas[-1])


@pytest.mark.parametrize("name", ["sd1", "sd2-v"])
@torch.no_grad()
def test_guided_generation_matches_diffusers(cases, single_files, name):
    """The model read from our single file samples what diffusers samples from its own folder."""
    case = cases[name]
    ours = ld.load(single_files[name])
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    expected = _their_latents(case.pipe, noise, 6)
    torch.testing.assert_close(our_latents(ours.components, noise, 6), expected, atol=2e-4, rtol=1e-4)
    image = ours.generate(PROMPT, NEGATIVE, width=16, height=16, steps=6, sampler="dpmpp_2m", latents=noise)[
        0
    ]
    theirs = case.pipe(
        PROMPT,
        negative_prompt=NEGATIVE,
        height=16,
        width=16,
        num_inference_steps=6,
        latents=noise.clone(),
        output_type="np",
    ).images[0]
    difference = np.abs(np.asarray(image, dtype=np.float64) / 255 - theirs)
    assert difference.max() <= 1.01 / 255, difference.max() * 255
    assert theirs.std() > 0.05  # not a saturated image


@torch.no_grad()
def test_inpainting_generation_matches_diffusers(cases, loaded):
    """A 9-channel U-Net sampled with the mask and masked-image latents concatenated, as diffusers does."""
    case, ours = cases["sd1-inpaint"], loaded["sd1-inpaint"]
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(1, 4, 8, 8, generator=g)
    masked_latents = torch.randn(1, 4, 8, 8, generator=g)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 2:10] = 1.0
    seen = {}

    def grab(pipe, step, t, kwargs):
        seen.update(mask=kwargs["mask"][:1], masked=kwargs["masked_image_latents"][:1])
        return {}

    expected = _their_latents(
        case.pipe,
        noise,
        5,
        image=torch.zeros(1, 3, 16, 16),
        mask_image=mask,
        masked_image_latents=masked_latents,
        callback_on_step_end=grab,
        callback_on_step_end_tensor_inputs=["mask", "masked_image_latents"],
    )
    assert seen["mask"].shape == (1, 1, 8, 8) and torch.equal(seen["masked"], masked_latents)
    concat = torch.cat([seen["mask"], seen["masked"]], dim=1)
    torch.testing.assert_close(our_latents(ours.components, noise, 5, concat), expected, atol=2e-4, rtol=1e-4)
