"""SDXL from the command line: a saved tiny SDXL runs with no special flags, and its size/crop
conditioning flags reach the model and its PNG info."""

from __future__ import annotations

import pytest
from PIL import Image

from latentdiffusion.checkpoints.native import save_native
from latentdiffusion.cli.main import main


@pytest.fixture(scope="module")
def model_dir(sdxl, tmp_path_factory):
    ours, _ = sdxl("base")
    folder = tmp_path_factory.mktemp("sdxl-native")
    save_native(ours.components, folder)
    return folder


def run(model_dir, out, *flags) -> str:
    args = ["generate", "a cat", "--model", str(model_dir), "--steps", "2", "--seed", "3", "-o", str(out)]
    assert main([*args, "--quiet", "--precision", "fp32", *flags]) == 0
    return Image.open(out).info["parameters"]


def test_generate_takes_the_model_size_and_records_the_conditioning(model_dir, tmp_path):
    plain = run(model_dir, tmp_path / "plain.png")
    assert "Size: 64x64" in plain and "Original size" not in plain
    flags = ["--original-size", "512x384", "--crop-top", "16", "--negative-target-size", "32x64"]
    conditioned = run(model_dir, tmp_path / "micro.png", *flags)
    assert "Original size: 512x384" in conditioned
    assert "Crop top: 16" in conditioned and "Crop left: 0" in conditioned
    assert "Negative target size: 32x64" in conditioned
    differs = Image.open(tmp_path / "plain.png").tobytes() != Image.open(tmp_path / "micro.png").tobytes()
    assert differs


def test_a_bad_size_is_one_line_and_exit_2(model_dir, tmp_path, capsys):
    args = [
        "generate",
        "x",
        "--model",
        str(model_dir),
        "--original-size",
        "512by384",
        "-o",
        str(tmp_path / "o.png"),
    ]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert "WIDTHxHEIGHT" in capsys.readouterr().err
    assert (
        main(
            [
                "generate",
                "x",
                "--model",
                str(model_dir),
                "--original-size",
                "0x64",
                "--quiet",
                "-o",
                str(tmp_path / "o.png"),
            ]
        )
        == 2
    )
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
