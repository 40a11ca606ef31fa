"""ComfyUI's three file folders ("input": uploads, "output": SaveImage, "temp": PreviewImage), kept in
memory: a bounded number of files and bytes per folder, the oldest dropped first, so that no client can
fill the memory or the disk. /view reads them, LoadImage and /upload/mask take inputs by name, and with
``ldm serve --output-dir`` SaveImage's files are also written there (``OUTPUT_SUBFOLDER``).
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import threading
from collections import OrderedDict
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from latentdiffusion.errors import UserError

log = logging.getLogger(__name__)
FOLDERS = ("input", "output", "temp")
KEEP = {"input": 256, "output": 512, "temp": 128}  # files kept per folder
BUDGET = {"input": 512 * 2**20, "output": 512 * 2**20, "temp": 128 * 2**20}  # bytes kept per folder
OUTPUT_SUBFOLDER = "comfyui"  # SaveImage's files under --output-dir
ANNOTATION = re.compile(r"^(.*) \[(input|output|temp)\]$")  # ComfyUI's "name.png [output]"
Key = tuple[str, str, str]  # (folder, subfolder, filename)


def check_name(name: str, what: str) -> str:
    """A file or subfolder name: no path tricks (absolute paths, '..', backslashes, control characters)."""
    parts = name.split("/") if what == "subfolder" else [name]
    for part in parts:
        if part in ("", ".", "..") and not (what == "subfolder" and name == ""):
            raise UserError(f"{what} {name!r} is not allowed")
        if "\\" in part or any(ord(c) < 32 for c in part) or (what != "subfolder" and "/" in part):
            raise UserError(f"{what} {name!r} is not allowed")
    return name


def parse_reference(value: str, default_folder: str = "input") -> Key:
    """LoadImage's value ("name.png", "sub/name.png", "name.png [output]") -> a file key."""
    folder = default_folder
    match = ANNOTATION.match(value)
    if match:
        value, folder = match.group(1), match.group(2)
    subfolder, _, filename = value.rpartition("/")
    return folder, subfolder, filename


class FileStore:
    """The three folders in memory, thread-safe (the worker writes, request handlers read)."""

    def __init__(self, output_dir: Path | None = None) -> None:
        self._files: dict[str, OrderedDict[tuple[str, str], bytes]] = {f: OrderedDict() for f in FOLDERS}
        self._counters: dict[tuple[str, str, str], int] = {}
        self._bytes = dict.fromkeys(FOLDERS, 0)
        self._lock = threading.Lock()
        self.output_dir = output_dir

    def get(self, key: Key) -> bytes | None:
        folder, subfolder, filename = key
        with self._lock:
            return self._files.get(folder, {}).get((subfolder, filename))

    def names(self, folder: str) -> list[str]:
        """What LoadImage lists: "sub/name" for files in subfolders."""
        with self._lock:
            keys = list(self._files[folder])
        return sorted(f"{sub}/{name}" if sub else name for sub, name in keys)

    def put(self, key: Key, data: bytes) -> None:
        folder, subfolder, filename = key
        with self._lock:
            files = self._files[folder]
            self._bytes[folder] -= len(files.pop((subfolder, filename), b""))
            files[(subfolder, filename)] = data
            self._bytes[folder] += len(data)
            while len(files) > 1 and (len(files) > KEEP[folder] or self._bytes[folder] > BUDGET[folder]):
                self._bytes[folder] -= len(files.popitem(last=False)[1])

    def upload(self, folder: str, subfolder: str, filename: str, data: bytes, overwrite: bool) -> str:
        """Store an upload as ComfyUI does: an existing name with other content gets " (1)", " (2)"...
        unless ``overwrite``; the same content keeps its name. Returns the name stored."""
        check_name(filename, "filename")
        check_name(subfolder, "subfolder")
        stem, dot, suffix = filename.rpartition(".")
        if not dot:
            stem, suffix = filename, ""
        name, n = filename, 0
        while not overwrite and (existing := self.get((folder, subfolder, name))) is not None:
            if hashlib.sha256(existing).digest() == hashlib.sha256(data).digest():
                return name
            n += 1
            name = f"{stem} ({n}){dot}{suffix}"
        self.put((folder, subfolder, name), data)
        return name

    def next_name(self, folder: str, subfolder: str, prefix: str) -> str:
        """SaveImage's "prefix_00001_.png", counting per folder, subfolder and prefix."""
        with self._lock:
            key = (folder, subfolder, prefix)
            self._counters[key] = self._counters.get(key, 0) + 1
            return f"{prefix}_{self._counters[key]:05}_.png"

    def save_png(self, folder: str, subfolder: str, prefix: str, image: Image.Image, text: dict) -> str:
        """Encode ``image`` as PNG with ``text`` chunks, store it, and return its file name."""
        info = PngInfo()
        for key, value in text.items():
            info.add_text(key, value)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", pnginfo=info, compress_level=4)
        filename = self.next_name(folder, subfolder, prefix)
        self.put((folder, subfolder, filename), buffer.getvalue())
        if folder == "output" and self.output_dir is not None:
            self._write(subfolder, filename, buffer.getvalue())
        return filename

    def _write(self, subfolder: str, filename: str, data: bytes) -> None:
        """Also write an output under the server's output folder (atomic; a full disk is logged)."""
        target = self.output_dir / OUTPUT_SUBFOLDER / subfolder / filename
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(target.name + ".partial")
            partial.write_bytes(data)
            partial.replace(target)
        except OSError as error:
            log.error("could not save %s: %s", target, error.strerror or error)
