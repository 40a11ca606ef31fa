"""``ldm train-upscaler`` end to end on a tiny config, and ``ldm upscale`` without --model using the shipped
upscaler (``ld.load("upscaler")``: src/latentdiffusion/data/upscaler, here pointed at a tiny export)."""

import json

import numpy as np
import pytest
from PIL import Image

from latentdiffusion.cli.main import main
from latentdiffusion.pipelines import loading

# The shapes-upscaler preset shrunk to seconds: f = 4 (three autoencoder levels), 32x32 images.
TINY = {
    "preset": "shapes-upscaler",
    "autoencoder": "random",
    "model": {
        "unet": {
            "model_channels": 16,
            "channel_mult": [1, 2],
            "attention_levels": [1],
            "num_heads": 2,
            "context_dim": 16,
            "norm_groups": 8,
        },
        "autoencoder": {"block_channels": [8, 16, 16], "norm_groups": 8},
        "text_encoder": {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32},
    },
    "data": {"resolution": 32, "holdout": 2},
    "sample": {"steps": 2},
    "batch_size": 2,
    "max_steps": 2,
    "checkpoint_every": 0,
}


@pytest.fixture
def low_res(tmp_path):
    path = tmp_path / "low.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)
    return path


def shipped_at(monkeypatch, folder) -> None:
    original = loading.shipped_model_dir
    monkeypatch.setattr(
        loading, "shipped_model_dir", lambda name: folder if name == "upscaler" else original(name)
    )


def test_train_upscaler_then_upscale_without_model(tmp_path, low_res, monkeypatch, capsys):
    config, run = tmp_path / "tiny.json", tmp_path / "run"
    config.write_text(json.dumps(TINY))
    assert main(["train-upscaler", str(config), "-o", str(run), "--quiet"]) == 0
    assert "eval/psnr" in capsys.readouterr().out
    saved = json.loads((run / "config.json").read_text())
    assert saved["task"] == "upscaler" and saved["model"]["unet"]["in_channels"] == 7
    shipped_at(monkeypatch, run / "export")
    out = tmp_path / "up.png"
    assert main(["upscale", str(low_res), "-o", str(out), "--steps", "2", "--quiet"]) == 0
    assert Image.open(out).size == (32, 32)
    # --resume reads the run's own config; raising max_steps continues it.
    assert main(["train-upscaler", "-o", str(run), "--resume", "--max_steps=3", "--quiet"]) == 0
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-2])["step"] == 3


def test_upscale_without_an_installed_upscaler_says_how_to_get_one(tmp_path, low_res, monkeypatch, capsys):
    shipped_at(monkeypatch, tmp_path / "not-installed")
    assert main(["upscale", str(low_res), "-o", str(tmp_path / "up.png"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no upscaler is installed yet" in err and "ldm train-upscaler" in err and "Traceback" not in err


def test_show_config_names_the_task_and_the_shipped_autoencoder(capsys):
    assert main(["train-upscaler", "--show-config"]) == 0
    config = json.loads(capsys.readouterr().out)
    assert config["task"] == "upscaler" and config["autoencoder"] == "default"
    assert config["model"]["unet"]["num_class_embeds"] == 351


def test_the_upscaler_preset_belongs_to_its_own_command(tmp_path, capsys):
    assert main(["train", "--preset", "shapes-upscaler", "-o", str(tmp_path / "run"), "--quiet"]) == 2
    assert "trains the upscaler, not the diffusion" in capsys.readouterr().err
