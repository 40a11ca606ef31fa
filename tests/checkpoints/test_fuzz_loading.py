"""A bounded, seeded fuzz test of the loader (issue #16): random mutations of a valid tiny safetensors
single file, diffusers folder and CompVis yaml. Every case must end in a load or in one UserError, each
within seconds and all of them under an address-space limit, in one subprocess."""

from __future__ import annotations

import contextlib
import json
import os
import random
import struct
from pathlib import Path

from tests.checkpoints.test_hostile_input import (
    SD1,
    header_of,
    linked_copy,
    run_bounded,
    write_with_header,
)

from latentdiffusion.checkpoints.compvis import compvis_yaml
from latentdiffusion.checkpoints.diffusers_folder import save_diffusers
from latentdiffusion.checkpoints.safe_io import save_safetensors
from latentdiffusion.checkpoints.single_file import save_single_file, single_file_state
from latentdiffusion.components import build_components

SEED = 16
CASES = {"safetensors": 40, "diffusers": 30, "yaml": 30}
VALUES = [
    0,
    -1,
    1,
    3,
    2**31,
    2**64,
    10**6,
    10**9,
    2.5,
    1e308,
    float("inf"),
    float("nan"),
    True,
    None,
    "x",
    [],
    {},
]
VALUES += [[0], [1, 2], [[[]]], {"a": 1}, [10**6] * 3, -0.0]
YAML_VALUES = [
    "0",
    "-1",
    "1000000000",
    "2.5",
    "true",
    "null",
    "[",
    "x",
    "[1, [2]]",
    ".inf",
    ".nan",
    "1e400",
    "{}",
]


def leaves(data, path=()):
    """Every (path, value) of a JSON value, containers included."""
    yield path, data
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        yield from leaves(value, (*path, key))


def mutate_json(data, rng: random.Random):
    paths = [p for p, _ in leaves(data) if p]
    for _ in range(rng.randint(1, 3)):
        *parents, last = rng.choice(paths)
        target = data
        for key in parents:
            target = target[key]
        with contextlib.suppress(TypeError, IndexError, KeyError):
            target[last] = rng.choice(VALUES)
        paths = [p for p, _ in leaves(data) if p]
    return data


def flip_bytes(raw: bytes, rng: random.Random, start: int, end: int) -> bytes:
    raw = bytearray(raw)
    for _ in range(rng.randint(1, 4)):
        raw[rng.randrange(start, end)] = rng.randrange(256)
    return bytes(raw)


def safetensors_case(source: Path, target: Path, rng: random.Random) -> Path:
    raw = source.read_bytes()
    header, data = header_of(source)
    kind = rng.choice(["flip-header", "truncate", "entry", "config", "data", "length"])
    if kind == "flip-header":
        target.write_bytes(flip_bytes(raw, rng, 8, 8 + len(raw) - len(data)))
    elif kind == "truncate":
        target.write_bytes(raw[: rng.randrange(len(raw))])
    elif kind == "length":
        target.write_bytes(struct.pack("<Q", rng.choice([0, 7, 2**63, len(raw)])) + raw[8:])
    elif kind == "data":
        target.write_bytes(flip_bytes(raw, rng, len(raw) - len(data), len(raw)))
    elif kind == "entry":
        name = rng.choice([k for k in header if k != "__metadata__"])
        header[name] = mutate_json({"entry": header[name]}, rng)["entry"]
        write_with_header(target, header, data)
    else:
        config = json.loads(header["__metadata__"]["latentdiffusion.config"])
        header["__metadata__"]["latentdiffusion.config"] = json.dumps(mutate_json(config, rng))
        write_with_header(target, header, data)
    return target


def diffusers_case(source: Path, target: Path, rng: random.Random) -> Path:
    folder = linked_copy(source, target)
    files = [p for p in folder.rglob("*.json") if p.name != "vocab.json"]
    path = rng.choice(files)
    text = path.read_text()
    path.unlink()
    if rng.random() < 0.25:
        raw = text.encode()
        path.write_bytes(flip_bytes(raw, rng, 0, len(raw)))
    else:
        path.write_text(json.dumps(mutate_json(json.loads(text), rng)))
    return folder


def yaml_case(source: Path, target: Path, rng: random.Random) -> Path:
    os.link(source, target)
    lines = source.with_suffix(".yaml").read_text().splitlines()
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(lines))
        key, colon, _ = lines[i].partition(":")
        choice = rng.random()
        if choice < 0.7 and colon:
            lines[i] = f"{key}: {rng.choice(YAML_VALUES)}"
        elif choice < 0.85:
            del lines[i]
        else:
            lines[i] = " " * rng.randrange(8) + lines[i].lstrip()
    target.with_suffix(".yaml").write_text("\n".join(lines) + "\n")
    return target


def test_random_mutations_end_in_a_load_or_a_user_error(tmp_path):
    components = build_components(SD1, seed=0)
    good = tmp_path / "good.safetensors"
    save_single_file(components, good)
    bare = tmp_path / "bare.safetensors"
    save_safetensors(single_file_state(components), bare)
    bare.with_suffix(".yaml").write_text(compvis_yaml(SD1, "hf"))
    save_diffusers(components, tmp_path / "diffusers")
    rng = random.Random(SEED)
    cases = []
    for i in range(CASES["safetensors"]):
        cases.append(safetensors_case(good, tmp_path / f"s{i}.safetensors", rng))
    for i in range(CASES["diffusers"]):
        cases.append(diffusers_case(tmp_path / "diffusers", tmp_path / f"d{i}", rng))
    for i in range(CASES["yaml"]):
        cases.append(yaml_case(bare, tmp_path / f"y{i}.safetensors", rng))
    results = run_bounded([("model", path) for path in cases], timeout=240)
    assert len(results) == len(cases)
    bugs = [
        f"{path}: {outcome.strip().splitlines()[-1]}"
        for path, outcome, _ in results
        if not (outcome == "loaded" or outcome.startswith("UserError: ")) or "\n" in outcome.strip()
    ]
    assert not bugs, "\n".join(bugs)
    slow = [f"{path}: {seconds:.1f} s" for path, _, seconds in results if seconds > 20]
    assert not slow, slow
    refused = sum(outcome != "loaded" for _, outcome, _ in results)
    assert 0 < refused < len(results)  # the mutations both break files and leave some loadable
