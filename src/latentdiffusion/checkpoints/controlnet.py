"""Loading ControlNet files: diffusers ControlNet folders (``config.json`` + ``diffusion_pytorch_model.*``)
and original single files (cldm's ``control_model.*`` keys, or the same without the prefix), through the
key tables of ``unet_keys`` / ``original_keys``; configs are checked by ``bounds``. ``save_controlnet``
writes the diffusers folder (``ldm train-controlnet``'s export).

A U-Net with coordinate channels (``UNetConfig.coordinate_channels``, not in diffusers) is recorded as
``"coordinate_channels": true`` in ``config.json``; diffusers cannot run such a ControlNet."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from latentdiffusion.checkpoints.bounds import validate_controlnet_config
from latentdiffusion.checkpoints.detect import detect_unet
from latentdiffusion.checkpoints.diffusers_configs import unet_from_diffusers, unet_to_diffusers
from latentdiffusion.checkpoints.diffusers_folder import read_json, read_weights, write_json
from latentdiffusion.checkpoints.keymap import load_exact_state
from latentdiffusion.checkpoints.layout import read_layout
from latentdiffusion.checkpoints.original_keys import CONTROLNET_PREFIX, UNET_PREFIX, controlnet_layout
from latentdiffusion.checkpoints.safe_io import read_state_dict, save_safetensors
from latentdiffusion.checkpoints.unet_keys import controlnet_from_diffusers, controlnet_to_diffusers
from latentdiffusion.config import ControlNetConfig
from latentdiffusion.errors import UserError
from latentdiffusion.models.controlnet import ControlNet

WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
# keys of a UNet2DConditionModel config that a ControlNetModel config does not have
UNET_ONLY_KEYS = ("up_block_types", "out_channels", "conv_out_kernel", "sample_size", "center_input_sample")


def load_controlnet(source: str | Path, dtype: torch.dtype | None = None) -> ControlNet:
    """A ControlNet from a diffusers ControlNet folder or an original single file."""
    path = Path(source)
    if path.is_dir():
        return _load_folder(path, dtype)
    if not path.is_file():
        raise UserError(f"ControlNet {source} not found (expected a diffusers ControlNet folder or a file)")
    return _load_single_file(path, dtype)


def _load_folder(folder: Path, dtype: torch.dtype | None) -> ControlNet:
    config = controlnet_from_diffusers_config(read_json(folder / "config.json"), str(folder))
    state = controlnet_from_diffusers(read_weights(folder, WEIGHT_NAMES))
    return _build(config, state, str(folder), dtype)


def controlnet_from_diffusers_config(config: dict[str, Any], source: str) -> ControlNetConfig:
    """Our ControlNetConfig from a diffusers ``ControlNetModel`` config.json."""
    if config.get("_class_name", "ControlNetModel") != "ControlNetModel":
        raise UserError(f"{source}: a {config['_class_name']}, not a ControlNetModel")
    if config.get("global_pool_conditions", False):
        raise UserError(f"{source}: ControlNets with global_pool_conditions (shuffle) are not supported yet")
    if config.get("controlnet_conditioning_channel_order", "rgb") != "rgb":
        raise UserError(f"{source}: only rgb conditioning_channel_order is supported")
    try:
        unet = unet_from_diffusers(config)
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(f"{source}: unsupported ControlNet config: {error}") from None
    unet = replace(unet, coordinate_channels=config.get("coordinate_channels", False) is True)
    hint = config.get("conditioning_embedding_out_channels") or [16, 32, 96, 256]
    control = ControlNetConfig(
        unet, config.get("conditioning_channels", 3), tuple(hint) if isinstance(hint, list) else hint
    )
    return validate_controlnet_config(control, source)


def _load_single_file(path: Path, dtype: torch.dtype | None) -> ControlNet:
    state = read_state_dict(path)
    prefix = CONTROLNET_PREFIX if any(k.startswith(CONTROLNET_PREFIX) for k in state) else ""
    if f"{prefix}input_hint_block.0.weight" not in state:
        raise UserError(f"{path}: not a ControlNet file (no {prefix}input_hint_block.0.weight)")
    config = detect_controlnet({k[len(prefix) :]: tuple(v.shape) for k, v in state.items()}, str(path))
    return _build(config, read_layout(state, controlnet_layout(config, prefix)), str(path), dtype)


def detect_controlnet(shapes: dict[str, tuple[int, ...]], source: str) -> ControlNetConfig:
    """The ControlNet's architecture from unprefixed original shapes: the encoder as ``detect_unet``
    reads a U-Net's (it looks at the output head only for out_channels, which a ControlNet lacks), the
    hint encoder from ``input_hint_block.N`` (convs at even N; a stride-2 conv starts each stage)."""
    unet_shapes = {UNET_PREFIX + k: v for k, v in shapes.items()}
    in_channels = shapes["input_blocks.0.0.weight"][1] if "input_blocks.0.0.weight" in shapes else 4
    unet_shapes[UNET_PREFIX + "out.2.weight"] = (in_channels,)
    unet = detect_unet(unet_shapes, source)
    convs = sorted(
        int(k.split(".")[1]) for k in shapes if k.startswith("input_hint_block.") and k.endswith("weight")
    )
    first = shapes["input_hint_block.0.weight"]
    stages = [first[0]] + [shapes[f"input_hint_block.{n}.weight"][0] for n in convs[2:-1:2]]
    config = ControlNetConfig(unet, first[1], tuple(stages))
    return validate_controlnet_config(config, source)


def _build(config: ControlNetConfig, state: dict, source: str, dtype: torch.dtype | None) -> ControlNet:
    network = ControlNet(config)
    load_exact_state(network, state, source, "the ControlNet its config describes")
    return network.to(dtype) if dtype is not None else network


def controlnet_to_diffusers_config(config: ControlNetConfig) -> dict[str, Any]:
    """diffusers' ``ControlNetModel`` config.json of our ControlNetConfig (inverse of
    ``controlnet_from_diffusers_config``)."""
    data = {k: v for k, v in unet_to_diffusers(config.unet, 64).items() if k not in UNET_ONLY_KEYS}
    data |= {
        "_class_name": "ControlNetModel",
        "conditioning_channels": config.hint_in_channels,
        "conditioning_embedding_out_channels": list(config.hint_channels),
        "controlnet_conditioning_channel_order": "rgb",
        "global_pool_conditions": False,
    }
    if config.unet.coordinate_channels:
        data["coordinate_channels"] = True
    return data


def save_controlnet(network: ControlNet, folder: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write ``network`` as a diffusers ControlNet folder (weights first, config.json last, each written
    atomically); ``dtype`` casts the floating-point weights (e.g. torch.float16 to ship it small)."""
    folder = Path(folder)
    state = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
        for k, v in network.state_dict().items()
    }
    save_safetensors(controlnet_to_diffusers(state), folder / WEIGHT_NAMES[0])
    write_json(folder / "config.json", controlnet_to_diffusers_config(network.control_config))
    return folder
