"""LoRA extraction: a change of rank r comes back exactly at rank r; a full-rank change comes back with
the Eckart-Young error of its singular values (computed here with ``svdvals``); the extracted kohya file
applied here reproduces the tuned weights within that error, and diffusers' ``load_lora_weights`` reads
it into the same U-Net function; SDXL's two text encoders get ``lora_te1_`` / ``lora_te2_``; single files
are streamed and give the factors computed from the loaded models."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

from latentdiffusion.checkpoints.formats import save_components
from latentdiffusion.checkpoints.lora_extract import (
    clamp_factors,
    extract_lora,
    extraction_layers,
    low_rank_factors,
    open_source,
)
from latentdiffusion.checkpoints.lora_keys import kohya_name
from latentdiffusion.checkpoints.safe_io import read_metadata, read_state_dict
from latentdiffusion.components import Components, build_components
from latentdiffusion.config import PRESETS
from latentdiffusion.errors import UserError
from latentdiffusion.families import family_of
from latentdiffusion.pipelines.pipeline import Pipeline

sys.path.insert(0, str(Path(__file__).parents[1] / "families"))
from sdxl_fixtures import TINY_SDXL

TINY = PRESETS["tiny"]


def random_model(config=TINY, seed: int = 0) -> Components:
    components = build_components(config, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in components.modules.values():
            for parameter in module.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return components


def layers(components: Components, roles=("unet", "text_encoder")):
    family = family_of(components.config)
    for role in roles:
        for path, layer in extraction_layers(components.modules[role], role, family, convolutions=True):
            yield role, path, layer


def tuned_from(base: Components, delta, roles=("unet", "text_encoder")) -> tuple[Components, dict]:
    """A copy of ``base`` with ``delta(weight, generator)`` added to every LoRA layer of ``roles``."""
    tuned = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(7)
    deltas = {}
    with torch.no_grad():
        for role, path, layer in layers(tuned, roles):
            deltas[role, path] = delta(layer.weight, generator)
            layer.weight.add_(deltas[role, path])
    return tuned, deltas


def rank_r(r: int):
    def delta(weight, generator):
        down = torch.randn(r, weight[0].numel(), generator=generator)
        return (torch.randn(weight.shape[0], r, generator=generator) @ down).reshape(weight.shape) * 0.01

    return delta


def full_rank(weight, generator):
    return torch.randn(weight.shape, generator=generator) * 0.01


def applied(base: Components, path: Path) -> Components:
    pipe = Pipeline(copy.deepcopy(base))
    pipe.load_lora(path)
    return pipe.components


def test_a_rank_r_change_is_recovered_exactly(tmp_path):
    base = random_model()
    tuned, deltas = tuned_from(base, rank_r(2))
    out = extract_lora(tuned, base, rank=2, output=tmp_path / "l.safetensors", dtype="fp32")
    entries = read_state_dict(out)
    assert sum(key.endswith(".alpha") for key in entries) == len(deltas)
    assert all(float(v) == 2 for k, v in entries.items() if k.endswith(".alpha"))
    result = applied(base, out)
    for role, path, layer in layers(result):
        want = tuned.modules[role].get_submodule(path).weight
        torch.testing.assert_close(layer.weight, want, rtol=0, atol=2e-6)


def test_a_full_rank_change_reaches_the_eckart_young_error(tmp_path):
    base = random_model()
    tuned, deltas = tuned_from(base, full_rank)
    rank = 3
    out = extract_lora(tuned, base, rank=rank, output=tmp_path / "l.safetensors", dtype="fp32")
    result = applied(base, out)
    for role, path, layer in layers(result):
        delta = deltas[role, path].flatten(1).double()
        optimum = torch.linalg.svdvals(delta)[rank:].square().sum().sqrt()
        residual = (tuned.modules[role].get_submodule(path).weight - layer.weight).flatten(1).double()
        assert abs(residual.norm() - optimum) <= 1e-5 + 1e-4 * optimum, (role, path)
        assert optimum > 0


def test_factors_of_a_convolution_are_locon_shaped():
    delta = torch.randn(6, 4, 3, 3)
    down, up = low_rank_factors(delta, 2)
    assert down.shape == (2, 4, 3, 3) and up.shape == (6, 2, 1, 1)
    down, up = low_rank_factors(torch.randn(5, 3), 9)  # rank clipped to the matrix's
    assert down.shape == (3, 3) and up.shape == (5, 3)


def test_clamping_clips_both_factors_at_their_joint_quantile():
    down, up = torch.tensor([[1.0, -4.0]]), torch.tensor([[2.0], [3.0]])  # |values| 1, 4, 2, 3
    clipped_down, clipped_up = clamp_factors(down, up, 0.5)  # the median of 1, 2, 3, 4: 2.5
    assert clipped_down.tolist() == [[1.0, -2.5]] and clipped_up.tolist() == [[2.0], [2.5]]


def test_conv_rank_zero_and_unchanged_encoders_leave_layers_out(tmp_path):
    base = random_model()
    tuned, _ = tuned_from(base, full_rank, roles=("unet",))
    out = extract_lora(tuned, base, rank=2, conv_rank=0, output=tmp_path / "l.safetensors")
    names = [k for k in read_state_dict(out) if k.endswith(".alpha")]
    assert names and all(n.startswith("lora_unet_") for n in names)  # the text encoder is unchanged
    assert not any("resnets" in n or "samplers" in n for n in names)
    assert {v.dtype for v in read_state_dict(out).values()} == {torch.float16}
    assert read_metadata(out)["ss_network_dim"] == "2"
    out = extract_lora(tuned, base, rank=2, conv_rank=4, output=tmp_path / "c.safetensors")
    entries = read_state_dict(out)
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert entries[f"{conv}.lora_down.weight"].shape[0] == 4 and entries[f"{conv}.lora_up.weight"].shape[
        2:
    ] == (1, 1)


def test_diffusers_reads_the_file_into_the_same_unet(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    base = random_model()
    save_components(base, tmp_path / "base", "diffusers")
    tuned, _ = tuned_from(base, full_rank, roles=("unet",))
    out = extract_lora(tuned, base, rank=4, output=tmp_path / "l.safetensors", dtype="fp32")
    ours = Pipeline(applied(base, out))
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "base", safety_checker=None)
    theirs.load_lora_weights(str(out))
    generator = torch.Generator().manual_seed(0)
    x, t, context = torch.randn(1, 4, 8, 8, generator=generator), torch.tensor([500.0]), torch.randn(1, 5, 32)
    with torch.no_grad():
        expected = theirs.unet(x, t, context).sample
        torch.testing.assert_close(ours.unet(x, t, context), expected, atol=1e-5, rtol=1e-5)
        assert (Pipeline(base).unet(x, t, context) - expected).abs().max() > 1e-2  # the LoRA did something


def test_sdxl_text_encoders_get_their_own_prefixes(tmp_path):
    base = random_model(TINY_SDXL)
    tuned, _ = tuned_from(base, rank_r(1), roles=("unet", "text_encoder", "text_encoder_2"))
    out = extract_lora(tuned, base, rank=1, output=tmp_path / "l.safetensors", dtype="fp32")
    prefixes = {k.split("_text_model")[0] for k in read_state_dict(out) if k.startswith("lora_te")}
    assert prefixes == {"lora_te1", "lora_te2"}
    assert read_metadata(out)["ss_base_model_version"] == "sdxl_base_v1-0"
    result = applied(base, out)
    for role, path, layer in layers(result, ("unet", "text_encoder", "text_encoder_2")):
        want = tuned.modules[role].get_submodule(path).weight
        torch.testing.assert_close(layer.weight, want, rtol=0, atol=2e-6)


def test_refusals(tmp_path):
    base = random_model()
    with pytest.raises(UserError, match="nothing to extract"):
        extract_lora(base, copy.deepcopy(base), rank=2, output=tmp_path / "l.safetensors")
    with pytest.raises(UserError, match="must match"):
        extract_lora(random_model(TINY_SDXL), base, rank=2, output=tmp_path / "l.safetensors")
    with pytest.raises(UserError, match="rank must be"):
        extract_lora(base, base, rank=0, output=tmp_path / "l.safetensors")
    assert not (tmp_path / "l.safetensors").exists()


def test_command_line_and_python_api(tmp_path, capsys):
    import latentdiffusion as ld
    from latentdiffusion.cli.main import main

    base = random_model()
    tuned, _ = tuned_from(base, rank_r(2))
    save_components(base, tmp_path / "base.safetensors", "single-file")
    save_components(tuned, tmp_path / "tuned.safetensors", "single-file")
    args = ["extract-lora", str(tmp_path / "tuned.safetensors"), str(tmp_path / "base.safetensors")]
    out = tmp_path / "cli.safetensors"
    assert main([*args, "--rank", "2", "--clamp-quantile", "1", "--dtype", "fp32", "-o", str(out)]) == 0
    api = ld.extract_lora(
        tmp_path / "tuned.safetensors",
        tmp_path / "base.safetensors",
        rank=2,
        output=tmp_path / "api.safetensors",
        dtype="fp32",
    )
    assert read_state_dict(out).keys() == read_state_dict(api).keys()
    capsys.readouterr()
    assert main([*args, "--rank", "0", "-o", str(out)]) == 2
    assert capsys.readouterr().err.startswith("ldm extract-lora: error: rank must be >= 1")


@pytest.mark.parametrize("config", [TINY, TINY_SDXL], ids=["sd", "sdxl"])
def test_files_are_streamed_and_give_the_in_memory_factors(tmp_path, config):
    """Single files are read tensor by tensor (networks on meta, OpenCLIP's fused q/k/v split per read):
    every entry equals the factors computed here from the loaded models."""
    roles = ("unet", *family_of(config).text_roles)
    base = random_model(config)
    tuned, _ = tuned_from(base, rank_r(2), roles=roles)
    save_components(base, tmp_path / "base.safetensors", "single-file")
    save_components(tuned, tmp_path / "tuned.safetensors", "single-file")
    source = open_source(tmp_path / "tuned.safetensors")
    assert all(p.is_meta for module in source.modules.values() for p in module.parameters())
    out = extract_lora(
        tmp_path / "tuned.safetensors",
        tmp_path / "base.safetensors",
        rank=2,
        output=tmp_path / "s.safetensors",
    )
    entries, prefixes = read_state_dict(out), family_of(config).lora_prefixes
    expected = {}
    for role, path, layer in layers(tuned, roles):
        delta = layer.weight.detach() - base.modules[role].get_submodule(path).weight.detach()
        down, up = low_rank_factors(delta, 2)
        name = kohya_name(role, path, prefixes=prefixes)
        expected |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}
        expected[f"{name}.alpha"] = torch.tensor(2.0)
    assert entries.keys() == expected.keys()
    for key, value in entries.items():
        assert torch.equal(value, expected[key].half()), key


def test_a_streamed_file_and_a_folder_loaded_whole_mix(tmp_path):
    """A single-file tuned model (streamed) against a diffusers-folder base (loaded whole) gives the
    entries of two single files, and the file applied to the base gives the tuned model at rank r."""
    base = random_model()
    tuned, _ = tuned_from(base, rank_r(2))
    save_components(base, tmp_path / "base.safetensors", "single-file")
    save_components(base, tmp_path / "base", "diffusers")
    save_components(tuned, tmp_path / "tuned.safetensors", "single-file")
    tuned_file = tmp_path / "tuned.safetensors"
    files = extract_lora(
        tuned_file, tmp_path / "base.safetensors", rank=2, output=tmp_path / "f.safetensors", dtype="fp32"
    )
    mixed = extract_lora(
        tuned_file, tmp_path / "base", rank=2, output=tmp_path / "m.safetensors", dtype="fp32"
    )
    assert_same_entries(read_state_dict(files), read_state_dict(mixed))
    for role, path, layer in layers(applied(base, mixed)):
        want = tuned.modules[role].get_submodule(path).weight
        torch.testing.assert_close(layer.weight, want, rtol=0, atol=2e-6)


def assert_same_entries(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
