"""Training an SD3 model (a tiny random MMDiT with CLIP-L, bigG and T5; ``tests/families/sd3_fixtures``)
through the project's loop: the diffusion task trains the family's network ("transformer") on the
rectified-flow objective with SD3's conditioning; fine-tuning on the shapes world lowers the loss, and a
run resumed from a checkpoint continues bit-exactly; the export loads and generates. LoRA fine-tuning
adapts the MMDiT's attention and MLP layers and both CLIP encoders and exports diffusers' PEFT format,
which reproduces the trained model in our loader and in StableDiffusion3Pipeline.load_lora_weights."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import latentdiffusion as ld
from latentdiffusion.checkpoints.formats import save_components
from latentdiffusion.checkpoints.native import save_native
from latentdiffusion.checkpoints.safe_io import read_metadata, read_state_dict
from latentdiffusion.components import build_components
from latentdiffusion.pipelines.pipeline import Pipeline
from latentdiffusion.training.diffusion import DiffusionTask
from latentdiffusion.training.finetune import LoRAOptions, finetune, finetune_config
from latentdiffusion.training.task import StepRandom


def _fixtures():
    path = Path(__file__).parents[1] / "families" / "sd3_fixtures.py"
    spec = importlib.util.spec_from_file_location("training_sd3_fixtures", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY_SD3 = _fixtures().TINY_SD3
SHAPES = {
    "data.dataset": "shapes",
    "data.resolution": 32,
    "data.holdout": 0,
    "batch_size": 4,
    "optim.warmup_steps": 0,
    "log_every": 1,
}


@pytest.fixture(scope="module")
def sd3_model(tmp_path_factory):
    """A tiny random SD3 model saved natively (what ``ldm finetune --model`` reads) and as a diffusers
    folder beside it (``diffusers/``)."""
    folder = tmp_path_factory.mktemp("sd3-train") / "model"
    components = build_components(TINY_SD3, seed=3, name="tiny-sd3")
    save_native(components, folder)
    save_components(components, folder.parent / "diffusers", "diffusers")
    return folder


def config_for(model: Path, **overrides):
    return finetune_config(str(model), TINY_SD3, lora=False, overrides=SHAPES | overrides)


def losses(run: Path) -> list[float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [record["loss"] for record in map(json.loads, lines) if "loss" in record and "step" in record]


def test_the_task_trains_the_transformer_on_the_flow_target(sd3_model):
    """The MMDiT sees x_t = (1 - t) z0 + t eps at timestep t * 1000 with SD3's joint context (77 CLIP
    tokens + T5's) and pooled vector, and regresses eps - z0; only its weights are trained."""
    config = config_for(sd3_model)
    components = ld.load(str(sd3_model)).components
    task = DiffusionTask(config, components, torch.device("cpu"))
    assert set(task.networks) == {"transformer", "text_encoder", "text_encoder_2", "text_encoder_3"}
    assert task.parameter_groups()["model"] == list(components.modules["transformer"].parameters())
    from latentdiffusion.training.data import Batch
    from latentdiffusion.training.shapes import ShapesDataset, images_to_tensor

    items = [ShapesDataset(0)[i] for i in range(2)]
    images = images_to_tensor([image.resize((32, 32)) for image, _ in items])
    batch = Batch(images, [caption for _, caption in items], torch.arange(2))
    seen = {}

    def record(module, args, kwargs, output):
        seen.update(x=args[0], t=args[1], prediction=output, **kwargs)

    handle = task.network.register_forward_hook(record, with_kwargs=True)
    loss = task.losses(task.forward_modules(), batch, StepRandom(0, 0, 2, batch.positions), 0)[0]["model"]
    handle.remove()
    random = StepRandom(0, 0, 2, batch.positions)
    z0 = task.latents(batch, random)
    t = torch.sigmoid(random.randn())
    eps = random.randn(*z0.shape[1:])
    t4 = t.view(-1, 1, 1, 1)
    assert torch.allclose(seen["t"], t * 1000)
    assert torch.allclose(seen["x"], (1 - t4) * z0 + t4 * eps, atol=1e-6)
    assert seen["context"].shape == (2, 77 + TINY_SD3.text_encoder_3.max_length, 96)
    assert seen["y"].shape == (2, 72)
    weight = (((1 - t) / t) ** 2).clamp(max=5.0) * t**2  # min-SNR-5 on the x0 error
    per_sample = (seen["prediction"] - (eps - z0)).pow(2).mean(dim=(1, 2, 3))
    assert torch.allclose(loss, (weight * per_sample).mean(), rtol=1e-5)


def test_gradient_checkpointing_of_the_joint_blocks_keeps_the_gradients(sd3_model, shapes_batch):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    from latentdiffusion.training.loop import apply_activation_checkpointing

    batch, grads = shapes_batch(2), []
    for checkpointing in (False, True):
        task = DiffusionTask(config_for(sd3_model), ld.load(str(sd3_model)).components, torch.device("cpu"))
        task.network.requires_grad_(True)
        if checkpointing:
            apply_activation_checkpointing(task)
            assert all(isinstance(block, CheckpointWrapper) for block in task.network.blocks)
        loss = task.losses(task.forward_modules(), batch, StepRandom(0, 0, 2, batch.positions), 0)[0]["model"]
        loss.backward()
        grads.append([p.grad.clone() for p in task.network.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_finetuning_on_shapes_lowers_the_flow_loss(sd3_model, tmp_path):
    """40 steps of batch 4 (fixed seed): the mean loss of the last 10 steps is well below that of the
    first 10 (3.21 against 3.72; much of the velocity loss is irreducible noise at this size)."""
    config = config_for(sd3_model, max_steps=40, **{"optim.lr": 1e-2, "diffusion.min_snr_gamma": None})
    finetune(config, tmp_path / "run")
    history = losses(tmp_path / "run")
    assert len(history) == 40
    early, late = sum(history[:10]) / 10, sum(history[-10:]) / 10
    assert late < 0.9 * early, (early, late)


def test_resumed_finetuning_is_bit_exact_and_the_export_generates(
    sd3_model, tmp_path, monkeypatch, interrupt_after
):
    config = config_for(sd3_model, max_steps=4, checkpoint_every=2, **{"optim.lr": 1e-3})
    finetune(config, tmp_path / "straight")
    interrupt_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        finetune(config, tmp_path / "resumed")
    monkeypatch.undo()
    assert finetune(config, tmp_path / "resumed", resume=True).run.step == 4
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")
    straight = load_file(tmp_path / "straight/export/model.safetensors")
    resumed = load_file(tmp_path / "resumed/export/model.safetensors")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[key], resumed[key]) for key in straight)
    start = load_file(sd3_model / "model.safetensors")
    changed = [key for key in start if not torch.equal(start[key], straight[key])]
    assert changed and all(key.startswith("transformer.") for key in changed)
    pipe = ld.load(str(tmp_path / "straight/export"))
    assert pipe.family.name == "sd3"
    image = pipe.generate("a red circle", steps=2, sampler="euler", width=32, height=32, seed=0)[0]
    assert image.size == (32, 32)


def generate(pipe, start: torch.Tensor) -> np.ndarray:
    images = pipe.generate(
        ["a red circle", "two blue squares"], width=32, height=32, steps=3, guidance_scale=4.0,
        sampler="euler", latents=start,
    )  # fmt: skip
    return np.stack([np.asarray(image, dtype=np.float64) / 255 for image in images])


def test_lora_finetuning_exports_a_peft_file_that_diffusers_reads(sd3_model, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    components = ld.load(str(sd3_model)).components
    options = LoRAOptions(rank=4, alpha=2.0, targets=("attention", "ff", "text"))
    config = finetune_config(
        str(sd3_model), TINY_SD3, lora=True, overrides=SHAPES | {"max_steps": 3, "optim.lr": 5e-2}
    )
    result = finetune(config, tmp_path / "run", options, components=components)
    weights, metadata = read_state_dict(result.lora_file), read_metadata(result.lora_file)
    roles = {key.split(".")[0] for key in weights}
    assert roles == {"transformer", "text_encoder", "text_encoder_2"}  # T5 has no adapters
    assert "transformer.transformer_blocks.1.attn.add_q_proj.lora_A.weight" in weights
    assert "transformer.transformer_blocks.0.ff.net.2.lora_B.weight" in weights
    adapter = json.loads(metadata["lora_adapter_metadata"])
    assert adapter["transformer.r"] == 4 and adapter["text_encoder_2.lora_alpha"] == 2.0
    assert metadata["ss_base_model_version"] == "sd3"

    start = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(4))
    trained = generate(Pipeline(components.eval()), start)  # the adapters as trained, unmerged
    plain = ld.load(str(sd3_model))
    before = generate(plain, start)
    plain.load_lora(result.lora_file)
    ours = generate(plain, start)
    assert np.abs(trained - before).max() > 0.02  # training moved the adapters (12 levels)
    assert np.abs(ours - trained).max() <= 1 / 255 + 1e-6
    theirs = diffusers.StableDiffusion3Pipeline.from_pretrained(sd3_model.parent / "diffusers")
    theirs.scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    theirs.set_progress_bar_config(disable=True)
    theirs.load_lora_weights(str(result.lora_file))
    expected = theirs(
        ["a red circle", "two blue squares"], height=32, width=32, num_inference_steps=3,
        guidance_scale=4.0, latents=start.clone(), output_type="np",
    ).images  # fmt: skip
    assert np.abs(ours - expected).max() <= 1 / 255 + 1e-6


def test_ldm_finetune_lora_on_sd3_and_generate_with_it(sd3_model, tmp_path, capsys):
    from latentdiffusion.cli.main import main

    run = tmp_path / "run"
    common = ["finetune", "--model", str(sd3_model), "--lora", "--rank", "2", "-o", str(run), "--quiet"]
    data = ["--data.dataset=shapes", "--data.resolution=32", "--optim.lr=5e-2", "--optim.warmup_steps=0"]
    assert main([*common, "--targets", "resnets", *data, "--max_steps=1"]) == 2
    assert "LoRA targets resnets select no layer of this model (transformer" in capsys.readouterr().err
    assert main([*common, "--targets", "attention,ff", *data, "--max_steps=2"]) == 0
    lora_file = run / "export" / "lora.safetensors"
    assert {key.split(".")[0] for key in read_state_dict(lora_file)} == {"transformer"}
    args = ["generate", "a red circle", "--model", str(sd3_model), "--size", "32", "--steps", "2", "--quiet"]
    assert main([*args, "-o", str(tmp_path / "plain.png")]) == 0
    assert main([*args, "-o", str(tmp_path / "lora.png"), "--lora", f"{lora_file}:1.0"]) == 0
    plain, adapted = (np.asarray(Image.open(tmp_path / name)) for name in ("plain.png", "lora.png"))
    assert not np.array_equal(plain, adapted)
