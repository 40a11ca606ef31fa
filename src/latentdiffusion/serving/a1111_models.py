"""The models a server offers (``ldm serve --model-dir``), AUTOMATIC1111's model hashes, and the web UI
routes that list, switch, unload and reload them, and read and set its options.

One model is in memory at a time. Switching (``POST /sdapi/v1/options`` with ``sd_model_checkpoint``),
unloading and reloading run as jobs of the queue, so they wait for the running job and no job ever
sees half a model; the old model's weights are released (moved to the ``meta`` device, which frees
their storage) before the new one is read. After an unload the next job of any API loads the model
again first (``ModelLibrary.prepare``, the queue's ``prepare`` hook).

Hashes are the web UI's: the sha256 of the checkpoint file, shortened to its first 10 hex digits
(``hash``, the ``[abcdef0123]`` in titles, ``Model hash:`` in PNG info). A folder (diffusers layout,
or ours) has the sha256 of its weight files' bytes read in sorted path order. As in the web UI a hash
is computed when its model is first loaded (or asked for by hash), then kept.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from latentdiffusion.errors import UserError
from latentdiffusion.pipelines.pipeline import Pipeline
from latentdiffusion.serving.settings import FieldError

if TYPE_CHECKING:
    from latentdiffusion.serving.common import ServerState

log = logging.getLogger(__name__)
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")  # what the web UI lists in its models folder
WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".bin", ".pt", ".pth")  # hashed in a model folder
FOLDER_MARKERS = ("model_index.json", "latentdiffusion.json")  # a diffusers folder, or ours
SHORT_HASH = 10
CHUNK = 1 << 20


# ---------------------------------------------------------------------------------------------- hashes


def weight_files(path: Path) -> list[Path]:
    """The files whose bytes make a model's hash: the file itself, or a folder's weight files."""
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


class Hashes:
    """sha256 of model files and folders, computed once per (path, size, modification time)."""

    def __init__(self) -> None:
        self._known: dict[tuple, str] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _key(path: Path) -> tuple:
        return tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in weight_files(path))

    def known(self, path: Path | None) -> str | None:
        """The hash if it has been computed, else None (never reads the weights)."""
        if path is None or not path.exists():
            return None
        with self._lock:
            return self._known.get(self._key(path))

    def compute(self, path: Path | None) -> str | None:
        """The sha256 (hex) of ``path``, reading it unless already known; None for no file."""
        if path is None or not path.exists():
            return None
        key = self._key(path)
        with self._lock:
            if key in self._known:
                return self._known[key]
        digest = hashlib.sha256()
        for file in weight_files(path):
            with file.open("rb") as stream:
                while chunk := stream.read(CHUNK):
                    digest.update(chunk)
        with self._lock:
            self._known[key] = digest.hexdigest()
        return self._known[key]


def short_hash(sha256: str | None) -> str | None:
    return sha256[:SHORT_HASH] if sha256 else None


# ---------------------------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelEntry:
    """One offered model: ``name`` as the web UI shows it (path relative to the models folder, with
    its extension), the source the loader reads, and the file or folder hashed (None: nothing on disk)."""

    name: str
    source: str
    path: Path | None

    @property
    def model_name(self) -> str:
        """The web UI's ``model_name``: the name without extension, folders joined by ``_``."""
        stem = self.name.rsplit(".", 1)[0] if self.name.endswith(CHECKPOINT_SUFFIXES) else self.name
        return stem.replace("/", "_")


def is_model(path: Path) -> bool:
    """A checkpoint file, or a model folder (diffusers layout, or ours)."""
    if path.is_file():
        return path.suffix in CHECKPOINT_SUFFIXES
    return path.is_dir() and any((path / marker).is_file() for marker in FOLDER_MARKERS)


def scan_models(folder: Path) -> list[ModelEntry]:
    """Checkpoint files and model folders (diffusers or ours) under ``folder``, sorted by name; hidden
    entries and the files inside a model folder are left out."""
    entries = []
    for path in sorted(folder.rglob("*")):
        parts = path.relative_to(folder).parts
        if any(part.startswith(".") for part in parts):
            continue
        if any(is_model(parent) for parent in path.parents if folder in parent.parents):
            continue  # a file inside a model folder is part of that model
        if is_model(path):
            entries.append(ModelEntry(path.relative_to(folder).as_posix(), str(path), path))
    return entries


def source_path(source: str) -> Path | None:
    """The file or folder a ``--model`` source reads (a shipped model's folder), or None (a preset)."""
    from latentdiffusion.pipelines.loading import SHIPPED_MODELS, shipped_model_dir

    if source in SHIPPED_MODELS:
        return shipped_model_dir(source)
    path = Path(source)
    return path if source and not source.startswith("preset:") and path.exists() else None


def starting_entry(source: str, name: str, folder: Path | None) -> ModelEntry:
    """The entry of the model the server starts with (``--model``; inside ``folder`` or not)."""
    path = source_path(source)
    if path is not None and folder is not None:
        try:
            return ModelEntry(path.resolve().relative_to(folder.resolve()).as_posix(), source, path)
        except ValueError:
            pass
    shown = path.name if path is not None and source not in ("default", "upscaler") else name
    return ModelEntry(shown or name, source, path)


def release(pipe: Pipeline) -> None:
    """Free a pipeline's weights now, even while something still holds the object: every tensor moves
    to the ``meta`` device (shapes kept, storage freed), and oneDNN-packed copies are dropped."""
    from latentdiffusion.models.layers import set_prepacking

    for module in pipe.components.modules.values():
        set_prepacking(module, False)
        module.to("meta")
    if pipe.components.preview_decoder is not None:
        pipe.components.preview_decoder.to("meta")
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class ModelLibrary:
    """The offered models and the one in memory. ``base`` is the loaded pipeline as read;
    ``state.pipe`` is what requests use (``base``, or a view of it with CLIP skip)."""

    def __init__(
        self,
        pipe: Pipeline,
        source: str,
        folder: Path | None,
        loader: Callable[[str], Pipeline] | None,
    ) -> None:
        self.folder = folder
        self.loader = loader
        self.hashes = Hashes()
        self.current = starting_entry(source, pipe.components.name, folder)
        self.base = pipe
        self.loaded = True
        self.clip_skip = 1
        self._entries: list[ModelEntry] = []
        self.refresh()

    # ---- listing

    def refresh(self) -> None:
        """Read the models folder again (``POST /sdapi/v1/refresh-checkpoints``)."""
        found = scan_models(self.folder) if self.folder is not None and self.folder.is_dir() else []
        names = {entry.name for entry in found}
        self._entries = ([] if self.current.name in names else [self.current]) + found

    def entries(self) -> list[ModelEntry]:
        return list(self._entries)

    def sha256(self, entry: ModelEntry) -> str | None:
        return self.hashes.known(entry.path)

    def title(self, entry: ModelEntry) -> str:
        """``name [short hash]`` once the hash is known, else the name (as the web UI shows them)."""
        short = short_hash(self.sha256(entry))
        return f"{entry.name} [{short}]" if short else entry.name

    def find(self, wanted: str) -> ModelEntry:
        """An entry by title, name, model name, short hash or sha256 (the web UI's checkpoint aliases)."""
        text = wanted.strip()
        for entry in self._entries:
            sha = self.sha256(entry)
            spellings = {self.title(entry), entry.name, entry.model_name, short_hash(sha), sha}
            bare = text.split(" [", 1)[0] if text.endswith("]") else text
            if text in spellings or bare in (entry.name, entry.model_name):
                return entry
        known = ", ".join(self.title(entry) for entry in self._entries)
        raise FieldError("sd_model_checkpoint", f"no model {wanted!r}; known: {known}")

    # ---- loading (on the queue's worker thread)

    def prepare(self, state: ServerState) -> None:
        """Before every job: load the model if it was unloaded, and know its hash."""
        if not self.loaded:
            self.load(state, self.current)
        self.hashes.compute(self.current.path)

    def load(self, state: ServerState, entry: ModelEntry) -> None:
        """Release the model in memory, then read ``entry`` (the previous one stays chosen on failure:
        the next job loads it again)."""
        if self.loader is None:
            raise UserError("this server was given its model in memory (no loader): it cannot read models")
        self.unload(state)
        pipe = self._read(entry)
        self.current, self.base, self.loaded = entry, pipe, True
        if not clip_skip_supported(pipe):
            self.clip_skip = 1
        self.serve(state)
        self.hashes.compute(entry.path)

    def _read(self, entry: ModelEntry) -> Pipeline:
        assert self.loader is not None
        return self.loader(entry.source)

    def unload(self, state: ServerState) -> None:
        if self.loaded:
            self.loaded = False
            release(self.base)
            log.info("unloaded model %s", self.current.name)

    def serve(self, state: ServerState, new_model: bool = True) -> None:
        """Point the server at ``base`` (with CLIP skip applied); for a new model also fit the queue's
        previewer to it (a CLIP skip keeps the autoencoder, and so the previewer)."""
        state.pipe = with_clip_skip(self.base, self.clip_skip)
        if new_model:
            state.queue.use(state.pipe)
        else:
            state.queue.pipe = state.pipe

    def can_reload(self) -> bool:
        """Whether the model can be read again as it was (``ServerSettings.loader``, which ``ldm serve``
        sets with its device, precision and LoRA options)."""
        return self.loader is not None


# ---------------------------------------------------------------------------------------------- CLIP skip


def clip_skip_supported(pipe: Pipeline) -> bool:
    """CLIP skip (the web UI's ``CLIP_stop_at_last_layers``) means something for a model whose one text
    encoder's context is its final-normed last layer (SD 1.x); SD 2.x and SDXL read fixed layers."""
    from latentdiffusion.models.text_encoder import TextEncoder

    if pipe.family.text_roles != ("text_encoder",):
        return False
    encoder = pipe.components.modules.get("text_encoder")
    config = getattr(encoder, "config", None)
    return (
        isinstance(encoder, TextEncoder)
        and config.skip_last_layers == 0
        and not config.context_from_penultimate
    )


def max_clip_skip(pipe: Pipeline) -> int:
    return pipe.components.modules["text_encoder"].config.num_layers if clip_skip_supported(pipe) else 1


def with_clip_skip(pipe: Pipeline, clip_skip: int) -> Pipeline:
    """``pipe`` whose text encoder stops ``clip_skip - 1`` layers early and applies its final layer norm
    there, as the web UI's CLIP skip does: a view that shares every weight (nothing is copied)."""
    if clip_skip <= 1:
        return pipe
    from torch import nn

    from latentdiffusion.models.text_encoder import TextEncoder

    encoder = pipe.components.modules["text_encoder"]
    config = replace(encoder.config, skip_last_layers=clip_skip - 1)
    with torch.device("meta"):
        view = TextEncoder(config)
    view.embeddings = encoder.embeddings
    view.layers = nn.ModuleList(list(encoder.layers)[: len(encoder.layers) - (clip_skip - 1)])
    view.final_layer_norm = encoder.final_layer_norm
    view.text_projection = encoder.text_projection
    components = pipe.components
    model_config = replace(components.config, text_encoder=config)
    modules = {**components.modules, "text_encoder": view}
    view_pipe = Pipeline(replace(components, config=model_config, modules=modules))
    view_pipe.backend = pipe.backend  # the U-Net keeps running where the model's runs
    return view_pipe


def check_clip_skip(pipe: Pipeline, value: Any, field: str = "CLIP_stop_at_last_layers") -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
        raise FieldError(field, f"must be a whole number, got {value!r}")
    top = max_clip_skip(pipe)
    if not 1 <= value <= top:
        why = "" if top > 1 else f" (model {pipe.components.name!r} reads its text states from fixed layers)"
        raise FieldError(field, f"must be in [1, {top}] for this model{why}, got {value}")
    return int(value)
