"""The U-Net blocks that block-weighted merging gives their own ratio, by single-file key.

Block merging (the "merge block weighted" extension of the AUTOMATIC1111 web UI, SuperMerger, sd-meh,
sd-mecha) names the blocks of the original ``openaimodel`` U-Net by their index in its three lists:
``IN00``-``IN11``, ``M00``, ``OUT00``-``OUT11`` for SD 1.x/2.x (12 input and 12 output blocks: 25
values) and ``IN00``-``IN08``, ``M00``, ``OUT00``-``OUT08`` for SDXL (9 and 9: 19 values). A list may
start with one more value, ``BASE``, as SuperMerger writes it (26 or 20 values).

The convention followed is SuperMerger's (as sd-mecha records it): a key is assigned by its place in
``model.diffusion_model.``: ``input_blocks.N`` -> INnn, ``middle_block`` -> M00, ``output_blocks.N`` ->
OUTnn, the final norm and convolution (``out.``) -> the last OUT block, and the embeddings before the
first block (``time_embed``, SDXL's ``label_emb``) -> BASE. BASE also weighs every tensor outside the
U-Net (text encoders and autoencoder); without a BASE value they take the merge's ``alpha``.
(The older "merge block weighted" extension put ``time_embed`` in IN00; SuperMerger's choice is kept
because it is what the BASE-first lists people share were made with.)
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from latentdiffusion.errors import UserError

BASE = "BASE"
_INPUT = re.compile(r"^input_blocks\.(\d+)\.")
_OUTPUT = re.compile(r"^output_blocks\.(\d+)\.")
_BEFORE_BLOCKS = ("time_embed.", "label_emb.")  # embeddings computed before the first block: BASE


def block_names(input_blocks: int) -> tuple[str, ...]:
    """IN00.., M00, OUT00.. for a U-Net with ``input_blocks`` input (and as many output) blocks."""
    return (
        *(f"IN{n:02d}" for n in range(input_blocks)),
        "M00",
        *(f"OUT{n:02d}" for n in range(input_blocks)),
    )


def unet_block(key: str, input_blocks: int) -> str:
    """The block of a U-Net key (without its ``model.diffusion_model.`` prefix)."""
    if key.startswith(_BEFORE_BLOCKS):
        return BASE
    if key.startswith("middle_block."):
        return "M00"
    if key.startswith("out."):
        return f"OUT{input_blocks - 1:02d}"
    for pattern, name in ((_INPUT, "IN"), (_OUTPUT, "OUT")):
        match = pattern.match(key)
        if match:
            index = int(match.group(1))
            if index >= input_blocks:
                raise UserError(f"U-Net key {key!r} lies past the {input_blocks} blocks of its list")
            return f"{name}{index:02d}"
    raise UserError(f"U-Net key {key!r} belongs to no block (IN, M00, OUT) of block merging")


def count_input_blocks(unet_keys: Iterable[str]) -> int:
    """The number of input blocks of a U-Net (its keys without prefix); output blocks must match."""
    inputs, outputs = set(), set()
    for key in unet_keys:
        for pattern, found in ((_INPUT, inputs), (_OUTPUT, outputs)):
            match = pattern.match(key)
            if match:
                found.add(int(match.group(1)))
    if not inputs or len(inputs) != len(outputs) or max(inputs) + 1 != len(inputs):
        raise UserError(
            f"the U-Net has {len(inputs)} input and {len(outputs)} output blocks; block merging needs "
            "as many of each (12 for SD 1.x/2.x, 9 for SDXL)"
        )
    return len(inputs)


@dataclass(frozen=True)
class BlockWeights:
    """A merge ratio per U-Net block, and BASE (None: the merge's alpha) for everything else."""

    blocks: dict[str, float]
    base: float | None = None

    def ratio(self, block: str, alpha: float) -> float:
        if block == BASE:
            return alpha if self.base is None else self.base
        return self.blocks[block]


def parse_block_weights(values: str | Sequence[float], input_blocks: int) -> BlockWeights:
    """``values`` (a comma-separated string or numbers): one per block, optionally BASE first."""
    numbers = _numbers(values)
    names = block_names(input_blocks)
    if len(numbers) == len(names) + 1:
        return BlockWeights(dict(zip(names, numbers[1:], strict=True)), base=numbers[0])
    if len(numbers) == len(names):
        return BlockWeights(dict(zip(names, numbers, strict=True)))
    raise UserError(
        f"block weights need {len(names)} values ({names[0]}..{names[-1]}) or {len(names) + 1} with BASE "
        f"first for this U-Net ({input_blocks} input blocks); got {len(numbers)}"
    )


def _numbers(values: str | Sequence[float]) -> list[float]:
    parts = values.split(",") if isinstance(values, str) else list(values)
    try:
        numbers = [float(part) for part in parts]
    except (TypeError, ValueError):
        numbers = []
    if not numbers or not all(math.isfinite(n) for n in numbers):
        raise UserError(f"block weights must be finite numbers separated by commas, got {values!r}")
    return numbers
