"""LoRAs of ``ldm serve --lora-dir`` as the web UI offers them: ``GET /sdapi/v1/loras`` and
``<lora:name:weight>`` tags in prompts, merged into the weights for that request only.

A tag is ``<lora:NAME>``, ``<lora:NAME:WEIGHT>`` or ``<lora:NAME:TE_WEIGHT:UNET_WEIGHT>`` (also
``te=`` / ``unet=``), NAME a file's name without extension (or its ``ss_output_name`` alias). Tags are
taken out of the prompt before it is encoded and stay in the PNG info, followed by ``Lora hashes`` as
the web UI writes them (the first 12 hex digits of the sha256 of a safetensors file's tensor data, the
"addnet" hash; of the whole file otherwise). The merge runs on the queue's worker: every layer a LoRA
changes is copied first and copied back after the request (also when it fails or is interrupted), so
the model's weights afterwards are bit for bit what they were. Other extra-network tags
(``<hypernet:...>``) and tags in the negative prompt are refused.

Also the web UI's listings that are empty here, each saying so by being empty: embeddings (textual
inversion is not supported), hypernetworks, face restorers, Real-ESRGAN models, prompt styles, and
scripts (none: the web UI's scripts are not run).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fastapi import APIRouter, Request

from latentdiffusion.pipelines.pipeline import Pipeline
from latentdiffusion.serving.common import server_state
from latentdiffusion.serving.settings import FieldError

router = APIRouter()
LORA_SUFFIXES = (".safetensors", ".ckpt", ".pt")
TAG = re.compile(r"<(\w+):([^>]+)>")  # the web UI's extra-network tag
LORA_HASH = 12
CHUNK = 1 << 20


@dataclass(frozen=True)
class LoraFile:
    name: str  # the file's name without extension
    path: Path
    metadata: dict[str, str]

    @property
    def alias(self) -> str:
        return self.metadata.get("ss_output_name") or self.name


@dataclass(frozen=True)
class LoraUse:
    lora: LoraFile
    text_weight: float
    network_weight: float


def read_metadata(path: Path) -> dict[str, str]:
    """A safetensors file's ``__metadata__`` (from its header only); {} for other files."""
    if path.suffix != ".safetensors":
        return {}
    try:
        with path.open("rb") as stream:
            size = int.from_bytes(stream.read(8), "little")
            header = json.loads(stream.read(min(size, 100 << 20)))
    except (OSError, ValueError):
        return {}
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {}


def lora_sha256(path: Path) -> str:
    """The web UI's LoRA hash: sha256 of a safetensors file's bytes after its header, else of the file."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        if path.suffix == ".safetensors":
            stream.seek(8 + int.from_bytes(stream.read(8), "little"))
        while chunk := stream.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class LoraLibrary:
    """The LoRA files under ``folder`` (read again by ``refresh``), their hashes once computed."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self._files: list[LoraFile] = []
        self._hashes: dict[tuple, str] = {}
        self._lock = threading.Lock()
        self.refresh()

    def refresh(self) -> None:
        if self.folder is None or not self.folder.is_dir():
            self._files = []
            return
        paths = sorted(p for p in self.folder.rglob("*") if p.is_file() and p.suffix in LORA_SUFFIXES)
        self._files = [LoraFile(p.stem, p, read_metadata(p)) for p in paths]

    def files(self) -> list[LoraFile]:
        return list(self._files)

    def find(self, name: str) -> LoraFile:
        for lora in self._files:
            if name in (lora.name, lora.alias):
                return lora
        where = (
            "no --lora-dir was given"
            if self.folder is None
            else f"known: {', '.join(self.names()) or 'none'}"
        )
        raise FieldError("prompt", f"<lora:{name}>: no LoRA of that name ({where})")

    def names(self) -> list[str]:
        return [lora.name for lora in self._files]

    def short_hash(self, lora: LoraFile) -> str:
        stat = lora.path.stat()
        key = (str(lora.path), stat.st_size, stat.st_mtime_ns)
        with self._lock:
            if key not in self._hashes:
                self._hashes[key] = lora_sha256(lora.path)
            return self._hashes[key][:LORA_HASH]


# ---------------------------------------------------------------------------------------------- tags


def parse_weight(text: str, tag: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise FieldError("prompt", f"{tag}: {text!r} is not a weight (a number)") from None
    if value != value or abs(value) == float("inf"):
        raise FieldError("prompt", f"{tag}: the weight must be finite")
    return value


def lora_use(library: LoraLibrary, arguments: str, tag: str) -> LoraUse:
    """``NAME[:TE[:UNET]]`` with optional ``te=`` / ``unet=`` -> which file, which weights."""
    positional, named = [], {}
    for part in arguments.split(":"):
        key, equals, value = part.partition("=")
        if equals and key.strip() in ("te", "unet", "dyn"):
            named[key.strip()] = value
        else:
            positional.append(part)
    if "dyn" in named:
        raise FieldError("prompt", f"{tag}: dyn= (DyLoRA rank) is not supported")
    if not positional or not positional[0].strip() or len(positional) > 3:
        raise FieldError("prompt", f"{tag}: write <lora:NAME>, <lora:NAME:WEIGHT> or <lora:NAME:TE:UNET>")
    lora = library.find(positional[0].strip())
    text = parse_weight(named.get("te", positional[1] if len(positional) > 1 else "1"), tag)
    network_text = positional[2] if len(positional) > 2 else None
    network = parse_weight(named.get("unet", network_text if network_text is not None else str(text)), tag)
    return LoraUse(lora, text, network)


def take_tags(prompt: str, negative_prompt: str, library: LoraLibrary) -> tuple[str, list[LoraUse]]:
    """The prompt without its ``<lora:...>`` tags, and the LoRAs they ask for (checked)."""
    if TAG.search(negative_prompt):
        raise FieldError("negative_prompt", "extra-network tags (<lora:...>) are read from the prompt only")
    uses = []
    for match in TAG.finditer(prompt):
        kind, tag = match.group(1), match.group(0)
        if kind != "lora":
            raise FieldError("prompt", f"{tag}: only <lora:...> tags are supported (not <{kind}:...>)")
        uses.append(lora_use(library, match.group(2), tag))
    return TAG.sub("", prompt), uses


def lora_hashes(library: LoraLibrary, uses: list[LoraUse]) -> str:
    """The web UI's ``Lora hashes`` value: ``alias: hash, ...``."""
    seen = {use.lora.name: use.lora for use in uses}
    return ", ".join(f"{lora.alias}: {library.short_hash(lora)}" for lora in seen.values())


@contextmanager
def merged(pipe: Pipeline, uses: list[LoraUse]) -> Iterator[None]:
    """Merge ``uses`` into ``pipe``'s weights (network and text encoders at their own weights) and copy
    every changed layer back afterwards, whatever happens: the weights return exactly."""
    from latentdiffusion.checkpoints.lora_keys import read_lora_file
    from latentdiffusion.checkpoints.network_lora import merge_updates, plan_model_lora

    saved: dict[int, tuple[torch.nn.Module, torch.Tensor]] = {}
    components = pipe.components
    network = {id(m) for m in components.modules[components.family.network_role].modules()}
    try:
        for use in uses:
            state, metadata = read_lora_file(use.lora.path)
            updates = plan_model_lora(state, metadata, components.family, components.modules, use.lora.name)
            for update in updates:
                saved.setdefault(id(update.layer), (update.layer, update.layer.weight.detach().clone()))
            merge_updates([u for u in updates if id(u.layer) in network], use.network_weight)
            merge_updates([u for u in updates if id(u.layer) not in network], use.text_weight)
        yield
    finally:
        with torch.no_grad():
            for layer, weight in saved.values():
                layer.weight.copy_(weight)


# ---------------------------------------------------------------------------------------------- routes


def libraries(request: Request) -> Any:
    from latentdiffusion.serving.a1111_state import resources

    return resources(server_state(request))


@router.get("/loras")
async def loras(request: Request) -> list[dict[str, Any]]:
    """The LoRA files of ``--lora-dir``: ``name`` (for ``<lora:name:weight>``), ``alias``, ``path``,
    ``metadata`` (the safetensors header's)."""
    return [
        {"name": lora.name, "alias": lora.alias, "path": str(lora.path), "metadata": lora.metadata}
        for lora in libraries(request).loras.files()
    ]


@router.post("/refresh-loras")
async def refresh_loras(request: Request) -> None:
    """Read ``--lora-dir`` again."""
    libraries(request).loras.refresh()


@router.get("/embeddings")
async def embeddings() -> dict[str, Any]:
    """Textual-inversion embeddings are not supported: none is loaded."""
    return {"loaded": {}, "skipped": {}}


@router.get("/prompt-styles")
async def prompt_styles() -> list[dict[str, Any]]:
    """No prompt styles are defined (a request that names one is refused)."""
    return []


@router.get("/scripts")
async def scripts() -> dict[str, list[str]]:
    """The web UI's scripts are not run here (``script_name`` is refused); ControlNet units are read
    from ``alwayson_scripts`` (docs/serving.md)."""
    return {"txt2img": [], "img2img": []}


@router.get("/hypernetworks")
async def hypernetworks() -> list[dict[str, Any]]:
    """Hypernetworks are not supported: none."""
    return []


@router.get("/face-restorers")
async def face_restorers() -> list[dict[str, Any]]:
    """No face restorers (``restore_faces`` is refused)."""
    return []


@router.get("/realesrgan-models")
async def realesrgan_models() -> list[dict[str, Any]]:
    """No Real-ESRGAN models: the upscalers are in ``GET /sdapi/v1/upscalers``."""
    return []
