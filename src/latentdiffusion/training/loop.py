"""The training loop: plain PyTorch for both stages, DDP under torchrun, atomic checkpoints, exact resume.

``train(config, run_dir)`` builds the model (a hook: ``build_model``), picks the trainable parameters (a
hook: ``select_trainable``), and runs optimiser steps of ``grad_accumulation`` micro-batches. The run
folder holds ``config.json`` (the resolved config), ``metrics.jsonl``, ``checkpoints/``, ``samples/``
and, at the end, ``export/``: the EMA model in the native folder format that ``ld.load`` reads.

Resuming is exact: the data order and every random draw of a step are functions of (seed, step), and the
checkpoint restores weights, EMA, optimiser and LR-schedule state and the global RNGs.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from latentdiffusion.components import Components, build_components
from latentdiffusion.errors import UserError
from latentdiffusion.files import atomic_write
from latentdiffusion.models.text_encoder import without_causal_mask
from latentdiffusion.models.unet import add_coordinate_channels
from latentdiffusion.training import checkpointing, distributed
from latentdiffusion.training.autoencoder import AutoencoderTask
from latentdiffusion.training.config import TrainConfig, flatten, from_dict, validate
from latentdiffusion.training.data import (
    BadSampleCounter,
    Batch,
    DataSplit,
    MicroBatches,
    Preparation,
    StreamOrder,
    holdout_batches,
    loader,
)
from latentdiffusion.training.diffusion import DiffusionTask
from latentdiffusion.training.distributed import Distributed
from latentdiffusion.training.ema import EMA
from latentdiffusion.training.optim import build_optimizer, build_scheduler
from latentdiffusion.training.preview import PreviewTask
from latentdiffusion.training.tar_shards import StreamBatches, TarShardStream
from latentdiffusion.training.task import StepRandom, Task
from latentdiffusion.training.upscaler import UpscalerTask

ModelBuilder = Callable[[TrainConfig], Components]
ParameterSelector = Callable[[Task], dict[str, list[nn.Parameter]]]
TaskBuilder = Callable[[TrainConfig, Components, torch.device], Task]

TASKS: dict[str, type[Task]] = {
    "autoencoder": AutoencoderTask,
    "diffusion": DiffusionTask,
    "upscaler": UpscalerTask,
    "preview": PreviewTask,
}
FROZEN_FIRST_STAGE = ("diffusion", "upscaler", "preview")  # tasks that take --autoencoder
CONFIG_FILE, METRICS_FILE, EXPORT_DIR, SAMPLES_DIR = "config.json", "metrics.jsonl", "export", "samples"
# Keys that may differ between a run and its resumption without changing what the steps compute.
RESUMABLE_CHANGES = frozenset(
    {
        "max_steps",
        "log_every",
        "eval_every",
        "checkpoint_every",
        "keep_checkpoints",
        "sample.every",
        "data.num_workers",
        "device",
        "init",
        "autoencoder",
        # settings recorded for sampling only: they change grids and the exported defaults, not the steps
        "sample.prompts",
        "sample.seed",
        "sample.steps",
        "sample.guidance_scale",
        "sample.sampler",
        "model.default_sampler",
        "model.default_sigmas",
        "model.default_steps",
        "model.default_guidance_scale",
    }
)


@dataclass
class RunResult:
    run_dir: Path
    export_dir: Path | None  # None on processes other than rank 0
    step: int
    metrics: dict[str, float]
    config: TrainConfig


def build_model(config: TrainConfig) -> Components:
    """The default model-building hook: the networks of ``config.init`` (a model folder ``ld.load``
    reads; given coordinate channels and a text encoder without causal mask if ``config.model`` asks for
    them) or random weights of
    ``config.model``; for the tasks that use a trained first stage (diffusion, upscaler, preview) the
    frozen autoencoder of ``config.autoencoder`` (any model ``ld.load`` reads, e.g. an autoencoder run's
    export or "default") replaces the model's own."""
    from latentdiffusion.pipelines.loading import load_components

    if config.init:
        components = load_components(config.init)
        if config.model.unet.coordinate_channels:
            components = with_coordinate_channels(components)
        if not config.model.text_encoder.causal:
            components = with_bidirectional_text_encoder(components)
    else:
        components = build_components(config.model, seed=config.seed, name=config.name)
    if config.task in FROZEN_FIRST_STAGE and config.autoencoder and config.autoencoder != "random":
        first_stage = load_components(config.autoencoder)
        components = components.with_modules(autoencoder=first_stage.autoencoder)
        components.config = replace(components.config, autoencoder=first_stage.config.autoencoder)
    return components


def with_coordinate_channels(components: Components) -> Components:
    """``components`` whose U-Net gains coordinate channels (``models.unet.add_coordinate_channels``: the
    same function to start with), for a run that asks for them from an init model without them."""
    unet = add_coordinate_channels(components.unet)  # the same U-Net if it has them already
    twin = components.with_modules(unet=unet)
    twin.config = replace(components.config, unet=unet.config)
    return twin


def with_bidirectional_text_encoder(components: Components) -> Components:
    """``components`` whose text encoder has the same weights but no causal mask
    (``TextEncoderConfig.causal``), for a run that asks for it from an init model with one."""
    encoder = without_causal_mask(components.text_encoder)  # the same encoder if it has none
    twin = components.with_modules(text_encoder=encoder)
    twin.config = replace(components.config, text_encoder=encoder.config)
    return twin


def train(
    config: TrainConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    build_model: ModelBuilder = build_model,
    select_trainable: ParameterSelector | None = None,
    verbose: bool = False,
    task_class: TaskBuilder | None = None,
) -> RunResult:
    """Run (or with ``resume`` continue) a training run in ``run_dir``. Works unchanged under torchrun.
    ``task_class`` builds the task instead of ``TASKS[config.task]`` (ControlNet training)."""
    info = distributed.setup(config.device)
    try:
        validate(config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            components = build_model(config)
        config = validate(replace(config, model=components.config))
        run_dir = Path(run_dir)
        state = _prepare_run_dir(run_dir, config, resume, info)
        if verbose and info.is_main:
            print(f"resolved config (saved to {run_dir / CONFIG_FILE}):\n{config.to_json()}", flush=True)
        task = (task_class or TASKS[config.task])(config, components, info.device)
        trainer = Trainer(config, run_dir, task, info, select_trainable, verbose)
        if state is not None:
            trainer.load_state(state)
        return trainer.run()
    finally:
        distributed.teardown(info)


def _prepare_run_dir(run_dir: Path, config: TrainConfig, resume: bool, info: Distributed) -> dict | None:
    if resume:
        state = checkpointing.load_latest(run_dir)
        # Through the current dataclasses, so that fields added since the run started take their defaults.
        saved = json.loads(from_dict(json.loads(state["config"])).to_json())
        check_resumable(saved, json.loads(config.to_json()))
        if (step := int(state["step"])) > config.max_steps:
            raise UserError(
                f"{run_dir} is trained to step {step}, past max_steps {config.max_steps}: resuming would "
                "train nothing and export the later weights; raise max_steps or choose another output"
            )
        return state
    if checkpointing.list_checkpoints(run_dir):
        raise UserError(
            f"{run_dir} already holds a run; pass --resume to continue it or choose another output"
        )
    if info.is_main:
        atomic_write(run_dir / CONFIG_FILE, lambda tmp: Path(tmp).write_text(config.to_json()))
        (run_dir / METRICS_FILE).unlink(missing_ok=True)
    return None


def check_resumable(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """A resumed run must compute the same steps: only bookkeeping keys may change."""
    old, new = flatten(saved), flatten(current)
    changed = sorted(
        k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES
    )
    if changed:
        shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:5])
        allowed = ", ".join(sorted(RESUMABLE_CHANGES))
        raise UserError(f"cannot resume with a different config ({shown}); only {allowed} may change")


def shared_losses(losses: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, list[str]]]:
    """Each distinct loss tensor with the groups it trains: groups that share one loss (one graph, e.g.
    motion modules and the words they learn with) get one backward pass."""
    found: dict[int, tuple[torch.Tensor, list[str]]] = {}
    for name, loss in losses.items():
        found.setdefault(id(loss), (loss, []))[1].append(name)
    return list(found.values())


# ------------------------------------------------------------------------------------------ trainer


class Trainer:
    """Optimisers, EMA, DDP, data, logging and checkpoints around one Task."""

    def __init__(
        self,
        config: TrainConfig,
        run_dir: Path,
        task: Task,
        info: Distributed,
        select_trainable: ParameterSelector | None = None,
        verbose: bool = False,
    ) -> None:
        self.config, self.run_dir, self.task, self.info, self.verbose = config, run_dir, task, info, verbose
        self.groups = (select_trainable or type(task).parameter_groups)(task)
        set_trainable(task.networks, self.groups)
        if config.gradient_checkpointing:
            apply_activation_checkpointing(task)
        self.fsdp = config.distributed.strategy == "fsdp"
        self.plain_task: Task | None = None  # FSDP: rank 0's unsharded copy for evaluation and export
        self.sharded = self.shard() if self.fsdp else ()
        self.optimizers = {
            name: build_optimizer(params, task.optim_config(name), task.learning_rate(name))
            for name, params in self.groups.items()
        }
        self.schedulers = {
            name: build_scheduler(o, config.optim, config.max_steps) for name, o in self.optimizers.items()
        }
        self.ema_params = {
            name: trainable(net)
            for name, net in task.networks.items()
            if name in task.ema_networks and trainable(net)
        }
        if self.sharded:  # the EMA averages each process's shards (training.fsdp.local_views)
            from latentdiffusion.training.fsdp import local_views

            self.ema_sharded = self.ema_params
            self.ema_params = {name: local_views(params) for name, params in self.ema_sharded.items()}
        self.ema = {
            name: EMA(p, config.ema_decay) for name, p in self.ema_params.items() if config.ema_decay > 0
        }
        self.modules = {  # FSDP shards in place (Trainer.shard)
            name: m if self.fsdp else distributed.wrap(m, info) for name, m in task.forward_modules().items()
        }
        self.step, self.stream_skip = 0, [0] * info.world_size
        self.bad = BadSampleCounter(config.data.max_bad_fraction)
        self.global_batch = info.world_size * config.batch_size
        self.rng_state: dict[str, Any] | None = None
        self.last_metrics: dict[str, float] = {}
        self._pending: list[dict[str, float]] = []  # step logs since the last log line
        self._last_log = time.perf_counter()

    def shard(self) -> tuple[str, ...]:
        """``distributed.strategy=fsdp``: shard the trainable networks (``training.fsdp``) when there are
        several processes, find the selected parameters again, keep rank 0 a plain copy of the task."""
        from latentdiffusion.training import fsdp

        if len(self.groups) > 1:
            raise UserError("FSDP trains tasks with one optimiser (diffusion, fine-tuning); use ddp here")
        if not self.info.enabled:
            return ()
        names = fsdp.parameter_names(self.task.networks, self.groups)
        sharded = tuple(name for name, net in self.task.networks.items() if trainable(net))
        if self.info.is_main:
            self.plain_task = fsdp.meta_copy(self.task, sharded)
        blocks = self.task.checkpoint_block_types()
        for name in sharded:
            fsdp.shard_network(self.task.networks[name], blocks, self.info, self.config.precision)
        self.groups = fsdp.parameters_by_name(self.task.networks, names)
        return sharded

    # ---------------------------------------------------------------------------------- state

    def state_dict(self, stream_consumed: list[int]) -> dict[str, Any]:
        """The checkpoint (under FSDP every process takes part in gathering it)."""
        from latentdiffusion.training import fsdp

        networks = {name: net for name, net in self.task.networks.items() if trainable(net)}
        return {
            "networks": {
                name: fsdp.network_state(net) if name in self.sharded else net.state_dict()
                for name, net in networks.items()
            },
            "ema": {
                name: fsdp.ema_state(ema, self.ema_sharded[name]) if self.sharded else ema.state_dict()
                for name, ema in self.ema.items()
            },
            "optimizers": {
                name: fsdp.optimizer_state(self.task.networks, o) if self.fsdp else o.state_dict()
                for name, o in self.optimizers.items()
            },
            "schedulers": {name: s.state_dict() for name, s in self.schedulers.items()},
            "data": {
                "micro_batches": self.step * self.config.optim.grad_accumulation,
                "stream_consumed": stream_consumed,
                "bad": self.bad.state(),
            },
            "rng": checkpointing.rng_state(),
            "config": self.config.to_json(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        from latentdiffusion.training import fsdp

        for name, weights in state["networks"].items():
            if name in self.sharded:
                fsdp.load_network_state(self.task.networks[name], weights)
            else:
                self.task.networks[name].load_state_dict(weights)
        for name, ema in self.ema.items():
            if self.sharded:
                fsdp.load_ema_state(ema, state["ema"][name], self.ema_sharded[name])
            else:
                ema.load_state_dict(state["ema"][name])
        for name, optimizer in self.optimizers.items():
            if self.fsdp:
                fsdp.load_optimizer_state(self.task.networks, optimizer, state["optimizers"][name])
            else:
                optimizer.load_state_dict(state["optimizers"][name])
        for name, scheduler in self.schedulers.items():
            scheduler.load_state_dict(state["schedulers"][name])
            for multiplier in scheduler.lr_lambdas:  # max_steps may have been raised on resume
                multiplier.total = self.config.max_steps
        self.step = int(state["step"])
        consumed = list(state["data"]["stream_consumed"])
        self.stream_skip = consumed if len(consumed) == self.info.world_size else [0] * self.info.world_size
        self.bad.seen, self.bad.bad = state["data"]["bad"]["seen"], state["data"]["bad"]["bad"]
        self.rng_state = state["rng"]
        if self.info.is_main:
            truncate_metrics(self.run_dir / METRICS_FILE, self.step)

    # ------------------------------------------------------------------------------------ run

    def run(self) -> RunResult:
        config, info = self.config, self.info
        split = self.task.prepare_data(self.task.open_data(config.data, config.seed), self.run_dir, info)
        holdout = self.holdout(split) if info.is_main else []
        batches = self.batches(split)
        if self.rng_state is not None:
            checkpointing.set_rng_state(self.rng_state)
        for module in self.task.networks.values():
            module.train(any(p.requires_grad for p in module.parameters()))
        with self.progress_bar() as bar:
            while self.step < config.max_steps:
                logs = self.train_step(batches)
                self.step += 1
                self.after_step(logs, batches, holdout, bar)
        self.finish(batches, holdout)
        export = self.run_dir / EXPORT_DIR if info.is_main else None
        return RunResult(self.run_dir, export, self.step, self.last_metrics, config)

    def holdout(self, split: DataSplit) -> list[Batch]:
        """Held-out batches for evaluation; tar shards have none, so their first training batch stands in
        (for the sample grid and the autoencoder's latent scale)."""
        config = self.config
        prepare = Preparation.from_config(config.data, config.seed, train=False)
        if split.shards is not None:
            return [next(StreamBatches(TarShardStream(split.shards, prepare), config.batch_size))]
        return holdout_batches(split, prepare, config.batch_size)

    def batches(self, split: DataSplit) -> Iterator[Batch]:
        config, info = self.config, self.info
        prepare = Preparation.from_config(config.data, config.seed)
        if split.shards is not None:
            skip = self.stream_skip[info.rank]
            stream = TarShardStream(split.shards, prepare, info.rank, info.world_size, skip)
            return StreamBatches(stream, config.batch_size, config.data.num_workers)
        assert split.source is not None
        order = StreamOrder(
            None if split.train_indices is None else split.train_indices.tolist(), config.seed
        )
        dataset = MicroBatches(split.source, order, prepare, config.batch_size, info.rank, info.world_size)
        accumulation = config.optim.grad_accumulation
        return loader(
            dataset, self.step * accumulation, config.max_steps * accumulation, config.data.num_workers
        )

    def train_step(self, batches: Iterator[Batch]) -> dict[str, float]:
        """One optimiser step over ``grad_accumulation`` micro-batches; returns the step's mean logs."""
        accumulation = self.config.optim.grad_accumulation
        sums: dict[str, float] = defaultdict(float)
        for micro in range(accumulation):
            batch = next(batches)
            self.bad.update(batch)
            if not len(batch):
                if self.info.enabled:
                    raise UserError(f"a whole micro-batch was unreadable: {batch.first_error}")
                continue
            random = StepRandom(
                self.config.seed, self.step * accumulation + micro, self.global_batch, batch.positions
            )
            with self.gradient_sync(micro == accumulation - 1), self.autocast():
                losses, logs = self.task.losses(self.modules, batch, random, self.step)
            for loss, names in shared_losses(losses):  # (FSDP: one group, its shards are not graph inputs)
                inputs = None if self.fsdp else [p for name in names for p in self.groups[name]]
                torch.autograd.backward(loss / accumulation, inputs=inputs)
            for key, value in logs.items():
                sums[key] += value / accumulation
        return sums | self.optimizer_step()

    def optimizer_step(self) -> dict[str, float]:
        from latentdiffusion.training.fsdp import clip_grad_norm_ as fsdp_clip

        logs = {}
        for name, optimizer in self.optimizers.items():
            if self.config.optim.grad_clip > 0:
                clip = fsdp_clip if self.sharded else nn.utils.clip_grad_norm_
                logs[f"grad_norm/{name}"] = float(clip(self.groups[name], self.config.optim.grad_clip))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            self.schedulers[name].step()
        for name, ema in self.ema.items():
            ema.update(self.ema_params[name])
        return logs

    def gradient_sync(self, sync: bool) -> contextlib.AbstractContextManager:
        """DDP all-reduces gradients on the last micro-batch of a step only (no_sync before)."""
        stack = contextlib.ExitStack()
        if not sync:
            for module in self.modules.values():
                if isinstance(module, nn.parallel.DistributedDataParallel):
                    stack.enter_context(module.no_sync())
        return stack

    def autocast(self) -> contextlib.AbstractContextManager:
        enabled = self.config.precision == "bf16"
        return torch.autocast(device_type=self.info.device.type, dtype=torch.bfloat16, enabled=enabled)

    # ------------------------------------------------------------------------- periodic work

    def after_step(
        self, logs: dict[str, float], batches: Iterator[Batch], holdout: list[Batch], bar: Any
    ) -> None:
        config, step = self.config, self.step
        self._pending.append(logs)
        if step % config.log_every == 0 or step == config.max_steps:
            self.log(bar)
        if config.eval_every and step % config.eval_every == 0 and step < config.max_steps:
            self.evaluate(holdout)
        if config.sample.every and step % config.sample.every == 0 and step < config.max_steps:
            self.write_samples(holdout)
        if config.checkpoint_every and step % config.checkpoint_every == 0:
            self.save(batches)

    def log(self, bar: Any) -> None:
        pending, self._pending = self._pending, []
        keys = sorted({k for logs in pending for k in logs})
        means = {k: sum(logs.get(k, 0.0) for logs in pending) / len(pending) for k in keys}
        means = distributed.all_reduce_mean(means, self.info)
        now = time.perf_counter()
        images = len(pending) * self.global_batch * self.config.optim.grad_accumulation
        images_per_s = images / max(now - self._last_log, 1e-9)
        self._last_log = now
        bad = distributed.all_reduce_sum(self.bad.bad, self.info)
        lr = {f"lr/{name}": s.get_last_lr()[0] for name, s in self.schedulers.items()}
        record = {"step": self.step, **means, **lr, "images_per_s": images_per_s, "bad_samples": bad}
        self.last_metrics = {k: v for k, v in record.items() if k != "step"}
        if self.info.is_main:
            self.append_metrics(record)
            if bar is not None:
                bar.set_postfix(loss=f"{means.get('loss', float('nan')):.4f}", img_s=f"{images_per_s:.1f}")
                bar.update(self.step - bar.n)

    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.run_dir / METRICS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")

    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[None]:
        """The EMA averages swapped into every averaged network (evaluation, samples, export)."""
        with contextlib.ExitStack() as stack:
            for name, ema in self.ema.items():
                stack.enter_context(ema.applied(self.ema_params[name]))
            yield

    @contextlib.contextmanager
    def view(self) -> Iterator[Task | None]:
        """The task with the EMA weights applied, on rank 0 (None elsewhere); under FSDP, rank 0's plain
        copy filled with the gathered weights (every process takes part)."""
        if not self.sharded:
            with contextlib.ExitStack() as stack:
                if self.info.is_main:
                    stack.enter_context(self.ema_weights())
                yield self.task if self.info.is_main else None
            return
        from latentdiffusion.training import fsdp

        with self.ema_weights():
            states = {name: fsdp.network_state(self.task.networks[name]) for name in self.sharded}
        if self.plain_task is None:
            yield None
            return
        try:
            for name, state in states.items():
                fsdp.fill(self.plain_task.networks[name], state, self.info.device)
            yield self.plain_task
        finally:
            for name in self.sharded:
                fsdp.empty(self.plain_task.networks[name])

    def evaluate(self, holdout: list[Batch], task: Task | None = None) -> dict[str, float]:
        if task is None:
            with self.view() as view:
                return self.evaluate(holdout, view) if view is not None else {}
        if not holdout:
            return {}
        with self.autocast():
            scores = {f"eval/{k}": v for k, v in task.evaluate(holdout).items()}
        if scores:
            self.append_metrics({"step": self.step, **scores})
            self.last_metrics |= scores
        return scores

    def write_samples(self, holdout: list[Batch], task: Task | None = None) -> None:
        if task is None:
            with self.view() as view:
                if view is not None:
                    self.write_samples(holdout, view)
            return
        grid = task.sample_grid(holdout)
        if grid is not None:
            path = self.run_dir / SAMPLES_DIR / f"step-{self.step:08d}.png"
            atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))

    def save(self, batches: Iterator[Batch]) -> None:
        per_rank = distributed.all_gather_int(getattr(batches, "consumed", 0), self.info)
        state = self.state_dict(per_rank) if self.info.is_main or self.sharded else None
        if self.info.is_main:
            checkpointing.save_checkpoint(self.run_dir, self.step, state, self.config.keep_checkpoints)

    def finish(self, batches: Iterator[Batch], holdout: list[Batch]) -> None:
        """Final checkpoint, evaluation, sample grid and the EMA export."""
        config = self.config
        if not config.checkpoint_every or self.step % config.checkpoint_every:
            self.save(batches)
        with self.view() as task:
            if task is not None:
                self.evaluate(holdout, task)
                self.write_samples(holdout, task)
                task.export(self.run_dir / EXPORT_DIR, holdout)
        distributed.barrier(self.info)

    @contextlib.contextmanager
    def progress_bar(self) -> Iterator[Any]:
        self._last_log = time.perf_counter()
        if not (self.verbose and self.info.is_main):
            yield None
            return
        from tqdm import tqdm

        with tqdm(total=self.config.max_steps, initial=self.step, desc=self.config.name, unit="step") as bar:
            yield bar


# ------------------------------------------------------------------------------------------ helpers


def trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def set_trainable(networks: dict[str, nn.Module], groups: dict[str, list[nn.Parameter]]) -> None:
    """Exactly the selected parameters require gradients; everything else is frozen."""
    for network in networks.values():
        network.requires_grad_(False)
    for params in groups.values():
        for p in params:
            p.requires_grad_(True)
    if not any(groups.values()):
        raise UserError("the trainable-parameter selection is empty: nothing to train")


def apply_activation_checkpointing(task: Task) -> None:
    """Recompute the activations of each block of ``task.checkpoint_block_types()`` in the backward pass
    (Chen et al. 2016) instead of storing them. Blocks are wrapped from outside the model with torch's
    checkpoint wrapper, which keeps the state-dict keys unchanged."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        checkpoint_wrapper,
    )
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing as wrap_blocks,
    )

    block_types = task.checkpoint_block_types()
    wrapper = partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    for network in task.networks.values():
        wrap_blocks(network, checkpoint_wrapper_fn=wrapper, check_fn=lambda m: isinstance(m, block_types))


def truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines past ``step`` (written after the checkpoint a run resumes from)."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in kept)))
