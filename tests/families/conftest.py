"""Tiny random SDXL models (``sdxl_fixtures``) as ours and as diffusers pipelines over the same weights."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from sdxl_fixtures import TINY_INPAINT, TINY_REFINER, TINY_SDXL

from latentdiffusion.checkpoints.formats import save_components
from latentdiffusion.components import build_components
from latentdiffusion.pipelines.pipeline import Pipeline

CONFIGS = {"base": TINY_SDXL, "refiner": TINY_REFINER, "inpaint": TINY_INPAINT}


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Random changes to every weight, norms, biases and zero-initialised layers included, so that no
    default value hides a bug; small enough that activations stay in range (large random networks
    blow up, and then float rounding decides the image)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)


@pytest.fixture(scope="session")
def sdxl(tmp_path_factory):
    """``sdxl(kind)`` -> (our Pipeline, its diffusers folder), built once per session and kind."""
    cache: dict[str, tuple[Pipeline, Path]] = {}

    def get(kind: str) -> tuple[Pipeline, Path]:
        if kind not in cache:
            components = build_components(CONFIGS[kind])
            for seed, module in enumerate(components.modules.values()):
                randomise(module, seed)
            folder = tmp_path_factory.mktemp(f"sdxl-{kind}")
            save_components(components, folder / "diffusers", "diffusers")
            cache[kind] = (Pipeline(components), folder / "diffusers")
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def diffusers_sdxl(sdxl):
    """``diffusers_sdxl(kind, pipeline_class)`` -> diffusers' own pipeline read from our saved folder."""

    def make(kind: str, name: str) -> Any:
        import diffusers

        _, folder = sdxl(kind)
        pipe = getattr(diffusers, name).from_pretrained(folder, add_watermarker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return make


@pytest.fixture(scope="session")
def sd3_models(tmp_path_factory):
    """``sd3_models(config)`` -> (our Components, random weights, and its diffusers folder), once each."""
    cache: dict[str, tuple[Any, Path]] = {}

    def get(config):
        if config.name not in cache:
            components = build_components(config)
            for seed, module in enumerate(components.modules.values()):
                randomise(module, seed)
            folder = tmp_path_factory.mktemp(config.name) / "diffusers"
            save_components(components, folder, "diffusers")
            cache[config.name] = (components, folder)
        return cache[config.name]

    return get


@pytest.fixture(scope="session")
def diffusers_sd3(sd3_models):
    """``diffusers_sd3(config, pipeline_class)`` -> diffusers' pipeline read from our saved folder, with the
    flow-matching Euler scheduler of SD3 (shift 3)."""

    def make(config, name: str = "StableDiffusion3Pipeline") -> Any:
        import diffusers

        _, folder = sd3_models(config)
        absent = {} if config.text_encoder_3 else {"text_encoder_3": None, "tokenizer_3": None}
        pipe = getattr(diffusers, name).from_pretrained(folder, **absent)
        pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return make
