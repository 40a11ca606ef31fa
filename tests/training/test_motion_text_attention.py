"""Motion training with ``--text-attention``: the modules' second attention reads the prompt, learns,
resumes exactly and is exported in the original layout with its block types; a resume without the option
is refused."""

from __future__ import annotations

import pytest
import torch

from latentdiffusion.checkpoints.motion_keys import load_motion_modules
from latentdiffusion.errors import UserError
from latentdiffusion.pipelines.loading import load_components
from latentdiffusion.training.motion import (
    EXPORT_FILE,
    MotionOptions,
    MotionTask,
    checkpoint_modules,
    train_motion,
)

from .test_motion_training import base, config_for, straight_and_resumed  # noqa: F401  (the tiny base model)

TEXT = MotionOptions(frames=4, text_attention=True)


def test_resume_exact_and_the_text_attention_exported(base, tmp_path, interrupt_after):  # noqa: F811
    config = config_for(base, max_steps="2")
    straight, resumed = straight_and_resumed(config, tmp_path, TEXT, interrupt_after)
    ours = load_motion_modules(resumed.export_dir / EXPORT_FILE)
    theirs = load_motion_modules(straight.export_dir / EXPORT_FILE)
    assert theirs.config.cross_attention_dim == config.model.unet.context_dim
    assert ours.config == theirs.config == checkpoint_modules(tmp_path / "straight").config
    a, b = ours.state_dict(), theirs.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    key = "down_blocks.0.0.blocks.0.attn2.to_k.weight"
    assert b[key].shape[1] == config.model.unet.context_dim
    start = MotionTask(config, load_components(str(base)), torch.device("cpu"), TEXT).motion.state_dict()
    assert not torch.equal(start[key], b[key])  # the text keys learned
    with pytest.raises(UserError, match=r"cannot resume .* different motion options"):
        train_motion(config, tmp_path / "straight", MotionOptions(frames=4), resume=True)
