"""``ldm video animate`` / ``ldm video PROMPT``: a clip from a tiny random model and motion module written as
a video and frame PNGs; bad input as one line and exit status 2."""

from __future__ import annotations

import re

import pytest
import torch

from latentdiffusion.checkpoints.motion_keys import save_motion_modules
from latentdiffusion.cli.main import main
from latentdiffusion.models.motion import MotionConfig, MotionModules
from latentdiffusion.pipelines.metadata import parse_parameters, read_parameters
from latentdiffusion.pipelines.video_io import read_video

TINY_ARGS = ["--model", "preset:tiny", "--steps", "1", "--size", "32", "--quiet"]


@pytest.fixture(scope="module")
def motion_file(tmp_path_factory):
    """A v1-shaped (no mid block, 24 position encodings) motion module for the tiny U-Net."""
    torch.manual_seed(0)
    modules = MotionModules(MotionConfig(block_channels=(32, 64), layers=1, max_frames=24))
    path = tmp_path_factory.mktemp("motion") / "mm_tiny_v1.safetensors"
    return save_motion_modules(modules, path)


def test_a_prompt_makes_a_clip_with_its_frames(tmp_path, capsys, motion_file):
    out, frames = tmp_path / "clip.apng", tmp_path / "frames"
    args = ["video", "a red circle moving right", "--motion-module", str(motion_file), *TINY_ARGS]
    assert main([*args, "--frames", "5", "--seed", "3", "--frames-dir", str(frames), "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert len(read_video(out)) >= 1  # identical neighbours may merge in APNG
    pngs = sorted(frames.iterdir())
    assert len(pngs) == 5
    settings = parse_parameters(read_parameters(pngs[0]))["settings"]
    assert settings["Motion module"] == motion_file.name and settings["Frames"] == "5"
    assert settings["Seed"] == "3"


def test_long_clips_go_in_windows(tmp_path, motion_file):
    out = tmp_path / "long.gif"
    args = ["video", "animate", "a square", "--motion-module", str(motion_file), *TINY_ARGS]
    assert main([*args, "--frames", "12", "--context", "8", "--overlap", "2", "-o", str(out)]) == 0
    assert out.is_file()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["-o", "clip.avi"], "unknown suffix '.avi'; known: .mp4"),
        (["--frames", "30", "--context", "0", "-o", "clip.gif"], "at most 24 at once"),
        (["--frames", "30", "--context", "8", "--overlap", "8", "-o", "clip.gif"], "overlap must be"),
        (["--motion-module", "missing.ckpt", "-o", "clip.gif"], "missing.ckpt not found"),
    ],
)
def test_bad_clips_are_one_line(tmp_path, capsys, monkeypatch, motion_file, extra, message):
    monkeypatch.chdir(tmp_path)
    args = ["video", "a square", "--motion-module", str(motion_file), *TINY_ARGS, *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ldm video: error: ")
    assert re.search(message, err)
    assert not list(tmp_path.glob("clip.*"))


def test_no_motion_module_is_one_line(capsys):
    assert main(["video", "a square", *TINY_ARGS]) == 2
    assert "give --motion-module FILE" in capsys.readouterr().err
