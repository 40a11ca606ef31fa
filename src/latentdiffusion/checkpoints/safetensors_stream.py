"""safetensors one tensor at a time: read a tensor by plain file reads, write a file whose tensors are
made while it is written, so that transforming a model (merging) holds about one tensor in memory.

The format (safetensors' specification): an unsigned little-endian 64-bit header length N, N bytes of
JSON (``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``, offsets
relative to the data section, padded here with spaces to a multiple of 8), then the tensors' bytes.
Every name, dtype and shape is known before any tensor is made, so the header goes first and each
tensor follows as it is computed.

Reading uses ``pread`` rather than a memory mapping: the pages of a mapping that have been touched count
in the process's resident memory until the kernel reclaims them, so mapping two 2 GB inputs would look
like (and under memory pressure behave like) holding them; a plain read leaves them in the page cache.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from latentdiffusion.checkpoints.safe_io import SAFETENSORS_DTYPES, SafetensorsHeader, check_finite
from latentdiffusion.errors import UserError
from latentdiffusion.files import atomic_write

_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    """What a tensor of the output will be, before it exists."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * self.dtype.itemsize


def read_tensor(path: Path, header: SafetensorsHeader, name: str) -> torch.Tensor:
    """One tensor of a safetensors file (its header already validated), read into fresh memory and
    checked for NaN and infinity."""
    entry = header.entries[name]
    raw = torch.empty(entry.end - entry.begin, dtype=torch.uint8)
    with open(path, "rb") as f:
        view, offset = memoryview(raw.numpy()), header.data_start + entry.begin
        done = 0
        while done < len(view):  # pread may return fewer bytes than asked for large reads
            count = os.preadv(f.fileno(), [view[done:]], offset + done)
            if count <= 0:
                raise UserError(f"{path} is truncated: tensor {name!r} ends past the end of the file")
            done += count
    return check_finite(raw.view(entry.dtype).reshape(entry.shape), name, path)


def write_streamed(
    path: Path,
    specs: Sequence[TensorSpec],
    make: Callable[[TensorSpec], torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write a safetensors file atomically: the header from ``specs``, then ``make(spec)`` for each spec
    in turn (laid out widest dtype first, so every tensor is aligned for memory mapping)."""
    ordered = sorted(specs, key=lambda s: (-s.dtype.itemsize, s.name))
    raw = _header_bytes(ordered, metadata)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for spec in ordered:
                f.write(_checked_bytes(make(spec), spec))

    atomic_write(path, write)


def _header_bytes(specs: Sequence[TensorSpec], metadata: Mapping[str, str] | None) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for spec in specs:
        if spec.dtype not in _DTYPE_NAMES:
            raise UserError(f"cannot write tensor {spec.name!r}: safetensors has no dtype {spec.dtype}")
        header[spec.name] = {
            "dtype": _DTYPE_NAMES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned


def _checked_bytes(tensor: torch.Tensor, spec: TensorSpec) -> memoryview:
    """The tensor's bytes, after checking it is what the header announced (else the file would lie)."""
    if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
        raise ValueError(
            f"tensor {spec.name!r} is {tensor.dtype} {tuple(tensor.shape)}, the header says "
            f"{spec.dtype} {spec.shape}"
        )
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())
