"""Tiny models for the fast-path tests: the TINY preset with two ResBlocks and attention on both levels, so
that the full-resolution branch DeepCache keeps has transformers in it, as Stable Diffusion's has.

Fixtures: ``make_components(seed=0)`` builds fresh default-initialised components, ``psnr(a, b)`` compares
two 8-bit images.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from latentdiffusion.components import Components, build_components
from latentdiffusion.config import TINY, ModelConfig
from latentdiffusion.pipelines.pipeline import Pipeline

CONFIG: ModelConfig = replace(TINY, unet=replace(TINY.unet, num_res_blocks=2, attention_levels=(0, 1)))


def tiny_components(seed: int = 0) -> Components:
    return build_components(CONFIG, seed=seed)


@pytest.fixture
def make_components() -> Callable[..., Components]:
    return tiny_components


@pytest.fixture
def tiny_pipeline() -> Pipeline:
    return Pipeline(tiny_components())


@pytest.fixture
def psnr() -> Callable[[Image.Image, Image.Image], float]:
    return image_psnr


def image_psnr(a: Image.Image, b: Image.Image) -> float:
    """Peak signal-to-noise ratio of two 8-bit images, dB."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mse = ((x - y) ** 2).mean()
    return float("inf") if mse == 0 else float(10 * np.log10(255**2 / mse))
