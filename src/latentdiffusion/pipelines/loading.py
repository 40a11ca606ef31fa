"""Resolve a model source to a ``Pipeline``; save a pipeline in the project's own format.

Sources: ``"default"`` (the model shipped in the package), ``"preset:NAME"`` (random weights of a
named architecture, for tests and benchmarks), a folder written by ``Pipeline.save`` (safetensors plus
a JSON config), and the public Stable Diffusion layouts handled by ``latentdiffusion.checkpoints``.
"""

from __future__ import annotations

import json
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


def default_model_dir() -> Path:
    return Path(str(resources.files("latentdiffusion") / "data" / "default"))


def load_pipeline(
    source: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    seed: int = 0,
) -> Pipeline:
    """Load ``source`` (see the module docstring) and move it to ``device`` / ``dtype``."""
    components = load_components(str(source), seed=seed)
    pipe = Pipeline(components)
    if device is not None or dtype is not None:
        pipe.to(device=device, dtype=dtype)
    return pipe


def load_components(source: str, *, seed: int = 0) -> Components:
    if source.startswith("preset:"):
        return build_components(_preset(source.removeprefix("preset:")), seed=seed)
    path = default_model_dir() if source == "default" else Path(source)
    if source == "default" and not (path / NATIVE_CONFIG).is_file():
        raise UserError("no default model is installed yet; pass --model PATH or preset:NAME")
    if not path.exists():
        raise UserError(f"model path {source!r} does not exist")
    if (path / NATIVE_CONFIG).is_file():
        return load_native(path)
    raise UserError(
        f"{source!r} is not a model this version can read: expected a folder with {NATIVE_CONFIG}"
    )


def _preset(name: str) -> ModelConfig:
    try:
        return get_preset(name)
    except ValueError as error:
        raise UserError(str(error)) from None


def load_native(path: Path) -> Components:
    """Read a folder written by ``save_native``."""
    from safetensors.torch import load_file

    meta = _read_json(path / NATIVE_CONFIG)
    if meta.get("format") != "latentdiffusion" or meta.get("version") != FORMAT_VERSION:
        raise UserError(f"{path / NATIVE_CONFIG} is not a latentdiffusion model config (version 1)")
    try:
        config = ModelConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as error:
        raise UserError(f"{path / NATIVE_CONFIG} has an invalid config: {error}") from None
    try:
        state = load_file(path / NATIVE_WEIGHTS)
    except (OSError, RuntimeError) as error:
        raise UserError(f"cannot read weights {path / NATIVE_WEIGHTS}: {error}") from None
    components = build_components(config, name=meta.get("name") or config.name)
    load_weights(components, state, source=str(path / NATIVE_WEIGHTS))
    return components


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
    from latentdiffusion.checkpoints.keymap import first_keys

    expected = module.state_dict()
    missing = expected.keys() - state.keys()
    unexpected = state.keys() - expected.keys()
    wrong = [
        f"{k} (file {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
        for k in sorted(expected.keys() & state.keys())
        if state[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {first_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {first_keys(unexpected)}")
    if wrong:
        problems.append(f"wrongly shaped: {', '.join(wrong[:5])}")
    if problems:
        raise UserError(f"{source} does not fit the model: " + "; ".join(problems))
    dtype = next(iter(expected.values())).dtype
    module.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)


def save_components(components: Components, path: Path, format: str) -> None:
    if format == "native":
        save_native(components, path)
        return
    raise UserError(f"unknown save format {format!r}; this version writes: native")


def save_native(components: Components, path: Path) -> None:
    """safetensors weights plus a JSON config, each written atomically."""
    from safetensors.torch import save_file

    state = {}
    for attribute, prefix in PREFIXES.items():
        module = getattr(components, attribute)
        state.update({prefix + k: v.contiguous() for k, v in module.state_dict().items()})
    meta = {
        "format": "latentdiffusion",
        "version": FORMAT_VERSION,
        "name": components.name,
        "config": components.config.to_dict(),
    }
    atomic_write(path / NATIVE_WEIGHTS, lambda tmp: save_file(state, tmp))
    atomic_write(path / NATIVE_CONFIG, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2)))


__all__ = ["load_pipeline", "make_tokenizer", "save_components"]
