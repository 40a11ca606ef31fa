"""``ldm train-controlnet`` on a tiny random base model (32 px): the layout map, the ControlNet's start
(encoder copied, zero convolutions at zero: the controlled U-Net equals the base), a decreasing loss,
bit-exact resume, and the exported diffusers folder loading through ``ld.Control`` and ``--control``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import latentdiffusion as ld
from latentdiffusion.checkpoints.controlnet import load_controlnet
from latentdiffusion.checkpoints.safe_io import read_state_dict
from latentdiffusion.cli.main import main
from latentdiffusion.errors import UserError
from latentdiffusion.pipelines.loading import load_components
from latentdiffusion.pipelines.preprocessors import Inputs, seg_shapes
from latentdiffusion.training.config import validate
from latentdiffusion.training.controlnet import (
    OPTIONS_FILE,
    ControlNetOptions,
    ControlNetTask,
    HintedUNet,
    check_options,
    controlnet_config,
    saved_options,
    train_controlnet,
)
from latentdiffusion.training.data import Batch
from latentdiffusion.training.layout import (
    ShapesLayoutSource,
    layout_map,
    layout_mask,
    object_weights,
    split_item,
)
from latentdiffusion.training.shapes import COLOURS, Scene, ShapeSpec
from latentdiffusion.training.task import StepRandom

FAST = {"data.resolution": "32", "data.holdout": "2", "batch_size": "2", "log_every": "1"}
FAST |= {"optim.warmup_steps": "0", "optim.lr": "1e-3", "checkpoint_every": "2"}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny random base model folder (the random zero convolutions are the ControlNet's own)."""
    folder = tmp_path_factory.mktemp("controlnet") / "base"
    ld.load("preset:tiny").save(folder)
    return folder


def config_for(base, **overrides):
    components = load_components(str(base))
    return validate(controlnet_config(str(base), components.config, FAST | overrides))


def make_task(base, options: ControlNetOptions | None = None) -> ControlNetTask:
    config = config_for(base)
    options = options or ControlNetOptions()
    return ControlNetTask(config, load_components(str(base)), torch.device("cpu"), options)


def layout_batch(n: int, resolution: int = 32) -> Batch:
    source = ShapesLayoutSource(0, resolution=resolution)
    items = [source.load(i) for i in range(n)]
    return Batch(torch.stack([x for x, _ in items]), [c for _, c in items], torch.arange(n))


# ---------------------------------------------------------------------------------------- layout maps


def test_layout_map_paints_each_object_region_in_its_colour_on_the_background():
    square = ShapeSpec("red", "square", (20.0, 20.0), 14.0)
    circle = ShapeSpec("black", "circle", (44.0, 44.0), 28.0)
    pixels = np.asarray(layout_map(Scene((square, circle), "white")))
    assert (pixels[13:27, 13:27] == COLOURS["red"]).all()  # the square's 14 x 14 pixels, exactly
    assert layout_mask(square).sum() == 14 * 14
    assert (pixels[layout_mask(circle)] == COLOURS["black"]).all()
    assert abs(layout_mask(circle).sum() - np.pi / 4 * 28**2) < 10
    outside = ~(layout_mask(square) | layout_mask(circle))
    assert (pixels[outside] == COLOURS["white"]).all()
    # palette colours only: the seg_shapes preprocessor leaves a layout map as it is
    assert np.array_equal(seg_shapes(pixels, Inputs(0, 0)), pixels)


def test_layout_items_hold_the_rendered_image_and_its_map():
    x, caption = ShapesLayoutSource(0).load(3)
    assert x.shape == (6, 64, 64) and x.min() >= -1 and x.max() <= 1
    _, hints = split_item(x[None])
    assert hints.min() >= 0 and hints.max() <= 1
    colours = {tuple(c) for c in (hints[0].permute(1, 2, 0).reshape(-1, 3) * 255).round().int().tolist()}
    assert colours <= set(COLOURS.values()) and len(colours) >= 2
    assert caption.endswith("background")


# ----------------------------------------------------------------------------------------- the network


def test_controlnet_starts_as_the_base_encoder_with_zero_convolutions(base):
    task = make_task(base)
    controlnet, unet = task.controlnet, task.unet
    for name, weight in controlnet.state_dict().items():
        if name.startswith(("zero_convs.", "mid_zero_conv.", "hint_embedding.conv_out.")):
            assert not weight.any(), name
        elif not name.startswith("hint_embedding."):
            assert torch.equal(weight, unet.state_dict()[name]), name
    batch = layout_batch(2)
    _, hints = split_item(batch.x)
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    context = torch.randn(2, 77, unet.config.context_dim, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([10.0, 900.0])
    down, mid = controlnet(z, t, context, hints)
    assert all(not d.any() for d in down) and not mid.any()
    with torch.no_grad():
        assert torch.equal(HintedUNet(unet, controlnet, hints)(z, t, context), unet(z, t, context))


def test_base_model_is_frozen_and_only_the_controlnet_trains(base, overfit):
    task = make_task(base)
    before = {k: v.clone() for k, v in task.unet.state_dict().items()}
    losses = overfit(task, layout_batch(2), steps=20, lr=3e-3)
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(torch.equal(v, task.unet.state_dict()[k]) for k, v in before.items())
    assert task.controlnet.mid_zero_conv.weight.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- runs


def test_resume_is_bit_exact(base, tmp_path, interrupt_after):
    config = config_for(base, max_steps="4")
    straight = train_controlnet(config, tmp_path / "straight")
    with pytest.MonkeyPatch.context() as patch:
        interrupt_after(patch, 2)
        with pytest.raises(KeyboardInterrupt):
            train_controlnet(config, tmp_path / "resumed")
    resumed = train_controlnet(config, tmp_path / "resumed", resume=True)
    ours = read_state_dict(resumed.export_dir / "diffusion_pytorch_model.safetensors")
    theirs = read_state_dict(straight.export_dir / "diffusion_pytorch_model.safetensors")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    lines = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    again = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("loss") for r in lines] == [r.get("loss") for r in again]


def test_resume_refuses_other_options(base, tmp_path):
    config = config_for(base, max_steps="2")
    train_controlnet(config, tmp_path / "run")
    with pytest.raises(UserError, match="different ControlNet options"):
        train_controlnet(config, tmp_path / "run", ControlNetOptions(hint="canny"), resume=True)


def test_cli_trains_and_the_export_loads_with_control(base, tmp_path, capsys):
    run = tmp_path / "run"
    flags = [f"--{k}={v}" for k, v in FAST.items()]
    assert (
        main(["train-controlnet", "--model", str(base), "--max_steps=2", "-o", str(run), "--quiet", *flags])
        == 0
    )
    export = run / "export"
    assert f"ControlNet saved to {export}" in capsys.readouterr().out
    config = json.loads((export / "config.json").read_text())
    assert config["_class_name"] == "ControlNetModel"
    assert config["conditioning_embedding_out_channels"] == [16, 32]  # the tiny model's latent factor 2
    network = load_controlnet(export)
    assert network.mid_zero_conv.weight.abs().sum() > 0  # trained away from zero

    hint = tmp_path / "layout.png"
    scene = Scene((ShapeSpec("red", "circle", (20.0, 20.0), 16.0),), "white")
    layout_map(scene).save(hint)
    pipe = ld.load(str(base))
    settings = {"steps": 2, "seed": 0, "width": 32, "height": 32}
    plain = np.asarray(pipe.generate("a red circle on a white background", **settings)[0])
    controlled = pipe.generate(
        "a red circle on a white background", control=[ld.Control(str(export), hint)], **settings
    )[0]
    assert controlled.size == (32, 32) and not np.array_equal(np.asarray(controlled), plain)
    generate = ["generate", "a red circle on a white background", "--model", str(base), "--steps", "2"]
    generate += ["--size", "32x32", "--seed", "0", "-o"]
    assert main([*generate, str(tmp_path / "plain.png")]) == 0
    assert main([*generate, str(tmp_path / "out.png"), "--control", f"{export}:{hint}"]) == 0
    cli = [np.asarray(Image.open(tmp_path / name).convert("RGB")) for name in ("plain.png", "out.png")]
    assert cli[0].shape == (32, 32, 3) and not np.array_equal(*cli)


def test_bad_options_are_one_clear_error(base, tmp_path, capsys):
    assert (
        main(["train-controlnet", "--model", str(base), "--hint", "nonsense", "-o", str(tmp_path / "r")]) == 2
    )
    assert "unknown control preprocessor 'nonsense'" in capsys.readouterr().err
    weight = ["--object-weight", "0", "--controlnet", "layout"]
    assert main(["train-controlnet", "--model", str(base), *weight, "-o", str(tmp_path / "w")]) == 2
    assert "object weight must be a positive number" in capsys.readouterr().err
    with pytest.raises(UserError, match=r"needs data\.dataset=shapes"):
        config = config_for(base, **{"data.dataset": "imagefolder", "data.path": str(tmp_path)})
        train_controlnet(config, tmp_path / "run")
    with pytest.raises(UserError, match="keeps the architecture"):
        controlnet_config(str(base), load_components(str(base)).config, {"model.unet.model_channels": "8"})


def test_the_name_layout_resolves_to_the_shipped_controlnet(base, tmp_path, monkeypatch):
    from latentdiffusion.pipelines import control, loading

    run = tmp_path / "run"
    train_controlnet(config_for(base, max_steps="1"), run)
    monkeypatch.setattr(loading, "shipped_model_dir", lambda name: tmp_path / "data" / name)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="layout ControlNet is not installed"):
        control.shipped_controlnet("layout")
    (tmp_path / "data").mkdir()
    (run / "export").rename(tmp_path / "data" / "layout-controlnet")
    assert control.shipped_controlnet("layout") == tmp_path / "data" / "layout-controlnet"
    assert control.shipped_controlnet("other") == "other"
    (tmp_path / "layout").mkdir()  # a folder of that name in the working directory wins
    assert control.shipped_controlnet("layout") == "layout"


def test_the_shipped_layout_controlnet_fits_the_default_model():
    from latentdiffusion.checkpoints.diffusers_folder import read_weights
    from latentdiffusion.pipelines.control import check_base, shipped_controlnet

    folder = shipped_controlnet("layout")
    network = load_controlnet(folder)
    check_base(load_components("default"), network)
    assert network.config.coordinate_channels and network.control_config.hint_channels == (16, 32, 64)
    weights = read_weights(folder, ("diffusion_pytorch_model.safetensors",))
    assert {w.dtype for w in weights.values()} == {torch.float16}
    assert network.mid_zero_conv.weight.abs().sum() > 0


# -------------------------------------------------------------------- fine-tuning and object weights


def test_object_weights_weigh_latent_pixels_under_objects():
    square = ShapeSpec("red", "square", (20.0, 20.0), 14.0)  # pixels 13..26: latent pixels 3..6 at f = 4
    hint = torch.from_numpy(np.array(layout_map(Scene((square,), "white")))).permute(2, 0, 1) / 255.0
    weights = object_weights(hint[None], 16, 4.0)
    assert weights.shape == (1, 1, 16, 16)
    under = torch.zeros(16, 16, dtype=torch.bool)
    under[3:7, 3:7] = True
    assert torch.allclose(weights[0, 0][under], 4 * weights[0, 0][~under][0])
    assert torch.allclose(weights[0, 0][~under], weights[0, 0][~under][0])
    assert torch.allclose(weights.mean(), torch.tensor(1.0))
    assert torch.equal(object_weights(hint[None], 16, 1.0), torch.ones(1, 1, 16, 16))


def test_object_weight_changes_the_training_loss_only(base):
    plain, weighted = make_task(base), make_task(base, ControlNetOptions(object_weight=4.0))
    weighted.controlnet.load_state_dict(plain.controlnet.state_dict())
    batch = layout_batch(2)

    def loss(task, **kwargs):
        random = StepRandom(0, 3, len(batch), torch.arange(len(batch)))
        return task.controlled_loss(task.controlnet, batch, random, **kwargs)[0].item()

    assert loss(weighted) != pytest.approx(loss(plain), rel=1e-3)
    assert loss(weighted, weighted=False) == loss(plain)  # the held-out loss stays the plain one


def test_fine_tuning_starts_from_the_given_controlnet(base, tmp_path):
    run = tmp_path / "run"
    train_controlnet(config_for(base, max_steps="1"), run)
    export = run / "export"
    task = make_task(base, ControlNetOptions(init=str(export)))
    saved = load_controlnet(export).state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in task.controlnet.state_dict().items())
    assert task.controlnet.mid_zero_conv.weight.abs().sum() > 0  # not the zero start
    with pytest.raises(UserError, match="another architecture"):
        make_task(base, ControlNetOptions(init=str(export), hint_channels=(8, 16)))


def test_fine_tuning_options_are_saved_checked_and_validated(tmp_path):
    check_options(tmp_path / "old", ControlNetOptions(), resume=False)
    assert json.loads((tmp_path / "old" / OPTIONS_FILE).read_text()) == {
        "hint": "shapes-layout",
        "hint_channels": None,
    }  # unchanged for runs that do not set them
    options = ControlNetOptions(init="layout", object_weight=4.0)
    check_options(tmp_path / "new", options, resume=False)
    assert saved_options(tmp_path / "new") == options
    with pytest.raises(UserError, match="different ControlNet options"):
        check_options(tmp_path / "new", ControlNetOptions(init="layout"), resume=True)
    with pytest.raises(UserError, match="object weight must be a positive number"):
        ControlNetOptions(object_weight=0.0).validate()
    with pytest.raises(UserError, match="object weight needs the shapes-layout hint"):
        ControlNetOptions(hint="canny", object_weight=2.0).validate()
    with pytest.raises(UserError, match="ControlNet nowhere not found"):
        ControlNetOptions(init="nowhere").validate()
