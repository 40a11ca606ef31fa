"""Tiny autoencoders (TAESD): parity with diffusers' AutoencoderTiny in every file layout, and bad files."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from latentdiffusion.checkpoints.tiny_autoencoder_keys import load_tiny_autoencoder, to_diffusers, to_original
from latentdiffusion.errors import UserError

SHAPES = {  # small random TAESDs: SD-style (4 channels, f = 8) and SD3-style (16 channels)
    "taesd": dict(latent_channels=4, blocks=((1, 2, 1, 1), (1, 1, 2, 1)), width=8),
    "taesd3": dict(latent_channels=16, blocks=((1, 1, 1, 1), (1, 1, 1, 1)), width=12),
}


def diffusers_tiny(latent_channels: int, blocks, width: int, seed: int = 0):
    from diffusers import AutoencoderTiny

    stages = len(blocks[0])
    model = AutoencoderTiny(
        encoder_block_out_channels=(width,) * stages,
        decoder_block_out_channels=(width,) * stages,
        num_encoder_blocks=blocks[0],
        num_decoder_blocks=blocks[1],
        latent_channels=latent_channels,
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model.eval()


def inputs(latent_channels: int, size: int = 16):
    g = torch.Generator().manual_seed(1)
    latents = 1.5 * torch.randn(2, latent_channels, size // 8, size // 8, generator=g)
    images = torch.rand(2, 3, size, size, generator=g) * 2 - 1
    return latents, images


def assert_same_as_diffusers(ours, theirs, latent_channels: int) -> None:
    latents, images = inputs(latent_channels)
    with torch.no_grad():
        torch.testing.assert_close(
            ours.from_latent(latents), theirs.decode(latents).sample, rtol=0, atol=1e-5
        )
        torch.testing.assert_close(ours.to_latent(images), theirs.encode(images).latents, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", list(SHAPES))
def test_diffusers_folder_matches_autoencoder_tiny(tmp_path, kind):
    theirs = diffusers_tiny(**SHAPES[kind])
    theirs.save_pretrained(tmp_path / kind)
    ours = load_tiny_autoencoder(tmp_path / kind)
    assert ours.config.latent_channels == SHAPES[kind]["latent_channels"] and ours.factor == 8
    assert_same_as_diffusers(ours, theirs, SHAPES[kind]["latent_channels"])
    assert set(to_diffusers(ours.state_dict())) == set(theirs.state_dict())


@pytest.mark.parametrize("suffix", ["safetensors", "pth"])
def test_original_files_match_autoencoder_tiny(tmp_path, suffix):
    """taesd_decoder.* (clamp at index 0: its first convolution is 1.weight) and taesd_encoder.* beside it."""
    theirs = diffusers_tiny(**SHAPES["taesd"], seed=3)
    parts = to_original(theirs.state_dict())
    assert "1.weight" in parts["decoder"] and "0.weight" not in parts["decoder"]
    assert "0.weight" in parts["encoder"] and "1.conv.0.weight" in parts["encoder"]
    for part, state in parts.items():
        path = tmp_path / f"taesd_{part}.{suffix}"
        state = {k: v.contiguous() for k, v in state.items()}
        save_file(state, path) if suffix == "safetensors" else torch.save(state, path)
    ours = load_tiny_autoencoder(tmp_path / f"taesd_decoder.{suffix}")
    assert ours.encoder is not None  # found beside the decoder
    assert_same_as_diffusers(ours, theirs, 4)


def test_combined_files_load(tmp_path):
    """ComfyUI's taesd_encoder./taesd_decoder. prefixes with its vae_scale/vae_shift, and the reference
    TAESD module's encoder./decoder. keys."""
    theirs = diffusers_tiny(**SHAPES["taesd3"], seed=4)
    parts = to_original(theirs.state_dict())
    comfy = {f"taesd_{part}.{k}": v for part, state in parts.items() for k, v in state.items()}
    save_file(
        {**comfy, "vae_scale": torch.tensor(1.5305), "vae_shift": torch.tensor(0.0609)}, tmp_path / "a.sft"
    )
    plain = {f"{part}.{k}": v for part, state in parts.items() for k, v in state.items()}
    save_file(plain, tmp_path / "b.safetensors")
    for name in ("a.sft", "b.safetensors"):
        assert_same_as_diffusers(load_tiny_autoencoder(tmp_path / name), theirs, 16)


def test_decoder_alone_decodes_and_refuses_to_encode(tmp_path):
    theirs = diffusers_tiny(**SHAPES["taesd"], seed=5)
    save_file(to_original(theirs.state_dict())["decoder"], tmp_path / "decoder.safetensors")
    ours = load_tiny_autoencoder(tmp_path / "decoder.safetensors")
    latents, images = inputs(4)
    with torch.no_grad():
        torch.testing.assert_close(
            ours.from_latent(latents), theirs.decode(latents).sample, rtol=0, atol=1e-5
        )
    with pytest.raises(UserError, match="only a decoder"):
        ours.to_latent(images)


def test_bad_files_are_refused(tmp_path):
    theirs = diffusers_tiny(**SHAPES["taesd"], seed=6)
    parts = to_original(theirs.state_dict())
    cases = {
        "encoder_only.safetensors": (parts["encoder"], "only a TAESD encoder"),
        "other.safetensors": ({"model.diffusion_model.x.weight": torch.zeros(2)}, "not a tiny autoencoder"),
        "no_block.safetensors": ({"1.weight": torch.zeros(8, 4, 3, 3), "3.bias": torch.zeros(3)}, "neither"),
        "nan.safetensors": (
            {**parts["decoder"], "1.weight": torch.full_like(parts["decoder"]["1.weight"], float("nan"))},
            "NaN",
        ),
    }
    bad_shape = dict(parts["decoder"])
    bad_shape["3.conv.2.weight"] = torch.zeros(8, 8, 1, 1)
    cases["shape.safetensors"] = (bad_shape, "does not fit")
    for name, (state, message) in cases.items():
        save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / name)
        with pytest.raises(UserError, match=message):
            load_tiny_autoencoder(tmp_path / name)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError):
        load_tiny_autoencoder(tmp_path / "junk.pth")
    with pytest.raises(UserError, match="does not exist"):
        load_tiny_autoencoder(tmp_path / "missing")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    with pytest.raises(UserError, match="AutoencoderTiny"):
        load_tiny_autoencoder(tmp_path / "folder")
