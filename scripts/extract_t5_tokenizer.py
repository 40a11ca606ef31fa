"""Extract the T5 tokenizer (``tokenizer.json``) that stable-diffusion.cpp embeds in its sources.

stable-diffusion.cpp (MIT, Copyright (c) 2023 leejet) compiles Hugging Face's ``tokenizer.json`` of
Google's T5 v1.1 SentencePiece vocabulary into ``src/tokenizers/vocab/clip_t5.hpp`` as a C array of
bytes, ``t5_tokenizer_json_str`` (the same header also holds CLIP's merge list, which is not read here).
The Python binding ``stable-diffusion-cpp-python`` vendors those sources in its source distribution:

    pip download --no-deps --no-binary :all: stable-diffusion-cpp-python==0.4.7 -d DIR
    python scripts/extract_t5_tokenizer.py DIR/stable_diffusion_cpp_python-0.4.7.tar.gz \\
        src/latentdiffusion/data/t5_tokenizer.json.gz

The output is gzip-compressed when its name ends in ``.gz`` (with a zero timestamp, so that extracting
twice gives the same bytes), else written as is. The JSON is checked to be a Unigram tokenizer of
32,100 pieces whose pad, end and unknown pieces have ids 0, 1 and 2 before anything is written.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
import tarfile
from pathlib import Path

HEADER_SUFFIX = "vendor/stable-diffusion.cpp/src/tokenizers/vocab/clip_t5.hpp"
ARRAY_NAME = "t5_tokenizer_json_str"
# T5 v1.1's SentencePiece model: 32,000 pieces plus 100 sentinels <extra_id_N>; the embedding table is
# padded to 32,128 rows, but the tokenizer never emits those last 28 ids
VOCAB_SIZE = 32100
SPECIAL_IDS = {"<pad>": 0, "</s>": 1, "<unk>": 2}
_BYTE = re.compile(rb"0[xX]([0-9a-fA-F]{1,2})|(\d+)")


def read_header(sdist: Path) -> bytes:
    """The bytes of ``clip_t5.hpp`` inside the source distribution ``sdist`` (a .tar.gz)."""
    with tarfile.open(sdist, "r:*") as archive:
        for member in archive.getmembers():
            if member.isfile() and member.name.endswith(HEADER_SUFFIX):
                f = archive.extractfile(member)
                if f is not None:
                    return f.read()
    raise SystemExit(f"{sdist} holds no {HEADER_SUFFIX}; is it the stable-diffusion-cpp-python sdist?")


def array_bytes(source: bytes, name: str) -> bytes:
    """The contents of the C array ``name`` (``static const unsigned char name[] = { 0x7b, ... };``)."""
    start = re.search(rb"\b" + re.escape(name.encode()) + rb"\s*\[\s*\]\s*=\s*\{", source)
    if start is None:
        raise SystemExit(f"the header declares no array {name}")
    end = source.find(b"}", start.end())
    if end < 0:
        raise SystemExit(f"the array {name} is not closed")
    body = source[start.end() : end]
    return bytes(int(m[1], 16) if m[1] else int(m[2]) for m in _BYTE.finditer(body))


def check_tokenizer(raw: bytes) -> None:
    """Refuse anything but the T5 v1.1 Unigram tokenizer (a wrong array, a changed vocabulary)."""
    spec = json.loads(raw.decode("utf-8"))
    model = spec.get("model", {})
    pieces = model.get("vocab", [])
    if model.get("type") != "Unigram" or len(pieces) != VOCAB_SIZE:
        raise SystemExit(f"not T5's tokenizer: a {model.get('type')} model of {len(pieces)} pieces")
    for piece, index in SPECIAL_IDS.items():
        if pieces[index][0] != piece:
            raise SystemExit(f"not T5's tokenizer: id {index} is {pieces[index][0]!r}, not {piece!r}")


def write(raw: bytes, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".gz":
        out.write_bytes(gzip.compress(raw, compresslevel=9, mtime=0))
    else:
        out.write_bytes(raw)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sdist", type=Path, help="stable_diffusion_cpp_python-*.tar.gz")
    parser.add_argument("out", type=Path, help="where to write tokenizer.json (gzipped if it ends in .gz)")
    args = parser.parse_args(argv)
    raw = array_bytes(read_header(args.sdist), ARRAY_NAME)
    check_tokenizer(raw)
    write(raw, args.out)
    print(f"wrote {args.out}: tokenizer.json of {len(raw)} bytes", file=sys.stderr)


if __name__ == "__main__":
    main()
