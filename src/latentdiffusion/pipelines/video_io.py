"""Frames to video files, the format chosen by the file's suffix.

- ``.mp4``: H.264 (libx264), yuv420p, constant quality (CRF 18), the format every player and browser
  plays. yuv420p stores colour at half resolution, so odd widths or heights are padded by one row or
  column that repeats the edge pixels (the frames are not scaled).
- ``.webm``: VP9 (libvpx-vp9), yuv420p, constant quality (CRF 24), padded the same way.
- ``.gif``: a looping GIF (each frame's own 256-colour palette, no dithering). GIF counts time in
  hundredths of a second, so a frame shows for 1/fps rounded down to 10 ms (12 fps: 80 ms).
- ``.apng`` or ``.png``: a looping animated PNG (lossless; the duration kept in milliseconds).

MP4 and WebM are encoded by FFmpeg through PyAV (``pip install "latentdiffusion[video]"``; its wheels
bundle FFmpeg with libx264 and libvpx), imported only when such a file is written. GIF and APNG need
only Pillow. Pillow merges a frame identical to the one before into it (the duration adds up), so a
GIF or APNG may hold fewer frames than given and still plays the same. Every file is written atomically
(a temporary file, then a rename).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image, ImageSequence

from latentdiffusion.errors import UserError
from latentdiffusion.files import atomic_write

# suffix -> (container for FFmpeg or Pillow's format, description)
FORMATS = {
    ".mp4": ("mp4", "MP4 (H.264)"),
    ".webm": ("webm", "WebM (VP9)"),
    ".gif": ("GIF", "GIF"),
    ".apng": ("PNG", "animated PNG"),
    ".png": ("PNG", "animated PNG"),
}
# container -> (FFmpeg encoder, encoder options): constant quality; VP9 needs a zero bitrate for it
ENCODERS = {
    "mp4": ("libx264", {"crf": "18", "preset": "medium"}),
    "webm": ("libvpx-vp9", {"crf": "24", "b": "0", "deadline": "good", "cpu-used": "4"}),
}


def video_format(path: str | Path) -> str:
    """The container of ``path``'s suffix ("mp4", "webm", "GIF", "PNG"); a ``UserError`` listing the known
    suffixes otherwise."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        known = ", ".join(f"{s} ({description})" for s, (_, description) in FORMATS.items())
        raise UserError(
            f"cannot write video {str(path)!r}: unknown suffix {suffix or '(none)'!r}; known: {known}"
        )
    return FORMATS[suffix][0]


def write_video(
    frames: Sequence[Image.Image], path: str | Path, fps: float = 12.0, *, scale: int = 1
) -> None:
    """Write ``frames`` (PIL images of one size) to ``path`` at ``fps`` frames per second, in the format
    of its suffix (see the module's docstring); ``scale`` > 1 enlarges every frame that many times with
    nearest-neighbour sampling (a 64-pixel frame is tiny in a player), keeping the pixels sharp."""
    container = video_format(path)
    frames = prepared_frames(frames, scale)
    fps = checked_fps(fps)
    if container in ENCODERS:
        atomic_write(path, lambda tmp: encode_ffmpeg(frames, tmp, fps, container))
    else:
        duration = 1000 / fps  # milliseconds per frame
        atomic_write(path, lambda tmp: save_animation(frames, tmp, duration, container))


def prepared_frames(frames: Sequence[Image.Image], scale: int) -> list[Image.Image]:
    """The frames as RGB, enlarged ``scale`` times; refuses no frames and frames of different sizes."""
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise UserError(f"scale must be a whole number >= 1, got {scale!r}")
    frames = list(frames)
    if not frames:
        raise UserError("a video needs at least one frame")
    sizes = {frame.size for frame in frames}
    if len(sizes) > 1:
        raise UserError(f"every frame of a video must have the same size, got {sorted(sizes)}")
    rgb = [frame.convert("RGB") for frame in frames]
    if scale == 1:
        return rgb
    width, height = rgb[0].size
    return [frame.resize((width * scale, height * scale), Image.Resampling.NEAREST) for frame in rgb]


def checked_fps(fps: float) -> float:
    if isinstance(fps, bool) or not isinstance(fps, int | float) or not math.isfinite(fps) or fps <= 0:
        raise UserError(f"fps must be a number > 0, got {fps!r}")
    return float(fps)


def even_size(frame: np.ndarray) -> np.ndarray:
    """[H, W, 3] padded to even sides by repeating the last row and column (yuv420p needs even sides)."""
    height, width = frame.shape[:2]
    return np.pad(frame, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge")


def encode_ffmpeg(frames: Sequence[Image.Image], path: str, fps: float, container: str) -> None:
    """Encode ``frames`` with FFmpeg's encoder for ``container`` (``ENCODERS``) into ``path``."""
    av = import_av()
    codec, options = ENCODERS[container]
    arrays = [even_size(np.asarray(frame)) for frame in frames]
    with av.open(path, mode="w", format=container) as output:
        stream = output.add_stream(codec, rate=Fraction(fps).limit_denominator(1001), options=options)
        stream.height, stream.width = arrays[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for array in arrays:
            output.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        output.mux(stream.encode(None))  # flush the encoder's delayed frames


def save_animation(frames: Sequence[Image.Image], path: str, duration: float, format: str) -> None:
    """A looping GIF or APNG through Pillow, each frame shown ``duration`` milliseconds. GIF frames get
    their own 256 colours by fast octree quantisation without dithering: dithering's noise changes from
    frame to frame (a shimmer) and compresses badly (walks of the default model: about 2.5x larger)."""
    if format == "GIF":
        frames = [
            frame.quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
            for frame in frames
        ]
    first, *rest = frames
    first.save(path, format=format, save_all=True, append_images=rest, duration=duration, loop=0)


def import_av():
    """PyAV, or a ``UserError`` that says how to install it."""
    try:
        import av
    except ImportError:
        raise UserError(
            'writing MP4 and WebM needs PyAV: pip install "latentdiffusion[video]" (or pip install av); '
            "GIF and APNG (.gif, .apng) need nothing more"
        ) from None
    return av


def read_video(path: str | Path) -> list[Image.Image]:
    """Every frame of a video file as RGB images: MP4/WebM decoded by PyAV, GIF/APNG by Pillow."""
    container = video_format(path)
    if container in ENCODERS:
        av = import_av()
        with av.open(str(path)) as source:
            return [frame.to_image() for frame in source.decode(video=0)]
    with Image.open(path) as animation:
        return [frame.convert("RGB") for frame in ImageSequence.Iterator(animation)]
