"""``ldm convert`` between the three layouts, with precision changes, and ``--prediction-type``."""

from __future__ import annotations

import torch

import latentdiffusion as ld
from latentdiffusion.checkpoints.safe_io import read_metadata, read_state_dict
from latentdiffusion.cli.main import main


def state(pipe) -> dict[str, torch.Tensor]:
    return {
        f"{a}.{k}": v
        for a in ("unet", "vae", "text_encoder")
        for k, v in getattr(pipe, a).state_dict().items()
    }


def test_convert_round_trip_through_every_layout(tmp_path, capsys):
    single = tmp_path / "tiny.safetensors"
    assert main(["convert", "preset:tiny", str(single)]) == 0  # format from the suffix
    assert "latentdiffusion.config" in read_metadata(single) and single.with_suffix(".yaml").is_file()
    assert main(["convert", str(single), str(tmp_path / "diffusers"), "--format", "diffusers"]) == 0
    assert main(["convert", str(tmp_path / "diffusers"), str(tmp_path / "native")]) == 0
    assert (tmp_path / "native" / "latentdiffusion.json").is_file()
    original, final = state(ld.load("preset:tiny")), state(ld.load(tmp_path / "native"))
    assert original.keys() == final.keys() and all(torch.equal(original[k], final[k]) for k in original)
    assert str(single) in capsys.readouterr().out


def test_convert_to_half_precision(tmp_path):
    out = tmp_path / "half"
    assert main(["convert", "preset:tiny", str(out), "--format", "diffusers", "--dtype", "fp16"]) == 0
    weights = read_state_dict(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert {v.dtype for v in weights.values()} == {torch.float16}
    original = state(ld.load("preset:tiny"))
    half = state(ld.load(out, dtype=torch.float16))
    assert all(torch.equal(half[k], original[k].half()) for k in original)


def test_convert_refuses_bad_input_with_one_line(tmp_path, capsys):
    (tmp_path / "junk.ckpt").write_bytes(b"\x00" * 64)
    assert main(["convert", str(tmp_path / "junk.ckpt"), str(tmp_path / "out")]) == 2
    assert main(["convert", "preset:tiny", str(tmp_path / "out.ckpt"), "--format", "single-file"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and "not a checkpoint" in lines[0] and ".safetensors" in lines[1]


def test_prediction_type_option(tmp_path):
    single = tmp_path / "tiny.safetensors"
    assert main(["convert", "preset:tiny", str(single), "--prediction-type", "v_prediction"]) == 0
    assert ld.load(single).config.schedule.prediction_type == "v_prediction"
    out = tmp_path / "out.png"
    code = main(
        [
            "generate",
            "x",
            "--model",
            str(single),
            "--prediction-type",
            "epsilon",
            "--steps",
            "1",
            "--size",
            "32",
            "-o",
            str(out),
            "--quiet",
            "--seed",
            "1",
        ]
    )
    assert code == 0 and out.is_file()
