"""``ldm train-embedding`` (textual inversion, ``training.embedding``): the word's vectors learn from a
few images with the model frozen, export in the AUTOMATIC1111 format, load back, and a run resumes
exactly."""

from __future__ import annotations

import json

import torch
from PIL import Image
from safetensors.torch import load_file

from latentdiffusion.cli.main import main

TINY = "preset:tiny"


def images(folder, count: int = 3):
    folder.mkdir()
    for i in range(count):
        Image.new("RGB", (32, 32), (240, 100, 190) if i else (10, 10, 10)).save(folder / f"{i}.png")
    (folder / "0.txt").write_text("a {token} square")


def test_train_embedding_learns_exports_and_resumes(tmp_path, monkeypatch, interrupt_after):
    images(tmp_path / "images")
    common = ["train-embedding", "--model", TINY, "--images", str(tmp_path / "images"), "--quiet"]
    word = ["--token", "pinkish", "--init-word", "red", "--vectors", "2"]
    steps = ["--max_steps=2", "--checkpoint_every=1", "--batch_size=2", "--data.resolution=32"]
    assert main([*common, *word, *steps, "-o", str(tmp_path / "whole")]) == 0
    exported = load_file(tmp_path / "whole" / "export" / "pinkish.safetensors")
    assert list(exported) == ["emb_params"] and exported["emb_params"].shape == (2, 32)
    config = json.loads((tmp_path / "whole" / "config.json").read_text())
    assert config["diffusion"]["min_snr_gamma"] is None  # the plain loss of the original method

    import latentdiffusion as ld

    pipe = ld.load(TINY)
    red = pipe.components.tokenizers["text_encoder"].tokenize("red")[0]
    start = pipe.components.text_encoder.embeddings.token_embedding.weight[red]
    assert not torch.allclose(exported["emb_params"][0], start)  # it learned
    pipe.load_embedding(tmp_path / "whole" / "export" / "pinkish.safetensors")
    assert (
        "TI hashes" in pipe.generate("a pinkish square", steps=1, width=32, height=32)[0].info["parameters"]
    )

    interrupt_after(monkeypatch, 1)
    assert main([*common, *word, *steps, "-o", str(tmp_path / "split")]) == 130  # killed after step 1
    assert main(["train-embedding", "--resume", "-o", str(tmp_path / "split"), "--quiet"]) == 0
    resumed = load_file(tmp_path / "split" / "export" / "pinkish.safetensors")
    torch.testing.assert_close(resumed["emb_params"], exported["emb_params"])
    assert json.loads((tmp_path / "split" / "embedding.json").read_text())["vectors"] == 2


def test_resume_with_other_word_options_is_refused(tmp_path, capsys):
    images(tmp_path / "images")
    args = ["train-embedding", "--model", TINY, "--images", str(tmp_path / "images"), "--quiet"]
    args += ["--token", "pinkish", "--init-word", "red", "--max_steps=1", "--data.resolution=32", "-o"]
    assert main([*args, str(tmp_path / "run")]) == 0
    assert main([*args, str(tmp_path / "run"), "--resume", "--vectors", "3"]) == 2
    assert "different embedding options" in capsys.readouterr().err
