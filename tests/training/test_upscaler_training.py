"""Training the x4 upscaler (training.upscaler): a tiny run exports a model that upscales, resume is
exact, the autoencoder stays frozen, the loss falls on a fixed batch, the low-resolution input is what a
user's PIL-downscaled image looks like, and the shipped preset fits its size budget."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

import latentdiffusion as ld
from latentdiffusion.checkpoints.native import save_native
from latentdiffusion.components import build_components
from latentdiffusion.config import AutoencoderConfig, ModelConfig, TextEncoderConfig, UNetConfig
from latentdiffusion.diffusion.schedules import NoiseSchedule
from latentdiffusion.errors import UserError
from latentdiffusion.pipelines.upscale import LOW_RES_SCHEDULE, is_upscaler, noise_augment
from latentdiffusion.training.config import (
    DataConfig,
    OptimConfig,
    SampleConfig,
    TrainConfig,
    apply_overrides,
    validate,
)
from latentdiffusion.training.loop import train
from latentdiffusion.training.presets import PRESETS, SHAPES_UPSCALER
from latentdiffusion.training.shapes import ShapesDataset, images_to_tensor
from latentdiffusion.training.task import StepRandom
from latentdiffusion.training.upscaler import (
    UpscalerTask,
    augment_low_res,
    downsample,
)

CPU = torch.device("cpu")

# f = 4 like the shipped model (three autoencoder levels), everything else as small as it goes.
TINY_UPSCALER = ModelConfig(
    name="tiny-upscaler",
    unet=UNetConfig(
        in_channels=7,
        model_channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_levels=(1,),
        num_heads=2,
        context_dim=16,
        num_class_embeds=351,
        norm_groups=8,
    ),
    autoencoder=AutoencoderConfig(block_channels=(8, 16, 16), num_res_blocks=1, norm_groups=8),
    text_encoder=TextEncoderConfig(
        hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, max_length=16
    ),
    schedule=SHAPES_UPSCALER.schedule,
    sample_size=32,
)


def tiny_config(**overrides) -> TrainConfig:
    config = replace(
        PRESETS["shapes-upscaler"],
        name="tiny-upscaler",
        model=TINY_UPSCALER,
        autoencoder="random",
        data=DataConfig(resolution=32, holdout=2),
        optim=OptimConfig(lr=1e-3, warmup_steps=2),
        sample=SampleConfig(prompts=(), steps=2),
        batch_size=2,
        max_steps=4,
        ema_decay=0.9,
        log_every=1,
        eval_every=0,
        checkpoint_every=2,
    )
    return apply_overrides(config, overrides)


def test_smoke_run_exports_an_upscaler_that_ld_load_runs(tmp_path):
    result = train(tiny_config(), tmp_path / "run")
    assert result.step == 4
    assert {"eval/loss", "eval/psnr", "eval/psnr_bicubic"} <= set(result.metrics)
    grid = Image.open(tmp_path / "run/samples/step-00000004.png")
    assert grid.size == (2 * 32, 4 * 32)  # two held-out images; input, bicubic, output, original
    pipe = ld.load(str(result.export_dir))
    assert is_upscaler(pipe.components.config) and pipe.components.name == "tiny-upscaler"
    low = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    images = pipe.upscale(low, "a red circle on a blue background", steps=2, num_images=2)
    assert [image.size for image in images] == [(32, 32), (32, 32)]


def test_resume_is_bitwise_identical(tmp_path, monkeypatch, interrupt_after):
    config = tiny_config()
    train(config, tmp_path / "straight")
    interrupt_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "resumed")
    monkeypatch.undo()
    assert train(config, tmp_path / "resumed", resume=True).step == 4
    load = lambda run: torch.load(run / "checkpoints/step-00000004.pt", weights_only=True)  # noqa: E731
    straight, resumed = load(tmp_path / "straight"), load(tmp_path / "resumed")
    assert count_same_tensors(straight["networks"], resumed["networks"]) > 100
    for key in ("ema", "optimizers", "schedulers"):
        count_same_tensors(straight[key], resumed[key], key)
    exported = [load_file(tmp_path / run / "export/model.safetensors") for run in ("straight", "resumed")]
    assert count_same_tensors(*exported) == len(exported[0])


def count_same_tensors(a, b, path: str = "") -> int:
    """Assert that two nested containers hold equal tensors and values; return the number of tensors."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
        return 1
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        return sum(count_same_tensors(a[k], b[k], f"{path}.{k}") for k in a)
    if isinstance(a, list | tuple):
        return sum(
            count_same_tensors(x, y, f"{path}[{i}]") for i, (x, y) in enumerate(zip(a, b, strict=True))
        )
    assert a == b, path
    return 0


def test_autoencoder_comes_from_a_model_folder_and_stays_frozen(tmp_path):
    first_stage = build_components(
        replace(TINY_UPSCALER, autoencoder=replace(TINY_UPSCALER.autoencoder, scaling_factor=0.5)), seed=7
    )
    save_native(first_stage, tmp_path / "model")
    result = train(tiny_config(autoencoder=str(tmp_path / "model"), max_steps=2), tmp_path / "run")
    exported = ld.load(str(result.export_dir)).components
    assert exported.config.autoencoder.scaling_factor == 0.5
    theirs = first_stage.autoencoder.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in exported.autoencoder.state_dict().items())
    start = build_components(TINY_UPSCALER, seed=0).unet.state_dict()
    assert any(not torch.equal(v, start[k]) for k, v in exported.unet.state_dict().items())


def test_loss_falls_on_a_fixed_batch(shapes_batch, overfit):
    config = tiny_config()
    task = UpscalerTask(config, build_components(config.model), CPU)
    losses = overfit(task, shapes_batch(2), steps=30, lr=3e-3)
    assert losses[-1] < 0.3 * losses[0]


class Recorder(nn.Module):
    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet, self.calls = unet, []

    def forward(self, x, t, context, class_labels=None):
        self.calls.append((x, class_labels))
        return self.unet(x, t, context, class_labels)


def test_unet_sees_the_latent_then_the_low_resolution_image_and_its_noise_level(shapes_batch):
    config = tiny_config(**{"model.unet.num_class_embeds": 1})  # only level 0: nearly no augmentation
    task = UpscalerTask(config, build_components(config.model), CPU)
    recorder = Recorder(task.unet)
    batch = shapes_batch(2)
    task.losses(task.forward_modules() | {"unet": recorder}, batch, StepRandom(0, 0, 2, batch.positions), 0)
    (x, labels), *_ = recorder.calls
    assert x.shape == (2, 7, 8, 8) and labels.tolist() == [0, 0]
    torch.testing.assert_close(x[:, 4:], downsample(batch.x, 4), atol=0.05, rtol=0)  # sqrt(1 - a_0) = 0.01


def test_low_resolution_input_is_pil_bicubic_downscaling():
    images = [ShapesDataset(3)[i][0].convert("RGB") for i in range(4)]
    ours = downsample(images_to_tensor(images), 4)
    pil = images_to_tensor([image.resize((16, 16), Image.Resampling.BICUBIC) for image in images])
    assert ours.shape == (4, 3, 16, 16)
    assert (ours - pil).abs().max() <= 1 / 127.5  # PIL rounds to 8 bits


def test_noise_augmentation_is_the_pipelines():
    y, eta = torch.rand(3, 3, 8, 8) * 2 - 1, torch.randn(3, 3, 8, 8)
    levels = torch.tensor([0, 20, 350])
    alphas = NoiseSchedule.from_config(LOW_RES_SCHEDULE).alphas_cumprod.float()
    ours = augment_low_res(y, levels, eta, alphas)
    for i, level in enumerate(levels.tolist()):
        torch.testing.assert_close(ours[i], noise_augment(y[i], level, eta[i]), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"data.cache_latents": True, "data.size": 100}, "cached latents"),
        ({"model.unet.num_class_embeds": None}, "num_class_embeds"),
        ({"model.unet.in_channels": 4}, r"latent_channels \+ 3 \(7\)"),
        ({"autoencoder": None}, "upscaler training needs a trained autoencoder"),
    ],
)
def test_bad_configs_are_refused(overrides, message):
    with pytest.raises(UserError, match=message):
        validate(tiny_config(**overrides))


def test_shipped_preset_fits_its_budget():
    config = validate(PRESETS["shapes-upscaler"])
    assert config.task == "upscaler" and config.autoencoder == "default"
    components = build_components(config.model)
    fp16_bytes = 2 * sum(
        p.numel()
        for m in (components.unet, components.autoencoder, components.text_encoder)
        for p in m.parameters()
    )
    assert fp16_bytes < 12e6
    assert is_upscaler(config.model) and config.model.autoencoder.downsampling_factor == 4
