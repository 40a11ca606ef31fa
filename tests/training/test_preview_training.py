"""The preview decoder: its shape contract, file round trip, training task and `ldm train-preview`."""

from dataclasses import replace

import pytest
import torch

from latentdiffusion.cli.main import main as run_cli
from latentdiffusion.components import build_components
from latentdiffusion.config import TINY
from latentdiffusion.models.preview_decoder import (
    PREVIEW_FILE,
    PreviewDecoder,
    load_preview_decoder,
    save_preview_decoder,
)
from latentdiffusion.training.config import DataConfig, OptimConfig, SampleConfig, apply_overrides
from latentdiffusion.training.loop import train
from latentdiffusion.training.presets import PRESETS
from latentdiffusion.training.preview import PreviewTask

CPU = torch.device("cpu")


def tiny_config(**overrides):
    config = replace(
        PRESETS["shapes-preview"],
        name="tiny-preview",
        model=TINY,
        autoencoder="random",
        data=DataConfig(resolution=32, holdout=2),
        optim=OptimConfig(lr=3e-3, warmup_steps=1),
        sample=SampleConfig(),
        batch_size=2,
        max_steps=4,
        ema_decay=0.9,
        log_every=1,
        eval_every=0,
        checkpoint_every=2,
    )
    return apply_overrides(config, overrides)


@pytest.mark.parametrize("factor", [1, 2, 8])
def test_decoder_upsamples_by_the_autoencoder_factor(factor):
    decoder = PreviewDecoder(4, factor, channels=8)
    image = decoder(torch.randn(2, 4, 5, 6))
    assert image.shape == (2, 3, 5 * factor, 6 * factor)
    assert image.abs().max() <= 1


def test_factor_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="power of 2"):
        PreviewDecoder(4, 3)


def test_file_round_trip_keeps_settings_and_fp16_weights(tmp_path):
    decoder = PreviewDecoder(4, 8, channels=8)
    save_preview_decoder(decoder, tmp_path / PREVIEW_FILE)
    loaded = load_preview_decoder(tmp_path / PREVIEW_FILE)
    assert (loaded.latent_channels, loaded.factor, loaded.channels) == (4, 8, 8)
    for name, tensor in decoder.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor.half().float())


def test_loss_falls_on_a_fixed_batch(shapes_batch, overfit):
    config = tiny_config()
    task = PreviewTask(config, build_components(config.model), CPU)
    losses = overfit(task, shapes_batch(4), steps=40, lr=1e-2)
    # A random tiny autoencoder's images are mostly fine-grained noise, so the fall is modest but steady.
    assert losses[-1] < 0.9 * losses[0]
    assert losses[-1] < min(losses[:10])


def test_only_the_preview_decoder_trains():
    config = tiny_config()
    task = PreviewTask(config, build_components(config.model), CPU)
    assert set(task.parameter_groups()) == {"preview"}
    assert not any(p.requires_grad for p in task.autoencoder.parameters())


def test_training_run_exports_the_preview_file(tmp_path):
    result = train(tiny_config(eval_every=4), tmp_path / "run")
    assert {"eval/psnr", "eval/psnr_linear"} <= set(result.metrics)
    decoder = load_preview_decoder(result.export_dir / PREVIEW_FILE)
    assert decoder.factor == TINY.autoencoder.downsampling_factor
    assert (tmp_path / "run/samples").is_dir()


def test_cli_runs_the_preset_with_overrides(tmp_path, capsys):
    out = tmp_path / "cli"
    args = [
        "train-preview",
        "--preset",
        "shapes-preview",
        "-o",
        str(out),
        "--quiet",
        "--autoencoder",
        "random",
    ]
    settings = ["--max_steps=2", "--batch_size=2", "--data.resolution=32", "--checkpoint_every=0"]
    assert run_cli([*args, *settings, "--eval_every=0", "--sample.every=0"]) == 0
    assert (out / "export" / PREVIEW_FILE).is_file()
