"""ControlNet training (Zhang, Rao & Agrawala 2023, Sec. 3.2-3.4) for any model ``ld.load`` reads.

The base model is frozen. The ControlNet's encoder copy (conv_in, the embeddings, the down path and the
middle block) starts as a copy of the base U-Net's; the hint encoder starts random with its last
convolution at zero, and every output "zero convolution" starts at zero (Sec. 3.1, Eq. 2), so at step 0
the controlled U-Net computes exactly what the base U-Net does. The objective is the base model's
denoising loss (``training.diffusion``, the paper's Eq. 5) with the ControlNet's residuals added to the
frozen U-Net's skips and middle block; only the ControlNet learns. Captions are dropped with
``data.caption_dropout`` as for the base model (the paper replaces 50 % of prompts with empty strings).

The loop is the project's (``training.loop.train``: checkpoints, exact resume, DDP under torchrun, EMA);
this module passes it the ControlNet task. The data are (image, caption, hint) triples: ``shapes-layout``
(the shapes world with its layout map, ``training.layout``) or any data set with hints computed from the
images by a preprocessor (``canny``, ...). The run folder holds ``controlnet.json`` (the hint and the
hint-encoder widths, checked on resume) besides the loop's files; the export is a diffusers ControlNet
folder (``config.json`` + ``diffusion_pytorch_model.safetensors``) that ``ld.Control`` and ``--control``
load.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from latentdiffusion.components import Components
from latentdiffusion.config import ControlNetConfig, ModelConfig
from latentdiffusion.errors import UserError
from latentdiffusion.models.controlnet import ControlNet
from latentdiffusion.training import checkpointing
from latentdiffusion.training.config import (
    DataConfig,
    DiffusionLossConfig,
    OptimConfig,
    SampleConfig,
    TrainConfig,
)
from latentdiffusion.training.data import Batch, DataSplit
from latentdiffusion.training.diffusion import EVAL_SEED_OFFSET, DiffusionTask
from latentdiffusion.training.distributed import Distributed
from latentdiffusion.training.finetune import frozen_model_config
from latentdiffusion.training.layout import (
    LAYOUT_HINT,
    PreprocessedSource,
    ShapesLayoutSource,
    object_weights,
    split_item,
)
from latentdiffusion.training.task import StepRandom, derive_seed, image_grid

OPTIONS_FILE = "controlnet.json"
HINT_WIDTH = 16  # channels of the hint encoder's first stage; each further stage doubles them (max 256)
INIT_SEED_PART = 7  # mixes the run's seed into the seed of the hint encoder's random initialisation

CONTROLNET_DEFAULTS: dict[str, Any] = {
    "data": DataConfig(dataset="shapes", holdout=16),
    "diffusion": DiffusionLossConfig(train_text_encoder=False),
    "optim": OptimConfig(lr=1e-4, warmup_steps=100),
    "sample": SampleConfig(prompts=()),
    "ema_decay": 0.999,
}


@dataclass(frozen=True)
class ControlNetOptions:
    """The hint (``shapes-layout`` or a preprocessor name) and the hint encoder's stage widths (None:
    ``HINT_WIDTH`` doubling per stage, as many stages as the base model's latent factor needs).

    ``init``: a ControlNet to start from (a diffusers folder, a single file or a shipped name such as
    "layout") instead of the base U-Net's copy, to fine-tune it. ``object_weight``: for layout-map hints,
    how much more the denoising loss weighs a latent pixel under an object than one of background
    (``training.layout.object_weights``; 1: the plain loss)."""

    hint: str = LAYOUT_HINT
    hint_channels: tuple[int, ...] | None = None
    init: str | None = None
    object_weight: float = 1.0

    def validate(self) -> None:
        if not (isinstance(self.object_weight, int | float) and 0 < self.object_weight < float("inf")):
            raise UserError(f"object weight must be a positive number, got {self.object_weight!r}")
        if self.object_weight != 1 and self.hint != LAYOUT_HINT:
            raise UserError(f"an object weight needs the {LAYOUT_HINT} hint (its map says where objects are)")
        if self.init is not None:
            from latentdiffusion.pipelines.control import shipped_controlnet

            if not Path(shipped_controlnet(self.init)).exists():  # before the run folder is made
                raise UserError(f"ControlNet {self.init} not found (a ControlNet folder, a file or 'layout')")
        if self.hint != LAYOUT_HINT:
            from latentdiffusion.pipelines.preprocessors import find_preprocessor

            if find_preprocessor(self.hint).needs_mask:
                raise UserError(f"hint {self.hint!r} needs a mask; ControlNet training takes image hints")
        if self.hint_channels is not None and (
            not self.hint_channels or any(c < 1 for c in self.hint_channels)
        ):
            raise UserError(f"hint channels must be positive widths, got {self.hint_channels}")

    def network_config(self, model: ModelConfig) -> ControlNetConfig:
        """The ControlNet of ``model``'s U-Net: its hint encoder halves the hint down to the latent size."""
        factor = model.autoencoder.downsampling_factor
        stages = factor.bit_length()  # factor 2**k -> k + 1 stages
        channels = self.hint_channels or tuple(min(256, HINT_WIDTH * 2**k) for k in range(stages))
        if 2 ** (len(channels) - 1) != factor:
            raise UserError(
                f"the hint encoder needs {stages} stages for this model's latent factor {factor}, "
                f"got {len(channels)} widths {channels}"
            )
        return ControlNetConfig(model.unet, 3, tuple(channels))


# ------------------------------------------------------------------------------------------ networks


def controlnet_from_unet(unet: nn.Module, config: ControlNetConfig, seed: int) -> ControlNet:
    """A ControlNet whose encoder copy holds ``unet``'s weights, with zero convolutions at zero and the
    hint encoder random (seeded by ``seed``) except its zero last convolution."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = ControlNet(config)
    copied = {k: v for k, v in unet.state_dict().items() if k in network.state_dict()}
    missing = set(network.state_dict()) - copied.keys()
    network.load_state_dict(copied, strict=False)
    for module in (*network.zero_convs, network.mid_zero_conv, network.hint_embedding.conv_out):
        nn.init.zeros_(module.weight)
        nn.init.zeros_(module.bias)
    unexpected = {
        k for k in missing if not k.startswith(("hint_embedding.", "zero_convs.", "mid_zero_conv."))
    }
    if unexpected:
        raise UserError(f"the U-Net lacks encoder weights the ControlNet copies: {sorted(unexpected)[:3]}")
    return network.to(next(unet.parameters()).device)


class HintedUNet(nn.Module):
    """The frozen U-Net with the residuals of a ControlNet fed per-item hints [n, 3, H, W] in [0, 1]
    (training's forward; sampling uses ``pipelines.control.ControlledUNet``)."""

    def __init__(self, unet: nn.Module, controlnet: nn.Module, hint: torch.Tensor) -> None:
        super().__init__()
        self.unet, self.controlnet, self.hint = unet, controlnet, hint

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        context: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        down, mid = self.controlnet(x, t, context, self.hint, class_labels, y)
        return self.unet(x, t, context, class_labels, y=y, down_residuals=down, mid_residual=mid)


def initial_controlnet(source: str, config: ControlNetConfig) -> ControlNet:
    """The ControlNet at ``source`` (a folder, a file or a shipped name) in float32, which must have the
    architecture ``config`` gives for this base model and hint encoder."""
    from latentdiffusion.checkpoints.controlnet import load_controlnet
    from latentdiffusion.pipelines.control import shipped_controlnet

    network = load_controlnet(shipped_controlnet(source), dtype=torch.float32)
    if network.control_config != config:
        raise UserError(
            f"the ControlNet {source} has another architecture than this model's ControlNet with these "
            "hint options (its U-Net copy or hint encoder differ): start from one trained for this model"
        )
    return network


# ---------------------------------------------------------------------------------------------- task


class ControlNetTask(DiffusionTask):
    """The base model's denoising loss through a frozen U-Net and a trained ControlNet."""

    name = "controlnet"

    def __init__(self, config: TrainConfig, components: Components, device: torch.device, options) -> None:
        super().__init__(config, components, device)
        if self.family.network_role != "unet":
            raise UserError(f"ControlNets are trained for U-Net models; {components.name!r} has none")
        self.options = options
        self.unet.eval().requires_grad_(False)
        for role in self.text_roles:
            self.components.modules[role].to(device).eval().requires_grad_(False)
        control_config = options.network_config(config.model)
        if options.init is None:
            seed = derive_seed(config.seed, INIT_SEED_PART)
            self.controlnet = controlnet_from_unet(self.unet, control_config, seed)
        else:
            self.controlnet = initial_controlnet(options.init, control_config).to(device)
        self.networks = {"controlnet": self.controlnet}

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"controlnet": list(self.controlnet.parameters())}

    def prepare_data(self, split: DataSplit, run_dir: Path, info: Distributed) -> DataSplit:
        """The data set's sources with hints: the shapes world's layout maps, or preprocessed images."""
        data = self.config.data
        if self.options.hint == LAYOUT_HINT:
            fraction = data.shapes_relational_fraction
            train = ShapesLayoutSource(self.config.seed, data.size, fraction, data.resolution)
            holdout = ShapesLayoutSource(self.config.seed + 1, None, fraction, data.resolution)
            return replace(split, source=train, holdout=holdout)
        if split.source is None:
            raise UserError("ControlNet training reads images by index: tar shards are not supported yet")

        def hinted(source):
            return PreprocessedSource(source, self.options.hint, data.resolution, data.center_crop)

        return replace(split, source=hinted(split.source), holdout=split.holdout and hinted(split.holdout))

    def losses(
        self, modules: dict[str, nn.Module], batch: Batch, random: StepRandom, step: int
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        loss, logs = self.controlled_loss(modules["controlnet"], batch, random)
        return {"controlnet": loss}, logs

    def controlled_loss(
        self, controlnet: nn.Module, batch: Batch, random: StepRandom, weighted: bool = True
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The denoising loss with the ControlNet; ``weighted``: with the options' object weight (the
        held-out loss is the plain one, comparable across runs)."""
        images, hints = split_item(batch.x)
        hints = hints.to(self.device)
        network = HintedUNet(self.unet, controlnet, hints)
        weights = None
        if weighted and self.options.object_weight != 1:
            size = hints.shape[-1] // self.config.model.autoencoder.downsampling_factor
            weights = object_weights(hints, size, self.options.object_weight)
        return self.denoising_loss({"unet": network}, replace(batch, x=images), random, weights)

    @torch.no_grad()
    def evaluate(self, batches: Sequence[Batch]) -> dict[str, float]:
        """Held-out denoising loss with fixed noise and timesteps (comparable across evaluations)."""
        losses = []
        for i, batch in enumerate(batches):
            random = StepRandom(self.config.seed, EVAL_SEED_OFFSET + i, len(batch), torch.arange(len(batch)))
            losses.append(self.controlled_loss(self.controlnet, batch, random, weighted=False)[0].item())
        return {"loss": sum(losses) / len(losses)} if losses else {}

    def base_pipeline(self):
        from latentdiffusion.pipelines.pipeline import Pipeline

        return Pipeline(self.components)

    @torch.no_grad()
    def sample_grid(self, batches: Sequence[Batch]) -> Image.Image | None:
        """Up to 8 held-out hints, each above the image the ControlNet makes of it with its caption
        (``sample.steps``, ``sample.guidance_scale``, ``sample.sampler``, seed ``sample.seed``); only
        when ``sample.every`` asks for grids."""
        from latentdiffusion.pipelines.control import Control

        if not batches or not self.config.sample.every:
            return None
        _, hints = split_item(batches[0].x[:8])
        hint_images = [_to_image(h * 2 - 1) for h in hints]
        network = _frozen_copy(self.controlnet)
        pipe, side, options = self.base_pipeline(), self.config.data.resolution, self.config.sample
        samples = []
        with torch.random.fork_rng(devices=[]):
            for hint, caption in zip(hint_images, batches[0].captions, strict=False):
                control = Control(network, hint, preprocessor="none")
                samples += pipe.generate(
                    caption,
                    steps=options.steps,
                    guidance_scale=options.guidance_scale,
                    sampler=options.sampler,
                    seed=options.seed,
                    width=side,
                    height=side,
                    control=[control],
                )
        return image_grid([*hint_images, *samples], columns=len(hint_images))

    def export(self, path: Path, batches: Sequence[Batch]) -> Components:
        from latentdiffusion.checkpoints.controlnet import save_controlnet

        save_controlnet(_frozen_copy(self.controlnet), path)
        return self.components


def _frozen_copy(network: nn.Module) -> ControlNet:
    import copy

    return copy.deepcopy(network).eval().requires_grad_(False)


def _to_image(x: torch.Tensor) -> Image.Image:
    pixels = ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(pixels)


# --------------------------------------------------------------------------------------------- runs


def controlnet_config(
    model: str, model_config: ModelConfig, overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """The ControlNet training defaults for the model at ``model`` (frozen; its resolution), then
    ``overrides`` (dotted keys, as ``ldm train``)."""
    return frozen_model_config(
        "controlnet",
        model,
        model_config,
        CONTROLNET_DEFAULTS,
        overrides,
        architecture_reason="a ControlNet keeps the architecture of its base model",
        frozen_reason="ControlNet training keeps the base model frozen",
        resolution=model_config.sample_size,
    )


def train_controlnet(
    config: TrainConfig,
    run_dir: str | Path,
    options: ControlNetOptions | None = None,
    *,
    resume: bool = False,
    verbose: bool = False,
):
    """Train a ControlNet for ``config.init`` in ``run_dir`` (or continue it with ``resume``); the result's
    ``export_dir`` (main process) is the diffusers ControlNet folder. Works unchanged under torchrun."""
    from latentdiffusion.training.loop import train

    if not config.init:
        raise UserError(
            "ControlNet training needs its base model: set init (ldm train-controlnet --model PATH)"
        )
    options = options or ControlNetOptions()
    options.validate()
    if options.hint == LAYOUT_HINT and config.data.dataset != "shapes":
        raise UserError(f"the {LAYOUT_HINT} hint needs data.dataset=shapes, not {config.data.dataset}")
    run_dir = Path(run_dir)
    check_options(run_dir, options, resume)

    def task(config: TrainConfig, components: Components, device: torch.device) -> ControlNetTask:
        return ControlNetTask(config, components, device, options)

    return train(config, run_dir, resume=resume, task_class=task, verbose=verbose)


def saved_options(run_dir: Path) -> ControlNetOptions | None:
    """The ``controlnet.json`` of a run folder, or None."""
    record = checkpointing.read_run_options(run_dir, OPTIONS_FILE)
    if record is None:
        return None
    try:
        channels = record.get("hint_channels")
        channels = None if channels is None else tuple(channels)
        return ControlNetOptions(
            record["hint"], channels, record.get("init"), record.get("object_weight", 1.0)
        )
    except (KeyError, TypeError) as error:
        raise UserError(f"cannot read {Path(run_dir) / OPTIONS_FILE}: {error}") from None


def check_options(run_dir: Path, options: ControlNetOptions, resume: bool) -> None:
    """Save the options with a new run; a resumed run must use the same ones."""
    record = asdict(options)
    for name in ("init", "object_weight"):  # recorded only when set, as runs before them were
        if record[name] == getattr(ControlNetOptions, name):
            del record[name]
    checkpointing.keep_run_options(run_dir, OPTIONS_FILE, record, resume, "ControlNet")
