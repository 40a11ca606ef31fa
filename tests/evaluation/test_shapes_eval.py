"""ldm eval-shapes end to end on a tiny random model (the numbers are meaningless; the plumbing is not)."""

from dataclasses import replace

import numpy as np
from PIL import Image

from latentdiffusion.cli.main import main
from latentdiffusion.evaluation.shapes_eval import ATTRIBUTES, eval_prompts, format_table, grid
from latentdiffusion.training.shapes import describe, format_prompt, parse_prompt


def test_eval_prompts_are_deterministic_and_in_the_grammar():
    prompts = eval_prompts(5, seed=3)
    assert prompts == eval_prompts(5, seed=3)
    assert set(prompts) == {"single", "relational"}
    for form, texts in prompts.items():
        assert len(texts) == 5
        for text in texts:
            assert (parse_prompt(text).relation is not None) == (form == "relational")


def test_grid_tiles_images():
    images = [Image.new("RGB", (4, 4), (i, 0, 0)) for i in range(10)]
    canvas = grid(images, columns=4)
    assert canvas.size == (16, 12)
    assert canvas.getpixel((4 * 1 + 1, 4 * 2 + 1)) == (9, 0, 0)


def test_eval_shapes_cli_prints_both_forms_at_both_scales(tmp_path, capsys):
    out = tmp_path / "grid.png"
    code = main(
        [
            "eval-shapes",
            "--model",
            "preset:tiny",
            "--n",
            "2",
            "--steps",
            "1",
            "--cfg",
            "3",
            "--grid",
            str(out),
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    header = text.splitlines()[0]
    assert all(attribute in header for attribute in ATTRIBUTES)
    for row in (
        "| single | 1 | strict | 2 |",
        "| single | 3 | strict | 2 |",
        "| relational | 1 | strict | 2 |",
        "| relational | 3 | strict | 2 |",
    ):
        assert row in text
    assert Image.open(out).size == (4 * 64, 64)


def test_table_marks_attributes_a_form_does_not_state():
    from latentdiffusion.evaluation.shapes_eval import EvalResult

    result = EvalResult("single", 5.0, ["p"], [], {"colour": 1.0, "all": 0.5})
    assert "| single | 5 | strict | 1 | 100.0% | - | - | - | - | - | - | - | 50.0% |" in format_table(
        [result]
    )
    lenient = replace(result, strict=False)
    assert "| single | 5 | lenient | 1 | 100.0% |" in format_table([lenient])


def test_rescore_judges_the_same_images_with_either_checker():
    from latentdiffusion.evaluation.shapes_eval import EvalResult, rescore
    from latentdiffusion.training.shapes import render, sample_scene

    scene = sample_scene(1, "single")
    pixels = np.asarray(render(scene)).astype(np.int16)
    checkerboard = np.where(np.indices((10, 60)).sum(axis=0) % 2 == 0, 12, -12)
    pixels[2:12, 2:62] += checkerboard[..., None].astype(np.int16)  # a textured band across the background
    pixels = np.clip(pixels, 0, 255).astype(np.uint8)
    prompt = format_prompt(describe(scene))
    result = EvalResult("single", 1.0, [prompt], [Image.fromarray(pixels)], {})
    strict, lenient = rescore(result, strict=True), rescore(result, strict=False)
    assert strict.strict and not lenient.strict
    assert strict.scores["flat"] == 0.0 and strict.scores["all"] == 0.0
    assert "flat" not in lenient.scores and lenient.scores["all"] == 1.0


def test_eval_shapes_cli_compare_prints_both_checkers(tmp_path, capsys):
    arguments = ["eval-shapes", "--model", "preset:tiny", "--n", "1", "--steps", "1", "--cfg", "1"]
    assert main([*arguments, "--compare", "--grid", str(tmp_path / "grid.png")]) == 0
    text = capsys.readouterr().out
    for row in (
        "| single | 1 | strict | 1 |",
        "| single | 1 | lenient | 1 |",
        "| relational | 1 | lenient | 1 |",
    ):
        assert row in text
    assert main([*arguments, "--lenient", "--grid", str(tmp_path / "grid.png")]) == 0
    text = capsys.readouterr().out
    assert "| single | 1 | lenient | 1 |" in text and "strict" not in text.split("images in")[0]


def test_eval_shapes_cli_refiner_finishes_the_images(tmp_path, capsys):
    import torch

    import latentdiffusion as ld

    other = ld.load("preset:tiny")
    with torch.no_grad():
        for p in other.unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    other.save(tmp_path / "refiner")
    arguments = ["eval-shapes", "--model", "preset:tiny", "--n", "1", "--steps", "4", "--cfg", "1"]
    grids = {}
    for name, extra in {
        "alone": [],
        "refined": ["--refiner", str(tmp_path / "refiner"), "--refiner-switch", "0.5"],
    }.items():
        grids[name] = tmp_path / f"{name}.png"
        assert main([*arguments, *extra, "--grid", str(grids[name])]) == 0
    text = capsys.readouterr().out
    assert f"refiner {tmp_path / 'refiner'} from 0.5" in text
    alone, refined = (np.asarray(Image.open(grids[k])) for k in ("alone", "refined"))
    assert alone.shape == refined.shape and not np.array_equal(alone, refined)
