"""Prompts -> text-encoder states (the U-Net's cross-attention context), in AUTOMATIC1111's prompt syntax.

Syntax (the web UI's "attention/emphasis", see docs/editing.md for every rule):
``(text)`` multiplies the weight of ``text`` by 1.1, ``[text]`` divides it by 1.1, ``(text:1.3)`` multiplies
it by 1.3; brackets nest multiplicatively; ``\\(``, ``\\)``, ``\\[``, ``\\]`` and ``\\\\`` are literal
characters; the uppercase word ``BREAK`` ends the current 75-token chunk.

Long prompts: the CLIP text encoder sees 77 positions, so the tokens are cut into chunks of 75, each
framed by its own start and end tokens and encoded on its own; the chunk states are concatenated on the
sequence axis (cross-attention takes any context length). Weights scale each token's hidden state, then
the chunk is rescaled so that its mean is the unweighted mean again (the web UI's "Original" emphasis).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from latentdiffusion.errors import UserError

if TYPE_CHECKING:
    from latentdiffusion.components import Components
    from latentdiffusion.models.tokenizer import CLIPTokenizer

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
BREAK = "BREAK"
BREAK_WEIGHT = -1.0  # the marker weight the web UI gives BREAK in its parse
# When a chunk fills up and a comma lies at most this many tokens back, the words after the comma move
# to the next chunk (the web UI's "comma padding backtrack" setting, default 20; 0 turns it off).
COMMA_BACKTRACK = 20
COMMA = ",</w>"

# One syntax element per match: an escaped character, a bracket, a weight that closes a round bracket,
# a run of plain text, or a lone colon (plain text too).
_SYNTAX = re.compile(
    r"""
      \\(?P<escaped>.?)
    | (?P<open>[(\[])
    | :\s*(?P<weight>[+-]?[.\d]+)\s*\)
    | (?P<close>[)\]])
    | (?P<text>[^\\()\[\]:]+|:)
    """,
    re.VERBOSE | re.DOTALL,
)
_BREAK_SPLIT = re.compile(r"\s*\bBREAK\b\s*")

Fragment = tuple[str, float]  # (text, weight); (BREAK, BREAK_WEIGHT) marks a chunk break


def parse_prompt(text: str) -> list[Fragment]:
    """Split ``text`` into runs of equal weight, as the web UI's ``parse_prompt_attention`` does.

    Unmatched closing brackets are literal text; brackets left open at the end close there. Adjacent
    runs of equal weight merge (so ``(a)(b)`` is one run ``ab``). BREAK is never weighted or merged.
    """
    fragments: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []
    for match in _SYNTAX.finditer(text):
        kind = match.lastgroup
        if kind == "escaped":
            fragments.append([match["escaped"], 1.0])
        elif kind == "open":
            (round_open if match["open"] == "(" else square_open).append(len(fragments))
        elif kind == "weight" and round_open:
            _multiply(fragments, round_open.pop(), _weight(match["weight"]))
        elif kind == "close" and match["close"] == ")" and round_open:
            _multiply(fragments, round_open.pop(), ROUND_MULTIPLIER)
        elif kind == "close" and match["close"] == "]" and square_open:
            _multiply(fragments, square_open.pop(), SQUARE_MULTIPLIER)
        else:
            fragments.extend(_plain_text(match[0]))
    for start in round_open:
        _multiply(fragments, start, ROUND_MULTIPLIER)
    for start in square_open:
        _multiply(fragments, start, SQUARE_MULTIPLIER)
    return _merge(fragments) or [("", 1.0)]


def _weight(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise UserError(f"prompt weight {text!r} is not a number; write e.g. (word:1.2)") from None


def _plain_text(text: str) -> list[list]:
    pieces: list[list] = []
    for i, part in enumerate(_BREAK_SPLIT.split(text)):
        if i > 0:
            pieces.append([BREAK, BREAK_WEIGHT])
        pieces.append([part, 1.0])
    return pieces


def _multiply(fragments: list[list], start: int, multiplier: float) -> None:
    for fragment in fragments[start:]:
        if not _is_break(fragment):
            fragment[1] *= multiplier


def _is_break(fragment: Sequence) -> bool:
    return fragment[0] == BREAK and fragment[1] == BREAK_WEIGHT


def _merge(fragments: list[list]) -> list[Fragment]:
    merged: list[list] = []
    for fragment in fragments:
        previous = merged[-1] if merged else None
        if previous and not _is_break(previous) and not _is_break(fragment) and previous[1] == fragment[1]:
            previous[0] += fragment[0]
        else:
            merged.append(list(fragment))
    return [(text, weight) for text, weight in merged]


@dataclass
class Chunk:
    """Up to ``chunk_length`` text tokens and their weights, before framing."""

    tokens: list[int]
    weights: list[float]


def prompt_chunks(tokenizer: CLIPTokenizer, text: str, comma_backtrack: int = COMMA_BACKTRACK) -> list[Chunk]:
    """Tokenize ``text`` into weighted chunks of at most ``max_length - 2`` tokens (the web UI's
    ``tokenize_line``): a full chunk closes when the next token arrives, BREAK closes one at once, and
    an empty prompt is one empty chunk."""
    size = tokenizer.max_length - 2
    comma = tokenizer.vocab.get(COMMA)
    chunks: list[Chunk] = []
    chunk, last_comma = Chunk([], []), -1
    for fragment, weight in parse_prompt(text):
        if _is_break((fragment, weight)):
            chunks.append(chunk)
            chunk, last_comma = Chunk([], []), -1
            continue
        for token in tokenizer.tokenize(fragment):
            if token == comma:
                last_comma = len(chunk.tokens)
            elif len(chunk.tokens) == size and last_comma >= 0 and size - last_comma <= comma_backtrack:
                # keep the comma's clause together: move what follows the comma to the next chunk
                cut = last_comma + 1
                chunks.append(Chunk(chunk.tokens[:cut], chunk.weights[:cut]))
                chunk, last_comma = Chunk(chunk.tokens[cut:], chunk.weights[cut:]), -1
            if len(chunk.tokens) == size:
                chunks.append(chunk)
                chunk, last_comma = Chunk([], []), -1
            chunk.tokens.append(token)
            chunk.weights.append(weight)
    if chunk.tokens or not chunks:
        chunks.append(chunk)
    return chunks


def frame(tokenizer: CLIPTokenizer, chunk: Chunk) -> tuple[list[int], list[float]]:
    """[start, tokens, end, padding...] of length max_length, with weight 1 on the frame and padding."""
    padding = tokenizer.max_length - 2 - len(chunk.tokens)
    ids = [tokenizer.bos_token_id, *chunk.tokens, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * padding
    return ids, [1.0, *chunk.weights, 1.0] + [1.0] * padding


def count_chunks(tokenizer: CLIPTokenizer, prompts: Sequence[str]) -> int:
    """The largest number of chunks among ``prompts`` (at least 1)."""
    return max((len(prompt_chunks(tokenizer, p)) for p in prompts), default=1)


def encode_prompts(
    tokenizer: CLIPTokenizer,
    encoder: torch.nn.Module,
    prompts: Sequence[str],
    chunks: int | None = None,
    *,
    pooled: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Encode ``prompts`` with one text encoder -> float32 [N, chunks * max_length, hidden_size] on the
    encoder's device; with ``pooled``, also its pooled output [N, P] of each prompt's first chunk (as the
    web UI takes SDXL's pooled vector).

    Every prompt is padded with empty chunks (the encoding of ``""``) to ``chunks`` (default: the most
    any prompt of the batch needs), as the web UI pads a batch.
    """
    chunks = chunks or count_chunks(tokenizer, prompts)
    ids, weights = [], []
    for prompt in prompts:
        own = prompt_chunks(tokenizer, prompt)
        if len(own) > chunks:
            raise ValueError(f"prompt needs {len(own)} chunks, more than the {chunks} asked for")
        for chunk in own + [Chunk([], [])] * (chunks - len(own)):
            chunk_ids, chunk_weights = frame(tokenizer, chunk)
            ids.append(chunk_ids)
            weights.append(chunk_weights)
    device = next(encoder.parameters()).device
    tokens = torch.tensor(ids, dtype=torch.long, device=device)  # [N * C, L]
    states, pooled_states = encoder.encode(tokens) if pooled else (encoder(tokens), None)
    states = apply_weights(states.float(), torch.tensor(weights, device=device))  # [N * C, L, D]
    n, length = len(prompts), tokenizer.max_length
    states = states.reshape(n, chunks * length, -1)
    if not pooled:
        return states
    return states, pooled_states.float().reshape(n, chunks, -1)[:, 0]


def encode_prompt_pair(
    components: Components,
    prompts: Sequence[str],
    negative_prompts: Sequence[str],
    role: str = "text_encoder",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(context, uncond_context) from the text encoder ``role``, padded to the same number of chunks so
    that guidance can batch them, in the denoiser's dtype."""
    tokenizer, encoder = components.tokenizers[role], components.modules[role]
    chunks = max(count_chunks(tokenizer, prompts), count_chunks(tokenizer, negative_prompts))
    context = encode_prompts(tokenizer, encoder, prompts, chunks)
    uncond = encode_prompts(tokenizer, encoder, negative_prompts, chunks)
    return context.to(components.dtype), uncond.to(components.dtype)


def pad_with_breaks(tokenizer: CLIPTokenizer, texts: Sequence[str], chunks: int) -> list[str]:
    """``texts`` with `` BREAK`` appended until each has ``chunks`` chunks: the same empty-chunk padding
    as ``encode_prompt_pair``, for callers that encode prompts and negative prompts separately."""
    padded = []
    for text in texts:
        for _ in range(chunks + 1):
            if len(prompt_chunks(tokenizer, text)) >= chunks:
                break
            text += f" {BREAK}"
        padded.append(text)
    return padded


def apply_weights(states: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Scale each token's state [B, L, D] by its weight [B, L], then restore each chunk's mean.

    The web UI's "Original" emphasis: z * w * (mean(z) / mean(z * w)), per chunk. Chunks whose weights
    are all 1 are returned untouched (bit for bit).
    """
    weighted = (weights != 1).any(dim=1)  # [B]
    if not bool(weighted.any()):
        return states
    original_mean = states.mean(dim=(1, 2), keepdim=True)
    scaled = states * weights[..., None]
    scaled = scaled * (original_mean / scaled.mean(dim=(1, 2), keepdim=True))
    return torch.where(weighted[:, None, None], scaled, states)
