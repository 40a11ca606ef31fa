"""Training data from tar shards in the webdataset layout (``data.dataset=webdataset``): samples are the
members of a tar file that share a name up to its first dot (``000123.png`` with ``000123.txt``), streamed
endlessly by epoch, split by rank and loader worker, and resumed exactly after the items already consumed.
"""

from __future__ import annotations

import glob
import itertools
import tarfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from latentdiffusion.errors import UserError
from latentdiffusion.training.data import (
    IMAGE_SUFFIXES,
    BadSample,
    Batch,
    Geometry,
    Preparation,
    as_is,
    collate,
    open_image,
)


def find_shards(path: str) -> list[Path]:
    """Tar shards from a folder (all ``*.tar``), a glob pattern, or one file, in sorted order."""
    target = Path(path)
    if target.is_dir():
        shards = sorted(target.glob("*.tar"))
    elif any(ch in path for ch in "*?["):
        shards = sorted(Path(p) for p in glob.glob(path))
    else:
        shards = [target] if target.is_file() else []
    if not shards:
        raise UserError(f"no tar shards found at {path} (expected a folder of .tar files or a glob)")
    return shards


def tar_samples(shard: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample of a webdataset tar: members sharing the part of the file
    name before its first dot form one sample."""
    key, parts = None, {}
    try:
        with tarfile.open(shard) as archive:
            for member in archive:
                if not member.isfile():
                    continue
                folder, _, name = member.name.rpartition("/")
                stem, _, extension = name.partition(".")
                sample_key = f"{folder}/{stem}" if folder else stem
                if key is not None and sample_key != key:
                    yield key, parts
                    parts = {}
                key = sample_key
                file = archive.extractfile(member)
                parts[extension.lower()] = file.read() if file else b""
    except (OSError, tarfile.TarError) as error:
        # A truncated shard loses its tail, not the run.
        warnings.warn(f"stopped reading tar shard {shard}: {error}", stacklevel=2)
        return
    if key is not None:
        yield key, parts


def decode_tar_sample(shard: Path, key: str, parts: dict[str, bytes]) -> tuple[Image.Image, str]:
    name = f"{shard}:{key}"
    image_ext = next((e for e in parts if f".{e}" in IMAGE_SUFFIXES), None)
    if image_ext is None:
        raise BadSample(f"{name} has no image ({', '.join(sorted(parts))})")
    caption = parts.get("txt")
    if caption is None:
        raise BadSample(f"{name} has no .txt caption")
    return open_image(f"{name}.{image_ext}", parts[image_ext]), caption.decode("utf-8", "replace").strip()


class TarShardStream(torch.utils.data.IterableDataset):
    """Samples of webdataset-style tar shards, split by rank and loader worker, endlessly by epoch.

    With at least ``world * workers`` shards each (rank, worker) slot reads its own shards; with fewer,
    every slot reads all shards and keeps every ``world * workers``-th sample. Every sample yields one
    item (a bad one yields ``None`` and its message) and the loader takes items from the workers in turn,
    so the ``skip`` items consumed before a checkpoint are skipped exactly on resume.
    """

    def __init__(
        self, shards: Sequence[Path], prepare: Preparation, rank: int = 0, world_size: int = 1, skip: int = 0
    ) -> None:
        self.shards, self.prepare = list(shards), prepare
        self.rank, self.world_size, self.skip = rank, world_size, skip

    def __iter__(self) -> Iterator[tuple[torch.Tensor | None, str, Geometry | None]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        slot, slots = self.rank * workers + worker, self.world_size * workers
        skip = len(range(worker, self.skip, workers))
        for count, (shard, key, parts) in enumerate(self._samples(slot, slots)):
            if count < skip:
                continue
            try:
                image, caption = decode_tar_sample(shard, key, parts)
                yield self.prepare.item(image, caption, slot * 2**40 + count)
            except BadSample as failure:
                yield None, str(failure), None

    def _samples(self, slot: int, slots: int) -> Iterator[tuple[Path, str, dict[str, bytes]]]:
        per_shard = len(self.shards) >= slots
        for epoch in itertools.count():
            order = np.random.default_rng((self.prepare.seed, epoch)).permutation(len(self.shards))
            shards = [self.shards[i] for i in order]
            index = 0
            for shard in shards[slot::slots] if per_shard else shards:
                for key, parts in tar_samples(shard):
                    if per_shard or index % slots == slot:
                        yield shard, key, parts
                    index += 1
            if index == 0:
                raise UserError(f"the tar shards hold no samples: {', '.join(map(str, self.shards[:3]))}")


class StreamBatches:
    """Batches of a TarShardStream; bad samples are dropped and counted. ``consumed`` is the resume point."""

    def __init__(self, stream: TarShardStream, batch_size: int, num_workers: int = 0) -> None:
        self.batch_size, self.consumed, self.offset = batch_size, stream.skip, stream.rank * batch_size
        self._items = iter(
            torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers, collate_fn=as_is)
        )

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        items, bad, error = [], 0, None
        while len(items) < self.batch_size:
            x, caption, geometry = next(self._items)
            self.consumed += 1
            if x is None:
                bad, error = bad + 1, error or caption
                continue
            items.append((x, caption, self.offset + len(items), geometry))
        return collate(items, bad, error)
