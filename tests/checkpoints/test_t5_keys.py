"""T5 key tables and config inference against transformers' T5EncoderModel (full size on meta, tiny random),
and T5 weights stored as float8 in safetensors files."""

from __future__ import annotations

import re

import pytest
import torch

from latentdiffusion.checkpoints.assemble import check_fits
from latentdiffusion.checkpoints.layout import read_layout
from latentdiffusion.checkpoints.safe_io import read_state_dict
from latentdiffusion.checkpoints.t5_keys import (
    SD3_PREFIX,
    from_hf_state_dict,
    t5_config_from_hf,
    t5_config_from_state_dict,
    t5_config_to_hf,
    t5_layout,
    to_hf_state_dict,
)
from latentdiffusion.config import T5Config
from latentdiffusion.errors import UserError
from latentdiffusion.models.t5 import T5Encoder

transformers = pytest.importorskip("transformers")

# google/t5-v1_1-xxl, the configuration of SD3's text_encoder_3
T5_XXL = dict(
    vocab_size=32128,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_decoder_layers=24,
    num_heads=64,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    layer_norm_epsilon=1e-6,
    feed_forward_proj="gated-gelu",
    tie_word_embeddings=False,
)
TINY = T5Config(vocab_size=96, hidden_size=24, head_dim=4, intermediate_size=40, num_layers=3, num_heads=3)


def _shapes(state):
    return {k: tuple(v.shape) for k, v in state.items()}


@pytest.fixture(scope="module")
def xxl_reference():
    with torch.device("meta"):
        return transformers.T5EncoderModel(transformers.T5Config(**T5_XXL))


@pytest.fixture(scope="module")
def xxl():
    with torch.device("meta"):
        return T5Encoder(T5Config())


def test_full_size_keys_and_shapes_are_transformers(xxl, xxl_reference):
    ours = to_hf_state_dict(xxl.state_dict(), tied_copy=True)
    assert _shapes(ours) == _shapes(xxl_reference.state_dict())


def test_full_size_transformers_state_fits_ours(xxl, xxl_reference):
    check_fits(xxl, from_hf_state_dict(xxl_reference.state_dict()), "T5-XXL")


def test_full_size_config_is_inferred(xxl_reference):
    assert t5_config_from_state_dict(xxl_reference.state_dict()) == T5Config()
    assert t5_config_from_hf(transformers.T5Config(**T5_XXL).to_dict()) == T5Config()


def _tiny_reference(config: T5Config = TINY, seed: int = 0):
    model = transformers.T5EncoderModel(transformers.T5Config(**t5_config_to_hf(config))).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3 + (1.0 if p.ndim == 1 else 0.0))
    return model


def test_config_written_for_transformers_builds_the_same_network():
    reference = _tiny_reference()
    assert t5_config_from_state_dict(reference.state_dict()) == TINY
    assert t5_config_from_hf(t5_config_to_hf(TINY)) == TINY
    model = T5Encoder(TINY).eval()
    model.load_state_dict(from_hf_state_dict(reference.state_dict()), strict=True)
    ids = torch.randint(0, TINY.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(
            model(ids), reference(input_ids=ids).last_hidden_state, atol=1e-5, rtol=1e-5
        )


def test_sd3_single_file_prefix_takes_only_t5():
    t5 = to_hf_state_dict(T5Encoder(TINY).state_dict(), SD3_PREFIX)
    clip = {"text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": torch.ones(4)}
    state = {**t5, **clip, "model.diffusion_model.x_embedder.proj.weight": torch.ones(2)}
    assert t5_config_from_state_dict(state, SD3_PREFIX) == TINY
    ours = read_layout(state, t5_layout(SD3_PREFIX))
    assert ours.keys() == T5Encoder(TINY).state_dict().keys()
    assert ours == from_hf_state_dict(state, SD3_PREFIX)


def test_only_the_tied_embedding_stored():
    theirs = to_hf_state_dict(T5Encoder(TINY).state_dict())
    embedding = theirs.pop("shared.weight")
    theirs["encoder.embed_tokens.weight"] = embedding
    assert t5_config_from_state_dict(theirs).vocab_size == TINY.vocab_size
    assert from_hf_state_dict(theirs)["token_embedding.weight"] is embedding


def test_decoder_and_lm_head_of_a_full_t5_are_dropped():
    theirs = to_hf_state_dict(T5Encoder(TINY).state_dict(), tied_copy=True)
    extra = {"decoder.block.0.layer.0.SelfAttention.q.weight": torch.ones(2), "lm_head.weight": torch.ones(2)}
    assert from_hf_state_dict({**theirs, **extra}).keys() == T5Encoder(TINY).state_dict().keys()


def test_unknown_keys_keep_their_names_for_strict_loading():
    theirs = to_hf_state_dict(T5Encoder(TINY).state_dict())
    theirs["encoder.block.0.layer.2.extra.weight"] = torch.ones(2)
    with pytest.raises(UserError, match=re.escape("unexpected keys: encoder.block.0.layer.2.extra.weight")):
        check_fits(T5Encoder(TINY), from_hf_state_dict(theirs), "t5")


def test_t5_v1_0_is_refused():
    theirs = to_hf_state_dict(T5Encoder(TINY).state_dict())
    theirs["encoder.block.0.layer.1.DenseReluDense.wi.weight"] = torch.ones(40, 24)
    with pytest.raises(UserError, match=r"v1\.0"):
        t5_config_from_state_dict(theirs, source="t5.safetensors")


def test_scaled_fp8_is_refused():
    theirs = to_hf_state_dict(T5Encoder(TINY).state_dict())
    theirs["encoder.block.0.layer.0.SelfAttention.q.scale_weight"] = torch.ones(())
    with pytest.raises(UserError, match="scaled float8"):
        t5_config_from_state_dict(theirs, source="t5.safetensors")


@pytest.mark.parametrize(
    "missing", ["shared.weight", "relative_attention_bias", "SelfAttention.q.weight", "wi_0"]
)
def test_missing_tensors_are_one_clear_error(missing):
    theirs = to_hf_state_dict(T5Encoder(TINY).state_dict())
    theirs = {k: v for k, v in theirs.items() if missing not in k}
    with pytest.raises(UserError, match=r"t5\.safetensors"):
        t5_config_from_state_dict(theirs, source="t5.safetensors")


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"feed_forward_proj": "relu"}, "feed_forward_proj"),
        ({}, "feed_forward_proj"),
        ({"architectures": ["BertModel"]}, "architectures"),
    ],
)
def test_unsupported_transformers_configs_are_refused(settings, message):
    config = {**t5_config_to_hf(TINY), **settings}
    if not settings:
        del config["feed_forward_proj"]  # transformers' default is T5 v1.0's relu
    with pytest.raises(ValueError, match=message):
        t5_config_from_hf(config)


# ---- float8 weights -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_t5_loads_upcast(tmp_path, fp8):
    """A T5 stored as float8 through the safetensors library (its F8_E4M3 / F8_E5M2 dtypes) loads into
    float32 (and bfloat16) with exactly torch's own float8 -> float conversion of every tensor."""
    from safetensors.torch import save_file

    stored = {k: v.to(fp8) for k, v in to_hf_state_dict(_tiny_reference().state_dict(), SD3_PREFIX).items()}
    path = tmp_path / "sd3_t5_fp8.safetensors"
    save_file(stored, str(path))
    for dtype in (torch.float32, torch.bfloat16):
        state = read_state_dict(path, dtype)
        assert state.keys() == stored.keys()
        for key, value in state.items():
            assert value.dtype == dtype
            assert torch.equal(value, stored[key].to(dtype)), key
    state = read_state_dict(path, torch.float32)
    model = T5Encoder(t5_config_from_state_dict(state, SD3_PREFIX))
    model.load_state_dict(from_hf_state_dict(state, SD3_PREFIX), strict=True)
    expected = from_hf_state_dict({k: v.float() for k, v in stored.items()}, SD3_PREFIX)
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())


def test_float8_nan_is_one_clear_error(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "nan.safetensors"
    save_file({"shared.weight": torch.tensor([[1.0, float("nan")]]).to(torch.float8_e4m3fn)}, str(path))
    for dtype in (torch.float32, None):
        with pytest.raises(UserError, match="NaN"):
            read_state_dict(path, dtype)
