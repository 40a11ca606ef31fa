"""LyCORIS files: the tensor names of each adapter kind, and one layer's tensors read as an adapter of
``models.lycoris``.

LyCORIS (and kohya's sd-scripts, the web UI and ComfyUI after it) names a layer as kohya's LoRA files do
(``lora_unet_...``, ``lora_te_...``, SDXL's ``lora_te1_`` / ``lora_te2_``; see ``lora_keys``) and its
tensors by kind:

=============  ==========================================================================================
LoCon          ``lora_down.weight``, ``lora_up.weight`` and, for the Tucker ("CP") form of a k x k
               convolution, ``lora_mid.weight`` (without it a LoCon is an ordinary LoRA)
LoHa           ``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b``; Tucker: ``hada_t1``, ``hada_t2``
LoKr           ``lokr_w1`` or ``lokr_w1_a`` + ``lokr_w1_b``; ``lokr_w2`` or ``lokr_w2_a`` + ``lokr_w2_b``
               (Tucker: ``lokr_t2``)
full           ``diff`` (the weight's difference) and ``diff_b`` (the bias's)
any            ``alpha`` (a scalar; absent: alpha = rank) and DoRA's magnitude ``dora_scale``
=============  ==========================================================================================

Other LyCORIS kinds (OFT / BOFT, (IA)^3, GLoRA, norm-layer adapters) are recognised and refused by name.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from latentdiffusion.errors import UserError
from latentdiffusion.models.lycoris import Adapter, Full, LoConTucker, LoHa, LoKr

# file part name -> field of the kind's adapter
KINDS: dict[str, dict[str, str]] = {
    "LoCon": {"lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid"},
    "LoHa": {f"hada_{n}": n for n in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")},
    "LoKr": {f"lokr_{n}": n for n in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")},
    "full": {"diff": "diff", "diff_b": "diff_b"},
}
SHARED = ("alpha", "dora_scale")
# the tensors any LyCORIS kind stores (the LoRA ones included)
LYCORIS_PARTS = frozenset(part for table in KINDS.values() for part in table) | set(SHARED)
# tensors of the LyCORIS kinds that are not read, and the kind's name
REFUSED = {
    "oft_blocks": "OFT / BOFT",
    "oft_diag": "OFT",
    "rescale": "OFT / BOFT",
    "weight": "(IA)^3",
    "on_input": "(IA)^3",
    "a1.weight": "GLoRA",
    "a2.weight": "GLoRA",
    "b1.weight": "GLoRA",
    "b2.weight": "GLoRA",
    "w_norm": "norm-layer",
    "b_norm": "norm-layer",
}
# each kind's required fields: one of the alternatives must be complete
REQUIRED = {
    "LoCon": (("down", "mid", "up"),),
    "LoHa": (("w1_a", "w1_b", "w2_a", "w2_b"),),
    "full": (("diff",),),
}
SUPPORTED = "LoRA / LoCon, LoHa, LoKr, full differences (diff) and DoRA (dora_scale)"


def refused_kind(name: str, parts: Mapping[str, torch.Tensor], source: str) -> None:
    """UserError for a layer of a LyCORIS kind that is not read."""
    refused = sorted(part for part in parts if part in REFUSED)
    if refused:
        raise UserError(
            f"{source}: {name} has {REFUSED[refused[0]]} adapter tensors ({', '.join(refused)}), which "
            f"are not supported; supported: {SUPPORTED}"
        )


def lycoris_adapter(
    name: str,
    parts: Mapping[str, torch.Tensor],
    source: str,
    alpha: float | None,
    dora_scale: torch.Tensor | None,
) -> Adapter:
    """The adapter of one layer (its tensors by part name, without ``alpha`` and ``dora_scale``);
    UserError when its parts mix kinds, lack one or do not fit together."""
    kinds = [kind for kind, table in KINDS.items() if table.keys() & parts.keys()]
    if len(kinds) != 1:
        found = " and ".join(kinds) if kinds else "no weights (only alpha / dora_scale)"
        raise UserError(f"{source}: {name} has {found}; one layer holds one adapter ({SUPPORTED})")
    kind = kinds[0]
    fields = {KINDS[kind][part]: value for part, value in parts.items()}
    _check_complete(kind, fields, name, source)
    adapter = _build(kind, fields, alpha, dora_scale)
    try:
        adapter.shape  # noqa: B018 (computed on the meta device: the factors must multiply)
    except ValueError as error:
        shapes = ", ".join(f"{part} {tuple(value.shape)}" for part, value in sorted(parts.items()))
        raise UserError(
            f"{source}: {name}'s {kind} tensors do not fit together ({shapes}): {error}"
        ) from None
    return adapter


def _check_complete(kind: str, fields: Mapping[str, torch.Tensor], name: str, source: str) -> None:
    prefix = {"LoCon": "lora_", "LoHa": "hada_", "LoKr": "lokr_", "full": ""}[kind]
    if kind == "LoKr":
        missing = _lokr_missing(fields)
    else:
        missing = [f for f in REQUIRED[kind][0] if f not in fields]
        if kind == "LoHa" and ("t1" in fields) != ("t2" in fields):
            missing = ["t1" if "t2" in fields else "t2"]
    if missing:
        part = prefix + missing[0] + (".weight" if kind == "LoCon" else "")
        raise UserError(f"{source}: {name} is a {kind} adapter without {part}")


def _lokr_missing(fields: Mapping[str, torch.Tensor]) -> list[str]:
    """The LoKr tensors missing: each half is whole (w1 / w2) or a pair (w1_a + w1_b / w2_a + w2_b)."""
    missing = []
    for half in ("w1", "w2"):
        pair = (f"{half}_a", f"{half}_b")
        if half not in fields:
            missing += [part for part in pair if part not in fields]
    if "t2" in fields and "w2" in fields:
        missing.append("w2_a (a Tucker core t2 goes with w2_a and w2_b, not w2)")
    return missing


def _build(
    kind: str, fields: dict[str, torch.Tensor], alpha: float | None, dora_scale: torch.Tensor | None
) -> Adapter:
    if kind == "LoCon":
        return LoConTucker(alpha=alpha, dora_scale=dora_scale, **fields)
    if kind == "LoHa":
        return LoHa(alpha=alpha, dora_scale=dora_scale, **fields)
    if kind == "LoKr":
        return LoKr(alpha=alpha, dora_scale=dora_scale, **fields)
    return Full(dora_scale=dora_scale, **fields)  # a stored difference has no alpha
