"""CompVis inference configs (``v1-inference.yaml``, ``v2-inference-v.yaml``, ...) to our configs and back.

A ``.yaml`` of the same stem beside a single-file checkpoint is how the original code base, and the
tools built on it, learn what the weights alone cannot say: attention heads, latent scale, schedule,
prediction type ("parameterization"), which text-encoder layer to read. Only the keys of the
``LatentDiffusion`` family (text-to-image, inpainting, x4 upscaling) are read; ``target:`` strings
name the classes and are checked, never imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from latentdiffusion.checkpoints.yaml_subset import dump_yaml, parse_yaml
from latentdiffusion.config import AutoencoderConfig, ModelConfig, ScheduleConfig, UNetConfig
from latentdiffusion.errors import UserError

MODEL_TARGETS = {  # supported LatentDiffusion classes -> conditioning_key
    "ldm.models.diffusion.ddpm.LatentDiffusion": "crossattn",
    "ldm.models.diffusion.ddpm.LatentInpaintDiffusion": "hybrid",
    "ldm.models.diffusion.ddpm.LatentUpscaleDiffusion": "hybrid-adm",
}
UNET_TARGET = "ldm.modules.diffusionmodules.openaimodel.UNetModel"
AUTOENCODER_TARGET = "ldm.models.autoencoder.AutoencoderKL"
TEXT_TARGETS = {  # class -> our text layout
    "ldm.modules.encoders.modules.FrozenCLIPEmbedder": "hf",
    "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder": "openclip",
}
BETA_SCHEDULES = {"linear": "scaled_linear", "sqrt_linear": "linear", "cosine": "cosine"}  # CompVis -> ours
PARAMETERIZATIONS = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
# the x4 upscaler's noise augmentation of the low-resolution image (not part of our config)
UPSCALER_LOW_SCALE = {
    "target": "ldm.modules.diffusionmodules.upscaling.ImageConcatWithNoiseAugmentation",
    "params": {"noise_schedule_config": {"linear_start": 0.0001, "linear_end": 0.02}, "max_noise_level": 350},
}


@dataclass(frozen=True)
class CompVisSettings:
    """What a CompVis inference config says about a checkpoint."""

    unet: UNetConfig
    autoencoder: AutoencoderConfig
    schedule: ScheduleConfig
    text_kind: str  # "hf" or "openclip"
    text_layer: str  # "last" or "penultimate"
    sample_size: int | None


def read_compvis_yaml(path: Path) -> CompVisSettings:
    """The settings of a CompVis ``.yaml``: a regular file of at most ``MAX_YAML_BYTES``; every error of
    its text or its values is one UserError (values are validated with the model, ``bounds``)."""
    from latentdiffusion.checkpoints.safe_io import MAX_YAML_BYTES, read_regular_file

    raw = read_regular_file(path, MAX_YAML_BYTES, what="CompVis .yaml")
    try:
        data = parse_yaml(raw.decode("utf-8"))
    except RecursionError:
        raise UserError(f"cannot read {path}: nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as error:
        raise UserError(f"cannot read {path}: {error}") from None
    try:
        return compvis_settings(data)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError) as error:
        raise UserError(f"{path} is not a usable CompVis inference config: {_describe(error)}") from None


def _int(value: Any, name: str) -> int:
    """An integer setting; a float, a boolean or a string is refused, not rounded."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} = {value!r}; expected an integer")
    return value


def _float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} = {value!r}; expected a number")
    return float(value)


def _describe(error: Exception) -> str:
    return f"missing key {error}" if isinstance(error, KeyError) else str(error)


def compvis_settings(data: dict[str, Any]) -> CompVisSettings:
    model = data["model"]
    if not isinstance(model, dict) or model.get("target") not in MODEL_TARGETS:
        raise ValueError(f"model target {model.get('target')!r} is not one of {', '.join(MODEL_TARGETS)}")
    params = model["params"]
    unet = unet_from_compvis(params["unet_config"]["params"])
    first_stage = params["first_stage_config"]["params"]
    autoencoder = autoencoder_from_compvis(
        first_stage, _float(params.get("scale_factor", 1.0), "scale_factor")
    )
    text_kind, text_layer = _text_from_compvis(params["cond_stage_config"])
    image_size = params.get("image_size")
    return CompVisSettings(
        unet=unet,
        autoencoder=autoencoder,
        schedule=schedule_from_compvis(params),
        text_kind=text_kind,
        text_layer=text_layer,
        sample_size=None
        if image_size is None
        else _int(image_size, "image_size") * autoencoder.downsampling_factor,
    )


def unet_from_compvis(p: dict[str, Any]) -> UNetConfig:
    """``openaimodel.UNetModel`` parameters; ``attention_resolutions`` are downsampling rates 2**level."""
    if not p.get("use_spatial_transformer", False):
        raise ValueError(
            "only U-Nets with spatial transformers (use_spatial_transformer: true) are supported"
        )
    mult = tuple(_int(m, "channel_mult") for m in p["channel_mult"])
    rates = {_int(r, "attention_resolutions") for r in p.get("attention_resolutions", ())}
    head_channels = _int(p.get("num_head_channels", -1), "num_head_channels")
    heads = _int(p.get("num_heads", -1), "num_heads")
    context_dim = p["context_dim"]
    num_classes = p.get("num_classes")
    if num_classes is not None and not isinstance(num_classes, int):
        raise ValueError(f"num_classes {num_classes!r} (class/size conditioning) is not supported")
    return UNetConfig(
        in_channels=_int(p["in_channels"], "in_channels"),
        out_channels=_int(p["out_channels"], "out_channels"),
        model_channels=_int(p["model_channels"], "model_channels"),
        channel_mult=mult,
        num_res_blocks=_int(p["num_res_blocks"], "num_res_blocks"),
        attention_levels=tuple(level for level in range(min(len(mult), 64)) if 2**level in rates),
        num_heads=None if head_channels != -1 else heads,
        head_dim=head_channels if head_channels != -1 else None,
        transformer_depth=_uniform(p.get("transformer_depth", 1), "transformer_depth"),
        context_dim=_uniform(context_dim, "context_dim"),
        use_linear_projection=bool(p.get("use_linear_in_transformer", False)),
        only_cross_attention=tuple(bool(d) for d in p.get("disable_self_attentions") or ()),
        num_class_embeds=num_classes,
    )


def _uniform(value: Any, name: str) -> int:
    values = value if isinstance(value, list) else [value]
    if len(set(values)) != 1:
        raise ValueError(f"{name} must be the same on every level, got {value}")
    return _int(values[0], name)


def autoencoder_from_compvis(p: dict[str, Any], scale_factor: float) -> AutoencoderConfig:
    dd = p["ddconfig"]
    if not dd.get("double_z", True) or dd.get("attn_resolutions"):
        raise ValueError(
            "only the KL autoencoder of Stable Diffusion (double_z, no attn_resolutions) is supported"
        )
    if _int(p["embed_dim"], "embed_dim") != _int(dd["z_channels"], "z_channels"):
        raise ValueError(f"embed_dim {p['embed_dim']} differs from z_channels {dd['z_channels']}")
    ch = _int(dd["ch"], "ch")
    return AutoencoderConfig(
        in_channels=_int(dd["in_channels"], "in_channels"),
        out_channels=_int(dd["out_ch"], "out_ch"),
        latent_channels=dd["z_channels"],
        block_channels=tuple(ch * _int(m, "ch_mult") for m in dd["ch_mult"]),
        num_res_blocks=_int(dd["num_res_blocks"], "num_res_blocks"),
        scaling_factor=scale_factor,
    )


def _text_from_compvis(cond: dict[str, Any]) -> tuple[str, str]:
    kind = TEXT_TARGETS.get(cond.get("target"))
    if kind is None:
        raise ValueError(
            f"cond_stage_config target {cond.get('target')!r} is not one of {', '.join(TEXT_TARGETS)}"
        )
    layer = (cond.get("params") or {}).get("layer", "last")
    allowed = ("last", "penultimate") if kind == "openclip" else ("last",)
    if layer not in allowed:
        raise ValueError(f"text encoder layer {layer!r} is not supported here (use {' or '.join(allowed)})")
    return kind, layer


def schedule_from_compvis(params: dict[str, Any]) -> ScheduleConfig:
    """DDPM settings of ``LatentDiffusion`` (CompVis defaults where a key is absent)."""
    schedule = params.get("beta_schedule", "linear")
    parameterization = params.get("parameterization", "eps")
    if not isinstance(schedule, str) or not isinstance(parameterization, str):
        raise ValueError(f"beta_schedule {schedule!r} and parameterization {parameterization!r} are names")
    if schedule not in BETA_SCHEDULES or parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"unsupported beta_schedule {schedule!r} or parameterization {parameterization!r}")
    return ScheduleConfig(
        num_train_timesteps=_int(params.get("timesteps", 1000), "timesteps"),
        beta_schedule=BETA_SCHEDULES[schedule],
        beta_start=_float(params.get("linear_start", 1e-4), "linear_start"),
        beta_end=_float(params.get("linear_end", 2e-2), "linear_end"),
        prediction_type=PARAMETERIZATIONS[parameterization],
    )


def compvis_yaml(config: ModelConfig, text_kind: str) -> str:
    """The inference config that describes ``config`` to CompVis-style loaders (and to ours)."""
    return dump_yaml(compvis_dict(config, text_kind))


def compvis_dict(config: ModelConfig, text_kind: str) -> dict[str, Any]:
    unet, vae, schedule = config.unet, config.autoencoder, config.schedule
    if unet.in_channels == 9:
        target = "ldm.models.diffusion.ddpm.LatentInpaintDiffusion"
    elif unet.num_class_embeds is not None:
        target = "ldm.models.diffusion.ddpm.LatentUpscaleDiffusion"
    else:
        target = "ldm.models.diffusion.ddpm.LatentDiffusion"
    params: dict[str, Any] = {
        "linear_start": schedule.beta_start,
        "linear_end": schedule.beta_end,
        "timesteps": schedule.num_train_timesteps,
        "beta_schedule": {v: k for k, v in BETA_SCHEDULES.items()}[schedule.beta_schedule],
        "parameterization": {v: k for k, v in PARAMETERIZATIONS.items()}[schedule.prediction_type],
        "image_size": config.sample_size // vae.downsampling_factor,
        "channels": unet.out_channels,
        "conditioning_key": MODEL_TARGETS[target],
        "scale_factor": vae.scaling_factor,
        "unet_config": {"target": UNET_TARGET, "params": _unet_params(unet)},
        "first_stage_config": {"target": AUTOENCODER_TARGET, "params": _autoencoder_params(vae)},
        "cond_stage_config": _text_params(config, text_kind),
    }
    if unet.num_class_embeds is not None:
        params.update(low_scale_config=UPSCALER_LOW_SCALE, low_scale_key="lr")
    return {"model": {"target": target, "params": params}}


def _unet_params(unet: UNetConfig) -> dict[str, Any]:
    heads = {"num_heads": unet.num_heads} if unet.head_dim is None else {"num_head_channels": unet.head_dim}
    params = {
        "in_channels": unet.in_channels,
        "out_channels": unet.out_channels,
        "model_channels": unet.model_channels,
        "attention_resolutions": [2**level for level in unet.attention_levels],
        "num_res_blocks": unet.num_res_blocks,
        "channel_mult": list(unet.channel_mult),
        **heads,
        "use_spatial_transformer": True,
        "transformer_depth": unet.transformer_depth,
        "context_dim": unet.context_dim,
        "use_linear_in_transformer": unet.use_linear_projection,
        "legacy": False,
    }
    if unet.only_cross_attention:
        params["disable_self_attentions"] = list(unet.only_cross_attention)
    if unet.num_class_embeds is not None:
        params["num_classes"] = unet.num_class_embeds
    return params


def _autoencoder_params(vae: AutoencoderConfig) -> dict[str, Any]:
    width = vae.block_channels[0]
    return {
        "embed_dim": vae.latent_channels,
        "ddconfig": {
            "double_z": True,
            "z_channels": vae.latent_channels,
            "in_channels": vae.in_channels,
            "out_ch": vae.out_channels,
            "ch": width,
            "ch_mult": [c // width for c in vae.block_channels],
            "num_res_blocks": vae.num_res_blocks,
            "attn_resolutions": [],
            "dropout": 0.0,
        },
        "lossconfig": {"target": "torch.nn.Identity"},
    }


def _text_params(config: ModelConfig, text_kind: str) -> dict[str, Any]:
    if text_kind == "hf":
        return {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}
    text = config.text_encoder
    # we store only the layers that run, so "penultimate" is right only for the standard ViT-H tower,
    # which readers recognise whatever number of its layers a file holds (see detect_text_encoder)
    vit_h = (text.hidden_size, text.num_layers, text.skip_last_layers) == (1024, 24, 1)
    params = {"arch": "ViT-H-14", "layer": "penultimate"} if vit_h else {"layer": "last"}
    return {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder", "params": params}
