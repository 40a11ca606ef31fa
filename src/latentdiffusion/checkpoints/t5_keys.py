"""Key tables between ``models.t5.T5Encoder`` and transformers' ``T5EncoderModel``, and T5Config inference.

transformers' names are the layout of T5 weights everywhere SD3 is published: the ``text_encoder_3/``
folder of a diffusers model, stand-alone ``t5xxl_*.safetensors`` files, and SD3 single files under
``text_encoders.t5xxl.transformer.`` (``SD3_PREFIX``):

    shared.weight                                                   token embedding [vocab, d_model]
    encoder.embed_tokens.weight                                     the same tensor (tied); may be absent
    encoder.block.N.layer.0.layer_norm.weight                       RMS norm before attention
    encoder.block.N.layer.0.SelfAttention.{q,k,v,o}.weight          attention projections, no biases
    encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight   [buckets, heads], block 0 only
    encoder.block.N.layer.1.layer_norm.weight                       RMS norm before the feed-forward
    encoder.block.N.layer.1.DenseReluDense.{wi_0,wi_1,wo}.weight    gated-GELU feed-forward
    encoder.final_layer_norm.weight

The tied ``encoder.embed_tokens.weight`` is read when ``shared.weight`` is missing and dropped
otherwise; a full encoder-decoder T5 checkpoint's ``decoder.*`` and ``lm_head`` are dropped as well.
Not in the weights, so taken from T5 v1.1's configuration: the maximum relative distance (128) and
the layer-norm epsilon (1e-6).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from latentdiffusion.checkpoints.keymap import KeyTable, first_keys, strip_prefix
from latentdiffusion.checkpoints.layout import Layout, read_layout, write_layout
from latentdiffusion.config import T5Config
from latentdiffusion.errors import UserError

V = TypeVar("V")
Shape = tuple[int, ...]

SD3_PREFIX = "text_encoders.t5xxl.transformer."  # T5-XXL inside an SD3 single file
SHARED_EMBEDDING = "shared.weight"
TIED_EMBEDDING = "encoder.embed_tokens.weight"
RELATIVE_ATTENTION_BIAS = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
_ATTENTION = "encoder.block.{}.layer.0.SelfAttention."
_FEED_FORWARD = "encoder.block.{}.layer.1.DenseReluDense."

HF_T5: KeyTable = (
    ("token_embedding", "shared"),
    ("relative_position_bias.embedding", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias"),
    ("layers.{}.attention_norm", "encoder.block.{}.layer.0.layer_norm"),
    ("layers.{}.attention.q_proj", _ATTENTION + "q"),
    ("layers.{}.attention.k_proj", _ATTENTION + "k"),
    ("layers.{}.attention.v_proj", _ATTENTION + "v"),
    ("layers.{}.attention.out_proj", _ATTENTION + "o"),
    ("layers.{}.feed_forward_norm", "encoder.block.{}.layer.1.layer_norm"),
    ("layers.{}.feed_forward.gate_proj", _FEED_FORWARD + "wi_0"),
    ("layers.{}.feed_forward.up_proj", _FEED_FORWARD + "wi_1"),
    ("layers.{}.feed_forward.down_proj", _FEED_FORWARD + "wo"),
    ("final_layer_norm", "encoder.final_layer_norm"),
)
# stored keys an encoder never uses: the tied copy of the embedding, and the rest of a full T5
UNUSED = ("encoder.embed_tokens", "decoder", "lm_head")

# transformers' T5Config defaults, for config.json files that leave a value out
HF_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32128,
    "d_model": 512,
    "d_kv": 64,
    "d_ff": 2048,
    "num_layers": 6,
    "num_heads": 8,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "layer_norm_epsilon": 1e-6,
    "feed_forward_proj": "relu",
    "pad_token_id": 0,
    "eos_token_id": 1,
}
GATED_GELU = "gated-gelu"  # T5 v1.1's feed-forward (transformers then uses gelu_new)
ARCHITECTURES = ("T5EncoderModel", "T5Model", "T5ForConditionalGeneration")


def t5_layout(prefix: str = "") -> Layout:
    """Where a T5 encoder lives in a file: transformers names under ``prefix`` (``SD3_PREFIX`` in an SD3
    single file, "" in a ``text_encoder_3/`` folder)."""
    return Layout(prefix, HF_T5, ignored=UNUSED)


def from_hf_state_dict(state: Mapping[str, V], prefix: str = "") -> dict[str, V]:
    """Our T5Encoder state dict from transformers ``T5EncoderModel`` entries under ``prefix``.

    The embedding is ``shared.weight``, or the tied ``encoder.embed_tokens.weight`` in a file that
    kept only that one. Keys the table does not know keep their names, so a strict load reports them.
    """
    if prefix + SHARED_EMBEDDING not in state and prefix + TIED_EMBEDDING in state:
        state = dict(state)
        state[prefix + SHARED_EMBEDDING] = state.pop(prefix + TIED_EMBEDDING)
    return read_layout(state, t5_layout(prefix))


def to_hf_state_dict(state: Mapping[str, V], prefix: str = "", *, tied_copy: bool = False) -> dict[str, V]:
    """Our T5Encoder state dict in transformers names under ``prefix``; ``tied_copy`` also writes the
    embedding as ``encoder.embed_tokens.weight`` (the same tensor), as ``T5EncoderModel.state_dict``
    lists it."""
    theirs = write_layout(state, t5_layout(prefix))
    if tied_copy:
        theirs[prefix + TIED_EMBEDDING] = theirs[prefix + SHARED_EMBEDDING]
    return theirs


def _shape(value: Any) -> Shape:
    return tuple(value.shape) if hasattr(value, "shape") else tuple(value)


def t5_config_from_state_dict(state: Mapping[str, Any], prefix: str = "", source: str = "T5") -> T5Config:
    """The T5Config of transformers-named T5 weights under ``prefix``, from names and shapes alone
    (tensors, meta tensors or shape tuples): vocabulary and width from the embedding, heads from the
    relative attention bias [buckets, heads], head width from q, d_ff from wi_0, depth from the blocks."""
    shapes = {k: _shape(v) for k, v in strip_prefix(state, prefix).items()}
    refuse_scaled_fp8(shapes, source)
    embedding = shapes.get(SHARED_EMBEDDING) or shapes.get(TIED_EMBEDDING)
    if embedding is None:
        raise UserError(f"{source}: no T5 token embedding ({prefix}{SHARED_EMBEDDING})")
    if "encoder.block.0.layer.1.DenseReluDense.wi.weight" in shapes:
        raise UserError(f"{source}: a T5 v1.0 encoder (ReLU feed-forward); SD3 uses T5 v1.1 (gated GELU)")
    vocab_size, width = _matrix(embedding, SHARED_EMBEDDING, source)
    buckets, heads = _matrix(_need(shapes, RELATIVE_ATTENTION_BIAS, prefix, source), "relative bias", source)
    inner = _matrix(_need(shapes, _ATTENTION.format(0) + "q.weight", prefix, source), "q", source)[0]
    if heads < 1 or inner % heads:
        raise UserError(f"{source}: T5 attention {inner} wide does not split into {heads} heads")
    return T5Config(
        vocab_size=vocab_size,
        hidden_size=width,
        head_dim=inner // heads,
        intermediate_size=_need(shapes, _FEED_FORWARD.format(0) + "wi_0.weight", prefix, source)[0],
        num_layers=_num_blocks(shapes),
        num_heads=heads,
        relative_attention_num_buckets=buckets,
    )


def refuse_scaled_fp8(keys: Mapping[str, Any], source: str) -> None:
    """Refuse ComfyUI's "scaled fp8" T5 files (a ``scaled_fp8`` marker and a ``scale_weight`` per
    Linear): their float8 weights mean weight * scale, which plain loading would silently drop."""
    scaled = [k for k in keys if k == "scaled_fp8" or k.endswith((".scale_weight", ".scale_input"))]
    if scaled:
        raise UserError(
            f"{source} stores T5 as scaled float8 ({first_keys(scaled, 2)}), which is not supported; "
            "use a float16, bfloat16 or plain float8 (e4m3fn) T5 file"
        )


def _need(shapes: Mapping[str, Shape], key: str, prefix: str, source: str) -> Shape:
    try:
        return shapes[key]
    except KeyError:
        raise UserError(f"{source}: not a T5 v1.1 encoder, it has no tensor {prefix}{key}") from None


def _matrix(shape: Shape, name: str, source: str) -> tuple[int, int]:
    if len(shape) != 2:
        raise UserError(f"{source}: T5 tensor {name} has shape {shape}, expected a matrix")
    return shape[0], shape[1]


def _num_blocks(shapes: Mapping[str, Shape]) -> int:
    parts = (k.split(".") for k in shapes if k.startswith("encoder.block."))
    return 1 + max(int(p[2]) for p in parts if len(p) > 2 and p[2].isdigit())


def t5_config_from_hf(config: Mapping[str, Any]) -> T5Config:
    """Our T5Config from a transformers ``config.json`` (SD3's ``text_encoder_3/``); values it leaves out
    take transformers' defaults. Only T5 v1.1's gated-GELU feed-forward is implemented."""
    settings = {**HF_DEFAULTS, **config}
    architectures = settings.get("architectures") or ["T5EncoderModel"]
    if not set(architectures) <= set(ARCHITECTURES):
        raise ValueError(f"T5 architectures {architectures} (expected one of {', '.join(ARCHITECTURES)})")
    if settings["feed_forward_proj"] != GATED_GELU:
        raise ValueError(
            f"T5 feed_forward_proj {settings['feed_forward_proj']!r} is not implemented "
            f"(only T5 v1.1's {GATED_GELU!r})"
        )
    return T5Config(
        vocab_size=settings["vocab_size"],
        hidden_size=settings["d_model"],
        head_dim=settings["d_kv"],
        intermediate_size=settings["d_ff"],
        num_layers=settings["num_layers"],
        num_heads=settings["num_heads"],
        relative_attention_num_buckets=settings["relative_attention_num_buckets"],
        relative_attention_max_distance=settings["relative_attention_max_distance"],
        layer_norm_eps=settings["layer_norm_epsilon"],
        pad_token_id=settings["pad_token_id"],
        eos_token_id=settings["eos_token_id"],
    )


def t5_config_to_hf(config: T5Config) -> dict[str, Any]:
    """A transformers ``config.json`` for a ``T5EncoderModel`` with our encoder's weights."""
    return {
        "architectures": ["T5EncoderModel"],
        "model_type": "t5",
        "vocab_size": config.vocab_size,
        "d_model": config.hidden_size,
        "d_kv": config.head_dim,
        "d_ff": config.intermediate_size,
        "num_layers": config.num_layers,
        "num_heads": config.num_heads,
        "relative_attention_num_buckets": config.relative_attention_num_buckets,
        "relative_attention_max_distance": config.relative_attention_max_distance,
        "layer_norm_epsilon": config.layer_norm_eps,
        "feed_forward_proj": GATED_GELU,
        "dense_act_fn": "gelu_new",
        "is_gated_act": True,
        "tie_word_embeddings": False,
        "pad_token_id": config.pad_token_id,
        "eos_token_id": config.eos_token_id,
    }
