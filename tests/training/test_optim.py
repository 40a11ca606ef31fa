"""The optimiser choice ``optim.name``: AdamW by default; Adafactor's factored state (counted from shapes
alone, as the memory benchmark does), its learning rate as an absolute step bound (zero-initialised LoRA
adapters train), a tiny model overfitting with it, and the clear errors for a bad name and for FSDP."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from torch import nn

import latentdiffusion as ld
from latentdiffusion.checkpoints.safe_io import read_state_dict
from latentdiffusion.cli.main import main
from latentdiffusion.components import build_components
from latentdiffusion.errors import UserError
from latentdiffusion.training.config import OptimConfig, apply_overrides, validate
from latentdiffusion.training.diffusion import DiffusionTask
from latentdiffusion.training.optim import build_optimizer, state_numel
from latentdiffusion.training.presets import get_train_preset

ADAFACTOR = OptimConfig(name="adafactor", weight_decay=0.0)


def one_step(module: nn.Module, optimizer: torch.optim.Optimizer, inputs: torch.Tensor) -> None:
    module(inputs).square().sum().backward()
    optimizer.step()


def test_adamw_stays_the_default():
    layer = nn.Linear(4, 4)
    optimizer = build_optimizer(layer.parameters(), OptimConfig())
    assert type(optimizer) is torch.optim.AdamW
    assert optimizer.defaults["betas"] == (0.9, 0.999) and optimizer.defaults["weight_decay"] == 0.01


def stepped_unet(config: OptimConfig) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The tiny preset's U-Net after one optimiser step, so that the optimiser holds its state."""
    unet = build_components(get_train_preset("tiny").model).unet.requires_grad_(True)
    optimizer = build_optimizer(unet.parameters(), config)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    one_step(lambda x: unet(x, torch.tensor([500]), torch.zeros(1, 8, 32)), optimizer, noise)
    return unet, optimizer


def test_adafactor_state_is_factored():
    unet, optimizer = stepped_unet(ADAFACTOR)
    conv = unet.conv_in.weight  # [out, in, 3, 3]: factored over the kernel's rows and columns
    assert optimizer.state[conv]["row_var"].shape == (*conv.shape[:3], 1)
    assert optimizer.state[conv]["col_var"].shape == (*conv.shape[:2], 1, conv.shape[3])
    assert set(optimizer.state[unet.conv_in.bias]) == {"step", "variance"}
    params = sum(p.numel() for p in unet.parameters())
    assert sum(state_numel(p.shape, "adafactor") for p in unet.parameters()) < 0.5 * params


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_state_counted_from_shapes_is_the_state_held(name):
    unet, optimizer = stepped_unet(OptimConfig(name=name))
    held = sum(v.numel() for state in optimizer.state.values() for k, v in state.items() if k != "step")
    trained = [p for p in unet.parameters() if p.grad is not None]
    assert len(optimizer.state) == len(trained)
    assert held == sum(state_numel(tuple(p.to("meta").shape), name) for p in trained)


def test_adafactor_lr_bounds_the_step_of_zero_initialised_weights():
    # torch's own eps2 = 1e-3 would scale this first step to 1e-3 * lr (the relative step size)
    layer = nn.Linear(8, 4)
    nn.init.zeros_(layer.weight)
    optimizer = build_optimizer(layer.parameters(), OptimConfig(name="adafactor", lr=1e-3))
    one_step(layer, optimizer, torch.randn(16, 8, generator=torch.Generator().manual_seed(0)))
    step = layer.weight.detach().abs()
    assert step.max() <= 1e-3 * (1 + 1e-5) and step.square().mean().sqrt() > 0.5e-3


def test_tiny_diffusion_model_overfits_one_batch_with_adafactor(shapes_batch, overfit):
    config = get_train_preset("tiny")
    task = DiffusionTask(config, build_components(config.model), torch.device("cpu"))
    make = lambda params: build_optimizer(params, OptimConfig(name="adafactor", lr=3e-3))  # noqa: E731
    losses = overfit(task, shapes_batch(2), steps=25, lr=3e-3, make_optimizer=make)
    assert losses[-1] < 0.3 * losses[0]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"optim.name": "sgd"}, "optim.name must be one of adamw, adafactor, got 'sgd'"),
        (
            {"optim.name": "adafactor", "distributed.strategy": "fsdp"},
            "optim.name=adafactor does not run with distributed.strategy=fsdp; use ddp or adamw",
        ),
    ],
)
def test_bad_optimiser_settings_are_one_clear_error(overrides, message, capsys):
    with pytest.raises(UserError, match=message):
        validate(apply_overrides(get_train_preset("tiny"), overrides))
    flags = [f"--{key}={value}" for key, value in overrides.items()]
    assert main(["train", "--preset", "tiny", "--show-config", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_accepts_adafactor(capsys):
    assert main(["train", "--preset", "tiny", "--show-config", "--optim.name=adafactor"]) == 0
    assert json.loads(capsys.readouterr().out)["optim"]["name"] == "adafactor"


def test_lora_finetune_with_adafactor_moves_the_zero_initialised_adapters(tmp_path):
    ld.load("preset:tiny").save(tmp_path / "model")
    images = tmp_path / "images"
    images.mkdir()
    for i, colour in enumerate(("red", "blue")):
        Image.new("RGB", (32, 32), colour).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"a {colour} square")
    args = [
        "finetune",
        "--model",
        str(tmp_path / "model"),
        "--lora",
        "--rank",
        "2",
        "-o",
        str(tmp_path / "run"),
    ]
    settings = ["--optim.name=adafactor", "--optim.lr=1e-2", "--optim.warmup_steps=0", "--max_steps=2"]
    assert main([*args, *settings, f"--data.path={images}", "--data.resolution=32", "--quiet"]) == 0
    weights = read_state_dict(tmp_path / "run" / "export" / "lora.safetensors")
    up = [v.abs().max().item() for k, v in weights.items() if "lora_up" in k]
    assert up and min(up) > 5e-3  # about lr per step, not torch's relative 1e-3 * lr
