"""The motion module shipped for the default model: the file (original layout, fp16, small, fits the default
U-Net), how it is found by name or by leaving the module out (Python, CLI, server), and what is refused."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

import latentdiffusion.pipelines.loading as loading
from latentdiffusion.checkpoints.motion_keys import load_motion_modules
from latentdiffusion.cli.main import main
from latentdiffusion.errors import UserError
from latentdiffusion.models.motion import TemporalTransformer
from latentdiffusion.pipelines.animate import (
    motion_module_name,
    motion_words_dir,
    resolve_motion_module,
    shipped_motion_module,
    still_prompt_for,
)
from latentdiffusion.pipelines.metadata import parse_parameters, read_parameters
from latentdiffusion.serving.settings import FieldError
from latentdiffusion.serving.video_api import find_module
from latentdiffusion.training.motion import MotionOptions
from latentdiffusion.training.moving_shapes import start_prompt

MAX_BYTES = 12 * 2**20
PROMPT = "a red circle moving right on a blue background"


@pytest.fixture(scope="module")
def default_pipe():
    import latentdiffusion as ld

    return ld.load("default")


def test_the_shipped_module_is_small_fp16_in_the_original_layout():
    path = shipped_motion_module()
    assert path.stat().st_size < MAX_BYTES
    with safe_open(str(path), "pt") as file:
        keys = list(file.keys())
        dtypes = {file.get_slice(key).get_dtype() for key in keys}
    assert dtypes == {"F16"}
    assert all(".motion_modules." in key and ".temporal_transformer." in key for key in keys)
    assert "down_blocks.0.motion_modules.0.temporal_transformer.proj_out.weight" in keys
    assert (
        "down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.pos_encoder.pe"
        in keys
    )
    assert load_motion_modules(path).config.max_frames == 32  # read as a v3-shaped module


# How the shipped module was trained (docs/video.md): what its file must say about itself.
SHIPPED_OPTIONS = MotionOptions(
    text_attention=True, noise_correlation=2.0, first_frame=True, spacetime_conv=True
)
SHIPPED_WORDS = {
    "moving",
    "bouncing",
    "left",
    "right",
    "up",
    "down",
    "slowly",
    "quickly",
    "growing",
    "shrinking",
}


def test_the_shipped_module_fits_the_default_model_and_has_learned(default_pipe):
    modules = load_motion_modules(shipped_motion_module())
    expected = SHIPPED_OPTIONS.motion_config(default_pipe.config)
    assert modules.config == expected
    modules.config.check_fits(default_pipe.unet.config, "the motion module")
    transformers = [m for m in modules.modules() if isinstance(m, TemporalTransformer)]
    # a fresh module's output projection and space-time convolution are zero
    zero_at_start = [w for m in transformers for w in (m.proj_out.weight, m.spacetime_conv.conv.weight)]
    assert all(p.abs().max() > 0 for p in zero_at_start)  # trained


def test_the_words_learned_with_it_ship_beside_it():
    folder = motion_words_dir(shipped_motion_module())
    assert folder is not None
    assert {path.stem for path in folder.glob("*.safetensors")} == SHIPPED_WORDS


def test_no_module_on_the_default_model_is_the_shipped_one(default_pipe):
    clip = default_pipe.animate(PROMPT, frames=2, steps=1, seed=1)
    assert len(clip) == 2
    settings = parse_parameters(clip[0].info["parameters"])["settings"]
    assert settings["Motion module"] == "default"
    again = default_pipe.animate(PROMPT, motion_module="default", frames=2, steps=1, seed=1)
    assert [f.tobytes() for f in clip] == [f.tobytes() for f in again]


def test_a_moving_shapes_clip_starts_where_its_motion_has_room(default_pipe):
    import numpy as np

    options = dict(steps=2, seed=3)
    clip = default_pipe.animate(PROMPT, frames=2, **options)
    still_prompt = start_prompt(PROMPT, 3)
    assert still_prompt.endswith("left on a blue background")  # it moves right: it starts at the left
    assert parse_parameters(clip[0].info["parameters"])["settings"]["First frame prompt"] == still_prompt
    still = np.asarray(default_pipe.generate(still_prompt, **options)[0], dtype=np.int16)
    # the same latent; decoded in a batch of frames, which in reduced precision moves a level or two
    assert np.abs(np.asarray(clip[0], dtype=np.int16) - still).max() <= 2
    other = np.asarray(default_pipe.generate(PROMPT, **options)[0], dtype=np.int16)
    assert np.abs(np.asarray(clip[0], dtype=np.int16) - other).max() > 16  # not the clip prompt's still


def test_the_still_prompt_is_the_worlds_start_only_for_its_prompts_on_the_default_model():
    config = load_motion_modules(shipped_motion_module()).config
    assert still_prompt_for("default", config, PROMPT, 3, None, False) == start_prompt(PROMPT, 3)
    assert still_prompt_for("default", config, PROMPT, 3, "a red circle", False) == "a red circle"
    assert still_prompt_for("default", config, "a red circle", 3, None, False) == "a red circle"
    assert still_prompt_for("other", config, PROMPT, 3, None, False) == PROMPT
    assert still_prompt_for("default", config, PROMPT, 3, None, True) is None  # a given first image


def test_names_resolve_to_the_shipped_file(tmp_path, monkeypatch):
    shipped = shipped_motion_module()
    assert resolve_motion_module("default", None) == shipped
    assert resolve_motion_module("other", "default") == shipped
    assert resolve_motion_module("other", "mm.ckpt") == "mm.ckpt"
    assert (motion_module_name(None), motion_module_name("default")) == ("default", "default")
    assert motion_module_name(Path("x/mm.ckpt")) == "mm.ckpt"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "default").mkdir()  # a folder of that name is what it names
    assert resolve_motion_module("other", "default") == "default"


def test_other_models_need_a_module():
    with pytest.raises(UserError, match="model 'tiny' has no shipped motion module: give one"):
        resolve_motion_module("tiny", None)


def test_a_missing_install_is_one_message(tmp_path, monkeypatch):
    monkeypatch.setattr(loading.resources, "files", lambda package: tmp_path)
    with pytest.raises(UserError, match="the default motion module is not installed"):
        resolve_motion_module("default", None)


def test_the_cli_animates_the_default_model_without_a_module(tmp_path, capsys):
    out, frames = tmp_path / "clip.gif", tmp_path / "frames"
    args = ["video", PROMPT, "--frames", "2", "--steps", "1", "--quiet", "--frames-dir", str(frames)]
    assert main([*args, "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    pngs = sorted(frames.iterdir())
    assert len(pngs) == 2
    assert parse_parameters(read_parameters(pngs[0]))["settings"]["Motion module"] == "default"
    still = "a small red circle in the top left on a blue background"
    assert main([*args, "--first-frame-prompt", still, "-o", str(out)]) == 0
    settings = parse_parameters(read_parameters(sorted(frames.iterdir())[0]))["settings"]
    assert settings["First frame prompt"] == still


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model", "preset:tiny"], "give --motion-module FILE"),
        (["--model", "preset:tiny", "--motion-module", "default"], "made for another|does not fit|widths"),
    ],
)
def test_bad_cli_input_is_one_line(tmp_path, capsys, monkeypatch, extra, message):
    import re

    monkeypatch.chdir(tmp_path)
    args = ["video", PROMPT, "--frames", "2", "--steps", "1", "--size", "32", "--quiet", *extra]
    assert main([*args, "-o", "clip.gif"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ldm video: error: ")
    assert re.search(message, err), err
    assert not list(tmp_path.glob("clip.*"))


def server_state(model_name: str, motion_dir: Path | None = None) -> SimpleNamespace:
    pipe = SimpleNamespace(components=SimpleNamespace(name=model_name))
    return SimpleNamespace(pipe=pipe, settings=SimpleNamespace(motion_dir=motion_dir))


def test_the_server_offers_the_shipped_module_on_the_default_model(tmp_path):
    assert find_module(server_state("default"), "Default") == shipped_motion_module()
    with pytest.raises(FieldError, match="offers no motion modules"):
        find_module(server_state("tiny"), "default")
    (tmp_path / "default.safetensors").write_bytes(b"")  # a module of the folder comes first
    assert find_module(server_state("default", tmp_path), "default") == tmp_path / "default.safetensors"


def test_a_trained_module_changes_the_clip(default_pipe):
    """Seeded the same, the shipped module and a fresh (identity) one make different clips."""
    from latentdiffusion.models.motion import MotionModules

    torch.manual_seed(0)
    fresh = MotionModules(MotionOptions().motion_config(default_pipe.config))
    ours = default_pipe.animate(PROMPT, frames=4, steps=2, seed=3)
    identity = default_pipe.animate(PROMPT, motion_module=fresh, frames=4, steps=2, seed=3)
    assert [f.tobytes() for f in ours] != [f.tobytes() for f in identity]
