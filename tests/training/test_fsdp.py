"""FSDP (``--distributed.strategy=fsdp``): 2 processes (gloo, CPU) fine-tuning a tiny SDXL-shaped model,
with activation checkpointing and EMA, give the losses and weights of 1 process with the same global batch,
also across a resume; the checkpoint holds full weights under the model's names."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from latentdiffusion.checkpoints.native import save_native
from latentdiffusion.components import build_components
from latentdiffusion.errors import UserError
from latentdiffusion.pipelines.loading import load_components
from latentdiffusion.training.config import apply_overrides, get_train_preset
from latentdiffusion.training.finetune import finetune, finetune_config
from latentdiffusion.training.loop import train


def _tiny_sdxl():
    path = Path(__file__).parents[1] / "families" / "sdxl_fixtures.py"
    spec = importlib.util.spec_from_file_location("fsdp_sdxl_fixtures", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TINY_SDXL


# Adam's eps at 1 makes its step proportional to the gradient, so that float rounding in the gradient
# reduction is not amplified to +-lr on near-zero gradients (as in the DDP test of test_loop.py).
SETTINGS = {
    "optim.eps": 1.0,
    "optim.lr": 0.1,
    "optim.warmup_steps": 0,
    "optim.schedule": "constant",  # the same rates for 3 steps straight and for 2 steps plus 1 resumed
    "ema_decay": 0.9,
    "log_every": 1,
    "data.resolution": 32,
    "diffusion.min_snr_gamma": None,
}


# Both parts of the run in one torchrun job (one start-up): the process group is the worker's, so each
# finetune() call joins it (training.distributed.setup) instead of starting its own.
WORKER = """
import json, sys
import torch.distributed as dist
from latentdiffusion.pipelines.loading import load_components
from latentdiffusion.training.finetune import finetune, finetune_config

dist.init_process_group("gloo")
model, run, overrides = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
for steps, resume in ((2, False), (3, True)):
    settings = overrides | {"max_steps": steps}
    config = finetune_config(model, load_components(model).config, lora=False, overrides=settings)
    finetune(config, run, resume=resume)
dist.destroy_process_group()
"""


def torchrun_fsdp(tmp_path: Path, model: Path, run: Path, overrides: dict) -> None:
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(worker),
    ]
    command += [str(model), str(run), json.dumps(overrides)]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]


def losses(run: Path) -> list[float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [record["loss"] for record in map(json.loads, lines) if "loss" in record]


def test_fsdp_two_processes_match_one_process_across_a_resume(tmp_path):
    model, images = tmp_path / "model", tmp_path / "images"
    save_native(build_components(_tiny_sdxl(), seed=5, name="tiny-sdxl"), model)
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"a photo of thing {i}")

    run = tmp_path / "fsdp"
    data = {"data.path": str(images), "batch_size": 1}
    parallel = {"distributed.strategy": "fsdp", "gradient_checkpointing": True, "checkpoint_every": 2}
    torchrun_fsdp(tmp_path, model, run, SETTINGS | data | parallel)  # 2 steps, then resumed for a third
    state = torch.load(run / "checkpoints/step-00000002.pt", weights_only=True)

    components = load_components(str(model))
    overrides = SETTINGS | {"data.path": str(images), "batch_size": 2, "max_steps": 3, "checkpoint_every": 2}
    config = finetune_config(str(model), components.config, lora=False, overrides=overrides)
    single = finetune(config, tmp_path / "single", components=components)
    one = torch.load(tmp_path / "single/checkpoints/step-00000002.pt", weights_only=True)
    assert state["networks"]["unet"].keys() == one["networks"]["unet"].keys()  # full weights, same names
    assert set(state["optimizers"]["model"]["state"]) == {f"unet.{k}" for k in one["networks"]["unet"]}

    sharded, whole = (
        load_file(run / "export/model.safetensors"),
        load_file(single.model_dir / "model.safetensors"),
    )
    assert sharded.keys() == whole.keys()
    for key in whole:
        torch.testing.assert_close(sharded[key], whole[key], rtol=1e-5, atol=1e-6, msg=key)
    start = load_file(model / "model.safetensors")
    assert not torch.equal(whole["unet.conv_out.weight"], start["unet.conv_out.weight"])  # it did train
    assert losses(run) == pytest.approx(losses(tmp_path / "single"), rel=1e-5)
    assert len(losses(run)) == 3


def test_fsdp_refuses_tasks_with_several_optimisers(tmp_path):
    overrides = {"sample.prompts": "", "data.holdout": 2, "distributed.strategy": "fsdp", "max_steps": 1}
    config = apply_overrides(get_train_preset("tiny-autoencoder"), overrides)
    with pytest.raises(UserError, match="one optimiser"):
        train(config, tmp_path)
    with pytest.raises(UserError, match=r"distributed\.strategy"):
        train(apply_overrides(config, {"distributed.strategy": "zero"}), tmp_path)


def test_an_fsdp_run_of_one_process_resumes_bit_for_bit(tmp_path, monkeypatch, interrupt_after):
    """One process does not shard, but keeps the FSDP checkpoint format (optimiser state by names)."""
    overrides = {"sample.prompts": "", "data.holdout": 2, "distributed.strategy": "fsdp"}
    config = apply_overrides(get_train_preset("tiny"), overrides | {"max_steps": 4, "checkpoint_every": 2})
    train(config, tmp_path / "straight")
    interrupt_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "resumed")
    monkeypatch.undo()
    train(config, tmp_path / "resumed", resume=True)
    load = lambda run: torch.load(run / "checkpoints/step-00000004.pt", weights_only=True)  # noqa: E731
    straight, resumed = load(tmp_path / "straight"), load(tmp_path / "resumed")
    assert "unet.conv_out.weight" in straight["optimizers"]["model"]["state"]
    for key in ("networks", "ema"):
        assert_same(straight[key], resumed[key])
    assert_same(straight["optimizers"]["model"]["state"], resumed["optimizers"]["model"]["state"])


def assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, list | tuple):
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
