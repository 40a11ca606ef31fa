"""Motion-module training (AnimateDiff, Guo et al. 2024, Sec. 4.2) on the moving-shapes world.

The base text-to-image model is frozen; only a fresh set of motion modules (``models.motion``) learns. Each
module's ``proj_out`` starts at zero, so at step 0 every frame is denoised exactly as the base model
denoises an image. The objective is the base model's denoising loss (``training.diffusion``, Rombach et
al. 2022, Eq. 2) over whole clips: the F frames of a clip are encoded frame by frame by the frozen
autoencoder, share the clip's timestep and caption, get independent noise, and are denoised together by
the U-Net with the motion modules (``models.motion.VideoUNet``); the loss is the mean over all frames.

The data are the moving-shapes clips (``training.moving_shapes``, ``data.dataset=moving_shapes``): the
training stream of the run's seed, the held-out clips of the next seed. The loop is the project's
(``training.loop.train``: checkpoints, exact resume, EMA); this module passes it the motion task. The
run folder holds ``motion.json`` (frames and module shape, checked on resume); the export is one
original-layout motion-module file (``motion_module.safetensors``) that ``pipe.animate`` and ``ldm video
--motion-module`` load. Single-process only for now: the modules run through the U-Net's layer hook,
outside a DDP wrapper's forward.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from latentdiffusion.checkpoints.motion_keys import ORIGINAL_GROUPS, ORIGINAL_HEADS
from latentdiffusion.components import Components
from latentdiffusion.config import ModelConfig
from latentdiffusion.errors import UserError
from latentdiffusion.models.motion import (
    MotionConfig,
    MotionModules,
    VideoUNet,
    check_noise_correlation,
    mixed_noise,
)
from latentdiffusion.training import checkpointing
from latentdiffusion.training.config import (
    DataConfig,
    DiffusionLossConfig,
    OptimConfig,
    SampleConfig,
    TrainConfig,
)
from latentdiffusion.training.data import Batch, DataSplit
from latentdiffusion.training.diffusion import DiffusionTask
from latentdiffusion.training.distributed import Distributed
from latentdiffusion.training.finetune import frozen_model_config
from latentdiffusion.training.losses import min_snr_weight
from latentdiffusion.training.moving_shapes import (
    DIRECTIONS,
    FRAMES,
    GROWTHS,
    MOTIONS,
    SPEEDS,
    MovingShapesDataset,
    reversed_motion_prompt,
)
from latentdiffusion.training.shapes import IMAGE_SIZE
from latentdiffusion.training.task import StepRandom, derive_seed

DATASET = "moving_shapes"
OPTIONS_FILE = "motion.json"
EXPORT_FILE = "motion_module.safetensors"
WORDS_LR = 5e-3  # textual inversion's learning rate (training.embedding)
# the motion vocabulary of the moving-shapes captions, none of which the default model's static captions held
MOVING_SHAPES_WORDS = (*MOTIONS, *DIRECTIONS, *SPEEDS, *GROWTHS)
INIT_SEED_PART = 11  # mixes the run's seed into the seed of the motion modules' initialisation
SPATIAL_SEED_PART = 12  # ... and into the seed of the spatial LoRA adapters' initialisation
SPATIAL_LORA_SUFFIX = ".lora.safetensors"  # motion_module.safetensors -> motion_module.lora.safetensors

MOTION_DEFAULTS: dict[str, Any] = {
    "data": DataConfig(dataset=DATASET, holdout=8),
    # plain loss (AnimateDiff's own objective), timesteps shifted towards high noise: where each frame's
    # object goes is decided at high noise, which min-SNR weighting would scale by SNR ~ 0 (v-prediction
    # with zero terminal SNR); with it, 600 steps left clips at chance direction (22.5%)
    "diffusion": DiffusionLossConfig(min_snr_gamma=None, timestep_shift=3.0, train_text_encoder=False),
    "optim": OptimConfig(lr=1e-4, warmup_steps=100),
    "sample": SampleConfig(prompts=()),
    "ema_decay": 0.999,
}


@dataclass(frozen=True)
class MotionOptions:
    """Clip length and the motion modules' shape beyond what the base U-Net fixes (its level widths and
    ResBlocks per level): transformer blocks per module, a middle-block module. Heads and norm groups are
    the original layout's 8 and 32, which its files do not record."""

    frames: int = FRAMES
    depth: int = 1
    mid_block: bool = False
    words: tuple[str, ...] = ()  # prompt words whose input vectors train with the modules (textual inversion)
    words_lr: float = WORDS_LR
    spatial_lora: int = 0  # rank of LoRA adapters on the U-Net's attention trained with the modules (0: none)
    text_attention: bool = False  # each block's second attention attends to the prompt ("Temporal_Cross")
    noise_correlation: float = 0.0  # alpha of the mixed noise prior (models.motion.mixed_noise); 0: off
    contrast_margin: float = 0.0  # the reversed-motion caption's loss must exceed the own by this fraction
    first_frame: bool = False  # the modules continue a given clean first frame (image-to-video)
    spacetime_conv: bool = False  # each module starts with a 3x3x3 convolution over frames and pixels

    def validate(self) -> None:
        if not 2 <= self.frames <= 32:
            raise UserError(f"motion training needs 2 to 32 frames per clip, got {self.frames}")
        if self.depth < 1:
            raise UserError(f"depth must be >= 1, got {self.depth}")
        bad = [w for w in self.words if not isinstance(w, str) or not w or w.split() != [w]]
        if bad:
            raise UserError(f"--words takes single words without spaces, got {bad[0]!r}")
        if len(set(self.words)) != len(self.words):
            raise UserError(f"--words names a word twice: {' '.join(self.words)}")
        if not self.words_lr > 0:
            raise UserError(f"--words-lr must be > 0, got {self.words_lr}")
        if (
            isinstance(self.spatial_lora, bool)
            or not isinstance(self.spatial_lora, int)
            or self.spatial_lora < 0
        ):
            raise UserError(f"--spatial-lora takes a LoRA rank >= 1 (0: none), got {self.spatial_lora!r}")
        check_noise_correlation(self.noise_correlation, "--noise-correlation")
        if not 0 <= self.contrast_margin <= 10:
            raise UserError(f"--contrast-margin takes a fraction in [0, 10], got {self.contrast_margin}")

    def motion_config(self, model: ModelConfig) -> MotionConfig:
        """The motion modules of ``model``'s U-Net."""
        unet = model.unet
        widths = tuple(unet.model_channels * m for m in unet.channel_mult)
        if any(w % ORIGINAL_HEADS or w % ORIGINAL_GROUPS for w in widths):
            raise UserError(
                f"motion modules have {ORIGINAL_HEADS} heads and {ORIGINAL_GROUPS} norm groups, which do "
                f"not divide this U-Net's level widths {list(widths)}"
            )
        return MotionConfig(
            block_channels=widths,
            layers=unet.num_res_blocks,
            mid_block=self.mid_block,
            heads=ORIGINAL_HEADS,
            norm_groups=ORIGINAL_GROUPS,
            max_frames=max(32, self.frames),
            depth=self.depth,
            cross_attention_dim=unet.context_dim if self.text_attention else None,
            noise_correlation=float(self.noise_correlation),
            first_frame=bool(self.first_frame),
            spacetime_conv=bool(self.spacetime_conv),
        )


class MovingShapesSource:
    """The moving-shapes clips as a data source: ``load(i)`` is (clip [3, F, 64, 64] in [-1, 1], caption)."""

    def __init__(self, seed: int, frames: int, size: int | None = None) -> None:
        self.dataset = MovingShapesDataset(seed, frames)
        self.size = size

    def load(self, index: int) -> tuple[torch.Tensor, str]:
        return self.dataset[index]


# ---------------------------------------------------------------------------------------------- task


class MotionTask(DiffusionTask):
    """The base model's denoising loss over clips, through the frozen U-Net and trained motion modules."""

    name = "motion"
    uses_denoising_loss = False

    def __init__(
        self, config: TrainConfig, components: Components, device: torch.device, options: MotionOptions
    ) -> None:
        super().__init__(config, components, device)
        if self.family.network_role != "unet":
            raise UserError(f"motion modules are trained for U-Net models; {components.name!r} has none")
        self.options = options
        self.unet.eval().requires_grad_(False)
        for role in self.text_roles:
            self.components.modules[role].to(device).eval().requires_grad_(False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(config.seed, INIT_SEED_PART))
            self.motion = MotionModules(options.motion_config(config.model)).to(device)
        self.networks: dict[str, nn.Module] = {"motion": self.motion}
        if options.words:
            self.add_words(options.words)
        if options.spatial_lora:
            self.add_spatial_lora(options.spatial_lora)

    def add_spatial_lora(self, rank: int) -> None:
        """LoRA adapters (seeded by the run's seed) on the U-Net's attention layers, self and cross, trained
        with the modules: the text reaches the modules only through the per-frame features, which the
        frozen still-image layers never made depend on a motion word; the adapters can."""
        from latentdiffusion.models.lora import inject_lora

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.config.seed, SPATIAL_SEED_PART))
            inject_lora({"unet": self.unet}, ("attention",), rank=rank)
        self.networks["spatial"] = self.unet

    def add_words(self, words: tuple[str, ...]) -> None:
        """Trainable input vectors for ``words`` (each starting as the text encoder's embedding of its
        tokens), one table per text encoder, and tokenizers that turn the words into their rows' ids."""
        from latentdiffusion.embeddings import Embedding
        from latentdiffusion.training.embedding import EmbeddingVectors, placeholder_tokenizers, word_vectors

        initial = {word: word_vectors(self.components, word) for word in words}
        roles = next(iter(initial.values()))
        self.word_list = [Embedding(word, vectors) for word, vectors in initial.items()]
        self.words = EmbeddingVectors({r: torch.cat([v[r] for v in initial.values()]) for r in roles})
        self.words.to(self.device)
        self.tokenizers = placeholder_tokenizers(self.components, self.word_list)
        self.networks["words"] = self.words

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        from latentdiffusion.models.lora import lora_parameters

        groups = {name: list(network.parameters()) for name, network in self.networks.items()}
        if "spatial" in groups:  # of the U-Net, only the adapters learn
            groups["spatial"] = lora_parameters(self.unet)
        return groups

    def learning_rate(self, group: str) -> float:
        return self.options.words_lr if group == "words" else self.config.optim.lr

    def optim_config(self, group: str) -> OptimConfig:
        """The words without weight decay, as textual inversion trains them (``training.embedding``): decay
        would pull their vectors towards zero, away from the scale of the encoder's other inputs."""
        optim = self.config.optim
        return replace(optim, weight_decay=0.0) if group == "words" else optim

    def condition(self, modules: dict[str, nn.Module], batch: Batch):
        if "words" not in modules:
            return super().condition(modules, batch)
        from latentdiffusion.training.embedding import vectors_condition

        return vectors_condition(self, modules["words"](), self.tokenizers, batch)

    def open_data(self, config: DataConfig, seed: int) -> DataSplit:
        """Moving-shapes clips: the stream of ``seed`` to train, ``data.holdout`` clips of ``seed + 1``."""
        import numpy as np

        if config.dataset != DATASET:
            raise UserError(f"motion modules train on data.dataset={DATASET}, not {config.dataset}")
        if config.resolution != IMAGE_SIZE:
            raise UserError(f"moving-shapes clips are {IMAGE_SIZE} px: set data.resolution={IMAGE_SIZE}")
        if config.cache_latents:
            raise UserError("data.cache_latents is not supported for clips")
        frames = self.options.frames
        train = MovingShapesSource(seed, frames, config.size)
        indices = None if config.size is None else np.arange(config.size)
        return DataSplit(train, indices, MovingShapesSource(seed + 1, frames), np.arange(config.holdout))

    def prepare_data(self, split: DataSplit, run_dir: Path, info: Distributed) -> DataSplit:
        if info.enabled:
            raise UserError("motion training runs in one process for now (not under torchrun)")
        return split

    def losses(
        self, modules: dict[str, nn.Module], batch: Batch, random: StepRandom, step: int
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        margin = self.options.contrast_margin
        reversed_captions = [reversed_motion_prompt(c) for c in batch.captions] if margin else []
        if not any(reversed_captions):
            loss = self.clip_loss(modules, batch, random).mean()
            return {name: loss for name in self.networks}, {"loss": loss.item()}
        own, other = self.clip_loss(modules, batch, random, reversed_captions).unflatten(0, (2, -1))
        contrasted = torch.tensor([c is not None for c in reversed_captions], device=own.device)
        hinge = (margin * own.detach() - (other - own)).clamp(min=0)[contrasted].mean()
        loss = own.mean() + hinge
        gap = ((other - own) / own).detach()[contrasted].mean()
        metrics = {"loss": own.mean().item(), "hinge": hinge.item(), "gap": gap.item()}
        return {name: loss for name in self.networks}, metrics

    def clip_loss(
        self,
        modules: dict[str, nn.Module],
        batch: Batch,
        random: StepRandom,
        other_captions: Sequence[str | None] = (),
    ) -> torch.Tensor:
        """The denoising loss of each clip [n]: every frame shares its clip's timestep and caption. With
        ``other_captions`` (one per clip; None: its own), the same noisy clips are also denoised under
        those captions, in the same batch through the network: [2n], the own captions' losses first."""
        x = batch.x.to(self.device)  # [n, 3, F, H, W]
        frames = x.shape[2]
        z0 = self.clip_latents(x, random)  # [n * F, C, h, w], frame-major within a clip
        t = self.timesteps(random)  # [n]
        per_frame_t = t.repeat_interleave(frames)
        eps = random.randn(frames, *z0.shape[1:], device=self.device)  # [n, F, C, h, w]
        alpha = self.options.noise_correlation
        if alpha:  # the mixed noise prior: a shared part drawn after the frames' (as pipelines.animate)
            eps = mixed_noise(eps, random.randn(1, *z0.shape[1:], device=self.device), alpha)
        eps = eps.flatten(0, 1)
        z_t = self.process.add_noise(z0, eps, per_frame_t)
        prediction_type = self.config.model.schedule.prediction_type
        target = self.process.training_target(prediction_type, z0, eps, per_frame_t)
        if other_captions:
            others = [o or c for o, c in zip(other_captions, batch.captions, strict=True)]
            batch = replace(batch, captions=[*batch.captions, *others])
            z_t, target, t = torch.cat([z_t, z_t]), torch.cat([target, target]), torch.cat([t, t])
        network = VideoUNet(self.unet, modules["motion"])
        cond = self.condition(modules, batch)
        clips = _unfold(z_t, len(batch))
        if self.options.first_frame:  # frame 0 is given clean (image-to-video); the rest is learned
            first = z0[::frames]  # frame-major within a clip: each clip's frame 0
            cond["first_frame"] = first.repeat(len(batch) // len(first), 1, 1, 1).to(clips.dtype)
        prediction = network(clips, self.process.network_timestep(t), **cond)
        error = (_fold(prediction).float() - target.float()).pow(2).mean(dim=(1, 2, 3))  # [clips * F]
        error = error.unflatten(0, (len(batch), frames))
        per_clip = (error[:, 1:] if self.options.first_frame else error).mean(dim=1)
        gamma = self.config.diffusion.min_snr_gamma
        if gamma is not None:
            per_clip = per_clip * min_snr_weight(self.process.alphas_cumprod(t), gamma, prediction_type)
        return per_clip

    @torch.no_grad()
    def clip_latents(self, x: torch.Tensor, random: StepRandom) -> torch.Tensor:
        """Scaled latents [n * F, C, h, w] of clips [n, 3, F, H, W]: a posterior sample per frame."""
        frames = x.shape[2]
        posterior = self.autoencoder.encode(_fold(x))
        mean, std = posterior.mean.float(), posterior.std.float()
        noise = random.randn(frames, *mean.shape[1:], device=self.device).flatten(0, 1)
        ae = self.config.model.autoencoder
        return (mean + std * noise - ae.shift_factor) * ae.scaling_factor

    def held_out_loss(self, modules: dict[str, nn.Module], batch: Batch, random: StepRandom) -> torch.Tensor:
        """Held-out clip loss (``DiffusionTask.evaluate``: fixed noise and timesteps)."""
        return self.clip_loss(modules, batch, random).mean()

    def sample_grid(self, batches: Sequence[Batch]):
        return None  # clips are judged by evaluation.motion_checker on ``pipe.animate`` output

    def export(self, path: Path, batches: Sequence[Batch]) -> Components:
        from latentdiffusion.checkpoints.motion_keys import save_motion_modules

        path.mkdir(parents=True, exist_ok=True)
        save_motion_modules(copy.deepcopy(self.motion).eval().requires_grad_(False), path / EXPORT_FILE)
        if self.options.words:
            from latentdiffusion.pipelines.animate import words_folder

            self.export_words(words_folder(path / EXPORT_FILE))
        if self.options.spatial_lora:
            self.export_spatial_lora(spatial_lora_file(path / EXPORT_FILE))
        return self.components

    def export_spatial_lora(self, path: Path) -> None:
        """The U-Net adapters as a LoRA file of the model's family (kohya format for SD): load it with the
        model (``ld.load(model, loras=[(path, 1.0)])``, ``ldm video --lora``) when animating."""
        from latentdiffusion.checkpoints.network_lora import save_model_lora
        from latentdiffusion.models.lora import lora_state_dict

        state = {"unet": lora_state_dict(self.unet)}
        metadata = {
            "ss_training_comment": "latentdiffusion ldm train-motion --spatial-lora: load with the module"
        }
        save_model_lora(path, self.family, state, self.config.model, metadata=metadata)

    def export_words(self, folder: Path) -> None:
        """One AUTOMATIC1111 ``.safetensors`` per learned word, named by the word."""
        from latentdiffusion.embeddings import save_embedding

        offset = 0
        for word in self.word_list:
            rows = slice(offset, offset + word.length)
            vectors = {role: v.detach()[rows] for role, v in self.words.vectors.items()}
            save_embedding(folder / f"{word.name}.safetensors", vectors, word.name, self.config.max_steps)
            offset += word.length


def spatial_lora_file(module: Path) -> Path:
    """Where the U-Net adapters trained with the motion module file ``module`` belong."""
    return module.parent / f"{module.stem}{SPATIAL_LORA_SUFFIX}"


def _fold(x: torch.Tensor) -> torch.Tensor:
    """[n, C, F, H, W] -> [n * F, C, H, W], frame-major within a clip."""
    return x.transpose(1, 2).flatten(0, 1)


def _unfold(x: torch.Tensor, clips: int) -> torch.Tensor:
    """The inverse of :func:`_fold`."""
    return x.unflatten(0, (clips, -1)).transpose(1, 2)


# --------------------------------------------------------------------------------------------- runs


def motion_config(
    model: str, model_config: ModelConfig, overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """The motion training defaults for the model at ``model`` (frozen), then ``overrides`` (dotted
    keys, as ``ldm train``)."""
    return frozen_model_config(
        "motion",
        model,
        model_config,
        MOTION_DEFAULTS,
        overrides,
        architecture_reason="motion modules keep the architecture of their base model",
        frozen_reason="motion training keeps the base model frozen",
    )


def train_motion(
    config: TrainConfig,
    run_dir: str | Path,
    options: MotionOptions | None = None,
    *,
    resume: bool = False,
    verbose: bool = False,
):
    """Train motion modules for ``config.init`` in ``run_dir`` (or continue it with ``resume``); the
    result's ``export_dir`` holds ``motion_module.safetensors``."""
    from latentdiffusion.training.loop import train

    if not config.init:
        raise UserError("motion training needs its base model: set init")
    options = options or MotionOptions()
    options.validate()
    run_dir = Path(run_dir)
    check_options(run_dir, options, resume)

    def task(config: TrainConfig, components: Components, device: torch.device) -> MotionTask:
        return MotionTask(config, components, device, options)

    return train(config, run_dir, resume=resume, task_class=task, verbose=verbose)


def checkpoint_modules(run_dir: str | Path, step: int | None = None) -> MotionModules:
    """The motion modules of a run's checkpoint (the latest, or ``step``): the EMA weights where the run
    keeps an average, else the trained ones; for a look at a run that is still training."""
    import json

    from latentdiffusion.training.config import from_dict
    from latentdiffusion.training.ema import EMA

    run_dir = Path(run_dir)
    found = dict(checkpointing.list_checkpoints(run_dir))
    if not found or (step is not None and step not in found):
        raise UserError(f"{run_dir} holds no checkpoint{'' if step is None else f' of step {step}'}")
    state = checkpointing.load_checkpoint(found[max(found) if step is None else step])
    config = from_dict(json.loads(state["config"]))
    modules = MotionModules((saved_options(run_dir) or MotionOptions()).motion_config(config.model))
    modules.load_state_dict(state["networks"]["motion"])
    if "motion" in state.get("ema", {}):
        parameters = list(modules.parameters())
        average = EMA(parameters, 0.0)
        average.load_state_dict(state["ema"]["motion"])
        average.copy_to(parameters)
    return modules.eval().requires_grad_(False)


def saved_options(run_dir: str | Path) -> MotionOptions | None:
    """The ``motion.json`` of a run folder, or None."""
    record = checkpointing.read_run_options(Path(run_dir), OPTIONS_FILE)
    if record is None:
        return None
    try:
        return MotionOptions(**{**record, "words": tuple(record.get("words", ()))})
    except TypeError as error:
        raise UserError(f"cannot read {Path(run_dir) / OPTIONS_FILE}: {error}") from None


def check_options(run_dir: Path, options: MotionOptions, resume: bool) -> None:
    """Save the options with a new run; a resumed run must use the same ones."""
    checkpointing.keep_run_options(run_dir, OPTIONS_FILE, asdict(options), resume, "motion")
