"""Every key and shape of released checkpoint files, from the model configs that the sd-mecha package
ships (``model_configs/*.yaml``), read as text: nothing of sd-mecha runs (its import needs packages the
tests do not install)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

_ENTRY = re.compile(r"^    (\S+): \{shape: \[([\d, ]*)\], dtype: \w+(, optional: true)?\}$")


def released_file_keys(config_name: str) -> dict[str, tuple[tuple[int, ...], bool]]:
    """key -> (shape, optional) of the file that sd-mecha's ``config_name`` (e.g. "sdxl-sgm") lists;
    skips the test where sd-mecha is not installed."""
    spec = importlib.util.find_spec("sd_mecha")
    if spec is None or spec.origin is None:
        pytest.skip(f"sd-mecha (its {config_name} key list) is not installed")
    path = Path(spec.origin).parent / "extensions" / "builtin" / "model_configs" / f"{config_name}.yaml"
    entries = {}
    for line in path.read_text().splitlines():
        match = _ENTRY.match(line)
        if match:
            shape = tuple(int(n) for n in match.group(2).split(",") if n.strip())
            entries[match.group(1)] = (shape, match.group(3) is not None)
    return entries
