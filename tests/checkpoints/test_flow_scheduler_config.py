"""Rectified-flow schedules read from and written to diffusers' scheduler_config.json, and bounds-checked."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from latentdiffusion.checkpoints.bounds import validate_model_config
from latentdiffusion.checkpoints.diffusers_configs import schedule_from_diffusers, schedule_to_diffusers
from latentdiffusion.config import get_preset
from latentdiffusion.diffusion.process import RectifiedFlow, process_from_config
from latentdiffusion.errors import UserError

SD3_SCHEDULER = {  # stabilityai/stable-diffusion-3-medium-diffusers scheduler/scheduler_config.json
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": "0.29.0.dev0",
    "num_train_timesteps": 1000,
    "shift": 3.0,
}


def test_sd3_scheduler_config_is_a_shifted_flow():
    schedule, sampler, sigmas = schedule_from_diffusers(SD3_SCHEDULER)
    assert (schedule.process, schedule.prediction_type, schedule.shift) == ("flow", "flow", 3.0)
    assert schedule.num_train_timesteps == 1000 and sampler == "euler" and sigmas is None
    assert isinstance(process_from_config(schedule), RectifiedFlow)


@pytest.mark.parametrize(
    ("sampler", "sigmas"),
    [
        ("euler", None),
        ("euler", "karras"),
        ("euler", "exponential"),
        ("heun", None),
        ("dpmpp_2m", None),
        ("unipc", None),
    ],
)
def test_written_flow_configs_load_in_diffusers_with_our_levels(sampler, sigmas):
    import diffusers

    schedule = schedule_from_diffusers(SD3_SCHEDULER)[0]
    written = schedule_to_diffusers(schedule, sampler, sigmas)
    scheduler = getattr(diffusers, written["_class_name"]).from_config(written)
    scheduler.set_timesteps(12)
    ours = process_from_config(schedule).sampling_sigmas(12, sampler, sigmas).double()
    t = torch.where(ours >= 4096, torch.ones_like(ours), ours / (1 + ours))
    theirs = scheduler.sigmas.double()
    if sampler == "heun":  # FlowMatchHeun visits every inner level twice
        theirs = torch.cat([theirs[:1], theirs[1:-1:2], theirs[-1:]])
    assert torch.allclose(t, theirs, rtol=0, atol=1.1e-6)
    assert schedule_from_diffusers(written) == (schedule, sampler, sigmas)


def test_unsupported_flow_settings_are_refused():
    with pytest.raises(ValueError, match="use_dynamic_shifting=True"):
        schedule_from_diffusers({**SD3_SCHEDULER, "use_dynamic_shifting": True})
    dpm = {
        "_class_name": "DPMSolverMultistepScheduler",
        "use_flow_sigmas": True,
        "prediction_type": "epsilon",
    }
    with pytest.raises(ValueError, match="flow_prediction"):
        schedule_from_diffusers(dpm)
    flow = schedule_from_diffusers(SD3_SCHEDULER)[0]
    with pytest.raises(ValueError, match="velocity"):
        schedule_to_diffusers(replace(flow, prediction_type="epsilon"), "euler", None)


def test_bounds_check_the_process_its_shift_and_prediction():
    model = get_preset("tiny")
    flow = schedule_from_diffusers(SD3_SCHEDULER)[0]
    validate_model_config(replace(model, schedule=flow), "test")
    bad = [
        (replace(flow, process="diffusion"), "schedule.process"),
        (replace(flow, shift=0.0), "schedule.shift"),
        (replace(flow, shift=float("nan")), "schedule.shift"),
        (replace(flow, prediction_type="v_prediction"), "prediction_type of a flow model"),
        (replace(model.schedule, prediction_type="flow"), "prediction_type of a discrete model"),
    ]
    for schedule, message in bad:
        with pytest.raises(UserError, match=message):
            validate_model_config(replace(model, schedule=schedule), "test")
