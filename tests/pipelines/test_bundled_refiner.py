"""A refiner bundled in a model folder (``refiner/`` plus ``refiner_switch``): loaded with the model,
used by ``generate`` as the same refiner given by hand would be, and reached by LoRAs and saving."""

import json

import numpy as np
import pytest
import torch

import latentdiffusion as ld
from latentdiffusion.checkpoints.native import NATIVE_CONFIG
from latentdiffusion.cli.main import main
from latentdiffusion.errors import UserError

OPTIONS = dict(steps=4, seed=3, width=32, height=32)


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(image) for image in images])


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny model saved alone, its perturbed copy (the expert), and the model bundling the expert at 0.5."""
    root = tmp_path_factory.mktemp("bundled")
    base = ld.load("preset:tiny")
    expert = ld.load("preset:tiny")
    with torch.no_grad():
        for p in expert.unet.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    base.save(root / "base")
    expert.save(root / "expert")
    base.refiner, base.refiner_switch = expert, 0.5
    base.save(root / "bundled")
    return root


def test_a_bundled_refiner_loads_and_finishes_images_as_the_same_refiner_given_by_hand(folders):
    bundled = ld.load(str(folders / "bundled"))
    assert bundled.refiner is not None and bundled.refiner_switch == 0.5
    assert json.loads((folders / "bundled" / NATIVE_CONFIG).read_text())["refiner_switch"] == 0.5
    base, expert = ld.load(str(folders / "base")), ld.load(str(folders / "expert"))
    assert base.refiner is None
    images = bundled.generate("a red square", **OPTIONS)
    by_hand = base.generate("a red square", refiner=expert, refiner_switch=0.5, **OPTIONS)
    assert np.array_equal(pixels(images), pixels(by_hand))
    assert "Refiner switch at: 0.5" in images[0].info["parameters"]
    alone = base.generate("a red square", **OPTIONS)
    assert not np.array_equal(pixels(images), pixels(alone))  # the expert did change the images
    assert np.array_equal(
        pixels(bundled.generate("a red square", refiner_switch=1, **OPTIONS)), pixels(alone)
    )
    earlier = base.generate("a red square", refiner=expert, refiner_switch=0.25, **OPTIONS)
    assert np.array_equal(
        pixels(bundled.generate("a red square", refiner_switch=0.25, **OPTIONS)), pixels(earlier)
    )


def test_the_bundled_refiner_decodes_with_the_models_first_stage_and_takes_its_loras(folders, tiny_lora):
    bundled = ld.load(str(folders / "bundled"))
    assert bundled.refiner.vae is bundled.vae
    before = {k: v.clone() for k, v in bundled.refiner.unet.state_dict().items()}
    bundled.load_lora(tiny_lora, 1.0)
    after = bundled.refiner.unet.state_dict()
    assert any(not torch.equal(after[k], before[k]) for k in before)
    loaded = ld.load(str(folders / "bundled"), loras=[(tiny_lora, 1.0)])
    assert all(torch.equal(loaded.refiner.unet.state_dict()[k], after[k]) for k in after)


def test_saving_keeps_the_bundled_refiner_and_the_cli_can_leave_it_out(folders, tmp_path, capsys):
    bundled = ld.load(str(folders / "bundled"))
    bundled.save(tmp_path / "again")
    again = ld.load(str(tmp_path / "again"))
    assert again.refiner is not None and again.refiner_switch == 0.5
    common = ["eval-shapes", "--model", str(folders / "bundled"), "--n", "1", "--steps", "4", "--cfg", "1"]
    assert main([*common, "--grid", str(tmp_path / "a.png")]) == 0
    assert "its bundled refiner from 0.5" in capsys.readouterr().out
    assert main([*common, "--refiner-switch", "1", "--grid", str(tmp_path / "b.png")]) == 0
    assert "no refiner" in capsys.readouterr().out


@pytest.mark.parametrize("switch", [0, 1, 1.5, "half", True])
def test_a_bad_bundled_switch_is_refused_with_one_message(folders, tmp_path, switch):
    import shutil

    shutil.copytree(folders / "bundled", tmp_path / "m")
    meta = json.loads((tmp_path / "m" / NATIVE_CONFIG).read_text())
    meta["refiner_switch"] = switch
    (tmp_path / "m" / NATIVE_CONFIG).write_text(json.dumps(meta))
    with pytest.raises(UserError, match="refiner_switch must be a number in \\(0, 1\\)"):
        ld.load(str(tmp_path / "m"))


def test_a_missing_or_foreign_bundled_refiner_is_refused(folders, tmp_path):
    import shutil

    shutil.copytree(folders / "bundled", tmp_path / "m")
    shutil.rmtree(tmp_path / "m" / "refiner")
    with pytest.raises(UserError, match="names a refiner but"):
        ld.load(str(tmp_path / "m"))
    shutil.copytree(folders / "bundled", tmp_path / "n")
    shutil.rmtree(tmp_path / "n" / "refiner")
    ld.load("preset:shapes").save(tmp_path / "n" / "refiner")  # another U-Net
    with pytest.raises(UserError, match="is not of the model's architecture"):
        ld.load(str(tmp_path / "n"))


def test_a_walk_finishes_its_frames_with_the_bundled_refiner_as_generate_does(folders):
    bundled = ld.load(str(folders / "bundled"))
    frames = bundled.walk(
        ["a red square", "a blue circle"], seeds=[1, 2], frames=2, steps=4, width=32, height=32
    )
    for prompt, seed, frame in zip(["a red square", "a blue circle"], [1, 2], frames[::2], strict=True):
        (still,) = bundled.generate(prompt, seed=seed, steps=4, width=32, height=32)
        assert np.array_equal(np.asarray(frame), np.asarray(still))
        assert frame.info["parameters"].startswith(still.info["parameters"])


def test_img2img_runs_the_steps_below_the_switch_with_the_bundled_refiner(folders, tmp_path, capsys):
    bundled = ld.load(str(folders / "bundled"))
    base, expert = ld.load(str(folders / "base")), ld.load(str(folders / "expert"))
    picture = base.generate("a blue circle", **OPTIONS)[0]
    edit = dict(steps=8, seed=5)
    # strength 0.4 starts below the switch at 0.5: every step is the expert's (sharing the first stage)
    low = bundled.img2img(picture, "a red square", strength=0.4, **edit)
    assert np.array_equal(pixels(low), pixels(expert.img2img(picture, "a red square", strength=0.4, **edit)))
    assert "Refiner switch at: 0.5" in low[0].info["parameters"]
    # strength 0.9: the base runs the steps above the switch, the expert the rest (one count of steps)
    seen = []
    high = bundled.img2img(
        picture, "a red square", strength=0.9, callback=lambda *a: seen.append(a[0]), **edit
    )
    assert seen == list(range(1, 8))  # int(8 * 0.9) steps, counted across both models
    alone_base = base.img2img(picture, "a red square", strength=0.9, **edit)
    alone_expert = expert.img2img(picture, "a red square", strength=0.9, **edit)
    assert not np.array_equal(pixels(high), pixels(alone_base))
    assert not np.array_equal(pixels(high), pixels(alone_expert))
    assert np.array_equal(
        pixels(bundled.img2img(picture, "a red square", strength=0.9, refiner_switch=1, **edit)),
        pixels(alone_base),
    )
    path = tmp_path / "in.png"
    picture.save(path)
    flags = ["img2img", str(path), "a red square", "--model", str(folders / "bundled"), "--steps", "8"]
    assert main([*flags, "--seed", "5", "--strength", "0.4", "-o", str(tmp_path / "a.png")]) == 0
    assert (
        main(
            [
                *flags,
                "--seed",
                "5",
                "--strength",
                "0.4",
                "--refiner-switch",
                "1",
                "-o",
                str(tmp_path / "b.png"),
            ]
        )
        == 0
    )
    capsys.readouterr()
    from PIL import Image

    a, b = Image.open(tmp_path / "a.png"), Image.open(tmp_path / "b.png")
    assert "Refiner switch at: 0.5" in a.info["parameters"] and "Refiner" not in b.info["parameters"]
    assert not np.array_equal(np.asarray(a), np.asarray(b))
