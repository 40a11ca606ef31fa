"""Motion-module training on a tiny random base model (64 px, 4-frame moving-shapes clips): the modules
start as the identity, only they train, two steps give a finite loss, resume is bit-exact, a checkpoint's
modules are the export's, bad input."""

from __future__ import annotations

import json

import pytest
import torch

import latentdiffusion as ld
from latentdiffusion.checkpoints.motion_keys import load_motion_modules
from latentdiffusion.errors import UserError
from latentdiffusion.models.motion import VideoUNet
from latentdiffusion.pipelines.loading import load_components
from latentdiffusion.training.config import validate
from latentdiffusion.training.data import Batch
from latentdiffusion.training.motion import (
    EXPORT_FILE,
    MotionOptions,
    MotionTask,
    MovingShapesSource,
    checkpoint_modules,
    motion_config,
    train_motion,
)

FAST = {"data.holdout": "1", "batch_size": "1", "log_every": "1", "optim.warmup_steps": "0"}
FAST |= {"optim.lr": "1e-3", "checkpoint_every": "1", "eval_every": "2"}
OPTIONS = MotionOptions(frames=4)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("motion") / "base"
    ld.load("preset:tiny").save(folder)
    return folder


def config_for(base, **overrides):
    return validate(motion_config(str(base), load_components(str(base)).config, FAST | overrides))


def clip_batch(n: int = 1) -> Batch:
    items = [MovingShapesSource(0, 4).load(i) for i in range(n)]
    return Batch(torch.stack([x for x, _ in items]), [c for _, c in items], torch.arange(n))


def test_fresh_modules_are_the_identity_and_only_they_train(base):
    task = MotionTask(config_for(base), load_components(str(base)), torch.device("cpu"), OPTIONS)
    x, t = torch.randn(1, 4, 4, 8, 8), torch.tensor([500])
    cond = task.condition({}, clip_batch())
    with torch.no_grad():
        video = VideoUNet(task.unet, task.motion)(x, t, **cond)
        stills = task.unet(x[:, :, 1], t, **cond)
    assert torch.allclose(video[:, :, 1], stills, atol=1e-5)
    groups = task.parameter_groups()
    assert set(groups) == {"motion"} and all(p.requires_grad for p in groups["motion"])
    assert not any(p.requires_grad for p in task.unet.parameters())


def straight_and_resumed(config, tmp_path, options: MotionOptions, interrupt_after):
    """Two runs of ``config``: straight through (``tmp_path/straight``), and killed after step 1 then
    resumed (``tmp_path/resumed``)."""
    straight = train_motion(config, tmp_path / "straight", options)
    with pytest.MonkeyPatch.context() as patch:
        interrupt_after(patch, 1)
        with pytest.raises(KeyboardInterrupt):
            train_motion(config, tmp_path / "resumed", options)
    return straight, train_motion(config, tmp_path / "resumed", options, resume=True)


def test_two_steps_finite_and_resume_exact(base, tmp_path, interrupt_after):
    config = config_for(base, max_steps="2")
    straight, resumed = straight_and_resumed(config, tmp_path, OPTIONS, interrupt_after)
    lines = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in lines if "loss" in r]
    assert losses and all(torch.isfinite(torch.tensor(v)) for v in losses)
    ours = load_motion_modules(resumed.export_dir / EXPORT_FILE).state_dict()
    theirs = load_motion_modules(straight.export_dir / EXPORT_FILE).state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert any(theirs[k].abs().sum() > 0 for k in theirs if k.endswith("proj_out.weight"))  # it learned
    latest = checkpoint_modules(tmp_path / "straight").state_dict()  # the export's (EMA) weights
    assert all(torch.equal(latest[k], theirs[k]) for k in theirs)
    with pytest.raises(UserError, match="holds no checkpoint of step 7"):
        checkpoint_modules(tmp_path / "straight", 7)
    again = [json.loads(x) for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("loss") for r in lines] == [r.get("loss") for r in again]
    with pytest.raises(UserError, match="different motion options"):
        train_motion(config, tmp_path / "resumed", MotionOptions(frames=3), resume=True)


def test_bad_input(base, tmp_path):
    with pytest.raises(UserError, match="holds clips"):
        ld_config = validate(motion_config(str(base), load_components(str(base)).config, FAST))
        from latentdiffusion.training.data import open_source

        open_source(ld_config.data, 0)
    with pytest.raises(UserError, match=r"data\.resolution=64"):
        train_motion(config_for(base, **{"data.resolution": "32", "max_steps": "1"}), tmp_path / "a", OPTIONS)
    with pytest.raises(UserError, match="2 to 32 frames"):
        train_motion(config_for(base, max_steps="1"), tmp_path / "b", MotionOptions(frames=1))
    with pytest.raises(
        UserError, match=r"motion training has its own objective: drop diffusion\.pixel_weight"
    ):
        MotionTask(
            config_for(base, **{"diffusion.pixel_weight": "1"}),
            load_components(str(base)),
            torch.device("cpu"),
            OPTIONS,
        )


def test_cli_trains_resumes_and_exports(base, tmp_path, capsys):
    from latentdiffusion.cli.main import main

    run = tmp_path / "run"
    flags = ["--frames", "3", "--data.holdout=1", "--batch_size=1", "--quiet"]
    assert main(["train-motion", "--model", str(base), "-o", str(run), "--max_steps=1", *flags]) == 0
    assert "motion modules saved" in capsys.readouterr().out
    assert json.loads((run / "motion.json").read_text())["frames"] == 3
    assert main(["train-motion", "-o", str(run), "--resume", "--max_steps=2", "--quiet"]) == 0
    modules = load_motion_modules(run / "export" / EXPORT_FILE)
    model = load_components(str(base)).config
    assert modules.config == MotionOptions(frames=3).motion_config(model)  # the file says it all
    assert (
        main(["train-motion", "--model", str(base), "--data.resolution=32", "-o", str(tmp_path / "b")]) == 2
    )
    assert "data.resolution=64" in capsys.readouterr().err
