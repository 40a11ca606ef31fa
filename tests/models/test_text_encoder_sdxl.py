"""SDXL's two text encoders against their oracles, tiny and fp32: the penultimate layer without the final
layer norm as context (transformers' ``hidden_states[-2]``) and the pooled, projected embedding
(``CLIPTextModelWithProjection.text_embeds``; open_clip's ``TextTransformer`` output)."""

from __future__ import annotations

import importlib.util
import sys
import types
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from latentdiffusion.checkpoints.text_encoder_keys import from_hf_state_dict, from_openclip_state_dict
from latentdiffusion.config import TextEncoderConfig
from latentdiffusion.models.text_encoder import TextEncoder

transformers = pytest.importorskip("transformers")

VOCAB, BOS, EOS = 1000, 998, 999  # EOS the largest id, as in CLIP's vocabulary (open_clip pools at argmax)
# CLIP ViT-L (pads with EOS) and OpenCLIP bigG (pads with "!" = 0, projects), in miniature and of
# different widths and depths, as the real pair is
CLIP_L = TextEncoderConfig(
    vocab_size=VOCAB,
    hidden_size=32,
    num_layers=3,
    num_heads=4,
    intermediate_size=64,
    activation="quick_gelu",
    context_from_penultimate=True,
    pad_token_id=EOS,
    bos_token_id=BOS,
    eos_token_id=EOS,
)
BIGG = TextEncoderConfig(
    vocab_size=VOCAB,
    hidden_size=48,
    num_layers=4,
    num_heads=4,
    intermediate_size=192,
    activation="gelu",
    context_from_penultimate=True,
    projection_dim=40,
    pad_token_id=0,
    bos_token_id=BOS,
    eos_token_id=EOS,
)


def token_ids(config: TextEncoderConfig, lengths: tuple[int, ...] = (5, 20, 77)) -> torch.Tensor:
    """Rows of BOS, words, EOS and padding to 77 tokens; a row of length 77 has no padding."""
    generator = torch.Generator().manual_seed(1)
    rows = []
    for length in lengths:
        words = torch.randint(1, BOS, (length - 2,), generator=generator).tolist()
        row = [BOS, *words, EOS]
        rows.append(row + [config.pad_token_id] * (config.max_length - len(row)))
    return torch.tensor(rows)


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2 + (1.0 if p.ndim == 1 else 0.0))
    return module.eval()


def hf_reference(config: TextEncoderConfig, seed: int) -> torch.nn.Module:
    """transformers' CLIPTextModel, or CLIPTextModelWithProjection when ``config`` projects."""
    hf_config = transformers.CLIPTextConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        max_position_embeddings=config.max_length,
        hidden_act=config.activation,
        projection_dim=config.projection_dim or config.hidden_size,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,  # not 2: pools at the first EOS, as our encode does
        pad_token_id=config.pad_token_id,
    )
    hf_config._attn_implementation = "eager"
    projected = config.projection_dim is not None
    model = (transformers.CLIPTextModelWithProjection if projected else transformers.CLIPTextModel)(hf_config)
    return randomize_(model, seed)


def ours_from_hf(config: TextEncoderConfig, reference: torch.nn.Module) -> TextEncoder:
    model = TextEncoder(config).eval()
    state = from_hf_state_dict(reference.state_dict(), projection=config.projection_dim is not None)
    model.load_state_dict(state, strict=True)
    return model


@pytest.mark.parametrize("config", [CLIP_L, BIGG], ids=["clip-l", "bigg"])
@torch.no_grad()
def test_context_and_pooled_match_transformers(config: TextEncoderConfig) -> None:
    reference = hf_reference(config, seed=0)
    model = ours_from_hf(config, reference)
    assert len(model.layers) == config.num_layers  # the last layer is built: pooled reads it
    ids = token_ids(config)
    output = reference(input_ids=ids, output_hidden_states=True)
    context, pooled = model.encode(ids)
    torch.testing.assert_close(context, output.hidden_states[-2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(ids), context, atol=0, rtol=0)
    if config.projection_dim is None:
        torch.testing.assert_close(pooled, output.pooler_output, atol=1e-5, rtol=0)
    else:
        assert pooled.shape == (3, config.projection_dim)
        torch.testing.assert_close(pooled, output.text_embeds, atol=1e-5, rtol=0)


@torch.no_grad()
def test_pooled_without_penultimate_is_the_final_normed_eos_state() -> None:
    """SD 1-style settings: encode's context is forward's, pooled the last layer at the first EOS."""
    config = replace(CLIP_L, context_from_penultimate=False)
    reference = hf_reference(config, seed=1)
    model = ours_from_hf(config, reference)
    ids = token_ids(config)
    output = reference(input_ids=ids)
    context, pooled = model.encode(ids)
    torch.testing.assert_close(context, output.last_hidden_state, atol=1e-5, rtol=0)
    torch.testing.assert_close(model(ids), context, atol=0, rtol=0)
    torch.testing.assert_close(pooled, output.pooler_output, atol=1e-5, rtol=0)


def test_projection_is_bias_free_and_penultimate_settings_are_checked() -> None:
    model = TextEncoder(BIGG)
    assert model.text_projection.weight.shape == (40, 48) and model.text_projection.bias is None
    assert TextEncoder(CLIP_L).text_projection is None
    with pytest.raises(ValueError, match="context_from_penultimate"):
        TextEncoder(replace(CLIP_L, skip_last_layers=1))


def load_open_clip_transformer(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """open_clip's ``transformer`` module, imported from its file so that open_clip's package import
    (torchvision, timm) is not needed; its ``utils`` (torchvision again) is replaced by the two names
    the module imports, which the text tower never calls."""
    try:
        import open_clip.transformer as module  # the whole package, where its dependencies are there

        return module
    except ImportError:
        pass
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        pytest.skip("open_clip is not installed")
    package = types.ModuleType("_open_clip_text")
    package.__path__ = [str(Path(spec.origin).parent)]
    utils = types.ModuleType("_open_clip_text.utils")
    utils.to_2tuple = utils.feature_take_indices = lambda *args, **kwargs: pytest.fail("vision-only helper")
    monkeypatch.setitem(sys.modules, "_open_clip_text", package)
    monkeypatch.setitem(sys.modules, "_open_clip_text.utils", utils)
    try:
        return importlib.import_module("_open_clip_text.transformer")
    except ImportError as error:
        pytest.skip(f"open_clip's transformer module cannot be imported: {error}")


@torch.no_grad()
def test_bigg_matches_open_clip_text_transformer(monkeypatch: pytest.MonkeyPatch) -> None:
    """sgm's FrozenOpenCLIPEmbedder2: blocks but the last as context, ``ln_final`` at argmax then
    ``@ text_projection`` as pooled; the weights reach us through the OpenCLIP layout (fused q/k/v,
    transposed projection)."""
    open_clip = load_open_clip_transformer(monkeypatch)
    reference = open_clip.TextTransformer(
        context_length=BIGG.max_length,
        vocab_size=VOCAB,
        width=BIGG.hidden_size,
        heads=BIGG.num_heads,
        layers=BIGG.num_layers,
        output_dim=BIGG.projection_dim,
        act_layer=torch.nn.GELU,
        pad_id=0,
    )
    randomize_(reference, seed=2)
    state = reference.state_dict()
    assert state["text_projection"].shape == (BIGG.hidden_size, BIGG.projection_dim)
    model = TextEncoder(BIGG).eval()
    model.load_state_dict(from_openclip_state_dict(state, num_layers=4, projection=True), strict=True)
    ids = token_ids(BIGG)
    x, mask = reference._embeds(ids)
    for block in reference.transformer.resblocks[:-1]:
        x = block(x, attn_mask=mask)
    context, pooled = model.encode(ids)
    torch.testing.assert_close(context, x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, reference(ids), atol=1e-5, rtol=0)
