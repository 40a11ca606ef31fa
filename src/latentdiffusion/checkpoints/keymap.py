"""Declarative key tables: renaming state-dict keys between our module names and a file layout.

A table is a sequence of ``(ours, theirs)`` prefix templates. ``{}`` in a template stands for a
non-negative integer; the integers captured on one side fill the other side in order, so one table
serves both directions. A key is renamed by the first template whose prefix matches it (at a ``.``
boundary or the whole key); keys that no template matches keep their name, and strict
``load_state_dict`` then reports them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any, TypeVar

from latentdiffusion.errors import UserError

if TYPE_CHECKING:
    import torch

KeyTable = Sequence[tuple[str, str]]
V = TypeVar("V")


@lru_cache(maxsize=4096)
def _template_regex(template: str) -> re.Pattern[str]:
    pattern = r"\d+".join(re.escape(part) for part in template.split("{}"))
    pattern = pattern.replace(r"\d+", r"(\d+)")
    boundary = "" if template.endswith(".") else r"(?=\.|$)"
    return re.compile(pattern + boundary)


def rename_key(key: str, table: KeyTable, *, reverse: bool = False) -> str:
    """Rename one key from our names to the table's (or back with ``reverse=True``)."""
    for ours, theirs in table:
        source, target = (theirs, ours) if reverse else (ours, theirs)
        match = _template_regex(source).match(key)
        if match:
            return target.format(*(int(g) for g in match.groups())) + key[match.end() :]
    return key


def rename_keys(state: Mapping[str, V], table: KeyTable, *, reverse: bool = False) -> dict[str, V]:
    """Rename every key of ``state``; raises if two keys collide after renaming."""
    renamed: dict[str, V] = {}
    for key, value in state.items():
        new_key = rename_key(key, table, reverse=reverse)
        if new_key in renamed:
            raise ValueError(f"key table maps two keys onto {new_key!r}")
        renamed[new_key] = value
    return renamed


def strip_prefix(state: Mapping[str, V], prefix: str) -> dict[str, V]:
    """The entries of ``state`` under ``prefix``, with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def add_prefix(state: Mapping[str, V], prefix: str) -> dict[str, V]:
    return {prefix + k: v for k, v in state.items()}


def first_keys(keys: Iterable[str], limit: int = 5) -> str:
    """A short, readable list of keys for error messages."""
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")


def load_exact_state(network: torch.nn.Module, state: Mapping[str, Any], source: str, what: str) -> None:
    """Load ``state`` into ``network`` only if it holds exactly the network's keys, in their shapes;
    else one UserError naming ``source``, ``what`` the weights were taken for and the keys or shape at
    fault."""
    expected = network.state_dict().keys()
    missing, unexpected = expected - state.keys(), state.keys() - expected
    if missing or unexpected:
        raise UserError(
            f"{source}: the weights do not fit {what}"
            + (f"; missing {first_keys(missing)}" if missing else "")
            + (f"; unexpected {first_keys(unexpected)}" if unexpected else "")
        )
    try:
        network.load_state_dict(state)
    except RuntimeError as error:
        reason = str(error).splitlines()[-1].strip()
        raise UserError(f"{source}: weights of the wrong shape: {reason}") from None


@lru_cache(maxsize=1024)
def _whole_key_regex(template: str) -> re.Pattern[str]:
    return re.compile(r"(\d+)".join(re.escape(part) for part in template.split("{}")))


def match_template(template: str, key: str) -> tuple[int, ...] | None:
    """The integers a whole ``key`` fills into ``template``'s ``{}`` slots, or None if it does not match."""
    match = _whole_key_regex(template).fullmatch(key)
    return None if match is None else tuple(int(g) for g in match.groups())
