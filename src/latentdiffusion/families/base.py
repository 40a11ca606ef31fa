"""What a model family declares, and the pieces every family shares.

A family (Stable Diffusion 1.x/2.x, SDXL, ...) is one object that answers, for a ``ModelConfig`` of
its kind: which networks (roles) it has and how to build them; which tokenizer feeds each text
encoder; how prompts become the denoiser's condition (``cond`` dict: ``context`` for cross-attention,
``y`` for a pooled/micro-conditioning vector); its latent format. Loading asks each family whether a
file's keys are its own (``checkpoints.single_file``, ``checkpoints.diffusers_folder``). Pipelines,
guidance, samplers and the server know only this interface.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import torch

from latentdiffusion.checkpoints.network_lora import UNET_LORA, NetworkLoRA
from latentdiffusion.config import ModelConfig, TextEncoderConfig, UNetConfig
from latentdiffusion.errors import UserError
from latentdiffusion.models.tokenizer import CLIPTokenizer

if TYPE_CHECKING:
    from latentdiffusion.checkpoints.layout import Layout
    from latentdiffusion.components import Components

Cond = dict[str, Any]
MIN_SIZE_MULTIPLE = 8  # image sides are multiples of 8, as Stable Diffusion tools require
MAX_MICRO_SIZE = 65536  # a bound on stated sizes and crops (pixels)


@dataclass(frozen=True)
class LatentFormat:
    """How a family's latents relate to images: channels, the factor between image and latent sides,
    the latent scale/shift (z = (E(x) - shift) * scale) and the side of the latent patches the network
    cuts (a transformer's patch size; 1 for a U-Net). Every image side is a multiple of factor * patch."""

    channels: int
    factor: int
    scale: float
    shift: float = 0.0
    patch: int = 1

    @property
    def size_multiple(self) -> int:
        return max(MIN_SIZE_MULTIPLE, self.factor * self.patch)


@dataclass(frozen=True)
class MicroConditioning:
    """SDXL's size and crop conditioning (Podell et al. 2023, Sec. 2.2) and the refiner's aesthetic
    score, with diffusers' names and defaults; families without them ignore this. Sizes are (height,
    width) and crops (top, left) in pixels; a size left None is the size of the image being made, and
    the negative values default to the positive ones."""

    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    negative_original_size: tuple[int, int] | None = None
    negative_crops_coords_top_left: tuple[int, int] | None = None
    negative_target_size: tuple[int, int] | None = None
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5

    def validate(self) -> None:
        for name in ("original_size", "target_size", "negative_original_size", "negative_target_size"):
            _check_pair(name, getattr(self, name), minimum=1)
        for name in ("crops_coords_top_left", "negative_crops_coords_top_left"):
            _check_pair(name, getattr(self, name), minimum=0)
        for name in ("aesthetic_score", "negative_aesthetic_score"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise UserError(f"{name} must be a finite number, got {value!r}")

    def settings(self, names: Sequence[str], made: tuple[int, int]) -> dict[str, Any]:
        """The PNG-info settings of the fields ``names`` (those a family uses) whose effective value
        differs from what it would be unset (a size: the image ``made``, (height, width); a negative
        size or crop: its positive one): sizes as WIDTHxHEIGHT like the web UI's Size, a crop as its top
        and left."""
        effective, defaults = self.effective(made), MicroConditioning().effective(made)
        settings: dict[str, Any] = {}
        for name in names:
            follows_positive = name.startswith("negative_") and name != "negative_aesthetic_score"
            unset = effective[name.removeprefix("negative_")] if follows_positive else defaults[name]
            value = effective[name]
            if value == unset:
                continue
            label = name.replace("_", " ").capitalize()
            if name.endswith("crops_coords_top_left"):
                crop = label.replace("crops coords top left", "crop").replace("Crops coords top left", "Crop")
                settings[f"{crop} top"], settings[f"{crop} left"] = value
            elif name.endswith("size"):
                settings[label] = f"{value[1]}x{value[0]}"
            else:
                settings[label] = value
        return settings

    def effective(self, made: tuple[int, int]) -> dict[str, Any]:
        """Every field with the defaults filled in: sizes from the image ``made`` (height, width), the
        negative values from the positive ones."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in ("original_size", "target_size"):
            values[name] = tuple(values[name] or made)
        for name in ("original_size", "crops_coords_top_left", "target_size"):
            values[f"negative_{name}"] = tuple(values[f"negative_{name}"] or values[name])
        values["crops_coords_top_left"] = tuple(values["crops_coords_top_left"])
        return values


def _check_pair(name: str, value: Any, minimum: int) -> None:
    """None, or two whole numbers >= minimum (and at most MAX_MICRO_SIZE)."""
    if value is None:
        return
    ok = isinstance(value, tuple | list) and len(value) == 2
    ok = ok and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    if not ok or not all(minimum <= v <= MAX_MICRO_SIZE for v in value):
        raise UserError(f"{name} must be two whole numbers in [{minimum}, {MAX_MICRO_SIZE}], got {value!r}")


@dataclass(frozen=True)
class ConditioningRequest:
    """What the conditioning may depend on besides the prompts: the size of the image being made."""

    height: int
    width: int
    micro: MicroConditioning = MicroConditioning()


class Family:
    """The interface; one subclass per family, one instance of each in ``families.FAMILIES``."""

    name: str = ""
    description: str = ""
    network_role: str = "unet"  # the denoising network's role (diffusers' name: "unet" or "transformer")
    text_roles: tuple[str, ...] = ()  # the text encoders, in the order their states are concatenated
    micro_fields: tuple[str, ...] = ()  # the MicroConditioning fields the family's conditioning uses
    # LoRA layer-name prefixes of each adaptable network, the written one first (``checkpoints.lora_keys``)
    lora_prefixes: Mapping[str, tuple[str, ...]] = {}
    # how LoRA files name the denoising network's layers (``checkpoints.network_lora``: U-Net or MMDiT)
    network_lora: NetworkLoRA = UNET_LORA
    # LoRA entries the family refuses: name prefixes -> what they adapt (for the message)
    lora_refusals: Mapping[tuple[str, ...], str] = {}
    pooled_roles: tuple[str, ...] = ()  # the text encoders whose pooled output the family conditions on
    # Why the family's models cannot make an image from noise alone (None: they can); pipelines refuse
    # text-to-image with this message
    text_to_image_refusal: str | None = None

    @property
    def roles(self) -> tuple[str, ...]:
        """Every network the family's models have."""
        return (self.network_role, "autoencoder", *self.text_roles)

    def network_config(self, config: ModelConfig) -> Any:
        """The denoising network's config (``UNetConfig``, or a transformer's), for its input channels."""
        return config.unet

    def skip_layer_blocks(self, config: ModelConfig) -> int:
        """How many blocks skip-layer guidance may leave out of the denoising network (which then takes
        ``skip_layers=``); 0 for a network that cannot skip blocks (a U-Net)."""
        return 0

    optional_roles: tuple[str, ...] = ()  # networks a model can be loaded without (SD3's T5: zeros instead)

    def without_roles(self, config: ModelConfig, roles: Collection[str], source: str) -> ModelConfig:
        """``config`` without the optional networks ``roles`` (raise ``UserError`` for any other)."""
        for role in roles:
            if role not in self.optional_roles:
                raise UserError(f"{source}: {self.description} models have no {role} that can be left out")
        return config

    def model_roles(self, config: ModelConfig) -> tuple[str, ...]:
        """The networks a model of this family has (an optional text encoder may be absent)."""
        return self.roles

    def build(self, config: ModelConfig) -> dict[str, torch.nn.Module]:
        raise NotImplementedError

    def text_configs(self, config: ModelConfig) -> dict[str, TextEncoderConfig]:
        """Each text-encoder role's config."""
        raise NotImplementedError

    def tokenizers(self, config: ModelConfig) -> dict[str, CLIPTokenizer]:
        """The bundled CLIP tokenizer for each text encoder, with that encoder's padding."""
        return {role: bundled_tokenizer(text) for role, text in self.text_configs(config).items()}

    def latent_format(self, config: ModelConfig) -> LatentFormat:
        vae = config.autoencoder
        return LatentFormat(
            self.network_config(config).out_channels,
            vae.downsampling_factor,
            vae.scaling_factor,
            vae.shift_factor,
        )

    def encode(
        self,
        components: Components,
        prompts: Sequence[str],
        negative_prompts: Sequence[str],
        request: ConditioningRequest,
    ) -> tuple[Cond, Cond]:
        """(cond, uncond) for classifier-free guidance, batched like ``prompts``."""
        raise NotImplementedError

    def check_config(self, config: ModelConfig) -> None:
        """Refuse a config this family cannot build (raise ``UserError``)."""

    # ---- training (``training.diffusion`` asks the family, as pipelines do for inference)

    def training_condition(
        self, components: Components, captions: Sequence[str], requests: Sequence[ConditioningRequest]
    ) -> Cond:
        """The U-Net's cond dict for training on ``captions``, one ``request`` per item (the training size
        and the item's micro-conditioning). Runs ``components.modules`` as given (DDP wrappers, LoRA
        adapters) and keeps the graph, so gradients reach text encoders that train. Captions are data,
        not prompts: tokenized plainly (truncated, no weighting syntax). An empty caption (caption
        dropout) is conditioned as ``encode`` conditions an empty negative prompt."""
        raise NotImplementedError

    def idle_text_modules(self, components: Components) -> dict[str, tuple[str, ...]]:
        """Per text encoder, the module paths the family's conditioning never runs (only a pooled output
        reads them, and the family takes none from that encoder): training adapts and trains none of
        their weights, which would get no gradient (and stall DDP)."""
        return {
            role: components.modules[role].pooled_only_modules()
            for role in self.text_roles
            if role not in self.pooled_roles
        }

    def check_training(self, config: ModelConfig) -> None:
        """Refuse (``UserError``) a model whose training the diffusion task does not support."""

    # ---- single files (``checkpoints.single_file`` reads and writes them by role)

    def single_file_config(
        self, shapes: Mapping[str, tuple[int, ...]], source: str, name: str
    ) -> ModelConfig | None:
        """The config of a single file whose keys are this family's (from names and shapes), else None."""
        return None

    def single_file_layouts(self, config: ModelConfig) -> dict[str, Layout]:
        """Where each network's tensors live in a single file, and how they are named there."""
        raise NotImplementedError

    # ---- diffusers folders (``checkpoints.diffusers_folder`` reads and writes them by role)

    def reads_diffusers(self, index: Mapping[str, Any]) -> bool:
        """Whether a folder with this ``model_index.json`` holds one of this family's models."""
        return False

    def diffusers_base(self, unet: UNetConfig | None) -> ModelConfig:
        """The preset whose defaults (sizes, steps, guidance) a diffusers folder's model takes."""
        raise NotImplementedError

    def adapt_text_config(self, text: TextEncoderConfig) -> TextEncoderConfig:
        """A text config read from transformers' config.json, with what the family's pipeline implies."""
        return text

    def diffusers_index(self, config: ModelConfig) -> dict[str, Any]:
        """The family's entries of ``model_index.json``: the pipeline class and its extra settings."""
        raise NotImplementedError


def bundled_tokenizer(text: TextEncoderConfig) -> CLIPTokenizer:
    return CLIPTokenizer.from_bundled(pad_token_id=text.pad_token_id, max_length=text.max_length)


def module_device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def text_modules(components: Components, roles: Sequence[str]) -> Mapping[str, torch.nn.Module]:
    return {role: components.modules[role] for role in roles}
