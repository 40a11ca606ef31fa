"""``ldm img2img / inpaint / outpaint / upscale`` on tiny random models: files written, settings
recorded, warnings and bad input as one line each."""

from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from latentdiffusion.cli.main import main
from latentdiffusion.config import PRESETS, AutoencoderConfig, TextEncoderConfig, UNetConfig
from latentdiffusion.pipelines.metadata import parse_parameters, read_parameters

TINY = "preset:tiny"
FAST = ["--model", TINY, "--steps", "2", "--seed", "4", "--quiet"]


@pytest.fixture
def picture(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "in.png"
    Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def mask(tmp_path):
    path = tmp_path / "mask.png"
    mask = Image.new("L", (40, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    mask.save(path)
    return path


def settings(path):
    return parse_parameters(read_parameters(path))


def test_img2img_writes_png_with_strength(picture, tmp_path, capsys):
    out = tmp_path / "out.png"
    assert main(["img2img", str(picture), "a red circle", "--strength", "0.5", *FAST, "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    parsed = settings(out)
    assert parsed["prompt"] == "a red circle"
    assert parsed["settings"]["Denoising strength"] == "0.5" and parsed["settings"]["Seed"] == "4"
    assert Image.open(out).size == (40, 32)


def test_inpaint_keeps_pixels_outside_the_mask(picture, mask, tmp_path):
    out = tmp_path / "out.png"
    code = main(["inpaint", str(picture), str(mask), "x", "--mask-blur", "0", *FAST, "-o", str(out)])
    assert code == 0
    result, original = np.asarray(Image.open(out)), np.asarray(Image.open(picture))
    keep = np.asarray(Image.open(mask)) == 0
    assert np.array_equal(result[keep], original[keep])
    assert settings(out)["settings"]["Mask blur"] == "0"


def test_outpaint_numbers_several_images(picture, tmp_path):
    outdir = tmp_path / "outs"
    code = main(
        ["outpaint", str(picture), "x", "--right", "16", "--num-images", "2", *FAST, "--outdir", str(outdir)]
    )
    assert code == 0
    paths = sorted(outdir.glob("*.png"))
    assert [p.name for p in paths] == ["00000-4.png", "00001-5.png"]
    assert Image.open(paths[0]).size == (56, 32)
    assert settings(paths[1])["settings"]["Seed"] == "5"


def test_upscale_with_a_saved_upscaler(tmp_path, capsys):
    from latentdiffusion.checkpoints.formats import save_components
    from latentdiffusion.components import build_components

    config = replace(
        PRESETS["sd-x4-upscaler"],
        name="tiny-upscaler",
        unet=UNetConfig(
            in_channels=7,
            model_channels=32,
            channel_mult=(1, 2),
            num_res_blocks=1,
            attention_levels=(1,),
            num_heads=2,
            context_dim=32,
            use_linear_projection=True,
            num_class_embeds=1000,
        ),
        autoencoder=AutoencoderConfig(block_channels=(32, 32, 32), num_res_blocks=1, scaling_factor=0.08333),
        text_encoder=TextEncoderConfig(hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64),
    )
    save_components(build_components(config), tmp_path / "upscaler", "native")
    low = tmp_path / "low.png"
    Image.new("RGB", (20, 16), (10, 200, 30)).save(low)
    out = tmp_path / "up.png"
    code = main(
        [
            "upscale",
            str(low),
            "--model",
            str(tmp_path / "upscaler"),
            "--steps",
            "1",
            "--seed",
            "1",
            "--quiet",
            "-o",
            str(out),
        ]
    )
    assert code == 0
    assert "cropped to 16x16" in capsys.readouterr().err  # 20 is not a multiple of 8: one warning line
    assert Image.open(out).size == (64, 64)
    assert settings(out)["settings"]["Noise level"] == "20"


def test_size_warning_is_one_line(tmp_path, capsys):
    odd = tmp_path / "odd.png"
    Image.new("RGB", (35, 32)).save(odd)
    assert main(["img2img", str(odd), "x", *FAST, "-o", str(tmp_path / "o.png")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "ldm img2img: warning: image is 35x32, not a multiple of 8: cropped to 32x32 (right/bottom)"
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["img2img", "{missing}", "x", "--strength", "0.5"], "no such file"),
        (["img2img", "{picture}", "x", "--strength", "1.5"], "strength must be in [0, 1]"),
        (["img2img", "{text}", "x"], "cannot read image"),
        (["inpaint", "{picture}", "{text}", "x"], "cannot read mask"),
        (["inpaint", "{picture}", "{wide}", "x"], "give a mask of the image's size"),
        (["outpaint", "{picture}", "x", "--left", "12"], "multiple of 8"),
        (["upscale", "{picture}", "x"], "not an upscaler"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(picture, tmp_path, capsys, args, message):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    wide = tmp_path / "wide.png"
    Image.new("L", (64, 16)).save(wide)
    names = {"missing": tmp_path / "nope.png", "picture": picture, "text": text, "wide": wide}
    argv = [a.format(**names) for a in args]
    code = main([*argv, *FAST, "-o", str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
