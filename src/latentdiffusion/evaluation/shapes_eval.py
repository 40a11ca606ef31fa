"""Prompt adherence of a model on the shapes world: random prompts of both caption forms, generated,
then judged attribute by attribute by the image-analysis checker (``shapes_checker.check``), strict by
default (shape criteria, flatness and object count); ``strict=False`` gives the earlier lenient verdicts.

Guidance is measured by running the same prompts and seeds at several guidance scales (the issue's
"cfg 1.0 vs the default"), so the difference is due to guidance alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from latentdiffusion.evaluation.shapes_checker import check, summarise
from latentdiffusion.training.shapes import FORMS, caption, sample_scene
from latentdiffusion.training.task import image_grid

ATTRIBUTES = ("colour", "shape", "size", "position", "background", "relation", "flat", "count", "all")


@dataclass(frozen=True)
class EvalResult:
    form: str
    guidance_scale: float
    prompts: list[str]
    images: list[Image.Image]
    scores: dict[str, float]  # attribute -> accuracy over the prompts that state it; "all" = whole prompt
    strict: bool = True  # which verdicts ``scores`` holds (``shapes_checker.check``'s ``strict``)


def eval_prompts(n: int, seed: int = 0) -> dict[str, list[str]]:
    """``n`` random prompts per caption form, a pure function of ``seed``."""
    rng = np.random.default_rng(seed)
    return {form: [caption(sample_scene(rng, form), rng) for _ in range(n)] for form in FORMS}


def evaluate(
    pipe,
    prompts: Sequence[str],
    *,
    form: str,
    guidance_scale: float,
    seed: int = 0,
    batch_size: int = 16,
    strict: bool = True,
    **settings,
) -> EvalResult:
    """Generate one image per prompt (prompt i with seed ``seed + i``) and score it."""
    images: list[Image.Image] = []
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start : start + batch_size])
        images += pipe.generate(batch, guidance_scale=guidance_scale, seed=seed + start, **settings)
    return rescore(EvalResult(form, guidance_scale, list(prompts), images, {}), strict)


def rescore(result: EvalResult, strict: bool) -> EvalResult:
    """``result``'s images judged again with the strict or the lenient checker (no generation)."""
    pairs = zip(result.images, result.prompts, strict=True)
    scores = summarise([check(image, prompt, strict=strict) for image, prompt in pairs])
    return replace(result, scores=scores, strict=strict)


def format_table(results: Sequence[EvalResult]) -> str:
    """A markdown table: one row per (form, guidance scale, checker), one column per attribute."""
    header = "| prompts | cfg | checker | n | " + " | ".join(ATTRIBUTES) + " |"
    lines = [header, "|---" * (len(ATTRIBUTES) + 4) + "|"]
    for result in results:
        cells = [_percent(result.scores.get(a)) for a in ATTRIBUTES]
        checker = "strict" if result.strict else "lenient"
        row = [result.form, f"{result.guidance_scale:g}", checker, str(len(result.prompts)), *cells]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _percent(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}%"


def grid(images: Sequence[Image.Image], columns: int = 8) -> Image.Image:
    """Images tiled row by row on a white canvas."""
    return image_grid(images, min(columns, len(images)), background="white")
