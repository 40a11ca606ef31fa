"""Video files: every format written, read back (PyAV decodes MP4/WebM, Pillow GIF/APNG) and compared."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from latentdiffusion.errors import UserError
from latentdiffusion.pipelines import video_io
from latentdiffusion.pipelines.video_io import read_video, write_video

av = pytest.importorskip("av")


def moving_square(i: int, width: int = 64, height: int = 48) -> Image.Image:
    """A smooth colour ramp with a white square that moves 3 pixels a frame."""
    y, x = np.mgrid[0:height, 0:width]
    array = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, i * 20 % 256)], -1)
    array = array.astype(np.uint8)
    array[10:20, 5 + 3 * i : 15 + 3 * i] = 255
    return Image.fromarray(array)


def psnr(a: Image.Image, b: Image.Image) -> float:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mse = ((x - y) ** 2).mean()
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


# suffix -> the least PSNR (dB) every decoded frame must reach (lossy codecs; APNG is lossless)
BOUNDS = {".mp4": 33.0, ".webm": 32.0, ".gif": 30.0, ".apng": float("inf"), ".png": float("inf")}


@pytest.mark.parametrize("suffix", list(BOUNDS))
def test_each_format_reads_back_with_its_frames_size_and_pixels(tmp_path, suffix):
    frames = [moving_square(i) for i in range(8)]
    path = tmp_path / f"walk{suffix}"
    write_video(frames, path, fps=12)
    back = read_video(path)
    assert len(back) == len(frames)
    assert all(frame.size == (64, 48) for frame in back)
    assert min(psnr(a, b) for a, b in zip(frames, back, strict=True)) >= BOUNDS[suffix]
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind


@pytest.mark.parametrize(("suffix", "codec"), [(".mp4", "h264"), (".webm", "vp9")])
def test_ffmpeg_formats_use_their_codec_pixel_format_and_rate(tmp_path, suffix, codec):
    path = tmp_path / f"clip{suffix}"
    write_video([moving_square(i) for i in range(4)], path, fps=12)
    with av.open(str(path)) as source:
        stream = source.streams.video[0]
        assert stream.codec_context.name == codec
        assert stream.codec_context.pix_fmt == "yuv420p"
        assert stream.average_rate == 12


def test_odd_sides_are_padded_by_repeating_the_edge(tmp_path):
    frames = [moving_square(i, 63, 47) for i in range(3)]
    path = tmp_path / "odd.mp4"
    write_video(frames, path, fps=8)
    back = read_video(path)
    assert back[0].size == (64, 48)
    inside = [frame.crop((0, 0, 63, 47)) for frame in back]
    assert min(psnr(a, b) for a, b in zip(frames, inside, strict=True)) >= 33.0
    last_column = np.asarray(back[0], dtype=float)[:47, 63]
    assert np.abs(last_column - np.asarray(frames[0], dtype=float)[:, 62]).mean() < 8


def test_gif_and_apng_loop_with_the_frame_duration(tmp_path):
    frames = [moving_square(i) for i in range(3)]
    write_video(frames, tmp_path / "a.gif", fps=12)
    write_video(frames, tmp_path / "a.apng", fps=12)
    with Image.open(tmp_path / "a.gif") as gif:
        assert (gif.info["loop"], gif.info["duration"]) == (0, 80)  # GIF counts hundredths of a second
    with Image.open(tmp_path / "a.apng") as apng:
        assert apng.info["loop"] == 0
        assert apng.info["duration"] == pytest.approx(1000 / 12)


def test_scale_enlarges_with_nearest_neighbour(tmp_path):
    frames = [moving_square(i, 16, 12) for i in range(2)]
    write_video(frames, tmp_path / "big.apng", fps=4, scale=3)
    back = read_video(tmp_path / "big.apng")
    assert back[0].size == (48, 36)
    assert np.array_equal(np.asarray(back[1])[::3, ::3], np.asarray(frames[1]))


def test_unknown_suffix_is_one_error_listing_the_known_ones(tmp_path):
    with pytest.raises(UserError, match=r"unknown suffix '\.avi'.*\.mp4.*\.webm.*\.gif.*\.apng"):
        write_video([moving_square(0)], tmp_path / "clip.avi")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("frames", "fps", "scale", "message"),
    [
        ([], 12, 1, "at least one frame"),
        ([moving_square(0), moving_square(0, 32, 32)], 12, 1, "same size"),
        ([moving_square(0)], 0, 1, "fps must be a number > 0"),
        ([moving_square(0)], float("nan"), 1, "fps must be a number > 0"),
        ([moving_square(0)], 12, 0, "scale must be a whole number"),
    ],
)
def test_bad_input_is_refused(tmp_path, frames, fps, scale, message):
    with pytest.raises(UserError, match=message):
        write_video(frames, tmp_path / "clip.gif", fps, scale=scale)


def test_missing_pyav_says_how_to_install_it(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def without_av(name, *args, **kwargs):
        if name == "av":
            raise ImportError("no av")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_av)
    with pytest.raises(UserError, match=r"latentdiffusion\[video\]"):
        write_video([moving_square(0)], tmp_path / "clip.mp4")
    write_video([moving_square(0)], tmp_path / "clip.gif")  # Pillow alone writes GIF
    assert video_io.video_format("x.GIF") == "GIF"
