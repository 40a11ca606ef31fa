"""Optimiser state of AdamW against Adafactor (``--optim.name``): bytes for full fine-tunes of real U-Nets,
and peak RSS and step time of a short training run on this CPU.

    python benchmarks/optimiser_memory.py [--models sd15,sdxl] [--steps 5] [--batch 4] [--no-run]

Part 1 counts the state each optimiser keeps for every parameter of the U-Net (``optim.state_numel``,
tested equal to the state torch holds), from the shapes of the network built on the meta device: no
weight is allocated. States are float32, as the weights they follow.

Part 2 trains the ``shapes`` preset (6.7 M-parameter U-Net and 7.1 M-parameter text encoder, trained
jointly, 64 px, random autoencoder, no EMA) with each optimiser in a fresh process: ``--steps`` timed
``Trainer.train_step`` calls after one untimed, then the optimiser step alone on random gradients.
Reports the state held, the medians and the process's peak RSS (``VmHWM``). The third row is torch's
``foreach`` Adafactor, which ``optim.name=adafactor`` does not use (it copies all gradients at once).

Part 3 times one optimiser step on a single 4096 x 4096 matrix (what a large network's step costs per
weight, without the per-tensor overhead of many small ones), with bitsandbytes' ``AdamW8bit`` (block-wise
8-bit moments) beside them when it can be imported (``pip install --no-deps bitsandbytes``; not a
dependency of the project).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from checkpoint_load import cpu_line, in_child, peak_rss  # this folder is sys.path[0] for the script

CASES = ("adamw", "adafactor", "adafactor-foreach")
FLOAT32 = 4  # bytes


def state_table(preset: str) -> dict[str, float]:
    """Parameters and optimiser-state bytes of ``preset``'s denoising network, counted on meta."""
    from latentdiffusion.checkpoints.assemble import build_on_meta
    from latentdiffusion.config import get_preset
    from latentdiffusion.families import family_of
    from latentdiffusion.training.optim import state_numel

    config = get_preset(preset)
    network = build_on_meta(config)[family_of(config).network_role]
    shapes = [tuple(p.shape) for p in network.parameters()]
    kernels = [s for s in shapes if len(s) == 4 and s[-2:] != (1, 1)]
    return {
        "parameters": sum(torch.Size(s).numel() for s in shapes),
        "adamw": FLOAT32 * sum(state_numel(s, "adamw") for s in shapes),
        "adafactor": FLOAT32 * sum(state_numel(s, "adafactor") for s in shapes),
        "adafactor_kernels": FLOAT32 * sum(state_numel(s, "adafactor") for s in kernels),
    }


def train_case(case: str, steps: int, batch: int) -> dict[str, float]:
    """Runs in the child process: a few training steps of the shapes preset with ``case``'s optimiser."""
    import itertools

    from latentdiffusion.components import build_components
    from latentdiffusion.training.config import apply_overrides
    from latentdiffusion.training.data import Batch
    from latentdiffusion.training.distributed import Distributed
    from latentdiffusion.training.loop import TASKS, Trainer
    from latentdiffusion.training.optim import build_scheduler
    from latentdiffusion.training.presets import get_train_preset
    from latentdiffusion.training.shapes import ShapesDataset, images_to_tensor

    overrides = {"autoencoder": "random", "batch_size": batch, "ema_decay": 0.0}
    overrides["optim.name"] = "adamw" if case == "adamw" else "adafactor"
    config = apply_overrides(get_train_preset("shapes"), overrides)
    task = TASKS[config.task](config, build_components(config.model, seed=0), torch.device("cpu"))
    items = [ShapesDataset(0)[i] for i in range(batch)]
    images = images_to_tensor([image.resize((64, 64)) for image, _ in items])
    batches = itertools.repeat(Batch(images, [caption for _, caption in items], torch.arange(batch)))
    with tempfile.TemporaryDirectory() as folder:
        trainer = Trainer(config, Path(folder), task, Distributed())
        if case == "adafactor-foreach":  # torch's other path, for comparison only: the same settings
            settings = trainer.optimizers["model"].defaults | {"foreach": True}
            optimizer = torch.optim.Adafactor(trainer.groups["model"], **settings)
            trainer.optimizers["model"] = optimizer
            trainer.schedulers["model"] = build_scheduler(optimizer, config.optim, config.max_steps)
        for module in task.networks.values():
            module.train()
        step_seconds = []
        for i in range(steps + 1):
            start = time.perf_counter()
            trainer.train_step(batches)
            if i:
                step_seconds.append(time.perf_counter() - start)
        optimiser_seconds = optimiser_steps(trainer, steps)
    states = [s for o in trainer.optimizers.values() for s in o.state.values()]
    held = sum(v.numel() * v.element_size() for s in states for k, v in s.items() if k != "step")
    trained = sum(p.numel() for group in trainer.groups.values() for p in group)
    return {
        "trained": trained,
        "state": held,
        "step": statistics.median(step_seconds),
        "optimiser": statistics.median(optimiser_seconds),
        "peak": peak_rss(),
    }


def optimiser_steps(trainer, steps: int) -> list[float]:
    """Seconds of ``optimizer.step()`` alone, on fixed random gradients."""
    generator = torch.Generator().manual_seed(0)
    seconds = []
    for _ in range(steps):
        for name, optimizer in trainer.optimizers.items():
            for p in trainer.groups[name]:
                p.grad = torch.randn(p.shape, generator=generator) * 1e-3
            start = time.perf_counter()
            optimizer.step()
            seconds.append(time.perf_counter() - start)
    return seconds


def one_matrix(steps: int) -> dict[str, float]:
    """Median seconds of one optimiser step on a 4096 x 4096 float32 matrix, per optimiser."""
    from latentdiffusion.training.config import OptimConfig
    from latentdiffusion.training.optim import build_optimizer

    weight = torch.nn.Parameter(torch.randn(4096, 4096, generator=torch.Generator().manual_seed(0)) * 0.02)
    makers = {name: (lambda ps, n=name: build_optimizer(ps, OptimConfig(name=n))) for name in CASES[:2]}
    try:
        import bitsandbytes

        makers["bitsandbytes AdamW8bit"] = lambda ps: bitsandbytes.optim.AdamW8bit(ps, lr=1e-4)
    except ImportError:
        pass
    seconds = {}
    for name, make in makers.items():
        optimizer, times = make([weight]), []
        for _ in range(steps + 1):
            weight.grad = torch.randn_like(weight) * 1e-3
            start = time.perf_counter()
            optimizer.step()
            times.append(time.perf_counter() - start)
        seconds[name] = statistics.median(times[1:])
    return seconds


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="sd15,sdxl", help="comma-separated model presets")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per optimiser")
    parser.add_argument("--batch", type=int, default=4, help="images per step (64 px)")
    parser.add_argument("--no-run", action="store_true", help="only count the states (part 1)")
    args = parser.parse_args()
    print(cpu_line())
    print("\nfull fine-tune of the U-Net, float32 state, counted from shapes on the meta device")
    print(
        "| model | U-Net parameters | weights + gradients GiB | AdamW state GiB | Adafactor state GiB "
        "| of which conv kernels GiB | Adafactor / AdamW |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for preset in args.models.split(","):
        t = state_table(preset)
        ratio = t["adafactor"] / t["adamw"]
        print(
            f"| {preset} | {t['parameters'] / 1e6:.0f} M | {gib(2 * FLOAT32 * t['parameters'])} "
            f"| {gib(t['adamw'])} | {gib(t['adafactor'])} | {gib(t['adafactor_kernels'])} | {ratio:.3f} |",
            flush=True,
        )
    if args.no_run:
        return
    print(
        f"\nshapes preset, U-Net + text encoder trained, 64 px, batch {args.batch}, "
        f"medians of {args.steps} steps"
    )
    print(
        "| optimiser | trained parameters | state held MiB | train step s | optimiser step s | peak RSS MiB |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for case in CASES:
        r = in_child(f"b.train_case({case!r}, {args.steps}, {args.batch})", "optimiser_memory")
        print(
            f"| {case} | {r['trained'] / 1e6:.1f} M | {r['state'] / 2**20:.1f} | {r['step']:.3f} "
            f"| {r['optimiser']:.4f} | {r['peak'] / 2**20:.0f} |",
            flush=True,
        )
    print(f"\none optimiser step on a 4096 x 4096 matrix, median of {args.steps}")
    print("| optimiser | seconds |\n|---|---:|")
    for name, seconds in in_child(f"b.one_matrix({args.steps})", "optimiser_memory").items():
        print(f"| {name} | {seconds:.3f} |", flush=True)


if __name__ == "__main__":
    main()
