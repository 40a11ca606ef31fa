"""T5Encoder against transformers' T5EncoderModel (random weights, loaded through the key table) and
T5Tokenizer against transformers' T5TokenizerFast built from the same shipped tokenizer.json."""

from __future__ import annotations

import gzip
import pickle
from dataclasses import replace
from importlib.resources import files

import pytest
import torch

from latentdiffusion.checkpoints.t5_keys import from_hf_state_dict, to_hf_state_dict
from latentdiffusion.config import T5Config
from latentdiffusion.models.t5 import T5Encoder, T5Tokenizer, clamp_float16, relative_position_bucket

transformers = pytest.importorskip("transformers")

# inner width (heads * head_dim = 32) differs from the model width (40), as nothing forces them equal
TINY = T5Config(vocab_size=512, hidden_size=40, head_dim=8, intermediate_size=56, num_layers=2, num_heads=4)


def reference_model(config: T5Config, seed: int = 0):
    """A transformers T5EncoderModel of ``config``'s shape, every parameter random (norms included)."""
    hf_config = transformers.T5Config(
        vocab_size=config.vocab_size,
        d_model=config.hidden_size,
        d_kv=config.head_dim,
        d_ff=config.intermediate_size,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        relative_attention_num_buckets=config.relative_attention_num_buckets,
        relative_attention_max_distance=config.relative_attention_max_distance,
        layer_norm_epsilon=config.layer_norm_eps,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
    )
    model = transformers.T5EncoderModel(hf_config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3 + (1.0 if p.ndim == 1 else 0.0))
    return model


def _ids(batch: int, length: int, vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, length), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def pair():
    reference = reference_model(TINY)
    model = T5Encoder(TINY).eval()
    model.load_state_dict(from_hf_state_dict(reference.state_dict()), strict=True)
    return reference, model


# 300 tokens reach past max_distance (128): every bucket, the logarithmic ones included, is used
@pytest.mark.parametrize("length", [1, 13, 300])
def test_matches_transformers(pair, length):
    reference, model = pair
    ids = _ids(2, length, TINY.vocab_size)
    with torch.no_grad():
        expected = reference(input_ids=ids).last_hidden_state
        x = model(ids)
    assert x.shape == (2, length, TINY.hidden_size)
    torch.testing.assert_close(x, expected, atol=1e-5, rtol=1e-5)


def test_other_bucket_settings_match_transformers():
    config = replace(TINY, relative_attention_num_buckets=8, relative_attention_max_distance=20)
    reference = reference_model(config, seed=3)
    model = T5Encoder(config).eval()
    model.load_state_dict(from_hf_state_dict(reference.state_dict()), strict=True)
    ids = _ids(1, 50, config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(
            model(ids), reference(input_ids=ids).last_hidden_state, atol=1e-5, rtol=1e-5
        )


def test_float16_overflow_is_clamped_as_in_transformers(pair):
    """Feed-forward outputs beyond float16's range: both clamp the residual stream, neither gives inf."""
    reference, model = pair
    reference, model = _half_copy(reference), _half_copy(model)
    with torch.no_grad():
        for ff in (reference.encoder.block[0].layer[1].DenseReluDense, model.layers[0].feed_forward):
            (ff.wo if hasattr(ff, "wo") else ff.down_proj).weight.mul_(3e4)
        ids = _ids(2, 9, TINY.vocab_size)
        expected = reference(input_ids=ids).last_hidden_state
        x = model(ids)
    assert x.dtype == torch.float16 and bool(torch.isfinite(x).all())
    torch.testing.assert_close(x.float(), expected.float(), atol=2e-2, rtol=2e-2)


def _half_copy(module: torch.nn.Module) -> torch.nn.Module:
    return pickle.loads(pickle.dumps(module)).half()


def test_clamp_float16():
    big = torch.finfo(torch.float16).max
    limit = torch.tensor(big - 1000, dtype=torch.float16).item()  # 64504 rounds to 64512 in float16
    x = torch.tensor([1.0, float("inf"), -float("inf"), big], dtype=torch.float16)
    assert clamp_float16(x).tolist() == [1.0, limit, -limit, limit]
    finite = torch.tensor([1.0, big, -big], dtype=torch.float16)
    assert torch.equal(clamp_float16(finite), finite)
    wide = torch.tensor([float("inf")])
    assert clamp_float16(wide) is wide


def test_relative_position_buckets_exact():
    """Hand-computed for 32 buckets and max distance 128: keys at or before the query use buckets 0..15,
    keys after it 16..31; distances 0..7 exact, then floor(8 + 8 log(d / 8) / log(16))."""
    offsets = torch.tensor([0, -1, -7, -8, -11, -12, -17, -45, -46, -127, -128, -1000, 1, 7, 12, 127, 500])
    expected = [0, 1, 7, 8, 8, 9, 10, 12, 13, 15, 15, 15, 17, 23, 25, 31, 31]
    assert relative_position_bucket(offsets, 32, 128).tolist() == expected
    bucket = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket
    for buckets, distance in [(32, 128), (8, 20), (64, 300)]:
        offsets = torch.arange(-700, 700)
        ours = relative_position_bucket(offsets, buckets, distance)
        assert torch.equal(ours, bucket(offsets, True, buckets, distance))


def test_position_bias_is_shared_by_all_layers(pair):
    _, model = pair
    assert sum("relative_position_bias" in k for k in model.state_dict()) == 1


@pytest.mark.parametrize("buckets, distance", [(2, 128), (7, 128), (32, 8)])
def test_bad_bucket_settings_are_refused(buckets, distance):
    config = replace(TINY, relative_attention_num_buckets=buckets, relative_attention_max_distance=distance)
    with pytest.raises(ValueError, match="relative_attention"):
        T5Encoder(config)


def test_round_trip_through_transformers_names(pair):
    _, model = pair
    ours = model.state_dict()
    assert from_hf_state_dict(to_hf_state_dict(ours)) == ours


# ---- tokenizer ----------------------------------------------------------------------------------------

PROMPTS = [
    "a photo of an astronaut riding a horse on mars, 4k, (masterpiece:1.2)",
    "A PHOTO OF A CAT",
    "Hello,   world!!   Multiple     spaces\tand\ttabs\nand newlines",
    "   leading and trailing whitespace   ",
    "",
    "it's a dog's life, they're here, we've won, I'm fine, you'll see, he'd go, don't",
    "numbers 1234567890 and 3.14159 and 1,000,000 and -42 and 1e-5",
    "café naïve résumé façade Ångström Zürich São Paulo",
    "emoji 🐱 🚀🔥 👩‍🚀 👍🏽 ❤️",
    "日本語のテキスト, 中文, 한국어, русский текст, ελληνικά, العربية",
    "punctuation!?... ;; :: -- __ ** ## @@ $$ %% ^^ && || ~~ `` \"quotes\" 'single'",
    "(((masterpiece))), [[best quality]], {detailed}, <lora:foo:0.8>, [cat:dog:0.5]",
    'a sign that says "Stable Diffusion 3" in neon letters, 35mm, f/2.8, 1/1000s, ISO-100',
    "a very long prompt " + " ".join(f"word{i} thing{i}" for i in range(200)),  # far over 256 tokens
    "a cyberpunk city at night, neon lights, rain, reflections, volumetric fog, " * 12,
    "a dog </s> a cat <pad> <unk> <extra_id_0> <extra_id_99>",
    "ﬁne ligature and ｆｕｌｌｗｉｄｔｈ characters, non\u00a0breaking\u2003spaces",
    "combining e\u0301 versus é; math ∑ ∫ √ ∞ ≈ ≠ ± × ÷ → ←; ½ ² ™ ©",
    "url https://example.com/path?query=1&x=2 and email someone@example.com",
    "'quoted' \"double\" ‘curly’ “curly double” — dashes – and … ellipsis",
    "a",
    "!!!",
]


@pytest.fixture(scope="module")
def tokenizer():
    return T5Tokenizer.from_bundled()


@pytest.fixture(scope="module")
def reference_tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("t5") / "tokenizer.json"
    path.write_bytes(
        gzip.decompress((files("latentdiffusion") / "data" / "t5_tokenizer.json.gz").read_bytes())
    )
    return transformers.T5TokenizerFast(tokenizer_file=str(path))


def _sd3_ids(reference, prompts, max_length=256):
    """Token ids as diffusers' StableDiffusion3Pipeline._get_t5_prompt_embeds asks for them."""
    return reference(
        prompts,
        padding="max_length",
        max_length=max_length,
        truncation=True,
        add_special_tokens=True,
        return_tensors="pt",
    ).input_ids


def test_tokenizer_matches_transformers_as_sd3_calls_it(tokenizer, reference_tokenizer):
    ids = tokenizer(PROMPTS)
    expected = _sd3_ids(reference_tokenizer, PROMPTS)
    assert ids.dtype == torch.int64 and ids.shape == (len(PROMPTS), 256)
    for row, prompt in enumerate(PROMPTS):
        assert ids[row].tolist() == expected[row].tolist(), prompt


def test_long_prompts_are_cut_and_end_with_eos(tokenizer):
    ids = tokenizer(PROMPTS[13])
    assert len(tokenizer.tokenize(PROMPTS[13])) > 256
    assert ids[0, -1].item() == tokenizer.eos_token_id == 1
    assert (ids[0] != tokenizer.pad_token_id).all()


def test_empty_prompt_is_eos_then_padding(tokenizer):
    ids = tokenizer.encode([""], max_length=5)
    assert ids.tolist() == [[1, 0, 0, 0, 0]]


@pytest.mark.parametrize("max_length", [1, 8, 77, 512])
def test_other_lengths_match_transformers(tokenizer, reference_tokenizer, max_length):
    prompts = PROMPTS[:4] + PROMPTS[13:15]
    expected = _sd3_ids(reference_tokenizer, prompts, max_length)
    assert tokenizer.encode(prompts, max_length=max_length).tolist() == expected.tolist()


def test_tokenizer_facts(tokenizer):
    assert (tokenizer.vocab_size, tokenizer.pad_token_id, tokenizer.eos_token_id) == (32100, 0, 1)
    assert tokenizer.tokenize("a photo of a cat") == [3, 9, 1202, 13, 3, 9, 1712]


def test_tokenizer_pickles_without_its_backend(tokenizer):
    tokenizer(["warm up the backend"])
    copy = pickle.loads(pickle.dumps(tokenizer))
    assert "_backend" not in copy.__dict__
    assert torch.equal(copy(PROMPTS[:3]), tokenizer(PROMPTS[:3]))


def test_saved_folder_reads_back_here_and_in_transformers(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "tokenizer_3")
    again = T5Tokenizer.from_folder(tmp_path / "tokenizer_3")
    assert torch.equal(again(PROMPTS), tokenizer(PROMPTS))
    reference = transformers.T5TokenizerFast(tokenizer_file=str(tmp_path / "tokenizer_3" / "tokenizer.json"))
    assert _sd3_ids(reference, PROMPTS).tolist() == tokenizer(PROMPTS).tolist()
    # transformers 5's from_pretrained rebuilds T5's pipeline from its own class instead of the file's;
    # it differs from tokenizer.json on trailing whitespace (no final "▁" piece) and on special tokens
    # written in the prompt (no "▁" before them)
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "tokenizer_3")
    trimmed = [p for p in PROMPTS if p == p.rstrip() and "</s>" not in p]
    assert _sd3_ids(loaded, trimmed).tolist() == tokenizer(trimmed).tolist()


def test_a_folder_without_tokenizer_json_is_one_clear_error(tmp_path):
    from latentdiffusion.errors import UserError

    with pytest.raises(UserError, match=r"tokenizer\.json"):
        T5Tokenizer.from_folder(tmp_path)


def test_a_folder_with_a_foreign_tokenizer_json_is_one_clear_error(tmp_path):
    from latentdiffusion.errors import UserError

    (tmp_path / "tokenizer.json").write_bytes(b"\xff\xfe not json")
    with pytest.raises(UserError, match="cannot read the T5 tokenizer"):
        T5Tokenizer.from_folder(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "WordPiece", "vocab": {}}}')
    with pytest.raises(UserError, match="not a T5 tokenizer"):
        T5Tokenizer.from_folder(tmp_path)


def test_a_bpe_tokenizer_is_refused():
    spec = '{"model": {"type": "BPE", "vocab": {}, "merges": []}}'
    with pytest.raises(ValueError, match="not a T5 tokenizer"):
        T5Tokenizer(spec)
