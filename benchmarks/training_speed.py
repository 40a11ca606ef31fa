"""Training throughput (images/s) of the project's training step, fp32 against bf16 autocast.

    python benchmarks/training_speed.py [--rows shapes,sd15] [--steps 4] [--warmup 1] [--threads N]

Each row times ``Trainer.train_step`` (forward, loss, backward, gradient clipping, AdamW, EMA) on a fixed
synthetic batch, so data loading is excluded; the first ``--warmup`` steps are not timed. Rows:

- ``shapes-autoencoder``: the default model's autoencoder at 64 px, batch 16, before and after the
  discriminator starts (the GAN step adds the discriminator's forward/backward and the adaptive weight);
- ``shapes``: the default model's U-Net + text encoder trained jointly at 64 px (16x16x4 latents),
  batch 32, latents encoded each step by the frozen autoencoder or read from the latent cache;
- ``sd15``: the Stable Diffusion 1.5 architecture at 256 px, batch 1, text encoder frozen (as SD
  fine-tuning does), AdamW over the 860M U-Net weights (about 14 GB of weights, gradients and moments).

Prints a markdown table of images per wall-clock second and per CPU-second of the process. On a shared
machine the wall-clock figures drop with the load; with ``--threads 1`` the CPU-time figure is what one
idle core delivers.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from latentdiffusion.components import build_components
from latentdiffusion.config import get_preset
from latentdiffusion.training.config import TrainConfig, apply_overrides
from latentdiffusion.training.data import Batch
from latentdiffusion.training.distributed import Distributed
from latentdiffusion.training.loop import TASKS, Trainer
from latentdiffusion.training.presets import get_train_preset
from latentdiffusion.training.shapes import ShapesDataset, images_to_tensor

PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class Row:
    name: str
    config: TrainConfig
    resolution: int
    cached: bool = False  # diffusion: batches of cached latent moments instead of pixels
    gan: bool = False  # autoencoder: time steps after disc_start


def rows(selected: set[str]) -> list[Row]:
    out = []
    if "shapes" in selected:
        ae = get_train_preset("shapes-autoencoder")
        dm = apply_overrides(get_train_preset("shapes"), {"autoencoder": "random"})
        out += [
            Row("shapes-autoencoder, batch 16", ae, 64),
            Row("shapes-autoencoder + GAN, batch 16", ae, 64, gan=True),
            Row("shapes U-Net + text encoder, batch 32", dm, 64),
            Row("shapes U-Net + text encoder, cached latents, batch 32", dm, 64, cached=True),
        ]
    if "sd15" in selected:
        sd15 = TrainConfig(name="sd15", task="diffusion", model=get_preset("sd15"), autoencoder="random")
        sd15 = apply_overrides(
            sd15, {"batch_size": 1, "data.resolution": 256, "diffusion.train_text_encoder": False}
        )
        out.append(Row("sd15 U-Net (text encoder frozen), 256 px, batch 1", sd15, 256))
    return out


def synthetic_batch(row: Row, trainer: Trainer) -> Batch:
    n = row.config.batch_size
    items = [ShapesDataset(0)[i] for i in range(n)]
    images = images_to_tensor([image.resize((row.resolution, row.resolution)) for image, _ in items])
    x = images
    if row.cached:
        with torch.no_grad():
            posterior = trainer.task.autoencoder.encode(images)
            x = torch.cat([posterior.mean, posterior.std], dim=1)
        trainer.task.cached = True
    return Batch(x, [caption for _, caption in items], torch.arange(n))


def images_per_second(row: Row, precision: str, steps: int, warmup: int) -> tuple[float, float]:
    """(images per wall-clock second, images per CPU-second of this process) over the timed steps."""
    config = apply_overrides(row.config, {"precision": precision, "data.resolution": row.resolution})
    components = build_components(config.model, seed=0)
    task = TASKS[config.task](config, components, torch.device("cpu"))
    with tempfile.TemporaryDirectory() as folder:
        trainer = Trainer(config, Path(folder), task, Distributed())
        for module in task.networks.values():
            module.train()
        batches = itertools.repeat(synthetic_batch(row, trainer))
        trainer.step = config.autoencoder_loss.disc_start if row.gan else 0
        wall, cpu = [], []
        for i in range(warmup + steps):
            start, start_cpu = time.perf_counter(), time.process_time()
            trainer.train_step(batches)
            if i >= warmup:
                wall.append(time.perf_counter() - start)
                cpu.append(time.process_time() - start_cpu)
    return config.batch_size / statistics.median(wall), config.batch_size / statistics.median(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", default="shapes,sd15", help="comma-separated: shapes, sd15")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per row and precision")
    parser.add_argument("--sd15-steps", type=int, default=2, help="timed steps for the sd15 row")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| row | fp32 images/s | bf16 images/s | fp32 images/CPU-s | bf16 images/CPU-s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for row in rows(set(args.rows.split(","))):
        steps = args.sd15_steps if row.name.startswith("sd15") else args.steps
        (fp32, fp32_cpu), (bf16, bf16_cpu) = [
            images_per_second(row, p, steps, args.warmup) for p in PRECISIONS
        ]
        print(f"| {row.name} | {fp32:.2f} | {bf16:.2f} | {fp32_cpu:.2f} | {bf16_cpu:.2f} |", flush=True)
        gc.collect()


if __name__ == "__main__":
    main()
