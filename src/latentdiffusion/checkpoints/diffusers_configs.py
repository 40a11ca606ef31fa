"""diffusers / transformers ``config.json`` files <-> our config dataclasses.

One trap: diffusers' ``UNet2DConditionModel.attention_head_dim`` is a number of heads (its own
``num_attention_heads``, which takes precedence when set). SD 1.x writes one count for every level
(8); SD 2.x writes a count per level ([5, 10, 20, 20]) that keeps every head 64 wide. We read both
and keep whichever is constant: ``num_heads`` or ``head_dim``. SDXL writes head counts per level too
([5, 10, 20]: 64-wide heads).

diffusers' ``transformer_layers_per_block`` is one number or one per level (SDXL base [1, 2, 10]: levels
without attention ignore theirs), and its mid block takes the last entry. We keep one number where every
attention level and the mid block agree, else per-level depths (0 where a level has no attention, as
sgm's ``transformer_depth``). SDXL's ``addition_embed_type: "text_time"`` is our ``adm_in_channels``
(``projection_class_embeddings_input_dim``); its micro-conditioning sinusoids are 256 wide.

Settings that change the computation and that our networks do not implement are refused by name
rather than ignored.
"""

from __future__ import annotations

from typing import Any

from latentdiffusion.config import AutoencoderConfig, ScheduleConfig, TextEncoderConfig, UNetConfig

# diffusers UNet2DConditionModel settings we implement only at these values (absent = this value)
UNET_FIXED: dict[str, Any] = {
    "act_fn": "silu",
    "attention_type": "default",
    "center_input_sample": False,
    "class_embeddings_concat": False,
    "class_embed_type": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_norm": None,
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_scale_factor": 1,
    "mid_block_only_cross_attention": None,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "reverse_transformer_layers_per_block": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
}
AUTOENCODER_FIXED: dict[str, Any] = {
    "act_fn": "silu",
    "mid_block_add_attention": True,
    "latents_mean": None,
    "latents_std": None,
}
ADDITION_EMBED_TYPES = (None, "text_time")
# SDXL's micro-conditioning sinusoid width (sgm's ConcatTimestepEmbedderND outdim; diffusers'
# addition_time_embed_dim); the pipelines build y with it
ADDITION_TIME_EMBED_DIM = 256
TEXT_ARCHITECTURES = ("CLIPTextModel", "CLIPTextModelWithProjection")
# diffusers scheduler class -> (our sampler, its default timestep_spacing, its default set_alpha_to_one)
SCHEDULERS: dict[str, tuple[str, str, bool]] = {
    "PNDMScheduler": ("plms", "leading", False),
    "DDIMScheduler": ("ddim", "leading", True),
    "DDPMScheduler": ("ddpm", "leading", False),
    "EulerDiscreteScheduler": ("euler", "linspace", False),
    "EulerAncestralDiscreteScheduler": ("euler_ancestral", "linspace", False),
    "HeunDiscreteScheduler": ("heun", "linspace", False),
    "LMSDiscreteScheduler": ("lms", "linspace", False),
    "DPMSolverMultistepScheduler": ("dpmpp_2m", "linspace", False),
    "UniPCMultistepScheduler": ("unipc", "linspace", False),
    "LCMScheduler": ("lcm", "leading", True),
    "TCDScheduler": ("tcd", "leading", True),
}
SDE_ALGORITHMS = ("sde-dpmsolver++",)
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}


def check_fixed(config: dict[str, Any], fixed: dict[str, Any], what: str) -> None:
    bad = [f"{k}={config[k]!r}" for k, v in fixed.items() if k in config and config[k] != v]
    if bad:
        raise ValueError(f"{what} settings this version does not implement: {', '.join(bad)}")


def _uniform(value: Any, name: str) -> Any:
    values = value if isinstance(value, list | tuple) else [value]
    if len(set(values)) != 1:
        raise ValueError(f"{name} must be the same on every level, got {value}")
    return values[0]


def unet_from_diffusers(config: dict[str, Any]) -> UNetConfig:
    check_fixed(config, UNET_FIXED, "U-Net")
    widths = list(config["block_out_channels"])
    down = list(config["down_block_types"])
    kinds = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
    if any(t not in kinds for t in down):
        raise ValueError(f"down_block_types {down} (expected CrossAttnDownBlock2D / DownBlock2D)")
    up = ["CrossAttnUpBlock2D" if kinds[t] else "UpBlock2D" for t in reversed(down)]
    if list(config.get("up_block_types", up)) != up:
        raise ValueError(f"up_block_types {config['up_block_types']} do not mirror down_block_types")
    levels = tuple(i for i, t in enumerate(down) if kinds[t])
    num_heads, head_dim = _heads(
        config.get("num_attention_heads") or config["attention_head_dim"], widths, levels
    )
    only_cross = config.get("only_cross_attention", False)
    if only_cross is True:  # diffusers then makes the mid block cross-attention only as well
        raise ValueError("only_cross_attention: true (mid block included) is not supported; give a list")
    only_cross = tuple(only_cross) if isinstance(only_cross, list | tuple) else ()
    return UNetConfig(
        in_channels=config.get("in_channels", 4),
        out_channels=config.get("out_channels", 4),
        model_channels=widths[0],
        channel_mult=tuple(w // widths[0] for w in widths),
        num_res_blocks=_uniform(config.get("layers_per_block", 2), "layers_per_block"),
        attention_levels=levels,
        num_heads=num_heads,
        head_dim=head_dim,
        **_depths(config.get("transformer_layers_per_block", 1), levels, len(widths)),
        context_dim=_uniform(config.get("cross_attention_dim", 1280), "cross_attention_dim"),
        use_linear_projection=bool(config.get("use_linear_projection", False)),
        only_cross_attention=only_cross,
        num_class_embeds=config.get("num_class_embeds"),
        adm_in_channels=_adm_in_channels(config),
        norm_groups=config.get("norm_num_groups", 32),
        norm_eps=config.get("norm_eps", 1e-5),
        upcast_attention=bool(config.get("upcast_attention", False)),
        time_cond_proj_dim=_time_cond_proj_dim(config.get("time_cond_proj_dim")),
    )


def _time_cond_proj_dim(value: Any) -> int | None:
    """An LCM-distilled U-Net's guidance-embedding width (None: an ordinary U-Net)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 2 < value <= 4096:
        raise ValueError(f"time_cond_proj_dim must be a whole number in 3..4096, got {value!r}")
    return value


def _depths(value: Any, levels: tuple[int, ...], count: int) -> dict[str, Any]:
    """diffusers' transformer_layers_per_block -> our transformer_depth(s) / transformer_depth_middle."""
    if isinstance(value, int):
        return {"transformer_depth": value}
    values = list(value)
    if len(values) != count or not all(isinstance(v, int) for v in values):
        raise ValueError(f"transformer_layers_per_block {value} (expected one number per level)")
    per_level = tuple(v if level in levels else 0 for level, v in enumerate(values))
    middle = values[-1]  # diffusers' mid block takes the last level's entry, attention or not
    if {per_level[level] for level in levels} <= {middle}:
        return {"transformer_depth": middle}
    return {
        "transformer_depths": per_level,
        "transformer_depth_middle": None if middle == per_level[-1] else middle,
    }


def _adm_in_channels(config: dict[str, Any]) -> int | None:
    """SDXL's vector-conditioning width from ``addition_embed_type: "text_time"``, else None."""
    kind = config.get("addition_embed_type")
    if kind not in ADDITION_EMBED_TYPES:
        raise ValueError(f"addition_embed_type {kind!r} is not supported (only 'text_time', SDXL's)")
    if kind is None:
        return None
    if config.get("addition_time_embed_dim") != ADDITION_TIME_EMBED_DIM:
        raise ValueError(
            f"addition_time_embed_dim={config.get('addition_time_embed_dim')!r}: this version embeds "
            f"SDXL's micro-conditioning {ADDITION_TIME_EMBED_DIM} wide"
        )
    return int(config["projection_class_embeddings_input_dim"])


def _heads(value: Any, widths: list[int], levels: tuple[int, ...]) -> tuple[int | None, int | None]:
    """diffusers' head counts -> (num_heads, None) or (None, head_dim). One number is a constant count
    (SD 1); a per-level list (SD 2, SDXL) means heads of constant width, as those models define them,
    and is read as a constant count only when the widths differ."""
    per_level = isinstance(value, list | tuple)
    counts = list(value) if per_level else [value] * len(widths)
    used = [(widths[level], counts[level]) for level in levels] + [(widths[-1], counts[-1])]
    dims = {width // heads for width, heads in used if width % heads == 0}
    constant_width = len(dims) == 1 and not any(width % heads for width, heads in used)
    if len({heads for _, heads in used}) == 1 and not (per_level and constant_width):
        return used[0][1], None
    if not constant_width:
        raise ValueError(f"attention heads {value} are neither constant nor of constant width")
    return None, dims.pop()


def unet_to_diffusers(unet: UNetConfig, sample_size: int) -> dict[str, Any]:
    widths = [unet.model_channels * m for m in unet.channel_mult]
    attention = [level in unet.attention_levels for level in range(len(widths))]
    heads = unet.num_heads if unet.head_dim is None else [w // unet.head_dim for w in widths]
    return {
        "_class_name": "UNet2DConditionModel",
        "sample_size": sample_size,
        "in_channels": unet.in_channels,
        "out_channels": unet.out_channels,
        "block_out_channels": widths,
        "layers_per_block": unet.num_res_blocks,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "attention_head_dim": heads,
        "transformer_layers_per_block": _depths_to_diffusers(unet),
        "cross_attention_dim": unet.context_dim,
        "use_linear_projection": unet.use_linear_projection,
        "only_cross_attention": list(unet.only_cross_attention) or False,
        "num_class_embeds": unet.num_class_embeds,
        "norm_num_groups": unet.norm_groups,
        "norm_eps": unet.norm_eps,
        "upcast_attention": unet.upcast_attention,
        "time_cond_proj_dim": unet.time_cond_proj_dim,
        **_addition_to_diffusers(unet),
        **UNET_FIXED,
    }


def _depths_to_diffusers(unet: UNetConfig) -> int | list[int]:
    """One number where every level and the mid block agree, else one per level with the mid block's
    depth last (diffusers reads it there)."""
    if not unet.transformer_depths and unet.middle_depth == unet.transformer_depth:
        return unet.transformer_depth
    last = len(unet.channel_mult) - 1
    values = [unet.depth_at(level) if level in unet.attention_levels else 0 for level in range(last + 1)]
    if last in unet.attention_levels and values[-1] != unet.middle_depth:
        raise ValueError(
            f"diffusers gives the mid block the deepest level's transformer depth ({values[-1]}), "
            f"not {unet.middle_depth}"
        )
    values[-1] = unet.middle_depth
    return values


def _addition_to_diffusers(unet: UNetConfig) -> dict[str, Any]:
    if unet.adm_in_channels is None:
        return {"addition_embed_type": None}
    return {
        "addition_embed_type": "text_time",
        "addition_embed_type_num_heads": 64,  # diffusers' default; "text_time" does not read it
        "addition_time_embed_dim": ADDITION_TIME_EMBED_DIM,
        "projection_class_embeddings_input_dim": unet.adm_in_channels,
    }


def autoencoder_from_diffusers(config: dict[str, Any]) -> AutoencoderConfig:
    check_fixed(config, AUTOENCODER_FIXED, "autoencoder")
    quant = config.get("use_quant_conv", True), config.get("use_post_quant_conv", True)
    if quant[0] != quant[1]:
        raise ValueError(
            "an autoencoder with only one of use_quant_conv / use_post_quant_conv is not supported"
        )
    widths = tuple(config["block_out_channels"])
    types = set(config.get("down_block_types", ())) | set(config.get("up_block_types", ()))
    if not types <= {"DownEncoderBlock2D", "UpDecoderBlock2D"}:
        raise ValueError(f"autoencoder block types {sorted(types)} are not supported")
    return AutoencoderConfig(
        in_channels=config.get("in_channels", 3),
        out_channels=config.get("out_channels", 3),
        latent_channels=config.get("latent_channels", 4),
        block_channels=widths,
        num_res_blocks=config.get("layers_per_block", 2),
        norm_groups=config.get("norm_num_groups", 32),
        scaling_factor=float(config.get("scaling_factor", 0.18215)),
        shift_factor=float(config.get("shift_factor") or 0.0),
        use_quant_conv=bool(quant[0]),
    )


def autoencoder_to_diffusers(vae: AutoencoderConfig, sample_size: int) -> dict[str, Any]:
    levels = len(vae.block_channels)
    return {
        "_class_name": "AutoencoderKL",
        "sample_size": sample_size,
        "in_channels": vae.in_channels,
        "out_channels": vae.out_channels,
        "latent_channels": vae.latent_channels,
        "block_out_channels": list(vae.block_channels),
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "layers_per_block": vae.num_res_blocks,
        "norm_num_groups": vae.norm_groups,
        "scaling_factor": vae.scaling_factor,
        "shift_factor": vae.shift_factor or None,
        "use_quant_conv": vae.use_quant_conv,
        "use_post_quant_conv": vae.use_quant_conv,
        **AUTOENCODER_FIXED,
    }


def text_encoder_from_hf(config: dict[str, Any], pad_token_id: int) -> TextEncoderConfig:
    """A transformers CLIPTextConfig (or the ``text_config`` of a CLIPConfig); padding from the tokenizer."""
    config = config.get("text_config") or config
    architectures = config.get("architectures") or ["CLIPTextModel"]
    if not set(architectures) <= set(TEXT_ARCHITECTURES):
        raise ValueError(
            f"text encoder architectures {architectures} (expected {', '.join(TEXT_ARCHITECTURES)})"
        )
    projection = "CLIPTextModelWithProjection" in architectures
    return TextEncoderConfig(
        vocab_size=config.get("vocab_size", 49408),
        hidden_size=config.get("hidden_size", 512),
        num_layers=config.get("num_hidden_layers", 12),
        num_heads=config.get("num_attention_heads", 8),
        intermediate_size=config.get("intermediate_size", 2048),
        max_length=config.get("max_position_embeddings", 77),
        activation=config.get("hidden_act", "quick_gelu"),
        layer_norm_eps=config.get("layer_norm_eps", 1e-5),
        pad_token_id=pad_token_id,
        projection_dim=config.get("projection_dim", 512) if projection else None,  # transformers' default
    )


def text_encoder_to_hf(text: TextEncoderConfig) -> dict[str, Any]:
    """The CLIPTextConfig of the layers that run (an SD 2 encoder is written with its 23 layers); an
    encoder with a projection is a CLIPTextModelWithProjection."""
    return {
        "architectures": ["CLIPTextModel" if text.projection_dim is None else "CLIPTextModelWithProjection"],
        "model_type": "clip_text_model",
        "vocab_size": text.vocab_size,
        "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size,
        "projection_dim": text.projection_dim or text.hidden_size,
        "num_hidden_layers": text.num_layers - text.skip_last_layers,
        "num_attention_heads": text.num_heads,
        "max_position_embeddings": text.max_length,
        "hidden_act": text.activation,
        "layer_norm_eps": text.layer_norm_eps,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "bos_token_id": text.bos_token_id,
        "eos_token_id": text.eos_token_id,
        "pad_token_id": text.pad_token_id,
    }


def schedule_from_diffusers(config: dict[str, Any]) -> tuple[ScheduleConfig, str | None, str | None]:
    """(schedule, default sampler or None, default sigmas) from a scheduler_config.json; a flow scheduler
    (FlowMatchEulerDiscreteScheduler, or a multistep one with ``use_flow_sigmas``) gives a rectified-flow
    schedule."""
    if config.get("_class_name") in FLOW_SCHEDULERS or config.get("use_flow_sigmas"):
        return _flow_schedule_from_diffusers(config)
    if config.get("trained_betas") is not None:
        raise ValueError("explicit trained_betas are not supported")
    name = config.get("_class_name", "")
    sampler, spacing, alpha_to_one = SCHEDULERS.get(name, (None, "leading", False))
    if sampler == "dpmpp_2m" and config.get("algorithm_type") in SDE_ALGORITHMS:
        sampler = "dpmpp_2m_sde"
    beta_schedule = config.get("beta_schedule", "linear")
    if beta_schedule not in BETA_SCHEDULES:
        raise ValueError(f"beta_schedule {beta_schedule!r} is not supported")
    schedule = ScheduleConfig(
        num_train_timesteps=config.get("num_train_timesteps", 1000),
        beta_schedule=BETA_SCHEDULES[beta_schedule],
        beta_start=float(config.get("beta_start", 0.0001)),
        beta_end=float(config.get("beta_end", 0.02)),
        prediction_type=config.get("prediction_type", "epsilon"),
        timestep_spacing=config.get("timestep_spacing", spacing),
        steps_offset=config.get("steps_offset", 0),
        set_alpha_to_one=bool(config.get("set_alpha_to_one", alpha_to_one)),
        rescale_zero_terminal_snr=bool(config.get("rescale_betas_zero_snr", False)),
    )
    return schedule, sampler, ramp_from_diffusers(config)


def ramp_from_diffusers(config: dict[str, Any]) -> str | None:
    """The noise-level ramp a scheduler config asks for ("karras", "exponential"), else None."""
    if config.get("use_karras_sigmas"):
        return "karras"
    return "exponential" if config.get("use_exponential_sigmas") else None


def schedule_to_diffusers(schedule: ScheduleConfig, sampler: str, sigmas: str | None) -> dict[str, Any]:
    if schedule.process == "flow":
        return _flow_schedule_to_diffusers(schedule, sampler, sigmas)
    classes = {s: name for name, (s, _, _) in SCHEDULERS.items()}
    name = classes.get("dpmpp_2m" if sampler == "dpmpp_2m_sde" else sampler, "PNDMScheduler")
    config = {
        "_class_name": name,
        "num_train_timesteps": schedule.num_train_timesteps,
        "beta_schedule": {v: k for k, v in BETA_SCHEDULES.items()}[schedule.beta_schedule],
        "beta_start": schedule.beta_start,
        "beta_end": schedule.beta_end,
        "prediction_type": schedule.prediction_type,
        "timestep_spacing": schedule.timestep_spacing,
        "steps_offset": schedule.steps_offset,
        "set_alpha_to_one": schedule.set_alpha_to_one,
        "rescale_betas_zero_snr": schedule.rescale_zero_terminal_snr,
        "use_karras_sigmas": sigmas == "karras",
        "use_exponential_sigmas": sigmas == "exponential",
        "clip_sample": False,
        "skip_prk_steps": True,
    }
    if sampler == "dpmpp_2m_sde":
        config["algorithm_type"] = "sde-dpmsolver++"
    return config


# Flow-matching schedulers (Esser et al. 2024, SD3): their sampler and the key of their time shift.
FLOW_SCHEDULERS = {"FlowMatchEulerDiscreteScheduler": "euler", "FlowMatchHeunDiscreteScheduler": "heun"}
FLOW_UNSUPPORTED = {
    "use_dynamic_shifting": False,  # FLUX's resolution-dependent shift
    "invert_sigmas": False,
    "shift_terminal": None,
    "stochastic_sampling": False,
    "use_beta_sigmas": False,
}


def _flow_schedule_from_diffusers(config: dict[str, Any]) -> tuple[ScheduleConfig, str | None, str | None]:
    name = config.get("_class_name", "")
    check_fixed(config, FLOW_UNSUPPORTED, name or "flow scheduler")
    if name in FLOW_SCHEDULERS:
        sampler, shift = FLOW_SCHEDULERS[name], config.get("shift", 1.0)
    else:  # DPMSolverMultistep / UniPCMultistep with use_flow_sigmas
        sampler, shift = SCHEDULERS.get(name, (None, "", False))[0], config.get("flow_shift", 1.0)
        if sampler == "dpmpp_2m" and config.get("algorithm_type") in SDE_ALGORITHMS:
            sampler = "dpmpp_2m_sde"
        if config.get("prediction_type", "flow_prediction") != "flow_prediction":
            raise ValueError(
                f"flow sigmas with prediction_type {config['prediction_type']!r}: expected flow_prediction"
            )
    schedule = ScheduleConfig(
        num_train_timesteps=config.get("num_train_timesteps", 1000),
        prediction_type="flow",
        process="flow",
        shift=float(shift),
    )
    return schedule, sampler, ramp_from_diffusers(config)


def _flow_schedule_to_diffusers(schedule: ScheduleConfig, sampler: str, sigmas: str | None) -> dict[str, Any]:
    """FlowMatchEulerDiscreteScheduler (SD3's), or FlowMatchHeun / the flow-sigma DPM-Solver / UniPC for
    those samplers with their own levels (diffusers ramps flow levels in FlowMatchEuler only)."""
    if schedule.prediction_type != "flow":
        raise ValueError(
            f"diffusers' flow schedulers take velocity predictions, not {schedule.prediction_type!r}"
        )
    common = {"num_train_timesteps": schedule.num_train_timesteps}
    if sampler in ("dpmpp_2m", "dpmpp_2m_sde", "unipc") and sigmas is None:  # their flow sigmas have no ramps
        name = "UniPCMultistepScheduler" if sampler == "unipc" else "DPMSolverMultistepScheduler"
        config = {"_class_name": name, **common, "use_flow_sigmas": True, "flow_shift": schedule.shift}
        config["prediction_type"] = "flow_prediction"
        if sampler == "dpmpp_2m_sde":
            config["algorithm_type"] = "sde-dpmsolver++"
        return config
    if sampler == "heun" and sigmas is None:  # FlowMatchHeun has no ramps
        return {"_class_name": "FlowMatchHeunDiscreteScheduler", **common, "shift": schedule.shift}
    ramps = {"use_karras_sigmas": sigmas == "karras", "use_exponential_sigmas": sigmas == "exponential"}
    return {"_class_name": "FlowMatchEulerDiscreteScheduler", **common, "shift": schedule.shift, **ramps}
