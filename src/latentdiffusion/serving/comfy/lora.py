"""LoRAs of a workflow, merged into the served model only while a node uses them.

A LoraLoader chain gives a MODEL and a CLIP their own LoRA lists (``values.Model.loras``,
``values.Clip.loras``); two branches of one workflow may use different lists, and the next request must
see the plain model. ``WeightPatcher.use(model_loras, clip_loras)`` makes the network carry exactly the
first list and the text encoders exactly the second (W + sum of strength * alpha / r * B A, Hu et al.
2022, Eq. 3; ``checkpoints.network_lora``), keeping a copy of every layer's weight it changes, and
``restore`` copies them back bit for bit when the workflow ends.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from latentdiffusion.checkpoints.lora_keys import restore_tensors, saved_tensors
from latentdiffusion.checkpoints.network_lora import Update, merge_updates, plan_model_lora
from latentdiffusion.components import Components

LoRAList = Sequence[tuple[Path, float]]


class WeightPatcher:
    """Merges LoRA lists into one model's networks and takes them out again exactly."""

    def __init__(self, components: Components) -> None:
        self.components = components
        self._plans: dict[Path, tuple[list[Update], list[Update]]] = {}  # file -> (network, text)
        self._saved: dict[nn.Module, dict] = {}  # layer -> its weight (and bias) before any merge
        self._applied: tuple[tuple, tuple] = ((), ())

    def use(self, model_loras: LoRAList, clip_loras: LoRAList) -> None:
        """Make the network carry ``model_loras`` and the text encoders ``clip_loras``, nothing else."""
        wanted = (tuple(model_loras), tuple(clip_loras))
        if wanted == self._applied:
            return
        self.restore()
        for path, strength in wanted[0]:
            self._merge(self._plan(path)[0], strength)
        for path, strength in wanted[1]:
            self._merge(self._plan(path)[1], strength)
        self._applied = wanted

    def restore(self) -> None:
        """Put back every changed weight as it was before the first merge."""
        for layer, tensors in self._saved.items():
            restore_tensors(layer, tensors)
        self._saved.clear()
        self._applied = ((), ())

    def check(self, path: Path) -> None:
        """Read and check a LoRA file against the model (UserError if it does not fit)."""
        self._plan(path)

    def _plan(self, path: Path) -> tuple[list[Update], list[Update]]:
        if path not in self._plans:
            from latentdiffusion.checkpoints.lora_keys import read_lora_file

            components = self.components
            state, metadata = read_lora_file(path)
            updates = plan_model_lora(state, metadata, components.family, components.modules, path.name)
            network = set(components.modules[components.family.network_role].modules())
            self._plans[path] = (
                [u for u in updates if u.layer in network],
                [u for u in updates if u.layer not in network],
            )
        return self._plans[path]

    def _merge(self, updates: list[Update], strength: float) -> None:
        if strength == 0 or not updates:
            return
        for update in updates:
            if update.layer not in self._saved:
                self._saved[update.layer] = saved_tensors(update.layer)
        with torch.no_grad():
            merge_updates(updates, strength)
