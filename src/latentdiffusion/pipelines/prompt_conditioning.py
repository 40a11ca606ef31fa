"""The conditioning of prompts that use AUTOMATIC1111's prompt editing, alternation or ``AND``
(``prompt_schedule``): every distinct plain prompt of the run is encoded once, by the model's family, in
one batch (so all share one chunk count and any of them batch together); each step then picks its rows
for ``diffusion.guidance.ComposedGuidance``.

Steps count as the web UI counts them: from the first step of the sampler run (img2img and inpainting
from their first step after the strength cut; the schedule spans the requested steps), on through a
refiner's steps; a hires-fix second pass counts from its own first step with the web UI's second-pass
rule for ``when`` (``prompt_schedule``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from latentdiffusion.diffusion.guidance import StepConditions
from latentdiffusion.prompt_schedule import (
    Schedule,
    composable_schedules,
    prompt_schedule,
    text_at_step,
    uses_syntax,
)

if TYPE_CHECKING:
    from latentdiffusion.components import Components
    from latentdiffusion.families.base import Cond
    from latentdiffusion.pipelines.request import Request


def uses_prompt_syntax(prompts: Sequence[str], negative_prompts: Sequence[str]) -> bool:
    """Whether any prompt edits, alternates or composes (else the plain path runs, unchanged)."""
    return any(uses_syntax(p) for p in set(prompts)) or any(
        uses_syntax(n, negative=True) for n in set(negative_prompts)
    )


@dataclass(frozen=True)
class PromptConditioning:
    """Encoded rows and, per image, which row each part and the negative prompt use at each step.

    ``cond`` / ``uncond``: the family's conditioning of the distinct positive / negative plain prompts
    (one row each). ``parts[i]``: image i's (weight, schedule of row indices); ``negatives[i]``: its
    negative prompt's schedule of row indices. ``first_step``: the step its schedules count from."""

    cond: Cond
    uncond: Cond
    parts: tuple[tuple[tuple[float, tuple[tuple[int, int], ...]], ...], ...]
    negatives: tuple[tuple[tuple[int, int], ...], ...]
    first_step: int = 0

    def __call__(self, step: int) -> StepConditions:
        """Step ``step``'s conditions (``ComposedGuidance`` asks by step)."""
        step = max(step - self.first_step, 0)
        owners, weights, rows = [], [], []
        for image, parts in enumerate(self.parts):
            for weight, schedule in parts:
                owners.append(image)
                weights.append(weight)
                rows.append(text_at_step(schedule, step))
        negative_rows = [text_at_step(schedule, step) for schedule in self.negatives]
        return StepConditions(
            uncond=_rows(self.uncond, negative_rows),
            cond=_rows(self.cond, rows),
            owners=tuple(owners),
            weights=tuple(weights),
        )


def _rows(cond: Cond, rows: Sequence[int]) -> dict[str, Any]:
    """The entries of ``cond`` for ``rows`` (non-tensor entries as they are)."""
    index = None
    picked: dict[str, Any] = {}
    for key, value in cond.items():
        if isinstance(value, torch.Tensor):
            index = torch.tensor(rows, device=value.device) if index is None else index.to(value.device)
            picked[key] = value[index]
        else:
            picked[key] = value
    return picked


class _Texts:
    """Distinct texts in order of first use, each with its row index."""

    def __init__(self) -> None:
        self.rows: dict[str, int] = {}

    def schedule(self, schedule: Schedule) -> tuple[tuple[int, int], ...]:
        return tuple((last, self.rows.setdefault(text, len(self.rows))) for last, text in schedule)

    def padded(self, n: int) -> list[str]:
        texts = list(self.rows)
        return texts + [texts[-1]] * (n - len(texts))


def prompt_conditioning(
    components: Components, request: Request, width: int, height: int
) -> PromptConditioning:
    """Encode every plain prompt ``request``'s prompts and negative prompts use over the run."""
    steps, first = request.options.steps, request.first_pass_steps
    positive, negative = _Texts(), _Texts()
    parts = tuple(
        tuple(
            (weight, positive.schedule(schedule))
            for weight, schedule in composable_schedules(prompt, steps, first_pass_steps=first)
        )
        for prompt in request.prompts
    )
    negatives = tuple(
        negative.schedule(prompt_schedule(text, steps, first_pass_steps=first))
        for text in request.negative_prompts
    )
    n = max(len(positive.rows), len(negative.rows))  # the families encode both sides at one batch size
    from latentdiffusion.pipelines.text_to_image import encode_conditioning

    cond, uncond = encode_conditioning(
        components, positive.padded(n), negative.padded(n), width, height, request.micro
    )
    return PromptConditioning(cond, uncond, parts, negatives, first or 0)
