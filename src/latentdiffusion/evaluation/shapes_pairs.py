"""Preference pairs for Diffusion-DPO (``training.preference``) from a model's own images of the shapes
world, judged by the strict checker (``shapes_checker.check``): for each random prompt the model draws
``per_prompt`` images (seeds ``seed + k * per_prompt`` onwards); images that pass the whole prompt are
paired with images of the same prompt that do not, each image in at most one pair.

The folder holds ``pairs.jsonl`` (``training.preference``'s format), the paired images under
``images/``, and ``progress.json`` (the settings and how many prompts are done), written after every
chunk of prompts, so an interrupted run continues where it stopped with the same prompts and seeds.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from latentdiffusion.errors import UserError
from latentdiffusion.evaluation.shapes_checker import check
from latentdiffusion.files import atomic_write
from latentdiffusion.training.preference import PAIRS_FILE
from latentdiffusion.training.shapes import caption, sample_scene

PROGRESS_FILE = "progress.json"
IMAGES = "images"
PROMPTS_PER_CHUNK = 2  # prompts generated per call (per_prompt images each)


@dataclass(frozen=True)
class PairSettings:
    """How the pairs are made: prompts (half of each caption form, drawn from ``seed``), images per
    prompt, sampling settings (None: the model's)."""

    prompts: int
    per_prompt: int = 8
    seed: int = 100_000
    relational_fraction: float = 0.5
    guidance_scale: float | None = None
    steps: int | None = None

    def __post_init__(self) -> None:
        if self.prompts < 1 or self.per_prompt < 2:
            raise UserError("preference pairs need >= 1 prompt and >= 2 images per prompt")
        if not 0 <= self.relational_fraction <= 1:
            raise UserError(f"the relational fraction must be in [0, 1], got {self.relational_fraction}")


def pair_prompts(settings: PairSettings) -> list[str]:
    """The run's prompts, a pure function of its settings."""
    rng = np.random.default_rng(settings.seed)
    forms = rng.random(settings.prompts) < settings.relational_fraction
    return [caption(sample_scene(rng, "relational" if r else "single"), rng) for r in forms]


def judged_pairs(images: list[Image.Image], prompt: str) -> list[tuple[int, int]]:
    """(passing, failing) image indices, zipped: each image in at most one pair."""
    verdicts = [check(image, prompt)["all"] for image in images]
    passing = [i for i, ok in enumerate(verdicts) if ok]
    failing = [i for i, ok in enumerate(verdicts) if not ok]
    return list(zip(passing, failing, strict=False))


def make_pairs(
    generate: Callable[..., list[Image.Image]],
    folder: str | Path,
    settings: PairSettings,
    log: Callable[[str], None] = print,
) -> int:
    """Generate and judge the images of ``settings`` (``generate(prompts, seed=...)`` -> images, seeds
    counting up from ``seed`` image by image) into ``folder``; returns the number of pairs there."""
    root = Path(folder)
    done, records = resume_point(root, settings)
    prompts = pair_prompts(settings)
    n = settings.per_prompt
    for start in range(done, len(prompts), PROMPTS_PER_CHUNK):
        chunk = prompts[start : start + PROMPTS_PER_CHUNK]
        batch = [prompt for prompt in chunk for _ in range(n)]
        images = generate(batch, seed=settings.seed + start * n)
        for j, prompt in enumerate(chunk):
            own = images[j * n : (j + 1) * n]
            for winner, loser in judged_pairs(own, prompt):
                records.append(write_pair(root, prompt, start + j, own, winner, loser))
        done = start + len(chunk)
        save_progress(root, settings, done, records)
        log(f"{done}/{len(prompts)} prompts, {len(records)} pairs")
    return len(records)


def write_pair(
    root: Path, prompt: str, index: int, images: list[Image.Image], winner: int, loser: int
) -> dict:
    names = {}
    for key, k in (("chosen", winner), ("rejected", loser)):
        names[key] = f"{IMAGES}/{index:06d}-{k}.png"
        atomic_write(root / names[key], lambda tmp, image=images[k]: image.save(tmp, format="PNG"))
    return {"prompt": prompt, **names}


def save_progress(root: Path, settings: PairSettings, done: int, records: list[dict]) -> None:
    text = "".join(json.dumps(record) + "\n" for record in records)
    atomic_write(root / PAIRS_FILE, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    progress = json.dumps({"settings": asdict(settings), "prompts_done": done}, indent=2)
    atomic_write(root / PROGRESS_FILE, lambda tmp: Path(tmp).write_text(progress, encoding="utf-8"))


def resume_point(root: Path, settings: PairSettings) -> tuple[int, list[dict]]:
    """(prompts done, their pair records) of an earlier run with the same settings in ``root``; (0, [])
    for a new folder. A folder made with other settings is refused."""
    path = root / PROGRESS_FILE
    if not path.is_file():
        if (root / PAIRS_FILE).exists():
            raise UserError(f"{root} already holds {PAIRS_FILE} made elsewhere: choose an empty folder")
        return 0, []
    progress = json.loads(path.read_text(encoding="utf-8"))
    if progress.get("settings") != asdict(settings):
        raise UserError(f"{root} holds pairs made with other settings ({progress.get('settings')})")
    lines = (root / PAIRS_FILE).read_text(encoding="utf-8").splitlines()
    return int(progress["prompts_done"]), [json.loads(line) for line in lines if line.strip()]
