"""Tiny autoencoder (TAESD) files: the original layouts and diffusers' ``AutoencoderTiny``, read into
``models.tiny_autoencoder.TinyAutoencoder`` and fitted to a model family.

Layouts (the shape of the network is read from the weights, so every TAESD width and depth loads):

- original ``taesd_decoder.{safetensors,pth}`` / ``taesd_encoder.*`` (also ``taesdxl_*``, ``taesd3_*``,
  ``taef1_*``): one ``nn.Sequential`` each, keys ``<index>.weight`` and ``<index>.conv.<0|2|4>.weight``;
  the decoder's index 0 is its parameter-free clamp, so its first convolution is ``1.weight``. A decoder
  file loads its encoder from beside it when one is there (``*decoder*`` -> ``*encoder*``).
- both in one file under ``encoder.`` / ``decoder.`` (the reference ``TAESD`` module) or ComfyUI's
  ``taesd_encoder.`` / ``taesd_decoder.`` (its ``vae_scale`` / ``vae_shift`` entries are ignored: the
  latents here are already in diffusion space).
- a diffusers ``AutoencoderTiny`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors``) or
  its weight file: ``encoder.layers.<i>`` is original index i, ``decoder.layers.<i>`` is index i + 1.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch

from latentdiffusion.checkpoints.safe_io import read_json_file, read_state_dict
from latentdiffusion.errors import UserError
from latentdiffusion.models.tiny_autoencoder import TinyAutoencoder, TinyAutoencoderConfig

StateDict = dict[str, torch.Tensor]
DIFFUSERS_CONFIG = "config.json"
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
IGNORED = ("vae_scale", "vae_shift")  # ComfyUI's latent scale/shift beside its TAESD weights
PREFIXES = {  # prefix -> part, for files that hold both halves
    "encoder.layers.": "encoder",
    "decoder.layers.": "decoder",
    "taesd_encoder.": "encoder",
    "taesd_decoder.": "decoder",
    "encoder.": "encoder",
    "decoder.": "decoder",
}
DECODER_OFFSET = 1  # the original decoder's index of a diffusers ``decoder.layers`` index, minus it
MAX_LAYERS = 256
_INDEXED = re.compile(r"(\d+)\.(.+)")


# ---------------------------------------------------------------------------------------------------
# layouts -> the original one


def _shift_indices(state: Mapping[str, torch.Tensor], offset: int) -> StateDict:
    shifted = {}
    for key, tensor in state.items():
        match = _INDEXED.fullmatch(key)
        if match is None:
            raise UserError(f"unexpected tiny autoencoder key {key!r}")
        shifted[f"{int(match[1]) + offset}.{match[2]}"] = tensor
    return shifted


def split_parts(state: Mapping[str, torch.Tensor], source: str) -> dict[str, StateDict]:
    """{"encoder": ..., "decoder": ...} in the original layout (either may be absent)."""
    state = {k: v for k, v in state.items() if k not in IGNORED}
    if not state:
        raise UserError(f"{source} holds no tiny autoencoder weights")
    if all(_INDEXED.fullmatch(key) for key in state):  # one bare half
        return {"encoder" if "0.weight" in state else "decoder": dict(state)}
    parts: dict[str, StateDict] = {}
    for key, tensor in state.items():
        prefix = next((p for p in PREFIXES if key.startswith(p)), None)
        if prefix is None:
            raise UserError(f"{source} is not a tiny autoencoder (TAESD) file: unexpected key {key!r}")
        parts.setdefault(prefix, {})[key.removeprefix(prefix)] = tensor
    merged: dict[str, StateDict] = {}
    for prefix, part in parts.items():
        offset = DECODER_OFFSET if prefix == "decoder.layers." else 0
        merged.setdefault(PREFIXES[prefix], {}).update(_shift_indices(part, offset))
    return merged


def to_original(state: Mapping[str, torch.Tensor]) -> dict[str, StateDict]:
    """Our (or diffusers') state dict -> the original ``taesd_encoder`` / ``taesd_decoder`` dicts."""
    return split_parts(state, "state dict")


def to_diffusers(state: Mapping[str, torch.Tensor]) -> StateDict:
    """Our state dict -> diffusers ``AutoencoderTiny`` keys."""
    out = {}
    for part, weights in to_original(state).items():
        offset = -DECODER_OFFSET if part == "decoder" else 0
        out.update({f"{part}.layers.{k}": v for k, v in _shift_indices(weights, offset).items()})
    return out


# ---------------------------------------------------------------------------------------------------
# the network's shape from its weights


def _layer_kinds(part: StateDict, source: str) -> list[tuple[str, torch.Tensor]]:
    """(kind, first conv weight) of each indexed layer with weights: "conv" or "block"."""
    indices = sorted({int(_INDEXED.fullmatch(key)[1]) for key in part})
    if len(indices) > MAX_LAYERS:
        raise UserError(f"{source}: {len(indices)} layers is more than any tiny autoencoder has")
    kinds = []
    for i in indices:
        block, conv = part.get(f"{i}.conv.0.weight"), part.get(f"{i}.weight")
        weight = block if block is not None else conv
        if weight is None or weight.ndim != 4:
            raise UserError(
                f"{source} is not a tiny autoencoder (TAESD) file: layer {i} is neither a "
                "convolution nor a block"
            )
        kinds.append(("block" if block is not None else "conv", weight))
    return kinds


def _encoder_shape(part: StateDict, source: str) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """(widths, blocks per stage, latent channels): stages start at each convolution but the last."""
    kinds = _layer_kinds(part, source)
    if len(kinds) < 2 or kinds[0][0] != "conv" or kinds[-1][0] != "conv":
        raise UserError(f"{source}: not a TAESD encoder (it must start and end with a convolution)")
    widths: list[int] = []
    blocks: list[int] = []
    for kind, weight in kinds[:-1]:
        if kind == "conv":
            widths.append(weight.shape[0])
            blocks.append(0)
        else:
            blocks[-1] += 1
    return tuple(widths), tuple(blocks), kinds[-1][1].shape[0]


def _decoder_shape(part: StateDict, source: str) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """(widths, blocks per stage, latent channels): each stage's blocks end at a convolution."""
    kinds = _layer_kinds(part, source)
    if len(kinds) < 2 or kinds[0][0] != "conv" or kinds[-1][0] != "conv":
        raise UserError(f"{source}: not a TAESD decoder (it must start and end with a convolution)")
    widths: list[int] = []
    blocks: list[int] = [0]
    for kind, weight in kinds[1:]:
        if kind == "block":
            blocks[-1] += 1
        else:
            widths.append(weight.shape[1])
            blocks.append(0)
    return tuple(widths), tuple(blocks[:-1]), kinds[0][1].shape[1]


def infer_config(
    parts: Mapping[str, StateDict], source: str, upsampling_factor: int = 2
) -> TinyAutoencoderConfig:
    if "decoder" not in parts:
        raise UserError(
            f"{source} holds only a TAESD encoder; give the decoder file (taesd_decoder.*), with the "
            "encoder beside it to encode images too"
        )
    widths, blocks, latent = _decoder_shape(parts["decoder"], source)
    config = TinyAutoencoderConfig(
        latent_channels=latent,
        decoder_channels=widths,
        decoder_blocks=blocks,
        upsampling_factor=upsampling_factor,
    )
    if "encoder" in parts:
        e_widths, e_blocks, e_latent = _encoder_shape(parts["encoder"], source)
        if e_latent != latent:
            raise UserError(
                f"{source}: the TAESD encoder makes {e_latent}-channel latents but the decoder takes {latent}"
            )
        config = TinyAutoencoderConfig(latent, e_widths, e_blocks, widths, blocks, upsampling_factor)
    return config


# ---------------------------------------------------------------------------------------------------
# files


def _read_folder(folder: Path) -> tuple[StateDict, int]:
    config = read_json_file(folder / DIFFUSERS_CONFIG)
    if not isinstance(config, dict) or config.get("_class_name", "AutoencoderTiny") != "AutoencoderTiny":
        raise UserError(
            f"{folder} is not a diffusers AutoencoderTiny folder (config.json names another class)"
        )
    for name, allowed in (("act_fn", "relu"), ("upsample_fn", "nearest")):
        if config.get(name, allowed) != allowed:
            raise UserError(f"{folder}: {name} {config[name]!r} is not supported (only {allowed!r})")
    factor = config.get("upsampling_scaling_factor", 2)
    if isinstance(factor, bool) or not isinstance(factor, int) or not 1 <= factor <= 8:
        raise UserError(f"{folder}: upsampling_scaling_factor must be a whole number 1..8, got {factor!r}")
    weights = next((folder / name for name in DIFFUSERS_WEIGHTS if (folder / name).is_file()), None)
    if weights is None:
        raise UserError(f"{folder} has no weights ({' or '.join(DIFFUSERS_WEIGHTS)})")
    return read_state_dict(weights), factor


def _sibling_encoder(path: Path) -> Path | None:
    """taesd_decoder.safetensors -> taesd_encoder.safetensors (or another suffix), if it exists."""
    if "decoder" not in path.name:
        return None
    stem = path.name.replace("decoder", "encoder")
    candidates = [path.with_name(stem)] + [
        path.with_name(Path(stem).stem + suffix) for suffix in (".safetensors", ".pth", ".pt")
    ]
    return next((c for c in candidates if c.is_file()), None)


def read_tiny_autoencoder(path: str | Path) -> tuple[dict[str, StateDict], int]:
    """The original-layout parts of a TAESD file or folder, and its decoder's upsampling factor."""
    path = Path(path)
    source = str(path)
    if not path.exists():
        raise UserError(f"tiny autoencoder path {source!r} does not exist")
    if path.is_dir():
        if not (path / DIFFUSERS_CONFIG).is_file():
            raise UserError(
                f"{source} is a folder without config.json: not a diffusers AutoencoderTiny folder"
            )
        state, factor = _read_folder(path)
        return split_parts(state, source), factor
    parts = split_parts(read_state_dict(path), source)
    encoder = _sibling_encoder(path) if "encoder" not in parts else None
    if encoder is not None:
        parts.update(
            {k: v for k, v in split_parts(read_state_dict(encoder), str(encoder)).items() if k == "encoder"}
        )
    return parts, 2


def load_tiny_autoencoder(path: str | Path, dtype: torch.dtype | None = None) -> TinyAutoencoder:
    """A ``TinyAutoencoder`` from any of the layouts of the module docstring (float32 unless ``dtype``)."""
    parts, factor = read_tiny_autoencoder(path)
    config = infer_config(parts, str(path), factor)
    model = TinyAutoencoder(config, with_encoder="encoder" in parts)
    state = {f"{part}.{key}": tensor for part, weights in parts.items() for key, tensor in weights.items()}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # a tensor of the wrong shape
        raise UserError(f"{path} does not fit the TAESD layout its weights describe: {error}") from None
    if missing or unexpected:
        raise UserError(
            f"{path} does not fit the TAESD layout its weights describe: "
            f"missing {sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]}"
        )
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UserError(f"{path}: weight {name} holds NaN or Inf values")
    return model.to(dtype or torch.float32).eval().requires_grad_(False)
