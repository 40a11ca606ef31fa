"""Prompts -> text-encoder states (the cross-attention context of the U-Net)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from latentdiffusion.pipelines.components import Components


def encode_prompts(components: Components, prompts: Sequence[str]) -> torch.Tensor:
    """Tokenize and encode ``prompts`` -> [N, max_length, hidden_size] on the U-Net's device and dtype."""
    ids = components.tokenizer(list(prompts)).to(components.device)
    states = components.text_encoder(ids)
    return states.to(components.dtype)
