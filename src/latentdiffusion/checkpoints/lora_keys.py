"""LoRA files in the kohya-ss / AUTOMATIC1111 format: write them, read them, merge them with a strength.

A file holds, for each adapted layer NAME, ``NAME.lora_down.weight`` (A: [r, in] or [r, in, k, k]),
``NAME.lora_up.weight`` (B: [out, r] or [out, r, 1, 1]) and optionally ``NAME.alpha`` (a scalar; absent
means alpha = r). NAME is ``lora_unet_`` or ``lora_te_`` and a module path with its dots replaced by
underscores, in one of these spellings:

- U-Net, diffusers names: ``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``. This
  is what kohya's sd-scripts write for SD 1.x / 2.x (they train a diffusers-layout U-Net), so it is what
  we write by default; A1111, ComfyUI and diffusers all read it.
- U-Net, original (CompVis) names: ``lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q``, as
  trainers on the original ``openaimodel`` U-Net write them (``naming="original"`` writes these).
- Text encoder, transformers ``CLIPTextModel`` names for SD 1 and SD 2 alike (kohya converts SD 2's
  OpenCLIP tower to that layout): ``lora_te_text_model_encoder_layers_0_self_attn_q_proj``;
  ``lora_te1_`` (diffusers' PEFT-to-kohya converter) is read as a synonym.
- SDXL (kohya's sd-scripts): ``lora_te1_`` (CLIP-L) and ``lora_te2_`` (bigG) with the same CLIP paths,
  U-Net names as above; each family declares its prefixes (``Family.lora_prefixes``), which reading and
  writing (``save_lora(..., prefixes=)``) take.

Underscores make the names ambiguous, so they are never parsed: every layer of the model is listed under
each spelling (``layer_names``) and the file's names are looked up. PEFT / diffusers files
(``unet.<diffusers path>.lora_A.weight`` / ``lora_B.weight``, alpha from their ``lora_adapter_metadata``)
are read by renaming them to the kohya form first.

Applying a file merges W <- W + strength * alpha / r * B A into each layer (Hu et al. 2022, Eq. 3): the
model then runs at its usual cost. Every name and shape is checked before any weight changes.

The same names carry LyCORIS adapters (LoCon with a middle layer, LoHa, LoKr, full differences, DoRA's
``dora_scale``; ``checkpoints.lycoris_keys`` names their tensors, ``models.lycoris`` computes their
updates), which ``parse_lora(..., lycoris=True)`` reads and ``merge_adapter`` merges alike.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from latentdiffusion.checkpoints.keymap import first_keys, rename_key
from latentdiffusion.checkpoints.lycoris_keys import LYCORIS_PARTS, REFUSED, lycoris_adapter, refused_kind
from latentdiffusion.checkpoints.original_keys import unet_layout
from latentdiffusion.checkpoints.text_encoder_keys import HF_CLIP_TEXT, with_hf_prefix
from latentdiffusion.checkpoints.unet_keys import UNET_DIFFUSERS_KEYS
from latentdiffusion.config import ModelConfig, UNetConfig
from latentdiffusion.errors import UserError
from latentdiffusion.models.lora import adaptable_layers, low_rank_delta
from latentdiffusion.models.lycoris import Adapter, dora_rows, merge_into

UNET_PREFIX, TEXT_PREFIX = "lora_unet_", "lora_te_"
NAMINGS = ("diffusers", "original")
PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
# The prefixes of each network's layer names (the first is the one written), by model family: kohya's
# sd-scripts name SDXL's two text encoders lora_te1_ and lora_te2_; lora_te1_ alone is a synonym of
# lora_te_ for SD 1/2 (diffusers' PEFT-to-kohya converter writes it).
SD_PREFIXES = {"unet": (UNET_PREFIX,), "text_encoder": (TEXT_PREFIX, "lora_te1_")}
SDXL_PREFIXES = {"unet": (UNET_PREFIX,), "text_encoder": ("lora_te1_",), "text_encoder_2": ("lora_te2_",)}
SDXL_REFINER_PREFIXES = {"unet": (UNET_PREFIX,), "text_encoder_2": ("lora_te2_",)}
# SD3's CLIP encoders as SDXL's; its MMDiT is named by ``checkpoints.mmdit_lora_keys``
SD3_PREFIXES = {"text_encoder": ("lora_te1_",), "text_encoder_2": ("lora_te2_",)}
# kohya's ``ss_base_model_version`` of the families other than SD 1/2 (sd-scripts' sdxl_model_util)
KOHYA_MODEL_VERSIONS = {"sdxl": "sdxl_base_v1-0", "sd3": "sd3"}
_PEFT_KEY = re.compile(r"^(unet|text_encoder|text_encoder_2)\.(.+)\.lora_([AB])\.weight$")


@dataclass(frozen=True)
class LoRAWeights(Adapter):
    """One layer's update: A (``down``), B (``up``), alpha (None: the rank) and DoRA's magnitude."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None
    dora_scale: torch.Tensor | None = None
    kind = "LoRA"

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def scale(self, strength: float) -> float:
        return (self.rank if self.alpha is None else self.alpha) / self.rank * strength

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.up.shape[0], *self.down.shape[1:]))

    def delta(self, device: torch.device | str | None = None) -> torch.Tensor:
        """alpha / r * B A in float32, [out, in(, k, k)]."""
        down, up = (t.to(device or t.device) for t in (self.down, self.up))
        return low_rank_delta(down, up, self.shape) * self.scale(1.0)


# ------------------------------------------------------------------------------------------- names


def _flat(path: str) -> str:
    return path.replace(".", "_")


def kohya_name(
    network: str,
    path: str,
    unet: UNetConfig | None = None,
    naming: str = "diffusers",
    prefixes: Mapping[str, tuple[str, ...]] = SD_PREFIXES,
) -> str:
    """The file name of our layer ``path`` in ``network`` (a role: "unet", "text_encoder", ...)."""
    prefix = prefixes[network][0]
    if network != "unet":
        return prefix + _flat(rename_key(path, HF_CLIP_TEXT))
    if naming == "original":
        if unet is None:
            raise ValueError("original U-Net names need the U-Net's config")
        return prefix + _flat(rename_key(path, unet_layout(unet).table))
    if naming != "diffusers":
        raise UserError(f"unknown LoRA naming {naming!r}; use one of {', '.join(NAMINGS)}")
    return prefix + _flat(rename_key(path, UNET_DIFFUSERS_KEYS))


def layer_names(
    networks: Mapping[str, nn.Module], prefixes: Mapping[str, tuple[str, ...]] = SD_PREFIXES
) -> dict[str, tuple[str, str] | None]:
    """Every name a file may give one of our layers -> (network, module path); None marks the layers of
    a text encoder that SD 2 stores but skips (their updates cannot change the output)."""
    names: dict[str, tuple[str, str] | None] = {}
    unet = networks.get("unet")
    for path in adaptable_layers(unet) if unet is not None else ():
        for naming in NAMINGS:
            names[kohya_name("unet", path, unet.config, naming, prefixes)] = ("unet", path)
    for role, encoder in networks.items():
        if role == "unet":
            continue
        for path in adaptable_layers(encoder):
            flat = _flat(rename_key(path, HF_CLIP_TEXT))
            names.update({prefix + flat: (role, path) for prefix in prefixes[role]})
        for name in _skipped_text_layer_names(encoder):
            names.update({prefix + name: None for prefix in prefixes[role]})
    return names


def _skipped_text_layer_names(text_encoder: nn.Module) -> list[str]:
    config = text_encoder.config
    built = config.num_layers - config.skip_last_layers
    children = [("self_attn", f"{c}_proj") for c in "qkv"] + [("self_attn", "out_proj")]
    children += [("mlp", "fc1"), ("mlp", "fc2")]
    return [
        f"text_model_encoder_layers_{n}_{parent}_{child}"
        for n in range(built, config.num_layers)
        for parent, child in children
    ]


# ------------------------------------------------------------------------------------------ reading


def read_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the safetensors metadata of a LoRA file (pickles only as plain tensors)."""
    from latentdiffusion.checkpoints.safe_io import read_metadata, read_state_dict

    path = Path(path)
    if not path.is_file():
        raise UserError(f"LoRA file {path} does not exist")
    try:
        return read_state_dict(path), read_metadata(path)
    except UserError as error:
        raise UserError(f"cannot read LoRA file: {error}") from None


def parse_lora(
    state: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    source: str = "LoRA",
    prefixes: Mapping[str, tuple[str, ...]] = SD_PREFIXES,
    lycoris: bool = False,
) -> dict[str, LoRAWeights | Adapter]:
    """Group a file's tensors by layer name; UserError for entries that are not plain LoRA weights (with
    ``lycoris``: not the weights of a LyCORIS adapter ``lycoris_keys`` reads)."""
    state = _from_peft(state, metadata or {}, prefixes)
    known = LYCORIS_PARTS | REFUSED.keys() if lycoris else PARTS.keys()
    groups: dict[str, dict[str, torch.Tensor]] = {}
    stray = []
    for key, value in state.items():
        name, _, part = key.partition(".")
        if part in known and (part != "weight" or name.startswith("lora_")):  # (IA)^3's, not a model's
            groups.setdefault(name, {})[part] = value
        else:
            stray.append(key)
    lyco = [key for key in stray if key.partition(".")[2] in LYCORIS_PARTS]
    if lyco and not lycoris:
        raise UserError(
            f"{source} has LyCORIS adapter entries ({first_keys(lyco, 3)}), which are read for the U-Net "
            "models (SD 1.x/2.x, SDXL) and their text encoders only; use a plain LoRA"
        )
    if stray and not groups:
        raise UserError(
            f"{source} is not a LoRA file: it has no lora_down / lora_up weights "
            f"(keys like {first_keys(stray, 3)})"
        )
    if stray and lycoris:
        raise UserError(f"{source} has entries that are no LoRA's or LyCORIS adapter's: {first_keys(stray)}")
    if stray:
        raise UserError(f"{source} has entries that are not plain LoRA weights: {first_keys(stray)}")
    return {name: _adapter(name, parts, source) for name, parts in groups.items()}


def _adapter(name: str, parts: dict[str, torch.Tensor], source: str) -> LoRAWeights | Adapter:
    """A LoRA (``lora_down`` / ``lora_up`` only) or the LyCORIS adapter the tensors make."""
    refused_kind(name, parts, source)
    alpha = _alpha(name, parts.pop("alpha", None), source)
    dora_scale = parts.pop("dora_scale", None)
    if parts.keys() <= {"lora_down.weight", "lora_up.weight"}:
        return _weights(name, parts, source, alpha, dora_scale)
    return lycoris_adapter(name, parts, source, alpha, dora_scale)


def _weights(
    name: str,
    parts: dict[str, torch.Tensor],
    source: str,
    alpha: float | None = None,
    dora_scale: torch.Tensor | None = None,
) -> LoRAWeights:
    missing = [p for p in ("down", "up") if f"lora_{p}.weight" not in parts]
    if missing:
        raise UserError(f"{source}: {name} has no lora_{missing[0]}.weight")
    down, up = parts["lora_down.weight"], parts["lora_up.weight"]
    if down.ndim not in (2, 4) or up.ndim not in (2, 4) or up.flatten(1).shape[1] != down.shape[0]:
        raise UserError(
            f"{source}: {name} has lora_down {tuple(down.shape)} and lora_up {tuple(up.shape)}, "
            "which do not form a low-rank pair ([r, in(, k, k)] and [out, r(, 1, 1)])"
        )
    if down.shape[0] == 0:
        raise UserError(
            f"{source}: {name} has rank 0 (lora_down {tuple(down.shape)}); a LoRA needs rank >= 1"
        )
    return LoRAWeights(down, up, alpha, dora_scale)


def _alpha(name: str, alpha: torch.Tensor | None, source: str) -> float | None:
    if alpha is not None and alpha.numel() != 1:
        raise UserError(f"{source}: {name}.alpha must be one number, it has shape {tuple(alpha.shape)}")
    value = None if alpha is None else float(alpha.float())
    if value is not None and not math.isfinite(value):
        raise UserError(f"{source}: {name}.alpha is {value}; it must be a finite number")
    return value


def _from_peft(
    state: Mapping[str, torch.Tensor], metadata: Mapping[str, str], prefixes: Mapping[str, tuple[str, ...]]
) -> dict[str, torch.Tensor]:
    """PEFT / diffusers keys (``unet.<path>.lora_A.weight``, ``text_encoder_2.<path>...``) in the kohya
    form; other keys unchanged."""
    alphas = _peft_alphas(metadata)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        match = _PEFT_KEY.match(key)
        if match is None:
            out[key] = value
            continue
        network, path, which = match.groups()
        if network not in prefixes:
            raise UserError(f"LoRA weights for a {network} this model does not have (a LoRA for SDXL?)")
        if network != "unet":  # transformers >= 5 names the text layers without ``text_model.``
            path = with_hf_prefix(path)
        name = prefixes[network][0] + _flat(path)
        out[f"{name}.{'lora_down' if which == 'A' else 'lora_up'}.weight"] = value
        if network in alphas and which == "A":
            out[f"{name}.alpha"] = torch.tensor(alphas[network])
    return out


def _peft_alphas(metadata: Mapping[str, str]) -> dict[str, float]:
    try:
        config = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    except (ValueError, RecursionError):
        return {}
    if not isinstance(config, dict):
        raise UserError("LoRA lora_adapter_metadata is not a JSON object")
    keys = {net: f"{net}.lora_alpha" for net in ("unet", "text_encoder", "text_encoder_2")}
    alphas = {net: config[key] for net, key in keys.items() if key in config}
    for net, alpha in alphas.items():
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
            raise UserError(f"LoRA {net}.lora_alpha is {alpha!r}; it must be a finite number")
    return {net: float(alpha) for net, alpha in alphas.items()}


# ----------------------------------------------------------------------------------------- applying


def plan_lora(
    weights: Mapping[str, LoRAWeights | Adapter],
    networks: Mapping[str, nn.Module],
    source: str = "LoRA",
    prefixes: Mapping[str, tuple[str, ...]] = SD_PREFIXES,
) -> list[tuple[nn.Module, LoRAWeights | Adapter]]:
    """(layer, weights) for every entry, checking names and shapes first; UserError if any is wrong."""
    names = layer_names(networks, prefixes)
    unknown = [name for name in weights if name not in names]
    if unknown:
        raise UserError(
            f"{source} has LoRA weights for {len(unknown)} layers this model does not have: "
            f"{first_keys(unknown)}{_other_family_hint(unknown, prefixes)}"
        )
    layers = {net: adaptable_layers(module) for net, module in networks.items()}
    plan, wrong = [], []
    for name, w in weights.items():
        target = names[name]
        if target is None:
            continue
        layer = layers[target[0]][target[1]]
        misfit = _misfit(w, layer)
        if misfit:
            wrong.append(f"{name} ({misfit})")
        plan.append((layer, w))
    if wrong:
        raise UserError(
            f"{source} does not fit this model: wrongly shaped {', '.join(wrong[:5])}"
            + (f" (and {len(wrong) - 5} more)" if len(wrong) > 5 else "")
            + " (a LoRA for another base model, such as SD 2 on SD 1?)"
        )
    return plan


def _other_family_hint(unknown: list[str], prefixes: Mapping[str, tuple[str, ...]]) -> str:
    """Which family the unknown names suggest: SDXL's two text encoders, or SD 1/2's one."""
    sdxl = any(name.startswith("lora_te2_") for name in unknown)
    if sdxl and "text_encoder_2" not in prefixes:
        return " (it is a LoRA for SDXL, which has a second text encoder; this model is SD 1.x/2.x)"
    if not sdxl and "text_encoder_2" in prefixes and any(n.startswith(TEXT_PREFIX) for n in unknown):
        return " (it is a LoRA for SD 1.x/2.x; this model is SDXL)"
    return " (a LoRA for another architecture?)"


def _misfit(w: LoRAWeights | Adapter, layer: nn.Module) -> str | None:
    """What of an update does not fit its layer (the update, DoRA's magnitude, the bias), or None."""
    shape, weight = w.shape, layer.weight
    if shape.numel() != weight.numel() or shape[0] != weight.shape[0]:
        return f"update {tuple(shape)}, layer {tuple(weight.shape)}"
    if w.dora_scale is not None and dora_rows(w.dora_scale, weight.shape) is None:
        return f"dora_scale {tuple(w.dora_scale.shape)}, layer {tuple(weight.shape)}"
    bias = w.bias_delta()
    if bias is not None and (layer.bias is None or bias.shape != layer.bias.shape):
        has = "no bias" if layer.bias is None else f"bias {tuple(layer.bias.shape)}"
        return f"diff_b {tuple(bias.shape)}, layer {has}"
    return None


def apply_lora(
    weights: Mapping[str, LoRAWeights | Adapter],
    networks: Mapping[str, nn.Module],
    strength: float = 1.0,
    source: str = "LoRA",
    prefixes: Mapping[str, tuple[str, ...]] = SD_PREFIXES,
) -> int:
    """Merge ``strength`` times each update into its layer (networks by role: "unet", "text_encoder",
    and "text_encoder_2" for SDXL, whose ``prefixes`` name them).

    Returns the number of layers changed. Merging is linear, so applying the same file with
    ``-strength`` takes it out again (up to rounding).
    """
    plan = plan_lora(weights, networks, source, prefixes)
    for layer, w in plan:
        merge_adapter(layer, w, strength)
    return len(plan)


def merge_adapter(
    layer: nn.Module,
    w: LoRAWeights | Adapter,
    strength: float,
    down: torch.Tensor | None = None,
    up: torch.Tensor | None = None,
) -> None:
    """Merge one checked update into ``layer`` with ``strength`` (``models.lycoris.merge_into``);
    ``down`` / ``up``: a LoRA's pair when it is not ``w``'s own (part of a fused update)."""
    device = layer.weight.device
    if down is not None and up is not None:
        delta = low_rank_delta(down.to(device), up.to(device), layer.weight.shape) * w.scale(1.0)
    else:
        delta = w.delta(device)
    merge_into(layer, delta, strength, w.dora_scale, w.bias_delta())


def saved_tensors(layer: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of what merging an update may change in ``layer`` (its weight; its bias, which a full
    LyCORIS difference's ``diff_b`` updates), for ``restore_tensors``."""
    kept = {"weight": layer.weight} | ({"bias": layer.bias} if layer.bias is not None else {})
    return {name: value.detach().clone() for name, value in kept.items()}


@torch.no_grad()
def restore_tensors(layer: nn.Module, saved: Mapping[str, torch.Tensor]) -> None:
    """Put back a layer's ``saved_tensors`` bit for bit."""
    for name, value in saved.items():
        getattr(layer, name).copy_(value)


def load_lora(
    path: str | Path,
    networks: Mapping[str, nn.Module],
    strength: float = 1.0,
    prefixes: Mapping[str, tuple[str, ...]] = SD_PREFIXES,
) -> int:
    """Read the LoRA file at ``path`` and merge it into ``networks`` with ``strength``."""
    state, metadata = read_lora_file(path)
    weights = parse_lora(state, metadata, str(path), prefixes, lycoris=True)
    return apply_lora(weights, networks, strength, str(path), prefixes)


# ------------------------------------------------------------------------------------------ writing


def to_kohya(
    states: Mapping[str, Mapping[str, torch.Tensor]],
    unet: UNetConfig,
    naming: str = "diffusers",
    dtype: torch.dtype | None = None,
    prefixes: Mapping[str, tuple[str, ...]] = SD_PREFIXES,
) -> dict[str, torch.Tensor]:
    """Our LoRA state dicts (network -> ``models.lora.lora_state_dict``) as kohya file entries."""
    out = {}
    for network, state in states.items():
        for key, value in state.items():
            path, part = split_part(key)
            value = value.detach().float() if part == "alpha" else value.detach()
            if dtype is not None:
                value = value.to(dtype)
            out[f"{kohya_name(network, path, unet, naming, prefixes)}.{part}"] = value.contiguous()
    return out


def split_part(key: str) -> tuple[str, str]:
    for part in PARTS:
        if key.endswith("." + part):
            return key[: -len(part) - 1], part
    raise ValueError(f"{key!r} is not a LoRA weight (lora_down.weight, lora_up.weight or alpha)")


def kohya_metadata(model: ModelConfig, rank: int, alpha: float, **extra: object) -> dict[str, str]:
    """The ``ss_*`` metadata kohya's sd-scripts write, which A1111 and other tools display (A1111 tells
    an SDXL LoRA by its ``ss_base_model_version``)."""
    # the OpenCLIP tower of the SD 2 family; SDXL's first text encoder is OpenAI's CLIP-L
    v2 = model.family == "sd" and model.text_encoder.activation == "gelu"
    version = KOHYA_MODEL_VERSIONS.get(model.family, "sd_v2" if v2 else "sd_v1")
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_v2": str(v2),
        "ss_base_model_version": version,
        "ss_v_parameterization": str(model.schedule.prediction_type == "v_prediction"),
        "ss_sd_model_name": model.name,
    }
    metadata.update({f"ss_{k}": v if isinstance(v, str) else json.dumps(v) for k, v in extra.items()})
    return metadata


def save_lora(
    path: str | Path,
    states: Mapping[str, Mapping[str, torch.Tensor]],
    model: ModelConfig,
    *,
    metadata: Mapping[str, str] | None = None,
    naming: str = "diffusers",
    dtype: torch.dtype | None = None,
    prefixes: Mapping[str, tuple[str, ...]] = SD_PREFIXES,
) -> Path:
    """Write our LoRA state dicts (by role) as one kohya-format safetensors file (atomically), with the
    layer-name ``prefixes`` of the model's family (``Family.lora_prefixes``)."""
    from latentdiffusion.checkpoints.safe_io import save_safetensors

    entries = to_kohya(states, model.unet, naming, dtype, prefixes)
    if not entries:
        raise UserError("there are no LoRA weights to save")
    path = Path(path)
    save_safetensors(entries, path, metadata)
    return path
