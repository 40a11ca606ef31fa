"""scripts/extract_t5_tokenizer.py on a stand-in for the stable-diffusion-cpp-python source distribution."""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import tarfile
from importlib.resources import files
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "extract_t5_tokenizer.py"
HEADER = "stable_diffusion_cpp_python-0.4.7/vendor/stable-diffusion.cpp/src/tokenizers/vocab/clip_t5.hpp"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("extract_t5_tokenizer", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _c_array(name: str, data: bytes) -> str:
    body = "".join(f"    0x{b:02x},\n" for b in data)
    return f"static const unsigned char {name}[] = {{\n{body}}};\n"


def _sdist(path: Path, header: str) -> Path:
    raw = header.encode()
    with tarfile.open(path, "w:gz") as archive:
        member = tarfile.TarInfo(HEADER)
        member.size = len(raw)
        archive.addfile(member, io.BytesIO(raw))
    return path


def _t5_json(pieces: int = 32100) -> bytes:
    vocab = [["<pad>", 0.0], ["</s>", 0.0], ["<unk>", 0.0]] + [[f"p{i}", -1.0] for i in range(pieces - 3)]
    return json.dumps(
        {"model": {"type": "Unigram", "unk_id": 2, "vocab": vocab}}, ensure_ascii=False
    ).encode()


def test_extracts_the_t5_array_and_not_clips(script, tmp_path):
    tokenizer = _t5_json()
    header = _c_array("clip_merges_utf8_c_str", b"#version: 0.2\ni n\n") + "\n"
    header += _c_array("t5_tokenizer_json_str", tokenizer)
    sdist = _sdist(tmp_path / "sdist.tar.gz", header)
    script.main([str(sdist), str(tmp_path / "a.json.gz")])
    script.main([str(sdist), str(tmp_path / "b.json.gz")])
    script.main([str(sdist), str(tmp_path / "c.json")])
    assert gzip.decompress((tmp_path / "a.json.gz").read_bytes()) == tokenizer
    assert (tmp_path / "a.json.gz").read_bytes() == (tmp_path / "b.json.gz").read_bytes()  # reproducible
    assert (tmp_path / "c.json").read_bytes() == tokenizer


def test_refuses_what_is_not_t5s_tokenizer(script, tmp_path):
    only_clip = _sdist(tmp_path / "clip.tar.gz", _c_array("clip_merges_utf8_c_str", b"i n\n"))
    with pytest.raises(SystemExit, match="t5_tokenizer_json_str"):
        script.main([str(only_clip), str(tmp_path / "out.json.gz")])
    short = _sdist(tmp_path / "short.tar.gz", _c_array("t5_tokenizer_json_str", _t5_json(100)))
    with pytest.raises(SystemExit, match="100 pieces"):
        script.main([str(short), str(tmp_path / "out.json.gz")])
    assert not (tmp_path / "out.json.gz").exists()


def test_the_shipped_file_is_what_the_script_accepts(script):
    raw = gzip.decompress((files("latentdiffusion") / "data" / "t5_tokenizer.json.gz").read_bytes())
    script.check_tokenizer(raw)
