"""A folder of LoRA files and the web UI's ``<lora:name:weight>`` prompt tags, for ``ldm generate /
img2img / inpaint / outpaint --lora-dir`` and ``ldm serve --lora-dir`` alike.

A tag is ``<lora:NAME>``, ``<lora:NAME:WEIGHT>`` or ``<lora:NAME:TE_WEIGHT:UNET_WEIGHT>`` (also ``te=`` /
``unet=``); ``<lyco:...>`` (the older LyCORIS extension's spelling) is read the same way. NAME is a file's
name without extension (``.safetensors``, ``.ckpt``, ``.pt``) anywhere under the folder, subfolders
included, or its ``ss_output_name`` alias. Tags are taken out of the prompt before it is encoded; the
PNG info keeps the prompt as written and adds ``Lora hashes`` as the web UI writes them (the first 12 hex
digits of the sha256 of a safetensors file's tensor data, the "addnet" hash; of the whole file
otherwise). ``merged`` merges the LoRAs (LoRA or LyCORIS files, ``checkpoints.network_lora``) for a block
and copies every changed layer back afterwards, also when the block fails: the weights return bit for
bit. Other extra-network tags (``<hypernet:...>``) and tags in the negative prompt are refused.

Usage from Python::

    library = LoraLibrary(Path("loras"))
    prompt, uses = take_tags("a cat <lora:mystyle:0.8>", "", library)
    with merged(pipe, uses):
        images = pipe.generate(prompt)
    record_tags(images, "a cat <lora:mystyle:0.8>", prompt, library, uses)
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from latentdiffusion.errors import UserError

if TYPE_CHECKING:
    from latentdiffusion.pipelines.pipeline import Pipeline

LORA_SUFFIXES = (".safetensors", ".ckpt", ".pt")
TAG = re.compile(r"<(\w+):([^>]+)>")  # the web UI's extra-network tag
TAG_KINDS = ("lora", "lyco")  # <lyco:...>: the a1111-sd-webui-lycoris extension's tag, now an alias
LORA_HASH = 12
CHUNK = 1 << 20


class TagError(UserError):
    """A bad tag in the ``field`` ("prompt" or "negative_prompt") of a request."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


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

    def __init__(self, folder: Path | str | None) -> None:
        self.folder = None if folder is None else Path(folder)
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
            "no LoRA folder was given (--lora-dir)"
            if self.folder is None
            else f"known: {', '.join(self.names()) or 'none'}"
        )
        raise TagError("prompt", f"<lora:{name}>: no LoRA of that name ({where})")

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
        raise TagError("prompt", f"{tag}: {text!r} is not a weight (a number)") from None
    if value != value or abs(value) == float("inf"):
        raise TagError("prompt", f"{tag}: the weight must be finite")
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
        raise TagError("prompt", f"{tag}: dyn= (DyLoRA rank) is not supported")
    if not positional or not positional[0].strip() or len(positional) > 3:
        raise TagError("prompt", f"{tag}: write <lora:NAME>, <lora:NAME:WEIGHT> or <lora:NAME:TE:UNET>")
    lora = library.find(positional[0].strip())
    text = parse_weight(named.get("te", positional[1] if len(positional) > 1 else "1"), tag)
    network_text = positional[2] if len(positional) > 2 else None
    network = parse_weight(named.get("unet", network_text if network_text is not None else str(text)), tag)
    return LoraUse(lora, text, network)


def take_tags(prompt: str, negative_prompt: str, library: LoraLibrary) -> tuple[str, list[LoraUse]]:
    """The prompt without its ``<lora:...>`` tags, and the LoRAs they ask for (checked); TagError for a
    tag of another kind, an unknown name, a bad weight, or a tag in the negative prompt."""
    if TAG.search(negative_prompt):
        raise TagError("negative_prompt", "extra-network tags (<lora:...>) are read from the prompt only")
    uses = []
    for match in TAG.finditer(prompt):
        kind, tag = match.group(1), match.group(0)
        if kind not in TAG_KINDS:
            raise TagError("prompt", f"{tag}: only <lora:...> tags are supported (not <{kind}:...>)")
        uses.append(lora_use(library, match.group(2), tag))
    return TAG.sub("", prompt), uses


def lora_hashes(library: LoraLibrary, uses: Sequence[LoraUse]) -> str:
    """The web UI's ``Lora hashes`` value: ``alias: hash, ...``."""
    seen = {use.lora.name: use.lora for use in uses}
    return ", ".join(f"{lora.alias}: {library.short_hash(lora)}" for lora in seen.values())


def record_tags(
    images: Sequence[Any], sent: str, used: str, library: LoraLibrary, uses: Sequence[LoraUse]
) -> None:
    """Each image's PNG info as the web UI writes it: the prompt as ``sent`` (tags included) where the
    text starts with the prompt ``used``, and ``Lora hashes`` on the settings line."""
    from latentdiffusion.pipelines.metadata import with_settings

    if not uses:
        return
    hashes = lora_hashes(library, uses)
    for image in images:
        text = image.info.get("parameters") or ""
        if used != sent and text.startswith(used):
            text = sent + text[len(used) :]
        image.info["parameters"] = with_settings(text, {"Lora hashes": hashes})


@contextmanager
def merged(pipe: Pipeline, uses: Sequence[LoraUse]) -> Iterator[None]:
    """Merge ``uses`` into ``pipe``'s weights (network and text encoders at their own weights) and copy
    every changed layer (weight and bias) back afterwards, whatever happens: the weights return exactly."""
    from latentdiffusion.checkpoints.lora_keys import read_lora_file, restore_tensors, saved_tensors
    from latentdiffusion.checkpoints.network_lora import merge_updates, plan_model_lora

    saved: dict[int, tuple[Any, dict]] = {}
    components = pipe.components
    network = {id(m) for m in components.modules[components.family.network_role].modules()}
    try:
        for use in uses:
            state, metadata = read_lora_file(use.lora.path)
            updates = plan_model_lora(state, metadata, components.family, components.modules, use.lora.name)
            for update in updates:
                saved.setdefault(id(update.layer), (update.layer, saved_tensors(update.layer)))
            merge_updates([u for u in updates if id(u.layer) in network], use.network_weight)
            merge_updates([u for u in updates if id(u.layer) not in network], use.text_weight)
        yield
    finally:
        for layer, tensors in saved.values():
            restore_tensors(layer, tensors)
