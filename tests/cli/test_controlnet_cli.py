"""``ldm generate/img2img --control MODEL:IMAGE[:STRENGTH]`` with the per-unit ControlNet options."""

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiffusion.cli.common import _control_spec
from latentdiffusion.cli.main import main
from latentdiffusion.config import TINY


@pytest.fixture(scope="module")
def controlnet_folder(tmp_path_factory):
    """A diffusers ControlNet folder for preset:tiny, with random (non-zero) zero convolutions."""
    from diffusers import ControlNetModel
    from tests.pipelines.conftest import diffusers_unet

    folder = tmp_path_factory.mktemp("cn") / "controlnet"
    net = ControlNetModel.from_unet(diffusers_unet(TINY.unet), conditioning_embedding_out_channels=(16, 32))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.5)
    net.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("cn:hint.png", ("cn", "hint.png", 1.0)),
        ("cn:hint.png:0.5", ("cn", "hint.png", 0.5)),
        ("/models/cn.safetensors:/tmp/h.png:2", ("/models/cn.safetensors", "/tmp/h.png", 2.0)),
    ],
)
def test_control_spec(spec, expected):
    assert _control_spec(spec) == expected


def test_generate_with_control(tmp_path, controlnet_folder):
    hint = tmp_path / "hint.png"
    image = Image.new("RGB", (32, 32), "white")
    image.paste((0, 0, 0), (8, 8, 24, 24))
    image.save(hint)
    common = ["generate", "x", "--model", "preset:tiny", "--steps", "2", "--size", "32", "--seed", "1"]
    common.append("--quiet")
    assert main([*common, "-o", str(tmp_path / "plain.png")]) == 0
    control = [
        *("--control", f"{controlnet_folder}:{hint}:1.5"),
        *("--control", f"{controlnet_folder}:{hint}"),
        *("--control-preprocessor", "canny", "--control-preprocessor", "none", "--control-end", "0.5"),
    ]
    assert main([*common, *control, "-o", str(tmp_path / "cn.png")]) == 0
    plain, controlled = (np.asarray(Image.open(tmp_path / n), dtype=float) for n in ("plain.png", "cn.png"))
    assert np.abs(plain - controlled).max() > 2


TWO_UNITS_THREE_STARTS = ["--control", "a:b", "--control", "c:d"] + [
    arg for start in ("0.1", "0.2", "0.3") for arg in ("--control-start", start)
]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--control", "justone"], "MODEL:IMAGE"),
        (
            TWO_UNITS_THREE_STARTS,
            "once each",
        ),
        (["--control", "CN:missing.png", "--control-preprocessor", "depth"], "known: none, canny"),
    ],
)
def test_bad_control_options_are_one_line(tmp_path, controlnet_folder, capsys, extra, message):
    extra = [e.replace("CN", str(controlnet_folder)) for e in extra]
    args = ["generate", "x", "--model", "preset:tiny", "--steps", "1", "--size", "32", "--quiet", *extra]
    assert main([*args, "-o", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
