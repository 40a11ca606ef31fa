"""Resolve a model source to a ``Pipeline``; save a pipeline in the project's own format.

Sources: ``"default"`` (the model shipped in the package), ``"default-few-step"`` (its few-step
student: the default model with its shipped distilled LoRA merged, sampling with LCM in 4 unguided steps),
``"upscaler"`` (the shipped x4 upscaler of the default model's world), ``"preset:NAME"`` (random weights of
a named architecture, for tests and benchmarks), a folder written by ``Pipeline.save`` (safetensors plus a
JSON config; one that bundles a refiner loads it as ``Pipeline.refiner``, with the same device and
precision), and the public Stable Diffusion layouts handled by ``latentdiffusion.checkpoints``: single
files (``.safetensors``, ``.ckpt``, ``.pt``, ``.bin``; recognised by content) and diffusers folders
(``model_index.json``). Saving writes any of the three (``FORMATS``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from importlib import resources
from pathlib import Path

import torch

from latentdiffusion.checkpoints.assemble import FILE_DTYPE
from latentdiffusion.checkpoints.native import NATIVE_CONFIG, bundled_refiner, load_native
from latentdiffusion.components import Components, build_components
from latentdiffusion.config import ModelConfig, get_preset
from latentdiffusion.errors import UserError
from latentdiffusion.families import family_of
from latentdiffusion.pipelines.pipeline import Pipeline

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
T5_ROLE = "text_encoder_3"  # SD3's T5-XXL encoder, which a model may be loaded without (``families.sd3``)


# The models shipped in the package (source name = folder under data/) and what to say when one is absent.
SHIPPED_MODELS = {
    "default": "no default model is installed yet; pass --model PATH or preset:NAME",
    "upscaler": "no upscaler is installed yet (it is trained by `ldm train-upscaler`, see docs/training.md); "
    "pass --model PATH, e.g. runs/shapes-upscaler/export",
}


# Shipped variants: a shipped model with a LoRA file of its folder merged, and the sampling defaults the
# LoRA wants (source name -> model, LoRA file name).
SHIPPED_VARIANTS = {"default-few-step": ("default", "few-step-lora.safetensors")}


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
    t5: bool | None = None,
    tiny_vae: str | Path | None = None,
    backend: str = "torch",
) -> Pipeline:
    """Load ``source`` (see the module docstring) and move it to ``device`` / ``dtype``.

    ``precision`` ("fp32", "bf16" or "auto", see ``pipelines.precision``) converts the networks after
    loading (and after merging LoRAs); None keeps the loaded weights' dtype (float32, or ``dtype``).

    ``prediction_type`` ("epsilon" or "v_prediction") overrides what the source says or implies.
    ``loras`` are (LoRA file, strength) pairs merged into the weights (``Pipeline.load_lora``).
    ``t5`` (SD3): False loads the model without its T5 encoder (its weights are never read; zeros take
    its place, as the reference pipeline allows), True requires one; None takes what the source has.
    ``tiny_vae``: a tiny autoencoder (TAESD file or diffusers ``AutoencoderTiny`` folder) that replaces
    the model's autoencoder for decoding, encoding and previews (``pipelines.tiny_vae``).
    ``backend`` ("torch", "openvino" or "auto", see ``latentdiffusion.backends``): where the U-Net runs;
    OpenVINO computes in the precision the U-Net was converted to (bf16 or fp32).
    """
    # a precision converts the networks right after loading: read them in the file's dtype (memory-mapped)
    # instead of a float32 copy first; LoRAs merge into float32 weights as before
    converted = precision is not None and dtype is None and not loras
    load_dtype = FILE_DTYPE if converted else dtype
    components = load_components(
        str(source), seed=seed, dtype=load_dtype, prediction_type=prediction_type, t5=t5
    )
    if tiny_vae is not None:
        from latentdiffusion.pipelines.tiny_vae import use_tiny_autoencoder

        components = use_tiny_autoencoder(components, tiny_vae)
    pipe = Pipeline(components)
    if device is not None or dtype is not None:
        pipe.to(device=device, dtype=dtype)
    for path, strength in loras:
        pipe.load_lora(path, strength)
    if precision is not None:
        _apply_precision(pipe, precision, device, dtype)
    if backend != "torch":
        from latentdiffusion.backends import attach_backend

        attach_backend(pipe, backend)
    folder = _native_folder(str(source))
    if folder is not None and (bundled := bundled_refiner(folder)) is not None:
        path, pipe.refiner_switch = bundled
        options = dict(device=device, dtype=dtype, seed=seed, precision=precision, backend=backend)
        pipe.refiner = load_pipeline(path, loras=loras, **options)
        # its latents are decoded as the model's own (the same first stage, or the tiny one asked for)
        pipe.refiner.components = pipe.refiner.components.with_modules(autoencoder=pipe.vae)
    return pipe


def _source_path(source: str) -> Path:
    """Where a source that is neither a shipped variant nor a preset lives: a shipped model's folder, or
    the path itself."""
    return shipped_model_dir(source) if source in SHIPPED_MODELS else Path(source)


def _native_folder(source: str) -> Path | None:
    """The folder of a source that is a native model folder (a shipped model or a path), else None."""
    if source in SHIPPED_VARIANTS or source.startswith("preset:"):
        return None
    path = _source_path(source)
    return path if (path / NATIVE_CONFIG).is_file() else None


def _apply_precision(
    pipe: Pipeline, precision: str, device: str | torch.device | None, dtype: torch.dtype | None
) -> None:
    from latentdiffusion.pipelines.precision import apply_precision, resolve_precision

    if dtype is not None:
        raise UserError("give either a precision or a dtype, not both")
    apply_precision(pipe.components, resolve_precision(precision, device))


def load_components(
    source: str,
    *,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    prediction_type: str | None = None,
    t5: bool | None = None,
) -> Components:
    components = _load_components(source, seed, dtype, prediction_type, () if t5 is not False else (T5_ROLE,))
    if t5 and T5_ROLE not in components.modules:
        raise UserError(
            f"model {components.name!r} has no T5 text encoder: load it without T5 (--no-t5), or use a "
            "file that holds one (text_encoders.t5xxl.* in a single file, text_encoder_3/ in a folder)"
        )
    return components


def _load_components(
    source: str,
    seed: int,
    dtype: torch.dtype | None,
    prediction_type: str | None,
    without: tuple[str, ...],
) -> Components:
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise UserError(
            f"unknown prediction type {prediction_type!r}; use one of {', '.join(PREDICTION_TYPES)}"
        )
    if source in SHIPPED_VARIANTS:
        return _shipped_variant(source, seed, dtype, prediction_type, without)
    if source.startswith("preset:"):
        config = _preset(source.removeprefix("preset:"))
        config = family_of(config).without_roles(config, without, source)
        return _with_prediction_type(build_components(config, seed=seed), prediction_type)
    path = _source_path(source)
    if source in SHIPPED_MODELS and not (path / NATIVE_CONFIG).is_file():
        raise UserError(SHIPPED_MODELS[source])
    if not path.exists():
        raise UserError(f"model path {source!r} does not exist")
    if path.is_file():
        from latentdiffusion.checkpoints.single_file import load_single_file

        return load_single_file(path, prediction_type=prediction_type, dtype=dtype, without=without)
    if (path / NATIVE_CONFIG).is_file():
        return _with_prediction_type(load_native(path, dtype=dtype, without=without), prediction_type)
    from latentdiffusion.checkpoints.diffusers_folder import MODEL_INDEX, load_diffusers

    if (path / MODEL_INDEX).is_file():
        return _with_prediction_type(load_diffusers(path, dtype=dtype, without=without), prediction_type)
    raise UserError(
        f"{source!r} is not a model this version can read: expected a checkpoint file, a diffusers folder "
        f"({MODEL_INDEX}) or a folder saved by this package ({NATIVE_CONFIG})"
    )


def _shipped_variant(
    source: str,
    seed: int,
    dtype: torch.dtype | None,
    prediction_type: str | None,
    without: tuple[str, ...],
) -> Components:
    """A shipped model with its few-step LoRA merged and the LCM sampler's defaults."""
    from latentdiffusion.checkpoints.network_lora import load_model_lora
    from latentdiffusion.samplers.consistency import LCM_DEFAULTS

    model, lora_name = SHIPPED_VARIANTS[source]
    lora = shipped_model_dir(model) / lora_name
    if not lora.is_file():
        raise UserError(f"the {source!r} model's LoRA is not installed ({lora}); pass --model PATH")
    components = _load_components(model, seed, dtype, prediction_type, without)
    load_model_lora(lora, components.family, components.modules, 1.0)
    return replace(components, config=replace(components.config, **LCM_DEFAULTS), name=source)


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


__all__ = ["load_components", "load_pipeline"]
