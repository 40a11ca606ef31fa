"""The random-weight models ``benchmarks/cpu.py`` measures, written once per run into its work folder.

- ``sd15/ours`` and ``sd15/diffusers``: the SD 1.5 architecture (default initialisation, seed 0) as our
  native folder and as a diffusers folder holding the same weights;
- ``sd21/...``: the same for the SD 2.1 architecture, the U-Net SD-Turbo distils into (one-step images);
- ``taesd/taesd_decoder.safetensors`` (+ encoder) and ``taesd/taesd_diffusers``: a random tiny
  autoencoder (TAESD's SD 1.x/2.x shapes) in the original layout and as a diffusers ``AutoencoderTiny``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TAESD = "taesd"


def write_pair(folder: Path, preset: str) -> None:
    """Random weights of ``preset`` as our native folder and as a diffusers folder."""
    import latentdiffusion as ld

    pipe = ld.load(f"preset:{preset}")
    pipe.save(folder / preset / "ours", format="native")
    pipe.save(folder / preset / "diffusers", format="diffusers")


def write_taesd(folder: Path) -> Path:
    """A random TAESD in both layouts under ``folder/taesd``; returns the decoder file."""
    from safetensors.torch import save_file

    from latentdiffusion.checkpoints.tiny_autoencoder_keys import to_diffusers, to_original
    from latentdiffusion.models.tiny_autoencoder import TinyAutoencoder, TinyAutoencoderConfig

    torch.manual_seed(0)
    state = TinyAutoencoder(TinyAutoencoderConfig()).state_dict()
    target = folder / TAESD
    (target / "taesd_diffusers").mkdir(parents=True, exist_ok=True)
    for part, weights in to_original(state).items():
        save_file({k: v.contiguous() for k, v in weights.items()}, target / f"taesd_{part}.safetensors")
    diffusers_state = {k: v.contiguous() for k, v in to_diffusers(state).items()}
    save_file(diffusers_state, target / "taesd_diffusers" / "diffusion_pytorch_model.safetensors")
    config = {"_class_name": "AutoencoderTiny", "latent_channels": 4, "scaling_factor": 1.0}
    (target / "taesd_diffusers" / "config.json").write_text(json.dumps(config))
    return target / "taesd_decoder.safetensors"


def write_models(folder: Path, parts: list[str]) -> None:
    """``parts``: preset names and/or "taesd"."""
    for part in parts:
        if part == TAESD:
            write_taesd(folder)
        else:
            write_pair(folder, part)
