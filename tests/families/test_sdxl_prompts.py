"""The web UI's prompt rules across SDXL's two text encoders: each 75-token chunk (and each BREAK) is
encoded by both encoders and concatenated on features; weights apply to both; the pooled vector is the
first chunk's."""

from __future__ import annotations

import torch

from latentdiffusion.families import ConditioningRequest
from latentdiffusion.prompts import apply_weights, frame, prompt_chunks

WORDS = " ".join(f"word{i}" for i in range(60))  # more than one 75-token chunk


def by_hand(components, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Each chunk through both encoders, emphasis applied per encoder, chunks joined on the sequence."""
    first = components.tokenizers["text_encoder"]
    chunks = prompt_chunks(first, text)
    states, pooled = [], None
    for role in ("text_encoder", "text_encoder_2"):
        tokenizer, encoder = components.tokenizers[role], components.modules[role]
        framed = [frame(tokenizer, chunk) for chunk in chunks]
        ids = torch.tensor([ids for ids, _ in framed])
        weights = torch.tensor([w for _, w in framed])
        context, pooled_all = encoder.encode(ids)
        states.append(apply_weights(context, weights).reshape(1, -1, context.shape[-1]))
        pooled = pooled_all[:1]
    return torch.cat(states, dim=-1), pooled


def test_long_weighted_prompts_chunk_through_both_encoders(sdxl):
    ours, _ = sdxl("base")
    components = ours.components
    text = f"(a red cat:1.4), {WORDS} BREAK [blue] sky"
    assert len(prompt_chunks(components.tokenizers["text_encoder"], text)) >= 3
    with torch.inference_mode():
        cond, uncond = components.family.encode(components, [text], ["blurry"], ConditioningRequest(64, 64))
        context, pooled = by_hand(components, text)
    torch.testing.assert_close(cond["context"], context)
    torch.testing.assert_close(cond["y"][:, : pooled.shape[1]], pooled)
    # the negative prompt is padded with empty chunks to the same length, as the web UI pads a batch
    assert uncond["context"].shape == cond["context"].shape


def test_padding_chunks_are_the_encoding_of_the_empty_prompt(sdxl):
    ours, _ = sdxl("base")
    components = ours.components
    with torch.inference_mode():
        cond, _ = components.family.encode(components, ["cat", WORDS], ["", ""], ConditioningRequest(64, 64))
        empty, _ = by_hand(components, "")
    length = components.tokenizers["text_encoder"].max_length
    chunks = cond["context"].shape[1] // length
    assert chunks >= 2
    for c in range(1, chunks):
        torch.testing.assert_close(cond["context"][0, c * length : (c + 1) * length], empty[0])
