import os
import stat
from pathlib import Path

import pytest

from latentdiffusion.files import atomic_write


def test_atomic_write_gives_usual_permissions(tmp_path):
    path = tmp_path / "a.txt"
    old = os.umask(0o022)
    try:
        atomic_write(path, lambda tmp: Path(tmp).write_text("x"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_failed_write_leaves_previous_file_and_no_temporary(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")

    def fail(tmp):
        Path(tmp).write_text("partial")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(path, fail)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]
