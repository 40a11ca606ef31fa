"""``ldm video walk``: a walk on a tiny random model written as a video and frame PNGs; the forms of
``ldm video``; bad input as one line and exit status 2 before any model is loaded."""

from __future__ import annotations

import re

import pytest

from latentdiffusion.cli.main import build_parser, main
from latentdiffusion.pipelines.metadata import parse_parameters, read_parameters
from latentdiffusion.pipelines.video_io import read_video

WALK = ["video", "walk", "a red circle", "a blue square", "--model", "preset:tiny", "--steps", "1", "--quiet"]


def test_walk_writes_the_video_and_each_frame_with_its_settings(tmp_path, capsys):
    out, frames = tmp_path / "walk.apng", tmp_path / "frames"
    args = [*WALK, "--size", "32", "--seeds", "4,9", "--frames", "3", "--frames-dir", str(frames)]
    assert main([*args, "--scale", "2", "--fps", "5", "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out)
    assert "4 frames; change per frame: mean" in captured.err
    video = read_video(out)
    assert len(video) == 4 and video[0].size == (64, 64)
    pngs = sorted(frames.iterdir())
    assert [p.name for p in pngs] == ["00000.png", "00001.png", "00002.png", "00003.png"]
    settings = parse_parameters(read_parameters(pngs[1]))["settings"]
    assert settings["Walk frame"] == "2/4" and settings["Seed"] == "4" and settings["Variation seed"] == "9"
    assert parse_parameters(read_parameters(pngs[3]))["prompt"] == "a blue square"


def test_walk_writes_mp4(tmp_path):
    pytest.importorskip("av")
    out = tmp_path / "walk.mp4"
    assert main([*WALK, "--size", "32", "--seed", "1", "--frames", "2", "-o", str(out)]) == 0
    assert len(read_video(out)) == 3


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["-o", "walk.avi"], "unknown suffix '.avi'; known: .mp4"),
        (["-o", "walk.gif", "--seeds", "1,2", "--seed", "3"], "--seeds .* or --seed .*, not both"),
        (["-o", "walk.gif", "--seeds", "1,2,3"], "one seed per prompt"),
    ],
)
def test_bad_walks_are_one_line(tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    assert main([*WALK, *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ldm video: error: ")
    assert re.search(message, err)
    assert not list(tmp_path.glob("walk.*"))


def test_bad_seed_list_is_an_argument_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*WALK, "--seeds", "1,x", "-o", "walk.gif"])
    assert exit_info.value.code == 2
    assert "expected seeds separated by commas" in capsys.readouterr().err


def test_a_first_word_that_is_no_form_is_a_prompt_for_animate():
    args = build_parser().parse_args(["video", "a red circle moving right", "--frames", "16"])
    assert args.command == "video" and args.form == "animate"
    assert args.run.__module__ in ("latentdiffusion.cli.video", "latentdiffusion.cli.animate")
    walk = build_parser().parse_args(["video", "walk", "a", "b", "-o", "w.gif"])
    assert (walk.form, walk.prompts, walk.frames) == ("walk", ["a", "b"], 12)
