"""``ldm finetune`` end to end on a tiny model (a few steps, 32 px): LoRA and full modes, the exported LoRA
reproducing the trained adapters, resuming, and bad options."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import latentdiffusion as ld
from latentdiffusion.checkpoints.lora_keys import load_lora
from latentdiffusion.checkpoints.safe_io import read_metadata, read_state_dict
from latentdiffusion.cli.main import main
from latentdiffusion.errors import UserError
from latentdiffusion.pipelines.loading import load_components
from latentdiffusion.training.finetune import LoRAOptions, finetune, finetune_config

FAST = ["--quiet", "--data.resolution=32", "--optim.lr=1e-2", "--optim.warmup_steps=0", "--log_every=1"]


@pytest.fixture(scope="module")
def model_and_images(tmp_path_factory):
    """A tiny random model folder and four captioned 40x40 images."""
    root = tmp_path_factory.mktemp("finetune")
    ld.load("preset:tiny").save(root / "model")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"a photo of thing {i}")
    return root / "model", images


def test_lora_finetune_end_to_end(model_and_images, tmp_path, capsys):
    model, images = model_and_images
    run = tmp_path / "run"
    args = ["finetune", "--model", str(model), "--lora", "--rank", "4", "--targets", "attention,text"]
    assert main([*args, f"--data.path={images}", "--max_steps=2", "-o", str(run), *FAST]) == 0
    lora_file = run / "export" / "lora.safetensors"
    assert f"LoRA saved to {lora_file}" in capsys.readouterr().out
    assert sorted(p.name for p in (run / "export").iterdir()) == ["lora.safetensors"]
    metadata = read_metadata(lora_file)
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "4.0"
    assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_max_train_steps"] == "2"
    weights = read_state_dict(lora_file)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for k in weights)
    assert all(
        k.startswith(("lora_unet_down_blocks", "lora_unet_mid", "lora_unet_up", "lora_te_")) for k in weights
    )
    assert max(v.abs().max() for k, v in weights.items() if "lora_up" in k) > 0  # B moved away from 0
    assert json.loads((run / "finetune.json").read_text())["lora"]["targets"] == ["attention", "text"]

    # the LoRA file changes generation, and --lora FILE:STRENGTH reaches ld.load
    out = tmp_path / "image.png"
    common = [
        "generate",
        "a photo of thing 1",
        "--model",
        str(model),
        "--size",
        "32",
        "--steps",
        "2",
        "--quiet",
    ]
    assert main([*common, "-o", str(out), "--lora", f"{lora_file}:0.8"]) == 0
    assert main([*common, "-o", str(tmp_path / "base.png")]) == 0
    assert not np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(tmp_path / "base.png")))

    # resuming continues the same adapters; other LoRA settings are refused
    assert main(["finetune", "-o", str(run), "--resume", "--max_steps=3", "--quiet"]) == 0
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3
    assert main(["finetune", "-o", str(run), "--resume", "--max_steps=4", "--lora", "--rank", "2"]) == 2
    assert "different fine-tuning options" in capsys.readouterr().err


def test_full_finetune_exports_a_model_with_only_the_unet_changed(model_and_images, tmp_path, capsys):
    model, images = model_and_images
    run = tmp_path / "full"
    assert (
        main(
            [
                "finetune",
                "--model",
                str(model),
                f"--data.path={images}",
                "--max_steps=2",
                "-o",
                str(run),
                *FAST,
            ]
        )
        == 0
    )
    assert "model exported to" in capsys.readouterr().out
    before, after = ld.load(str(model)), ld.load(str(run / "export"))
    for network, changed in (("unet", True), ("text_encoder", False), ("vae", False)):
        old, new = getattr(before, network).state_dict(), getattr(after, network).state_dict()
        assert any(not torch.equal(old[k], new[k]) for k in old) == changed, network


@pytest.mark.parametrize("layout", ["single-file", "diffusers"])
def test_finetune_starts_from_every_layout(model_and_images, tmp_path, layout, capsys):
    model, images = model_and_images
    source = tmp_path / ("model.safetensors" if layout == "single-file" else "model")
    ld.load(str(model)).save(source, format=layout)
    args = ["finetune", "--model", str(source), "--lora", f"--data.path={images}", "--max_steps=1"]
    assert main([*args, "-o", str(tmp_path / "run"), *FAST]) == 0
    assert (tmp_path / "run" / "export" / "lora.safetensors").is_file()


def test_exported_lora_reproduces_the_trained_model(model_and_images, tmp_path):
    """The file holds exactly the adapters the loop trained: base + file == the trained, wrapped model;
    the base weights under the adapters stay frozen."""
    model, images = model_and_images
    components = load_components(str(model))
    original = {k: v.clone() for k, v in components.unet.state_dict().items()}
    lora = LoRAOptions(rank=2, alpha=4.0, targets=("attention", "proj", "resnets"))
    overrides = {"data.path": str(images), "data.resolution": 32, "max_steps": 2, "optim.warmup_steps": 0}
    config = finetune_config(str(model), components.config, lora=True, overrides=overrides)
    result = finetune(config, tmp_path / "run", lora, components=components)
    assert result.lora_file is not None and result.metadata["ss_network_args"]  # conv layers: LoCon args

    trained = components.unet.eval()
    frozen = {k.replace(".base.", "."): v for k, v in trained.state_dict().items() if ".lora_" not in k}
    frozen = {k: v for k, v in frozen.items() if not k.endswith(".alpha")}
    assert frozen.keys() == original.keys() and all(torch.equal(frozen[k], v) for k, v in original.items())

    fresh = load_components(str(model))
    load_lora(result.lora_file, {"unet": fresh.unet, "text_encoder": fresh.text_encoder})
    generator = torch.Generator().manual_seed(0)
    x, context = torch.randn(1, 4, 16, 16, generator=generator), torch.randn(1, 3, 32, generator=generator)
    with torch.no_grad():
        expected, actual = (
            trained(x, torch.tensor([300.0]), context),
            fresh.unet(x, torch.tensor([300.0]), context),
        )
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_finetune_needs_a_model_and_keeps_its_architecture(model_and_images):
    model, _ = model_and_images
    components = load_components(str(model))
    with pytest.raises(UserError, match="keeps the architecture"):
        finetune_config(str(model), components.config, lora=False, overrides={"model.unet.num_heads": 1})
    config = finetune_config(str(model), components.config, lora=True)
    assert config.optim.lr == 1e-4 and config.data.resolution == components.config.sample_size
    assert finetune_config(str(model), components.config, lora=False).optim.lr == 1e-5


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["finetune", "--data.path=x"], "pass --model PATH"),
        (["finetune", "--model", "MODEL", "--rank", "4"], "--rank sets up LoRA training: add --lora"),
        (["finetune", "--model", "MODEL", "--model.unet.num_heads=1"], "keeps the architecture"),
        (["finetune", "--model", "nowhere/model"], "does not exist"),
    ],
)
def test_bad_finetune_options_are_one_clear_line(model_and_images, args, message, capsys):
    model, _ = model_and_images
    assert main([str(model) if a == "MODEL" else a for a in args]) == 2
    assert message in capsys.readouterr().err


def test_unknown_targets_are_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "--model", "m", "--lora", "--targets", "attention,everything"])
    assert "unknown LoRA targets everything" in capsys.readouterr().err
