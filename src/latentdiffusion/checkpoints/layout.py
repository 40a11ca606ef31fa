"""One generic conversion between our module state dicts and a file layout, driven by a ``Layout`` value.

A layout says where a module lives in a file (a key prefix), how its keys are renamed (a key table of
``keymap`` prefix templates), which stored tensors are several of ours concatenated (OpenCLIP's fused
q/k/v projection), which of our Linear weights the file stores as 1x1 convolutions (the first-stage
mid-block attention), which it stores transposed (OpenCLIP's ``text_projection``, applied as
``x @ W``) and which stored keys carry nothing we use (the layer SD 2 skips, CLIP's contrastive head).
``read_layout`` and ``write_layout`` are exact inverses on the tensors we keep, and neither copies a
tensor except to concatenate fused ones on write.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from latentdiffusion.checkpoints.keymap import KeyTable, add_prefix, match_template, rename_keys, strip_prefix


@dataclass(frozen=True)
class Fused:
    """A stored tensor that is our tensors ``ours`` concatenated in order along dim 0."""

    theirs: str  # template of the stored key, e.g. "transformer.resblocks.{}.attn.in_proj_weight"
    ours: tuple[str, ...]  # templates of our keys, filled with the same integers


@dataclass(frozen=True)
class Layout:
    """How one of our modules is stored in a file (see the module docstring)."""

    prefix: str
    table: KeyTable  # (ours, theirs) prefix templates, most specific first
    fused: tuple[Fused, ...] = ()
    conv_weights: frozenset[str] = frozenset()  # our Linear weights stored as [out, in, 1, 1]
    transposed: frozenset[str] = frozenset()  # our Linear weights stored as [in, out]
    ignored: tuple[str, ...] = ()  # stored key templates (after the prefix) that we drop, prefix-matched


def read_layout(state: Mapping[str, torch.Tensor], layout: Layout) -> dict[str, torch.Tensor]:
    """Our module's state dict from the entries of ``state`` under ``layout.prefix``.

    Keys that the layout does not know keep their stored names, so a strict load reports them.
    """
    theirs = {k: v for k, v in strip_prefix(state, layout.prefix).items() if not ignored(k, layout.ignored)}
    split: dict[str, torch.Tensor] = {}
    for fused in layout.fused:
        for key in [k for k in theirs if match_template(fused.theirs, k) is not None]:
            split.update(_split(fused, key, theirs.pop(key)))
    ours = rename_keys(theirs, layout.table, reverse=True)
    if ours.keys() & split.keys():
        raise ValueError(f"layout maps two stored keys onto {sorted(ours.keys() & split.keys())[0]!r}")
    ours.update(split)
    for key in layout.conv_weights & ours.keys():
        if ours[key].ndim > 2:
            ours[key] = ours[key].flatten(1)
    for key in layout.transposed & ours.keys():
        ours[key] = ours[key].T  # a view: loading copies it into the parameter
    return ours


def write_layout(ours: Mapping[str, torch.Tensor], layout: Layout) -> dict[str, torch.Tensor]:
    """The stored entries (prefix included) for our module's state dict ``ours``."""
    ours = dict(ours)
    for key in layout.conv_weights & ours.keys():
        ours[key] = ours[key][:, :, None, None]
    for key in layout.transposed & ours.keys():
        ours[key] = ours[key].T  # a view: saving writes it contiguously
    fused_entries = {}
    for fused in layout.fused:
        fused_entries.update(_fuse(fused, ours))
    theirs = rename_keys(ours, layout.table)
    theirs.update(fused_entries)
    return add_prefix(theirs, layout.prefix)


def ignored(key: str, templates: Iterable[str]) -> bool:
    """Whether ``key`` or one of its dot-separated prefixes matches one of ``templates``."""
    parts = key.split(".")
    prefixes = [".".join(parts[: n + 1]) for n in range(len(parts))]
    return any(match_template(t, p) is not None for t in templates for p in prefixes)


def _split(fused: Fused, key: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    numbers = match_template(fused.theirs, key)
    if value.shape[0] % len(fused.ours):
        raise ValueError(f"{key} has {value.shape[0]} rows, not divisible into {len(fused.ours)} parts")
    chunks = value.chunk(len(fused.ours), dim=0)
    return {template.format(*numbers): chunk for template, chunk in zip(fused.ours, chunks, strict=True)}


def _fuse(fused: Fused, ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Pop every complete group of ``fused.ours`` keys from ``ours``; return the concatenations."""
    first = fused.ours[0]
    out = {}
    for key in [k for k in ours if match_template(first, k) is not None]:
        numbers = match_template(first, key)
        names = [template.format(*numbers) for template in fused.ours]
        if all(name in ours for name in names):
            out[fused.theirs.format(*numbers)] = torch.cat([ours.pop(name) for name in names], dim=0)
    return out
