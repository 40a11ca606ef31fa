"""SD3 from the command line: a saved tiny SD3 model (single file and diffusers folder) runs with no special
flags, with --no-t5, in bf16, and converts between the layouts with ``ldm convert``; bad requests are one
line and exit 2."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from sd3_fixtures import TINY_SD3, TINY_SD3_WITHOUT_T5

from latentdiffusion.checkpoints.formats import save_components
from latentdiffusion.cli.main import main
from latentdiffusion.pipelines.loading import load_components


@pytest.fixture(scope="module")
def single_file(sd3_models, tmp_path_factory):
    components, _ = sd3_models(TINY_SD3)
    path = tmp_path_factory.mktemp("sd3-file") / "tiny-sd3.safetensors"
    save_components(components, path, "single-file")
    return path


def run(model, out, *flags) -> str:
    args = ["generate", "a red circle", "--model", str(model), "--steps", "2", "--seed", "3", "-o", str(out)]
    assert main([*args, "--quiet", *flags]) == 0
    return Image.open(out).info["parameters"]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_generate_from_a_single_file(single_file, tmp_path, precision):
    parameters = run(single_file, tmp_path / "out.png", "--precision", precision)
    assert "Size: 32x32" in parameters and "Sampler: Euler" in parameters
    assert Image.open(tmp_path / "out.png").size == (32, 32)


def test_no_t5_changes_the_image_and_matches_a_model_saved_without_t5(sd3_models, single_file, tmp_path):
    with_t5 = run(single_file, tmp_path / "t5.png", "--precision", "fp32")
    assert with_t5
    run(single_file, tmp_path / "no-t5.png", "--precision", "fp32", "--no-t5")
    assert Image.open(tmp_path / "t5.png").tobytes() != Image.open(tmp_path / "no-t5.png").tobytes()


def test_convert_single_file_to_diffusers_and_back_is_exact(single_file, tmp_path):
    folder, back = tmp_path / "diffusers", tmp_path / "back.safetensors"
    assert main(["convert", str(single_file), str(folder), "--format", "diffusers"]) == 0
    assert main(["convert", str(folder), str(back), "--format", "single-file"]) == 0
    original, converted = load_components(str(single_file)), load_components(str(back))
    for role, module in original.modules.items():
        theirs = converted.modules[role].state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in module.state_dict().items()), role


def test_t5_flags_on_models_without_one_are_one_line_exit_2(sd3_models, tmp_path, capsys):
    assert main(["generate", "x", "--no-t5", "-o", str(tmp_path / "o.png"), "--quiet"]) == 2
    assert "that can be left out" in capsys.readouterr().err
    _, folder = sd3_models(TINY_SD3_WITHOUT_T5)
    parameters = run(folder, tmp_path / "no-t5.png", "--precision", "fp32")  # runs with zeros for T5
    assert "Size: 32x32" in parameters
