import gzip
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiffusion.errors import UserError
from latentdiffusion.training.config import DataConfig
from latentdiffusion.training.data import (
    BadSample,
    BadSampleCounter,
    FashionMNISTSource,
    ImageFolderSource,
    MicroBatches,
    Preparation,
    ShapesSource,
    StreamOrder,
    collate,
    holdout_batches,
    open_source,
    resize_and_crop,
    to_rgb,
)
from latentdiffusion.training.tar_shards import StreamBatches, TarShardStream, find_shards


def png_bytes(colour=(255, 0, 0), size=(12, 8), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def folder(tmp_path):
    for i in range(4):
        (tmp_path / f"img{i}.png").write_bytes(png_bytes((60 * i, 0, 0)))
        (tmp_path / f"img{i}.txt").write_text(f"caption {i}\n")
    return tmp_path


def test_imagefolder_reads_same_stem_captions(folder):
    source = ImageFolderSource(folder)
    assert source.size == 4
    image, caption = source.load(2)
    assert caption == "caption 2" and image.size == (12, 8)


def test_imagefolder_reads_metadata_jsonl(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.png").write_bytes(png_bytes())
    (tmp_path / "metadata.jsonl").write_text(
        json.dumps({"file_name": "sub/a.png", "text": "a red box"}) + "\n"
    )
    assert ImageFolderSource(tmp_path).load(0)[1] == "a red box"


def test_missing_caption_names_the_file(folder):
    (folder / "img1.txt").unlink()
    with pytest.raises(UserError, match=r"1 images have no caption .*img1\.png"):
        ImageFolderSource(folder)


def test_bad_metadata_line_names_file_and_line(tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes())
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n{"file_name": "a.png"}\n')
    with pytest.raises(UserError, match=r"metadata.jsonl:2"):
        ImageFolderSource(tmp_path)


def test_empty_folder_is_an_error(tmp_path):
    with pytest.raises(UserError, match="holds no images"):
        ImageFolderSource(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        ImageFolderSource(tmp_path / "missing")


def test_unreadable_image_is_a_bad_sample_naming_the_file(folder):
    (folder / "img3.png").write_bytes(b"not a png at all")
    with pytest.raises(BadSample, match=r"cannot read image .*img3\.png"):
        ImageFolderSource(folder).load(3)


def test_wrong_image_mode_is_refused_and_alpha_is_composited(tmp_path):
    deep = Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16))
    deep.info["source"] = "deep.png"
    with pytest.raises(BadSample, match=r"deep.png: unsupported image mode I;16"):
        to_rgb(deep)
    clear = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert to_rgb(clear).getpixel((0, 0)) == (255, 255, 255)


def test_corrupt_sample_is_skipped_and_counted(folder):
    (folder / "img1.png").write_bytes(b"garbage")
    source = ImageFolderSource(folder)
    dataset = MicroBatches(source, StreamOrder(range(4), 0, shuffle=False), Preparation(8), batch_size=4)
    batch = dataset[0]
    assert len(batch) == 3 and batch.bad == 1 and "img1.png" in batch.first_error
    assert batch.positions.tolist() == [0, 2, 3]
    counter = BadSampleCounter(max_fraction=0.5)
    with pytest.warns(UserWarning, match="img1.png"):
        counter.update(batch)
    assert counter.state() == {"seen": 4, "bad": 1}


def test_too_many_bad_samples_stop_the_run():
    counter = BadSampleCounter(max_fraction=0.01)
    with pytest.warns(UserWarning), pytest.raises(UserError, match=r"could not be used.*file.png: broken"):
        for _ in range(60):
            counter.update(collate([(torch.zeros(1), "x", 0)], bad=1, error="file.png: broken"))


def test_resize_and_centre_crop():
    image = Image.new("RGB", (40, 20))
    assert resize_and_crop(image, 10, center_crop=True).size == (10, 10)
    assert resize_and_crop(image, 10, center_crop=False).size == (10, 10)


def test_preparation_is_seeded_by_position_and_drops_captions():
    prepare = Preparation(8, random_flip=True, caption_dropout=0.5, seed=3)
    image = Image.new("RGB", (8, 8), (10, 20, 30))
    captions = [prepare(image, "text", p)[1] for p in range(400)]
    assert 150 < captions.count("") < 250
    assert captions == [prepare(image, "text", p)[1] for p in range(400)]
    x, _ = prepare(image, "text", 0)
    assert x.shape == (3, 8, 8) and x.min() >= -1 and x.max() <= 1


def test_ranks_split_the_global_batch_exactly():
    source = ShapesSource(seed=0)
    prepare = Preparation(64)
    single = MicroBatches(source, StreamOrder(None, 0), prepare, batch_size=4)[3]
    halves = [
        MicroBatches(source, StreamOrder(None, 0), prepare, 2, rank=r, world_size=2)[3] for r in range(2)
    ]
    assert torch.equal(single.x, torch.cat([h.x for h in halves]))
    assert single.captions == halves[0].captions + halves[1].captions
    assert torch.cat([h.positions for h in halves]).tolist() == single.positions.tolist()


def test_epochs_are_seeded_permutations():
    order = StreamOrder(range(5), seed=1)
    first, second = [order(p) for p in range(5)], [order(p) for p in range(5, 10)]
    assert sorted(first) == sorted(second) == list(range(5))
    assert first != second or first != [order(p) for p in range(10, 15)]


def write_idx(path, array, gz=False):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


def test_fashion_mnist_reads_idx_files(tmp_path):
    images = np.random.default_rng(0).integers(0, 255, (3, 28, 28))
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images, gz=True)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([9, 0, 3]))
    source = FashionMNISTSource(tmp_path)
    image, caption = source.load(0)
    assert source.size == 3 and caption == "a photo of an ankle boot"
    assert np.array_equal(np.asarray(image), images[0].astype(np.uint8))
    assert source.load(2)[1] == "a photo of a dress"


def test_fashion_mnist_errors(tmp_path):
    with pytest.raises(UserError, match="dataset-fashion-mnist"):
        FashionMNISTSource(tmp_path)
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((3, 28, 28)))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 5, 1, 2]))
    with pytest.raises(UserError, match="truncated"):
        FashionMNISTSource(tmp_path)


def make_shards(folder, shards=3, per_shard=4, missing_caption=None):
    folder.mkdir(exist_ok=True)
    for s in range(shards):
        with tarfile.open(folder / f"{s:06d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"{s * per_shard + i:06d}"
                files = {f"{key}.png": png_bytes((s * 40, i * 40, 0), (8, 8))}
                if key != missing_caption:
                    files[f"{key}.txt"] = f"sample {key}".encode()
                for name, data in files.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return folder


def take(stream_batches, n):
    return [next(stream_batches) for _ in range(n)]


def test_tar_shards_split_by_rank_without_overlap(tmp_path):
    shards = find_shards(str(make_shards(tmp_path / "shards", shards=4, per_shard=3)))
    prepare = Preparation(8)
    seen = []
    for rank in range(2):
        batches = StreamBatches(TarShardStream(shards, prepare, rank, 2), batch_size=3)
        seen += [c for b in take(batches, 2) for c in b.captions]
    assert sorted(seen) == sorted(f"sample {i:06d}" for i in range(12))


def test_tar_stream_skips_bad_samples_and_resumes(tmp_path):
    shards = find_shards(str(make_shards(tmp_path / "shards", missing_caption="000005")) + "/*.tar")
    prepare = Preparation(8)
    batches = StreamBatches(TarShardStream(shards, prepare), batch_size=2)
    first = take(batches, 6)
    assert sum(b.bad for b in first) == 1 and "000005" in next(b.first_error for b in first if b.bad)
    resumed = StreamBatches(
        TarShardStream(shards, prepare, skip=take_consumed(shards, prepare, 3)), batch_size=2
    )
    assert [b.captions for b in take(resumed, 3)] == [b.captions for b in first[3:]]


def take_consumed(shards, prepare, n):
    batches = StreamBatches(TarShardStream(shards, prepare), batch_size=2)
    take(batches, n)
    return batches.consumed


def test_shapes_source_takes_the_relational_fraction():
    split = open_source(DataConfig(dataset="shapes", shapes_relational_fraction=1.0), seed=0)
    for source in (split.source, split.holdout):
        assert all(source.dataset.scene_and_caption(i)[0].form == "relational" for i in range(10))


def test_open_source_splits_off_a_holdout(folder):
    split = open_source(DataConfig(dataset="imagefolder", path=str(folder), holdout=1, resolution=8), seed=0)
    assert len(split.train_indices) == 3 and len(split.holdout_indices) == 1
    assert not set(split.train_indices) & set(split.holdout_indices)
    batches = holdout_batches(split, Preparation(8), batch_size=4)
    assert sum(len(b) for b in batches) == 1
    with pytest.raises(UserError, match="leaves none to train on"):
        open_source(DataConfig(dataset="imagefolder", path=str(folder), holdout=4), seed=0)
    with pytest.raises(UserError, match=r"data\.path must name"):
        open_source(DataConfig(dataset="webdataset"), seed=0)
