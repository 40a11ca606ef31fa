"""``ldm generate --vae tiny PATH``: the image is decoded by the tiny autoencoder; bad kinds and misfits
are one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from latentdiffusion.checkpoints.tiny_autoencoder_keys import to_diffusers
from latentdiffusion.cli.main import main
from latentdiffusion.models.tiny_autoencoder import TinyAutoencoder, TinyAutoencoderConfig


def write_taesd_folder(folder, latent_channels: int = 4):
    """A random AutoencoderTiny folder (diffusers layout) with the tiny preset's latent factor (2)."""
    config = TinyAutoencoderConfig(latent_channels, (8, 8), (1, 1), (8, 8), (1, 1))
    torch.manual_seed(0)
    state = to_diffusers(TinyAutoencoder(config).state_dict())
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "diffusion_pytorch_model.safetensors")
    (folder / "config.json").write_text(
        json.dumps({"_class_name": "AutoencoderTiny", "latent_channels": latent_channels})
    )
    return folder


@pytest.fixture(scope="module")
def taesd_folder(tmp_path_factory):
    return write_taesd_folder(tmp_path_factory.mktemp("taesd"))


def run(args: list[str]) -> int:
    try:
        return main(args)
    except SystemExit as exit_info:
        return int(exit_info.code)


def test_generate_with_a_tiny_vae_decodes_with_it(tmp_path, taesd_folder):
    common = [
        "generate",
        "a cat",
        "--model",
        "preset:tiny",
        "--steps",
        "2",
        "--sampler",
        "lcm",
        "--seed",
        "1",
    ]
    assert run([*common, "--output", str(tmp_path / "full.png")]) == 0
    assert run([*common, "--vae", "tiny", str(taesd_folder), "--output", str(tmp_path / "tiny.png")]) == 0
    full, tiny = (
        np.asarray(Image.open(tmp_path / name), dtype=np.float64) for name in ("full.png", "tiny.png")
    )
    assert full.shape == tiny.shape and np.abs(full - tiny).max() > 10  # another decoder made it


def test_bad_vae_kind_and_misfit_are_one_line_errors(tmp_path, taesd_folder, capsys):
    out = str(tmp_path / "x.png")
    code = run(
        ["generate", "a", "--model", "preset:tiny", "--vae", "full", str(taesd_folder), "--output", out]
    )
    err = capsys.readouterr().err
    assert code == 2 and "--vae takes 'tiny PATH'" in err and len(err.strip().splitlines()) == 1
    write_taesd_folder(tmp_path / "taesd3", 16)
    code = run(
        [
            "generate",
            "a",
            "--model",
            "preset:tiny",
            "--vae",
            "tiny",
            str(tmp_path / "taesd3"),
            "--output",
            out,
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "16-channel latents" in err and len(err.strip().splitlines()) == 1
