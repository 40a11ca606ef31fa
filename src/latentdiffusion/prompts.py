"""Prompts -> text-encoder states (the U-Net's cross-attention context), in AUTOMATIC1111's prompt syntax.

Syntax (the web UI's "attention/emphasis", see docs/editing.md for every rule):
``(text)`` multiplies the weight of ``text`` by 1.1, ``[text]`` divides it by 1.1, ``(text:1.3)`` multiplies
it by 1.3; brackets nest multiplicatively; ``\\(``, ``\\)``, ``\\[``, ``\\]`` and ``\\\\`` are literal
characters; the uppercase word ``BREAK`` ends the current 75-token chunk.

Textual-inversion words (``embeddings``): a loaded embedding's name, found in the token sequence, stands
for its N vectors; they stay together in one chunk and take the weight of the text around them.

Long prompts: the CLIP text encoder sees 77 positions, so the tokens are cut into chunks of 75, each
framed by its own start and end tokens and encoded on its own; the chunk states are concatenated on the
sequence axis (cross-attention takes any context length). Weights scale each token's hidden state, then
the chunk is rescaled so that its mean is the unweighted mean again (the web UI's "Original" emphasis).
"""

from __future__ import annotations

import math
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
_BREAK_WORD = re.compile(r"\bBREAK\b")
# Above this many multiplications of one weight each, parse_prompt sums logarithms instead.
EXACT_MULTIPLICATIONS = 200_000

Fragment = tuple[str, float]  # (text, weight); (BREAK, BREAK_WEIGHT) marks a chunk break


def parse_prompt(text: str) -> list[Fragment]:
    """Split ``text`` into runs of equal weight, as the web UI's ``parse_prompt_attention`` does.

    Unmatched closing brackets are literal text; brackets left open at the end close there. Adjacent
    runs of equal weight merge (so ``(a)(b)`` is one run ``ab``). BREAK is never weighted or merged.
    Text that is not valid Unicode (lone surrogates) is a ``UserError``.

    Linear in the length of ``text``: each closing bracket is recorded as one multiplication of a
    range of fragments (``_apply_multipliers``), not applied to every fragment it encloses at once.
    """
    check_text(text)
    fragments: list[list] = []
    multipliers: list[tuple[int, int, float]] = []  # (start, end, multiplier) in the order they close
    round_open: list[int] = []
    square_open: list[int] = []

    def close(start: int, multiplier: float) -> None:
        multipliers.append((start, len(fragments), multiplier))

    for match in _SYNTAX.finditer(text):
        kind = match.lastgroup
        if kind == "escaped":
            fragments.append([match["escaped"], 1.0])
        elif kind == "open":
            (round_open if match["open"] == "(" else square_open).append(len(fragments))
        elif kind == "weight" and round_open:
            close(round_open.pop(), _weight(match["weight"]))
        elif kind == "close" and match["close"] == ")" and round_open:
            close(round_open.pop(), ROUND_MULTIPLIER)
        elif kind == "close" and match["close"] == "]" and square_open:
            close(square_open.pop(), SQUARE_MULTIPLIER)
        else:
            fragments.extend(_plain_text(match[0]))
    for start in round_open:
        close(start, ROUND_MULTIPLIER)
    for start in square_open:
        close(start, SQUARE_MULTIPLIER)
    _apply_multipliers(fragments, multipliers)
    return _merge(fragments) or [("", 1.0)]


def plain_text(text: str) -> str:
    """The prompt's text without its syntax: brackets and weights removed, escapes resolved, each BREAK a
    space (for encoders that take no weights, such as SD3's T5)."""
    pieces: list[list[str]] = [[]]  # the text between BREAKs
    for fragment in parse_prompt(text):
        if _is_break(fragment):
            pieces.append([])
        else:
            pieces[-1].append(fragment[0])
    return " ".join("".join(piece).strip() for piece in pieces) if len(pieces) > 1 else "".join(pieces[0])


def check_text(text: str, what: str = "the prompt") -> None:
    """Prompts must be encodable text: a lone surrogate (from invalid UTF-8 decoded with
    ``surrogateescape``, or a JSON ``\\ud800`` escape) would fail later, in the tokenizer or the PNG."""
    if not isinstance(text, str):
        raise UserError(f"{what} must be text, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise UserError(
            f"{what} is not valid Unicode text (a lone surrogate at character {error.start}); give UTF-8 text"
        ) from None


def _weight(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise UserError(f"prompt weight {text!r} is not a number; write e.g. (word:1.2)") from None


def _plain_text(text: str) -> list[list]:
    """``text`` with each BREAK a marker fragment; the whitespace around a BREAK goes (a plain split on
    the word and a strip, since a regex with ``\\s*`` before the word is quadratic in a long blank run)."""
    parts = _BREAK_WORD.split(text)
    pieces: list[list] = []
    for i, part in enumerate(parts):
        if i > 0:
            pieces.append([BREAK, BREAK_WEIGHT])
            part = part.lstrip()
        if i < len(parts) - 1:
            part = part.rstrip()
        pieces.append([part, 1.0])
    return pieces


def _apply_multipliers(fragments: list[list], multipliers: list[tuple[int, int, float]]) -> None:
    """Multiply the weight of each fragment in ``fragments[start:end]`` (BREAKs excepted) by each
    ``multiplier``, in order. Done one fragment at a time (the web UI's order of float operations, so
    its weights are reproduced bit for bit) while that is cheap; deep nesting, where that work grows
    with the square of the prompt's length, sums logarithms over the ranges instead (linear; equal up to
    float rounding)."""
    work = sum(end - start for start, end, _ in multipliers)
    if work <= EXACT_MULTIPLICATIONS:
        for start, end, multiplier in multipliers:
            for fragment in fragments[start:end]:
                if not _is_break(fragment):
                    fragment[1] *= multiplier
        return
    n = len(fragments)
    log_sum, zeros, negatives = [0.0] * (n + 1), [0] * (n + 1), [0] * (n + 1)  # difference arrays
    for start, end, multiplier in multipliers:
        if multiplier == 0 or math.isnan(multiplier):
            zeros[start] += 1
            zeros[end] -= 1
            continue
        log_sum[start] += math.log(abs(multiplier))
        log_sum[end] -= math.log(abs(multiplier))
        if multiplier < 0:
            negatives[start] += 1
            negatives[end] -= 1
    total, zero, negative = 0.0, 0, 0
    for i, fragment in enumerate(fragments):
        total, zero, negative = total + log_sum[i], zero + zeros[i], negative + negatives[i]
        if not _is_break(fragment):
            magnitude = 0.0 if zero else (math.exp(total) if total < 709.0 else math.inf)
            fragment[1] *= -magnitude if negative % 2 else magnitude


def _is_break(fragment: Sequence) -> bool:
    return fragment[0] == BREAK and fragment[1] == BREAK_WEIGHT


def _merge(fragments: list[list]) -> list[Fragment]:
    merged: list[tuple[list[str], float, bool]] = []  # (texts, weight, is a BREAK); joined once at the end
    for fragment in fragments:
        is_break = _is_break(fragment)
        previous = merged[-1] if merged else None
        if previous and not previous[2] and not is_break and previous[1] == fragment[1]:
            previous[0].append(fragment[0])
        else:
            merged.append(([fragment[0]], fragment[1], is_break))
    return [("".join(texts), weight) for texts, weight, _ in merged]


@dataclass
class Chunk:
    """Up to ``chunk_length`` text tokens and their weights, before framing."""

    tokens: list[int]
    weights: list[float]


def prompt_chunks(tokenizer: CLIPTokenizer, text: str, comma_backtrack: int = COMMA_BACKTRACK) -> list[Chunk]:
    """Tokenize ``text`` into weighted chunks of at most ``max_length - 2`` tokens (the web UI's
    ``tokenize_line``): a full chunk closes when the next token arrives, BREAK closes one at once, and
    an empty prompt is one empty chunk. An embedding's placeholder tokens (``embeddings``) are never
    split: when they do not fit in the chunk, it closes and they start the next, as in the web UI."""
    size = tokenizer.max_length - 2
    comma = tokenizer.vocab.get(COMMA)
    chunks: list[Chunk] = []
    chunk, last_comma = Chunk([], []), -1
    for fragment, weight in parse_prompt(text):
        if _is_break((fragment, weight)):
            chunks.append(chunk)
            chunk, last_comma = Chunk([], []), -1
            continue
        tokens = tokenizer.tokenize(fragment)
        i = 0
        while i < len(tokens):
            token = tokens[i]
            if token == comma:
                last_comma = len(chunk.tokens)
            elif len(chunk.tokens) == size and last_comma >= 0 and size - last_comma <= comma_backtrack:
                # keep the comma's clause together: move what follows the comma to the next chunk
                cut = last_comma + 1
                chunks.append(Chunk(chunk.tokens[:cut], chunk.weights[:cut]))
                chunk, last_comma = Chunk(chunk.tokens[cut:], chunk.weights[cut:]), -1
            span = max(1, _embedding_span(tokenizer, token))
            if len(chunk.tokens) == size or (chunk.tokens and len(chunk.tokens) + span > size):
                chunks.append(chunk)
                chunk, last_comma = Chunk([], []), -1
            chunk.tokens += tokens[i : i + span]
            chunk.weights += [weight] * span
            i += span
    if chunk.tokens or not chunks:
        chunks.append(chunk)
    return chunks


def _embedding_span(tokenizer: CLIPTokenizer, token: int) -> int:
    """The number of placeholder tokens of the embedding that starts at ``token`` (0: a plain token)."""
    from latentdiffusion.embeddings import TokenizerWithEmbeddings

    return tokenizer.span(token) if isinstance(tokenizer, TokenizerWithEmbeddings) else 0


def extra_vectors(tokenizer: CLIPTokenizer) -> torch.Tensor | None:
    """The input vectors of the tokenizer's embedding placeholders [E, D] (None: it knows none)."""
    from latentdiffusion.embeddings import TokenizerWithEmbeddings

    if isinstance(tokenizer, TokenizerWithEmbeddings) and tokenizer.embeddings:
        return tokenizer.vectors
    return None


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
    states, pooled_states = _run_encoder(encoder, tokens, extra_vectors(tokenizer), pooled)
    states = apply_weights(states.float(), torch.tensor(weights, device=device))  # [N * C, L, D]
    n, length = len(prompts), tokenizer.max_length
    states = states.reshape(n, chunks * length, -1)
    if not pooled:
        return states
    return states, pooled_states.float().reshape(n, chunks, -1)[:, 0]


def _run_encoder(
    encoder: torch.nn.Module, tokens: torch.Tensor, extra: torch.Tensor | None, pooled: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(states, pooled or None); the embeddings' vectors go to the encoder only when there are some (so
    that encoders without textual inversion keep their plain call)."""
    options = {} if extra is None else {"extra_vectors": extra.to(tokens.device)}
    if pooled:
        return encoder.encode(tokens, **options)
    return encoder(tokens, **options), None


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
    same = list(negative_prompts) == list(prompts)  # the same text, the same states: encoded once
    uncond = context if same else encode_prompts(tokenizer, encoder, negative_prompts, chunks)
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
