"""DreamBooth (``ldm finetune --dreambooth``) on a tiny model at 32 px: class images generated once and
reproducibly, instance/class pairs whose noise does not depend on the number of processes, the weighted
prior-preservation loss, bit-exact resume, LoRA export, and bad options."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import latentdiffusion as ld
from latentdiffusion.cli.main import main
from latentdiffusion.errors import UserError
from latentdiffusion.pipelines.loading import load_components
from latentdiffusion.training.data import Batch
from latentdiffusion.training.dreambooth import (
    CLASS_DIR,
    DreamBoothOptions,
    DreamBoothTask,
    ensure_class_images,
)
from latentdiffusion.training.finetune import finetune, finetune_config
from latentdiffusion.training.task import StepRandom

FAST = ["--quiet", "--data.resolution=32", "--optim.lr=1e-2", "--optim.warmup_steps=0", "--log_every=1"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model_and_images(tmp_path_factory):
    """A tiny random model folder and three uncaptioned 40x40 instance images."""
    root = tmp_path_factory.mktemp("dreambooth")
    ld.load("preset:tiny").save(root / "model")
    images = root / "instance"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(images / f"{i}.png")
    return root / "model", images


def options(images, **changes) -> DreamBoothOptions:
    settings = {"class_prompt": "a circle", "class_images": 5, "class_steps": 2} | changes
    return DreamBoothOptions(str(images), "a sks circle", **settings)


def test_class_images_are_the_same_however_generation_is_split_or_interrupted(model_and_images, tmp_path):
    model, images = model_and_images
    components = load_components(str(model))
    dreambooth = options(images, class_images=10)  # two chunks of 8 and 2
    whole = ensure_class_images(components, dreambooth, tmp_path / "one", width=32)
    assert [p.name for p in whole] == [f"class-{k:05d}.png" for k in range(10)]
    for rank in (1, 0):  # two processes, one after the other
        ensure_class_images(components, dreambooth, tmp_path / "two", rank=rank, world_size=2, width=32)
    (tmp_path / "two" / "class-00003.png").unlink()  # an interrupted generation
    ensure_class_images(components, dreambooth, tmp_path / "two", width=32)
    pixels = lambda path: np.asarray(Image.open(path))  # noqa: E731
    for path in whole:
        assert np.array_equal(pixels(path), pixels(tmp_path / "two" / path.name)), path.name
    assert not np.array_equal(pixels(whole[0]), pixels(whole[1]))  # each image has its own seed


def pair_batch(positions: list[int], n_classes: int = 2) -> Batch:
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(2, 6, 32, 32, generator=generator) * 2 - 1
    return Batch(x[positions], ["a sks circle"] * len(positions), torch.tensor(positions))


def test_pairs_weight_the_prior_and_do_not_depend_on_the_process_count(model_and_images, tmp_path):
    model, images = model_and_images
    components = load_components(str(model))
    config = finetune_config(str(model), components.config, lora=False, overrides={"data.resolution": 32})

    def losses(weight: float, positions: list[int]) -> dict[str, float]:
        task = DreamBoothTask(config, components, CPU, options(images, prior_weight=weight), tmp_path)
        batch = pair_batch(positions)
        random = StepRandom(0, 7, 2, batch.positions)  # micro-batch 7 of a global batch of 2 pairs
        with torch.no_grad():
            loss, logs = task.losses(task.forward_modules(), batch, random, 0)
        assert logs["loss"] == pytest.approx(loss["model"].item())
        return logs

    both = losses(1.0, [0, 1])
    halves = [losses(1.0, [0]), losses(1.0, [1])]  # two processes, one pair each
    for key in ("loss/instance", "loss/prior"):
        assert both[key] == pytest.approx(sum(h[key] for h in halves) / 2, rel=1e-5)
    heavy = losses(3.0, [0, 1])
    assert heavy["loss/prior"] == pytest.approx(both["loss/prior"])
    assert heavy["loss"] == pytest.approx(both["loss/instance"] + 3.0 * both["loss/prior"], rel=1e-6)
    assert both["loss/prior"] != pytest.approx(both["loss/instance"])  # the halves are different items


def dreambooth_config(model, components, **overrides):
    settings = {"data.resolution": 32, "optim.lr": 1e-2, "optim.warmup_steps": 0, "log_every": 1}
    return finetune_config(str(model), components.config, lora=False, overrides=settings | overrides)


def test_resume_is_bitwise_identical(model_and_images, tmp_path, monkeypatch, interrupt_after):
    model, images = model_and_images
    dreambooth = options(images, class_images=3, prior_weight=0.5)
    config = dreambooth_config(model, load_components(str(model)), max_steps=4, checkpoint_every=2)
    finetune(config, tmp_path / "straight", dreambooth=dreambooth)
    interrupt_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        finetune(config, tmp_path / "resumed", dreambooth=dreambooth)
    monkeypatch.undo()
    (tmp_path / "resumed" / CLASS_DIR / "class-00001.png").unlink()  # regenerated, the same
    finetune(config, tmp_path / "resumed", resume=True, dreambooth=dreambooth)
    load = lambda run: torch.load(run / "checkpoints/step-00000004.pt", weights_only=True)  # noqa: E731
    straight, resumed = load(tmp_path / "straight"), load(tmp_path / "resumed")
    for key in ("networks", "optimizers", "schedulers"):
        assert_same_tensors(straight[key], resumed[key], key)
    assert_same_files(
        tmp_path / "straight/export/model.safetensors", tmp_path / "resumed/export/model.safetensors"
    )
    logs = [json.loads(line) for line in (tmp_path / "resumed/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs if "loss/prior" in r] == [1, 2, 3, 4]


def assert_same_tensors(a, b, path: str) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_same_tensors(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list | tuple):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_tensors(x, y, f"{path}[{i}]")


def assert_same_files(a, b) -> None:
    first, second = load_file(a), load_file(b)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_dreambooth_lora_end_to_end_and_resume_from_the_saved_options(model_and_images, tmp_path, capsys):
    model, images = model_and_images
    run = tmp_path / "run"
    args = [
        "finetune",
        "--dreambooth",
        "--model",
        str(model),
        "--lora",
        "4",
        "--instance-images",
        str(images),
    ]
    args += ["--instance-prompt", "a sks circle", "--class-prompt", "a circle", "--class-images", "2"]
    assert main([*args, "--class-steps", "1", "--max_steps=2", "-o", str(run), *FAST]) == 0
    assert "LoRA saved to" in capsys.readouterr().out
    assert sorted(p.name for p in (run / CLASS_DIR).iterdir()) == ["class-00000.png", "class-00001.png"]
    record = json.loads((run / "finetune.json").read_text())
    assert record["lora"]["rank"] == 4 and record["dreambooth"]["class_prompt"] == "a circle"
    assert json.loads((run / "config.json").read_text())["data"]["path"] == str(images)
    assert main(["finetune", "-o", str(run), "--resume", "--max_steps=3", "--quiet"]) == 0
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 3 and "loss/prior" in last
    assert main(["finetune", "-o", str(run), "--resume", "--class-images", "3", "--max_steps=4"]) == 2
    assert "different fine-tuning options" in capsys.readouterr().err


def test_without_prior_preservation_no_class_images_are_made(model_and_images, tmp_path):
    model, images = model_and_images
    dreambooth = DreamBoothOptions(str(images), "a sks circle", prior_weight=0.0)
    config = dreambooth_config(model, load_components(str(model)), max_steps=1)
    result = finetune(config, tmp_path, dreambooth=dreambooth)
    assert not (tmp_path / CLASS_DIR).exists() or not any((tmp_path / CLASS_DIR).iterdir())
    assert "loss/prior" not in result.run.metrics and result.model_dir is not None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dreambooth", "--instance-prompt", "a sks circle"], "--dreambooth needs --instance-images"),
        (["--dreambooth", "--instance-images", "IMAGES", "--instance-prompt", "a sks x"], "--class-prompt"),
        (["--prior-weight", "0.5"], "--prior-weight belongs to DreamBooth training: add --dreambooth"),
        (["--class-data", "IMAGES"], "--class-data belongs to DreamBooth training: add --dreambooth"),
        (
            ["--dreambooth", "--instance-images", "nowhere", "--instance-prompt", "x", "--prior-weight", "0"],
            "nowhere",
        ),
        (["--lora", "4", "--rank", "8"], "disagree"),
    ],
)
def test_bad_dreambooth_options_are_one_clear_line(model_and_images, tmp_path, args, message, capsys):
    model, images = model_and_images
    args = [str(images) if a == "IMAGES" else a for a in args]
    command = ["finetune", "--model", str(model), "-o", str(tmp_path / "run"), "--max_steps=1", *FAST]
    assert main([*command, *args]) == 2
    assert message in capsys.readouterr().err


def test_options_are_checked():
    with pytest.raises(UserError, match="instance prompt"):
        DreamBoothOptions("x", " ")
    with pytest.raises(UserError, match=">= 0"):
        DreamBoothOptions("x", "a sks", "a", prior_weight=-1.0)


def test_given_class_images_come_first_and_the_model_makes_the_rest(model_and_images, tmp_path):
    model, images = model_and_images
    components = load_components(str(model))
    given = tmp_path / "given"
    given.mkdir()
    rng = np.random.default_rng(1)
    for name in ("b.png", "a.jpg", "c.png"):  # sorted: a.jpg, b.png, c.png; c is one too many for 2 given
        Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(given / name, quality=100)
    made = ensure_class_images(components, options(images, class_images=10), tmp_path / "made", width=32)
    mixed = ensure_class_images(
        components, options(images, class_images=10, class_data=str(given)), tmp_path / "mixed", width=32
    )
    pixels = lambda path: np.asarray(Image.open(path).convert("RGB"))  # noqa: E731
    for k, name in enumerate(("a.jpg", "b.png", "c.png")):
        assert np.array_equal(pixels(mixed[k]), pixels(given / name)), name
    for k in range(3, 10):  # the generated ones have the seeds they would have had anyway
        assert np.array_equal(pixels(mixed[k]), pixels(made[k])), k
    fewer = ensure_class_images(
        components, options(images, class_images=2, class_data=str(given)), tmp_path / "fewer", width=32
    )
    assert len(fewer) == 2 and np.array_equal(pixels(fewer[1]), pixels(given / "b.png"))
    with pytest.raises(UserError, match=r"class image folder .* does not exist"):
        ensure_class_images(
            components, options(images, class_data=str(tmp_path / "none")), tmp_path / "x", width=32
        )
    with pytest.raises(UserError, match="--class-data is for prior preservation"):
        options(images, prior_weight=0.0, class_data=str(given))
