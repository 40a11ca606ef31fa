"""``ldm generate --fast``: precision auto + DeepCache at the fast interval + backend auto; explicit options
win."""

from __future__ import annotations

import pytest

from latentdiffusion.cli.generate import deep_cache_interval
from latentdiffusion.cli.main import build_parser, main
from latentdiffusion.pipelines.deepcache import FAST_CACHE_INTERVAL
from latentdiffusion.pipelines.metadata import parse_parameters, read_parameters


def parse(*options: str):
    return build_parser().parse_args(["generate", "a red circle", *options])


def test_fast_is_precision_auto_and_the_fast_cache_interval() -> None:
    args = parse("--fast")
    assert (args.precision, deep_cache_interval(args)) == ("auto", FAST_CACHE_INTERVAL)
    plain = parse()
    assert (plain.precision, deep_cache_interval(plain)) == ("auto", None)


def test_fast_lets_auto_choose_the_backend_and_an_explicit_one_wins() -> None:
    from latentdiffusion.cli.common import chosen_backend

    assert chosen_backend(parse("--fast")) == "auto"
    assert chosen_backend(parse()) == "torch"
    assert chosen_backend(parse("--fast", "--backend", "torch")) == "torch"
    assert chosen_backend(parse("--backend", "openvino")) == "openvino"


def test_explicit_precision_and_deepcache_win_over_fast() -> None:
    args = parse("--fast", "--precision", "fp32", "--deepcache", "2")
    assert (args.precision, deep_cache_interval(args)) == ("fp32", 2)
    args = parse("--fast", "--deepcache", "1")
    assert deep_cache_interval(args) == 1


def test_fast_help_names_the_interval(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert f"--precision auto --deepcache {FAST_CACHE_INTERVAL}" in help_text


def test_fast_image_records_deepcache(tmp_path, monkeypatch) -> None:
    # --fast lets "auto" pick OpenVINO on a CPU with native bf16: its converted U-Nets go to tmp_path
    monkeypatch.setenv("LATENTDIFFUSION_OPENVINO_CACHE", str(tmp_path / "openvino"))
    out = tmp_path / "fast.png"
    args = ["generate", "a red circle", "--model", "preset:tiny", "--steps", "4", "--size", "32", "--quiet"]
    assert main([*args, "--seed", "1", "--fast", "-o", str(out)]) == 0
    settings = parse_parameters(read_parameters(out))["settings"]
    assert settings["DeepCache"] == str(FAST_CACHE_INTERVAL)
