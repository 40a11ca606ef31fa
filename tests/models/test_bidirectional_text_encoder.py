"""A text encoder without CLIP's causal mask (``TextEncoderConfig.causal = False``): what each token sees,
and an encoder opened from a causal one (the layouts refusing it: test_coordinate_channels.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from latentdiffusion.config import TINY
from latentdiffusion.models.text_encoder import TextEncoder, without_causal_mask


def _prompts_differing_in_the_last_token(vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % vocab_size
    return ids, changed


@pytest.mark.parametrize("causal", [True, False])
def test_only_an_encoder_without_causal_mask_lets_early_tokens_see_later_ones(causal):
    torch.manual_seed(0)
    encoder = TextEncoder(replace(TINY.text_encoder, causal=causal)).eval()
    ids, changed = _prompts_differing_in_the_last_token(TINY.text_encoder.vocab_size)
    with torch.no_grad():
        first, second = encoder(ids), encoder(changed)
    assert torch.equal(first[:, :-1], second[:, :-1]) == causal
    assert not torch.allclose(first[:, -1], second[:, -1])


def test_without_causal_mask_keeps_the_weights_and_opens_the_mask():
    torch.manual_seed(0)
    encoder = TextEncoder(TINY.text_encoder).train()
    opened = without_causal_mask(encoder)
    assert encoder.config.causal and not opened.config.causal and opened.training
    for (name, value), (other, opened_value) in zip(
        encoder.state_dict().items(), opened.state_dict().items(), strict=True
    ):
        assert name == other and torch.equal(value, opened_value)
    assert without_causal_mask(opened) is opened
