import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from latentdiffusion.components import build_components
from latentdiffusion.errors import UserError
from latentdiffusion.training.autoencoder import AutoencoderTask
from latentdiffusion.training.config import apply_overrides
from latentdiffusion.training.diffusion import DiffusionTask
from latentdiffusion.training.loop import apply_activation_checkpointing, build_model, train
from latentdiffusion.training.presets import get_train_preset
from latentdiffusion.training.shapes import ShapesDataset
from latentdiffusion.training.task import StepRandom

CPU = torch.device("cpu")
NO_SAMPLES = {"sample.prompts": "", "data.holdout": 2}


def tiny(name: str, **overrides) -> object:
    return apply_overrides(get_train_preset(name), NO_SAMPLES | overrides)


def test_autoencoder_overfits_one_batch(shapes_batch, overfit):
    config = tiny("tiny-autoencoder", **{"autoencoder_loss.disc_start": 10**6})
    task = AutoencoderTask(config, build_components(config.model), CPU)
    losses = overfit(task, shapes_batch(2, resolution=16), steps=25, lr=3e-3)
    assert losses[-1] < 0.5 * losses[0]


def test_diffusion_overfits_one_batch(shapes_batch, overfit):
    config = tiny("tiny")
    task = DiffusionTask(config, build_components(config.model), CPU)
    losses = overfit(task, shapes_batch(2), steps=25, lr=3e-3)
    assert losses[-1] < 0.3 * losses[0]


def test_timestep_shift_draws_training_steps_nearer_high_noise():
    def draws(shift: float) -> torch.Tensor:
        config = tiny("tiny", **{"diffusion.timestep_shift": shift})
        task = DiffusionTask(config, build_components(config.model), CPU)
        return torch.cat([task.timesteps(StepRandom(0, b, 256, torch.arange(256))) for b in range(8)])

    plain, shifted = draws(1.0), draws(3.0)
    assert plain.dtype == shifted.dtype == torch.long
    assert shifted.min() >= 0 and shifted.max() <= 999
    assert abs(plain.float().median() - 500) < 40  # uniform: half below the middle step
    assert abs(shifted.float().median() - 750) < 40  # shift 3: the median fraction 0.5 maps to 0.75
    with pytest.raises(UserError, match="timestep_shift"):
        train(tiny("tiny", **{"diffusion.timestep_shift": 0}), "unused")


def test_autoencoder_gan_terms_switch_on_after_the_warm_up(shapes_batch):
    config = tiny("tiny-autoencoder", **{"autoencoder_loss.disc_start": 1})
    task = AutoencoderTask(config, build_components(config.model), CPU)
    task.autoencoder.requires_grad_(True)
    batch = shapes_batch(2)
    random = StepRandom(0, 0, 2, batch.positions)
    assert set(task.losses(task.forward_modules(), batch, random, 0)[0]) == {"autoencoder"}
    losses, logs = task.losses(task.forward_modules(), batch, StepRandom(0, 0, 2, batch.positions), 1)
    assert set(losses) == {"autoencoder", "discriminator"} and logs["d_weight"] > 0


def assert_same_tensors(a, b, path="") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_same_tensors(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list | tuple):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_tensors(x, y, f"{path}[{i}]")


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
@pytest.mark.parametrize("preset", ["tiny", "tiny-autoencoder"])  # the autoencoder's with a discriminator
def test_resume_is_bitwise_identical(tmp_path, monkeypatch, interrupt_after, preset, optimizer):
    config = tiny(preset, max_steps=4, checkpoint_every=2, **{"optim.name": optimizer})
    train(config, tmp_path / "straight")
    interrupt_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "resumed")
    monkeypatch.undo()
    result = train(config, tmp_path / "resumed", resume=True)
    assert result.step == 4
    load = lambda run: torch.load(run / "checkpoints/step-00000004.pt", weights_only=True)  # noqa: E731
    straight, resumed = load(tmp_path / "straight"), load(tmp_path / "resumed")
    for key in ("networks", "ema", "optimizers", "schedulers"):
        assert_same_tensors(straight[key], resumed[key], key)
    adafactor = [("beta2_decay" in o["param_groups"][0]) for o in straight["optimizers"].values()]
    assert adafactor == [optimizer == "adafactor"] * len(straight["optimizers"])  # the discriminator's too
    assert_same_tensors(
        load_file(tmp_path / "straight/export/model.safetensors"),
        load_file(tmp_path / "resumed/export/model.safetensors"),
    )
    steps = [
        line for line in (tmp_path / "resumed/metrics.jsonl").read_text().splitlines() if '"loss"' in line
    ]
    assert len(steps) == 4  # the interrupted run's lines past the checkpoint are not duplicated


def test_existing_run_needs_resume_and_the_same_config(tmp_path):
    config = tiny("tiny", max_steps=2)
    train(config, tmp_path)
    with pytest.raises(UserError, match="pass --resume"):
        train(config, tmp_path)
    with pytest.raises(UserError, match=r"cannot resume with a different config \(optim.lr"):
        train(apply_overrides(config, {"optim.lr": 0.5}), tmp_path, resume=True)
    assert train(apply_overrides(config, {"max_steps": 3}), tmp_path, resume=True).step == 3
    assert train(apply_overrides(config, {"max_steps": 3}), tmp_path, resume=True).step == 3  # done: a no-op
    with pytest.raises(UserError, match="trained to step 3, past max_steps 2"):  # not step 3's weights as 2's
        train(config, tmp_path, resume=True)


def test_resume_accepts_a_run_saved_before_a_config_field_existed(tmp_path):
    config = tiny("tiny", max_steps=2)
    train(config, tmp_path)
    path = tmp_path / "checkpoints/step-00000002.pt"
    state = torch.load(path, weights_only=True)
    saved = json.loads(state["config"])
    del saved["model"]["autoencoder"]["shift_factor"]  # as if the field had been added since the run began
    state["config"] = json.dumps(saved)
    torch.save(state, path)
    assert train(apply_overrides(config, {"max_steps": 3}), tmp_path, resume=True).step == 3


def test_torchrun_two_processes_match_one_process(tmp_path):
    # Adam's eps at 1 makes its step proportional to the gradient, so that float rounding in the
    # all-reduce is not amplified to +-lr on near-zero gradients; the check is then on gradient averaging.
    settings = {"max_steps": 3, "checkpoint_every": 0, "optim.eps": 1.0, "optim.lr": 0.1}
    overrides = [f"--{k}={v}" for k, v in (NO_SAMPLES | settings).items()]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "latentdiffusion.cli.main",
        "train",
        "--preset",
        "tiny",
        "--batch_size=1",
        "-o",
        str(tmp_path / "ddp"),
        "--quiet",
        *overrides,
    ]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    single = train(tiny("tiny", batch_size=2, **settings), tmp_path / "single")
    ddp = load_file(tmp_path / "ddp/export/model.safetensors")
    one = load_file(single.export_dir / "model.safetensors")
    assert ddp.keys() == one.keys()
    for key in one:
        torch.testing.assert_close(ddp[key], one[key], rtol=1e-5, atol=1e-6, msg=key)
    start = build_components(single.config.model, seed=0).unet.state_dict()
    assert not torch.equal(one["unet.conv_out.weight"], start["conv_out.weight"])  # it did train
    ddp_log = [json.loads(line) for line in (tmp_path / "ddp/metrics.jsonl").read_text().splitlines()]
    one_log = [json.loads(line) for line in (tmp_path / "single/metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in ddp_log if "loss" in r] == pytest.approx(
        [r["loss"] for r in one_log if "loss" in r]
    )


def test_gradient_checkpointing_keeps_gradients_and_keys(shapes_batch):
    config = tiny("tiny")
    batch = shapes_batch(2)
    grads = []
    for checkpointing in (False, True):
        task = DiffusionTask(config, build_components(config.model), CPU)
        task.unet.requires_grad_(True)
        keys = list(task.unet.state_dict())
        if checkpointing:
            apply_activation_checkpointing(task)
            assert list(task.unet.state_dict()) == keys
        loss = task.losses(task.forward_modules(), batch, StepRandom(0, 0, 2, batch.positions), 0)[0]["model"]
        loss.backward()
        grads.append([p.grad.clone() for p in task.unet.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_options_run_together(tmp_path):
    """bf16 autocast, v-prediction with zero terminal SNR, offset noise, gradient accumulation and
    checkpointing, a frozen text encoder and latent caching in one short run."""
    config = tiny(
        "tiny",
        max_steps=2,
        precision="bf16",
        gradient_checkpointing=True,
        **{
            "model.schedule.prediction_type": "v_prediction",
            "model.schedule.rescale_zero_terminal_snr": True,
            "diffusion.offset_noise": 0.1,
            "diffusion.train_text_encoder": False,
            "optim.grad_accumulation": 2,
            "data.cache_latents": True,
            "data.size": 6,
        },
    )
    result = train(config, tmp_path)
    assert torch.isfinite(torch.tensor(result.metrics["loss"]))
    start = build_components(config.model, seed=config.seed).text_encoder.state_dict()
    exported = load_file(result.export_dir / "model.safetensors")
    assert all(torch.equal(exported[f"text_encoder.{k}"], v) for k, v in start.items())
    assert (tmp_path / "latents.pt").is_file()


def test_hooks_select_parameters_and_build_the_model(tmp_path):
    first = train(tiny("tiny", max_steps=1), tmp_path / "first")
    config = tiny("tiny", max_steps=2, init=str(first.export_dir), autoencoder=None)

    def only_conv_out(task):
        return {"model": list(task.unet.conv_out.parameters())}

    result = train(config, tmp_path / "second", select_trainable=only_conv_out)
    before, after = (
        load_file(first.export_dir / "model.safetensors"),
        load_file(result.export_dir / "model.safetensors"),
    )
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"unet.conv_out.weight", "unet.conv_out.bias"}

    calls = []

    def builder(cfg):
        calls.append(cfg.name)
        return build_components(replace(cfg.model, name="custom"), seed=1)

    assert (
        train(tiny("tiny", max_steps=1), tmp_path / "third", build_model=builder).config.model.name
        == "custom"
    )
    assert calls == ["tiny"]
    assert Path(tmp_path / "third/export/latentdiffusion.json").is_file()


def write_datasets(root: Path) -> dict[str, Path]:
    """The same 12 shapes items as an image folder, two tar shards and Fashion-MNIST-style IDX files."""
    import io
    import tarfile

    import numpy as np

    items = [ShapesDataset(0)[i] for i in range(12)]
    folder, shards, idx = root / "folder", root / "shards", root / "idx"
    for path in (folder, shards, idx):
        path.mkdir()
    for i, (image, caption) in enumerate(items):
        image.save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(caption)
    for s in range(2):
        with tarfile.open(shards / f"{s:06d}.tar", "w") as tar:
            for i in range(s * 6, s * 6 + 6):
                for name, data in (
                    (f"{i:06d}.png", (folder / f"{i:03d}.png").read_bytes()),
                    (f"{i:06d}.txt", items[i][1].encode()),
                ):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    grey = np.stack([np.asarray(image.convert("L").resize((28, 28))) for image, _ in items])
    (idx / "train-images-idx3-ubyte").write_bytes(
        bytes([0, 0, 8, 3, 0, 0, 0, 12, 0, 0, 0, 28, 0, 0, 0, 28]) + grey.tobytes()
    )
    (idx / "train-labels-idx1-ubyte").write_bytes(
        bytes([0, 0, 8, 1, 0, 0, 0, 12]) + bytes(range(10)) + bytes([0, 1])
    )
    return {"imagefolder": folder, "webdataset": shards, "fashion-mnist": idx}


@pytest.mark.parametrize("dataset", ["imagefolder", "webdataset", "fashion-mnist"])
def test_every_dataset_trains(tmp_path, dataset):
    paths = write_datasets(tmp_path)
    workers = 2 if dataset == "webdataset" else 0
    config = tiny(
        "tiny-autoencoder",
        max_steps=2,
        **{"data.dataset": dataset, "data.path": str(paths[dataset]), "data.num_workers": workers},
    )
    result = train(config, tmp_path / "run")
    assert result.step == 2 and result.metrics["bad_samples"] == 0
    assert (tmp_path / "run/export/model.safetensors").is_file()


def test_init_model_gains_coordinate_channels_and_an_open_text_mask_when_the_config_asks(tmp_path):
    first = train(tiny("tiny", max_steps=1), tmp_path / "first")
    assert not first.config.model.unet.coordinate_channels and first.config.model.text_encoder.causal
    config = tiny("tiny", max_steps=1, init=str(first.export_dir), autoencoder=None)
    model = config.model
    config = replace(
        config,
        model=replace(
            model,
            unet=replace(model.unet, coordinate_channels=True),
            text_encoder=replace(model.text_encoder, causal=False),
        ),
    )
    components = build_model(config)
    assert components.config.unet.coordinate_channels and not components.config.text_encoder.causal
    assert not components.text_encoder.layers[0].self_attn.causal
    assert components.unet.conv_in.weight.shape[1] == config.model.unet.in_channels + 2
    result = train(config, tmp_path / "second")
    assert result.config.model.unet.coordinate_channels and not result.config.model.text_encoder.causal
    exported = load_file(result.export_dir / "model.safetensors")
    assert exported["unet.conv_in.weight"].shape[1] == config.model.unet.in_channels + 2
