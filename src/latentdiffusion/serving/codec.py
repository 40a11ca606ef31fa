"""Images on the wire and on disk: base64 / upload decoding with limits, encoding with the generation
parameters (the AUTOMATIC1111 PNG-info text, ``pipelines.metadata``: PNG's ``parameters`` text chunk,
JPEG's and WebP's EXIF UserComment), the OpenAI mask convention, and the optional output folder.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import struct
import threading
from pathlib import Path

from PIL import ExifTags, Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from latentdiffusion.errors import UserError
from latentdiffusion.pipelines.metadata import save_png
from latentdiffusion.serving.settings import FieldError, Limits

OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
# EXIF 2.3, Sec. 4.6.5: UserComment starts with an 8-byte character-code prefix. AUTOMATIC1111 writes
# "UNICODE\0" and UTF-16 big-endian text (piexif.helper.UserComment.dump(text, encoding="unicode")).
USER_COMMENT_UNICODE = b"UNICODE\0"
TIFF_LONG, TIFF_UNDEFINED = 4, 7  # TIFF field types
_DATA_URL = re.compile(r"^data:[\w/+.-]*;base64,", re.IGNORECASE)


def decode_base64(text: str, field: str) -> bytes:
    """Base64 (or a ``data:...;base64,`` URL, as browsers make) -> bytes."""
    payload = _DATA_URL.sub("", text.strip(), count=1)
    try:
        return base64.b64decode(payload, validate=False)
    except (binascii.Error, ValueError):
        raise FieldError(field, "is not valid base64") from None


def decode_image(data: bytes, field: str, limits: Limits) -> Image.Image:
    """Bytes of an image file -> a loaded PIL image (EXIF rotation applied), refusing non-images and
    images with more pixels than ``limits.max_input_pixels`` before their pixels are decoded."""
    if not data:
        raise FieldError(field, "is empty; send an image file (PNG, JPEG, WebP)")
    unreadable = (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError)
    try:
        image = Image.open(io.BytesIO(data))
    except unreadable as error:
        raise FieldError(field, f"is not a readable image ({type(error).__name__})") from None
    width, height = image.size
    if width * height > limits.max_input_pixels:
        raise FieldError(field, f"is {width}x{height}; at most {limits.max_input_pixels} pixels are accepted")
    try:
        image.load()
    except unreadable as error:
        raise FieldError(field, f"is a damaged image ({type(error).__name__})") from None
    return ImageOps.exif_transpose(image) or image


def decode_base64_image(text: str, field: str, limits: Limits) -> Image.Image:
    return decode_image(decode_base64(text, field), field, limits)


def fit_input(image: Image.Image, size: tuple[int, int] | None, limits: Limits, field: str) -> Image.Image:
    """The input at the requested ``size`` (resized, as the web UI's "just resize"), or at its own
    size when none is given, which must then be within the limits."""
    if size is not None:
        return image.resize(size, Image.Resampling.LANCZOS) if image.size != size else image
    width, height = image.size
    if max(width, height) > limits.max_side:
        raise FieldError(
            field, f"is {width}x{height}; sides must be at most {limits.max_side} (or give a size)"
        )
    return image


def mask_from_alpha(image: Image.Image) -> Image.Image | None:
    """OpenAI's convention: the fully transparent pixels of an image are the ones to repaint.
    Returns a white-where-repainted "L" mask, or None for an image without an alpha channel."""
    if image.mode not in ("RGBA", "LA", "PA") and "transparency" not in image.info:
        return None
    alpha = image.convert("RGBA").getchannel("A")
    return alpha.point(lambda a: 255 if a == 0 else 0)


def openai_mask(mask: Image.Image) -> Image.Image:
    """A mask upload: transparency marks the area to repaint (OpenAI), else white does (the web UI)."""
    from_alpha = mask_from_alpha(mask)
    return from_alpha if from_alpha is not None else mask.convert("L")


def encode_image(image: Image.Image, output_format: str = "png") -> bytes:
    """PNG with the image's ``parameters`` text chunk, or JPEG / WebP with them in EXIF UserComment,
    where AUTOMATIC1111's web UI writes (and its PNG-info tab reads) them."""
    buffer = io.BytesIO()
    parameters = image.info.get("parameters")
    if output_format == "png":
        info = PngImagePlugin.PngInfo()
        if parameters:
            info.add_text("parameters", parameters)
        image.save(buffer, format="PNG", pnginfo=info)
    else:
        options = {"exif": exif_user_comment(parameters)} if parameters else {}
        image.convert("RGB").save(buffer, format=OUTPUT_FORMATS[output_format], quality=95, **options)
    return buffer.getvalue()


def exif_user_comment(text: str) -> bytes:
    """An APP1 EXIF block (big-endian TIFF, TIFF 6.0 Sec. 2) whose Exif IFD holds ``text`` as
    UserComment, typed UNDEFINED as EXIF requires (Pillow would type raw bytes BYTE, which piexif,
    the web UI's reader, does not decode)."""
    comment = USER_COMMENT_UNICODE + text.encode("utf-16-be", errors="replace")
    entry = struct.Struct(">HHII")  # one IFD entry: tag, type, count, value offset
    exif_ifd_at = 8 + 2 + entry.size + 4  # after the header and IFD0 (one entry)
    comment_at = exif_ifd_at + 2 + entry.size + 4
    header = b"MM\x00\x2a" + struct.pack(">I", 8)
    ifd0 = struct.pack(">H", 1) + entry.pack(ExifTags.IFD.Exif, TIFF_LONG, 1, exif_ifd_at) + bytes(4)
    exif_ifd = struct.pack(">H", 1) + entry.pack(
        ExifTags.Base.UserComment, TIFF_UNDEFINED, len(comment), comment_at
    )
    return b"Exif\x00\x00" + header + ifd0 + exif_ifd + bytes(4) + comment


def encode_base64(image: Image.Image, output_format: str = "png") -> str:
    return base64.b64encode(encode_image(image, output_format)).decode("ascii")


class OutputFolder:
    """Numbered PNGs ``00000-SEED.png`` with their parameters, as ``ldm generate --outdir`` writes;
    numbering continues from the files already there. Writes are atomic."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as error:  # a file of that name, no permission: say so before serving anything
            raise UserError(
                f"cannot use {self.path} as the output folder: {error.strerror or error}"
            ) from None
        self._lock = threading.Lock()
        numbers = [int(p.name[:5]) for p in self.path.glob("[0-9][0-9][0-9][0-9][0-9]-*.png")]
        self._next = max(numbers, default=-1) + 1

    def save(self, images: list[Image.Image], seeds: list[int]) -> list[Path]:
        with self._lock:  # several request threads may save at once; numbers must not collide
            start, self._next = self._next, self._next + len(images)
        paths = [self.path / f"{start + i:05d}-{seed}.png" for i, seed in enumerate(seeds)]
        for image, path in zip(images, paths, strict=True):
            save_png(image, path, image.info.get("parameters"))
        return paths
