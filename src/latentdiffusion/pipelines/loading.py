"""Resolve a model source to a ``Pipeline``; save a pipeline in the project's own format.

Sources: ``"default"`` (the model shipped in the package), ``"upscaler"`` (the shipped x4 upscaler of
the default model's world), ``"preset:NAME"`` (random weights of a named architecture, for tests and
benchmarks), a folder written by ``Pipeline.save`` (safetensors plus a JSON config), and the public
Stable Diffusion layouts handled by ``latentdiffusion.checkpoints``: single files (``.safetensors``,
``.ckpt``, ``.pt``, ``.bin``; recognised by content) and diffusers folders (``model_index.json``).
Saving writes any of the three (``FORMATS``).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from latentdiffusion.config import ModelConfig, get_preset
from latentdiffusion.errors import UserError
from latentdiffusion.files import atomic_write
from latentdiffusion.pipelines.components import Components, build_components, make_tokenizer
from latentdiffusion.pipelines.pipeline import Pipeline

NATIVE_CONFIG = "latentdiffusion.json"
NATIVE_WEIGHTS = "model.safetensors"
FORMAT_VERSION = 1
PREFIXES = {"unet": "unet.", "autoencoder": "autoencoder.", "text_encoder": "text_encoder."}
FORMATS = ("native", "diffusers", "single-file")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


# The models shipped in the package (source name = folder under data/) and what to say when one is absent.
SHIPPED_MODELS = {
    "default": "no default model is installed yet; pass --model PATH or preset:NAME",
    "upscaler": "no upscaler is installed yet (it is trained by `ldm train-upscaler`, see docs/training.md); "
    "pass --model PATH, e.g. runs/shapes-upscaler/export",
}


def shipped_model_dir(name: str) -> Path:
    return Path(str(resources.files("latentdiffusion") / "data" / name))


def default_model_dir() -> Path:
    return shipped_model_dir("default")


def load_pipeline(
    source: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    prediction_type: str | None = None,
    loras: Sequence[tuple[str | Path, float]] = (),
    precision: str | None = None,
) -> Pipeline:
    """Load ``source`` (see the module docstring) and move it to ``device`` / ``dtype``.

    ``precision`` ("fp32", "bf16" or "auto", see ``pipelines.precision``) converts the networks after
    loading (and after merging LoRAs); None keeps the loaded weights' dtype (float32, or ``dtype``).

    ``prediction_type`` ("epsilon" or "v_prediction") overrides what the source says or implies.
    ``loras`` are (LoRA file, strength) pairs merged into the weights (``Pipeline.load_lora``).
    """
    components = load_components(str(source), seed=seed, dtype=dtype, prediction_type=prediction_type)
    pipe = Pipeline(components)
    if device is not None or dtype is not None:
        pipe.to(device=device, dtype=dtype)
    for path, strength in loras:
        pipe.load_lora(path, strength)
    if precision is not None:
        _apply_precision(pipe, precision, device, dtype)
    return pipe


def _apply_precision(
    pipe: Pipeline, precision: str, device: str | torch.device | None, dtype: torch.dtype | None
) -> None:
    from latentdiffusion.pipelines.precision import apply_precision, resolve_precision

    if dtype is not None:
        raise UserError("give either a precision or a dtype, not both")
    apply_precision(pipe.components, resolve_precision(precision, device))


def load_components(
    source: str, *, seed: int = 0, dtype: torch.dtype | None = None, prediction_type: str | None = None
) -> Components:
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise UserError(
            f"unknown prediction type {prediction_type!r}; use one of {', '.join(PREDICTION_TYPES)}"
        )
    if source.startswith("preset:"):
        components = build_components(_preset(source.removeprefix("preset:")), seed=seed)
        return _with_prediction_type(components, prediction_type)
    path = shipped_model_dir(source) if source in SHIPPED_MODELS else Path(source)
    if source in SHIPPED_MODELS and not (path / NATIVE_CONFIG).is_file():
        raise UserError(SHIPPED_MODELS[source])
    if not path.exists():
        raise UserError(f"model path {source!r} does not exist")
    if path.is_file():
        from latentdiffusion.checkpoints.single_file import load_single_file

        return load_single_file(path, prediction_type=prediction_type, dtype=dtype)
    if (path / NATIVE_CONFIG).is_file():
        return _with_prediction_type(load_native(path, dtype=dtype), prediction_type)
    from latentdiffusion.checkpoints.diffusers_folder import MODEL_INDEX, load_diffusers

    if (path / MODEL_INDEX).is_file():
        return _with_prediction_type(load_diffusers(path, dtype=dtype), prediction_type)
    raise UserError(
        f"{source!r} is not a model this version can read: expected a checkpoint file, a diffusers folder "
        f"({MODEL_INDEX}) or a folder saved by this package ({NATIVE_CONFIG})"
    )


def _with_prediction_type(components: Components, prediction_type: str | None) -> Components:
    if prediction_type is not None:
        schedule = replace(components.config.schedule, prediction_type=prediction_type)
        components.config = replace(components.config, schedule=schedule)
    return components


def _preset(name: str) -> ModelConfig:
    try:
        return get_preset(name)
    except ValueError as error:
        raise UserError(str(error)) from None


def load_native(path: Path, *, dtype: torch.dtype | None = None) -> Components:
    """Read a folder written by ``save_native`` (weights memory-mapped, networks built on meta)."""
    from latentdiffusion.checkpoints.assemble import assemble_components
    from latentdiffusion.checkpoints.keymap import strip_prefix
    from latentdiffusion.checkpoints.safe_io import read_state_dict

    meta = _read_json(path / NATIVE_CONFIG)
    if meta.get("format") != "latentdiffusion" or meta.get("version") != FORMAT_VERSION:
        raise UserError(f"{path / NATIVE_CONFIG} is not a latentdiffusion model config (version 1)")
    try:
        config = ModelConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as error:
        raise UserError(f"{path / NATIVE_CONFIG} has an invalid config: {error}") from None
    if not (path / NATIVE_WEIGHTS).is_file():
        raise UserError(f"cannot read weights {path / NATIVE_WEIGHTS}: the file is missing")
    state = read_state_dict(path / NATIVE_WEIGHTS, dtype or torch.float32)
    states = {attribute: strip_prefix(state, prefix) for attribute, prefix in PREFIXES.items()}
    name = meta.get("name") or config.name
    source = str(path / NATIVE_WEIGHTS)
    components = assemble_components(
        config, states, tokenizer=make_tokenizer(config), name=name, source=source, dtype=dtype
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


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read {path}: {error}") from None


def load_weights(components: Components, state: dict[str, torch.Tensor], *, source: str) -> None:
    """Load a combined state dict (keys prefixed ``unet.`` / ``autoencoder.`` / ``text_encoder.``)."""
    from latentdiffusion.checkpoints.keymap import strip_prefix

    for attribute, prefix in PREFIXES.items():
        module = getattr(components, attribute)
        load_module_weights(module, strip_prefix(state, prefix), f"{source} [{attribute}]")


def load_module_weights(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict load that explains missing, unexpected and wrongly shaped keys in one message."""
    from latentdiffusion.checkpoints.assemble import check_fits

    check_fits(module, state, source)
    dtype = next(iter(module.state_dict().values())).dtype
    module.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)


def save_components(
    components: Components, path: Path, format: str, *, dtype: torch.dtype | None = None
) -> None:
    """Write ``components`` as ``format`` (one of FORMATS), weights cast to ``dtype`` if given.

    "native": a folder with safetensors plus our JSON config; "diffusers": a diffusers folder;
    "single-file": a ``.safetensors`` file in the original layout plus its CompVis ``.yaml``.
    """
    path = Path(path)
    if format == "native":
        save_native(components, path, dtype=dtype)
    elif format == "diffusers":
        from latentdiffusion.checkpoints.diffusers_folder import save_diffusers

        save_diffusers(components, path, dtype=dtype)
    elif format == "single-file":
        from latentdiffusion.checkpoints.single_file import save_single_file

        save_single_file(components, path, dtype=dtype)
    else:
        raise UserError(f"unknown save format {format!r}; use one of {', '.join(FORMATS)}")


def save_native(components: Components, path: Path, *, dtype: torch.dtype | None = None) -> None:
    """safetensors weights plus a JSON config, each written atomically."""
    from latentdiffusion.checkpoints.safe_io import save_safetensors

    state = {}
    for attribute, prefix in PREFIXES.items():
        for key, value in getattr(components, attribute).state_dict().items():
            state[prefix + key] = (
                value.to(dtype) if dtype is not None and value.is_floating_point() else value
            )
    meta = {
        "format": "latentdiffusion",
        "version": FORMAT_VERSION,
        "name": components.name,
        "config": components.config.to_dict(),
    }
    save_safetensors(state, path / NATIVE_WEIGHTS)
    atomic_write(path / NATIVE_CONFIG, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2)))
    if components.preview_decoder is not None:
        from latentdiffusion.models.preview_decoder import PREVIEW_FILE, save_preview_decoder

        save_preview_decoder(components.preview_decoder, path / PREVIEW_FILE)


__all__ = ["FORMATS", "load_components", "load_pipeline", "make_tokenizer", "save_components"]
