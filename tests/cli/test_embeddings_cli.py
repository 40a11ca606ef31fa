"""``--embeddings-dir`` on ``ldm generate`` and ``ldm img2img``: each file's word works in prompts and
negative prompts and is named in the PNG info; a missing folder or an unfitting file is one clear error."""

from __future__ import annotations

import torch
from PIL import Image
from safetensors.torch import save_file

from latentdiffusion.cli.main import main
from latentdiffusion.pipelines.metadata import parse_parameters, read_parameters

TINY = "preset:tiny"


def test_generate_and_img2img_read_the_embeddings_folder(tmp_path):
    folder = tmp_path / "embeddings"
    folder.mkdir()
    save_file({"emb_params": torch.randn(2, 32)}, folder / "my-style.safetensors")
    out = tmp_path / "out.png"
    common = ["--model", TINY, "--steps", "1", "--quiet", "--embeddings-dir", str(folder)]
    assert main(["generate", "a my-style cat", "--size", "32", *common, "-o", str(out)]) == 0
    assert parse_parameters(read_parameters(out))["settings"]["TI hashes"].startswith("my-style: ")
    source = tmp_path / "in.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(source)
    assert main(["img2img", str(source), "a cat", "--negative", "my-style", *common, "-o", str(out)]) == 0
    assert "TI hashes" in parse_parameters(read_parameters(out))["settings"]


def test_a_missing_or_unfitting_embeddings_folder_is_one_clear_error(tmp_path, capsys):
    args = ["generate", "x", "--model", TINY, "--steps", "1", "--size", "32", "-o", str(tmp_path / "o.png")]
    assert main([*args, "--embeddings-dir", str(tmp_path / "none")]) == 2
    assert "embeddings folder" in capsys.readouterr().err
    save_file({"emb_params": torch.randn(1, 768)}, tmp_path / "big.safetensors")
    assert main([*args, "--embeddings-dir", str(tmp_path)]) == 2
    assert "768 wide" in capsys.readouterr().err
