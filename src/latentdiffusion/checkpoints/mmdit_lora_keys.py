"""LoRA files for SD3's MMDiT (``models.mmdit``): which of our layers (and which of their rows) each layer
name of a file updates, and merging a file into the network.

Three spellings of a layer name are read:
- diffusers / PEFT: ``transformer.<SD3Transformer2DModel path>.lora_A.weight`` / ``.lora_B.weight``, alpha
  from the ``lora_adapter_metadata`` JSON (``transformer.lora_alpha``; absent means alpha = rank), as
  diffusers' ``save_lora_weights`` writes them;
- kohya form of the same paths: ``lora_transformer_<path with underscores>`` (OneTrainer);
- kohya's sd-scripts for SD3: ``lora_unet_<original path with underscores>`` (``joint_blocks_0_x_block_
  attn_qkv``), whose q/k/v update is one fused matrix: its rows are split over our ``to_q``, ``to_k`` and
  ``to_v`` (the down matrix is shared).

Underscored names are never parsed: every layer is listed under each spelling and looked up, as in
``lora_keys``. diffusers stores the final and the last context modulations as (scale, shift); an update
to them has its output halves exchanged for our (shift, scale) layers. Merging adds
strength * alpha / r * B A to each weight (Hu et al. 2022, Eq. 3) after every name and shape is checked.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
from torch import nn

from latentdiffusion.checkpoints.keymap import first_keys, match_template, rename_key
from latentdiffusion.checkpoints.lora_keys import LoRAWeights, parse_lora
from latentdiffusion.checkpoints.mmdit_keys import (
    MMDIT_DIFFUSERS_KEYS,
    MMDIT_ORIGINAL_FUSED,
    MMDIT_ORIGINAL_KEYS,
    scale_shift_layers,
    swap_halves,
)
from latentdiffusion.errors import UserError
from latentdiffusion.models.lora import adaptable_layers, add_to_weight, low_rank_delta

KOHYA_PREFIX = "lora_unet_"  # sd-scripts' SD3 LoRAs, original module names
DIFFUSERS_KOHYA_PREFIX = "lora_transformer_"  # diffusers module names, kohya form
PEFT_PREFIX = "transformer."
_PEFT_KEY = re.compile(r"^transformer\.(.+)\.lora_([AB])\.weight$")


@dataclass(frozen=True)
class Target:
    """Rows ``start:stop`` of a file's update belong to our layer ``path``; ``swap``: the file's rows are
    diffusers' (scale, shift) halves of our (shift, scale) layer."""

    path: str
    start: int
    stop: int
    swap: bool = False


def is_mmdit_lora_key(key: str) -> bool:
    """Whether a LoRA file entry is for the MMDiT (not for a text encoder)."""
    return key.startswith((KOHYA_PREFIX, DIFFUSERS_KOHYA_PREFIX, PEFT_PREFIX))


def mmdit_lora_targets(model: nn.Module) -> dict[str, tuple[Target, ...]]:
    """Every layer name a file may give (kohya form) -> the layers and rows of ours it updates."""
    layers = adaptable_layers(model)
    swapped = set(scale_shift_layers(model.config.depth))
    fused = _fused_targets(layers)
    in_fused = {t.path for targets in fused.values() for t in targets}
    names = dict(fused)
    for path, layer in layers.items():
        whole = Target(path, 0, layer.weight.shape[0])
        diffusers_name = DIFFUSERS_KOHYA_PREFIX + _flat(rename_key(path, MMDIT_DIFFUSERS_KEYS))
        names[diffusers_name] = (replace(whole, swap=path in swapped),)
        if path not in in_fused:
            names[KOHYA_PREFIX + _flat(rename_key(path, MMDIT_ORIGINAL_KEYS))] = (whole,)
    return names


def _fused_targets(layers: Mapping[str, nn.Module]) -> dict[str, tuple[Target, ...]]:
    """kohya names of the original fused q/k/v projections -> the rows of our to_q, to_k, to_v."""
    names = {}
    for fused in MMDIT_ORIGINAL_FUSED:
        if not fused.theirs.endswith(".weight"):
            continue
        members = [template.removesuffix(".weight") for template in fused.ours]
        found = [match_template(members[0], path) for path in layers]
        for numbers in [n for n in found if n is not None]:
            name = KOHYA_PREFIX + _flat(fused.theirs.removesuffix(".weight").format(*numbers))
            names[name] = _stacked([member.format(*numbers) for member in members], layers)
    return names


def _stacked(paths: list[str], layers: Mapping[str, nn.Module]) -> tuple[Target, ...]:
    """Targets for ``paths`` whose weights a file stacks row-wise in this order."""
    targets, start = [], 0
    for path in paths:
        stop = start + layers[path].weight.shape[0]
        targets.append(Target(path, start, stop))
        start = stop
    return tuple(targets)


def _flat(path: str) -> str:
    return path.replace(".", "_")


def parse_mmdit_lora(
    state: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None, source: str = "LoRA"
) -> dict[str, LoRAWeights]:
    """A file's MMDiT entries grouped by layer name (PEFT names in their kohya form)."""
    alpha = _peft_alpha(metadata or {}, source)
    converted: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        match = _PEFT_KEY.match(key)
        if match is None:
            converted[key] = value
            continue
        path, which = match.groups()
        name = DIFFUSERS_KOHYA_PREFIX + _flat(path)
        converted[f"{name}.{'lora_down' if which == 'A' else 'lora_up'}.weight"] = value
        if alpha is not None and which == "A":
            converted[f"{name}.alpha"] = torch.tensor(alpha)
    return parse_lora(converted, None, source, prefixes={})


def _peft_alpha(metadata: Mapping[str, str], source: str) -> float | None:
    try:
        config = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    except (ValueError, RecursionError):
        return None
    if not isinstance(config, dict) or "transformer.lora_alpha" not in config:
        return None
    alpha = config["transformer.lora_alpha"]
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise UserError(f"{source}: transformer.lora_alpha is {alpha!r}; it must be a finite number")
    return float(alpha)


def plan_mmdit_lora(
    weights: Mapping[str, LoRAWeights], model: nn.Module, source: str = "LoRA"
) -> list[tuple[nn.Module, torch.Tensor, torch.Tensor, Target, LoRAWeights]]:
    """(layer, down, up rows, target, weights) for every layer a file updates; UserError for unknown
    names or shapes that do not fit, before anything changes."""
    names = mmdit_lora_targets(model)
    unknown = [name for name in weights if name not in names]
    if unknown:
        raise UserError(
            f"{source} has LoRA weights for {len(unknown)} layers this MMDiT does not have: "
            f"{first_keys(unknown)} (a LoRA for another model?)"
        )
    layers = adaptable_layers(model)
    plan, wrong = [], []
    for name, w in weights.items():
        targets = names[name]
        layer_in = layers[targets[0].path].weight[0].numel()
        if w.up.shape[0] != targets[-1].stop or w.down.flatten(1).shape[1] != layer_in:
            wrong.append(f"{name} (update {(w.up.shape[0], w.down.flatten(1).shape[1])})")
            continue
        for target in targets:
            up = w.up.flatten(1)[target.start : target.stop]
            plan.append((layers[target.path], w.down, swap_halves(up) if target.swap else up, target, w))
    if wrong:
        raise UserError(
            f"{source} does not fit this MMDiT: wrongly shaped {', '.join(wrong[:5])}"
            + (f" (and {len(wrong) - 5} more)" if len(wrong) > 5 else "")
        )
    return plan


def apply_mmdit_lora(
    weights: Mapping[str, LoRAWeights], model: nn.Module, strength: float = 1.0, source: str = "LoRA"
) -> int:
    """Merge ``strength`` times each update into our MMDiT; returns the number of layers changed."""
    plan = plan_mmdit_lora(weights, model, source)
    for layer, down, up, _, w in plan:
        device = layer.weight.device
        delta = low_rank_delta(down.to(device), up.to(device), layer.weight.shape)
        add_to_weight(layer, delta * w.scale(strength))
    return len(plan)
