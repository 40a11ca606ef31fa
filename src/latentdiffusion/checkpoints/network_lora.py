"""LoRA files for a model of any family: the denoising network's entries are read by the family's
``NetworkLoRA`` (``Family.network_lora``), the text encoders' by the kohya / PEFT CLIP names of
``checkpoints.lora_keys`` under the family's prefixes (``Family.lora_prefixes``).

A denoising network's LoRA names depend on its architecture: a U-Net's are those of ``lora_keys``
(``lora_unet_`` + diffusers or original path, PEFT ``unet.``), an MMDiT's those of ``mmdit_lora_keys``
(PEFT ``transformer.``, ``lora_transformer_``, sd-scripts' ``lora_unet_joint_blocks_...`` with fused
q/k/v). A file for the other architecture is refused with one message naming both families, before
anything changes; so are entries for text encoders a family does not adapt (``Family.lora_refusals``).

Every update of a file is checked (names, shapes) before any weight changes; then each is merged as
W <- W + strength * alpha / r * B A (Hu et al. 2022, Eq. 3). The U-Net and the text encoders also take
LyCORIS adapters (LoCon with a middle layer, LoHa, LoKr, full differences, DoRA), each merged with its
own closed-form update (``lora_keys.merge_adapter``, ``models.lycoris``); an MMDiT file holds plain LoRA.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from latentdiffusion.checkpoints.keymap import first_keys, rename_key
from latentdiffusion.checkpoints.lora_keys import (
    UNET_PREFIX,
    LoRAWeights,
    merge_adapter,
    parse_lora,
    plan_lora,
    read_lora_file,
    split_part,
    to_kohya,
)
from latentdiffusion.checkpoints.mmdit_keys import MMDIT_DIFFUSERS_KEYS, scale_shift_layers
from latentdiffusion.checkpoints.mmdit_lora_keys import is_mmdit_lora_key, parse_mmdit_lora, plan_mmdit_lora
from latentdiffusion.checkpoints.text_encoder_keys import HF_CLIP_TEXT
from latentdiffusion.errors import UserError
from latentdiffusion.models.lycoris import Adapter

if TYPE_CHECKING:
    from latentdiffusion.config import ModelConfig
    from latentdiffusion.families.base import Family

States = Mapping[str, Mapping[str, torch.Tensor]]  # role -> ``models.lora.lora_state_dict``

# The first module names under ``lora_unet_`` that only one architecture has (diffusers and original
# names of each), so that a file for the other one is told apart from a file with unknown layers.
UNET_STEMS = (
    "down_blocks_",
    "up_blocks_",
    "mid_block_",
    "conv_in",
    "conv_out",
    "conv_norm_out",
    "time_embedding_",
    "add_embedding_",
    "input_blocks_",
    "middle_block_",
    "output_blocks_",
    "time_embed_",
    "label_emb_",
)
UNET_ONLY = {"unet": (UNET_PREFIX,)}
MMDIT_STEMS = (
    "joint_blocks_",
    "x_embedder_",
    "context_embedder",
    "t_embedder_",
    "y_embedder_",
    "final_layer_",
)


@dataclass(frozen=True)
class Update:
    """One layer's merge: W += scale * strength * (up @ down) reshaped to W; ``down`` / ``up`` None: the
    update is the adapter's own (``weights.delta()``: any LoRA or LyCORIS adapter)."""

    layer: nn.Module
    down: torch.Tensor | None
    up: torch.Tensor | None
    weights: LoRAWeights | Adapter


class NetworkLoRA:
    """How LoRA files name one architecture of denoising network, and how their updates reach it."""

    architecture = ""

    def claims(self, key: str) -> bool:
        """Whether a file entry is for the denoising network (the others are for text encoders)."""
        raise NotImplementedError

    def recognises(self, key: str) -> bool:
        """Whether a file entry certainly belongs to this architecture (to refuse a file for another)."""
        raise NotImplementedError

    def plan(
        self, state: Mapping[str, torch.Tensor], metadata: Mapping[str, str], network: nn.Module, source: str
    ) -> list[Update]:
        """The updates of the network's entries of a file; UserError for names or shapes that do not fit."""
        raise NotImplementedError

    def file_entries(
        self, states: States, family: Family, model: ModelConfig, naming: str
    ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The tensors and metadata of a file that holds our adapters (by role) for a model of ``family``,
        in the format its users' tools read."""
        raise NotImplementedError


class UNetLoRA(NetworkLoRA):
    """kohya / A1111 ``lora_unet_`` names (diffusers or original paths) and PEFT ``unet.`` names."""

    architecture = "U-Net"
    prefixes = UNET_ONLY

    def claims(self, key: str) -> bool:
        return key.startswith((UNET_PREFIX, "unet."))

    def recognises(self, key: str) -> bool:
        return key.startswith("unet.") or key.startswith(tuple(UNET_PREFIX + stem for stem in UNET_STEMS))

    def plan(
        self, state: Mapping[str, torch.Tensor], metadata: Mapping[str, str], network: nn.Module, source: str
    ) -> list[Update]:
        weights = parse_lora(state, metadata, source, self.prefixes, lycoris=True)
        plan = plan_lora(weights, {"unet": network}, source, self.prefixes)
        return [Update(layer, None, None, w) for layer, w in plan]

    def file_entries(
        self, states: States, family: Family, model: ModelConfig, naming: str
    ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """kohya / A1111 names (what sd-scripts write, and every SD tool reads)."""
        return to_kohya(states, model.unet, naming, prefixes=family.lora_prefixes), {}


class MMDiTLoRA(NetworkLoRA):
    """SD3's MMDiT: PEFT ``transformer.``, ``lora_transformer_`` and sd-scripts' original names."""

    architecture = "MMDiT"

    def claims(self, key: str) -> bool:
        return is_mmdit_lora_key(key)

    def recognises(self, key: str) -> bool:
        original = tuple(UNET_PREFIX + stem for stem in MMDIT_STEMS)
        return key.startswith(("transformer.", "lora_transformer_", *original))

    def plan(
        self, state: Mapping[str, torch.Tensor], metadata: Mapping[str, str], network: nn.Module, source: str
    ) -> list[Update]:
        weights = parse_mmdit_lora(state, metadata, source)
        return [
            Update(layer, down, up, w) for layer, down, up, _, w in plan_mmdit_lora(weights, network, source)
        ]

    def file_entries(
        self, states: States, family: Family, model: ModelConfig, naming: str
    ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """diffusers' PEFT format (``save_lora_weights``): ``ROLE.<diffusers path>.lora_A/B.weight``, each
        role's rank and alpha in the ``lora_adapter_metadata`` JSON."""
        entries: dict[str, torch.Tensor] = {}
        config: dict[str, object] = {}
        swapped = set(scale_shift_layers(model.transformer.depth))  # diffusers' (scale, shift) rows
        for role, state in states.items():
            table = MMDIT_DIFFUSERS_KEYS if role == family.network_role else HF_CLIP_TEXT
            alphas, paths = set(), []
            for key, value in state.items():
                path, part = split_part(key)
                if part == "alpha":
                    alphas.add(float(value))
                    continue
                if role == family.network_role and path in swapped:
                    raise ValueError(f"{path}: adapters of a (shift, scale) modulation are not written")
                paths.append(rename_key(path, table))
                which = "A" if part == "lora_down.weight" else "B"
                entries[f"{role}.{paths[-1]}.lora_{which}.weight"] = value.detach().contiguous()
            if len(alphas) > 1:
                raise ValueError(f"PEFT files hold one LoRA alpha per network; {role} has {sorted(alphas)}")
            if paths:
                rank = next(v for k, v in state.items() if k.endswith("lora_down.weight")).shape[0]
                config |= {f"{role}.r": rank, f"{role}.lora_alpha": alphas.pop() if alphas else rank}
                config[f"{role}.target_modules"] = sorted(set(paths))
        return entries, {"lora_adapter_metadata": json.dumps(config)}


UNET_LORA = UNetLoRA()
MMDIT_LORA = MMDiTLoRA()


# ------------------------------------------------------------------------------------------ loading


def load_model_lora(
    path: str | Path, family: Family, modules: Mapping[str, nn.Module], strength: float = 1.0
) -> int:
    """Read the LoRA file at ``path`` and merge it with ``strength`` into a model of ``family`` (its
    networks by role); returns the number of layers changed."""
    state, metadata = read_lora_file(path)
    updates = plan_model_lora(state, metadata, family, modules, str(path))
    merge_updates(updates, strength)
    return len(updates)


def plan_model_lora(
    state: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    family: Family,
    modules: Mapping[str, nn.Module],
    source: str = "LoRA",
) -> list[Update]:
    """Every update of a file, checked against the model; UserError (nothing changed) otherwise."""
    refuse_other_architecture(state, family, source)
    refuse_unsupported(state, family, source)
    reader = family.network_lora
    network_state = {key: value for key, value in state.items() if reader.claims(key)}
    text_state = {key: value for key, value in state.items() if not reader.claims(key)}
    updates = []
    if text_state:  # first: unknown text encoders tell the family a file is for (SDXL's lora_te2_)
        updates += _text_updates(text_state, metadata, family, modules, source)
    if network_state:
        updates += reader.plan(network_state, metadata, modules[family.network_role], source)
    return updates


def _text_updates(
    state: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    family: Family,
    modules: Mapping[str, nn.Module],
    source: str,
) -> list[Update]:
    prefixes = {
        role: names
        for role, names in family.lora_prefixes.items()
        if role != family.network_role and role in modules
    }
    weights = parse_lora(state, metadata, source, prefixes, lycoris=True)
    networks = {role: modules[role] for role in prefixes}
    return [Update(layer, None, None, w) for layer, w in plan_lora(weights, networks, source, prefixes)]


def merge_updates(updates: list[Update], strength: float) -> None:
    for update in updates:
        merge_adapter(update.layer, update.weights, strength, update.down, update.up)


def refuse_other_architecture(state: Mapping[str, torch.Tensor], family: Family, source: str) -> None:
    """One UserError naming the families a file is for, when its network is of another architecture."""
    from latentdiffusion.families import FAMILIES

    own = family.network_lora
    readers = {id(f.network_lora): f.network_lora for f in FAMILIES.values()}
    for other in readers.values():
        if other.architecture == own.architecture:
            continue
        foreign = [key for key in state if other.recognises(key) and not own.recognises(key)]
        if foreign:
            owners = sorted({f.description for f in FAMILIES.values() if f.network_lora is other})
            raise UserError(
                f"{source} is a LoRA for {other.architecture} models ({', '.join(owners)}): it has "
                f"weights such as {first_keys(foreign, 2)}; this model is {family.description} "
                f"({own.architecture})"
            )


def refuse_unsupported(state: Mapping[str, torch.Tensor], family: Family, source: str) -> None:
    """UserError for entries the family declares unsupported (``Family.lora_refusals``)."""
    for prefixes, what in family.lora_refusals.items():
        refused = [key for key in state if key.startswith(prefixes)]
        if refused:
            raise UserError(
                f"{source} has LoRA weights for {what} ({first_keys(refused, 2)}), which "
                f"{family.description} LoRA loading does not support; use a LoRA without them"
            )


# ------------------------------------------------------------------------------------------ writing


def save_model_lora(
    path: str | Path,
    family: Family,
    states: States,
    model: ModelConfig,
    *,
    metadata: Mapping[str, str] | None = None,
    naming: str = "diffusers",
) -> Path:
    """Write our adapters (``states``: role -> ``lora_state_dict``) as one safetensors LoRA file (atomic)
    in the format of the family's LoRA files (``NetworkLoRA.file_entries``); ``naming`` picks the U-Net
    names of a kohya file ("diffusers" or "original")."""
    from latentdiffusion.checkpoints.safe_io import save_safetensors

    entries, extra = family.network_lora.file_entries(states, family, model, naming)
    if not entries:
        raise UserError("there are no LoRA weights to save")
    path = Path(path)
    save_safetensors(entries, path, {**(metadata or {}), **extra})
    return path
