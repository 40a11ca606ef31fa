"""ldm eval-shapes end to end on a tiny random model (the numbers are meaningless; the plumbing is not)."""

from PIL import Image

from latentdiffusion.cli.main import main
from latentdiffusion.evaluation.shapes_eval import ATTRIBUTES, eval_prompts, format_table, grid
from latentdiffusion.training.shapes import parse_prompt


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
        "| single | 1 | 2 |",
        "| single | 3 | 2 |",
        "| relational | 1 | 2 |",
        "| relational | 3 | 2 |",
    ):
        assert row in text
    assert Image.open(out).size == (4 * 64, 64)


def test_table_marks_attributes_a_form_does_not_state():
    from latentdiffusion.evaluation.shapes_eval import EvalResult

    result = EvalResult("single", 5.0, ["p"], [], {"colour": 1.0, "all": 0.5})
    assert "| single | 5 | 1 | 100.0% | - | - | - | - | - | 50.0% |" in format_table([result])
