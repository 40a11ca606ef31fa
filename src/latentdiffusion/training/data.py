"""Training data: captioned image sources, image preparation, and deterministic per-rank micro-batches.

Sources map an index to an (image, caption) pair: ``ShapesSource`` (procedural, infinite),
``ImageFolderSource`` (images with same-stem ``.txt`` captions or a ``metadata.jsonl``),
``FashionMNISTSource`` (IDX files) and ``LatentSource`` (latents cached by the trainer). Tar shards in the
webdataset layout stream through ``training.tar_shards`` instead.

Batch order is a pure function of the seed: global micro-batch ``k`` holds stream positions
``[k * world * B, (k + 1) * world * B)`` and rank ``r`` takes its own ``B`` of them, so a run resumes by
starting at ``k`` and 2 processes see exactly the items of 1 process with twice the batch. Position ``p``
maps to item ``perm_e[p mod N]`` of a seeded permutation per epoch ``e``. Every per-item random choice
(flip, caption dropout) is drawn from a generator seeded by ``(seed, p)``. Each prepared image records its
``Geometry`` (original size, crop offset) in the batch, for SDXL's size and crop conditioning.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from latentdiffusion.errors import UserError
from latentdiffusion.training.config import FASHION_MNIST_DIR, DataConfig
from latentdiffusion.training.shapes import ShapesDataset

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CAPTION_SUFFIX = ".txt"
METADATA_FILE = "metadata.jsonl"
# Modes PIL converts to RGB without losing meaning; 16/32-bit and float images need the user's choice of
# tone mapping, so they are refused rather than silently clipped.
RGB_CONVERTIBLE = frozenset({"RGB", "RGBA", "RGBX", "L", "LA", "La", "P", "PA", "1", "CMYK", "YCbCr"})
FASHION_MNIST_CLASSES = (
    "t-shirt",
    "pair of trousers",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)


class BadSample(UserError):
    """One sample that cannot be used (unreadable, wrong mode, no caption); loaders skip and count it."""


class Source(Protocol):
    """Indexable captioned data. ``size`` is None for an infinite source."""

    size: int | None

    def load(self, index: int) -> tuple[Image.Image | torch.Tensor, str]: ...


# ------------------------------------------------------------------------------------------ sources


class ShapesSource:
    """The procedural shapes world (``training.shapes``); infinite unless ``size`` is given."""

    def __init__(self, seed: int = 0, size: int | None = None, relational_fraction: float = 0.5) -> None:
        self.dataset = ShapesDataset(seed, relational_fraction=relational_fraction)
        self.size = size

    def load(self, index: int) -> tuple[Image.Image, str]:
        return self.dataset[index]


class ImageFolderSource:
    """Images under ``root`` (recursively) with captions from ``metadata.jsonl`` (``{"file_name": ...,
    "text": ...}`` per line, the Hugging Face imagefolder convention) or from same-stem ``.txt`` files."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise UserError(f"image folder {self.root} does not exist or is not a folder")
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise UserError(f"image folder {self.root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        metadata = self.root / METADATA_FILE
        self.captions = read_metadata(metadata) if metadata.is_file() else {}
        self._check_captions(metadata.is_file())
        self.size = len(self.files)

    def _check_captions(self, with_metadata: bool) -> None:
        missing = [p for p in self.files if self._caption_source(p) is None]
        if missing:
            where = f"in {self.root / METADATA_FILE}" if with_metadata else f"(no same-stem {CAPTION_SUFFIX})"
            names = ", ".join(str(p) for p in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise UserError(f"{len(missing)} images have no caption {where}: {names}{more}")

    def _caption_source(self, path: Path) -> str | Path | None:
        relative = path.relative_to(self.root).as_posix()
        if relative in self.captions:
            return self.captions[relative]
        text_file = path.with_suffix(CAPTION_SUFFIX)
        return text_file if text_file.is_file() else None

    def load(self, index: int) -> tuple[Image.Image, str]:
        path = self.files[index]
        caption = self._caption_source(path)
        if isinstance(caption, Path):
            caption = read_caption(caption)
        return open_image(path), caption or ""


def read_metadata(path: Path) -> dict[str, str]:
    """``file_name -> text`` from a JSON-lines file; a malformed line is an error naming file and line."""
    captions: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            captions[str(record["file_name"])] = str(record["text"])
        except (ValueError, KeyError, TypeError) as error:
            raise UserError(
                f"{path}:{number}: expected a JSON object with 'file_name' and 'text' ({error})"
            ) from None
    return captions


def read_caption(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        raise BadSample(f"cannot read caption {path}: {error}") from None


def open_image(path: Path | str, data: bytes | None = None) -> Image.Image:
    """Open and fully decode an image, turning any decoder failure into a BadSample naming the file."""
    try:
        image = Image.open(io.BytesIO(data) if data is not None else path)
        image.load()
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
        raise BadSample(f"cannot read image {path}: {error}") from None
    image.info["source"] = str(path)
    return image


class FashionMNISTSource:
    """Fashion-MNIST (Xiao et al. 2017) from its IDX files; captions from the class names."""

    def __init__(self, root: str | Path | None = None, split: str = "train") -> None:
        if split not in ("train", "t10k"):
            raise UserError(f"fashion-mnist split must be 'train' or 't10k', got {split!r}")
        root = Path(root or FASHION_MNIST_DIR)
        self.images = read_idx(_idx_path(root, f"{split}-images-idx3-ubyte"), ndim=3)
        self.labels = read_idx(_idx_path(root, f"{split}-labels-idx1-ubyte"), ndim=1)
        if len(self.images) != len(self.labels):
            raise UserError(
                f"{root}: {len(self.images)} images but {len(self.labels)} labels in split {split}"
            )
        self.size = len(self.labels)

    def load(self, index: int) -> tuple[Image.Image, str]:
        label = int(self.labels[index])
        if not 0 <= label < len(FASHION_MNIST_CLASSES):
            raise BadSample(f"fashion-mnist item {index} has label {label}, outside 0..9")
        return Image.fromarray(self.images[index], mode="L"), class_caption(FASHION_MNIST_CLASSES[label])


def class_caption(name: str) -> str:
    article = "an" if name[0] in "aeiou" else "a"
    return f"a photo of {article} {name}"


def _idx_path(root: Path, stem: str) -> Path:
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise UserError(
        f"fashion-mnist file {root / stem}(.gz) not found; install Debian's dataset-fashion-mnist or set "
        f"data.path to the folder with the IDX files"
    )


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """An unsigned-byte IDX array (LeCun et al. 1998 file format): magic 0x08 0x<ndim>, big-endian dims."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as error:
        raise UserError(f"cannot read {path}: {error}") from None
    if len(data) < 4 + 4 * ndim or data[:2] != b"\0\0" or data[2] != 0x08 or data[3] != ndim:
        raise UserError(f"{path} is not an unsigned-byte IDX file with {ndim} dimensions")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != math.prod(shape):
        raise UserError(f"{path} is truncated: header says {shape}, found {body.size} bytes of data")
    return body.reshape(shape)


class LatentSource:
    """Cached autoencoder moments ``[N, 2C, h, w]`` (mean and std) with their captions and, where the
    cache recorded them, the geometry of the images they were encoded from."""

    def __init__(
        self,
        moments: torch.Tensor,
        captions: Sequence[str],
        geometries: Sequence[Geometry | None] | None = None,
    ) -> None:
        self.moments, self.captions = moments, list(captions)
        self.geometries = list(geometries) if geometries is not None else None
        self.size = len(self.captions)

    def load(self, index: int) -> tuple[torch.Tensor, str]:
        return self.moments[index], self.captions[index]

    def geometry(self, index: int) -> Geometry | None:
        return None if self.geometries is None else self.geometries[index]


def source_geometry(source: Source, index: int) -> Geometry | None:
    """The geometry a source recorded for an item it serves ready-made (cached latents), else None."""
    recorded = getattr(source, "geometry", None)  # only sources of prepared items have one
    return None if recorded is None else recorded(index)


# -------------------------------------------------------------------------------------- preparation


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB with transparency composited on white; refuses modes whose meaning a conversion would lose."""
    name = image.info.get("source", "image")
    if image.mode not in RGB_CONVERTIBLE:
        raise BadSample(f"{name}: unsupported image mode {image.mode}; convert it to 8-bit RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "La", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def crop_box(
    size: tuple[int, int], resolution: int, center_crop: bool
) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """(the size (width, height) an image of ``size`` is resized to, the square (left, top, right,
    bottom) then cut from it): shorter side to ``resolution`` and a centre square, or a plain resize."""
    if not center_crop:
        return (resolution, resolution), (0, 0, resolution, resolution)
    width, height = size
    scale = resolution / min(width, height)
    if scale != 1.0:
        size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    return size, (left, top, left + resolution, top + resolution)


def resize_and_crop(image: Image.Image, resolution: int, center_crop: bool) -> Image.Image:
    """Shorter side to ``resolution`` then a centre square (or a plain resize to a square)."""
    size, box = crop_box(image.size, resolution, center_crop)
    if size != image.size:
        image = image.resize(size, Image.Resampling.BICUBIC)
    return image.crop(box)


@dataclass(frozen=True)
class Geometry:
    """How a training image was cut from its source: the source's size (height, width) and the crop's
    top-left corner (top, left) in the resized source, mirrored with a flip. SDXL conditions on both
    (Podell et al. 2023, Sec. 2.2: original size and crop coordinates)."""

    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> [3, H, W] float32 in [-1, 1]."""
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 127.5 - 1.0


def prepared_image(path: Path | str, resolution: int, center_crop: bool = True) -> torch.Tensor:
    """The image file at ``path`` as a training item: RGB, shorter side to ``resolution``, cropped square,
    [3, H, W] in [-1, 1] (a file that is no image is ``open_image``'s error)."""
    return image_to_tensor(resize_and_crop(to_rgb(open_image(path)), resolution, center_crop))


@dataclass(frozen=True)
class Preparation:
    """The per-item transform: image resize/crop/flip and caption dropout, seeded by stream position."""

    resolution: int
    center_crop: bool = True
    random_flip: bool = False
    caption_dropout: float = 0.0
    seed: int = 0

    @classmethod
    def from_config(cls, config: DataConfig, seed: int, train: bool = True) -> Preparation:
        if not train:  # held-out items are shown as they are
            return cls(config.resolution, config.center_crop, seed=seed)
        return cls(config.resolution, config.center_crop, config.random_flip, config.caption_dropout, seed)

    def __call__(
        self, x: Image.Image | torch.Tensor, caption: str, position: int
    ) -> tuple[torch.Tensor, str]:
        x, caption, _ = self.item(x, caption, position)
        return x, caption

    def item(
        self, x: Image.Image | torch.Tensor, caption: str, position: int
    ) -> tuple[torch.Tensor, str, Geometry | None]:
        """The prepared item and, for an image, its geometry (None for a ready-made tensor)."""
        rng = np.random.default_rng((self.seed, position))
        flip, drop = rng.random(2)
        geometry = None
        if isinstance(x, Image.Image):
            x, geometry = self.image(x, self.random_flip and flip < 0.5)
        return x, "" if drop < self.caption_dropout else caption, geometry

    def image(self, image: Image.Image, flip: bool) -> tuple[torch.Tensor, Geometry]:
        size, (left, top, right, _) = crop_box(image.size, self.resolution, self.center_crop)
        original = (image.height, image.width)
        image = resize_and_crop(to_rgb(image), self.resolution, self.center_crop)
        if flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            left = size[0] - right  # the mirrored crop's left edge
        return image_to_tensor(image), Geometry(original, (top, left))


# ------------------------------------------------------------------------------------------ batches


@dataclass
class Batch:
    """One process's micro-batch. ``positions`` index the global micro-batch (for seeded noise)."""

    x: torch.Tensor  # [n, 3, H, W] pixels in [-1, 1], or [n, 2C, h, w] cached latent moments
    captions: list[str]
    positions: torch.Tensor  # [n] long, in [0, world * batch_size)
    bad: int = 0  # samples skipped while making this batch
    first_error: str | None = None
    geometry: list[Geometry | None] = field(default_factory=list)  # per item; empty: none known

    def __len__(self) -> int:
        return len(self.captions)


def collate(items: Sequence[tuple], bad: int, error: str | None) -> Batch:
    """Items (x, caption, position[, geometry]) -> one Batch."""
    if not items:
        return Batch(torch.empty(0), [], torch.empty(0, dtype=torch.long), bad, error)
    return Batch(
        torch.stack([item[0] for item in items]),
        [item[1] for item in items],
        torch.tensor([item[2] for item in items], dtype=torch.long),
        bad,
        error,
        [item[3] if len(item) > 3 else None for item in items],
    )


class StreamOrder:
    """Stream position -> item index: a fresh seeded permutation of ``indices`` every epoch
    (``shuffle=False``: the indices in their order, repeated)."""

    def __init__(self, indices: Sequence[int] | None, seed: int, shuffle: bool = True) -> None:
        self.indices = None if indices is None else np.asarray(indices, dtype=np.int64)
        self.seed, self.shuffle = seed, shuffle
        self._permutation = lru_cache(maxsize=2)(self._make_permutation)

    def _make_permutation(self, epoch: int) -> np.ndarray:
        assert self.indices is not None
        if not self.shuffle:
            return self.indices
        return self.indices[np.random.default_rng((self.seed, epoch)).permutation(len(self.indices))]

    def __call__(self, position: int) -> int:
        if self.indices is None:  # infinite procedural data: already random, no epochs
            return position
        epoch, offset = divmod(position, len(self.indices))
        return int(self._permutation(epoch)[offset])


class MicroBatches(torch.utils.data.Dataset):
    """Map-style: global micro-batch number ``k`` -> this rank's Batch. Workers may load any ``k``."""

    def __init__(
        self,
        source: Source,
        order: StreamOrder,
        prepare: Preparation,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.source, self.order, self.prepare = source, order, prepare
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size

    def __getitem__(self, k: int) -> Batch:
        offset = self.rank * self.batch_size
        first = k * self.world_size * self.batch_size + offset
        items, bad, error = [], 0, None
        for j in range(self.batch_size):
            position = first + j
            index = self.order(position)
            try:
                x, caption = self.source.load(index)
                x, caption, geometry = self.prepare.item(x, caption, position)
            except BadSample as failure:
                bad, error = bad + 1, error or str(failure)
                continue
            items.append((x, caption, offset + j, geometry or source_geometry(self.source, index)))
        return collate(items, bad, error)


def loader(dataset: MicroBatches, start: int, stop: int, num_workers: int = 0) -> Iterator[Batch]:
    """Micro-batches ``start .. stop - 1`` in order, loaded by ``num_workers`` background processes."""
    return iter(
        torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            sampler=range(start, stop),
            num_workers=num_workers,
            collate_fn=as_is,
            persistent_workers=False,
        )
    )


def as_is(batch: Batch) -> Batch:
    return batch


# --------------------------------------------------------------------------------------- assembly


@dataclass
class DataSplit:
    """The training stream and the held-out items of one data set."""

    source: Source | None  # None for tar shards (streamed)
    train_indices: np.ndarray | None  # None: the source is infinite (every position is a new item)
    holdout: Source | None
    holdout_indices: np.ndarray
    shards: list[Path] | None = None


def open_source(config: DataConfig, seed: int) -> DataSplit:
    """Open the data set of ``config`` and split off ``config.holdout`` items for evaluation."""
    if config.dataset == "webdataset":
        if not config.path:
            raise UserError(
                "data.path must name the tar shards (a folder or a glob) for data.dataset=webdataset"
            )
        from latentdiffusion.training.tar_shards import find_shards  # that module builds on this one

        return DataSplit(None, None, None, np.arange(0), find_shards(config.path))
    if config.dataset == "moving_shapes":
        raise UserError("data.dataset=moving_shapes holds clips: it trains motion modules (training.motion)")
    if config.dataset == "shapes":
        fraction = config.shapes_relational_fraction
        train = ShapesSource(seed, config.size, fraction)
        holdout = ShapesSource(seed + 1, relational_fraction=fraction)  # another seed: never seen in training
        indices = None if config.size is None else np.arange(config.size)
        return DataSplit(train, indices, holdout, np.arange(config.holdout))
    source = _finite_source(config)
    size = source.size if config.size is None else min(config.size, source.size)
    if size <= config.holdout:
        raise UserError(
            f"the data set has {size} items; data.holdout={config.holdout} leaves none to train on"
        )
    order = np.random.default_rng((seed, 1)).permutation(size)
    return DataSplit(source, np.sort(order[config.holdout :]), source, np.sort(order[: config.holdout]))


def _finite_source(config: DataConfig) -> Source:
    if config.dataset == "imagefolder":
        if not config.path:
            raise UserError("data.path must name the image folder for data.dataset=imagefolder")
        return ImageFolderSource(config.path)
    return FashionMNISTSource(config.path, config.fashion_mnist_split)


def holdout_batches(split: DataSplit, prepare: Preparation, batch_size: int) -> list[Batch]:
    """The held-out items as batches (rank 0 only evaluates), bad samples skipped."""
    if split.holdout is None or not len(split.holdout_indices):
        return []
    order = StreamOrder(split.holdout_indices.tolist(), 0, shuffle=False)
    dataset = MicroBatches(split.holdout, order, prepare, batch_size)
    count = math.ceil(len(split.holdout_indices) / batch_size)
    batches = [dataset[k] for k in range(count)]
    limit = len(split.holdout_indices) - (count - 1) * batch_size
    last = batches[-1]
    keep = last.positions < limit
    batches[-1] = Batch(
        last.x[keep],
        [c for c, k in zip(last.captions, keep, strict=True) if k],
        last.positions[keep],
        geometry=[g for g, k in zip(last.geometry, keep, strict=False) if k],
    )
    return [b for b in batches if len(b)]


class BadSampleCounter:
    """Counts skipped samples, warns about the first few, and stops the run past ``max_fraction``."""

    MIN_SEEN = 50  # judge the fraction only once this many samples were tried
    WARN_FIRST = 5

    def __init__(self, max_fraction: float) -> None:
        self.max_fraction, self.seen, self.bad, self.first_error = max_fraction, 0, 0, None

    def update(self, batch: Batch) -> None:
        self.seen += len(batch) + batch.bad
        if not batch.bad:
            return
        if self.bad < self.WARN_FIRST:
            warnings.warn(f"skipped {batch.bad} unreadable sample(s): {batch.first_error}", stacklevel=2)
        self.bad += batch.bad
        self.first_error = self.first_error or batch.first_error
        if self.seen >= self.MIN_SEEN and self.bad > self.max_fraction * self.seen:
            raise UserError(
                f"{self.bad} of {self.seen} samples could not be used (more than data.max_bad_fraction="
                f"{self.max_fraction}); first: {self.first_error}"
            )

    def state(self) -> dict[str, Any]:
        return {"seen": self.seen, "bad": self.bad}
