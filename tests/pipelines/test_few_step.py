"""Few-step samplers of distilled models in a whole pipeline: LCM (with its boundary scalings) and TCD
(with its gamma) against diffusers' StableDiffusionPipeline with LCMScheduler / TCDScheduler, as an
LCM-LoRA or TCD-LoRA is run on an ordinary model."""

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiffusion.pipelines.pipeline import Pipeline
from latentdiffusion.pipelines.sampling import SAMPLER_SEED_OFFSET

SIZE = 32
SEED = 11


@pytest.fixture(scope="module")
def pipelines(tiny_model, diffusers_pipeline):
    return Pipeline(tiny_model("sd").ours), diffusers_pipeline("StableDiffusionPipeline", "sd")


def generate_both(pipelines, scheduler: str, sampler: str, steps: int, guidance: float, **options):
    import diffusers

    theirs = pipelines[1]
    theirs.scheduler = getattr(diffusers, scheduler).from_config(theirs.scheduler.config)
    return run_both(pipelines, sampler, steps, guidance, latent_seed=5, **options)


def run_both(pipelines, sampler: str, steps: int, guidance: float, latent_seed: int, **options):
    """Our images and diffusers' (as arrays in [0, 1]) for the same two prompts, latents and noise."""
    ours, theirs = pipelines
    latents = torch.randn(2, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(latent_seed))
    prompts = ["a red circle", "a blue square"]
    # Our stochastic samplers draw from seed + SAMPLER_SEED_OFFSET, one generator per image.
    generators = [torch.Generator().manual_seed(SEED + i + SAMPLER_SEED_OFFSET) for i in range(2)]
    expected = theirs(
        prompts,
        height=SIZE,
        width=SIZE,
        num_inference_steps=steps,
        guidance_scale=guidance,
        latents=latents.clone(),
        generator=generators,
        output_type="np",
        **options,
    ).images
    images = ours.generate(
        prompts,
        width=SIZE,
        height=SIZE,
        steps=steps,
        guidance_scale=guidance,
        sampler=sampler,
        seed=SEED,
        latents=latents,
        **options,
    )
    return np.stack([np.asarray(image, dtype=np.float64) / 255 for image in images]), expected


@pytest.mark.parametrize("steps", [1, 2, 4])
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_lcm_matches_diffusers_lcm_scheduler(pipelines, steps, guidance):
    actual, expected = generate_both(pipelines, "LCMScheduler", "lcm", steps, guidance)
    assert np.abs(actual - expected).max() <= 1 / 255 + 1e-6


@pytest.mark.parametrize(("steps", "gamma"), [(1, 0.3), (2, 0.3), (4, 0.3), (4, 0.0), (4, 1.0)])
def test_tcd_matches_diffusers_tcd_scheduler(pipelines, steps, gamma):
    actual, expected = generate_both(pipelines, "TCDScheduler", "tcd", steps, 1.0, eta=gamma)
    assert np.abs(actual - expected).max() <= 1 / 255 + 1e-6


def test_tcd_gamma_changes_the_image(pipelines):
    """gamma reaches the sampler (a test that a dropped option would fail)."""
    ours, _ = pipelines
    a, b = (
        ours.generate("a cat", width=SIZE, height=SIZE, steps=4, sampler="tcd", eta=g) for g in (0.0, 0.6)
    )
    assert np.abs(np.asarray(a[0], dtype=np.float64) - np.asarray(b[0], dtype=np.float64)).max() > 2


def test_a_tcd_scheduler_config_selects_the_tcd_sampler():
    """A diffusers folder whose scheduler is TCDScheduler (a TCD model or a TCD-LoRA'd one) samples with
    tcd by default, on its training schedule."""
    import diffusers

    from latentdiffusion.checkpoints.diffusers_configs import schedule_from_diffusers

    config = dict(diffusers.TCDScheduler().config)
    config["_class_name"] = "TCDScheduler"
    schedule, sampler, _ = schedule_from_diffusers(config)
    assert sampler == "tcd" and schedule.set_alpha_to_one and schedule.timestep_spacing == "leading"


LCM_COND_DIM = 32


@pytest.fixture(scope="module")
def lcm_model(tiny_model):
    """An LCM-distilled tiny model (a U-Net with a guidance-embedding input): ours and diffusers'
    LatentConsistencyModelPipeline with the same weights."""
    from dataclasses import replace

    import diffusers

    from latentdiffusion.checkpoints.unet_keys import from_diffusers_state_dict
    from latentdiffusion.models.unet import UNet

    model = tiny_model("sd")
    unet = diffusers.UNet2DConditionModel.from_config(model.unet.config, time_cond_proj_dim=LCM_COND_DIM)
    generator = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2 + (parameter == 1) * 1.0)
    config = model.ours.config
    config = replace(config, unet=replace(config.unet, time_cond_proj_dim=LCM_COND_DIM))
    ours_unet = UNet(config.unet).eval()
    ours_unet.load_state_dict(from_diffusers_state_dict(unet.state_dict()))
    components = model.ours.with_modules(unet=ours_unet)
    components.config = config
    scheduler = diffusers.LCMScheduler.from_config(
        diffusers_common_config(config), set_alpha_to_one=config.schedule.set_alpha_to_one
    )
    theirs = diffusers.LatentConsistencyModelPipeline(
        vae=model.vae,
        text_encoder=model.text_encoder,
        tokenizer=model.tokenizer,
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    theirs.set_progress_bar_config(disable=True)
    return Pipeline(components), theirs


def diffusers_common_config(config) -> dict:
    s = config.schedule
    return dict(
        num_train_timesteps=s.num_train_timesteps,
        beta_start=s.beta_start,
        beta_end=s.beta_end,
        beta_schedule=s.beta_schedule,
        prediction_type=s.prediction_type,
        steps_offset=s.steps_offset,
    )


@pytest.mark.parametrize(("steps", "guidance"), [(1, 8.0), (4, 8.0), (4, 1.0)])
def test_lcm_distilled_model_matches_latent_consistency_pipeline(lcm_model, steps, guidance):
    actual, expected = run_both(lcm_model, "lcm", steps, guidance, latent_seed=6)
    assert np.abs(actual - expected).max() <= 1 / 255 + 1e-6


def test_lcm_distilled_guidance_scale_reaches_the_embedding(lcm_model):
    ours, _ = lcm_model
    a, b = (
        ours.generate("a cat", width=SIZE, height=SIZE, steps=2, sampler="lcm", guidance_scale=g)[0]
        for g in (1.0, 8.0)
    )
    assert np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max() > 2


def test_a_diffusers_unet_config_with_time_cond_proj_dim_loads(tiny_model):
    from latentdiffusion.checkpoints.diffusers_configs import unet_from_diffusers, unet_to_diffusers

    config = {**tiny_model("sd").unet.config, "time_cond_proj_dim": 256}
    unet = unet_from_diffusers(config)
    assert unet.time_cond_proj_dim == 256
    assert unet_to_diffusers(unet, 64)["time_cond_proj_dim"] == 256
    with pytest.raises(ValueError, match="time_cond_proj_dim"):
        unet_from_diffusers({**config, "time_cond_proj_dim": 10**9})


@pytest.mark.parametrize(
    ("sampler", "steps", "strength"), [("lcm", 4, 0.25), ("tcd", 4, 0.25), ("tcd", 8, 0.5)]
)
def test_img2img_matches_diffusers_img2img_pipeline(tiny_model, diffusers_pipeline, sampler, steps, strength):
    """img2img with LCM/TCD as diffusers' StableDiffusionImg2ImgPipeline cuts their schedule by strength.
    Deterministic cases only (one LCM step draws no noise; TCD at gamma 0): our stochastic samplers draw
    from streams of their own, diffusers' from the generator that also made the starting noise."""
    import diffusers

    theirs = diffusers_pipeline("StableDiffusionImg2ImgPipeline", "sd")
    scheduler = {"lcm": diffusers.LCMScheduler, "tcd": diffusers.TCDScheduler}[sampler]
    theirs.scheduler = scheduler.from_config(theirs.scheduler.config)
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    options = {"eta": 0.0} if sampler == "tcd" else {}
    expected = theirs(
        ["a cat", "a dog"],
        image=picture,
        strength=strength,
        num_inference_steps=steps,
        guidance_scale=1.0,
        generator=[torch.Generator().manual_seed(s) for s in (7, 8)],
        output_type="np",
        **options,
    ).images
    images = Pipeline(tiny_model("sd").ours).img2img(
        picture,
        ["a cat", "a dog"],
        strength=strength,
        steps=steps,
        guidance_scale=1.0,
        sampler=sampler,
        seed=7,
        **options,
    )
    actual = np.stack([np.asarray(image, dtype=np.float64) / 255 for image in images])
    assert np.abs(actual - expected).max() <= 1 / 255 + 1e-6


def test_tcd_options_are_refused_where_they_cannot_run():
    from dataclasses import replace

    from latentdiffusion.config import ScheduleConfig
    from latentdiffusion.errors import UserError
    from latentdiffusion.pipelines.sampling import SamplingOptions

    with pytest.raises(UserError, match="flow models"):
        SamplingOptions(sampler="tcd", grid=replace(ScheduleConfig(), process="flow")).sampler_options()
    with pytest.raises(UserError, match="between 0 and 1"):
        SamplingOptions(sampler="tcd", eta=1.5).validate()
    options = SamplingOptions(sampler="tcd", eta=0.5, grid=ScheduleConfig()).sampler_options()
    assert options["eta"] == 0.5 and options["schedule"].num_train_timesteps == 1000
    assert "schedule" not in SamplingOptions(sampler="euler", grid=ScheduleConfig()).sampler_options()
