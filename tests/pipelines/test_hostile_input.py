"""Hostile and malformed input to the library (issue #16): prompts parse in linear time, text that is not
valid Unicode is a ``UserError``, images too large to decode are refused from their header, and a sampled
latent that is not finite is a warning instead of a silent black image."""

from __future__ import annotations

import struct
import time
import warnings
import zlib

import pytest
from PIL import Image

from latentdiffusion.errors import UserError
from latentdiffusion.pipelines.images import load_image, load_mask
from latentdiffusion.prompts import EXACT_MULTIPLICATIONS, parse_prompt


@pytest.mark.parametrize(
    "text",
    [
        "(a" * 30_000,  # every bracket left open: closed at the end, outermost first
        "(a" * 10_000 + ")" * 10_000,  # closed innermost first
        "[a(b" * 10_000,  # two kinds interleaved
        "((a:1.0)" * 10_000,
        " " * 100_000 + "x BREAK y",  # a long blank run before BREAK (a quadratic regex split)
    ],
)
def test_deep_nesting_parses_in_linear_time(text):
    start = time.perf_counter()
    fragments = parse_prompt(text)
    assert time.perf_counter() - start < 2.0  # about 10 s for 10,000 brackets before
    assert fragments


def test_deep_nesting_gives_the_weights_of_the_exact_products():
    depth = 8_000  # work of about 32 million multiplications: the linear path
    assert depth * (depth + 1) // 2 > EXACT_MULTIPLICATIONS
    fragments = parse_prompt("(a" * depth)
    assert fragments[0] == ("a", pytest.approx(1.1))
    assert fragments[99][1] == pytest.approx(1.1**100, rel=1e-9)
    assert fragments[-1][1] == float("inf")  # 1.1**8000 overflows, as the web UI's weights do
    square = parse_prompt("[a" * depth)
    assert square[99][1] == pytest.approx(1.1**-100, rel=1e-9) and square[-1][1] == 0.0


def quadratic_parse(text: str) -> list[tuple[str, float]]:
    """The web UI's algorithm as it was here before: every closing bracket multiplies every fragment it
    encloses at once (no merging)."""
    from latentdiffusion.prompts import _SYNTAX, _weight

    fragments: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, multiplier: float) -> None:
        for fragment in fragments[start:]:
            fragment[1] *= multiplier

    for match in _SYNTAX.finditer(text):
        kind = match.lastgroup
        if kind == "open":
            (round_open if match["open"] == "(" else square_open).append(len(fragments))
        elif kind == "weight" and round_open:
            multiply(round_open.pop(), _weight(match["weight"]))
        elif kind == "close" and match["close"] == ")" and round_open:
            multiply(round_open.pop(), 1.1)
        elif kind == "close" and match["close"] == "]" and square_open:
            multiply(square_open.pop(), 1 / 1.1)
        else:
            fragments.append([match[0], 1.0])
    for start in round_open:
        multiply(start, 1.1)
    for start in square_open:
        multiply(start, 1 / 1.1)
    return [(text, weight) for text, weight in fragments]


@pytest.mark.parametrize(
    "text",
    [
        "((a:-1)" * 700 + "[b" * 700,  # negative weights, both kinds
        "(x (y:0.5) [z" * 300 + ")" * 200,
        "(a:0)" + "(b" * 1000,  # a zero weight
        "a (b) [c] ((d:1.3)) e",
    ],
)
def test_the_linear_path_matches_the_quadratic_algorithm(text, monkeypatch):
    from latentdiffusion import prompts

    expected = quadratic_parse(text)
    monkeypatch.setattr(prompts, "EXACT_MULTIPLICATIONS", 0)  # always the logarithm path
    got = parse_prompt(text)
    # parse_prompt merges equal neighbours: compare the weight of every character
    assert "".join(t for t, _ in expected) == "".join(t for t, _ in got)
    weights_by_char = [w for t, w in expected for _ in t]
    got_by_char = [w for t, w in got for _ in t]
    assert got_by_char == pytest.approx(weights_by_char, rel=1e-9, abs=1e-300)


def test_a_break_keeps_its_surrounding_blanks_out():
    assert parse_prompt("a   BREAK\t b") == [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]
    assert parse_prompt("  a BREAK b  ") == [("  a", 1.0), ("BREAK", -1.0), ("b  ", 1.0)]


@pytest.mark.parametrize("text", ["\ud800", "a (b\udcff) c", b"caf\xe9".decode("utf-8", "surrogateescape")])
def test_text_that_is_not_valid_unicode_is_a_user_error(text):
    with pytest.raises(UserError, match="not valid Unicode"):
        parse_prompt(text)


def test_a_negative_prompt_with_a_lone_surrogate_is_a_user_error():
    import latentdiffusion as ld

    pipe = ld.load("preset:tiny")
    with pytest.raises(UserError, match="negative prompt is not valid Unicode"):
        pipe.generate("fine", negative_prompt="\udc80", steps=1, width=32, height=32)


def png_claiming(width: int, height: int) -> bytes:
    """A PNG header that claims ``width`` x ``height`` in front of a few bytes of data: tiny on disk,
    gigabytes if decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1000)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize("size", [(10_000, 10_000), (20_000, 20_000), (2**31 - 1, 2**31 - 1)])
@pytest.mark.parametrize("reader", [load_image, load_mask])
def test_images_over_the_pixel_limit_are_refused_from_their_header(tmp_path, size, reader):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_claiming(*size))
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning either
        with pytest.raises(UserError, match=r"more than \d+ pixels .*give a smaller image"):
            reader(path)
    assert time.perf_counter() - start < 1.0


def test_the_pixel_limit_follows_pillows_setting(tmp_path, monkeypatch):
    path = tmp_path / "small.png"
    Image.new("RGB", (40, 40)).save(path)
    assert load_image(path).size == (40, 40)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    for reader in (load_image, load_mask):
        with pytest.raises(UserError, match="is 40x40, more than 1000 pixels"):
            reader(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # Pillow's own refusal, at twice its limit
    with pytest.raises(UserError, match="more than 500 pixels"):
        load_image(path)


def test_a_latent_that_is_not_finite_warns():
    import latentdiffusion as ld
    from latentdiffusion.pipelines.sampling import NonFiniteWarning

    pipe = ld.load("preset:tiny")
    with pytest.warns(NonFiniteWarning, match="NaN or Inf"):
        pipe.generate("p", steps=2, guidance_scale=1e308, width=32, height=32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonFiniteWarning)
        pipe.generate("p", steps=2, width=32, height=32)  # a finite run says nothing
