"""Motion training with spatial LoRA adapters (``ldm train-motion --spatial-lora RANK``): only the adapters
and the modules learn, resume is exact, the adapters are exported beside the module as a LoRA file that
loads onto the model, and a bad rank is refused."""

from __future__ import annotations

import pytest
import torch

import latentdiffusion as ld
from latentdiffusion.errors import UserError
from latentdiffusion.models.lora import lora_modules
from latentdiffusion.pipelines.loading import load_components
from latentdiffusion.training.motion import (
    EXPORT_FILE,
    MotionOptions,
    MotionTask,
    spatial_lora_file,
    train_motion,
)
from latentdiffusion.training.task import StepRandom

from .test_motion_training import base, clip_batch, config_for, straight_and_resumed  # noqa: F401  (the tiny base model)

SPATIAL = MotionOptions(frames=4, spatial_lora=4)


def test_only_the_adapters_and_the_modules_get_gradients(base):  # noqa: F811
    task = MotionTask(config_for(base), load_components(str(base)), torch.device("cpu"), SPATIAL)
    groups = task.parameter_groups()
    assert set(groups) == {"motion", "spatial"}
    adapters = lora_modules(task.unet)
    assert adapters and any(path.endswith("attn2.to_k") for path in adapters)  # cross-attention too
    assert {id(p) for p in groups["spatial"]} == {
        id(p) for a in adapters.values() for p in (a.lora_down.weight, a.lora_up.weight)
    }
    for params in groups.values():
        for p in params:
            p.requires_grad_(True)
    for _ in range(2):  # the second step: the adapters' B is no longer zero, so A gets gradients too
        losses, _ = task.losses(task.networks, clip_batch(), StepRandom(0, 0, 1, torch.arange(1)), 0)
        assert losses["motion"] is losses["spatial"]
        losses["motion"].backward()
        with torch.no_grad():
            for p in groups["spatial"]:
                if p.grad is not None:
                    p -= 0.1 * p.grad.sign()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in groups["spatial"])
    lora = {id(p) for p in groups["spatial"]}
    assert all(p.grad is None for p in task.unet.parameters() if id(p) not in lora)


def test_resume_exact_and_the_adapters_exported_beside_the_module(base, tmp_path, interrupt_after):  # noqa: F811
    config = config_for(base, max_steps="2")
    straight, resumed = straight_and_resumed(config, tmp_path, SPATIAL, interrupt_after)
    files = [spatial_lora_file(run.export_dir / EXPORT_FILE) for run in (straight, resumed)]
    assert files[0].name == "motion_module.lora.safetensors" and files[0].is_file()
    assert files[0].read_bytes() == files[1].read_bytes()
    plain = ld.load(str(base)).components.unet.state_dict()
    adapted = ld.load(str(base), loras=[(files[0], 1.0)]).components.unet.state_dict()
    changed = [k for k in plain if not torch.equal(plain[k], adapted[k])]
    assert changed and all(".to_" in k for k in changed)  # the attention projections, nothing else
    with pytest.raises(UserError, match=r"cannot resume .* different motion options"):
        train_motion(config, tmp_path / "straight", MotionOptions(frames=4, spatial_lora=8), resume=True)


@pytest.mark.parametrize("rank", [-1, True, 1.5])
def test_a_bad_rank_is_refused(rank):
    with pytest.raises(UserError, match="--spatial-lora takes a LoRA rank"):
        MotionOptions(spatial_lora=rank).validate()
