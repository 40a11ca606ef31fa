"""The T5 v1.1 encoder and its SentencePiece tokenizer: Stable Diffusion 3's third text encoder.

T5 (Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
Transformer", JMLR 21, Sec. 2.1) is a Transformer encoder-decoder; SD3 (Esser et al. 2024, "Scaling
Rectified Flow Transformers for High-Resolution Image Synthesis") reads the last hidden states of the
encoder of T5-XXL v1.1 as part of its context. The encoder differs from Vaswani et al. 2017 in four ways:

- layer norms only rescale: x / sqrt(mean(x^2) + eps) * w, no mean subtraction and no bias (RMSNorm,
  Zhang & Sennrich 2019), computed in float32;
- attention logits are q k^T without the 1/sqrt(d) factor (Mesh TensorFlow folds it into the
  initialisation of the query projection), plus a learned scalar per head and relative-position bucket;
  the first layer owns the bucket table and every layer adds the same bias (Raffel et al. 2020, Sec. 2.1);
- no absolute positions and no biases anywhere;
- v1.1's feed-forward is gated: wo(gelu(wi_0 x) * wi_1 x) (GEGLU, Shazeer 2020, "GLU Variants Improve
  Transformer", Eq. 6, with the tanh approximation of GELU).

Precision: T5 v1.1's feed-forward produces activations beyond float16's range (65504). Run it in float32
or bfloat16 (float32's exponent range); in float16 the residual stream is clamped back into range after
each attention and feed-forward block, as transformers does, which keeps it finite but not exact.

The tokenizer is Google's T5 v1.1 SentencePiece unigram model (32,000 pieces plus 100 sentinels) as
Hugging Face ``tokenizers`` serialises it (``tokenizer.json``); the copy shipped in ``data/`` is
described in ``data/ATTRIBUTION.md``.
"""

from __future__ import annotations

import gzip
import json
import math
import os
from collections.abc import Sequence
from functools import cache, cached_property
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from latentdiffusion.config import T5Config
from latentdiffusion.errors import UserError
from latentdiffusion.files import atomic_write

BUNDLED_TOKENIZER = "t5_tokenizer.json.gz"
TOKENIZER_FILE = "tokenizer.json"
PAD_TOKEN = "<pad>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
EXTRA_IDS = 100  # the sentinel pieces <extra_id_0> ... <extra_id_99> at the end of the vocabulary
MAX_TOKENIZER_BYTES = 64 * 2**20  # a T5 tokenizer.json is 2.4 MB


# ---- tokenizer --------------------------------------------------------------------------------------


class T5Tokenizer:
    """Text -> T5 token ids, the way SD3's pipeline prepares them for T5-XXL: the prompt's pieces, cut
    to ``max_length - 1``, the end-of-sequence token ``</s>``, then ``<pad>`` up to ``max_length``.

    ``spec`` is the text of a ``tokenizer.json``, run as written (normaliser, pre-tokeniser, unigram
    model), as transformers' ``T5TokenizerFast(tokenizer_file=...)`` runs it. (transformers 5's
    ``from_pretrained`` rebuilds T5's pipeline in code instead; it drops a trailing "▁" piece after
    trailing whitespace and the "▁" before special-token text such as "</s>" typed in a prompt.)
    The Rust tokenizer is built on first use, so pickling one for DataLoader workers stays cheap.
    """

    def __init__(self, spec: str, *, max_length: int = 256) -> None:
        if max_length < 1:
            raise ValueError(f"max_length must leave room for the end token, got {max_length}")
        self.spec = spec
        self.max_length = max_length
        pieces, added = _read_spec(spec)
        self.vocab_size = len(pieces) + added
        self.pad_token_id = _piece_id(pieces, PAD_TOKEN)
        self.eos_token_id = _piece_id(pieces, EOS_TOKEN)

    @classmethod
    def from_bundled(cls, max_length: int = 256) -> T5Tokenizer:
        """T5 v1.1's tokenizer from the copy shipped with this package."""
        return cls(_bundled_spec(), max_length=max_length)

    @classmethod
    def from_folder(cls, path: str | os.PathLike, max_length: int = 256) -> T5Tokenizer:
        """A diffusers/transformers tokenizer folder (SD3's ``tokenizer_3/``) holding ``tokenizer.json``.

        ``max_length`` is not read from the folder: its ``model_max_length`` (512) is T5's training
        length, while SD3 pads and truncates to its own ``max_sequence_length`` (256)."""
        from latentdiffusion.checkpoints.safe_io import read_regular_file

        file = Path(path) / TOKENIZER_FILE
        raw = read_regular_file(file, MAX_TOKENIZER_BYTES, what="tokenizer file")
        try:
            return cls(raw.decode("utf-8"), max_length=max_length)
        except (UnicodeDecodeError, ValueError) as error:
            raise UserError(f"cannot read the T5 tokenizer {file}: {error}") from None

    def save(self, path: str | os.PathLike) -> None:
        """Write a tokenizer folder that ``from_folder`` and transformers' ``T5TokenizerFast`` read."""
        folder = Path(path)
        settings = {
            "tokenizer_class": "T5Tokenizer",
            "model_max_length": 512,
            "eos_token": EOS_TOKEN,
            "pad_token": PAD_TOKEN,
            "unk_token": UNK_TOKEN,
            "extra_ids": EXTRA_IDS,
        }
        _write_atomic(folder / TOKENIZER_FILE, self.spec)
        _write_atomic(folder / "tokenizer_config.json", json.dumps(settings, indent=2))

    @cached_property
    def _backend(self) -> Any:
        from tokenizers import Tokenizer

        return Tokenizer.from_str(self.spec)

    def tokenize(self, text: str) -> list[int]:
        """The token ids of ``text``: no end token, no truncation."""
        return self._backend.encode(text, add_special_tokens=False).ids

    def encode(self, texts: str | Sequence[str], max_length: int | None = None) -> torch.Tensor:
        """Token ids [N, max_length] (int64): text cut to max_length - 1 pieces, ``</s>``, padding."""
        if isinstance(texts, str):
            texts = [texts]
        length = self.max_length if max_length is None else max_length
        if length < 1:
            raise ValueError(f"max_length must leave room for the end token, got {length}")
        ids = torch.full((len(texts), length), self.pad_token_id, dtype=torch.long)
        for row, text in enumerate(texts):
            tokens = [*self.tokenize(text)[: length - 1], self.eos_token_id]
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        return ids

    __call__ = encode

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_backend", None)
        return state


@cache
def _bundled_spec() -> str:
    return gzip.decompress((files("latentdiffusion") / "data" / BUNDLED_TOKENIZER).read_bytes()).decode(
        "utf-8"
    )


def _read_spec(spec: str) -> tuple[list[str], int]:
    """The unigram pieces of a ``tokenizer.json`` and the number of added tokens beyond them (none in
    T5's file: its sentinels are pieces)."""
    try:
        parsed = json.loads(spec)
        model = parsed["model"]
        if model["type"] != "Unigram":
            raise ValueError(f"a {model['type']} model")
        pieces = [piece for piece, _score in model["vocab"]]
        added = sum(1 for token in parsed.get("added_tokens") or [] if token["id"] >= len(pieces))
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"not a T5 tokenizer.json (a SentencePiece unigram model): {error}") from None
    return pieces, added


def _piece_id(pieces: list[str], piece: str) -> int:
    if piece not in pieces:
        raise ValueError(f"the tokenizer has no {piece} piece; is it a T5 tokenizer?")
    return pieces.index(piece)


def _write_atomic(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


# ---- encoder ----------------------------------------------------------------------------------------


def relative_position_bucket(
    relative_position: torch.Tensor, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """T5's bidirectional relative-position buckets (Raffel et al. 2020, Sec. 2.1) of key - query offsets.

    Half the buckets are for keys after the query, half for keys at or before it. In each half the
    first ``num_buckets // 4`` distances get a bucket each; larger distances share logarithmically
    wider buckets up to ``max_distance``, and everything beyond it shares the last bucket.
    """
    half = num_buckets // 2
    exact = half // 2
    bucket = (relative_position > 0).long() * half
    distance = relative_position.abs()
    # log(d / exact) / log(max_distance / exact) in [0, 1) spreads [exact, max_distance) over half - exact
    # buckets; the distances below ``exact`` take the other branch (clamped here only to avoid log(0))
    scaled = torch.log(distance.float().clamp(min=exact) / exact) / math.log(max_distance / exact)
    far = (exact + (scaled * (half - exact)).long()).clamp(max=half - 1)
    return bucket + torch.where(distance < exact, distance, far)


class RelativePositionBias(nn.Module):
    """A learned scalar per head and bucket, added to the attention logits of every layer."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        self.embedding = nn.Embedding(self.num_buckets, config.num_heads)

    def forward(self, length: int) -> torch.Tensor:
        """The bias [1, heads, L, L] for L queries and L keys."""
        positions = torch.arange(length, device=self.embedding.weight.device)
        offsets = positions[None, :] - positions[:, None]  # [query, key]: key - query
        buckets = relative_position_bucket(offsets, self.num_buckets, self.max_distance)
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight (Zhang & Sennrich 2019, Eq. 4), statistics and scaling in
    float32; the result has the weight's dtype when that is float16 or bfloat16."""

    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            normed = normed.to(self.weight.dtype)
        return self.weight * normed


class T5Attention(nn.Module):
    """Multi-head self-attention softmax(q k^T + bias) v: no 1/sqrt(d) factor, no projection biases."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        inner = config.num_heads * config.head_dim
        self.num_heads = config.num_heads
        self.q_proj = nn.Linear(config.hidden_size, inner, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, inner, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, inner, bias=False)
        self.out_proj = nn.Linear(inner, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, position_bias: torch.Tensor) -> torch.Tensor:
        # x: [N, L, hidden], position_bias: [1, heads, L, L] -> [N, L, hidden]
        q, k, v = (self._split_heads(proj(x)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        bias = position_bias.to(q.dtype)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)  # [N, heads, L, head_dim]
        return self.out_proj(y.transpose(1, 2).flatten(2))

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        # [N, L, heads * head_dim] -> [N, heads, L, head_dim]
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)


class GatedFeedForward(nn.Module):
    """down(gelu_tanh(gate(x)) * up(x)): T5 v1.1's gated-GELU feed-forward (Shazeer 2020, Eq. 6)."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)  # wi_0
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)  # wi_1
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)  # wo

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x)
        # a down projection kept in float32 (against float16 overflow) takes its input in float32; one
        # whose 16-bit weight is upcast as it runs (``precision.upcast_per_layer``) keeps a float32 input
        return self.down_proj(h.to(torch.promote_types(h.dtype, self.down_proj.weight.dtype)))


class T5Layer(nn.Module):
    """x + attn(norm(x), bias), then x + ff(norm(x)); in float16, each sum clamped into range."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, config.layer_norm_eps)
        self.attention = T5Attention(config)
        self.feed_forward_norm = RMSNorm(config.hidden_size, config.layer_norm_eps)
        self.feed_forward = GatedFeedForward(config)

    def forward(self, x: torch.Tensor, position_bias: torch.Tensor) -> torch.Tensor:
        x = clamp_float16(x + self.attention(self.attention_norm(x), position_bias))
        return clamp_float16(x + self.feed_forward(self.feed_forward_norm(x)))


def clamp_float16(x: torch.Tensor) -> torch.Tensor:
    """A float16 ``x`` that has overflowed to +-inf, clamped to +-(65504 - 1000) (as transformers' T5;
    the margin keeps the next sum from overflowing at once); any other ``x`` unchanged. The decision
    stays on the device (no synchronisation)."""
    if x.dtype != torch.float16:
        return x
    largest = torch.finfo(torch.float16).max
    limit = torch.where(torch.isinf(x).any(), largest - 1000, largest)
    return torch.clamp(x, min=-limit, max=limit)


class T5Encoder(nn.Module):
    """Token ids [N, L] -> the final-normed last hidden states [N, L, hidden_size] (SD3's T5 context).

    Every token attends to every token, padding included, as SD3's pipeline runs T5 without an
    attention mask. There are no absolute positions, so any L works.
    """

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        _check_config(config)
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.relative_position_bias = RelativePositionBias(config)
        self.layers = nn.ModuleList(T5Layer(config) for _ in range(config.num_layers))
        self.final_layer_norm = RMSNorm(config.hidden_size, config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
        x = self.token_embedding(input_ids)  # [N, L, D]
        position_bias = self.relative_position_bias(input_ids.shape[1])  # [1, heads, L, L]
        for layer in self.layers:
            x = layer(x, position_bias)
        return self.final_layer_norm(x)


def _check_config(config: T5Config) -> None:
    buckets = config.relative_attention_num_buckets
    exact = buckets // 4  # distances with a bucket each, per direction
    if exact < 1 or buckets % 2:
        raise ValueError(f"relative_attention_num_buckets must be even and at least 4, got {buckets}")
    if config.relative_attention_max_distance <= exact:
        raise ValueError(
            f"relative_attention_max_distance ({config.relative_attention_max_distance}) must exceed the "
            f"{exact} distances that get a bucket each"
        )
