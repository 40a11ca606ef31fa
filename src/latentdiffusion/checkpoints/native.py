"""The project's own model format: a folder with ``model.safetensors`` (every network's weights, keys
prefixed with the network's role: ``unet.``, ``autoencoder.``, ``text_encoder.``, ...) and
``latentdiffusion.json`` (the exact ``ModelConfig``), plus an optional trained preview decoder and an
optional bundled refiner: a ``refiner/`` folder in the same format (a second model, e.g. a low-noise
expert, that finishes each text-to-image latent) with the part of the schedule the model runs before it
as ``refiner_switch`` in the JSON."""

from __future__ import annotations

import json
import warnings
from collections.abc import Collection
from pathlib import Path

import torch

from latentdiffusion.checkpoints.assemble import assemble_components, check_shapes_first, read_dtype
from latentdiffusion.checkpoints.bounds import validate_model_config
from latentdiffusion.checkpoints.keymap import strip_prefix
from latentdiffusion.checkpoints.safe_io import (
    file_kind,
    meta_tensors,
    read_json_file,
    read_safetensors_header,
    read_state_dict,
    save_safetensors,
)
from latentdiffusion.components import Components
from latentdiffusion.config import ModelConfig
from latentdiffusion.errors import UserError
from latentdiffusion.families import family_of
from latentdiffusion.files import atomic_write

NATIVE_CONFIG = "latentdiffusion.json"
NATIVE_WEIGHTS = "model.safetensors"
REFINER_FOLDER = "refiner"
FORMAT_VERSION = 1


def role_prefix(role: str) -> str:
    """The key prefix of a network's tensors in ``model.safetensors``."""
    return role + "."


def is_native_folder(path: Path) -> bool:
    return (path / NATIVE_CONFIG).is_file()


def _read_meta(path: Path) -> dict:
    meta = read_json_file(path / NATIVE_CONFIG)
    if (
        not isinstance(meta, dict)
        or meta.get("format") != "latentdiffusion"
        or meta.get("version") != FORMAT_VERSION
    ):
        raise UserError(f"{path / NATIVE_CONFIG} is not a latentdiffusion model config (version 1)")
    return meta


def _read_config(path: Path, meta: dict) -> ModelConfig:
    try:
        config = ModelConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise UserError(f"{path / NATIVE_CONFIG} has an invalid config: {error}") from None
    validate_model_config(config, str(path / NATIVE_CONFIG))
    return config


def read_native_config(path: Path) -> ModelConfig:
    """The checked ``ModelConfig`` of the native model folder ``path``, without reading its weights."""
    return _read_config(path, _read_meta(path))


def bundled_refiner(path: Path) -> tuple[Path, float] | None:
    """The refiner folder a native model folder bundles and the part of the schedule (0..1) the model
    runs before it, or None when it bundles none."""
    meta = _read_meta(path)
    if "refiner_switch" not in meta:
        return None
    switch = meta["refiner_switch"]
    if isinstance(switch, bool) or not isinstance(switch, int | float) or not 0 < switch < 1:
        raise UserError(f"{path / NATIVE_CONFIG}: refiner_switch must be a number in (0, 1), got {switch!r}")
    folder = path / REFINER_FOLDER
    if not is_native_folder(folder):
        raise UserError(f"{path} names a refiner but {folder / NATIVE_CONFIG} is missing")
    model, refiner = _read_config(path, meta), _read_config(folder, _read_meta(folder))
    if refiner.unet != model.unet or refiner.family != model.family:  # refused before any weight is read
        raise UserError(f"the refiner bundled in {path} is not of the model's architecture")
    return folder, float(switch)


def load_native(path: Path, *, dtype: torch.dtype | None = None, without: Collection[str] = ()) -> Components:
    """Read a folder written by ``save_native`` (weights memory-mapped, networks built on meta), without
    the optional networks ``without``."""
    meta = _read_meta(path)
    config = _read_config(path, meta)
    config = family_of(config).without_roles(config, without, str(path))
    if not (path / NATIVE_WEIGHTS).is_file():
        raise UserError(f"cannot read weights {path / NATIVE_WEIGHTS}: the file is missing")
    family, weights = family_of(config), path / NATIVE_WEIGHTS
    modules = None
    if file_kind(weights) == "safetensors":  # names and shapes decide before any weight is read
        header = meta_tensors(read_safetensors_header(weights))
        shapes = {role: strip_prefix(header, role_prefix(role)) for role in family.model_roles(config)}
        modules = check_shapes_first(config, shapes, str(weights))
    state = read_state_dict(weights, read_dtype(dtype))
    states = {role: strip_prefix(state, role_prefix(role)) for role in family.model_roles(config)}
    name = meta.get("name") if isinstance(meta.get("name"), str) and meta.get("name") else config.name
    components = assemble_components(
        config, states, name=name, source=str(weights), dtype=dtype, modules=modules
    )
    components.preview_decoder = _load_preview_decoder(path)
    return components


def _load_preview_decoder(folder: Path) -> torch.nn.Module | None:
    """The folder's trained preview decoder, if it has one (``ldm train-preview``); previews are optional,
    so a broken file is reported and skipped rather than refusing the model."""
    from latentdiffusion.models.preview_decoder import PREVIEW_FILE, load_preview_decoder

    if not (folder / PREVIEW_FILE).is_file():
        return None
    try:
        return load_preview_decoder(folder / PREVIEW_FILE)
    except Exception as error:  # any defect of an optional file only disables previews
        warnings.warn(f"ignoring {folder / PREVIEW_FILE}: {error}", stacklevel=2)
        return None


def save_native(
    components: Components,
    path: Path,
    *,
    dtype: torch.dtype | None = None,
    refiner: tuple[Components, float] | None = None,
) -> None:
    """safetensors weights plus a JSON config, each written atomically; ``refiner`` (its components and
    switch) is bundled in the folder's ``refiner/``."""
    state = {}
    for role, module in components.modules.items():
        for key, value in module.state_dict().items():
            cast = dtype is not None and value.is_floating_point()
            state[role_prefix(role) + key] = value.to(dtype) if cast else value
    meta = {
        "format": "latentdiffusion",
        "version": FORMAT_VERSION,
        "name": components.name,
        "config": components.config.to_dict(),
    }
    path = Path(path)
    if refiner is not None:
        save_native(refiner[0], path / REFINER_FOLDER, dtype=dtype)
        meta["refiner_switch"] = refiner[1]
    save_safetensors(state, path / NATIVE_WEIGHTS)
    atomic_write(path / NATIVE_CONFIG, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2)))
    if components.preview_decoder is not None:
        from latentdiffusion.models.preview_decoder import PREVIEW_FILE, save_preview_decoder

        save_preview_decoder(components.preview_decoder, path / PREVIEW_FILE)
