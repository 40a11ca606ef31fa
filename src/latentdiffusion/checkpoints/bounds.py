"""One validation step for every model config, whatever its source, before any network is built.

A model's config comes from strangers as often as its weights do: the ``latentdiffusion.config``
metadata of a single file, a CompVis ``.yaml`` beside it, a diffusers ``config.json``, our own
``latentdiffusion.json``, or detection from tensor shapes. Every number that decides how big a network
is (or that the maths divides by or indexes with) is checked here for its type and its range, so that a
block count of 10^6 or a head count of 0 is one clear message naming the field, the value and the limit,
never an allocation of gigabytes, a hang or a ZeroDivisionError.

The limits are generous: several times the largest released model of each family (SDXL base and
refiner, SD 3/3.5 and FLUX sizes included: U-Net widths up to 1280, 2432-wide transformers, 4096-wide
T5 contexts, 38 transformer layers, 10 transformer blocks per level, 256 text tokens).
"""

from __future__ import annotations

import math
from dataclasses import is_dataclass
from typing import Any

from latentdiffusion.config import (
    EPS_SCALING_RANGE,
    AutoencoderConfig,
    ControlNetConfig,
    MMDiTConfig,
    ModelConfig,
    ScheduleConfig,
    T5Config,
    TextEncoderConfig,
    UNetConfig,
)
from latentdiffusion.errors import UserError

# (lowest, highest) of each integer field; None in a range's place means the field may be None
UNET_INTS = {
    "in_channels": (1, 64),
    "out_channels": (1, 64),
    "model_channels": (1, 4096),
    "num_res_blocks": (1, 16),
    "transformer_depth": (0, 64),
    "context_dim": (1, 16384),
    "norm_groups": (1, 1024),
}
UNET_OPTIONAL_INTS = {
    "num_heads": (1, 256),
    "head_dim": (1, 1024),
    "transformer_depth_middle": (0, 64),
    "num_class_embeds": (1, 100_000),
    "adm_in_channels": (1, 16384),
}
MAX_LEVELS = 8  # SD and SDXL: 3-4 levels
MAX_CHANNEL_MULT = 64
MAX_WIDTH = 16384  # widest U-Net level (SDXL: 1280)
MAX_TRANSFORMER_BLOCKS = 1000  # over the whole U-Net (SDXL base: 70)
AUTOENCODER_INTS = {
    "in_channels": (1, 64),
    "out_channels": (1, 64),
    "latent_channels": (1, 256),
    "num_res_blocks": (1, 16),
    "norm_groups": (1, 1024),
}
MAX_AUTOENCODER_WIDTH = 4096  # SD: 512
TEXT_INTS = {
    "vocab_size": (1, 1_000_000),  # CLIP 49408, T5 32128
    "hidden_size": (1, 16384),  # bigG 1280, T5-XXL 4096
    "num_layers": (1, 256),  # bigG 32
    "num_heads": (1, 256),
    "intermediate_size": (1, 65536),  # T5-XXL 10240
    "max_length": (1, 4096),  # CLIP 77, T5 512
    "skip_last_layers": (0, 255),
}
TEXT_OPTIONAL_INTS = {"projection_dim": (1, 16384)}
TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id")
ACTIVATIONS = ("quick_gelu", "gelu")
SCHEDULE_INTS = {"num_train_timesteps": (2, 100_000), "steps_offset": (0, 1000)}
BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
MMDIT_INTS = {
    "in_channels": (1, 256),
    "out_channels": (1, 256),
    "patch_size": (1, 16),
    "depth": (1, 256),  # SD3.5 Large: 38
    "num_heads": (1, 256),
    "head_dim": (1, 1024),
    "context_dim": (1, 16384),
    "pooled_dim": (1, 16384),
    "pos_embed_max_size": (1, 1024),  # SD3.5 Medium: 384
    "sample_size": (1, 4096),
}
MAX_MMDIT_WIDTH = 16384  # SD3.5 Large: 2432
QK_NORMS = ("rms_norm",)
T5_INTS = {
    "vocab_size": (1, 1_000_000),
    "hidden_size": (1, 16384),  # T5-XXL: 4096
    "head_dim": (1, 1024),
    "intermediate_size": (1, 65536),
    "num_layers": (1, 256),
    "num_heads": (1, 256),
    "relative_attention_num_buckets": (2, 4096),
    "relative_attention_max_distance": (1, 1_000_000),
    "max_length": (1, 4096),
}
MODEL_INTS = {"sample_size": (8, 16384), "default_steps": (1, 10_000)}
MAX_GUIDANCE = 1000.0
MAX_EPS = 1.0


def validate_model_config(config: Any, source: str) -> ModelConfig:
    """Return ``config`` if every field has its type and lies in its range, else raise one UserError
    naming the field (``unet.channel_mult[2]``), the value and the limit."""
    _check(config, source)
    return config


def validate_controlnet_config(config: Any, source: str) -> ControlNetConfig:
    """``validate_model_config`` for a ControlNet: its U-Net part and its hint encoder."""
    v = _Checker(source)
    v.kind(config, ControlNetConfig, "config")
    _check_unet(v, config.unet)
    v.integer(config.hint_in_channels, "hint_in_channels", 1, 64)
    v.int_tuple(config.hint_channels, "hint_channels", 1, 8, 1, MAX_WIDTH)
    return config


def _check(config: Any, source: str) -> None:
    v = _Checker(source)
    v.kind(config, ModelConfig, "config")
    v.string(config.name, "name")
    v.string(config.family, "family")
    _check_unet(v, config.unet)
    _check_autoencoder(v, config.autoencoder)
    for role in ("text_encoder", "text_encoder_2"):
        text = getattr(config, role)
        if text is not None:
            _check_text(v, text, role)
    if config.text_encoder_3 is not None:
        _check_t5(v, config.text_encoder_3, "text_encoder_3")
    if config.transformer is not None:
        _check_mmdit(v, config.transformer)
    _check_schedule(v, config.schedule)
    for name, (low, high) in MODEL_INTS.items():
        v.integer(getattr(config, name), name, low, high)
    v.string(config.default_sampler, "default_sampler")
    if config.default_sigmas is not None:
        v.string(config.default_sigmas, "default_sigmas")
    v.boolean(config.zero_empty_negative, "zero_empty_negative")
    v.number(config.default_guidance_scale, "default_guidance_scale", -MAX_GUIDANCE, MAX_GUIDANCE)
    v.number(config.guidance_min_sigma, "guidance_min_sigma", 0.0, 1e6)
    v.number(config.default_eps_scaling, "default_eps_scaling", *EPS_SCALING_RANGE)


def _check_unet(v: _Checker, unet: Any) -> None:
    v.kind(unet, UNetConfig, "unet")
    for name, (low, high) in UNET_INTS.items():
        v.integer(getattr(unet, name), f"unet.{name}", low, high)
    for name, (low, high) in UNET_OPTIONAL_INTS.items():
        if getattr(unet, name) is not None:
            v.integer(getattr(unet, name), f"unet.{name}", low, high)
    for name in ("use_linear_projection", "upcast_attention", "coordinate_channels"):
        v.boolean(getattr(unet, name), f"unet.{name}")
    v.number(unet.norm_eps, "unet.norm_eps", 1e-12, MAX_EPS, low_open=False)
    v.number(unet.dropout, "unet.dropout", 0.0, 1.0)
    mult = v.int_tuple(unet.channel_mult, "unet.channel_mult", 1, MAX_LEVELS, 1, MAX_CHANNEL_MULT)
    levels = len(mult)
    v.int_tuple(unet.attention_levels, "unet.attention_levels", 0, levels, 0, levels - 1)
    if len(set(unet.attention_levels)) != len(unet.attention_levels):
        v.fail("unet.attention_levels", unet.attention_levels, "each level at most once")
    if unet.transformer_depths:
        v.int_tuple(unet.transformer_depths, "unet.transformer_depths", levels, levels, 0, 64)
    if unet.only_cross_attention:
        v.bool_tuple(unet.only_cross_attention, "unet.only_cross_attention", levels)
    if (unet.num_heads is None) == (unet.head_dim is None):
        v.fail("unet.num_heads", unet.num_heads, "exactly one of num_heads and head_dim is set")
    widths = [unet.model_channels * m for m in mult]
    for level, width in enumerate(widths):
        v.at_most(width, f"unet.model_channels * channel_mult[{level}]", MAX_WIDTH)
        v.divides(unet.norm_groups, width, "unet.norm_groups", f"the level {level} width {width}")
    for level in {*unet.attention_levels, levels - 1}:
        _check_heads(v, unet, widths[level], level)
    blocks = sum(unet.depth_at(level) for level in unet.attention_levels) * (2 * unet.num_res_blocks + 1)
    v.at_most(blocks + unet.middle_depth, "unet transformer blocks in all", MAX_TRANSFORMER_BLOCKS)


def _check_heads(v: _Checker, unet: UNetConfig, width: int, level: int) -> None:
    if unet.head_dim is not None:
        v.divides(unet.head_dim, width, "unet.head_dim", f"the level {level} width {width}")
    else:
        v.divides(unet.num_heads, width, "unet.num_heads", f"the level {level} width {width}")


def _check_autoencoder(v: _Checker, vae: Any) -> None:
    v.kind(vae, AutoencoderConfig, "autoencoder")
    for name, (low, high) in AUTOENCODER_INTS.items():
        v.integer(getattr(vae, name), f"autoencoder.{name}", low, high)
    v.boolean(vae.identity, "autoencoder.identity")
    widths = v.int_tuple(
        vae.block_channels, "autoencoder.block_channels", 1, MAX_LEVELS, 1, MAX_AUTOENCODER_WIDTH
    )
    if not vae.identity:
        for level, width in enumerate(widths):
            v.divides(vae.norm_groups, width, "autoencoder.norm_groups", f"block_channels[{level}] {width}")
    v.number(vae.norm_eps, "autoencoder.norm_eps", 1e-12, MAX_EPS)
    v.number(vae.scaling_factor, "autoencoder.scaling_factor", 1e-6, 1e6)
    v.number(vae.shift_factor, "autoencoder.shift_factor", -1e6, 1e6)


def _check_text(v: _Checker, text: Any, role: str) -> None:
    v.kind(text, TextEncoderConfig, role)
    for name, (low, high) in TEXT_INTS.items():
        v.integer(getattr(text, name), f"{role}.{name}", low, high)
    for name, (low, high) in TEXT_OPTIONAL_INTS.items():
        if getattr(text, name) is not None:
            v.integer(getattr(text, name), f"{role}.{name}", low, high)
    for name in TOKEN_IDS:
        v.integer(getattr(text, name), f"{role}.{name}", 0, text.vocab_size - 1)
    v.at_most(text.skip_last_layers, f"{role}.skip_last_layers", text.num_layers - 1)
    v.divides(text.num_heads, text.hidden_size, f"{role}.num_heads", f"hidden_size {text.hidden_size}")
    v.choice(text.activation, f"{role}.activation", ACTIVATIONS)
    v.number(text.layer_norm_eps, f"{role}.layer_norm_eps", 1e-12, MAX_EPS)
    for name in ("context_from_penultimate", "causal"):
        v.boolean(getattr(text, name), f"{role}.{name}")


def _check_mmdit(v: _Checker, network: Any) -> None:
    v.kind(network, MMDiTConfig, "transformer")
    for name, (low, high) in MMDIT_INTS.items():
        v.integer(getattr(network, name), f"transformer.{name}", low, high)
    v.at_most(network.hidden_size, "transformer.num_heads * head_dim", MAX_MMDIT_WIDTH)
    v.number(network.mlp_ratio, "transformer.mlp_ratio", 0.0, 64.0, low_open=True)
    if network.qk_norm is not None:
        v.choice(network.qk_norm, "transformer.qk_norm", QK_NORMS)
    depth = network.depth
    v.int_tuple(network.dual_attention_layers, "transformer.dual_attention_layers", 0, depth, 0, depth - 1)


def _check_t5(v: _Checker, text: Any, role: str) -> None:
    v.kind(text, T5Config, role)
    for name, (low, high) in T5_INTS.items():
        v.integer(getattr(text, name), f"{role}.{name}", low, high)
    v.at_most(text.num_heads * text.head_dim, f"{role}.num_heads * head_dim", 65536)
    for name in ("pad_token_id", "eos_token_id"):
        v.integer(getattr(text, name), f"{role}.{name}", 0, text.vocab_size - 1)
    v.number(text.layer_norm_eps, f"{role}.layer_norm_eps", 1e-12, MAX_EPS)


def _check_schedule(v: _Checker, schedule: Any) -> None:
    v.kind(schedule, ScheduleConfig, "schedule")
    for name, (low, high) in SCHEDULE_INTS.items():
        v.integer(getattr(schedule, name), f"schedule.{name}", low, high)
    v.choice(schedule.beta_schedule, "schedule.beta_schedule", BETA_SCHEDULES)
    v.choice(schedule.prediction_type, "schedule.prediction_type", PREDICTION_TYPES)
    v.choice(schedule.timestep_spacing, "schedule.timestep_spacing", TIMESTEP_SPACINGS)
    v.number(schedule.beta_start, "schedule.beta_start", 0.0, 1.0, low_open=True, high_open=True)
    v.number(schedule.beta_end, "schedule.beta_end", schedule.beta_start, 1.0, high_open=True)
    for name in ("set_alpha_to_one", "rescale_zero_terminal_snr"):
        v.boolean(getattr(schedule, name), f"schedule.{name}")
    from latentdiffusion.diffusion.process import DISCRETE_PREDICTIONS, FLOW_PREDICTIONS, PROCESSES

    v.choice(schedule.process, "schedule.process", PROCESSES)
    # the time shift of rectified flow (SD3: 3.0); it maps t in (0, 1) into (0, 1) for any shift > 0
    v.number(schedule.shift, "schedule.shift", 0.0, 1000.0, low_open=True)
    fits = FLOW_PREDICTIONS if schedule.process == "flow" else DISCRETE_PREDICTIONS
    v.choice(schedule.prediction_type, f"schedule.prediction_type of a {schedule.process} model", fits)


class _Checker:
    """The checks, each raising one UserError that names the field, the value and the limit."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, name: str, value: Any, limit: str) -> None:
        shown = repr(value)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        raise UserError(f"{self.source}: invalid model config: {name} = {shown}; expected {limit}")

    def kind(self, value: Any, cls: type, name: str) -> None:
        if not (is_dataclass(value) and isinstance(value, cls)):
            self.fail(name, value, f"a {cls.__name__} mapping")

    def integer(self, value: Any, name: str, low: int, high: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(name, value, f"an integer from {low} to {high}")
        if not low <= value <= high:
            self.fail(name, value, f"an integer from {low} to {high}")
        return value

    def at_most(self, value: int, name: str, high: int) -> None:
        if value > high:
            self.fail(name, value, f"at most {high}")

    def number(
        self,
        value: Any,
        name: str,
        low: float,
        high: float,
        *,
        low_open: bool = False,
        high_open: bool = False,
    ) -> float:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        ok = (
            ok
            and (value > low if low_open else value >= low)
            and (value < high if high_open else value <= high)
        )
        if not ok:
            left, right = "(" if low_open else "[", ")" if high_open else "]"
            self.fail(name, value, f"a finite number in {left}{low:g}, {high:g}{right}")
        return value

    def boolean(self, value: Any, name: str) -> None:
        if not isinstance(value, bool):
            self.fail(name, value, "true or false")

    def string(self, value: Any, name: str) -> None:
        if not isinstance(value, str) or len(value) > 1000:
            self.fail(name, value, "a string of at most 1000 characters")

    def choice(self, value: Any, name: str, choices: tuple[str, ...]) -> None:
        if not isinstance(value, str) or value not in choices:
            self.fail(name, value, f"one of {', '.join(choices)}")

    def divides(self, divisor: int, width: int, name: str, what: str) -> None:
        if width % divisor:
            self.fail(name, divisor, f"a divisor of {what}")

    def int_tuple(
        self, value: Any, name: str, min_len: int, max_len: int, low: int, high: int
    ) -> tuple[int, ...]:
        if not isinstance(value, tuple | list) or not min_len <= len(value) <= max_len:
            self.fail(name, value, f"a list of {min_len} to {max_len} integers")
        for i, item in enumerate(value):
            self.integer(item, f"{name}[{i}]", low, high)
        return tuple(value)

    def bool_tuple(self, value: Any, name: str, length: int) -> None:
        if not isinstance(value, tuple | list) or len(value) != length:
            self.fail(name, value, f"a list of {length} booleans (one per level)")
        for i, item in enumerate(value):
            self.boolean(item, f"{name}[{i}]")
