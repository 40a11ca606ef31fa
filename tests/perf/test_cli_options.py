"""The speed options of ``ldm``: --precision on every model-loading command, --deepcache, --preview."""

from __future__ import annotations

import pytest
from PIL import Image

from latentdiffusion.cli.main import main
from latentdiffusion.pipelines.metadata import read_parameters


def test_generate_with_precision_deepcache_and_preview(tmp_path) -> None:
    out, preview = tmp_path / "out.png", tmp_path / "preview.png"
    args = [
        "generate",
        "a red circle",
        "--model",
        "preset:tiny",
        "--steps",
        "3",
        "--size",
        "32",
        "--seed",
        "1",
    ]
    code = main([*args, "--precision", "fp32", "--deepcache", "2", "--preview", str(preview), "-o", str(out)])
    assert code == 0
    assert "DeepCache: 2" in read_parameters(out)
    assert Image.open(preview).size == (32, 32)  # latent preview enlarged to the image size


@pytest.mark.parametrize("command", ["generate", "img2img", "inpaint", "outpaint", "upscale"])
def test_every_model_command_takes_precision(command, capsys) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert "--precision {fp32,fp32-fast,bf16,auto}" in capsys.readouterr().out


def test_bad_precision_and_interval_exit_2(capsys) -> None:
    for bad in (["--precision", "fp16"], ["--deepcache", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["generate", "p", "--model", "preset:tiny", *bad])
        assert exit_info.value.code == 2
