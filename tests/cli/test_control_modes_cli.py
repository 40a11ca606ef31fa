"""``--control-mode`` and ``--control-resize-mode`` (once, or once per ``--control`` unit) reach the
units, by the A1111 extension's names, its numbers or a short word; a bad one is one line, exit 2."""

import pytest

from latentdiffusion.cli.common import control_settings
from latentdiffusion.cli.main import build_parser, main


def units(*extra: str):
    args = build_parser().parse_args(
        ["generate", "x", "--control", "a:b.png", "--control", "c:d.png", *extra]
    )
    return control_settings(args)


def test_modes_per_unit():
    found = units(
        *("--control-mode", "prompt", "--control-mode", "ControlNet is more important"),
        *("--control-resize-mode", "2"),
    )
    assert [u.modes for u in found] == [
        ("Resize and Fill", "My prompt is more important"),
        ("Resize and Fill", "ControlNet is more important"),
    ]


def test_defaults():
    assert [u.modes for u in units()] == [("Crop and Resize", "Balanced")] * 2


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--control-mode", "loud"], "unknown control mode 'loud'"),
        (["--control-resize-mode", "squash"], "unknown resize mode 'squash'"),
        (["--control-mode", "0", "--control-mode", "1", "--control-mode", "2"], "once each"),
    ],
)
def test_bad_modes_are_one_line(tmp_path, capsys, extra, message):
    args = ["generate", "x", "--model", "preset:tiny", "--steps", "1", "--size", "32", "--quiet"]
    control = ["--control", "cn:hint.png", "--control", "cn:hint.png"]
    assert main([*args, *control, *extra, "-o", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
