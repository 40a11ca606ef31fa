"""What the ComfyUI API shares across requests: the server's state, the file folders, the prompt
records (queue and history), the websocket hub, and the lists the choice inputs offer (the models of
``--model-dir``, LoRA files, ControlNets, uploaded images)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from latentdiffusion.serving.comfy import names
from latentdiffusion.serving.comfy.files import FileStore
from latentdiffusion.serving.comfy.records import Records
from latentdiffusion.serving.comfy.ws import Hub
from latentdiffusion.serving.common import ServerState

if TYPE_CHECKING:
    from latentdiffusion.serving.a1111_models import ModelEntry, ModelLibrary

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")


class ComfyServer:
    """One per application (``app.state.comfy``), made at the first ComfyUI request."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.files = FileStore(state.settings.output_dir)
        self.records = Records()
        self.hub = Hub()

    # ---- the choices nodes offer

    def checkpoints(self) -> list[str]:
        """The models the server offers (``ldm serve --model-dir``, as the AUTOMATIC1111 routes list
        them), and the loaded one also by its model name."""
        offered = [entry.name for entry in self.models().entries()]
        name = self.state.pipe.components.name
        return offered + ([name] if name not in offered else [])

    def models(self) -> ModelLibrary:
        """The server's model library (shared with the AUTOMATIC1111 routes: one model in memory)."""
        from latentdiffusion.serving.a1111_state import resources

        return resources(self.state).models

    def find_checkpoint(self, name: str) -> ModelEntry:
        """The library's entry for a ``ckpt_name`` (the loaded model's own name names it too)."""
        library = self.models()
        if name == self.state.pipe.components.name and name not in [e.name for e in library.entries()]:
            return library.current
        return library.find(name)

    def loras(self) -> list[str]:
        """LoRA files under ``ldm serve --lora-dir``, as paths relative to it."""
        folder = self.state.settings.lora_dir
        if folder is None or not folder.is_dir():
            return []
        files = [p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in LORA_SUFFIXES]
        return sorted(p.relative_to(folder).as_posix() for p in files)

    def lora_path(self, name: str) -> Path:
        return self.state.settings.lora_dir / name

    def controlnets(self) -> list[str]:
        from latentdiffusion.serving.controlnet_api import scan

        return [entry.path.name for entry in scan(self.state.settings.controlnet_dir)]

    def controlnet_path(self, name: str) -> Path:
        return self.state.settings.controlnet_dir / name

    def input_images(self) -> list[str]:
        return self.files.names("input")

    def explain_choice(self, name: str, value: object) -> str | None:
        """A clearer refusal than "not in list" where there is one to give."""
        if name in ("sampler_name", "scheduler") and isinstance(value, str):
            return names.refusal(name, value)
        if name == "lora_name" and self.state.settings.lora_dir is None:
            return (
                f"lora_name: '{value}': this server offers no LoRAs (start it with ldm serve --lora-dir DIR)"
            )
        if name == "control_net_name" and self.state.settings.controlnet_dir is None:
            return (
                f"control_net_name: '{value}': this server offers no ControlNets "
                "(start it with ldm serve --controlnet-dir DIR)"
            )
        if name == "ckpt_name":
            return f"ckpt_name: '{value}' is not offered here; this server offers {self.checkpoints()}"
        return None
