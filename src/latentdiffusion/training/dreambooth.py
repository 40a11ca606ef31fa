"""DreamBooth (Ruiz et al. 2023, "DreamBooth: Fine Tuning Text-to-Image Diffusion Models for
Subject-Driven Generation"): teach a model one subject from a few images, named by a rare token.

The instance images are captioned with one prompt holding the rare identifier ("a sks circle"). To keep
the model's knowledge of the subject's class, the class-specific prior-preservation loss (Sec. 4.2,
Eq. 2) trains on images of the class that the model itself generated from the class prompt ("a circle")
before training: per micro-batch,

    L = E[w_t || x_hat(a_t x + s_t eps, c) - x ||^2] + lambda E[w_t' || x_hat(a_t' x_pr + s_t' eps', c_pr)
        - x_pr ||^2],

written here as the run's denoising objective (``training.diffusion``: its parameterisation and
weighting) on the instance item and on a class item, summed with ``prior_weight`` lambda.

DreamBooth is a data source and a loss weighting on top of ``ldm finetune``: ``DreamBoothSource`` pairs
instance image ``i mod N_I`` with class image ``i mod N_C`` (one item of ``max(N_I, N_C)``),
``DreamBoothTask`` runs both halves through the network in one forward pass and weights them. The class
images are made by ``ensure_class_images`` from the base model, before any adapter is added, and stored
in the run folder (``class_images/``): image ``k`` has seed ``class_seed + k`` and is generated in fixed
chunks, so an interrupted generation continues where it stopped with the same images, under any number
of processes (each generates its own chunks).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from latentdiffusion.components import Components
from latentdiffusion.errors import UserError
from latentdiffusion.files import atomic_write
from latentdiffusion.training.config import DataConfig, TrainConfig
from latentdiffusion.training.data import (
    IMAGE_SUFFIXES,
    Batch,
    DataSplit,
    open_image,
    prepared_image,
    to_rgb,
)
from latentdiffusion.training.diffusion import DiffusionTask
from latentdiffusion.training.task import StepRandom

CLASS_DIR = "class_images"
CHUNK = 8  # class images generated per call; fixed, so that a resumed generation makes the same batches


@dataclass(frozen=True)
class DreamBoothOptions:
    """The subject's images and prompts, and the prior preservation (off when ``prior_weight`` is 0).

    ``class_steps`` / ``class_guidance``: sampling settings of the class images (None: the model's
    defaults); ``class_seed``: the seed of class image 0 (image k has ``class_seed + k``);
    ``class_data``: a folder of class images to use first (real images of the class, as the
    "regularisation images" of other trainers): its first ``class_images`` images, sorted by path, become
    class images 0, 1, ...; the model generates the rest.
    """

    instance_images: str
    instance_prompt: str
    class_prompt: str | None = None
    class_images: int = 100
    prior_weight: float = 1.0
    class_steps: int | None = None
    class_guidance: float | None = None
    class_seed: int = 0
    class_data: str | None = None

    def __post_init__(self) -> None:
        if not self.instance_prompt.strip():
            raise UserError("DreamBooth needs an instance prompt with the subject's identifier")
        if not (math.isfinite(self.prior_weight) and self.prior_weight >= 0):
            raise UserError(f"the prior-preservation weight must be >= 0, got {self.prior_weight}")
        if self.class_images < 0:
            raise UserError(f"the number of class images must be >= 0, got {self.class_images}")
        if self.prior_weight > 0 and not (self.class_prompt and self.class_prompt.strip()):
            raise UserError("prior preservation needs --class-prompt (or pass --prior-weight 0)")
        if self.prior_weight > 0 and self.class_images < 1:
            raise UserError("prior preservation needs --class-images >= 1 (or pass --prior-weight 0)")
        if self.class_data is not None and not self.prior:
            raise UserError("--class-data is for prior preservation: leave it out with --prior-weight 0")
        if self.class_steps is not None and self.class_steps < 1:
            raise UserError(f"class-image steps must be >= 1, got {self.class_steps}")

    @property
    def prior(self) -> bool:
        return self.prior_weight > 0


def image_files(folder: str | Path, role: str) -> list[Path]:
    """Every image file under ``folder``, sorted: the subject's (``role`` "instance") or the given class
    images ("class"); a missing or empty folder is one error naming the role."""
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"{role} image folder {root} does not exist or is not a folder")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"{role} image folder {root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def copy_class_data(options: DreamBoothOptions, paths: Sequence[Path]) -> None:
    """Class images 0, 1, ... from ``options.class_data`` (as RGB PNGs), where the run lacks them."""
    if options.class_data is None:
        return
    for source, path in zip(image_files(options.class_data, "class"), paths, strict=False):
        if not path.is_file():
            image = to_rgb(open_image(source))
            atomic_write(path, lambda tmp, image=image: image.save(tmp, format="PNG"))


def class_image_path(class_dir: Path, index: int) -> Path:
    return class_dir / f"class-{index:05d}.png"


# ----------------------------------------------------------------------------------- class images


def ensure_class_images(
    components: Components,
    options: DreamBoothOptions,
    class_dir: Path,
    *,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    width: int | None = None,
) -> list[Path]:
    """Generate the class images this process owns (chunks ``rank``, ``rank + world_size``, ...) that
    ``class_dir`` lacks, with the model as loaded (the prior of Sec. 4.2); return all their paths.

    A chunk with any image missing is generated whole (the same prompts and seeds as before) and only the
    missing files are written, so every image is the same however often generation was interrupted."""
    from latentdiffusion.pipelines.pipeline import Pipeline

    count = options.class_images if options.prior else 0
    paths = [class_image_path(class_dir, k) for k in range(count)]
    copy_class_data(options, paths)
    chunks = [range(start, min(start + CHUNK, count)) for start in range(0, count, CHUNK)]
    todo = [
        c for i, c in enumerate(chunks) if i % world_size == rank and not all(paths[k].is_file() for k in c)
    ]
    if not todo:
        return paths
    pipe = Pipeline(components.with_modules().eval())
    for module in pipe.components.modules.values():
        module.to(device)
    for chunk in todo:
        images = pipe.generate(
            options.class_prompt,
            width=width,
            height=width,
            steps=options.class_steps,
            guidance_scale=options.class_guidance,
            seed=options.class_seed + chunk.start,
            num_images=len(chunk),
        )
        for k, image in zip(chunk, images, strict=True):
            if not paths[k].is_file():
                atomic_write(paths[k], lambda tmp, image=image: image.save(tmp, format="PNG"))
    return paths


# ------------------------------------------------------------------------------------------- data


class DreamBoothSource:
    """Item ``i``: instance image ``i mod N_I`` and, with prior preservation, class image ``i mod N_C``,
    prepared (shorter side to ``resolution``, centre crop) and stacked on channels ([3 or 6, H, W] in
    [-1, 1]); the caption is the instance prompt. ``size = max(N_I, N_C)``: an epoch shows every image."""

    def __init__(
        self,
        instance: Sequence[Path],
        classes: Sequence[Path],
        prompt: str,
        resolution: int,
        center_crop: bool = True,
    ) -> None:
        self.instance, self.classes, self.prompt = list(instance), list(classes), prompt
        self.resolution, self.center_crop = resolution, center_crop
        self.size = max(len(self.instance), len(self.classes))

    def image(self, path: Path) -> torch.Tensor:
        return prepared_image(path, self.resolution, self.center_crop)

    def load(self, index: int) -> tuple[torch.Tensor, str]:
        x = self.image(self.instance[index % len(self.instance)])
        if self.classes:
            x = torch.cat([x, self.image(self.classes[index % len(self.classes)])])
        return x, self.prompt


# ------------------------------------------------------------------------------------------- task


class DreamBoothTask(DiffusionTask):
    """The diffusion task on instance/class pairs: one forward pass over the instance items followed by
    their class items, the two mean losses summed with weight ``prior_weight`` (Eq. 2)."""

    name = "dreambooth"

    def __init__(
        self,
        config: TrainConfig,
        components: Components,
        device: torch.device,
        options: DreamBoothOptions,
        class_dir: Path,
    ) -> None:
        super().__init__(config, components, device)
        self.options, self.class_dir = options, class_dir

    def open_data(self, config: DataConfig, seed: int) -> DataSplit:
        """The instance images (with the generated class images), no held-out items."""
        options = self.options
        count = options.class_images if options.prior else 0
        classes = [class_image_path(self.class_dir, k) for k in range(count)]
        missing = [p for p in classes if not p.is_file()]
        if missing:
            raise UserError(
                f"{len(missing)} class images are missing from {self.class_dir}, e.g. {missing[0]}"
            )
        files = image_files(options.instance_images, "instance")
        source = DreamBoothSource(
            files, classes, options.instance_prompt, config.resolution, config.center_crop
        )
        return DataSplit(source, np.arange(source.size), None, np.arange(0))

    def losses(
        self, modules: dict[str, nn.Module], batch: Batch, random: StepRandom, step: int
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        if not self.options.prior:
            return super().losses(modules, batch, random, step)
        n = len(batch)
        pairs, pair_random = paired_batch(batch, random, self.options.class_prompt or "")
        per_sample = self.per_sample_loss(modules, pairs, pair_random)  # [2n]: instance items, class items
        instance, prior = per_sample[:n].mean(), per_sample[n:].mean()
        loss = instance + self.options.prior_weight * prior
        return {"model": loss}, {
            "loss": loss.item(),
            "loss/instance": instance.item(),
            "loss/prior": prior.item(),
        }


def paired_batch(batch: Batch, random: StepRandom, class_prompt: str) -> tuple[Batch, StepRandom]:
    """The micro-batch of pairs as one batch of 2n items (instance items, then class items) and its
    randomness: the class item of global position p takes position ``p + global_batch`` of a global batch
    twice as large, so its noise and time do not depend on the number of processes either."""
    instance, classes = batch.x.chunk(2, dim=1)
    positions = torch.cat([batch.positions, batch.positions + random.global_batch])
    pairs = Batch(torch.cat([instance, classes]), [*batch.captions, *[class_prompt] * len(batch)], positions)
    doubled = copy.copy(random)  # the same (fresh) generator, drawing for twice the items
    doubled.global_batch, doubled.positions = 2 * random.global_batch, positions
    return pairs, doubled
