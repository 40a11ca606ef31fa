"""What the web UI's routes keep beside the server's state: the offered models, LoRAs and upscalers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from latentdiffusion.serving.a1111_models import ModelLibrary
from latentdiffusion.serving.a1111_networks import LoraLibrary

if TYPE_CHECKING:
    from latentdiffusion.serving.common import ServerState


@dataclass
class A1111Resources:
    models: ModelLibrary
    loras: LoraLibrary


def attach(state: ServerState) -> A1111Resources:
    """Build the resources of ``state.settings`` and hook the model library into the queue, so that a
    job of any API finds its model loaded."""
    settings = state.settings
    models = ModelLibrary(state.pipe, settings.model_source, settings.model_dir, settings.loader)
    state.a1111 = A1111Resources(models, LoraLibrary(settings.lora_dir))
    state.queue.prepare = lambda: models.prepare(state)
    return state.a1111


def resources(state: ServerState) -> A1111Resources:
    return state.a1111 if state.a1111 is not None else attach(state)
