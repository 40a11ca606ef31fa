"""Hostile and malformed model files (issue #16): every one ends in one UserError (through ``ldm``: exit
status 2 and one line on stderr), quickly and within bounded memory, never a traceback, a hang, an
allocation of gigabytes or a silent black image.

The risky cases (FIFOs, symlinks to /dev/zero, amplification) run in a subprocess under
``RLIMIT_AS`` and a timeout, several per subprocess to keep the interpreter start-ups few.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import struct
import subprocess
import sys
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import latentdiffusion as ld
from latentdiffusion.checkpoints.bounds import validate_model_config
from latentdiffusion.checkpoints.compvis import compvis_yaml
from latentdiffusion.checkpoints.diffusers_folder import save_diffusers
from latentdiffusion.checkpoints.lora_keys import parse_lora, read_lora_file
from latentdiffusion.checkpoints.native import save_native
from latentdiffusion.checkpoints.safe_io import MAX_TENSORS, read_state_dict, save_safetensors
from latentdiffusion.checkpoints.single_file import save_single_file, single_file_state
from latentdiffusion.cli.main import main
from latentdiffusion.components import build_components
from latentdiffusion.config import PRESETS, TINY, TextEncoderConfig
from latentdiffusion.errors import UserError

TEXT = TextEncoderConfig(hidden_size=64, num_layers=2, num_heads=1, intermediate_size=128)
SD1 = replace(TINY, name="tiny-sd1", unet=replace(TINY.unet, context_dim=64), text_encoder=TEXT)
MEMORY_LIMIT = 3 * 2**30
UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"

# Runs in a fresh interpreter under an address-space limit: loads each (kind, path) and prints, per case,
# the outcome ("loaded", "UserError: ...", or "BUG: <traceback>") and the seconds it took.
BATCH = r"""
import json, resource, sys, time, traceback
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]), int(sys.argv[1])))
import latentdiffusion as ld
from latentdiffusion.checkpoints.lora_keys import parse_lora, read_lora_file
from latentdiffusion.errors import UserError
results = []
for kind, path in json.loads(sys.argv[2]):
    start = time.perf_counter()
    try:
        if kind == "lora":
            parse_lora(*read_lora_file(path), source=path)
        else:
            ld.load(path)
        outcome = "loaded"
    except UserError as error:
        outcome = "UserError: " + str(error)
    except BaseException:
        outcome = "BUG: " + traceback.format_exc()
    results.append([path, outcome, time.perf_counter() - start])
    print(json.dumps(results[-1]), flush=True)
"""


def run_bounded(cases: list[tuple[str, Path]], timeout: float = 240) -> list[tuple[str, str, float]]:
    """Load every case in one subprocess limited to MEMORY_LIMIT bytes of address space."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    payload = json.dumps([[kind, str(path)] for kind, path in cases])
    done = subprocess.run(
        [sys.executable, "-c", BATCH, str(MEMORY_LIMIT), payload],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return [tuple(json.loads(line)) for line in done.stdout.splitlines()]


def assert_refused(results, *, seconds: float = 20) -> None:
    for path, outcome, took in results:
        assert outcome.startswith("UserError: "), f"{path}: {outcome}"
        assert took < seconds, f"{path} took {took:.1f} s"


def assert_one_line_exit_2(argv: list[str], capsys, match: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert match in err, err


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def components():
    return build_components(SD1, seed=0)


@pytest.fixture(scope="module")
def models(tmp_path_factory, components):
    """One tiny model in each layout: ours with metadata, bare + yaml, bare alone, diffusers, native."""
    root = tmp_path_factory.mktemp("models")
    save_single_file(components, root / "meta.safetensors")  # + meta.yaml
    (root / "meta.yaml").unlink()
    state = single_file_state(components)
    save_safetensors(state, root / "bare.safetensors")
    (root / "bare.yaml").write_text(compvis_yaml(SD1, "hf"))
    save_safetensors(state, root / "detect.safetensors")
    save_diffusers(components, root / "diffusers")
    save_native(components, root / "native")
    return root


def header_of(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def write_with_header(path: Path, header: dict | bytes, data: bytes) -> Path:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def with_config(source: Path, target: Path, change) -> Path:
    """``source`` (a file with our metadata) with its ``latentdiffusion.config`` changed by ``change``."""
    header, data = header_of(source)
    config = json.loads(header["__metadata__"]["latentdiffusion.config"])
    change(config)
    header["__metadata__"]["latentdiffusion.config"] = json.dumps(config)
    return write_with_header(target, header, data)


def set_path(data: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        data = data[key]
    data[last] = value


# --------------------------------------------------------------- 1. sizes in a config, from any source

BAD_FIELDS = [
    ("unet.num_res_blocks", 10**6, "unet.num_res_blocks = 1000000; expected an integer from 1 to 16"),
    ("unet.transformer_depth", 10**7, "unet.transformer_depth = 10000000"),
    ("unet.model_channels", 0, "unet.model_channels = 0"),
    ("unet.channel_mult", [1, -2], "unet.channel_mult[1] = -2"),
    ("unet.num_heads", 0, "unet.num_heads = 0"),
    ("unet.num_res_blocks", 2.5, "unet.num_res_blocks = 2.5; expected an integer"),
    ("unet.num_res_blocks", True, "unet.num_res_blocks = True"),
    ("unet.context_dim", "64", "unet.context_dim = '64'"),
    ("unet.norm_groups", 7, "unet.norm_groups = 7; expected a divisor"),
    ("unet.channel_mult", [1] * 1000, "unet.channel_mult = "),
    ("unet", 5, "unet = 5"),
    ("text_encoder.num_layers", 10**7, "text_encoder.num_layers = 10000000"),
    ("text_encoder.vocab_size", 0, "text_encoder.vocab_size = 0"),
    ("text_encoder.num_heads", 3, "text_encoder.num_heads = 3; expected a divisor of hidden_size 64"),
    ("autoencoder.block_channels", [32, 0], "autoencoder.block_channels[1] = 0"),
    ("schedule.num_train_timesteps", 0, "schedule.num_train_timesteps = 0"),
    ("schedule.num_train_timesteps", 10**9, "schedule.num_train_timesteps = 1000000000"),
    ("schedule.beta_end", 5, "schedule.beta_end = 5"),
    ("schedule.beta_start", -0.1, "schedule.beta_start = -0.1"),
    ("default_guidance_scale", 1e308, "default_guidance_scale = 1e+308"),
]


def test_every_preset_is_within_the_bounds():
    for name, config in PRESETS.items():
        validate_model_config(config, name)


@pytest.mark.parametrize(("field", "value", "message"), BAD_FIELDS)
def test_single_file_metadata_config_is_validated(models, tmp_path, field, value, message):
    path = with_config(
        models / "meta.safetensors", tmp_path / "m.safetensors", lambda c: set_path(c, field, value)
    )
    with pytest.raises(UserError, match="invalid model config") as error:
        ld.load(path)
    assert message in str(error.value)


@pytest.mark.parametrize(("field", "value", "message"), BAD_FIELDS[:6] + BAD_FIELDS[-4:])
def test_native_config_is_validated(models, tmp_path, field, value, message):
    folder = tmp_path / "native"
    folder.mkdir()
    os.link(models / "native" / "model.safetensors", folder / "model.safetensors")
    meta = json.loads((models / "native" / "latentdiffusion.json").read_text())
    set_path(meta["config"], field, value)
    (folder / "latentdiffusion.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="invalid model config") as error:
        ld.load(folder)
    assert message in str(error.value)


YAML_CHANGES = [
    ("num_res_blocks: 1", "num_res_blocks: 1000000", "unet.num_res_blocks = 1000000"),
    ("timesteps: 1000", "timesteps: 0", "schedule.num_train_timesteps = 0"),
    ("timesteps: 1000", "timesteps: 1000000000", "schedule.num_train_timesteps = 1000000000"),
    ("linear_end: 0.012", "linear_end: 5", "schedule.beta_end = 5.0"),
    ("channel_mult: [1, 2]\n", "channel_mult: [1, 0]\n", "unet.channel_mult[1] = 0"),
    ("num_heads: 2", "num_heads: 0", "unet.num_heads = 0"),
    ("model_channels: 32", "model_channels: 2.5", "model_channels = 2.5; expected an integer"),
    ("model_channels: 32", "model_channels: .inf", "model_channels = inf; expected an integer"),
    ("transformer_depth: 1", "transformer_depth: 10000000", "unet.transformer_depth = 10000000"),
    ("context_dim: 64", "context_dim: [64, true]", "context_dim must be the same"),
]


@pytest.mark.parametrize(("old", "new", "message"), YAML_CHANGES)
def test_compvis_yaml_config_is_validated(models, tmp_path, old, new, message):
    path = tmp_path / "bare.safetensors"
    os.link(models / "bare.safetensors", path)
    text = (models / "bare.yaml").read_text()
    assert old in text
    path.with_suffix(".yaml").write_text(text.replace(old, new))
    with pytest.raises(UserError) as error:
        ld.load(path)
    assert message in str(error.value)


DIFFUSERS_CHANGES = [
    ("unet", "layers_per_block", 10**6, "unet.num_res_blocks = 1000000"),
    ("unet", "block_out_channels", [0, 64], "block_out_channels = [0, 64]; expected integers >= 1"),
    ("unet", "block_out_channels", [], "unsupported diffusers model"),
    ("unet", "attention_head_dim", 0, "attention_head_dim = 0; expected integers >= 1"),
    ("unet", "cross_attention_dim", "x", "cross_attention_dim = 'x'"),
    ("unet", "sample_size", "abc", "sample_size 'abc'"),
    ("unet", "transformer_layers_per_block", 10**7, "unet.transformer_depth = 10000000"),
    ("vae", "latent_channels", -4, "autoencoder.latent_channels = -4"),
    ("vae", "scaling_factor", "big", "unsupported diffusers model"),
    ("text_encoder", "num_hidden_layers", 10**7, "text_encoder.num_layers = 10000000"),
    ("text_encoder", "max_position_embeddings", 0, "text_encoder.max_length = 0"),
    ("text_encoder", "text_config", [1], "unsupported diffusers model"),
    ("scheduler", "num_train_timesteps", 0, "schedule.num_train_timesteps = 0"),
    ("scheduler", "beta_end", 5, "schedule.beta_end = 5"),
]


def linked_copy(source: Path, target: Path) -> Path:
    """A copy of a model folder whose files are hard links (replace a file before changing it)."""
    for item in source.rglob("*"):
        if item.is_file():
            (target / item.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
            os.link(item, target / item.relative_to(source))
    return target


def replace_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.unlink()
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(("part", "key", "value", "message"), DIFFUSERS_CHANGES)
def test_diffusers_config_is_validated(models, tmp_path, part, key, value, message):
    folder = linked_copy(models / "diffusers", tmp_path / "d")
    name = "scheduler_config.json" if part == "scheduler" else "config.json"
    replace_json(folder / part / name, lambda d: d.__setitem__(key, value))
    with pytest.raises(UserError) as error:
        ld.load(folder)
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("shape", "message"),
    [([0, 4, 3, 3], "unknown architecture"), ([32], "unknown architecture"), ([], "unknown architecture")],
)
def test_detection_from_odd_shapes_is_a_user_error(models, tmp_path, shape, message):
    header, data = header_of(models / "detect.safetensors")
    entry = header[UNET_IN]
    entry["shape"] = shape
    entry["data_offsets"] = [entry["data_offsets"][0], entry["data_offsets"][0] + 4 * math.prod(shape)]
    path = write_with_header(tmp_path / "odd.safetensors", header, data)
    with pytest.raises(UserError, match=message):
        ld.load(path)


def test_convert_refuses_bad_configs_with_one_line(models, tmp_path, capsys):
    bad = with_config(
        models / "meta.safetensors",
        tmp_path / "bad.safetensors",
        lambda c: set_path(c, "schedule.num_train_timesteps", 10**9),
    )
    out = str(tmp_path / "out.safetensors")
    assert_one_line_exit_2(["convert", str(bad), out], capsys, "schedule.num_train_timesteps = 1000000000")
    assert not Path(out).exists()
    path = tmp_path / "bare.safetensors"
    os.link(models / "bare.safetensors", path)
    path.with_suffix(".yaml").write_text(
        (models / "bare.yaml").read_text().replace("linear_end: 0.012", "linear_end: 5")
    )
    assert_one_line_exit_2(["convert", str(path), out], capsys, "schedule.beta_end = 5.0")


# -------------------------------------------------------------------- 2. files that are not regular


def test_special_files_and_escaping_shards_are_refused_in_bounded_time_and_memory(models, tmp_path):
    cases = []

    def diffusers_case(name: str, relative: str, make) -> None:
        folder = linked_copy(models / "diffusers", tmp_path / name)
        (folder / relative).unlink()
        make(folder / relative)
        cases.append(("model", folder))

    diffusers_case("zero-config", "unet/config.json", lambda p: p.symlink_to("/dev/zero"))
    diffusers_case("fifo-config", "unet/config.json", os.mkfifo)
    diffusers_case("dir-config", "vae/config.json", os.mkdir)
    diffusers_case("fifo-index", "model_index.json", os.mkfifo)
    diffusers_case("fifo-scheduler", "scheduler/scheduler_config.json", os.mkfifo)
    diffusers_case("zero-vocab", "tokenizer/vocab.json", lambda p: p.symlink_to("/dev/zero"))
    diffusers_case("fifo-merges", "tokenizer/merges.txt", os.mkfifo)
    for name, shard in (
        ("up", "../../secret.safetensors"),
        ("abs", "/etc/passwd"),
        ("fifo", "fifo.safetensors"),
    ):
        folder = linked_copy(models / "diffusers", tmp_path / f"shard-{name}")
        weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
        keys = header_of(weights)[0].keys() - {"__metadata__"}
        weights.unlink()
        (weights.parent / f"{weights.name}.index.json").write_text(
            json.dumps({"weight_map": dict.fromkeys(keys, shard)})
        )
        if name == "fifo":
            os.mkfifo(weights.parent / shard)
        cases.append(("model", folder))
    os.link(models / "detect.safetensors", tmp_path / "fifo-yaml.safetensors")
    os.mkfifo(tmp_path / "fifo-yaml.yaml")
    os.link(models / "detect.safetensors", tmp_path / "zero-yaml.safetensors")
    (tmp_path / "zero-yaml.yaml").symlink_to("/dev/zero")
    (tmp_path / "zero.safetensors").symlink_to("/dev/zero")
    native = linked_copy(models / "native", tmp_path / "native-zero")
    (native / "latentdiffusion.json").unlink()
    (native / "latentdiffusion.json").symlink_to("/dev/zero")
    cases += [
        ("model", tmp_path / n)
        for n in ("fifo-yaml.safetensors", "zero-yaml.safetensors", "zero.safetensors")
    ]
    cases.append(("model", native))
    results = run_bounded(cases)
    assert len(results) == len(cases)
    assert_refused(results)
    by_name = {Path(path).name: outcome for path, outcome, _ in results}
    assert "not a regular" in by_name["zero-config"] and "not a regular" in by_name["fifo-config"]
    assert "outside its folder" in by_name["shard-up"] and "outside its folder" in by_name["shard-abs"]


def test_oversized_and_deeply_nested_json_and_yaml_are_user_errors(models, tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    folder = linked_copy(models / "diffusers", tmp_path / "deep")
    (folder / "unet" / "config.json").unlink()
    (folder / "unet" / "config.json").write_text(deep)
    with pytest.raises(UserError, match="nested too deeply"):
        ld.load(folder)
    (folder / "unet" / "config.json").unlink()
    with open(folder / "unet" / "config.json", "wb") as f:
        f.truncate(65 * 2**20)  # sparse: 65 MiB of zeros
    with pytest.raises(UserError, match="too large"):
        ld.load(folder)
    native = linked_copy(models / "native", tmp_path / "native")
    (native / "latentdiffusion.json").unlink()
    (native / "latentdiffusion.json").write_text(deep)
    with pytest.raises(UserError, match="nested too deeply"):
        ld.load(native)
    path = tmp_path / "bare.safetensors"
    os.link(models / "bare.safetensors", path)
    for text in ("".join(" " * i + "a:\n" for i in range(1300)), "a: " + "[" * 5000 + "]" * 5000):
        path.with_suffix(".yaml").write_text(text)
        with pytest.raises(UserError, match=r"nested too deeply|is not a usable"):
            ld.load(path)


# ------------------------------------------------------------------------- 3. headers and overflow


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda h: h.__setitem__("deep", json.loads("[" * 50_000 + "]" * 50_000)), "nested too deeply"),
        (lambda h: h[UNET_IN].__setitem__("shape", [1e400]), "not a small integer"),
        (lambda h: h[UNET_IN].__setitem__("shape", [2**62, 2**62]), "not a small integer"),
        (lambda h: h[UNET_IN].__setitem__("shape", [2**40, 2**40]), "inconsistent shape"),
        (lambda h: h[UNET_IN].__setitem__("shape", [True, 4, 3, 3]), "not a small integer"),
        (lambda h: h[UNET_IN].__setitem__("data_offsets", [0, 1e400]), "not a small integer"),
        (lambda h: h[UNET_IN].__setitem__("shape", list(range(1, 40))), "corrupt safetensors header"),
        (lambda h: h.__setitem__("__metadata__", {"a": 1}), "__metadata__ is not a map of strings"),
        (lambda h: h.__setitem__("__metadata__", ["a"]), "__metadata__ is not a map of strings"),
        (lambda h: h.__setitem__(UNET_IN, 5), "corrupt safetensors header entry"),
        (lambda h: h[UNET_IN].__setitem__("dtype", "I32"), "stored as integers, not floating point"),
    ],
)
def test_malformed_safetensors_headers_are_user_errors(models, tmp_path, change, message):
    header, data = header_of(models / "detect.safetensors")
    if message == "nested too deeply":  # json.dumps itself would recurse too deeply
        raw = json.dumps(header)[:-1] + ', "deep": ' + "[" * 50_000 + "]" * 50_000 + "}"
        path = write_with_header(tmp_path / "h.safetensors", raw.encode(), data)
    else:
        change(header)
        path = write_with_header(tmp_path / "h.safetensors", header, data)
    with pytest.raises(UserError, match=message):
        ld.load(path)


def test_nested_config_metadata_is_a_user_error(models, tmp_path):
    header, data = header_of(models / "meta.safetensors")
    header["__metadata__"]["latentdiffusion.config"] = "[" * 100_000 + "]" * 100_000
    with pytest.raises(UserError, match="nested too deeply"):
        ld.load(write_with_header(tmp_path / "m.safetensors", header, data))


# ---------------------------------------------------------------------------------- 4. amplification


def test_amplifying_files_are_refused_before_anything_is_materialised(tmp_path):
    huge = torch.zeros(1).expand(5 * 10**8)  # 4 bytes of storage, stride 0, 2 GB as float32
    state = {UNET_IN: huge}
    torch.save({"state_dict": state}, tmp_path / "stride0.ckpt")
    torch.save({"state_dict": state}, tmp_path / "stride0-legacy.ckpt", _use_new_zipfile_serialization=False)
    header = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(MAX_TENSORS + 1)}
    write_with_header(tmp_path / "many.safetensors", header, b"")
    escaped = json.dumps(header).replace('"data_offsets"', '"data\\u005foffsets"').encode()
    with pytest.raises(UserError, match=f"more than {MAX_TENSORS} tensors"):
        ld.load(write_with_header(tmp_path / "escaped.safetensors", escaped, b""))
    # a header that claims 2**47 bytes of one tensor: refused as truncated, never allocated
    big = {UNET_IN: {"dtype": "F32", "shape": [2**45], "data_offsets": [0, 2**47]}}
    write_with_header(tmp_path / "claims.safetensors", big, b"\0" * 64)
    with zipfile.ZipFile(tmp_path / "many.ckpt", "w") as archive:  # 10^5 empty records, a few MB
        for i in range(MAX_TENSORS + 20):
            archive.writestr(f"archive/data/{i}", b"")
    # a legacy pickle whose storage claims 2**31 - 1 floats (8 GiB) in a file of 0.5 MB
    torch.save(
        {"state_dict": {UNET_IN: torch.zeros(123457)}},
        tmp_path / "l.ckpt",
        _use_new_zipfile_serialization=False,
    )
    raw = (tmp_path / "l.ckpt").read_bytes()
    at = raw.index(struct.pack("<i", 123457))
    (tmp_path / "big-legacy.ckpt").write_bytes(raw[:at] + struct.pack("<i", 2**31 - 1) + raw[at + 4 :])
    names = ("stride0.ckpt", "stride0-legacy.ckpt", "many.safetensors", "claims.safetensors", "many.ckpt")
    names += ("big-legacy.ckpt",)
    results = run_bounded([("model", tmp_path / n) for n in names])
    assert_refused(results, seconds=10)
    outcomes = [outcome for _, outcome, _ in results]
    assert "more data" in outcomes[0] and "more data" in outcomes[1]
    assert f"more than {MAX_TENSORS} tensors" in outcomes[2] and "truncated" in outcomes[3]
    assert f"more than {MAX_TENSORS} tensors" in outcomes[4]


def test_malformed_legacy_pickles_are_user_errors(tmp_path):
    for i, raw in enumerate(
        (
            pickle.dumps({"a": 1}, protocol=2)[:-3],
            b"\x80\x02" + b"(" * 100_000,
            pickle.dumps([1, 2, 3], protocol=2),
            b"\x80\x05\x95" + b"\xff" * 20,
        )
    ):
        path = tmp_path / f"bad{i}.ckpt"
        path.write_bytes(raw)
        with pytest.raises(UserError):
            ld.load(path)


# -------------------------------------------------------------------------------------- 5. NaN / Inf


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_weights_that_are_not_finite_are_refused_by_name(models, tmp_path, components, value):
    state = single_file_state(components)
    state["model.diffusion_model.out.2.weight"] = state["model.diffusion_model.out.2.weight"].clone()
    state["model.diffusion_model.out.2.weight"][0, 0, 0, 0] = value
    save_safetensors(state, tmp_path / "bad.safetensors")
    (tmp_path / "bad.yaml").write_text(compvis_yaml(SD1, "hf"))
    with pytest.raises(UserError, match=r"'model\.diffusion_model\.out\.2\.weight' holds NaN or infinite"):
        ld.load(tmp_path / "bad.safetensors")
    with pytest.raises(UserError, match="holds NaN or infinite"):  # the cast path (fp16 file, fp32 model)
        save_safetensors({k: v.half() for k, v in state.items()}, tmp_path / "bad.safetensors")
        ld.load(tmp_path / "bad.safetensors")
    torch.save({"state_dict": state}, tmp_path / "bad.ckpt")
    (tmp_path / "bad.ckpt").with_suffix(".yaml").write_text(compvis_yaml(SD1, "hf"))
    with pytest.raises(UserError, match="holds NaN or infinite"):
        ld.load(tmp_path / "bad.ckpt")


def test_large_finite_weights_whose_sum_overflows_still_load(models, tmp_path, components):
    state = single_file_state(components)
    state["model.diffusion_model.out.2.bias"] = torch.full((4,), 3e38)
    save_safetensors(state, tmp_path / "big.safetensors")
    (tmp_path / "big.yaml").write_text(compvis_yaml(SD1, "hf"))
    assert ld.load(tmp_path / "big.safetensors").unet.conv_out.bias[0] == torch.tensor(3e38)


LORA = "lora_unet_down_blocks_0_attentions_0_proj_in"


@pytest.mark.parametrize(
    ("state", "metadata", "message"),
    [
        ({"down": torch.zeros(0, 32), "up": torch.zeros(32, 0)}, {}, "rank 0"),
        (
            {"down": torch.ones(2, 32), "up": torch.ones(32, 2), "alpha": torch.tensor(float("nan"))},
            {},
            "alpha is nan",
        ),
        (
            {"down": torch.ones(2, 32), "up": torch.ones(32, 2), "alpha": torch.tensor(float("inf"))},
            {},
            "alpha is inf",
        ),
    ],
)
def test_lora_rank_zero_and_non_finite_alpha_are_refused(state, metadata, message):
    parts = {"down": "lora_down.weight", "up": "lora_up.weight", "alpha": "alpha"}
    with pytest.raises(UserError, match=message):
        parse_lora({f"{LORA}.{parts[k]}": v for k, v in state.items()}, metadata)


@pytest.mark.parametrize("alpha", ['"abc"', "null", "[1]", "true", "1e400"])
def test_peft_lora_with_a_non_numeric_alpha_is_refused(alpha):
    state = {
        "unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.ones(2, 32),
        "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.ones(32, 2),
    }
    metadata = {"lora_adapter_metadata": '{"unet.lora_alpha": ' + alpha + "}"}
    with pytest.raises(UserError, match="lora_alpha"):
        parse_lora(state, metadata)


def test_lora_files_with_non_finite_factors_are_refused(tmp_path):
    state = {f"{LORA}.lora_down.weight": torch.ones(2, 32), f"{LORA}.lora_up.weight": torch.ones(32, 2)}
    state[f"{LORA}.lora_up.weight"][3, 1] = float("nan")
    save_safetensors(state, tmp_path / "nan.safetensors")
    with pytest.raises(UserError, match=r"lora_up\.weight' holds NaN"):
        read_lora_file(tmp_path / "nan.safetensors")


def test_names_and_shapes_decide_before_any_weight_is_read(models, tmp_path, components):
    """A misshapen tensor full of NaN: the shape, read from the header alone, is what is reported."""
    bad = torch.full((4, 32, 1, 1), float("nan"))
    state = single_file_state(components)
    state["model.diffusion_model.out.2.weight"] = bad
    save_safetensors(state, tmp_path / "single.safetensors")
    (tmp_path / "single.yaml").write_text(compvis_yaml(SD1, "hf"))
    folder = linked_copy(models / "diffusers", tmp_path / "d")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = read_state_dict(models / "diffusers" / "unet" / "diffusion_pytorch_model.safetensors")
    tensors["conv_out.weight"] = bad
    weights.unlink()
    save_safetensors(tensors, weights)
    native = linked_copy(models / "native", tmp_path / "n")
    tensors = read_state_dict(models / "native" / "model.safetensors")
    tensors["unet.conv_out.weight"] = bad
    (native / "model.safetensors").unlink()
    save_safetensors(tensors, native / "model.safetensors")
    for path in (tmp_path / "single.safetensors", folder, native):
        with pytest.raises(
            UserError, match=r"does not fit the model.*conv_out\.weight \(file \(4, 32, 1, 1\)"
        ):
            ld.load(path)


CLI = r"""
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]), int(sys.argv[1])))
from latentdiffusion.cli.main import main
sys.exit(main(sys.argv[2:]))
"""


def test_ldm_convert_of_a_fifo_config_is_exit_2_with_one_line(models, tmp_path):
    folder = linked_copy(models / "diffusers", tmp_path / "d")
    (folder / "unet" / "config.json").unlink()
    os.mkfifo(folder / "unet" / "config.json")
    argv = ["convert", str(folder), str(tmp_path / "out.safetensors")]
    done = subprocess.run(
        [sys.executable, "-c", CLI, str(MEMORY_LIMIT), *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "not a regular" in done.stderr, done.stderr
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"depth": 10**6}, "transformer.depth"),
        ({"num_heads": 0}, "transformer.num_heads"),
        ({"qk_norm": "layer_norm"}, "transformer.qk_norm"),
        ({"dual_attention_layers": (0, 99)}, "transformer.dual_attention_layers[1]"),
        ({"head_dim": 1024, "num_heads": 256}, "transformer.num_heads * head_dim"),
    ],
)
def test_transformer_configs_are_bounded(change, message):
    config = PRESETS["sd3-medium"]
    bad = replace(config, transformer=replace(config.transformer, **change))
    with pytest.raises(UserError, match=re.escape(message)):
        validate_model_config(bad, "model")


@pytest.mark.parametrize(
    ("change", "message"),
    [({"num_layers": 10**5}, "text_encoder_3.num_layers"), ({"pad_token_id": 40000}, "pad_token_id")],
)
def test_t5_configs_are_bounded(change, message):
    config = PRESETS["sd3-medium"]
    bad = replace(config, text_encoder_3=replace(config.text_encoder_3, **change))
    with pytest.raises(UserError, match=re.escape(message)):
        validate_model_config(bad, "model")
