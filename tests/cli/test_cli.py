import subprocess
import sys

import pytest

from latentdiffusion.cli.main import main
from latentdiffusion.pipelines.metadata import parse_parameters, read_parameters

TINY = "preset:tiny"


def run_cli(*args: str) -> int:
    return main(list(args))


def test_generate_writes_png_with_parameters(tmp_path, capsys):
    out = tmp_path / "out.png"
    args = f"generate --model {TINY} --steps 2 --seed 5 --size 64x48 --sigmas karras --quiet".split()
    code = run_cli(*args, "a red circle", "--negative", "blurry", "-o", str(out))
    assert code == 0
    assert capsys.readouterr().out.strip() == str(out)
    parsed = parse_parameters(read_parameters(out))
    assert parsed["prompt"] == "a red circle"
    assert parsed["negative_prompt"] == "blurry"
    assert parsed["settings"]["Seed"] == "5"
    assert parsed["settings"]["Size"] == "64x48"
    assert parsed["settings"]["Sampler"] == "DPM++ 2M Karras"
    from PIL import Image

    assert Image.open(out).size == (64, 48)


def test_generate_records_the_variation_seed(tmp_path):
    out = tmp_path / "v.png"
    args = f"generate x --model {TINY} --steps 1 --size 32 --quiet --seed 3 -o {out}".split()
    assert run_cli(*args, "--variation-seed", "8", "--variation-strength", "0.2") == 0
    settings = parse_parameters(read_parameters(out))["settings"]
    assert (settings["Variation seed"], settings["Variation seed strength"]) == ("8", "0.2")


@pytest.mark.parametrize("command", ["generate", "img2img"])
def test_fractional_timesteps_flag_is_recorded(tmp_path, command):
    from PIL import Image

    source = tmp_path / "in.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(source)
    inputs = [str(source)] if command == "img2img" else ["--size", "32"]
    out = tmp_path / "f.png"
    common = [command, *inputs, "x", "--model", TINY, "--steps", "2", "--sigmas", "karras", "--quiet"]
    assert run_cli(*common, "--fractional-timesteps", "-o", str(out)) == 0
    assert parse_parameters(read_parameters(out))["settings"]["Timesteps"] == "fractional"
    assert run_cli(*common, "-o", str(out)) == 0
    assert "Timesteps" not in parse_parameters(read_parameters(out))["settings"]


def test_generate_numbers_several_images_in_outdir(tmp_path):
    common = f"generate x --model {TINY} --steps 1 --size 32 --quiet --outdir {tmp_path}".split()
    assert run_cli(*common, "--seed", "3", "--num-images", "2") == 0
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["00000-3.png", "00001-4.png"]
    assert run_cli(*common, "--seed", "9") == 0
    assert (tmp_path / "00002-9.png").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--size", "60x64"], "multiple of 8"),
        (["--size", "8192x64"], "larger than the maximum"),
        (["--sampler", "nope"], "known: ddim"),
        (["--sigmas", "nope"], "karras"),
        (["--model", "/does/not/exist"], "does not exist"),
        (["--model", "preset:nope"], "unknown model preset"),
        (["--variation-seed", "3", "--variation-strength", "2"], "variation_strength"),
        (["--restart", "1"], "restart steps must be"),  # one step: nothing before the last to restart
        (["--restart", "0x20"], "restart times must be"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    code = run_cli("generate", "p", "--model", TINY, "--steps", "1", "-o", str(tmp_path / "o.png"), *args)
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "0"], "expected a number >= 1"),
        (["--cfg", "nan"], "finite"),
        (["--size", "axb"], "WIDTHxHEIGHT"),
        (["--restart", "six"], "STEPSxTIMES"),
    ],
)
def test_argument_errors_exit_2(capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        run_cli("generate", "p", *args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_unwritable_output_is_a_clear_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code = run_cli(
        "generate", "p", "--model", TINY, "--steps", "1", "--size", "32", "-o", str(blocker / "x.png")
    )
    assert code == 2
    assert "cannot write" in capsys.readouterr().err


def test_samplers_lists_every_sampler(capsys):
    from latentdiffusion.samplers import SAMPLERS

    assert run_cli("samplers") == 0
    out = capsys.readouterr().out
    for name in SAMPLERS:
        assert name in out


def test_entry_point_version_and_help():
    version = subprocess.run(
        [sys.executable, "-m", "latentdiffusion.cli.main", "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert version.stdout.startswith("ldm ")
    help_text = subprocess.run(
        [sys.executable, "-m", "latentdiffusion.cli.main", "generate", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    flat = " ".join(help_text.split())
    assert "sampling steps (default: the model's, 20 for SD) --sampler" in flat
    assert "--sampler" in help_text


@pytest.mark.parametrize("command", [["generate", "p"], ["eval-shapes", "--n", "1"], ["serve"]])
def test_model_options_reach_the_loader(monkeypatch, capsys, command):
    import latentdiffusion
    from latentdiffusion.errors import UserError

    seen = {}

    def fake_load(source, **options):
        seen.update(options, source=source)
        raise UserError("stop here")

    monkeypatch.setattr(latentdiffusion, "load", fake_load)
    options = ["--model", "m.safetensors", "--lora", "style.safetensors:0.5", "--prediction-type", "epsilon"]
    assert run_cli(*command, *options, "--precision", "fp32") == 2
    assert "stop here" in capsys.readouterr().err
    assert seen["source"] == "m.safetensors" and seen["loras"] == [("style.safetensors", 0.5)]
    assert (seen["prediction_type"], seen["precision"]) == ("epsilon", "fp32")
