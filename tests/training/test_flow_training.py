"""Training a rectified-flow model (Esser et al. 2024, SD3): logit-normal times, x_t = (1 - t) x0 + t eps,
velocity target eps - x0, network timestep t * 1000; the tiny U-Net preset with a flow schedule."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from latentdiffusion.components import build_components
from latentdiffusion.errors import UserError
from latentdiffusion.training.config import apply_overrides
from latentdiffusion.training.diffusion import DiffusionTask
from latentdiffusion.training.loop import train
from latentdiffusion.training.presets import get_train_preset
from latentdiffusion.training.task import StepRandom

CPU = torch.device("cpu")
FLOW = {
    "model.schedule.process": "flow",
    "model.schedule.prediction_type": "flow",
    "model.schedule.shift": 3.0,
    "sample.prompts": "",
    "data.holdout": 2,
}


def tiny_flow(**overrides) -> object:
    return apply_overrides(get_train_preset("tiny"), FLOW | overrides)


def test_flow_model_overfits_one_batch(shapes_batch, overfit):
    config = tiny_flow()
    task = DiffusionTask(config, build_components(config.model), CPU)
    losses = overfit(task, shapes_batch(2), steps=25, lr=3e-3)
    assert losses[-1] < 0.5 * losses[0]


def test_flow_loss_is_the_velocity_regression(shapes_batch):
    """The network sees x_t = (1 - t) z0 + t eps at timestep t * 1000 (fractional) and the loss is the
    (min-SNR weighted) squared error to eps - z0, with t, z0 and eps from the step's own random draws."""
    config = tiny_flow()
    task = DiffusionTask(config, build_components(config.model), CPU)
    batch = shapes_batch(2)
    seen = {}

    def record(module, args, output):
        seen["x"], seen["t"], seen["prediction"] = args[0], args[1], output

    handle = task.unet.register_forward_hook(record)
    loss = task.losses(task.forward_modules(), batch, StepRandom(0, 0, 2, batch.positions), 0)[0]["model"]
    handle.remove()
    random = StepRandom(0, 0, 2, batch.positions)  # the same draws, in the task's order
    z0 = task.latents(batch, random)
    t = torch.sigmoid(random.randn())
    eps = random.randn(*z0.shape[1:])
    assert torch.allclose(seen["t"], t * 1000) and not torch.equal(seen["t"], seen["t"].round())
    t4 = t.view(-1, 1, 1, 1)
    assert torch.allclose(seen["x"], (1 - t4) * z0 + t4 * eps, atol=1e-6)
    # the preset's min-SNR-5 weight on the x0 error (x0 = x_t - t v): min(SNR, 5) t^2, SNR = ((1 - t) / t)^2
    weight = (((1 - t) / t) ** 2).clamp(max=5.0) * t**2
    per_sample = (seen["prediction"] - (eps - z0)).pow(2).mean(dim=(1, 2, 3))
    assert torch.allclose(loss, (weight * per_sample).mean(), rtol=1e-5)


def test_flow_training_resumes_bitwise_and_exports_a_loadable_model(tmp_path, monkeypatch, interrupt_after):
    import latentdiffusion as ld

    config = tiny_flow(max_steps=4, checkpoint_every=2)
    train(config, tmp_path / "straight")
    interrupt_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "resumed")
    monkeypatch.undo()
    assert train(config, tmp_path / "resumed", resume=True).step == 4
    straight = load_file(tmp_path / "straight/export/model.safetensors")
    resumed = load_file(tmp_path / "resumed/export/model.safetensors")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[key], resumed[key]) for key in straight)
    pipe = ld.load(str(tmp_path / "straight/export"))
    assert pipe.components.config.schedule.process == "flow"
    images = pipe.generate("a red circle", steps=3, sampler="euler", seed=0, width=32, height=32)
    assert images[0].size == (32, 32)


def test_flow_needs_a_flow_prediction():
    with pytest.raises(UserError, match="prediction_type 'v_prediction' for the 'flow'"):
        train(tiny_flow(**{"model.schedule.prediction_type": "v_prediction"}), "unused")
