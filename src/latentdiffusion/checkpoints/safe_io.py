"""Reading and writing weight files without running foreign code and without copying the model twice.

safetensors (the preferred format) is a little-endian u64 header length, a JSON header naming each
tensor's dtype, shape and byte range, then the raw bytes. We validate the header ourselves (so that a
truncated or foreign file gets a message that says so) and memory-map the file: every tensor is a view
into one copy-on-write mapping, so loading costs no anonymous memory until a tensor is converted.

Pickled checkpoints (``.ckpt``, ``.pt``, ``.bin``) are read only with ``torch.load(weights_only=True)``,
whose unpickler refuses every global outside an allowlist of tensor-rebuilding functions; the
training-time objects that old Lightning checkpoints carry beside the weights (a ModelCheckpoint
callback, numpy scalars) are mapped to an inert placeholder that keeps nothing.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from latentdiffusion.errors import UserError
from latentdiffusion.files import atomic_write

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
MAX_HEADER_BYTES = 100_000_000  # the safetensors reference limit
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTOCOL = 0x80


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors header: its dtype, shape and byte range in the data section."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    entries: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_start: int  # byte offset of the data section in the file


def file_kind(path: Path) -> str:
    """ "safetensors", "torch-zip" or "pickle", by content (suffixes lie); UserError otherwise."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror or error}") from None
    if head.startswith(_ZIP_MAGIC):
        return "torch-zip"
    if len(head) == 9 and head[8:9] == b"{":  # before the pickle test: a header length may start with 0x80
        return "safetensors"
    if len(head) > 1 and head[0] == _PICKLE_PROTOCOL and 1 <= head[1] <= 5:
        return "pickle"
    raise UserError(f"{path} is not a checkpoint: neither a safetensors file nor a PyTorch pickle")


def read_safetensors_header(path: Path) -> SafetensorsHeader:
    """Parse and validate the header: every tensor must lie inside the file (else: truncated)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise UserError(f"{path} is not a safetensors file: it is only {size} bytes long")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise UserError(f"{path} is truncated or not a safetensors file: its header is cut off")
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as error:
        raise UserError(f"{path} has a corrupt safetensors header: {error}") from None
    if not isinstance(header, dict):
        raise UserError(f"{path} has a corrupt safetensors header: not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    entries = {name: _parse_entry(path, name, value) for name, value in header.items()}
    _check_data_size(path, entries, size - 8 - length)
    return SafetensorsHeader(entries, {str(k): str(v) for k, v in metadata.items()}, 8 + length)


def _parse_entry(path: Path, name: str, value: Any) -> TensorEntry:
    try:
        dtype = SAFETENSORS_DTYPES[value["dtype"]]
        shape = tuple(int(n) for n in value["shape"])
        begin, end = (int(n) for n in value["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{path} has a corrupt safetensors header entry for {name!r}") from None
    numel = 1
    for n in shape:
        numel *= n
    if min(shape, default=0) < 0 or not 0 <= begin <= end or end - begin != numel * dtype.itemsize:
        raise UserError(f"{path}: tensor {name!r} has an inconsistent shape and byte range")
    return TensorEntry(dtype, shape, begin, end)


def _check_data_size(path: Path, entries: Mapping[str, TensorEntry], data_size: int) -> None:
    needed = max((e.end for e in entries.values()), default=0)
    if needed > data_size:
        raise UserError(
            f"{path} is truncated: its header describes {needed} bytes of tensor data, "
            f"the file holds {data_size}; download or copy it again"
        )


def load_safetensors(path: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; floating-point ones cast to ``dtype`` if given.

    Tensors that keep their dtype are views of one private memory mapping (no copy). Tensors that
    change dtype are read one at a time with plain file reads and converted, so that the file's pages
    are never mapped into the process beside the converted copy.
    """
    header = read_safetensors_header(path)
    data = None
    out = {}
    with open(path, "rb") as f:
        for name, entry in header.entries.items():
            if dtype is None or not entry.dtype.is_floating_point or entry.dtype == dtype:
                data = _mapping(path) if data is None else data
                out[name] = _view(data, header.data_start, entry)
            else:
                out[name] = _read_as(f, header.data_start, entry, dtype)
    return out


def _mapping(path: Path) -> torch.Tensor:
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=path.stat().st_size)
    return torch.empty(0, dtype=torch.uint8).set_(storage)


def _read_as(f: Any, start: int, entry: TensorEntry, dtype: torch.dtype) -> torch.Tensor:
    raw = torch.empty(entry.end - entry.begin, dtype=torch.uint8)
    f.seek(start + entry.begin)
    if f.readinto(memoryview(raw.numpy())) != raw.numel():
        raise UserError(f"{f.name} is truncated: a tensor ends past the end of the file")
    return raw.view(entry.dtype).reshape(entry.shape).to(dtype)


def _view(data: torch.Tensor, start: int, entry: TensorEntry) -> torch.Tensor:
    raw = data[start + entry.begin : start + entry.end]
    if (start + entry.begin) % entry.dtype.itemsize:
        raw = raw.clone()  # a misaligned tensor cannot be viewed in place; copy just this one
    return raw.view(entry.dtype).reshape(entry.shape)


def save_safetensors(
    state: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str] | None = None
) -> None:
    """Write ``state`` atomically, streaming one tensor at a time (no serialised copy of the model).

    Tensors are laid out widest dtype first so that every tensor stays aligned for memory mapping.
    """
    names = sorted(state, key=lambda k: (-state[k].element_size(), k))
    header: dict[str, Any] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for name in names:
        tensor = state[name]
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": _dtype_name(name, tensor.dtype),
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for name in names:
                f.write(_tensor_bytes(state[name]))

    atomic_write(path, write)


def _dtype_name(name: str, dtype: torch.dtype) -> str:
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise UserError(f"cannot write tensor {name!r}: safetensors has no dtype {dtype}") from None


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


class _Discarded:
    """Stands in for the non-tensor training objects of Lightning checkpoints; keeps nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


# Names found beside the weights in released Stable Diffusion .ckpt files. Each resolves to the inert
# placeholder above, never to the real class or function, so allowing them runs no foreign code.
DISCARDED_GLOBALS = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
    "numpy.ndarray",
    "numpy.dtype",
)
_REFUSED = re.compile(
    r"WeightsUnpickler error|unsupported GLOBAL|Unsupported global|unrecognized function|Can only"
)


def load_pickle(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a pickled checkpoint, read with ``torch.load(weights_only=True)``.

    Zip-format files (torch >= 1.6) are memory-mapped. A pickle that needs any other global (code) is
    refused with a UserError before anything in it runs. Nested ``state_dict`` entries are unwrapped;
    non-tensor values (step counters, callbacks) are dropped.
    """
    mmap = file_kind(path) == "torch-zip"
    placeholders = [(_Discarded, name) for name in DISCARDED_GLOBALS]
    try:
        with torch.serialization.safe_globals(placeholders), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols it then reads fine
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        raise _pickle_error(path, error) from None
    except (RuntimeError, EOFError, OSError, ValueError, struct.error) as error:
        raise UserError(
            f"cannot read {path}: truncated, or not a PyTorch checkpoint ({_first_line(error)})"
        ) from None
    return _tensors_of(path, obj)


def _pickle_error(path: Path, error: Exception) -> UserError:
    text = str(error)
    if _REFUSED.search(text):
        needed = re.search(r"GLOBAL (\S+)", text) or re.search(r"WeightsUnpickler error:\s*(.+)", text)
        what = needed.group(1) if needed else _first_line(error)
        return UserError(
            f"refusing to load {path}: its pickle asks for more than plain tensors ({what}) and could run "
            "arbitrary code, so nothing in it was run; use a .safetensors file of this model"
        )
    return UserError(f"cannot read {path}: truncated, or not a PyTorch checkpoint ({_first_line(error)})")


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]


def _tensors_of(path: Path, obj: Any) -> dict[str, torch.Tensor]:
    while isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise UserError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors")
    return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a safetensors header (empty for pickles)."""
    path = Path(path)
    return read_safetensors_header(path).metadata if file_kind(path) == "safetensors" else {}


def read_state_dict(path: str | os.PathLike, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a weight file, whatever its format (decided by content, not by suffix).

    ``dtype`` casts floating-point tensors while reading (see ``load_safetensors``).
    """
    path = Path(path)
    if file_kind(path) == "safetensors":
        return load_safetensors(path, dtype)
    state = load_pickle(path)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    return state
