"""``ldm bench latent-vs-pixel --curves``: the compute-curves mode through ``ldm`` (the options and the code
``benchmarks/latent_vs_pixel.py`` uses), a toy stage run, extended with --resume and reported, and bad
options refused in one line before any training."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

from latentdiffusion.cli.bench import add_latent_vs_pixel_options
from latentdiffusion.cli.main import build_parser, main
from latentdiffusion.evaluation import latent_vs_pixel as lvp
from latentdiffusion.evaluation import latent_vs_pixel_curves as curves

ROOT = Path(__file__).resolve().parents[2]
BENCH = ["bench", "latent-vs-pixel"]


def exit_code(args: list[str]) -> int:
    """``main(args)``, with argparse's SystemExit as its exit status."""
    try:
        return main(args)
    except SystemExit as exit_info:
        return int(exit_info.code)


def one_line_error(capsys, code: int, *expected: str) -> None:
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in err, err


def options(parser: argparse.ArgumentParser) -> set[str]:
    return {flag for action in parser._actions for flag in action.option_strings}


def test_ldm_and_the_benchmark_script_take_the_same_options():
    spec = importlib.util.spec_from_file_location("lvp_script", ROOT / "benchmarks" / "latent_vs_pixel.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.add_latent_vs_pixel_options is add_latent_vs_pixel_options  # one definition for both
    bench = build_parser()._subparsers._group_actions[0].choices["bench"]
    study = bench._subparsers._group_actions[0].choices["latent-vs-pixel"]
    expected = {"--curves", "--stage", "--until", "--resume", "--results", "--budget", "--out", "--docs"}
    assert expected <= options(study)
    reference = argparse.ArgumentParser()
    add_latent_vs_pixel_options(reference)
    assert options(study) == options(reference)


def test_a_toy_curve_runs_resumes_extends_and_reports(tmp_path, monkeypatch, capsys):
    out, results, docs = tmp_path / "runs", tmp_path / "results", tmp_path / "docs"
    places = ["--out", str(out), "--results", str(results), "--docs", str(docs)]
    curve = [*BENCH, "--curves", "--budget", "toy", "--quiet", *places]

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(curves, "first_stage", interrupt)  # killed in its first round
    assert main([*curve, "--stage", "f4", "--until", "1.1e9"]) == 130
    assert capsys.readouterr().err == "ldm bench: interrupted\n"
    monkeypatch.undo()
    one_line_error(capsys, main([*curve, "--stage", "f4", "--until", "1.1e9"]), "pass --resume")
    assert main([*curve, "--stage", "f4", "--until", "1.1e9", "--resume"]) == 0
    first = json.loads((results / "f4.json").read_text())["points"]
    assert first and (results / curves.CLASSIFIER_WEIGHTS).is_file()
    assert main([*curve, "--stage", "f4", "--until", "3.2e9", "--resume"]) == 0
    extended = json.loads((results / "f4.json").read_text())["points"]
    assert extended[: len(first)] == first and len(extended) > len(first)
    (docs / "latent-vs-pixel.md").unlink()
    assert main([*curve, "--stage", "report"]) == 0  # rewrites the section from the results files alone
    page = (docs / "latent-vs-pixel.md").read_text()
    assert f"ldm bench latent-vs-pixel --curves --budget toy --results {results}" in page
    assert "| 4 | 4x16x16 |" in page


@pytest.fixture
def no_training(monkeypatch):
    """Fails the test if anything trains: a bad option must be refused before that."""

    def refuse(*args, **kwargs):
        raise AssertionError("training started before the options were checked")

    monkeypatch.setattr(curves, "classifier_stage", refuse)
    monkeypatch.setattr(lvp, "run_training", refuse)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--stage", "f3", "--until", "1e14"], "invalid choice: 'f3'"),
        (["--stage", "f4", "--until=-1e14"], "expected a positive number of FLOPs, got '-1e14'"),
        (["--stage", "f4", "--until", "-5"], "expected a positive number of FLOPs, got '-5'"),
        (["--stage", "f4", "--until", "0"], "expected a positive number of FLOPs"),
        (["--stage", "f4", "--until", "lots"], "expected a number of FLOPs such as 3e15, got 'lots'"),
        (["--stage", "f4", "--until", "inf"], "expected a number of FLOPs such as 3e15"),
    ],
)
def test_bad_values_are_one_line_argument_errors(capsys, no_training, args, message):
    one_line_error(capsys, exit_code([*BENCH, "--curves", *args]), message, "--help")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--curves", "--stage", "f4", "--until", "1e14", "--resume"], "no f=4 curve to continue"),
        (["--curves", "--stage", "f8"], "--stage f8 needs --until FLOPS"),
        (["--curves", "--stage", "f4", "--until", "1e12"], "below the first checkpoint"),
        (["--curves", "--stage", "classifier", "--until", "1e14"], "belong to a curve stage"),
        (["--curves", "--resume"], "not report"),
        (["--stage", "f4", "--until", "1e14"], "belong to --curves"),
        (["--resume"], "belong to --curves"),
    ],
)
def test_bad_curve_options_are_refused_before_any_work(tmp_path, capsys, no_training, args, message):
    places = ["--out", str(tmp_path / "runs"), "--results", str(tmp_path / "results")]
    code = exit_code([*BENCH, *args, *places, "--docs", str(tmp_path / "docs")])
    one_line_error(capsys, code, "ldm bench: error:", message)
    assert not (tmp_path / "results").exists() and not (tmp_path / "docs").exists()
