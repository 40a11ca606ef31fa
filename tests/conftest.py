"""Fixtures shared across the test folders."""

import pytest
import torch


@pytest.fixture
def tiny_lora(tmp_path):
    """A LoRA file for the ``tiny`` preset's U-Net attention and text encoder, with random up-projections
    (so that merging it changes both networks)."""
    from latentdiffusion.checkpoints.lora_keys import save_lora
    from latentdiffusion.components import build_components
    from latentdiffusion.config import TINY
    from latentdiffusion.models.lora import inject_lora, lora_modules, lora_state_dict

    components = build_components(TINY, seed=0)
    nets = {"unet": components.unet, "text_encoder": components.text_encoder}
    inject_lora(nets, ("attention", "text"), rank=2)
    with torch.no_grad():
        for net in nets.values():
            for module in lora_modules(net).values():
                module.lora_up.weight.normal_(0, 0.1)
    return save_lora(tmp_path / "l.safetensors", {n: lora_state_dict(m) for n, m in nets.items()}, TINY)
