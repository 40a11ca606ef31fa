"""Textual-inversion embeddings on SD 1.x: every file format gives diffusers' ``load_textual_inversion``
token ids and prompt embeddings; weights, negative prompts, chunks, PNG info and bad files."""

from __future__ import annotations

import copy
import hashlib
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file
from tests.pipelines.conftest import ddim_scheduler

from latentdiffusion.embeddings import TokenizerWithEmbeddings
from latentdiffusion.errors import UserError
from latentdiffusion.pipelines.pipeline import Pipeline
from latentdiffusion.prompts import apply_weights, encode_prompt_pair, encode_prompts, frame, prompt_chunks

WORD = "my-style"
PROMPT = "a house in the style of my-style, at night"


def vectors(n: int, width: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def write(kind: str, folder, v: torch.Tensor):
    """An embedding file of ``kind`` holding ``v`` [N, D]."""
    if kind == "a1111-pt":
        path = folder / "emb.pt"
        record = {"string_to_token": {"*": 265}, "string_to_param": {"*": v}, "name": "x", "step": 50}
        torch.save(record, path)
    elif kind == "a1111-safetensors":
        path = folder / "emb.safetensors"
        save_file({"emb_params": v.contiguous()}, path)
    elif kind == "diffusers-bin":
        path = folder / "learned_embeds.bin"
        torch.save({WORD: v[0] if len(v) == 1 else v}, path)
    else:
        path = folder / "learned_embeds.safetensors"
        save_file({WORD: v.contiguous()}, path)
    return path


@pytest.fixture
def ours(tiny_model):
    """A pipeline over the session's tiny SD model with its own tokenizers (loading changes them)."""
    model = tiny_model("sd")
    return Pipeline(replace(model.ours, tokenizers=dict(model.ours.tokenizers)))


@pytest.fixture
def theirs(tiny_model, tmp_path):
    """diffusers' StableDiffusionPipeline over the same weights, with its own text encoder and tokenizer
    (load_textual_inversion grows them)."""

    def make():
        from diffusers import StableDiffusionPipeline
        from transformers import CLIPTokenizer

        model = tiny_model("sd")
        model.ours.tokenizer.save(tmp_path / "tokenizer")
        pipe = StableDiffusionPipeline(
            vae=model.vae,
            text_encoder=copy.deepcopy(model.text_encoder),
            tokenizer=CLIPTokenizer.from_pretrained(tmp_path / "tokenizer"),
            unet=model.unet,
            scheduler=ddim_scheduler(model.ours.config),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return make


def their_ids(pipe, prompt: str) -> list[int]:
    text = pipe.maybe_convert_prompt(prompt, pipe.tokenizer)
    length = pipe.tokenizer.model_max_length
    return pipe.tokenizer(text, padding="max_length", max_length=length, truncation=True).input_ids


def our_ids(pipe, prompt: str) -> list[int]:
    tokenizer = pipe.components.tokenizers["text_encoder"]
    return frame(tokenizer, prompt_chunks(tokenizer, prompt)[0])[0]


def our_states(pipe, prompts) -> torch.Tensor:
    tokenizer = pipe.components.tokenizers["text_encoder"]
    return encode_prompts(tokenizer, pipe.components.modules["text_encoder"], prompts)


@pytest.mark.parametrize("kind", ["a1111-pt", "a1111-safetensors", "diffusers-bin", "diffusers-safetensors"])
@pytest.mark.parametrize("n", [1, 2])
def test_formats_match_diffusers(ours, theirs, tmp_path, kind, n):
    path = write(kind, tmp_path, vectors(n))
    embedding = ours.load_embedding(path, token=WORD)
    pipe = theirs()
    pipe.load_textual_inversion(str(path), token=WORD)
    assert embedding.name == WORD and embedding.length == n
    assert our_ids(ours, PROMPT) == their_ids(pipe, PROMPT)
    assert max(our_ids(ours, PROMPT)) == 49408 + n - 1  # placeholders follow the vocabulary
    with torch.no_grad():
        expected = pipe.encode_prompt(PROMPT, "cpu", 1, False)[0]
    torch.testing.assert_close(our_states(ours, [PROMPT]), expected, rtol=1e-5, atol=1e-5)


def test_two_embeddings_and_negative_prompt_match_diffusers(ours, theirs, tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    pipe = theirs()
    for folder, word, seed in ((first, WORD, 1), (second, "old-film", 2)):
        path = write("a1111-safetensors", folder, vectors(2, seed=seed))
        ours.load_embedding(path, token=word)
        pipe.load_textual_inversion(str(path), token=word)
    prompt, negative = "old-film photo of my-style", "old-film, blurry"
    assert our_ids(ours, prompt) == their_ids(pipe, prompt)
    with torch.no_grad():
        context, uncond = pipe.encode_prompt(prompt, "cpu", 1, True, negative)
    ours_context, ours_uncond = encode_prompt_pair(ours.components, [prompt], [negative])
    torch.testing.assert_close(ours_context, context, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_uncond, uncond, rtol=1e-5, atol=1e-5)


def test_weights_apply_to_the_embedding_positions(ours, tmp_path):
    ours.load_embedding(write("a1111-safetensors", tmp_path, vectors(2)), token=WORD)
    plain, weighted = "a photo of my-style", "a photo of (my-style:1.5)"
    states = our_states(ours, [plain])
    weights = torch.ones(1, 77)
    weights[0, 4:6] = 1.5  # start, a, photo, of, then the two vectors
    torch.testing.assert_close(our_states(ours, [weighted]), apply_weights(states, weights))
    assert not torch.equal(our_states(ours, [weighted]), states)


def test_words_match_as_token_sequences_case_insensitively(ours, tmp_path):
    ours.load_embedding(write("a1111-safetensors", tmp_path, vectors(2)), token=WORD)
    tokenizer = ours.components.tokenizers["text_encoder"]
    assert tokenizer.tokenize("My-Style")[-2:] == [49408, 49409]
    assert max(tokenizer.tokenize("my-styles and mystyle")) < 49408  # other words, untouched


def test_an_embedding_is_never_split_across_chunks(ours, tmp_path):
    ours.load_embedding(write("a1111-safetensors", tmp_path, vectors(3)), token=WORD)
    tokenizer = ours.components.tokenizers["text_encoder"]
    chunks = prompt_chunks(tokenizer, "cat " * 74 + "my-style dog")
    assert len(chunks[0].tokens) == 74 and 49408 not in chunks[0].tokens
    assert chunks[1].tokens[:3] == [49408, 49409, 49410]
    assert [len(c.tokens) for c in prompt_chunks(tokenizer, "cat " * 72 + "my-style")] == [75]


def test_png_info_names_the_embeddings_used(ours, tmp_path):
    path = write("a1111-safetensors", tmp_path, vectors(1))
    ours.load_embedding(path, token=WORD)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    with_word = ours.generate("a my-style cat", width=32, height=32, steps=1)[0].info["parameters"]
    assert f'TI hashes: "{WORD}: {digest}"' in with_word
    negative = ours.generate("a cat", negative_prompt="my-style", width=32, height=32, steps=1)[0]
    assert "TI hashes" in negative.info["parameters"]
    assert "TI hashes" not in ours.generate("a cat", width=32, height=32, steps=1)[0].info["parameters"]


def test_folder_names_words_by_file_stem(ours, tmp_path):
    save_file({"emb_params": vectors(2).contiguous()}, tmp_path / "Fancy-Look.safetensors")
    (tmp_path / "notes.txt").write_text("not an embedding")
    [embedding] = ours.load_embeddings(tmp_path)
    assert embedding.name == "Fancy-Look"
    assert isinstance(ours.components.tokenizers["text_encoder"], TokenizerWithEmbeddings)
    assert our_ids(ours, "fancy-look")[1:3] == [49408, 49409]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: save_file({"emb_params": vectors(2, width=48).contiguous()}, p), "48 wide"),
        (lambda p: p.write_bytes(b""), "is empty"),
        (lambda p: p.write_bytes(b"\x00garbage" * 40), "cannot read|not a|truncated"),
        (lambda p: save_file({"a": vectors(1), "b": vectors(1)}, p), "holds 2 embeddings"),
        (lambda p: save_file({"emb_params": torch.full((1, 32), float("nan"))}, p), "NaN"),
    ],
    ids=["wrong-width", "empty", "corrupt", "two-words", "nan"],
)
def test_bad_files_get_one_clear_error(ours, tmp_path, make, message):
    path = tmp_path / "bad.safetensors"
    make(path)
    with pytest.raises(UserError, match=message):
        ours.load_embedding(path)
    assert not isinstance(ours.components.tokenizers["text_encoder"], TokenizerWithEmbeddings)


def test_default_word_is_the_file_stem_or_diffusers_stored_token(ours, tmp_path):
    a1111 = write("a1111-pt", tmp_path, vectors(2))
    assert ours.load_embedding(a1111).name == "emb"  # the web UI names a file's word by its stem
    assert ours.load_embedding(a1111).step == 50
    assert ours.load_embedding(write("diffusers-bin", tmp_path, vectors(1))).name == WORD
    assert [e.name for e in ours.components.tokenizers["text_encoder"].embeddings] == ["emb", WORD]


def test_an_embedding_longer_than_a_chunk_is_refused(tmp_path):
    import latentdiffusion as ld

    pipe = ld.load("default")  # 32 positions: 30 tokens per chunk
    save_file({"emb_params": torch.randn(31, 128)}, tmp_path / "long.safetensors")
    with pytest.raises(UserError, match=r"31 vectors.*30 tokens per chunk"):
        pipe.load_embedding(tmp_path / "long.safetensors")
    save_file({"emb_params": torch.randn(30, 128)}, tmp_path / "full.safetensors")
    pipe.load_embedding(tmp_path / "full.safetensors")
    chunks = prompt_chunks(pipe.components.tokenizers["text_encoder"], "a full")
    assert [len(c.tokens) for c in chunks] == [1, 30]
