"""The decoded-x0 pixel term of diffusion training (``diffusion.pixel_weight``)."""

import pytest
import torch

from latentdiffusion.components import build_components
from latentdiffusion.errors import UserError
from latentdiffusion.training.autoencoder import reconstruction_loss
from latentdiffusion.training.config import apply_overrides, validate
from latentdiffusion.training.diffusion import DiffusionTask
from latentdiffusion.training.presets import get_train_preset
from latentdiffusion.training.task import StepRandom

CPU = torch.device("cpu")
PIXEL = {
    "sample.prompts": "",
    "data.holdout": 2,
    "diffusion.pixel_weight": 2.0,
    "diffusion.pixel_max_timestep": 500,
    "autoencoder_loss.edge_weight": 4.0,
    "autoencoder_loss.gradient_weight": 1.0,
}


def task_for(**overrides) -> DiffusionTask:
    config = apply_overrides(get_train_preset("tiny"), PIXEL | overrides)
    torch.manual_seed(0)
    return DiffusionTask(config, build_components(config.model), CPU)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_the_term_is_the_first_stage_loss_of_the_decoded_prediction_below_the_bound(
    shapes_batch, prediction_type
):
    task = task_for(**{"model.schedule.prediction_type": prediction_type})
    batch = shapes_batch(2)
    z0 = task.latents(batch, StepRandom(0, 0, 2, torch.arange(2)))
    eps = torch.randn(z0.shape, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([100, 700])  # below and above pixel_max_timestep
    z_t = task.process.add_noise(z0, eps, t)
    exact = task.process.training_target(prediction_type, z0, eps, t)  # a perfect denoiser's output
    with torch.no_grad():
        term = task.pixel_loss(batch, z_t, exact, t)
        decoded = task.autoencoder.from_latent(z0[:1]).float()
    expected = reconstruction_loss(batch.x[:1], decoded, task.config.autoencoder_loss)
    assert term[1] == 0
    torch.testing.assert_close(term[0], expected, rtol=1e-4, atol=1e-5)
    assert term[0] > 0


def test_the_term_trains_the_denoiser_through_the_frozen_decoder(shapes_batch):
    batch = shapes_batch(2)
    gradients, losses = {}, {}
    for weight in (0.0, 2.0):
        task = task_for(**{"diffusion.pixel_weight": weight, "diffusion.pixel_max_timestep": 1000})
        for p in task.parameter_groups()["model"]:
            p.requires_grad_(True)
        loss = task.per_sample_loss(task.networks, batch, StepRandom(0, 0, 2, torch.arange(2))).sum()
        loss.backward()
        losses[weight] = loss.item()
        gradients[weight] = task.network.conv_out.weight.grad.clone()
        assert all(p.grad is None for p in task.autoencoder.parameters())
    assert losses[2.0] > losses[0.0]
    assert not torch.allclose(gradients[2.0], gradients[0.0])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"diffusion.pixel_weight": -1.0}, "pixel_weight must be >= 0"),
        ({"diffusion.pixel_max_timestep": 0}, "pixel_max_timestep must be >= 1"),
        ({"data.cache_latents": True}, "drop data.cache_latents"),
        ({"model.schedule.process": "flow", "model.schedule.prediction_type": "flow"}, "not a flow model"),
    ],
)
def test_settings_it_cannot_honour_are_refused(overrides, message):
    with pytest.raises(UserError, match=message):
        validate(apply_overrides(get_train_preset("tiny"), PIXEL | overrides))


def test_other_tasks_refuse_it():
    config = apply_overrides(get_train_preset("tiny-autoencoder"), {"diffusion.pixel_weight": 1.0})
    with pytest.raises(UserError, match="not one for 'autoencoder' runs"):
        validate(config)
