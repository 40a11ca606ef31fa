"""Training configuration: frozen dataclasses, typed ``key=value`` overrides and the checks a run must pass.

A run is described by one :class:`TrainConfig`; it nests the model architecture (``ModelConfig``) and
the data, optimiser and loss settings. Named presets live in ``training.presets``; the CLI and JSON
files change single fields with dotted keys (``optim.lr=3e-4``, ``model.unet.model_channels=64``), checked
against the field types. This module imports no torch so that ``ldm --help`` stays fast.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from typing import Any

from latentdiffusion.config import (
    ModelConfig,
    UNetConfig,
)
from latentdiffusion.errors import UserError

TASKS = ("autoencoder", "diffusion", "upscaler", "preview")
DATASETS = ("shapes", "imagefolder", "webdataset", "fashion-mnist", "moving_shapes")  # moving_shapes: clips
PRECISIONS = ("fp32", "bf16")
LR_SCHEDULES = ("cosine", "constant")
OPTIMIZERS = ("adamw", "adafactor")  # adafactor: factored second moments, no first moment (less memory)
STRATEGIES = ("ddp", "fsdp")  # data parallelism under torchrun: replicated or fully sharded networks
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # where Debian's dataset-fashion-mnist installs


@dataclass(frozen=True)
class DataConfig:
    """Where images and captions come from and how they are prepared."""

    dataset: str = "shapes"  # one of DATASETS
    path: str | None = None  # folder (imagefolder, fashion-mnist) or shard folder / glob (webdataset)
    resolution: int = 64  # square side in pixels after resize and centre crop
    center_crop: bool = True  # False: resize the whole image to resolution x resolution
    random_flip: bool = False  # off by default: a flip contradicts captions that say "left of"
    caption_dropout: float = 0.1  # empty caption with this probability (classifier-free guidance)
    size: int | None = None  # use only the first `size` items (shapes: required to cache latents)
    holdout: int = 64  # items kept out of training for evaluation (PSNR/SSIM, validation loss)
    num_workers: int = 0  # DataLoader worker processes per training process
    cache_latents: bool = False  # diffusion: encode the data set once with the frozen autoencoder
    # with cache_latents: refine each cached latent by this many steps so the decoder redraws its image
    refine_latents: int = 0
    max_bad_fraction: float = 0.01  # stop with an error once more than this share of samples is unreadable
    fashion_mnist_split: str = "train"  # "train" or "t10k"
    shapes_relational_fraction: float = 0.5  # shapes: share of two-object (relational) scenes


@dataclass(frozen=True)
class OptimConfig:
    """AdamW (Loshchilov & Hutter 2019) or Adafactor (Shazeer & Stern 2018) with linear warm-up and cosine
    decay (Loshchilov & Hutter 2017). ``lr`` and ``weight_decay`` mean the same for both; Adafactor keeps
    no first moment and decays its second moment on its own schedule, so it ignores ``betas``."""

    name: str = "adamw"  # one of OPTIMIZERS
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    eps: float = 1e-8
    warmup_steps: int = 100
    schedule: str = "cosine"  # one of LR_SCHEDULES
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    grad_clip: float = 1.0  # max global grad norm per optimiser; 0 = off
    grad_accumulation: int = 1  # micro-batches per optimiser step


@dataclass(frozen=True)
class AutoencoderLossConfig:
    """L1 + KL + PatchGAN hinge loss with the adaptive weight of Esser et al. 2021 (Eq. 7)."""

    l1_weight: float = 1.0
    kl_weight: float = 1e-6
    disc_start: int = 1000  # optimiser steps before the discriminator loss is switched on
    disc_weight: float = 0.5
    disc_channels: int = 64
    disc_layers: int = 3
    disc_lr: float | None = None  # None: the autoencoder's lr
    perceptual_weights: str | None = None  # local LPIPS-VGG16 weights; never downloaded
    perceptual_weight: float = 1.0
    # Sharp edges and flat fills (training.losses): L1 weighted 1 + edge_weight within edge_radius px of
    # the target's edges, an image-gradient L1 and an MSE term; all off (0) by default.
    edge_weight: float = 0.0
    edge_radius: int = 1
    gradient_weight: float = 0.0
    mse_weight: float = 0.0
    # Share of training images whose colours are remapped per channel by a random affine map (one per
    # image, range kept): a first stage that meets every colour, not only its data set's palette.
    colour_remap: float = 0.0
    # False: only the decoder side trains (decoder and post-quant convolution); the encoder, and with it
    # the latent space and its scale, stays --init's, so the decoder drops into every model trained on
    # those latents (AutoencoderTask.decoder_only)
    train_encoder: bool = True


@dataclass(frozen=True)
class DiffusionLossConfig:
    """The denoising objective; the prediction type and schedule come from ``model.schedule``."""

    min_snr_gamma: float | None = 5.0  # Hang et al. 2023; None = plain MSE
    offset_noise: float = 0.0  # Guttenberg 2023: add offset * N(0, 1) per sample and channel
    timestep_shift: float = 1.0  # > 1 draws training timesteps nearer high noise (losses.shift_timesteps)
    train_text_encoder: bool = True  # False: the text encoder stays frozen
    # > 0: add this times the first stage's pixel loss (autoencoder_loss's terms) between each image and
    # its decoded x0 prediction, for items noised below pixel_max_timestep (DiffusionTask.pixel_loss)
    pixel_weight: float = 0.0
    pixel_max_timestep: int = 300
    # > 0: the network's input is noised with eps + this * N(0, 1) while its target keeps eps
    # (DiffusionTask.perturbed; Ning et al. 2023 use 0.1)
    input_perturbation: float = 0.0


@dataclass(frozen=True)
class SampleConfig:
    """Periodic sample grids with fixed prompts and seeds."""

    every: int = 0  # optimiser steps between grids; 0 = only at the end
    prompts: tuple[str, ...] = ("a red circle on a blue background",)
    seed: int = 0
    steps: int = 20
    guidance_scale: float = 5.0
    sampler: str = "dpmpp_2m"


@dataclass(frozen=True)
class DistributedConfig:
    """How a torchrun job shares the work (``training.distributed``, ``training.fsdp``)."""

    strategy: str = "ddp"  # one of STRATEGIES; fsdp shards weights, gradients and optimiser state


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs; saved as ``config.json`` in the run folder."""

    name: str
    task: str  # one of TASKS
    model: ModelConfig
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    autoencoder_loss: AutoencoderLossConfig = field(default_factory=AutoencoderLossConfig)
    diffusion: DiffusionLossConfig = field(default_factory=DiffusionLossConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    init: str | None = None  # a model folder to start from; its architecture replaces `model`
    autoencoder: str | None = None  # diffusion, upscaler: a model folder whose autoencoder is used, frozen
    # (an autoencoder run's export, "default" = the shipped model); "random" for tests
    batch_size: int = 16  # per process and micro-batch
    max_steps: int = 1000  # optimiser steps
    seed: int = 0
    ema_decay: float = 0.999  # 0 = no EMA; the export then holds the raw weights
    precision: str = "fp32"  # one of PRECISIONS; bf16 = autocast, weights stay fp32
    gradient_checkpointing: bool = False
    device: str = "cpu"
    log_every: int = 10
    eval_every: int = 0  # 0 = only at the end
    checkpoint_every: int = 500
    keep_checkpoints: int = 2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


# ---------------------------------------------------------------------------------------- overrides


def config_keys(cls: type = TrainConfig, prefix: str = "") -> dict[str, Any]:
    """Every overridable leaf field as ``{"dotted.key": type}`` (nested dataclasses expanded)."""
    keys: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        kind = hints[f.name]
        part = _dataclass_of(kind)
        if part is not None:
            keys.update(config_keys(part, f"{prefix}{f.name}."))
        if part is None or part is not kind:  # a leaf, or an optional part that may be set to None
            keys[prefix + f.name] = kind
    return keys


def _dataclass_of(kind: Any) -> type | None:
    """The dataclass of a field typed ``X`` or ``X | None`` (an optional model part), else None."""
    if isinstance(kind, type) and is_dataclass(kind):
        return kind
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        parts = [a for a in typing.get_args(kind) if a is not type(None)]
        if len(parts) == 1 and isinstance(parts[0], type) and is_dataclass(parts[0]):
            return parts[0]
    return None


def apply_overrides(config: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """Replace fields by dotted key; values may be strings (CLI) or JSON values, and are type-checked."""
    known = config_keys()
    for key, value in overrides.items():
        if key not in known:
            raise UserError(f"unknown config key {key!r}{_suggestion(key, known)}")
        config = _replace_path(config, key.split("."), coerce(value, known[key], key))
    return config


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested JSON objects -> dotted keys (``{"optim": {"lr": 1}}`` -> ``{"optim.lr": 1}``)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def from_dict(data: dict[str, Any]) -> TrainConfig:
    """Rebuild a config from ``to_dict`` output (a saved ``config.json``), checking every value."""
    for required in ("name", "task", "model"):
        if required not in data:
            raise UserError(f"the training config has no {required!r}")
    model = data["model"]
    base = TrainConfig(name=str(data["name"]), task=str(data["task"]), model=ModelConfig(name=model["name"]))
    rest = {k: v for k, v in data.items() if k not in ("name", "task")}
    return apply_overrides(base, flatten(rest))


def load_config_file(path: str) -> dict[str, Any]:
    """Read a JSON config file (a full saved config or a partial one with a ``"preset"`` key)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as error:
        raise UserError(f"cannot read config file {path}: {error.strerror}") from None
    except ValueError as error:
        raise UserError(f"config file {path} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a JSON object")
    return data


def _replace_path(obj: Any, path: list[str], value: Any) -> Any:
    if len(path) == 1:
        return replace(obj, **{path[0]: value})
    child = getattr(obj, path[0])
    if child is None:  # an optional part not present yet: start from its defaults
        child = _dataclass_of(typing.get_type_hints(type(obj))[path[0]])()
    return replace(obj, **{path[0]: _replace_path(child, path[1:], value)})


def _suggestion(key: str, known: dict[str, Any]) -> str:
    import difflib

    close = difflib.get_close_matches(key, list(known), n=3)
    if close:
        return f"; did you mean {', '.join(close)}?"
    section = key.split(".")[0] + "."
    siblings = [k for k in known if k.startswith(section)]
    return f"; keys under {section!r}: {', '.join(siblings)}" if siblings else ""


def coerce(value: Any, kind: Any, key: str) -> Any:
    """``value`` (a CLI string or a JSON value) as the annotated type ``kind``, or a UserError."""
    try:
        return _coerce(value, kind)
    except (TypeError, ValueError) as error:
        raise UserError(f"bad value for {key}: {value!r} ({error})") from None


def _coerce(value: Any, kind: Any) -> Any:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if is_none and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0])
    if origin is tuple:
        return _coerce_tuple(value, args)
    if kind is bool:
        return _coerce_bool(value)
    if kind in (int, float):
        return _coerce_number(value, kind)
    if kind is str:
        if not isinstance(value, str):
            raise TypeError("expected a string")
        return value
    raise TypeError(f"unsupported field type {kind}")


def _coerce_number(value: Any, kind: type) -> int | float:
    if isinstance(value, bool):
        raise TypeError(f"expected {kind.__name__}, got a boolean")
    if isinstance(value, str):
        value = value.strip()
        if kind is int:
            return int(value.replace("_", ""))
        return float(value)
    if kind is int and not (isinstance(value, int) or float(value).is_integer()):
        raise TypeError("expected a whole number")
    return kind(value)


def _coerce_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _coerce_tuple(value: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            value = json.loads(text)
        else:
            value = [] if not text else [part.strip() for part in text.split(",")]
    if not isinstance(value, list | tuple):
        raise TypeError("expected a list")
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_coerce(v, args[0]) for v in value)
    if len(value) != len(args):
        raise ValueError(f"expected {len(args)} values")
    return tuple(_coerce(v, a) for v, a in zip(value, args, strict=True))


# ------------------------------------------------------------------------------------------ checks


def validate(config: TrainConfig) -> TrainConfig:
    """Raise a UserError for a config that cannot run; return it unchanged otherwise."""
    _check_choice("task", config.task, TASKS)
    _check_choice("data.dataset", config.data.dataset, DATASETS)
    _check_choice("precision", config.precision, PRECISIONS)
    _check_choice("optim.name", config.optim.name, OPTIMIZERS)
    _check_choice("optim.schedule", config.optim.schedule, LR_SCHEDULES)
    _check_choice("distributed.strategy", config.distributed.strategy, STRATEGIES)
    _check_choice("model.schedule.process", config.model.schedule.process, PROCESSES)
    _check_choice("model.schedule.prediction_type", config.model.schedule.prediction_type, PREDICTIONS)
    _check_prediction_fits_process(config.model.schedule)
    if config.optim.name == "adafactor" and config.distributed.strategy == "fsdp":
        # torch's Adafactor squares a row norm in place, which DTensor refuses on sharded weights
        raise UserError("optim.name=adafactor does not run with distributed.strategy=fsdp; use ddp or adamw")
    for key in ("batch_size", "max_steps", "optim.grad_accumulation", "data.resolution", "log_every"):
        if _get(config, key) < 1:
            raise UserError(f"{key} must be >= 1, got {_get(config, key)}")
    for key in (
        "data.caption_dropout",
        "ema_decay",
        "data.max_bad_fraction",
        "data.shapes_relational_fraction",
        "autoencoder_loss.colour_remap",
    ):
        if not 0.0 <= _get(config, key) <= 1.0:
            raise UserError(f"{key} must be in [0, 1], got {_get(config, key)}")
    if config.optim.lr <= 0:
        raise UserError(f"optim.lr must be > 0, got {config.optim.lr}")
    if not config.diffusion.timestep_shift > 0:
        raise UserError(f"diffusion.timestep_shift must be > 0, got {config.diffusion.timestep_shift}")
    _check_resolution(config)
    _check_pixel_loss(config)
    _check_input_perturbation(config)
    if config.task in ("diffusion", "upscaler"):
        _check_dimensions(config.model, config.task)
        if not (config.autoencoder or config.init):
            raise UserError(
                f"{config.task} training needs a trained autoencoder: pass --autoencoder PATH (the export "
                "folder of `ldm train-autoencoder`, or any model folder) or --init PATH (a model folder)"
            )
    if config.task == "upscaler":
        _check_upscaler(config)
    if config.task == "autoencoder" and not config.autoencoder_loss.train_encoder and not config.init:
        raise UserError(
            "autoencoder_loss.train_encoder=false trains a decoder for an existing encoder: pass --init PATH "
            "(the model folder whose latents it decodes)"
        )
    if config.task == "preview" and not (config.autoencoder or config.init):
        raise UserError("preview training needs the autoencoder to imitate: pass --autoencoder PATH")
    if config.seed < 0:
        raise UserError(f"seed must be >= 0, got {config.seed}")
    if config.data.refine_latents < 0:
        raise UserError(f"data.refine_latents must be >= 0, got {config.data.refine_latents}")
    if config.data.refine_latents and not config.data.cache_latents:
        raise UserError("data.refine_latents refines the cached latents: set data.cache_latents=true too")
    if config.data.cache_latents and config.data.random_flip:
        raise UserError(
            "data.cache_latents and data.random_flip exclude each other (latents are cached once)"
        )
    return config


def _check_pixel_loss(config: TrainConfig) -> None:
    """The decoded-x0 pixel term needs a diffusion run on pixels (not cached latents) of a VP model."""
    weight = config.diffusion.pixel_weight
    if weight < 0:
        raise UserError(f"diffusion.pixel_weight must be >= 0, got {weight}")
    if not weight:
        return
    if config.task != "diffusion":
        raise UserError(
            f"diffusion.pixel_weight is a diffusion-training term, not one for {config.task!r} runs"
        )
    if config.model.schedule.process != "discrete":
        raise UserError("diffusion.pixel_weight needs a discrete VP schedule, not a flow model")
    if config.data.cache_latents:
        raise UserError(
            "diffusion.pixel_weight compares decoded images with the data: drop data.cache_latents"
        )
    if config.diffusion.pixel_max_timestep < 1:
        raise UserError(
            f"diffusion.pixel_max_timestep must be >= 1, got {config.diffusion.pixel_max_timestep}"
        )


def _check_input_perturbation(config: TrainConfig) -> None:
    gamma = config.diffusion.input_perturbation
    if gamma < 0:
        raise UserError(f"diffusion.input_perturbation must be >= 0, got {gamma}")
    if gamma and config.task in ("autoencoder", "preview"):
        raise UserError(
            f"diffusion.input_perturbation is a denoising setting, not one for {config.task!r} runs"
        )


PREDICTIONS = ("epsilon", "v_prediction", "sample", "flow")
PROCESSES = ("discrete", "flow")


def _check_prediction_fits_process(schedule) -> None:
    """v-prediction belongs to the discrete VP scaling, the velocity "flow" to rectified flow."""
    from latentdiffusion.diffusion.process import check_prediction_type

    try:
        check_prediction_type(schedule.process, schedule.prediction_type)
    except ValueError as error:
        raise UserError(f"model.schedule: {error}") from None


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"{key} must be one of {', '.join(choices)}, got {value!r}")


def _get(config: Any, key: str) -> Any:
    for part in key.split("."):
        config = getattr(config, part)
    return config


def _check_resolution(config: TrainConfig) -> None:
    factor = config.model.autoencoder.downsampling_factor
    if config.task in ("diffusion", "upscaler"):
        factor *= _network_multiple(config.model)
    if config.data.resolution % factor:
        raise UserError(
            f"data.resolution {config.data.resolution} must be a multiple of {factor} for this model"
        )


def _network_multiple(model: ModelConfig) -> int:
    """How many latent pixels the denoising network's coarsest grid step spans: a U-Net halves the
    latent at each level, a transformer cuts it into patches."""
    network = _family(model).network_config(model)
    if isinstance(network, UNetConfig):
        return 2 ** (len(network.channel_mult) - 1)
    return network.patch_size


def _check_dimensions(model: ModelConfig, task: str = "diffusion") -> None:
    family = _family(model)
    family.check_config(model)  # a transformer family checks its own widths there
    network_role = family.network_role
    network = family.network_config(model)
    if isinstance(network, UNetConfig):
        texts = family.text_configs(model)  # the U-Net attends to their states side by side
        width = sum(text.hidden_size for text in texts.values())
        if network.context_dim != width:
            named = " + ".join(f"model.{role}.hidden_size" for role in texts)
            raise UserError(f"model.unet.context_dim ({network.context_dim}) must equal {named} ({width})")
    image_channels = 3 if task == "upscaler" else 0  # the upscaler's low-resolution RGB input
    expected = model.autoencoder.latent_channels + image_channels
    if network.in_channels != expected:
        plus = " + 3" if image_channels else ""
        raise UserError(
            f"model.{network_role}.in_channels ({network.in_channels}) must equal "
            f"model.autoencoder.latent_channels{plus} ({expected})"
        )


def _family(model: ModelConfig) -> Any:
    from latentdiffusion.families import family_of  # torch: imported when a config is checked, not at --help

    return family_of(model)


def _check_upscaler(config: TrainConfig) -> None:
    if not config.model.unet.num_class_embeds:
        raise UserError("an upscaler needs model.unet.num_class_embeds (the noise-level labels), e.g. 351")
    if config.data.cache_latents:
        raise UserError(
            "the upscaler cannot train on cached latents (data.cache_latents): it needs the pixels"
        )
