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

import ctypes
import json
import math
import os
import pickle
import re
import stat
import struct
import warnings
import zipfile
from collections.abc import Iterator, Mapping
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
MAX_TENSORS = 100_000  # per weight file (SDXL base: 2,515; a LoRA for every layer of SDXL: about 8,000)
MAX_DIMS = 16
MAX_DIM_SIZE = 2**48
MAX_NUMEL = 2**48
MAX_JSON_BYTES = 64 * 2**20  # config.json, model_index.json, shard indexes, tokenizer files
MAX_YAML_BYTES = 2**20  # CompVis inference configs are about 2 KB
_PAGE_RELEASE_BYTES = 256 * 2**20  # checked mapped pages handed back to the kernel every this many bytes
_MADV_PAGEOUT = 21
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
    head = read_regular_file(path, 9, what="checkpoint", whole=False)
    if head.startswith(_ZIP_MAGIC):
        return "torch-zip"
    if len(head) == 9 and head[8:9] == b"{":  # before the pickle test: a header length may start with 0x80
        return "safetensors"
    if len(head) > 1 and head[0] == _PICKLE_PROTOCOL and 1 <= head[1] <= 5:
        return "pickle"
    raise UserError(f"{path} is not a checkpoint: neither a safetensors file nor a PyTorch pickle")


def read_regular_file(path: Path, limit: int, *, what: str = "file", whole: bool = True) -> bytes:
    """The bytes of ``path`` (at most ``limit``; with ``whole``, a longer file is refused), read only if
    it is a regular file: a symlink to /dev/zero, a FIFO or a folder would grow or hang forever.

    The file is opened without blocking and checked on the open descriptor, so it cannot be swapped
    for something else between the check and the read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror or error}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UserError(f"cannot read {path}: it is not a regular {what} (a device, FIFO or folder)")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1 if whole else limit)
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror or error}") from None
    finally:
        os.close(fd)
    if whole and len(data) > limit:
        raise UserError(f"{path} is too large for a {what}: more than {limit} bytes")
    return data


def read_json_file(path: Path, limit: int = MAX_JSON_BYTES) -> Any:
    """A JSON file of a model folder: a regular file of at most ``limit`` bytes, nested at most as
    deeply as Python's recursion allows (deeper is refused with a UserError, never a RecursionError)."""
    return parse_json(read_regular_file(path, limit, what="JSON file"), str(path))


def parse_json(raw: bytes | str, source: str) -> Any:
    try:
        return json.loads(raw)
    except RecursionError:
        raise UserError(f"{source}: its JSON is nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as error:
        raise UserError(f"cannot read {source}: invalid JSON ({_first_line(error)})") from None


def require_regular_file(path: Path, what: str = "weight file") -> None:
    """Refuse a path that is not a regular file (it may be a symlink to one) before it is read."""
    read_regular_file(path, 0, what=what, whole=False)


def read_safetensors_header(path: Path) -> SafetensorsHeader:
    """Parse and validate the header: every tensor must lie inside the file (else: truncated).

    Cheap checks first: the header's size and its number of tensors are bounded before it is parsed,
    every shape and offset is a bounded integer (no float, no overflow), and the metadata is a map of
    strings."""
    require_regular_file(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise UserError(f"{path} is not a safetensors file: it is only {size} bytes long")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise UserError(f"{path} is truncated or not a safetensors file: its header is cut off")
        raw = f.read(length)
    if raw.count(b'"data_offsets"') > MAX_TENSORS:
        raise UserError(f"{path} holds more than {MAX_TENSORS} tensors, more than any model; refusing it")
    try:
        header = json.loads(raw)
    except RecursionError:
        raise UserError(f"{path} has a corrupt safetensors header: nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as error:
        raise UserError(f"{path} has a corrupt safetensors header: {_first_line(error)}") from None
    if not isinstance(header, dict):
        raise UserError(f"{path} has a corrupt safetensors header: not a JSON object")
    metadata = _string_map(path, header.pop("__metadata__", None) or {})
    if len(header) > MAX_TENSORS:  # the count before parsing misses escaped spellings of the key
        raise UserError(f"{path} holds more than {MAX_TENSORS} tensors, more than any model; refusing it")
    entries = {name: _parse_entry(path, name, value) for name, value in header.items()}
    _check_data_size(path, entries, size - 8 - length)
    return SafetensorsHeader(entries, metadata, 8 + length)


def _string_map(path: Path, metadata: Any) -> dict[str, str]:
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise UserError(f"{path} has a corrupt safetensors header: __metadata__ is not a map of strings")
    return metadata


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_entry(path: Path, name: str, value: Any) -> TensorEntry:
    corrupt = UserError(f"{path} has a corrupt safetensors header entry for {name!r}")
    if not isinstance(value, dict) or not isinstance(value.get("dtype"), str):
        raise corrupt
    if value["dtype"] not in SAFETENSORS_DTYPES:
        raise corrupt
    dtype, shape, offsets = SAFETENSORS_DTYPES[value["dtype"]], value.get("shape"), value.get("data_offsets")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not isinstance(offsets, list):
        raise corrupt
    if len(offsets) != 2 or not all(_is_int(n) and 0 <= n <= MAX_DIM_SIZE for n in (*shape, *offsets)):
        raise UserError(f"{path}: tensor {name!r} has a shape or byte range that is not a small integer")
    numel = math.prod(shape)
    begin, end = offsets
    if numel > MAX_NUMEL or not begin <= end or end - begin != numel * dtype.itemsize:
        raise UserError(f"{path}: tensor {name!r} has an inconsistent shape and byte range")
    return TensorEntry(dtype, tuple(shape), begin, end)


def meta_tensors(header: SafetensorsHeader) -> dict[str, torch.Tensor]:
    """Each tensor of a header as a tensor on the meta device (its shape and dtype, no data): what the
    networks built on meta are checked against before any tensor is read."""
    return {name: torch.empty(e.shape, dtype=e.dtype, device="meta") for name, e in header.entries.items()}


def _check_data_size(path: Path, entries: Mapping[str, TensorEntry], data_size: int) -> None:
    needed = max((e.end for e in entries.values()), default=0)
    if needed > data_size:
        raise UserError(
            f"{path} is truncated: its header describes {needed} bytes of tensor data, "
            f"the file holds {data_size}; download or copy it again"
        )


def load_safetensors(path: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; floating-point ones cast to ``dtype`` if given (float8 ones,
    ``F8_E4M3`` / ``F8_E5M2`` as SD3 files store T5, included: upcast exactly).

    Tensors that keep their dtype are views of one private memory mapping (no copy). Tensors that
    change dtype are read one at a time with plain file reads and converted, so that the file's pages
    are never mapped into the process beside the converted copy.
    """
    header = read_safetensors_header(path)
    data = None
    out = {}
    checked = 0  # bytes of the mapping read by the finiteness check since pages were last handed back
    with open(path, "rb") as f:
        for name, entry in header.entries.items():
            if dtype is None or not entry.dtype.is_floating_point or entry.dtype == dtype:
                data = _mapping(path) if data is None else data
                out[name] = check_finite(_view(data, header.data_start, entry), name, path)
                checked += entry.end - entry.begin
                if checked > _PAGE_RELEASE_BYTES:
                    checked = _release_pages(data)
            else:
                raw = _read_as(f, header.data_start, entry, entry.dtype)
                out[name] = check_finite(raw, name, path).to(dtype)
    if data is not None:
        _release_pages(data)
    return out


def check_finite(tensor: torch.Tensor, name: str, source: str | os.PathLike) -> torch.Tensor:
    """``tensor`` if it is not floating point or holds no NaN or infinity, else a UserError naming it:
    such weights make every image black (or NaN), with no other sign of what went wrong.

    One reduction (a sum in float32 or wider) decides for nearly every tensor; only when the sum is not
    finite (a NaN or infinity, or finite values whose sum overflows) is every element tested.
    """
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return tensor
    wide = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    if torch.isfinite(tensor.sum(dtype=wide)):
        return tensor
    # torch has no isfinite for float8 (e4m3fn, e5m2): test those elements in float32
    elements = tensor.to(wide) if tensor.element_size() == 1 else tensor
    if bool(torch.isfinite(elements).all()):
        return tensor
    raise UserError(
        f"{source}: tensor {name!r} holds NaN or infinite values, which would make every image black; "
        "the file is damaged (download it again) or was saved from a diverged training run"
    )


def _release_pages(data: torch.Tensor) -> int:
    """Hand the mapping's resident (clean) pages back to the kernel (``madvise(MADV_PAGEOUT)``, Linux
    5.4+): the finiteness check read them, the model may not touch them for a long time. Pages are read
    again from the file when used; elsewhere this does nothing."""
    try:
        libc, page = ctypes.CDLL(None, use_errno=True), os.sysconf("SC_PAGE_SIZE")
        address, size = data.data_ptr(), data.numel()
        start = address - address % page
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(address + size - start), _MADV_PAGEOUT)
    except (OSError, AttributeError, ValueError):
        pass
    return 0


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
    tensors = _tensors_of(path, _unpickle(path))
    _check_pickled_tensors(path, tensors)
    return tensors


def load_pickled_tree(path: Path) -> Any:
    """The whole object of a pickled file (dicts of tensors, strings, numbers: a textual-inversion
    ``.pt`` nests its tensors), read as ``load_pickle`` reads checkpoints; every tensor in it is checked."""
    obj = _unpickle(path)
    _check_pickled_tensors(path, dict(_nested_tensors(obj, "")))
    return obj


def _nested_tensors(obj: Any, prefix: str, depth: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, Mapping) and depth < 4:
        for key, value in obj.items():
            yield from _nested_tensors(value, f"{prefix}{key}.", depth + 1)


def _unpickle(path: Path) -> Any:
    mmap = file_kind(path) == "torch-zip"
    if mmap and _zip_entries(path) > MAX_TENSORS + 16:  # one record per storage, a few more for torch
        raise UserError(f"{path} holds more than {MAX_TENSORS} tensors, more than any model; refusing it")
    placeholders = [(_Discarded, name) for name in DISCARDED_GLOBALS]
    try:
        with torch.serialization.safe_globals(placeholders), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols it then reads fine
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        raise _pickle_error(path, error) from None
    except (RuntimeError, EOFError, OSError, ValueError, struct.error, *_MALFORMED_PICKLE) as error:
        raise UserError(
            f"cannot read {path}: truncated, or not a PyTorch checkpoint ({_first_line(error)})"
        ) from None
    return obj


def _check_pickled_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Refuse, before anything is copied or cast, tensors that would cost more memory than the file:
    overlapping views (a stride of 0 makes 5e8 elements of a few bytes) and storages past its size."""
    if len(tensors) > MAX_TENSORS:
        raise UserError(f"{path} holds more than {MAX_TENSORS} tensors, more than any model; refusing it")
    size = path.stat().st_size
    for name, t in tensors.items():
        storage = t.untyped_storage().nbytes()
        overlapping = any(stride == 0 and n > 1 for n, stride in zip(t.shape, t.stride(), strict=True))
        if overlapping or t.numel() * t.element_size() > storage or storage > size:
            raise UserError(
                f"{path}: tensor {name!r} describes more data ({t.numel()} elements of {t.dtype}) than "
                "the file holds (an overlapping or oversized storage); refusing the file"
            )


def _zip_entries(path: Path) -> int:
    """The number of records a zip file's end-of-directory record states (0 if it cannot be read; torch
    then reports the file), read without listing them."""
    try:
        with open(path, "rb") as f:
            end = zipfile._EndRecData(f)  # reads the end record only (zip64 included)
        return int(end[zipfile._ECD_ENTRIES_TOTAL]) if end else 0
    except (OSError, AttributeError, IndexError, TypeError, ValueError, struct.error, zipfile.BadZipFile):
        return 0


# what torch's weights-only unpickler raises on a malformed (not hostile) stream
_MALFORMED_PICKLE = (IndexError, KeyError, TypeError, AttributeError, RecursionError, OverflowError)


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
    for name, tensor in state.items():
        check_finite(tensor, name, path)
        if dtype is not None and tensor.is_floating_point():
            state[name] = tensor.to(dtype)
    return state
