"""Token merging as a generation option: off is exact, on is close, recorded and reproducible; a bad ratio
gets one clear message."""

from __future__ import annotations

import pytest

from latentdiffusion.cli.main import main
from latentdiffusion.errors import UserError
from latentdiffusion.pipelines.metadata import parse_parameters, read_parameters
from latentdiffusion.pipelines.pipeline import Pipeline

SETTINGS = {"steps": 6, "seed": 5, "width": 64, "height": 64}


def test_generation_with_merged_tokens(make_components, psnr) -> None:
    pipe = Pipeline(make_components())
    plain = pipe.generate("a blue square", **SETTINGS)[0]
    assert pipe.generate("a blue square", token_merging=0, **SETTINGS)[0].tobytes() == plain.tobytes()
    merged = pipe.generate("a blue square", token_merging=0.5, **SETTINGS)[0]
    assert merged.tobytes() != plain.tobytes()
    assert psnr(merged, plain) > 25
    assert pipe.generate("a blue square", token_merging=0.5, **SETTINGS)[0].tobytes() == merged.tobytes()
    assert "Token merging ratio: 0.5" in merged.info["parameters"]


@pytest.mark.parametrize("method", ["img2img", "inpaint", "outpaint"])
def test_editing_with_merged_tokens(make_components, psnr, method: str) -> None:
    from PIL import Image

    pipe = Pipeline(make_components())
    picture = pipe.generate("a red circle", **SETTINGS)[0]
    mask = Image.new("L", picture.size, 0)
    mask.paste(255, (16, 16, 48, 48))
    inputs = {"img2img": (picture,), "inpaint": (picture, mask), "outpaint": (picture,)}[method]
    extra = {"right": 16} if method == "outpaint" else {}
    run = getattr(pipe, method)
    plain = run(*inputs, "a blue square", steps=6, seed=5, **extra)[0]
    merged = run(*inputs, "a blue square", steps=6, seed=5, token_merging=0.5, **extra)[0]
    assert merged.tobytes() != plain.tobytes() and psnr(merged, plain) > 20
    again = run(*inputs, "a blue square", steps=6, seed=5, token_merging=0.5, **extra)[0]
    assert again.tobytes() == merged.tobytes()
    assert "Token merging ratio: 0.5" in merged.info["parameters"]
    assert "Token merging" not in plain.info["parameters"]


@pytest.mark.parametrize("ratio", [-0.5, 0.9])
def test_bad_ratio_is_a_user_error(tiny_pipeline, ratio: float) -> None:
    with pytest.raises(UserError, match="token merging ratio"):
        tiny_pipeline.generate("x", steps=1, width=32, height=32, token_merging=ratio)


def test_cli_records_the_ratio_and_refuses_a_bad_one(tmp_path, capsys) -> None:
    out = tmp_path / "tome.png"
    args = ["generate", "a red circle", "--model", "preset:tiny", "--steps", "2", "--size", "64", "--quiet"]
    assert main([*args, "--seed", "1", "--token-merging", "0.5", "-o", str(out)]) == 0
    assert parse_parameters(read_parameters(out))["settings"]["Token merging ratio"] == "0.5"
    assert main([*args, "--token-merging", "2", "-o", str(tmp_path / "bad.png")]) != 0
    assert "token merging ratio" in capsys.readouterr().err
    edited = tmp_path / "edited.png"
    edit = ["img2img", str(out), "a blue square", "--model", "preset:tiny", "--steps", "2", "--quiet"]
    assert main([*edit, "--token-merging", "0.5", "-o", str(edited)]) == 0
    assert parse_parameters(read_parameters(edited))["settings"]["Token merging ratio"] == "0.5"


def test_a_model_without_a_u_net_refuses_it() -> None:
    from tests.families.sd3_fixtures import TINY_SD3

    from latentdiffusion.components import build_components

    pipe = Pipeline(build_components(TINY_SD3, seed=0, name="tiny-sd3"))
    with pytest.raises(UserError, match="no U-Net"):
        pipe.generate("x", steps=1, width=32, height=32, token_merging=0.5)
