"""The CLIP text transformer (Radford et al. 2021, "Learning Transferable Visual Models From Natural
Language Supervision", Sec. 2.4) that conditions Stable Diffusion.

A GPT-2-style decoder-only Transformer (Vaswani et al. 2017, "Attention Is All You Need", with the
pre-LN residual arrangement of Radford et al. 2019): token plus learned position embeddings, then
layers of ``x + attn(LN(x))`` with causal multi-head self-attention and ``x + mlp(LN(x))``, then a
final layer norm. Stable Diffusion reads the whole sequence of hidden states as cross-attention
context. SD 1.x uses OpenAI CLIP ViT-L/14 (quick_gelu, last layer); SD 2.x uses OpenCLIP ViT-H/14
(gelu) and stops one layer early ("penultimate"), still applying the final layer norm, as SD 2's
``FrozenOpenCLIPEmbedder`` and diffusers' truncated 23-layer encoder both do. Skipped layers are not
built at all. SDXL (Podell et al. 2023, Sec. 2.1) reads the penultimate layer of OpenAI CLIP ViT-L and of
OpenCLIP ViT-bigG *without* the final layer norm (``context_from_penultimate``), and also the pooled,
projected embedding of bigG (``encode``): the final-normed state of the end-of-text token through a
bias-free ``text_projection``, CLIP's contrastive text feature (Radford et al. 2021, Fig. 3).

``TextEncoderConfig.causal = False`` (beyond Stable Diffusion) lets every token see the whole prompt, as
in a BERT/T5 encoder: a word before a relation ("a red circle left of ...") can then carry which side
its object is on, which the default model uses to bind objects to places.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from latentdiffusion.config import TextEncoderConfig
from latentdiffusion.models.layers import Linear


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU (Hendrycks & Gimpel 2016, Sec. 2)."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "quick_gelu": quick_gelu,
    "gelu": F.gelu,
}


class TextEmbeddings(nn.Module):
    """Token embedding plus a learned absolute position embedding."""

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_length, config.hidden_size)

    def forward(self, input_ids: torch.Tensor, extra_vectors: torch.Tensor | None = None) -> torch.Tensor:
        """``extra_vectors`` [E, D]: the input vectors of ids vocab_size .. vocab_size + E - 1 (textual
        inversion, Gal et al. 2022, Sec. 4: new words are new rows of the embedding table)."""
        length = input_ids.shape[1]
        max_length = self.position_embedding.num_embeddings
        if length > max_length:
            raise ValueError(f"text encoder takes at most {max_length} tokens per sequence, got {length}")
        # positions are always 0..L-1, so slice the table instead of keeping a position_ids buffer
        return self._tokens(input_ids, extra_vectors) + self.position_embedding.weight[:length]

    def _tokens(self, input_ids: torch.Tensor, extra_vectors: torch.Tensor | None) -> torch.Tensor:
        vocab = self.token_embedding.num_embeddings
        extra = input_ids >= vocab
        if extra_vectors is None or not bool(extra.any()):
            return self.token_embedding(input_ids)
        if int(input_ids.max()) >= vocab + len(extra_vectors):
            raise ValueError(
                f"token id {int(input_ids.max())} is beyond the {len(extra_vectors)} extra vectors"
            )
        tokens = self.token_embedding(input_ids.masked_fill(extra, 0))  # [N, L, D]
        added = extra_vectors.to(tokens.dtype)[(input_ids - vocab).clamp(min=0)]  # [N, L, D]
        return torch.where(extra[..., None], added, tokens)


class SelfAttention(nn.Module):
    """Multi-head self-attention (Vaswani et al. 2017, Sec. 3.2.2): token i sees tokens <= i (CLIP's
    causal mask) or, with ``config.causal`` off, every token."""

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        width = config.hidden_size
        self.num_heads, self.causal = config.num_heads, config.causal
        self.q_proj = Linear(width, width)
        self.k_proj = Linear(width, width)
        self.v_proj = Linear(width, width)
        self.out_proj = Linear(width, width)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        n, length, width = x.shape
        return x.view(n, length, self.num_heads, width // self.num_heads).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, width = x.shape
        q, k, v = (self._split_heads(proj(x)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # [N, heads, L, head_dim]
        return self.out_proj(y.transpose(1, 2).reshape(n, length, width))


class MLP(nn.Module):
    """The position-wise feed-forward network (Vaswani et al. 2017, Eq. 2, with GELU for ReLU)."""

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.fc1 = Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size)
        self.activation = ACTIVATIONS[config.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class EncoderLayer(nn.Module):
    """One pre-LN Transformer layer: x + attn(LN1(x)), then x + mlp(LN2(x))."""

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = SelfAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class TextEncoder(nn.Module):
    """Token ids [N, L] -> hidden states [N, L, hidden_size] (the U-Net's cross-attention context).

    Builds ``num_layers - skip_last_layers`` layers; the final layer norm is applied to the output of
    the last one built, and the context is that, or with ``context_from_penultimate`` the raw output of
    the layer before the last. ``encode`` also returns the pooled embedding.
    """

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        _check_config(config)
        self.config = config
        self.embeddings = TextEmbeddings(config)
        depth = config.num_layers - config.skip_last_layers
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(depth))
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.text_projection = None
        if config.projection_dim is not None:
            self.text_projection = Linear(config.hidden_size, config.projection_dim, bias=False)

    def forward(
        self, input_ids: torch.Tensor, pooled: bool = False, extra_vectors: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The context [N, L, hidden_size]; the last layer does not run when only the penultimate is read.
        With ``pooled``: ``encode`` (through ``forward``, so that a DDP wrapper sees the call in training).
        Ids >= ``vocab_size`` read their input vector from ``extra_vectors`` (``TextEmbeddings``)."""
        if pooled:
            return self.encode(input_ids, extra_vectors)
        if self.config.context_from_penultimate:
            return self._run(input_ids, self.layers[:-1], extra_vectors)
        return self.final_layer_norm(self._run(input_ids, self.layers, extra_vectors))

    def encode(
        self, input_ids: torch.Tensor, extra_vectors: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(context [N, L, hidden_size], pooled [N, projection_dim or hidden_size]).

        pooled: the final-normed last layer at each row's first ``eos_token_id`` (position 0 in a row
        without one), as transformers' CLIPTextModel; projected by ``text_projection`` if there is one.
        """
        penultimate = self._run(input_ids, self.layers[:-1], extra_vectors)
        last = self.final_layer_norm(self.layers[-1](penultimate))
        context = penultimate if self.config.context_from_penultimate else last
        # argmax of the mask gives the first end-of-text, also when padding repeats the token
        ends = (input_ids == self.config.eos_token_id).int().argmax(dim=-1)  # [N]
        pooled = last[torch.arange(last.shape[0], device=last.device), ends]  # [N, D]
        if self.text_projection is not None:
            pooled = self.text_projection(pooled)
        return context, pooled

    def pooled_only_modules(self) -> tuple[str, ...]:
        """Paths of the modules that only the pooled output reads: with ``context_from_penultimate`` the
        last layer, the final norm and the projection. A model that takes the context alone never runs
        them, so training must not select their weights (they would get no gradient)."""
        if not self.config.context_from_penultimate:
            return ("text_projection",) if self.text_projection is not None else ()
        paths = (f"layers.{len(self.layers) - 1}", "final_layer_norm")
        return paths + (("text_projection",) if self.text_projection is not None else ())

    def _run(
        self, input_ids: torch.Tensor, layers: nn.ModuleList, extra_vectors: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = self.embeddings(input_ids, extra_vectors)  # [N, L, D]
        for layer in layers:
            x = layer(x)
        return x


def without_causal_mask(encoder: TextEncoder) -> TextEncoder:
    """A text encoder with ``encoder``'s weights whose tokens see the whole prompt (``causal`` off); a
    different function, which training then adapts to."""
    if not encoder.config.causal:
        return encoder
    parameter = next(encoder.parameters())
    opened = TextEncoder(replace(encoder.config, causal=False)).to(parameter.device, parameter.dtype)
    opened.load_state_dict(encoder.state_dict())
    return opened.train(encoder.training)


def _check_config(config: TextEncoderConfig) -> None:
    if config.activation not in ACTIVATIONS:
        known = ", ".join(sorted(ACTIVATIONS))
        raise ValueError(f"unknown text encoder activation {config.activation!r}; known: {known}")
    if config.hidden_size % config.num_heads:
        raise ValueError(f"hidden_size {config.hidden_size} is not divisible by num_heads {config.num_heads}")
    if not 0 <= config.skip_last_layers < config.num_layers:
        raise ValueError(
            f"skip_last_layers must be in [0, num_layers), "
            f"got {config.skip_last_layers} with num_layers {config.num_layers}"
        )
    if config.context_from_penultimate and (config.skip_last_layers or config.num_layers < 2):
        raise ValueError(
            "context_from_penultimate reads the layer before the last of all num_layers (at least 2) layers; "
            f"got num_layers {config.num_layers} and skip_last_layers {config.skip_last_layers}"
        )
