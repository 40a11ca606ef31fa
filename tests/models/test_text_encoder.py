"""TextEncoder against transformers' CLIPTextModel with random weights, loaded through the key table."""

from __future__ import annotations

import pytest
import torch

from latentdiffusion.checkpoints.text_encoder_keys import from_hf_state_dict, to_hf_state_dict
from latentdiffusion.config import TextEncoderConfig
from latentdiffusion.models.text_encoder import TextEncoder

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=1000, hidden_size=32, num_layers=3, num_heads=4, intermediate_size=48, max_length=77)


def _reference(config: TextEncoderConfig, seed: int):
    """A transformers CLIPTextModel of the same shape, every parameter random (norms included)."""
    hf_config = transformers.CLIPTextConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        max_position_embeddings=config.max_length,
        hidden_act=config.activation,
        layer_norm_eps=config.layer_norm_eps,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    hf_config._attn_implementation = "eager"
    model = transformers.CLIPTextModel(hf_config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2 + (1.0 if p.ndim == 1 else 0.0))
    return model


def _ids(batch: int, length: int, vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("length", [77, 13])
def test_quick_gelu_last_layer_matches_transformers(length):
    config = TextEncoderConfig(**TINY, activation="quick_gelu")
    reference = _reference(config, seed=0)
    model = TextEncoder(config).eval()
    model.load_state_dict(from_hf_state_dict(reference.state_dict()), strict=True)
    ids = _ids(2, length, config.vocab_size)
    with torch.no_grad():
        expected = reference(input_ids=ids).last_hidden_state
        x = model(ids)
    assert x.shape == (2, length, config.hidden_size)
    torch.testing.assert_close(x, expected, atol=1e-5, rtol=0)


def test_gelu_penultimate_layer_matches_transformers():
    config = TextEncoderConfig(**TINY, activation="gelu", skip_last_layers=1, pad_token_id=0)
    reference = _reference(config, seed=1)
    model = TextEncoder(config).eval()
    assert len(model.layers) == config.num_layers - 1  # the skipped layer is never built
    state = from_hf_state_dict(reference.state_dict(), num_layers=len(model.layers))
    model.load_state_dict(state, strict=True)
    ids = _ids(3, 77, config.vocab_size)
    with torch.no_grad():
        hidden_states = reference(input_ids=ids, output_hidden_states=True).hidden_states
        expected = reference.final_layer_norm(hidden_states[-2])
        x = model(ids)
    torch.testing.assert_close(x, expected, atol=1e-5, rtol=0)


def test_reads_prefixed_files_and_drops_unused_keys():
    """diffusers folders written by transformers 4 prefix `text_model.` and keep `position_ids`."""
    config = TextEncoderConfig(**TINY)
    reference = _reference(config, seed=2)
    state = {"text_model." + k: v for k, v in reference.state_dict().items()}
    state["text_model.embeddings.position_ids"] = torch.arange(config.max_length)[None]
    state["text_projection.weight"] = torch.zeros(8, config.hidden_size)
    state["logit_scale"] = torch.zeros(())
    model = TextEncoder(config)
    model.load_state_dict(from_hf_state_dict(state), strict=True)
    unused = {"text_model.embeddings.position_ids", "text_projection.weight", "logit_scale"}
    assert set(to_hf_state_dict(model.state_dict())) == set(state) - unused


def test_state_dict_has_only_weights():
    model = TextEncoder(TextEncoderConfig(**TINY))
    assert not list(model.buffers())
    assert "layers.2.self_attn.q_proj.weight" in model.state_dict()
    assert model.embeddings.position_embedding.weight.shape == (77, 32)


def test_strict_loading_names_missing_key():
    config = TextEncoderConfig(**TINY)
    state = from_hf_state_dict(_reference(config, seed=3).state_dict())
    del state["layers.1.mlp.fc2.weight"]
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*layers\.1\.mlp\.fc2\.weight"):
        TextEncoder(config).load_state_dict(state, strict=True)


def test_too_long_input_is_a_clear_error():
    model = TextEncoder(TextEncoderConfig(**{**TINY, "max_length": 8}))
    with pytest.raises(ValueError, match="at most 8 tokens"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown text encoder activation"):
        TextEncoder(TextEncoderConfig(**TINY, activation="relu6"))
    with pytest.raises(ValueError, match="skip_last_layers"):
        TextEncoder(TextEncoderConfig(**TINY, skip_last_layers=3))
