"""CLIPTokenizer against transformers' CLIPTokenizer, built from the same bundled merge list."""

from __future__ import annotations

import gzip
import json
import pickle
from importlib.resources import files

import pytest
import torch

from latentdiffusion.models.tokenizer import CLIPTokenizer

transformers = pytest.importorskip("transformers")

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
    "portrait of a woman, highly detailed, digital painting, artstation, concept art, smooth, sharp focus, "
    "illustration, art by artgerm and greg rutkowski and alphonse mucha, 8k",
    "a very long prompt " + " ".join(f"word{i} thing{i}" for i in range(60)),
    "a cyberpunk city at night, neon lights, rain, reflections, blade runner style, volumetric fog, " * 4,
    "UPPER lower MiXeD CaSe",
    "hyphenated-words and snake_case and camelCase and dots.in.words",
    "url https://example.com/path?query=1&x=2 and email someone@example.com",
    "a dog <|endoftext|> a cat",
    "a dog<|startoftext|>a cat",
    "ﬁne ligature and ｆｕｌｌｗｉｄｔｈ characters",
    "non\u00a0breaking\u2003spaces",
    "combining e\u0301 versus é",
    "math ∑ ∫ √ ∞ ≈ ≠ ± × ÷ → ←",
    "tokens like 512x512, f/2.8, 35mm, 1/1000s, ISO-100",
    "'quoted' \"double\" ‘curly’ “curly double”",
    "a",
    "!!!",
    "1",
    "the quick brown fox jumps over the lazy dog",
]


def _clip_reference_folder(folder):
    """vocab.json and merges.txt written the way OpenAI CLIP's SimpleTokenizer builds its vocabulary."""
    lines = gzip.decompress((files("latentdiffusion") / "data" / "bpe_simple_vocab_16e6.txt.gz").read_bytes())
    merges = [tuple(m.split()) for m in lines.decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]]
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + len(cs) - 188)
    symbols = [chr(c) for c in cs]
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (folder / "merges.txt").write_text(text, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def reference_folder(tmp_path_factory):
    return _clip_reference_folder(tmp_path_factory.mktemp("clip") / "tokenizer")


@pytest.fixture(scope="module")
def reference(reference_folder):
    return transformers.CLIPTokenizer.from_pretrained(reference_folder, model_max_length=77)


def test_vocabulary_matches_clip(reference_folder):
    ours = CLIPTokenizer.from_bundled()
    expected = json.loads((reference_folder / "vocab.json").read_text(encoding="utf-8"))
    assert ours.vocab == expected
    assert ours.vocab_size == 49408
    assert (ours.bos_token_id, ours.eos_token_id) == (49406, 49407)


def test_tokenize_matches_transformers(reference):
    ours = CLIPTokenizer.from_bundled()
    for prompt in PROMPTS:
        assert ours.tokenize(prompt) == reference(prompt, add_special_tokens=False).input_ids, prompt


@pytest.mark.parametrize("pad_token_id", [49407, 0])
def test_call_matches_transformers(reference, pad_token_id):
    # transformers given pad_token="!" (SD 2's diffusers folder) also splits every "!" in the text out
    # as a special token, unlike OpenCLIP; so the SD 2 padding is applied to transformers' padding mask.
    encoded = reference(PROMPTS, padding="max_length", max_length=77, truncation=True)
    expected = [
        [token if keep else pad_token_id for token, keep in zip(ids, mask, strict=True)]
        for ids, mask in zip(encoded.input_ids, encoded.attention_mask, strict=True)
    ]
    ids = CLIPTokenizer.from_bundled(pad_token_id=pad_token_id)(PROMPTS)
    assert ids.dtype == torch.long and ids.shape == (len(PROMPTS), 77)
    assert ids.tolist() == expected


def test_call_frames_truncates_and_pads():
    tokenizer = CLIPTokenizer.from_bundled(pad_token_id=0, max_length=8)
    long_prompt = "one two three four five six seven eight nine"
    ids = tokenizer(["a cat", long_prompt])
    cat = tokenizer.tokenize("a cat")
    assert ids[0].tolist() == [49406, *cat, 49407] + [0] * (8 - 2 - len(cat))
    assert ids[1].tolist() == [49406, *tokenizer.tokenize(long_prompt)[:6], 49407]
    assert len(tokenizer.tokenize(PROMPTS[13])) > 75  # tokenize never truncates


def test_html_entities_are_unescaped_like_clip():
    tokenizer = CLIPTokenizer.from_bundled()
    assert tokenizer.tokenize("fish &amp; chips") == tokenizer.tokenize("fish & chips")
    assert tokenizer.tokenize("fish &amp;amp; chips") == tokenizer.tokenize("fish & chips")


def test_from_folder_round_trip(tmp_path, reference_folder):
    for pad_token_id in (49407, 0):
        saved = tmp_path / f"pad{pad_token_id}"
        CLIPTokenizer.from_bundled(pad_token_id=pad_token_id, max_length=77).save(saved)
        loaded = CLIPTokenizer.from_folder(saved)
        assert (loaded.pad_token_id, loaded.max_length) == (pad_token_id, 77)
        assert loaded(PROMPTS).equal(CLIPTokenizer.from_bundled(pad_token_id=pad_token_id)(PROMPTS))
        # what we save is what transformers (and so diffusers) reads
        reference = transformers.CLIPTokenizer.from_pretrained(saved)
        assert reference.pad_token_id == pad_token_id and reference.model_max_length == 77
    plain = CLIPTokenizer.from_folder(reference_folder, pad_token_id=0, max_length=10)
    assert (plain.pad_token_id, plain.max_length) == (0, 10)
    assert CLIPTokenizer.from_folder(reference_folder).pad_token_id == 49407


def test_from_folder_reports_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"vocab\.json"):
        CLIPTokenizer.from_folder(tmp_path)


def test_pickles_without_backend():
    tokenizer = CLIPTokenizer.from_bundled()
    expected = tokenizer(PROMPTS[:3])
    assert pickle.loads(pickle.dumps(tokenizer))(PROMPTS[:3]).equal(expected)
