"""Diffusion-DPO (``ldm finetune --dpo``) on a tiny model at 32 px: the loss is the paper's formula, log 2
where the model is its reference, shares noise and time within a pair, and training on pairs makes the
model favour the preferred images; LoRA runs use the adapter-free network as reference; the pairs folder
is read strictly; the CLI records, resumes and refuses options. And ``ldm shapes-pairs``: pairs from
images judged by the strict checker, resumable."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

import latentdiffusion as ld
from latentdiffusion.cli.main import main
from latentdiffusion.components import build_components
from latentdiffusion.errors import UserError
from latentdiffusion.evaluation.shapes_pairs import PairSettings, make_pairs, pair_prompts
from latentdiffusion.models.lora import inject_lora, lora_modules
from latentdiffusion.training.data import Batch
from latentdiffusion.training.finetune import finetune_config
from latentdiffusion.training.preference import (
    PREFERENCE_DEFAULTS,
    PreferenceOptions,
    PreferenceTask,
    dpo_loss,
    read_pairs,
)
from latentdiffusion.training.shapes import ShapesDataset, render, scene_for_prompt
from latentdiffusion.training.task import StepRandom

CPU = torch.device("cpu")
FAST = ["--quiet", "--data.resolution=32", "--batch_size=2", "--optim.warmup_steps=0"]


def write_pairs_folder(root: Path, count: int = 4) -> Path:
    """Pairs of a dataset image (preferred) and a flat image of its background colour (the other)."""
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        image, caption = ShapesDataset(0)[i]
        image.save(root / f"w{i}.png")
        Image.new("RGB", image.size, image.getpixel((0, 0))).save(root / f"l{i}.png")
        lines.append(json.dumps({"prompt": caption, "chosen": f"w{i}.png", "rejected": f"l{i}.png"}))
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return root


def task_for(components, pairs: Path, beta: float = 5000.0, sft: float = 0.0) -> PreferenceTask:
    overrides = PREFERENCE_DEFAULTS | {"data.resolution": 32}
    config = finetune_config("tiny", components.config, lora=False, overrides=overrides)
    return PreferenceTask(config, components, CPU, PreferenceOptions(str(pairs), beta, sft))


def pair_batch(task: PreferenceTask) -> Batch:
    source = task.open_data(task.config.data, 0).source
    items = [source.load(i) for i in range(source.size)]
    return Batch(torch.stack([x for x, _ in items]), [c for _, c in items], torch.arange(len(items)))


def test_the_loss_is_the_papers_formula():
    policy = torch.tensor([1.0, 2.0, 3.0, 1.5])  # two preferred items, then their two others
    reference = torch.tensor([1.1, 2.0, 3.0, 1.0])
    loss, margin = dpo_loss(policy, reference, beta=2.0)
    # pair 0: (1.0 - 1.1) - (3.0 - 3.0) = -0.1; pair 1: (2.0 - 2.0) - (1.5 - 1.0) = -0.5
    torch.testing.assert_close(margin, torch.tensor([0.1, 0.5]))
    torch.testing.assert_close(loss, torch.tensor([math.log1p(math.exp(-0.1)), math.log1p(math.exp(-0.5))]))


def test_the_sft_weight_adds_the_preferred_images_denoising_error(tmp_path):
    components = ld.load("preset:tiny").components
    pairs = write_pairs_folder(tmp_path / "pairs")
    plain, with_sft = task_for(components, pairs), task_for(components, pairs, sft=0.5)
    batch = pair_batch(plain)
    random = lambda: StepRandom(0, 0, len(batch), batch.positions)  # noqa: E731
    with torch.no_grad():
        loss, _ = plain.pair_losses(plain.network, batch, random())
        loss_sft, _ = with_sft.pair_losses(with_sft.network, batch, random())
        errors, _ = plain.pair_errors(plain.network, batch, random())
    torch.testing.assert_close(loss_sft - loss, 0.5 * errors[: len(batch)])


def test_at_the_start_the_loss_is_log_2_and_both_images_share_noise_and_time(tmp_path, monkeypatch):
    task = task_for(ld.load("preset:tiny").components, write_pairs_folder(tmp_path / "pairs"))
    batch = pair_batch(task)
    seen = {}
    add_noise = task.process.add_noise

    def spy(z0, eps, t):
        seen.update(eps=eps, t=t)
        return add_noise(z0, eps, t)

    monkeypatch.setattr(task.process, "add_noise", spy)
    losses, logs = task.losses(dict(task.networks), batch, StepRandom(0, 0, len(batch), batch.positions), 0)
    assert losses["model"].item() == pytest.approx(math.log(2), abs=1e-6)
    assert logs["accuracy"] == 0.0  # no margin yet
    n = len(batch)
    assert torch.equal(seen["eps"][:n], seen["eps"][n:]) and torch.equal(seen["t"][:n], seen["t"][n:])
    assert len(set(seen["t"][:n].tolist())) > 1  # but pairs differ from each other


def test_training_on_pairs_makes_the_model_favour_the_preferred_images(tmp_path, overfit):
    task = task_for(ld.load("preset:tiny").components, write_pairs_folder(tmp_path / "pairs"), beta=500.0)
    batch = pair_batch(task)
    losses = overfit(task, batch, steps=12, lr=1e-3)
    assert losses[-1] < 0.5 * math.log(2)
    with torch.no_grad():
        _, margin = task.pair_losses(task.network, batch, StepRandom(0, 0, len(batch), batch.positions))
    assert bool((margin > 0).all())
    # the reference stayed the model as loaded
    reference = dict(task.reference.named_parameters())
    assert any(not torch.equal(p, reference[name]) for name, p in task.network.named_parameters())


def family_config(name: str):
    """The name of the tiny SDXL base or SD3 config in ``tests/families`` (two or three text encoders; SD3 a
    flow model) and the fixtures module holding it."""
    path = Path(__file__).parents[1] / "families" / f"{name}_fixtures.py"
    spec = importlib.util.spec_from_file_location(f"preference_{name}_fixtures", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {"sdxl": "TINY_SDXL", "sd3": "TINY_SD3"}[name], module


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_sdxl_and_sd3_models_learn_from_pairs(tmp_path, family, overfit):
    attribute, fixtures = family_config(family)
    components = build_components(getattr(fixtures, attribute), seed=3, name=f"tiny-{family}")
    task = task_for(components, write_pairs_folder(tmp_path / "pairs", count=2), beta=500.0)
    losses = overfit(task, pair_batch(task), steps=8, lr=1e-3)
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert losses[-1] < 0.8 * math.log(2)


def test_a_lora_runs_reference_is_the_network_without_adapters(tmp_path):
    components = ld.load("preset:tiny").components
    inject_lora({"unet": components.network}, ("attention",), rank=2)
    for adapter in lora_modules(components.network).values():
        torch.nn.init.normal_(adapter.lora_up.weight, std=0.5)
    task = task_for(components, write_pairs_folder(tmp_path / "pairs"))
    assert task.reference is None
    batch = pair_batch(task)
    random = lambda: StepRandom(0, 0, len(batch), batch.positions)  # noqa: E731
    with torch.no_grad():
        _, margin = task.pair_losses(task.network, batch, random())
    assert bool((margin != 0).all())  # the adapters make it differ from its reference
    assert all(a.strength == 1.0 for a in lora_modules(components.network).values())


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "holds no pairs.jsonl"),
        ("", "holds no pairs"),
        ("{not json\n", "line 1: not JSON"),
        ('["a", "b"]\n', "expected an object"),
        ('{"prompt": "p", "chosen": "w0.png"}\n', "rejected must be a string"),
        ('{"prompt": "p", "chosen": "w0.png", "rejected": "gone.png"}\n', "'gone.png' does not exist"),
        ('{"prompt": "p", "chosen": "../w0.png", "rejected": "l0.png"}\n', "lies outside"),
    ],
)
def test_a_bad_pairs_folder_is_one_clear_error(tmp_path, content, message):
    root = write_pairs_folder(tmp_path / "pairs", count=1)
    (tmp_path / "w0.png").write_bytes((root / "w0.png").read_bytes())
    if content is None:
        (root / "pairs.jsonl").unlink()
    else:
        (root / "pairs.jsonl").write_text(content)
    with pytest.raises(UserError, match=message):
        read_pairs(root)


def test_dpo_from_the_command_line_records_resumes_and_exports(tmp_path, capsys):
    model = tmp_path / "model"
    ld.load("preset:tiny").save(model)
    pairs, run = write_pairs_folder(tmp_path / "pairs"), tmp_path / "run"
    args = ["finetune", "--dpo", str(pairs), "--dpo-beta", "1000", "--model", str(model)]
    assert main([*args, "--max_steps=2", "-o", str(run), *FAST]) == 0
    assert "model exported to" in capsys.readouterr().out
    record = json.loads((run / "finetune.json").read_text())["dpo"]
    assert record == {"pairs": str(pairs), "beta": 1000.0, "sft": 0.0}
    assert json.loads((run / "config.json").read_text())["data"]["path"] == str(pairs)
    logged = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert "accuracy" in json.dumps(logged)
    assert main(["finetune", "-o", str(run), "--resume", "--max_steps=3", "--quiet"]) == 0
    assert main(["finetune", "-o", str(run), "--resume", "--dpo-beta", "10", "--max_steps=4"]) == 2
    assert "different fine-tuning options" in capsys.readouterr().err
    (image,) = ld.load(str(run / "export")).generate("a red circle", seed=0, steps=2, width=32, height=32)
    assert image.size == (32, 32)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dpo-beta", "100"], "--dpo-beta belongs to --dpo"),
        (["--dpo", "PAIRS", "--dpo-beta", "0"], "beta must be a number > 0"),
        (["--dpo-sft", "1"], "--dpo-sft belongs to --dpo"),
        (["--dpo", "PAIRS", "--dpo-sft", "-1"], "SFT weight must be a number >= 0"),
        (["--dpo", "PAIRS", "--lcm"], "separate runs"),
        (["--dpo", "PAIRS", "--diffusion.min_snr_gamma=5"], "plain denoising errors"),
    ],
)
def test_bad_dpo_options_are_one_clear_line(tmp_path, args, message, capsys):
    model = tmp_path / "model"
    ld.load("preset:tiny").save(model)
    pairs = str(write_pairs_folder(tmp_path / "pairs"))
    args = [pairs if a == "PAIRS" else a for a in args]
    code = main(["finetune", "--model", str(model), *args, "--max_steps=1", "-o", str(tmp_path / "r"), *FAST])
    assert code == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error


def fake_model(calls: list):
    """Draws each prompt's scene for even seeds and a blank white image for odd ones."""

    def generate(prompts, seed):
        calls.append((len(prompts), seed))
        return [
            render(scene_for_prompt(prompt, 0))
            if (seed + k) % 2 == 0
            else Image.new("RGB", (64, 64), "white")
            for k, prompt in enumerate(prompts)
        ]

    return generate


def test_shapes_pairs_pair_passing_and_failing_images_and_resume(tmp_path, monkeypatch):
    settings = PairSettings(prompts=3, per_prompt=4, seed=10)
    calls = []
    monkeypatch.setattr("latentdiffusion.evaluation.shapes_pairs.PROMPTS_PER_CHUNK", 2)
    assert make_pairs(fake_model(calls), tmp_path, settings, log=lambda _: None) == 6
    assert calls == [(8, 10), (4, 18)]  # two chunks; seeds count on image by image
    pairs = read_pairs(tmp_path)
    assert [p.prompt for p in pairs] == [p for p in pair_prompts(settings) for _ in range(2)]
    assert all(p.chosen.name.endswith(("-0.png", "-2.png")) for p in pairs)
    again = []
    assert make_pairs(fake_model(again), tmp_path, settings, log=lambda _: None) == 6 and again == []
    with pytest.raises(UserError, match="other settings"):
        make_pairs(fake_model([]), tmp_path, PairSettings(prompts=4, per_prompt=4, seed=10))


def test_shapes_pairs_from_the_command_line(tmp_path, capsys):
    folder = tmp_path / "pairs"
    args = ["shapes-pairs", "--model", "preset:tiny", "-o", str(folder), "--prompts", "1", "--steps", "2"]
    assert main([*args, "--per-prompt", "2"]) == 0
    assert f"pairs in {folder}" in capsys.readouterr().out
    progress = json.loads((folder / "progress.json").read_text())
    assert progress["prompts_done"] == 1 and progress["settings"]["steps"] == 2
    assert main([*args, "--per-prompt", "3"]) == 2  # the same folder, other settings
    assert "other settings" in capsys.readouterr().err
    assert main([*args, "--per-prompt", "1", "-o", str(tmp_path / "other")]) == 2
    assert ">= 2 images per prompt" in capsys.readouterr().err
