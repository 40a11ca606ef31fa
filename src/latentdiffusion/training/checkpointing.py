"""Training checkpoints: one file per saved step, written atomically, the last K kept.

A checkpoint is a ``torch.save`` dict of tensors and plain values only (networks, EMA, optimisers, LR
schedulers, data position, RNG states, the resolved config as JSON), so it loads with
``torch.load(weights_only=True)``. ``atomic_write`` writes a temporary file, fsyncs it and renames it onto
``step-NNNNNNNN.pt``: a run killed at any moment leaves either the new file complete or no new file, and
at worst a stray ``.step-*.tmp`` that the next save removes.
"""

from __future__ import annotations

import json
import random
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentdiffusion.errors import UserError
from latentdiffusion.files import atomic_write

FORMAT = "latentdiffusion-train"
VERSION = 1
CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step-(\d{8})\.pt$")


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINT_DIR / f"step-{step:08d}.pt"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete-looking checkpoint, oldest first (temporary files excluded)."""
    folder = run_dir / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write ``state`` for ``step`` atomically, then delete all but the newest ``keep`` checkpoints."""
    path = checkpoint_path(run_dir, step)
    for stale in path.parent.glob(".step-*.tmp") if path.parent.is_dir() else []:
        stale.unlink(missing_ok=True)  # left by a run killed during a write
    payload = {"format": FORMAT, "version": VERSION, "step": step, **state}
    atomic_write(path, lambda tmp: torch.save(payload, tmp))
    for _, old in list_checkpoints(run_dir)[: -max(1, keep)]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file fails in many ways inside the unpickler
        raise UserError(f"cannot read checkpoint {path}: {error}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("version") != VERSION:
        raise UserError(f"{path} is not a latentdiffusion training checkpoint (version {VERSION})")
    return state


def load_latest(run_dir: Path) -> dict[str, Any]:
    """The newest checkpoint that loads; an unreadable newer one is reported and passed over."""
    found = list_checkpoints(run_dir)
    if not found:
        raise UserError(f"{run_dir} has no checkpoints to resume from ({run_dir / CHECKPOINT_DIR} is empty)")
    for step, path in reversed(found):
        try:
            return load_checkpoint(path)
        except UserError as error:
            warnings.warn(f"skipping checkpoint of step {step}: {error}", stacklevel=2)
    raise UserError(f"none of the {len(found)} checkpoints in {run_dir / CHECKPOINT_DIR} can be read")


# -------------------------------------------------------------------------------------- RNG states


def rng_state() -> dict[str, Any]:
    """The global generators' states (torch CPU, numpy, Python) as checkpoint-safe values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def read_run_options(run_dir: Path, name: str) -> dict[str, Any] | None:
    """The JSON record ``name`` (a task's options, e.g. ``controlnet.json``) of a run folder, or None."""
    path = Path(run_dir) / name
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read {path}: {error}") from None
    if not isinstance(record, dict):
        raise UserError(f"cannot read {path}: not a JSON object")
    return record


def keep_run_options(run_dir: Path, name: str, record: dict[str, Any], resume: bool, what: str) -> None:
    """Save a task's options ``record`` with a new run; a resumed run must bring the same ones (``what``
    names them in the error). A new folder that already holds checkpoints is left to the loop to refuse."""
    record = json.loads(json.dumps(record))  # tuples become lists, as in the saved file
    saved = read_run_options(run_dir, name)
    if resume and saved is not None and saved != record:
        raise UserError(
            f"cannot resume {run_dir} with different {what} options: it was started with "
            f"{json.dumps(saved)}, now {json.dumps(record)}"
        )
    if not resume and not list_checkpoints(run_dir):
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        text = json.dumps(record, indent=2)
        atomic_write(Path(run_dir) / name, lambda tmp: Path(tmp).write_text(text))
