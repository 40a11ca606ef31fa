import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from latentdiffusion.errors import UserError
from latentdiffusion.training import checkpointing
from latentdiffusion.training.checkpointing import (
    list_checkpoints,
    load_checkpoint,
    load_latest,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


def state(value: float) -> dict:
    return {"networks": {"w": torch.full((4,), value)}, "config": "{}"}


def test_keeps_the_last_k(tmp_path):
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, state(step), keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4]
    assert load_latest(tmp_path)["networks"]["w"][0].item() == 4.0


def test_exception_inside_the_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, state(1.0), keep=3)

    def partial_save(obj, path):
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of torch.save

    monkeypatch.setattr(torch, "save", partial_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, state(2.0), keep=3)
    monkeypatch.undo()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]
    assert not list((tmp_path / "checkpoints").glob(".*.tmp"))
    assert load_latest(tmp_path)["step"] == 1


def test_kill_during_the_write_leaves_the_previous_checkpoint(tmp_path):
    save_checkpoint(tmp_path, 1, state(1.0), keep=3)
    # A child process starts writing step 2 with a write that stalls half way; SIGKILL it there.
    code = textwrap.dedent(f"""
        import time, torch
        from latentdiffusion.training.checkpointing import save_checkpoint
        def slow_save(obj, path):
            open(path, "wb").write(b"PK partial")
            print("writing", flush=True)
            time.sleep(60)
        torch.save = slow_save
        save_checkpoint(__import__("pathlib").Path({str(tmp_path)!r}), 2, {{"w": torch.ones(2)}}, keep=3)
    """)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "writing"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert list((tmp_path / "checkpoints").glob(".step-*.tmp"))  # the stray partial file
    assert load_latest(tmp_path)["step"] == 1
    save_checkpoint(tmp_path, 3, state(3.0), keep=3)  # the next save clears the stray file
    assert not list((tmp_path / "checkpoints").glob(".step-*.tmp"))


def test_unreadable_newest_checkpoint_falls_back(tmp_path):
    save_checkpoint(tmp_path, 1, state(1.0), keep=3)
    path = save_checkpoint(tmp_path, 2, state(2.0), keep=3)
    path.write_bytes(path.read_bytes()[:100])  # truncated by a disk problem
    with pytest.warns(UserWarning, match="skipping checkpoint of step 2"):
        assert load_latest(tmp_path)["step"] == 1
    with pytest.raises(UserError, match="cannot read checkpoint"):
        load_checkpoint(path)
    with pytest.raises(UserError, match="no checkpoints"):
        load_latest(tmp_path / "empty")


def test_rng_state_round_trip(tmp_path):
    import random

    import numpy as np

    saved = rng_state()
    save_checkpoint(tmp_path, 1, {"rng": saved}, keep=1)
    expected = (torch.rand(2), np.random.rand(), random.random())
    set_rng_state(load_latest(tmp_path)["rng"])
    assert torch.equal(torch.rand(2), expected[0])
    assert np.random.rand() == expected[1] and random.random() == expected[2]
    assert checkpointing.VERSION == 1


def test_run_options_are_saved_once_and_must_match_on_resume(tmp_path):
    from latentdiffusion.training.checkpointing import keep_run_options, read_run_options

    assert read_run_options(tmp_path, "task.json") is None
    keep_run_options(tmp_path / "run", "task.json", {"channels": (16, 32)}, resume=False, what="task")
    assert read_run_options(tmp_path / "run", "task.json") == {"channels": [16, 32]}
    keep_run_options(tmp_path / "run", "task.json", {"channels": (16, 32)}, resume=True, what="task")  # same
    with pytest.raises(UserError, match=r"different task options: it was started with \{\"channels\""):
        keep_run_options(tmp_path / "run", "task.json", {"channels": (8,)}, resume=True, what="task")
    (tmp_path / "run" / "task.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="not a JSON object"):
        read_run_options(tmp_path / "run", "task.json")
