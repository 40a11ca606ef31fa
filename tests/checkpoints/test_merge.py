"""Checkpoint merging: exact results of each method and of block weights on tiny random single files (the
expected tensors computed here from the inputs), the block of every U-Net key of full-size SD 1.5 and
SDXL files (sd-mecha's key lists, no weights), the streamed writer, loading of the merge here and in
diffusers, and the refusals."""

from __future__ import annotations

import importlib.util
import re
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from mecha_keys import released_file_keys

import latentdiffusion as ld
from latentdiffusion.checkpoints.formats import save_components
from latentdiffusion.checkpoints.merge import (
    RECIPE_METADATA,
    MergeInput,
    Recipe,
    merge,
    network_prefixes,
    plan_keys,
)
from latentdiffusion.checkpoints.merge_blocks import block_names, parse_block_weights
from latentdiffusion.checkpoints.safe_io import (
    SafetensorsHeader,
    TensorEntry,
    read_metadata,
    read_state_dict,
)
from latentdiffusion.checkpoints.safetensors_stream import TensorSpec, write_streamed
from latentdiffusion.checkpoints.single_file import plan_single_file
from latentdiffusion.components import build_components
from latentdiffusion.config import PRESETS
from latentdiffusion.errors import UserError

sys.path.insert(0, str(Path(__file__).parents[1] / "families"))
from sdxl_fixtures import TINY_SDXL

TINY = PRESETS["tiny"]
UNET = "model.diffusion_model."


def write_model(path: Path, config=TINY, seed: int = 0, dtype=None) -> Path:
    """A tiny random single file; every tensor random (norms and zero-initialised layers included)."""
    components = build_components(config, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in components.modules.values():
            for parameter in module.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    save_components(components, path, "single-file", dtype=dtype)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    return {name: write_model(root / f"{name}.safetensors", seed=seed) for seed, name in enumerate("ABC")}


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return read_state_dict(path)


def test_weighted_sum_is_exact(models, tmp_path):
    out = merge(models["A"], models["B"], method="weighted-sum", alpha=0.3, output=tmp_path / "m.safetensors")
    a, b, merged = tensors(models["A"]), tensors(models["B"]), tensors(out)
    assert merged.keys() == a.keys()
    for key, value in a.items():
        if value.is_floating_point():
            expected = value + 0.3 * (b[key] - value)  # the same line, written differently
            torch.testing.assert_close(merged[key], expected, rtol=0, atol=1e-6)
        else:
            assert torch.equal(merged[key], value)
    assert any(not torch.equal(merged[k], a[k]) for k in a)


def test_large_tensors_merged_in_row_slices_give_the_same_result(models, tmp_path, monkeypatch):
    import latentdiffusion.checkpoints.merge as merging

    whole = tensors(merge(models["A"], models["B"], alpha=0.3, output=tmp_path / "w.safetensors"))
    monkeypatch.setattr(merging, "CHUNK_ELEMENTS", 1000)  # many slices per tensor, single rows for wide ones
    sliced = tensors(merge(models["A"], models["B"], alpha=0.3, output=tmp_path / "s.safetensors"))
    assert all(torch.equal(whole[key], sliced[key]) for key in whole)


def test_add_difference_is_exact(models, tmp_path):
    out = merge(*models.values(), method="add-difference", alpha=0.7, output=tmp_path / "m.safetensors")
    a, b, c, merged = (tensors(p) for p in (*models.values(), out))
    for key, value in a.items():
        if value.is_floating_point():
            torch.testing.assert_close(merged[key], value + 0.7 * b[key] - 0.7 * c[key], rtol=0, atol=1e-6)


def expected_block(key: str) -> str:
    """The block of a U-Net key by SuperMerger's rule, written independently of merge_blocks."""
    key = key.removeprefix(UNET)
    if key.split(".")[0] in ("time_embed", "label_emb"):
        return "BASE"
    if key.startswith("out."):
        return "OUT_LAST"
    kind, index = re.match(r"(input_blocks|middle_block|output_blocks)\.(\d+)", key).groups()
    if kind == "middle_block":
        return "M00"
    return ("IN" if kind == "input_blocks" else "OUT") + index.zfill(2)


def test_block_weights_give_each_block_its_ratio(models, tmp_path):
    # the tiny U-Net has 4 input and 4 output blocks: 9 values, BASE first makes 10
    values = [0.9, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0]
    out = merge(models["A"], models["B"], alpha=0.5, block_weights=values, output=tmp_path / "m.safetensors")
    ratios = dict(zip(["BASE", *block_names(4)], values, strict=True))
    ratios["OUT_LAST"] = ratios["OUT03"]
    a, b, merged = tensors(models["A"]), tensors(models["B"]), tensors(out)
    seen = set()
    for key, value in a.items():
        if not value.is_floating_point():
            continue
        ratio = ratios[expected_block(key)] if key.startswith(UNET) else ratios["BASE"]
        seen.add(ratio)
        torch.testing.assert_close(merged[key], (1 - ratio) * value + ratio * b[key], rtol=0, atol=1e-6)
    assert seen == set(values)
    # without BASE, everything outside the blocks takes alpha
    out = merge(
        models["A"], models["B"], alpha=0.25, block_weights=values[1:], output=tmp_path / "n.safetensors"
    )
    key = "first_stage_model.decoder.conv_out.weight"
    torch.testing.assert_close(tensors(out)[key], 0.75 * a[key] + 0.25 * b[key], rtol=0, atol=1e-6)


def test_kept_networks_are_a_bit_for_bit(models, tmp_path):
    out = merge(
        models["A"],
        models["B"],
        alpha=0.5,
        keep_vae=True,
        keep_text_encoder=True,
        output=tmp_path / "m.safetensors",
    )
    a, merged = tensors(models["A"]), tensors(out)
    for key in a:
        same = torch.equal(merged[key], a[key])
        assert same == (not key.startswith(UNET)), key


def test_dtype_follows_the_inputs_unless_asked(tmp_path):
    a = write_model(tmp_path / "a.safetensors", seed=0, dtype=torch.float16)
    b = write_model(tmp_path / "b.safetensors", seed=1, dtype=torch.float16)
    half = tensors(merge(a, b, alpha=0.5, output=tmp_path / "h.safetensors"))
    assert {v.dtype for v in half.values() if v.is_floating_point()} == {torch.float16}
    full = tensors(merge(a, b, alpha=0.5, dtype="fp32", output=tmp_path / "f.safetensors"))
    assert {v.dtype for v in full.values() if v.is_floating_point()} == {torch.float32}
    key = UNET + "out.2.weight"
    torch.testing.assert_close(full[key].half(), half[key], rtol=0, atol=0)


def test_recipe_and_config_are_recorded_and_the_merge_loads(models, tmp_path):
    out = merge(models["A"], models["B"], alpha=0.4, output=tmp_path / "m.safetensors")
    recipe = __import__("json").loads(read_metadata(out)[RECIPE_METADATA])
    assert recipe["method"] == "weighted-sum" and recipe["alpha"] == 0.4
    assert recipe["models"] == ["A.safetensors", "B.safetensors"]
    pipe = ld.load(out)
    a, b = ld.load(models["A"]), ld.load(models["B"])
    for key, value in pipe.unet.state_dict().items():
        expected = 0.6 * a.unet.state_dict()[key] + 0.4 * b.unet.state_dict()[key]
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-6)


def test_diffusers_reads_the_merge(models, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    folder = tmp_path / "config"
    save_components(build_components(TINY), folder, "diffusers")  # diffusers' local config, no download
    out = merge(models["A"], models["B"], alpha=0.4, output=tmp_path / "m.safetensors")
    theirs = diffusers.StableDiffusionPipeline.from_single_file(
        str(out), config=str(folder), local_files_only=True, safety_checker=None
    )
    ours = ld.load(out)
    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([500.0]), torch.randn(1, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            ours.unet(x, t, context), theirs.unet(x, t, context).sample, atol=1e-5, rtol=1e-5
        )


def test_inpainting_a_merges_the_channels_b_has(models, tmp_path):
    inpaint = replace(TINY, unet=replace(TINY.unet, in_channels=9))
    a = write_model(tmp_path / "inpaint.safetensors", inpaint, seed=5)
    out = merge(
        a, models["B"], models["C"], method="add-difference", alpha=1.0, output=tmp_path / "m.safetensors"
    )
    key = UNET + "input_blocks.0.0.weight"
    wa, wb, wc, merged = (
        tensors(a)[key],
        tensors(models["B"])[key],
        tensors(models["C"])[key],
        tensors(out)[key],
    )
    torch.testing.assert_close(merged[:, :4], wa[:, :4] + wb - wc, rtol=0, atol=1e-6)
    assert torch.equal(merged[:, 4:], wa[:, 4:])
    with pytest.raises(UserError, match="make the inpainting model A"):
        merge(models["B"], a, alpha=0.5, output=tmp_path / "x.safetensors")


def test_refusals(models, tmp_path):
    out = tmp_path / "x.safetensors"
    sdxl = write_model(tmp_path / "sdxl.safetensors", TINY_SDXL)
    with pytest.raises(UserError, match="one family"):
        merge(models["A"], sdxl, alpha=0.5, output=out)
    wider = write_model(tmp_path / "wide.safetensors", replace(TINY, unet=replace(TINY.unet, context_dim=48)))
    with pytest.raises(UserError, match="other shapes"):
        merge(models["A"], wider, alpha=0.5, output=out)
    with pytest.raises(UserError, match="three models"):
        merge(models["A"], models["B"], method="add-difference", output=out)
    with pytest.raises(UserError, match="9 values"):
        merge(models["A"], models["B"], block_weights="0.1,0.2", output=out)
    with pytest.raises(UserError, match="alpha must be a finite number"):
        merge(models["A"], models["B"], alpha=float("nan"), output=out)
    with pytest.raises(UserError, match="unknown merge method"):
        merge(models["A"], models["B"], method="average", output=out)
    assert not out.exists()


def test_streamed_file_reads_with_the_safetensors_library(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    state = {"w": torch.randn(3, 4), "h": torch.randn(5).half(), "i": torch.arange(3), "s": torch.tensor(2.0)}
    specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in state.items()]
    write_streamed(tmp_path / "s.safetensors", specs, lambda spec: state[spec.name], {"note": "x"})
    back = safetensors.load_file(tmp_path / "s.safetensors")
    assert back.keys() == state.keys() and all(torch.equal(back[k], v) for k, v in state.items())
    with pytest.raises(ValueError, match="header says"):
        write_streamed(tmp_path / "t.safetensors", specs, lambda spec: state[spec.name].double())
    assert not (tmp_path / "t.safetensors").exists()


# --- full size: the block of every U-Net key of released files -------------------------------------


_ENTRY = re.compile(r"^    (\S+): \{shape: \[([\d, ]*)\], dtype: \w+")


def released_shapes(config_name: str) -> dict[str, tuple[int, ...]]:
    """key -> shape of every entry of sd-mecha's list (entries with aliases included, which
    ``mecha_keys`` leaves out)."""
    released_file_keys(config_name)  # skips the test where sd-mecha is not installed
    origin = importlib.util.find_spec("sd_mecha").origin
    path = Path(origin).parent / "extensions" / "builtin" / "model_configs" / f"{config_name}.yaml"
    shapes = {}
    for line in path.read_text().splitlines():
        match = _ENTRY.match(line)
        if match:
            shapes[match.group(1)] = tuple(int(n) for n in match.group(2).split(",") if n.strip())
    return shapes


def released_input(config_name: str) -> MergeInput:
    shapes = released_shapes(config_name)
    header = SafetensorsHeader({k: TensorEntry(torch.float16, s, 0, 0) for k, s in shapes.items()}, {}, 0)
    plan = plan_single_file(shapes, None, source=config_name, name=config_name, prediction_type="epsilon")
    return MergeInput(Path(config_name), header, plan)


@pytest.mark.parametrize(("config_name", "blocks"), [("sd1-ldm", 12), ("sdxl-sgm", 9)])
def test_every_unet_key_of_a_full_size_file_is_in_one_block(config_name, blocks):
    model = released_input(config_name)
    names = ["BASE", *block_names(blocks)]
    values = [i / 100 for i in range(len(names))]  # one distinct ratio per block
    recipe = Recipe("weighted-sum", 0.5, parse_block_weights(values, blocks), frozenset(), None)
    plans = plan_keys([model, model], network_prefixes(model.plan), recipe)
    by_ratio = dict(zip(values, names, strict=True))
    counts: dict[str, int] = {}
    for key, plan in plans.items():
        if key.startswith(UNET):
            block = by_ratio[plan.ratio]
            want = expected_block(key).replace("OUT_LAST", f"OUT{blocks - 1:02d}")
            assert block == want, key
            counts[block] = counts.get(block, 0) + 1
        elif plan.ratio is not None:
            assert by_ratio[plan.ratio] == "BASE", key
    assert set(counts) == set(names)  # every block has keys
    assert counts["BASE"] == (8 if blocks == 9 else 4)  # time_embed (and label_emb): 2 linears each
    assert sum(counts.values()) == sum(k.startswith(UNET) for k in plans)
    # a block holding a transformer has many more keys than a downsampling one
    assert counts["M00"] > counts["IN03"] == 2


def test_command_line(models, tmp_path, capsys):
    from latentdiffusion.cli.main import main

    out = tmp_path / "m.safetensors"
    a, b, c = (str(p) for p in models.values())
    assert main(["merge", a, b, "-o", str(out), "--alpha", "0.3", "--keep-vae"]) == 0
    assert torch.equal(
        tensors(out)["first_stage_model.decoder.conv_out.weight"],
        tensors(models["A"])["first_stage_model.decoder.conv_out.weight"],
    )
    assert main(["merge", a, b, c, "-o", str(out), "--alpha", "1"]) == 0  # three models: add-difference
    assert '"add-difference"' in read_metadata(out)[RECIPE_METADATA]
    capsys.readouterr()
    assert main(["merge", a, b, "-o", str(out), "--block-weights", "1,2,x"]) == 2
    error = capsys.readouterr().err
    assert (
        error.startswith("ldm merge: error: block weights must be finite numbers") and error.count("\n") == 1
    )
    assert main(["merge", a, "-o", str(out)]) == 2
