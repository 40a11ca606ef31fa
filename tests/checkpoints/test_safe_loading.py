"""Safe reading of single files: pickles run no code, training leftovers are tolerated, bad files get one
clear message, safetensors are adopted without a copy, and eps/v is probed when nothing says it."""

from __future__ import annotations

import os
import pickle
import sys
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import latentdiffusion as ld
from latentdiffusion.checkpoints.compvis import compvis_yaml
from latentdiffusion.checkpoints.safe_io import read_state_dict, save_safetensors
from latentdiffusion.checkpoints.single_file import single_file_state
from latentdiffusion.cli.main import main
from latentdiffusion.components import build_components
from latentdiffusion.config import TINY, ModelConfig, TextEncoderConfig, UNetConfig
from latentdiffusion.errors import UserError

TEXT = TextEncoderConfig(hidden_size=64, num_layers=2, num_heads=1, intermediate_size=128)
SD1 = replace(TINY, name="tiny-sd1", unet=replace(TINY.unet, context_dim=64), text_encoder=TEXT)
# SD 2 conventions that detection alone can read: 64-wide heads, OpenCLIP (gelu) text tower
SD2 = replace(
    TINY,
    name="tiny-sd2",
    unet=UNetConfig(
        model_channels=64,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_levels=(0, 1),
        num_heads=None,
        head_dim=64,
        context_dim=64,
        use_linear_projection=True,
    ),
    text_encoder=replace(TEXT, activation="gelu", pad_token_id=0),
)


def write_bare(
    config: ModelConfig, path: Path, *, yaml: bool = True, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A single file as other tools write it (no metadata), with its CompVis yaml beside it."""
    state = single_file_state(build_components(config, seed=seed))
    save_safetensors(state, path)
    if yaml:
        path.with_suffix(".yaml").write_text(compvis_yaml(config, "hf" if config is SD1 else "openclip"))
    return state


def assert_holds(pipe, components) -> None:
    for ours, theirs in ((pipe.unet, components.unet), (pipe.vae, components.autoencoder)):
        a, b = ours.state_dict(), theirs.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in b)


class _LightningCallback:
    """Pickled under pytorch_lightning's name, as in released SD 1.x .ckpt files."""

    def __init__(self) -> None:
        self.best_model_path = "/logs/last.ckpt"
        self.best_model_score = torch.tensor(0.1)


def _save_with_fake_lightning(obj, path: Path) -> None:
    names = (
        "pytorch_lightning",
        "pytorch_lightning.callbacks",
        "pytorch_lightning.callbacks.model_checkpoint",
    )
    modules = {name: types.ModuleType(name) for name in names}
    modules[names[-1]].ModelCheckpoint = _LightningCallback
    _LightningCallback.__module__, _LightningCallback.__qualname__ = names[-1], "ModelCheckpoint"
    sys.modules.update(modules)
    try:
        torch.save(obj, path)
    finally:
        for name in names:
            del sys.modules[name]


def test_lightning_ckpt_with_ema_buffers_and_mixed_dtypes_loads(tmp_path):
    path = tmp_path / "512-inpainting-ema.ckpt"
    state = write_bare(SD1, path.with_suffix(".safetensors"))
    path.with_suffix(".yaml").write_text(path.with_suffix(".safetensors").with_suffix(".yaml").read_text())
    nested = {k: v.to(torch.bfloat16) if "input_blocks" in k else v for k, v in state.items()}
    nested.update(betas=torch.linspace(1e-4, 2e-2, 1000), alphas_cumprod=torch.ones(1000))
    nested["model_ema.diffusion_modelinput_blocks00weight"] = torch.zeros(3)
    nested["model_ema.num_updates"] = torch.tensor(7)
    checkpoint = {
        "state_dict": nested,
        "global_step": 470000,
        "epoch": 3,
        "pytorch-lightning_version": "1.4.2",
        "callbacks": {"ModelCheckpoint": _LightningCallback()},
        "loss": np.float64(0.1),
    }
    _save_with_fake_lightning(checkpoint, path)
    pipe = ld.load(path)
    unet = pipe.unet.state_dict()
    assert torch.equal(
        unet["conv_in.weight"], state["model.diffusion_model.input_blocks.0.0.weight"].bfloat16().float()
    )
    assert torch.equal(unet["conv_out.weight"], state["model.diffusion_model.out.2.weight"])


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("kind", ["torch-zip", "raw-pickle"])
def test_hostile_pickle_is_refused_and_never_runs(tmp_path, capsys, kind):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.ckpt"
    if kind == "torch-zip":
        torch.save({"state_dict": {"w": torch.ones(2)}, "x": _Payload(marker)}, path)
    else:
        path.write_bytes(pickle.dumps({"x": _Payload(marker)}, protocol=2))
    with pytest.raises(UserError, match=r"refusing to load .*system"):
        ld.load(path)
    assert main(["generate", "x", "--model", str(path), "--steps", "1", "--size", "16"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "refusing to load" in err
    assert not marker.exists()


def test_truncated_and_foreign_files_get_one_clear_message(tmp_path):
    good = tmp_path / "good.safetensors"
    write_bare(SD1, good)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-1000])
    with pytest.raises(UserError, match="truncated"):
        ld.load(cut)
    torch.save({"state_dict": {"w": torch.ones(100)}}, tmp_path / "full.ckpt")
    (tmp_path / "cut.ckpt").write_bytes((tmp_path / "full.ckpt").read_bytes()[:300])
    with pytest.raises(UserError, match="truncated, or not a PyTorch checkpoint"):
        ld.load(tmp_path / "cut.ckpt")
    (tmp_path / "notes.safetensors").write_text("these are my notes, not weights")
    with pytest.raises(UserError, match="not a checkpoint"):
        ld.load(tmp_path / "notes.safetensors")


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"], "LoRA"),
        (["conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"], "SDXL"),
        (["down_blocks.0.resnets.0.conv1.weight", "conv_in.weight"], "single diffusers component"),
        (["weight", "bias"], "not a Stable Diffusion"),
    ],
)
def test_files_of_other_kinds_are_named(tmp_path, keys, message):
    path = tmp_path / "other.safetensors"
    save_safetensors({k: torch.zeros(1) for k in keys}, path)
    with pytest.raises(UserError, match=message):
        ld.load(path)


def test_missing_unexpected_and_misshapen_keys_are_listed(tmp_path):
    path = tmp_path / "broken.safetensors"
    state = write_bare(SD1, path)
    del state["model.diffusion_model.out.2.bias"]
    state["model.diffusion_model.out.2.weight"] = torch.zeros(4, 32, 1, 1)
    state["model.diffusion_model.extra_block.weight"] = torch.zeros(1)
    save_safetensors(state, path)
    with pytest.raises(UserError) as error:
        ld.load(path)
    message = str(error.value)
    assert "[unet] does not fit the model" in message
    assert "missing keys: conv_out.bias" in message
    assert "unexpected keys: extra_block.weight" in message
    assert "conv_out.weight (file (4, 32, 1, 1), model (4, 32, 3, 3))" in message
    state.pop("model.diffusion_model.extra_block.weight")
    state["cond_stage_model.model.ln_final.weight"] = torch.zeros(64)
    save_safetensors(state, path)
    with pytest.raises(UserError, match=r"unexpected keys: cond_stage_model\.model\.ln_final\.weight"):
        ld.load(path)


def test_safetensors_weights_are_adopted_without_a_copy(tmp_path):
    path = tmp_path / "model.safetensors"
    write_bare(SD1, path)
    pipe = ld.load(path)
    weight = pipe.unet.conv_in.weight
    assert weight.untyped_storage().nbytes() == path.stat().st_size  # a view of the one file mapping
    assert read_state_dict(path)["model.diffusion_model.input_blocks.0.0.weight"].equal(weight)


@pytest.mark.parametrize(("bias", "expected"), [(-5.0, "v_prediction"), (5.0, "epsilon")])
def test_sd2_prediction_type_is_probed_when_nothing_says(tmp_path, bias, expected):
    components = build_components(SD2)
    with torch.no_grad():
        components.unet.conv_out.weight.zero_()
        components.unet.conv_out.bias.fill_(bias)
    path = tmp_path / "v2-model.safetensors"
    save_safetensors(single_file_state(components), path)  # no yaml, no metadata, no marker
    pipe = ld.load(path)
    assert pipe.config.schedule.prediction_type == expected
    assert pipe.config.sample_size == (768 if expected == "v_prediction" else 512)
    assert pipe.config.unet == replace(SD2.unet, upcast_attention=True)
    assert ld.load(path, prediction_type="epsilon").config.schedule.prediction_type == "epsilon"


def test_yaml_parameterization_and_override(tmp_path):
    path = tmp_path / "model.safetensors"
    v_config = replace(SD1, schedule=replace(SD1.schedule, prediction_type="v_prediction"))
    save_safetensors(single_file_state(build_components(SD1)), path)
    path.with_suffix(".yaml").write_text(compvis_yaml(v_config, "hf"))
    assert ld.load(path).config.schedule.prediction_type == "v_prediction"
    assert ld.load(path, prediction_type="epsilon").config.schedule.prediction_type == "epsilon"


def test_old_transformers_text_names_are_read(tmp_path):
    path = tmp_path / "old.safetensors"
    state = write_bare(SD1, path)
    old = {
        k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
        for k, v in state.items()
    }
    save_safetensors(old, path)
    pipe = ld.load(path)
    expected = state["cond_stage_model.transformer.text_model.final_layer_norm.weight"]
    assert torch.equal(pipe.text_encoder.final_layer_norm.weight, expected)
