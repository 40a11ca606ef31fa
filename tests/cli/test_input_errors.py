"""Hostile and malformed input on the command line (issue #16): every error that input causes is one line
on stderr and exit status 2, found before the work it would spoil; a bug in ``ldm`` keeps its traceback."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest
from PIL import Image

from latentdiffusion.cli.main import main

TINY = "preset:tiny"


def one_line_error(capsys, code: int, *expected: str) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    for text in expected:
        assert text in err, err
    return err


def exit_code(args: list[str]) -> int:
    """``main(args)``, with argparse's SystemExit as its exit status."""
    try:
        return main(args)
    except SystemExit as exit_info:
        return int(exit_info.code)


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if a model is loaded: the error must be found before that."""
    import latentdiffusion

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(latentdiffusion, "load", load)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seed", str(2**64)], "expected a seed from 0 to"),
        (["--seed", "-5"], "expected a seed from 0 to"),
        (["--seed", "1e3"], "expected a whole number"),
        (["--variation-seed", str(2**70)], "expected a seed from 0 to"),
        (["--steps", "0"], "expected a number >= 1"),
    ],
)
def test_argument_errors_are_one_line(capsys, no_model, args, message):
    one_line_error(capsys, exit_code(["generate", "p", *args]), message, "ldm generate --help")


def test_seed_minus_one_is_random_and_the_largest_seed_works(tmp_path, capsys):
    common = ["generate", "p", "--model", TINY, "--steps", "1", "--size", "32", "--quiet"]
    assert main([*common, "--seed", "-1", "-o", str(tmp_path / "a.png")]) == 0
    assert main([*common, "--seed", str(2**63 - 1), "-o", str(tmp_path / "b.png")]) == 0


def test_library_refuses_seeds_beyond_its_generators(capsys):
    import latentdiffusion as ld
    from latentdiffusion.errors import UserError

    pipe = ld.load(TINY)
    with pytest.raises(UserError, match="seed must be at most"):
        pipe.generate("p", steps=1, width=32, height=32, seed=2**64)


@pytest.mark.parametrize("command", ["generate", "img2img"])
def test_output_problems_are_found_before_loading_the_model(tmp_path, capsys, no_model, command):
    picture = tmp_path / "in.png"
    Image.new("RGB", (32, 32)).save(picture)
    inputs = [str(picture)] if command == "img2img" else []
    a_file = tmp_path / "file"
    a_file.write_text("")
    cases = [
        (["-o", str(tmp_path)], "is a folder"),
        (["-o", str(a_file / "x.png")], "cannot write"),
        (["--outdir", str(a_file)], "it is a file, not a folder"),
        (["--outdir", str(a_file / "deeper" / "still")], "it is a file, not a folder"),
    ]
    for output, message in cases:
        one_line_error(capsys, main([command, *inputs, "p", "--model", TINY, *output]), message)


def test_an_unwritable_folder_is_found_before_loading(tmp_path, capsys, no_model, monkeypatch):
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)  # as a read-only folder would, even for root
    code = main(["generate", "p", "--model", TINY, "--outdir", str(tmp_path / "out")])
    one_line_error(capsys, code, "cannot write in", "Permission denied")


def test_serve_output_dir_naming_a_file_is_one_line_before_loading(tmp_path, capsys, no_model):
    pytest.importorskip("fastapi")
    a_file = tmp_path / "file"
    a_file.write_text("")
    code = main(["serve", "--model", TINY, "--output-dir", str(a_file)])
    one_line_error(capsys, code, "--output-dir", "not a folder")


def test_a_full_disk_while_saving_is_one_line(tmp_path, capsys, monkeypatch):
    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Image.Image, "save", full)
    args = ["generate", "p", "--model", TINY, "--steps", "1", "--size", "32", "--quiet"]
    one_line_error(capsys, main([*args, "-o", str(tmp_path / "x.png")]), "No space left on device")
    assert not list(tmp_path.iterdir())  # no partial file left behind


def test_file_system_and_encoding_errors_from_anywhere_are_one_line(capsys, monkeypatch):
    import latentdiffusion

    for error, message in [
        (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "model.safetensors"), "No space left on device"),
        (IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), "m"), "Is a directory: m"),
    ]:

        def load(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(latentdiffusion, "load", load)
        one_line_error(capsys, main(["generate", "p", "--model", "m"]), message)

    def undecodable(*args, **kwargs):
        b"\xff\xfe config".decode("utf-8")

    monkeypatch.setattr(latentdiffusion, "load", undecodable)
    one_line_error(capsys, main(["generate", "p", "--model", "m"]), "not valid utf-8")

    def not_json(*args, **kwargs):
        import json

        json.loads('{"unet": {')

    monkeypatch.setattr(latentdiffusion, "load", not_json)
    one_line_error(capsys, main(["generate", "p", "--model", "m"]), "not valid JSON", "line 1")

    def bug(*args, **kwargs):
        raise ValueError("a plain ValueError is a bug, not input")

    monkeypatch.setattr(latentdiffusion, "load", bug)
    with pytest.raises(ValueError, match="plain ValueError"):
        main(["generate", "p", "--model", "m"])


def test_a_bug_keeps_its_traceback_and_exit_status_1(tmp_path):
    code = (
        "import sys, latentdiffusion\n"
        "def load(*a, **k): return 1 / 0\n"
        "latentdiffusion.load = load\n"
        "from latentdiffusion.cli.main import main\n"
        "sys.exit(main(['generate', 'p', '--model', 'm', '--outdir', sys.argv[1]]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "ZeroDivisionError" in result.stderr


def test_a_prompt_with_a_lone_surrogate_is_one_line(tmp_path, capsys):
    # what Python makes of invalid UTF-8 in a command-line argument (surrogateescape)
    prompt = b"caf\xe9".decode("utf-8", "surrogateescape")
    args = ["generate", prompt, "--model", TINY, "--steps", "1", "--size", "32", "--quiet"]
    one_line_error(capsys, main([*args, "-o", str(tmp_path / "x.png")]), "not valid Unicode")


def test_an_image_over_the_pixel_limit_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    picture = tmp_path / "big.png"
    Image.new("RGB", (40, 40)).save(picture)  # 1600 pixels: over the limit, under twice it
    args = ["img2img", str(picture), "p", "--model", TINY, "--steps", "1", "--quiet"]
    one_line_error(capsys, main([*args, "-o", str(tmp_path / "x.png")]), "more than 1000 pixels")


def test_a_latent_that_is_not_finite_is_a_warning_not_a_silent_black_image(tmp_path, capsys):
    args = ["generate", "p", "--model", TINY, "--steps", "1", "--size", "32", "--quiet", "--cfg", "1e308"]
    assert main([*args, "-o", str(tmp_path / "x.png")]) == 0
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "NaN or Inf" in err and "guidance scale (1e+308)" in err
    assert len(err.strip().splitlines()) == 1


def test_a_deeply_nested_prompt_is_fast_and_its_overflowing_weights_are_a_warning(tmp_path, capsys):
    import time

    start = time.monotonic()
    args = ["generate", "(a" * 30_000, "--model", TINY, "--steps", "1", "--size", "32", "--quiet"]
    assert main([*args, "-o", str(tmp_path / "x.png")]) == 0
    assert time.monotonic() - start < 30  # minutes before
    err = capsys.readouterr().err
    assert "NaN or Inf" in err and len(err.strip().splitlines()) == 1  # 1.1**30000 is inf


def test_a_full_disk_during_training_is_one_line(tmp_path, capsys, monkeypatch):
    from latentdiffusion.training import loop

    def full(path, write):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(loop, "atomic_write", full)
    args = ["train-autoencoder", "--preset", "tiny-autoencoder", "-o", str(tmp_path / "run"), "--max_steps=1"]
    code = main([*args, "--quiet", "--sample.prompts=", "--checkpoint_every=0"])
    one_line_error(capsys, code, "No space left on device", "config.json")
