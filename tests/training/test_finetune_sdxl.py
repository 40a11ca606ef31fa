"""Fine-tuning an SDXL model (a tiny random one): the family's training condition (both text encoders'
penultimate states, y = bigG's pooled output + the images' size and crop), LoRA adapters on the U-Net and
both text encoders exported with kohya's SDXL names, which reproduce the fine-tuned model when loaded
and which diffusers' own loader reads; full fine-tuning; what SDXL training refuses."""

from __future__ import annotations

import copy
import importlib.util
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import latentdiffusion as ld
from latentdiffusion.checkpoints.formats import save_components
from latentdiffusion.checkpoints.native import save_native
from latentdiffusion.checkpoints.safe_io import read_metadata, read_state_dict
from latentdiffusion.cli.main import main
from latentdiffusion.components import build_components
from latentdiffusion.errors import UserError
from latentdiffusion.families.base import ConditioningRequest, MicroConditioning
from latentdiffusion.models.lora import lora_parameters
from latentdiffusion.pipelines.loading import load_components
from latentdiffusion.pipelines.pipeline import Pipeline
from latentdiffusion.training.data import Batch, Geometry, Preparation
from latentdiffusion.training.diffusion import DiffusionTask, cached_geometries, geometry_tensors
from latentdiffusion.training.finetune import (
    LoRAOptions,
    finetune,
    finetune_config,
    inject_lora_for_training,
    select_lora_parameters,
)
from latentdiffusion.training.task import StepRandom


def _fixtures():
    path = Path(__file__).parents[1] / "families" / "sdxl_fixtures.py"
    spec = importlib.util.spec_from_file_location("training_sdxl_fixtures", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FIXTURES = _fixtures()
TINY_SDXL, TINY_REFINER = FIXTURES.TINY_SDXL, FIXTURES.TINY_REFINER
CAPTIONS = ("a photo of thing 0", "a red thing 1", "thing 2 on a table")
SIZES = ((96, 80), (64, 112), (72, 72))  # (height, width): tall, wide, square
FAST = {"max_steps": 2, "optim.lr": 1e-2, "optim.warmup_steps": 0, "log_every": 1}


@pytest.fixture(scope="module")
def sdxl_model(tmp_path_factory):
    """A tiny random SDXL base saved natively, and three captioned images of other sizes than 64."""
    root = tmp_path_factory.mktemp("sdxl-finetune")
    save_native(build_components(TINY_SDXL, seed=5, name="tiny-sdxl"), root / "model")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i, (caption, (height, width)) in enumerate(zip(CAPTIONS, SIZES, strict=True)):
        pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(caption)
    return root / "model", images


def config_for(model: Path, images: Path, components, *, lora: bool, **overrides):
    overrides = {"data.path": str(images), **FAST, **overrides}
    return finetune_config(str(model), components.config, lora=lora, overrides=overrides)


# ------------------------------------------------------------------------------- the conditioning


def test_training_condition_is_what_inference_conditions_on():
    """A plain caption gets the inference condition, an empty (dropped) one the zero unconditional side;
    y carries each item's original size and crop and the training size as target."""
    components = build_components(TINY_SDXL, seed=1)
    family = components.family
    micro = MicroConditioning(original_size=(96, 80), crops_coords_top_left=(6, 0))
    request = ConditioningRequest(64, 64, micro)
    with torch.no_grad():
        cond = family.training_condition(components, ["a red thing", ""], [request, request])
        expected, uncond = family.encode(components, ["a red thing"], [""], request)
    torch.testing.assert_close(cond["context"][:1], expected["context"], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(cond["y"][:1], expected["y"], atol=1e-6, rtol=1e-6)
    assert components.config.zero_empty_negative and not cond["context"][1].any()
    torch.testing.assert_close(cond["context"][1:], uncond["context"])
    torch.testing.assert_close(cond["y"][1:], uncond["y"])  # zero pooled vector, same size numbers
    assert family.micro_numbers_of(request, negative=False) == [96, 80, 6, 0, 64, 64]


def test_gradients_reach_both_text_encoders_and_skip_what_never_runs():
    """Every weight that training selects gets a gradient (what DDP requires): CLIP-L's last layer, which
    only a pooled output SDXL does not take would read, is neither adapted nor trained."""
    components = build_components(TINY_SDXL, seed=2)
    assert components.family.idle_text_modules(components) == {
        "text_encoder": ("layers.2", "final_layer_norm")
    }
    wrapped = inject_lora_for_training(components, LoRAOptions(rank=2, targets=("attention", "text")))
    assert sorted(wrapped) == ["text_encoder", "text_encoder_2", "unet"]
    assert not any(path.startswith("layers.2.") for path in wrapped["text_encoder"])
    assert {path.split(".")[1] for path in wrapped["text_encoder_2"]} == {"0", "1", "2", "3"}
    config = finetune_config("unused", components.config, lora=True)
    config = replace(config, diffusion=replace(config.diffusion, train_text_encoder=True))
    task = DiffusionTask(config, components, torch.device("cpu"))
    for selected in (select_lora_parameters(task)["model"], task.parameter_groups()["model"]):
        for p in selected:
            p.requires_grad_(True)
        batch = Batch(torch.rand(2, 3, 64, 64) * 2 - 1, ["a red thing", "thing"], torch.arange(2))
        loss, _ = task.losses(task.networks, batch, StepRandom(0, 0, 2, torch.arange(2)), 0)
        grads = torch.autograd.grad(loss["model"], selected, allow_unused=True)
        assert all(g is not None for g in grads)
    assert len(select_lora_parameters(task)["model"]) == 2 * sum(len(p) for p in wrapped.values())


def test_data_records_each_images_size_and_crop():
    """Original size (h, w) before resizing; crop (top, left) in the resized image, mirrored by a flip."""
    prepare = Preparation(64)
    _, _, tall = prepare.item(Image.new("RGB", (80, 96)), "x", 0)  # resized to 64 x 77, 6 rows cut above
    assert tall == Geometry((96, 80), (6, 0))
    wide = Image.new("RGB", (96, 80))  # resized to 77 x 64: columns 6..70 kept
    assert prepare.image(wide, flip=False)[1] == Geometry((80, 96), (0, 6))
    assert prepare.image(wide, flip=True)[1] == Geometry((80, 96), (0, 7))
    assert Preparation(64, center_crop=False).image(wide, flip=False)[1] == Geometry((80, 96), (0, 0))
    geometries = [Geometry((96, 80), (6, 0)), Geometry((80, 96), (0, 7))]
    assert cached_geometries(geometry_tensors(geometries)) == geometries
    assert geometry_tensors([geometries[0], None]) == {}  # partly unknown: the training size stands in


def test_task_conditions_on_the_batch_geometry():
    components = build_components(TINY_SDXL, seed=2)
    config = finetune_config("unused", components.config, lora=False)
    task = DiffusionTask(config, components, torch.device("cpu"))
    batch = Batch(
        torch.zeros(2, 3, 64, 64), ["a", "b"], torch.arange(2), geometry=[Geometry((96, 80), (6, 0))]
    )
    batch.geometry.append(None)
    numbers = [task.family.micro_numbers_of(r, negative=False) for r in task.condition_requests(batch)]
    assert numbers == [[96, 80, 6, 0, 64, 64], [64, 64, 0, 0, 64, 64]]


# ------------------------------------------------------------------------------------------ LoRA


@pytest.mark.parametrize("naming", ["diffusers", "original"])
def test_sdxl_lora_finetune_exports_a_kohya_file_that_reproduces_the_model(sdxl_model, tmp_path, naming):
    model, images = sdxl_model
    components = load_components(str(model))
    lora = LoRAOptions(rank=2, targets=("attention", "text"), naming=naming)
    config = config_for(model, images, components, lora=True)
    result = finetune(config, tmp_path / "run", lora, components=components)

    # (a) kohya's SDXL names: lora_unet_ (diffusers or sgm names), lora_te1_ (CLIP-L), lora_te2_ (bigG)
    weights = read_state_dict(result.lora_file)
    unet_names = ("down_blocks_", "mid_block_", "up_blocks_")
    if naming == "original":
        unet_names = ("input_blocks_", "middle_block_", "output_blocks_")
    prefixes = (*(f"lora_unet_{name}" for name in unet_names), "lora_te1_text_model_encoder_layers_")
    assert all(k.startswith((*prefixes, "lora_te2_text_model_encoder_layers_")) for k in weights)
    for prefix in ("lora_unet_", "lora_te1_", "lora_te2_"):  # every network's adapters trained
        assert max(v.abs().max() for k, v in ups(weights, prefix).items()) > 0, prefix
    assert "lora_te2_text_model_encoder_layers_3_self_attn_q_proj.lora_down.weight" in weights
    assert not any(k.startswith("lora_te1_text_model_encoder_layers_2_") for k in weights)
    metadata = read_metadata(result.lora_file)
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0" and metadata["ss_v2"] == "False"

    # (b) a fresh copy with the file merged makes what the fine-tuned model makes (and the base does not)
    trained, fresh, base = Pipeline(components.eval()), ld.load(str(model)), ld.load(str(model))
    assert fresh.load_lora(result.lora_file) == len(weights) // 3
    expected, actual, before = (unet_output(pipe) for pipe in (trained, fresh, base))
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    assert (before - expected).abs().max() > 1e-3
    options = {"steps": 2, "seed": 3, "width": 64, "height": 64}
    image, image_fresh = (
        np.asarray(p.generate("a red thing 1", **options)[0], dtype=int) for p in (trained, fresh)
    )
    assert np.abs(image - image_fresh).max() <= 1

    # (c) diffusers' own SDXL loader takes every U-Net entry and merges them to the same weights
    assert_diffusers_reads_the_unet_part(model, result.lora_file, fresh, tmp_path)


def ups(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The B matrices of the layers whose names start with ``prefix``."""
    return {k: v for k, v in weights.items() if k.startswith(prefix) and k.endswith(".lora_up.weight")}


@torch.no_grad()
def unet_output(pipe: Pipeline) -> torch.Tensor:
    """The U-Net's output for fixed noise under the family's condition of a fixed prompt."""
    request = ConditioningRequest(64, 64, MicroConditioning(original_size=(96, 80)))
    cond, _ = pipe.family.encode(pipe.components, ["a red thing 1"], [""], request)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    return pipe.unet(x, torch.tensor([500.0]), **cond)


def assert_diffusers_reads_the_unet_part(
    model: Path, lora_file: Path, merged: Pipeline, tmp_path: Path
) -> None:
    """diffusers 0.42 with transformers 5 misnames text-encoder attention LoRA layers, so only the U-Net
    is compared."""
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from latentdiffusion.checkpoints import unet_keys

    save_components(load_components(str(model)), tmp_path / "diffusers", "diffusers")
    theirs = diffusers.StableDiffusionXLPipeline.from_pretrained(tmp_path / "diffusers")
    theirs.load_lora_weights(str(lora_file))
    adapted = sum(1 for _, m in theirs.unet.named_modules() if hasattr(m, "lora_A"))
    assert adapted == len(ups(read_state_dict(lora_file), "lora_unet_"))
    theirs.fuse_lora()
    theirs.unload_lora_weights()
    weights = unet_keys.from_diffusers_state_dict(theirs.unet.state_dict())
    for key, value in merged.unet.state_dict().items():
        torch.testing.assert_close(value, weights[key], atol=2e-5, rtol=1e-5, msg=key)


# ------------------------------------------------------------------------------ full, refusals


def test_full_sdxl_finetune_trains_the_unet_and_both_text_encoders(sdxl_model, tmp_path, capsys):
    model, images = sdxl_model
    run = tmp_path / "full"
    args = ["finetune", "--model", str(model), f"--data.path={images}", "-o", str(run), "--quiet"]
    args += [f"--{k}={v}" for k, v in FAST.items()]
    args += ["--diffusion.train_text_encoder=true", "--data.cache_latents=true"]
    assert main(args) == 0, capsys.readouterr().err
    before, after = ld.load(str(model)).components, ld.load(str(run / "export")).components
    for role, changed in (
        ("unet", True),
        ("text_encoder", True),
        ("text_encoder_2", True),
        ("autoencoder", False),
    ):
        old, new = before.modules[role].state_dict(), after.modules[role].state_dict()
        assert any(not torch.equal(old[k], new[k]) for k in old) == changed, role
    old, new = before.modules["text_encoder"].state_dict(), after.modules["text_encoder"].state_dict()
    assert all(torch.equal(old[k], new[k]) for k in old if k.startswith("layers.2."))  # CLIP-L's idle layer
    cache = torch.load(run / "latents.pt", weights_only=True)
    assert sorted(map(tuple, cache["original_sizes"].tolist())) == sorted(SIZES)


def test_refiner_training_is_refused_in_one_line(tmp_path, capsys):
    save_native(build_components(TINY_REFINER), tmp_path / "refiner")
    args = ["finetune", "--model", str(tmp_path / "refiner"), "--lora", f"--data.path={tmp_path}"]
    assert main([*args, "-o", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err.strip()
    assert "training the SDXL refiner is not supported yet" in error and "\n" not in error
    assert not (tmp_path / "run").exists()
    components = build_components(TINY_REFINER)
    with pytest.raises(UserError, match="SDXL refiner"):
        DiffusionTask(
            finetune_config("unused", components.config, lora=False), components, torch.device("cpu")
        )


def test_lora_training_leaves_the_model_as_loaded_outside_the_adapters(sdxl_model):
    """The adapters start at B = 0: the injected model computes what the loaded one does."""
    model, _ = sdxl_model
    components = load_components(str(model))
    reference = copy.deepcopy(components)
    inject_lora_for_training(components, LoRAOptions(rank=2, targets=("attention", "resnets", "text")))
    assert all(any(True for _ in lora_parameters(components.modules[r])) for r in ("unet", "text_encoder"))
    request = ConditioningRequest(64, 64)
    with torch.no_grad():
        for ours, theirs in zip(
            components.family.encode(components, ["a thing"], ["other"], request),
            reference.family.encode(reference, ["a thing"], ["other"], request),
            strict=True,
        ):
            for key in ours:
                torch.testing.assert_close(ours[key], theirs[key], atol=1e-6, rtol=1e-6)
