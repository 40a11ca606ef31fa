"""Fine-tuning a loaded model: all weights of its denoising network (the U-Net, or SD3's MMDiT), or LoRA
adapters (Hu et al. 2022, Sec. 4).

The denoising objective and the loop are those of ``ldm train`` (``training.diffusion``,
``training.loop.train``); fine-tuning only passes the loop two hooks. ``build_model`` returns the loaded
model (any layout ``ld.load`` reads), with LoRA wrappers around the target layers in LoRA mode (seeded
by the run's seed, so a resumed run rebuilds the same adapters; the ``text`` target adapts every text
encoder of the model's family); ``select_trainable`` picks the LoRA weights, or in full mode leaves the
default (the U-Net, plus the text encoders with ``diffusion.train_text_encoder``).

DreamBooth (``training.dreambooth``, Ruiz et al. 2023) is the same run with two more hooks: the model
builder first generates the class images from the loaded model (into ``class_images/``), and the task
builder makes the diffusion task on instance/class pairs with the prior-preservation weight.

Consistency distillation (``training.consistency``, LCM and LCM-LoRA, Luo et al. 2023) swaps the task:
the same run trains a few-step student of the loaded model (full weights or adapters). So does
Diffusion-DPO (``training.preference``, Wallace et al. 2024): the run learns from pairs of images of one
prompt, one preferred to the other.

The run folder is that of ``ldm train`` plus ``finetune.json`` (the mode, the LoRA, DreamBooth and
distillation settings, checked on resume). Full mode exports the whole model to ``export/``; LoRA mode exports
``export/lora.safetensors`` in the format of the family's LoRA files (``checkpoints.network_lora``):
U-Net families in the kohya / A1111 format with the family's names (``checkpoints.lora_keys``; SDXL:
lora_unet_, lora_te1_, lora_te2_), SD3 in diffusers' PEFT format (``transformer.``, ``text_encoder.``,
``text_encoder_2.``, as diffusers' ``save_lora_weights`` writes it), which ``ld.load(model,
loras=[(file, 1.0)])``, ``ldm generate --lora`` and other Stable Diffusion tools read.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from latentdiffusion.components import Components
from latentdiffusion.config import ModelConfig
from latentdiffusion.errors import UserError
from latentdiffusion.families import family_of
from latentdiffusion.models.lora import DEFAULT_TARGETS, TARGETS, inject_lora, lora_parameters
from latentdiffusion.training import checkpointing
from latentdiffusion.training.config import (
    DataConfig,
    DiffusionLossConfig,
    OptimConfig,
    SampleConfig,
    TrainConfig,
    apply_overrides,
)
from latentdiffusion.training.consistency import ConsistencyDistillationTask, ConsistencyOptions
from latentdiffusion.training.dreambooth import (
    CLASS_DIR,
    DreamBoothOptions,
    DreamBoothTask,
    ensure_class_images,
)
from latentdiffusion.training.loop import RunResult, TaskBuilder, train
from latentdiffusion.training.preference import PreferenceOptions, PreferenceTask
from latentdiffusion.training.task import Task

OPTIONS_FILE = "finetune.json"
LORA_FILE = "lora.safetensors"
LORA_LR, FULL_LR = 1e-4, 1e-5  # the usual learning rates of LoRA and of whole-network fine-tuning


@dataclass(frozen=True)
class LoRAOptions:
    """Which layers get adapters and their shape: rank r, alpha (None: r, i.e. scale 1)."""

    rank: int = 8
    alpha: float | None = None
    targets: tuple[str, ...] = DEFAULT_TARGETS
    dropout: float = 0.0
    # U-Net names in the exported file: "diffusers" (kohya's for SD 1/2) or "original" (kohya's for SDXL)
    naming: str = "diffusers"

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise UserError(f"LoRA rank must be >= 1, got {self.rank}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise UserError(f"unknown LoRA targets {unknown}; choose from {', '.join(TARGETS)}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"LoRA dropout must be in [0, 1), got {self.dropout}")

    @property
    def trains_text_encoder(self) -> bool:
        return any(TARGETS[t][0] == "text_encoder" for t in self.targets)


# The fine-tuning defaults: the user's own images at the model's resolution, batch 1 (a full-size U-Net
# fills memory quickly), no EMA (short runs), no sample grids unless prompts are given.
FINETUNE_DEFAULTS: dict[str, Any] = {
    "data": DataConfig(dataset="imagefolder", holdout=0),
    "diffusion": DiffusionLossConfig(train_text_encoder=False),
    "sample": SampleConfig(prompts=()),
    "batch_size": 1,
    "ema_decay": 0.0,
}


@dataclass
class FinetuneResult:
    run: RunResult
    lora_file: Path | None = None  # LoRA mode, on the main process
    model_dir: Path | None = None  # full mode, on the main process
    metadata: dict[str, str] = field(default_factory=dict)


def finetune_config(
    model: str, model_config: ModelConfig, *, lora: bool, overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """The fine-tuning defaults for the model at ``model`` (architecture ``model_config``): its own
    resolution, the LoRA or full learning rate; then ``overrides`` (dotted keys, as ``ldm train``)."""
    overrides = dict(overrides or {})
    refuse_architecture_overrides(overrides, "fine-tuning keeps the architecture of the model it loads")
    config = TrainConfig(
        name="finetune",
        task="diffusion",
        model=model_config,
        init=model,
        optim=OptimConfig(lr=LORA_LR if lora else FULL_LR),
        **FINETUNE_DEFAULTS,
    )
    config = replace(config, data=replace(config.data, resolution=model_config.sample_size))
    return apply_overrides(config, overrides)


def frozen_model_config(
    name: str,
    model: str,
    model_config: ModelConfig,
    defaults: dict[str, Any],
    overrides: dict[str, Any] | None,
    *,
    architecture_reason: str,
    frozen_reason: str,
    **data: Any,
) -> TrainConfig:
    """The config of a run that trains an addition to the frozen model at ``model`` (ControlNet, embedding,
    motion modules): ``defaults`` and the ``data`` fields, then ``overrides`` (dotted keys, as ``ldm
    train``). ``model.*`` overrides are refused (``architecture_reason``), and so is training the text
    encoder (``frozen_reason``)."""
    overrides = dict(overrides or {})
    refuse_architecture_overrides(overrides, architecture_reason)
    config = TrainConfig(name=name, task="diffusion", model=model_config, init=model, **defaults)
    if data:
        config = replace(config, data=replace(config.data, **data))
    config = apply_overrides(config, overrides)
    if config.diffusion.train_text_encoder:
        raise UserError(f"{frozen_reason}: drop diffusion.train_text_encoder")
    return config


def refuse_architecture_overrides(overrides: dict[str, Any], reason: str) -> None:
    """A run that trains from a loaded model takes its architecture: ``model.*`` overrides are refused."""
    architecture = sorted(k for k in overrides if k.startswith("model."))
    if architecture:
        raise UserError(f"{reason}; drop {', '.join(architecture)}")


def finetune(
    config: TrainConfig,
    run_dir: str | Path,
    lora: LoRAOptions | None = None,
    *,
    resume: bool = False,
    verbose: bool = False,
    components: Components | None = None,
    dreambooth: DreamBoothOptions | None = None,
    consistency: ConsistencyOptions | None = None,
    preference: PreferenceOptions | None = None,
) -> FinetuneResult:
    """Fine-tune ``config.init`` (all weights of its denoising network, or LoRA adapters when ``lora`` is
    given); with ``dreambooth``, on its instance images with prior preservation (``training.dreambooth``);
    with ``consistency``, into a few-step student (``training.consistency``); with ``preference``, on
    preference pairs (``training.preference``).

    ``components``: the model already loaded from ``config.init`` (it is trained in place); otherwise it
    is loaded here. Works unchanged under torchrun.
    """
    if not config.init:
        raise UserError("fine-tuning needs the model to start from: set init (ldm finetune --model PATH)")
    if config.task != "diffusion":
        raise UserError("fine-tuning trains the denoising network; use a diffusion config")
    family_of(config.model).check_training(config.model)
    run_dir = Path(run_dir)
    if dreambooth is not None:
        config = dreambooth_config(config, dreambooth)
        # stopped before its first checkpoint (while generating class images): start again, reusing them
        resume = resume and bool(checkpointing.list_checkpoints(run_dir))
    if consistency is not None:
        consistency.validate()
    if sum(option is not None for option in (dreambooth, consistency, preference)) > 1:
        raise UserError("DreamBooth, consistency distillation and DPO are separate runs: choose one")
    if preference is not None:
        config = preference_config(config, preference)
    check_options(run_dir, lora, resume, dreambooth, consistency, preference)
    if lora is not None:  # the text encoder is in the autograd graph exactly when it has adapters
        diffusion = replace(config.diffusion, train_text_encoder=lora.trains_text_encoder)
        config = replace(config, diffusion=diffusion)

    def build_model(config: TrainConfig) -> Components:
        return _build_model(config, components, lora, dreambooth, run_dir)

    select = None if lora is None else select_lora_parameters
    task_class = None if dreambooth is None else dreambooth_task(dreambooth, run_dir)
    if consistency is not None:
        task_class = consistency_task(consistency)
    if preference is not None:
        task_class = preference_task(preference)
    result = train(
        config,
        run_dir,
        resume=resume,
        build_model=build_model,
        select_trainable=select,
        verbose=verbose,
        task_class=task_class,
    )
    if result.export_dir is None:
        return FinetuneResult(result)
    if lora is None:
        return FinetuneResult(result, model_dir=result.export_dir)
    metadata = lora_metadata(result.config, lora, result.step, consistency)
    lora_file = export_lora(result.export_dir, result.config.model, lora, metadata)
    return FinetuneResult(result, lora_file=lora_file, metadata=metadata)


def _build_model(
    config: TrainConfig,
    components: Components | None,
    lora: LoRAOptions | None,
    dreambooth: DreamBoothOptions | None = None,
    run_dir: Path | None = None,
) -> Components:
    if components is None:
        from latentdiffusion.pipelines.loading import load_components

        components = load_components(str(config.init))
    if dreambooth is not None and run_dir is not None:  # the prior: the model as loaded, before adapters
        make_class_images(components, dreambooth, run_dir, config)
    if lora is not None:
        inject_lora_for_training(components, lora)
    return components


def inject_lora_for_training(components: Components, lora: LoRAOptions) -> dict[str, list[str]]:
    """Adapters on the denoising network (the U-Net, or SD3's MMDiT) and, for text targets, on every
    CLIP text encoder of the family, except in layers its conditioning never runs (SDXL's CLIP-L last
    layer), which could not learn. (No target selects T5's layers: SD3's T5 stays as it is.)"""
    family = components.family
    text_roles = tuple(role for role in family.text_roles if role in components.modules)
    networks = {role: components.modules[role] for role in (family.network_role, *text_roles)}
    return inject_lora(
        networks,
        lora.targets,
        rank=lora.rank,
        alpha=lora.alpha,
        dropout=lora.dropout,
        roles={"unet": (family.network_role,), "text_encoder": text_roles},
        exclude=family.idle_text_modules(components),
    )


# ------------------------------------------------------------------------------------------ DreamBooth


def dreambooth_config(config: TrainConfig, options: DreamBoothOptions) -> TrainConfig:
    """The run's config names the instance folder as its data (recorded, and checked on resume)."""
    if config.data.cache_latents:
        raise UserError("DreamBooth encodes its instance and class images each step; drop data.cache_latents")
    return replace(config, data=replace(config.data, path=str(options.instance_images)))


def preference_config(config: TrainConfig, options: PreferenceOptions) -> TrainConfig:
    """The run's config names the pairs folder as its data (recorded, and checked on resume)."""
    if config.data.cache_latents:
        raise UserError("DPO encodes both images of each pair every step; drop data.cache_latents")
    return replace(config, data=replace(config.data, path=str(options.pairs)))


def make_class_images(
    components: Components, options: DreamBoothOptions, run_dir: Path, config: TrainConfig
) -> None:
    """Generate the missing class images in ``run_dir/class_images`` (each process its own chunks, under
    torchrun), then wait until all processes are done."""
    import torch.distributed as dist

    grouped = dist.is_available() and dist.is_initialized()
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if grouped else (0, 1)
    ensure_class_images(
        components,
        options,
        run_dir / CLASS_DIR,
        rank=rank,
        world_size=world_size,
        device=torch.device(config.device),
        width=config.data.resolution,
    )
    if grouped:
        dist.barrier()


def dreambooth_task(options: DreamBoothOptions, run_dir: Path) -> TaskBuilder:
    """The loop's task builder for a DreamBooth run: the diffusion task on instance/class pairs."""

    def build(config: TrainConfig, components: Components, device: torch.device) -> Task:
        return DreamBoothTask(config, components, device, options, run_dir / CLASS_DIR)

    return build


def consistency_task(options: ConsistencyOptions) -> TaskBuilder:
    """The loop's task builder for a consistency-distillation run."""

    def build(config: TrainConfig, components: Components, device: torch.device) -> Task:
        return ConsistencyDistillationTask(config, components, device, options)

    return build


def preference_task(options: PreferenceOptions) -> TaskBuilder:
    """The loop's task builder for a Diffusion-DPO run."""

    def build(config: TrainConfig, components: Components, device: torch.device) -> Task:
        return PreferenceTask(config, components, device, options)

    return build


def select_lora_parameters(task: Task) -> dict[str, list[nn.Parameter]]:
    """The trainable-parameter hook of LoRA mode: A and B of every adapter, one optimiser."""
    return {"model": [p for network in task.networks.values() for p in lora_parameters(network)]}


# ---------------------------------------------------------------------------------- run options


def saved_options(run_dir: Path) -> dict[str, Any] | None:
    """The ``finetune.json`` of a run folder, or None."""
    return checkpointing.read_run_options(run_dir, OPTIONS_FILE)


def options_record(
    lora: LoRAOptions | None,
    dreambooth: DreamBoothOptions | None = None,
    consistency: ConsistencyOptions | None = None,
    preference: PreferenceOptions | None = None,
) -> dict[str, Any]:
    record = {"mode": "full" if lora is None else "lora", "lora": None if lora is None else asdict(lora)}
    if dreambooth is not None:
        record["dreambooth"] = asdict(dreambooth)
    if consistency is not None:
        record["consistency"] = asdict(consistency)
    if preference is not None:
        record["dpo"] = asdict(preference)
    return record


def lora_options(record: dict[str, Any]) -> LoRAOptions | None:
    """The LoRA options saved in a ``finetune.json`` record (None for a full fine-tune)."""
    if record.get("mode") != "lora":
        return None
    saved = dict(record["lora"])
    return LoRAOptions(**{**saved, "targets": tuple(saved["targets"])})


def dreambooth_options(record: dict[str, Any]) -> DreamBoothOptions | None:
    """The DreamBooth options saved in a ``finetune.json`` record (None for a plain fine-tune)."""
    saved = record.get("dreambooth")
    return None if saved is None else DreamBoothOptions(**saved)


def consistency_options(record: dict[str, Any]) -> ConsistencyOptions | None:
    """The distillation options saved in a ``finetune.json`` record (None for a plain fine-tune)."""
    saved = record.get("consistency")
    return None if saved is None else ConsistencyOptions(**saved)


def preference_options(record: dict[str, Any]) -> PreferenceOptions | None:
    """The DPO options saved in a ``finetune.json`` record (None for a plain fine-tune)."""
    saved = record.get("dpo")
    return None if saved is None else PreferenceOptions(**saved)


def check_options(
    run_dir: Path,
    lora: LoRAOptions | None,
    resume: bool,
    dreambooth: DreamBoothOptions | None = None,
    consistency: ConsistencyOptions | None = None,
    preference: PreferenceOptions | None = None,
) -> None:
    """Save the mode, LoRA, DreamBooth, distillation and DPO settings with a new run; a resumed run must
    use the same ones."""
    record = options_record(lora, dreambooth, consistency, preference)
    checkpointing.keep_run_options(run_dir, OPTIONS_FILE, record, resume, "fine-tuning")


# ------------------------------------------------------------------------------------- LoRA export


def lora_metadata(
    config: TrainConfig, lora: LoRAOptions, steps: int, consistency: ConsistencyOptions | None = None
) -> dict[str, str]:
    """kohya's ``ss_*`` fields for a finished run (A1111 and other tools show them); a distilled
    student's comment names its objective and how it samples."""
    from latentdiffusion.checkpoints.lora_keys import kohya_metadata

    alpha = float(lora.rank if lora.alpha is None else lora.alpha)
    extra: dict[str, object] = {
        "output_name": config.name,
        "learning_rate": str(config.optim.lr),
        "max_train_steps": str(steps),
        "resolution": f"({config.data.resolution}, {config.data.resolution})",
        "training_comment": f"latentdiffusion ldm finetune --lora, targets {','.join(lora.targets)}"
        + ("" if consistency is None else distillation_comment(consistency)),
    }
    if "resnets" in lora.targets:  # kohya's LoCon settings: convolutions adapted with the same rank
        extra["network_args"] = {"conv_dim": str(lora.rank), "conv_alpha": str(alpha)}
    return kohya_metadata(config.model, lora.rank, alpha, **extra)


def distillation_comment(options: ConsistencyOptions) -> str:
    return f"; --lcm --lcm-objective {options.objective}: sample with --sampler lcm --steps 4 --cfg 1"


def export_lora(export_dir: Path, model: ModelConfig, lora: LoRAOptions, metadata: dict[str, str]) -> Path:
    """Turn the loop's export (the whole model, adapters unmerged, EMA applied) into the LoRA file.

    The adapters are taken from the exported weights, so they are exactly what the loop exported (EMA
    averages when EMA is on); the whole-model files are then removed: they would not load as a model.
    """
    from latentdiffusion.checkpoints.keymap import strip_prefix
    from latentdiffusion.checkpoints.native import NATIVE_CONFIG, NATIVE_WEIGHTS, role_prefix
    from latentdiffusion.checkpoints.network_lora import save_model_lora
    from latentdiffusion.checkpoints.safe_io import read_state_dict

    weights = export_dir / NATIVE_WEIGHTS
    state = read_state_dict(weights)
    family = family_of(model)
    roles = dict.fromkeys((family.network_role, *family.lora_prefixes))  # the roles a LoRA file names
    states = {
        role: {k: v for k, v in strip_prefix(state, role_prefix(role)).items() if _is_lora_key(k)}
        for role in roles
    }
    path = save_model_lora(
        export_dir / LORA_FILE, family, states, model, metadata=metadata, naming=lora.naming
    )
    del state, states
    weights.unlink()
    (export_dir / NATIVE_CONFIG).unlink(missing_ok=True)
    return path


def _is_lora_key(key: str) -> bool:
    return key.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))
