"""A stand-in backend for tests of which U-Net a generation path calls: ``wrap`` puts a U-Net that counts
its calls (and otherwise is the torch U-Net) into the served components, as a real backend puts its own."""

from __future__ import annotations

import torch
from torch import nn

from latentdiffusion.components import Components


class CountingUNet(nn.Module):
    """``unet``, counting each call in ``backend.calls``."""

    def __init__(self, unet: nn.Module, backend: MarkingBackend) -> None:
        super().__init__()
        self.unet = unet
        self.backend = backend

    @property
    def config(self):
        return self.unet.config

    def forward(self, *args, **kwargs) -> torch.Tensor:
        self.backend.calls += 1
        return self.unet(*args, **kwargs)


class MarkingBackend:
    """``pipe.backend = MarkingBackend()``: requests that go through ``pipe.served()`` count U-Net calls."""

    def __init__(self) -> None:
        self.calls = 0

    def wrap(self, components: Components) -> Components:
        return components.with_modules(unet=CountingUNet(components.unet, self))
