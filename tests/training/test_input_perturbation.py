"""Input perturbation in diffusion training (``diffusion.input_perturbation``): the network's input is
noised with eps + gamma * xi while its target stays eps's."""

import pytest
import torch

from latentdiffusion.components import build_components
from latentdiffusion.errors import UserError
from latentdiffusion.training.config import apply_overrides, validate
from latentdiffusion.training.diffusion import DiffusionTask
from latentdiffusion.training.presets import get_train_preset
from latentdiffusion.training.task import StepRandom

CPU = torch.device("cpu")


class Recorder(torch.nn.Module):
    """A network that predicts zero and keeps what it was given."""

    def forward(self, x, t, **cond):
        self.input, self.t = x, t
        return torch.zeros_like(x)


def run(shapes_batch, gamma: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, DiffusionTask]:
    overrides = {"sample.prompts": "", "data.holdout": 2, "diffusion.min_snr_gamma": "none"}
    overrides |= {"diffusion.input_perturbation": gamma, "model.schedule.prediction_type": "epsilon"}
    config = apply_overrides(get_train_preset("tiny"), overrides)
    torch.manual_seed(0)
    task = DiffusionTask(config, build_components(config.model), CPU)
    recorder = Recorder()
    with torch.no_grad():
        loss = task.per_sample_loss(
            task.networks | {"unet": recorder}, shapes_batch(2), StepRandom(0, 0, 2, torch.arange(2))
        )
    return loss, recorder.input, recorder.t, task


def test_the_input_moves_by_gamma_times_fresh_noise_and_the_target_stays(shapes_batch):
    plain, z_plain, t, task = run(shapes_batch, 0.0)
    half, z_half, t_half, _ = run(shapes_batch, 0.5)
    quarter, z_quarter, _, _ = run(shapes_batch, 0.25)
    assert torch.equal(t, t_half)
    # a zero prediction's loss is the target's mean square: the same eps whatever gamma is
    torch.testing.assert_close(half, plain)
    torch.testing.assert_close(quarter, plain)
    sigma = (1 - task.process.alphas_cumprod(t.long())).sqrt().view(-1, 1, 1, 1)
    xi = (z_half - z_plain) / (0.5 * sigma)
    torch.testing.assert_close((z_quarter - z_plain) / (0.25 * sigma), xi, rtol=1e-4, atol=1e-4)
    assert 0.5 < xi.std().item() < 1.5  # fresh standard-normal noise, not eps again


@pytest.mark.parametrize(
    ("task", "message"),
    [("tiny", "input_perturbation must be >= 0"), ("tiny-autoencoder", "not one for 'autoencoder' runs")],
)
def test_settings_it_cannot_honour_are_refused(task, message):
    gamma = -0.1 if task == "tiny" else 0.1
    with pytest.raises(UserError, match=message):
        validate(apply_overrides(get_train_preset(task), {"diffusion.input_perturbation": gamma}))
