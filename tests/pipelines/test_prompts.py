"""Prompt syntax, chunking and weighting, against AUTOMATIC1111's documented behaviour.

The parse cases are the doctest examples of the web UI's ``parse_prompt_attention``
(modules/prompt_parser.py) plus its wiki's rules: ``(x)`` x1.1, ``[x]`` /1.1, ``(x:w)``, nesting
multiplies, ``\\(`` escapes, ``BREAK`` starts a new 75-token chunk, prompts longer than 75 tokens are
cut into chunks of 75 that are encoded separately and concatenated.
"""

from dataclasses import replace

import pytest
import torch

from latentdiffusion.components import build_components
from latentdiffusion.config import TINY
from latentdiffusion.errors import UserError
from latentdiffusion.models.tokenizer import CLIPTokenizer
from latentdiffusion.prompts import (
    apply_weights,
    encode_prompt_pair,
    encode_prompts,
    frame,
    parse_prompt,
    plain_text,
    prompt_chunks,
)

CAT = 2368  # "cat</w>": one token per word, so word counts are token counts
COMMA = 267


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        ("\\(literal\\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [
                ("a ", 1.0),
                ("house", 1.5730000000000004),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641000000000006),
                (".", 1.1),
            ],
        ),
        ("", [("", 1.0)]),
    ],
)
def test_parse_matches_the_web_ui_doctests(text, expected):
    assert parse_prompt(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("((word))", [("word", pytest.approx(1.21))]),
        ("[[word]]", [("word", pytest.approx(1 / 1.21))]),
        ("([word])", [("word", pytest.approx(1.0))]),
        ("(word:1.3)", [("word", 1.3)]),
        ("((word:1.5))", [("word", pytest.approx(1.65))]),
        ("(word: 0.5 )", [("word", 0.5)]),
        ("a\\\\b", [("a\\b", 1.0)]),  # an escaped backslash is one backslash
        ("\\(x\\)", [("(x)", 1.0)]),
        ("a) b]", [("a) b]", 1.0)]),  # unmatched closers are literal
        ("x:y", [("x:y", 1.0)]),  # a colon without weight is text
        ("[x:0.5]", [("x:0.5", pytest.approx(1 / 1.1))]),  # weights only close round brackets
    ],
)
def test_nesting_escapes_and_literals(text, expected):
    assert parse_prompt(text) == expected


def test_break_splits_and_is_never_weighted():
    assert parse_prompt("a BREAK b") == [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]
    assert parse_prompt("(a BREAK b)") == [("a", 1.1), ("BREAK", -1.0), ("b", 1.1)]
    assert parse_prompt("a break b") == [("a break b", 1.0)]  # only the uppercase word
    assert parse_prompt("BREAKFAST") == [("BREAKFAST", 1.0)]


def test_a_malformed_weight_is_a_user_error():
    with pytest.raises(UserError, match="not a number"):
        parse_prompt("(word:1.2.3)")


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer.from_bundled()


def words(n: int) -> str:
    return " ".join(["cat"] * n)


@pytest.mark.parametrize(
    ("n", "sizes"), [(0, [0]), (1, [1]), (75, [75]), (76, [75, 1]), (150, [75, 75]), (151, [75, 75, 1])]
)
def test_chunks_of_75_tokens(tokenizer, n, sizes):
    chunks = prompt_chunks(tokenizer, words(n))
    assert [len(c.tokens) for c in chunks] == sizes
    assert all(t == CAT for c in chunks for t in c.tokens)


def test_break_closes_the_chunk(tokenizer):
    assert [len(c.tokens) for c in prompt_chunks(tokenizer, "cat BREAK cat cat")] == [1, 2]
    assert [len(c.tokens) for c in prompt_chunks(tokenizer, "BREAK cat")] == [0, 1]
    assert [len(c.tokens) for c in prompt_chunks(tokenizer, "cat BREAK")] == [1]
    assert [len(c.tokens) for c in prompt_chunks(tokenizer, "cat BREAK BREAK cat")] == [1, 0, 1]


def test_a_full_chunk_moves_the_words_after_a_recent_comma(tokenizer):
    text = words(70) + ", " + words(10)  # comma at index 70: 75 - 70 <= 20, so 5 words move on
    chunks = prompt_chunks(tokenizer, text)
    assert [len(c.tokens) for c in chunks] == [71, 10]
    assert chunks[0].tokens[-1] == COMMA
    far = words(40) + ", " + words(40)  # comma 34 tokens back: no backtrack
    assert [len(c.tokens) for c in prompt_chunks(tokenizer, far)] == [75, 6]
    assert [len(c.tokens) for c in prompt_chunks(tokenizer, text, comma_backtrack=0)] == [75, 6]


def test_weights_follow_their_tokens_and_frames_pad(tokenizer):
    chunk = prompt_chunks(tokenizer, "cat (cat:1.5) [cat]")[0]
    assert chunk.weights == pytest.approx([1.0, 1.5, 1 / 1.1])
    ids, weights = frame(tokenizer, chunk)
    assert ids[:5] == [49406, CAT, CAT, CAT, 49407] and len(ids) == 77
    assert set(ids[5:]) == {tokenizer.pad_token_id} and weights[4:] == [1.0] * 73
    sd2 = CLIPTokenizer.from_bundled(pad_token_id=0)
    ids, _ = frame(sd2, prompt_chunks(sd2, "cat")[0])
    assert ids[:3] == [49406, CAT, 49407] and set(ids[3:]) == {0}


def test_weights_scale_states_and_restore_the_mean():
    states = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(0)) + 0.5
    weights = torch.tensor([[1.0, 1.2, 1.0, 0.8, 1.0], [1.0] * 5])
    out = apply_weights(states, weights)
    expected = states[0] * weights[0, :, None]
    expected = expected * (states[0].mean() / expected.mean())
    torch.testing.assert_close(out[0], expected)
    assert torch.equal(out[1], states[1])  # all-1 chunks are untouched, bit for bit


@pytest.fixture(scope="module")
def components():
    return build_components(replace(TINY, text_encoder=replace(TINY.text_encoder, num_layers=1)))


def test_short_prompts_encode_exactly_as_plain_tokenization(components):
    prompts = ["a red circle", "two blue squares, high quality"]
    expected = components.text_encoder(components.tokenizer(prompts))
    assert torch.equal(encode_prompts(components.tokenizer, components.text_encoder, prompts), expected)


def test_long_prompts_concatenate_independently_encoded_chunks(components):
    text = words(80)
    context = encode_prompts(components.tokenizer, components.text_encoder, [text])
    assert context.shape == (1, 154, 32)
    first = components.text_encoder(components.tokenizer([words(75)]))
    second = components.text_encoder(components.tokenizer([words(5)]))
    torch.testing.assert_close(context, torch.cat([first, second], dim=1))


def test_negative_prompt_is_padded_with_empty_chunks(components):
    context, uncond = encode_prompt_pair(components, [words(100)], ["blurry"])
    assert context.shape == uncond.shape == (1, 154, 32)
    empty = components.text_encoder(components.tokenizer([""]))
    torch.testing.assert_close(uncond[:, 77:], empty)
    batch = encode_prompts(
        components.tokenizer, components.text_encoder, ["cat", words(80)]
    )  # a batch pads to its longest prompt
    torch.testing.assert_close(batch[0, 77:], empty[0])


def test_break_padding_equals_empty_chunk_padding(components):
    from latentdiffusion.prompts import count_chunks, pad_with_breaks

    tokenizer = components.tokenizer
    for text in ["", "x", "x BREAK", words(75), "a (b", "a\\"]:
        padded = pad_with_breaks(tokenizer, [text], 3)
        assert count_chunks(tokenizer, padded) == 3
    _, uncond = encode_prompt_pair(components, [words(100)], ["blurry"])
    torch.testing.assert_close(
        encode_prompts(
            components.tokenizer, components.text_encoder, pad_with_breaks(tokenizer, ["blurry"], 2)
        ),
        uncond,
    )


def test_generate_takes_long_prompts_with_short_negatives(tiny_model):
    from latentdiffusion.pipelines.pipeline import Pipeline

    pipe = Pipeline(tiny_model("sd").ours)
    settings = {"negative_prompt": "blurry", "width": 32, "height": 32, "steps": 2, "seed": 1}
    long = pipe.generate(words(75) + " dog dog", **settings)[0]
    truncated = pipe.generate(words(75), **settings)[0]
    assert long.info["parameters"].startswith(words(75) + " dog dog\n")
    assert long.tobytes() != truncated.tobytes()  # the second chunk is seen


@pytest.mark.parametrize(
    ("text", "plain"),
    [
        ("a (red:1.3) cat, [blue] dog", "a red cat, blue dog"),
        ("((very)) large", "very large"),
        ("one BREAK two", "one two"),
        (r"\(literal\) brackets", "(literal) brackets"),
        ("", ""),
    ],
)
def test_plain_text_drops_the_syntax(text, plain):
    assert plain_text(text) == plain
