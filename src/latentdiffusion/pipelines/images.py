"""Images and masks for the editing pipelines: reading, converting, sizing, feathering, compositing.

Conventions (docs/editing.md): images are 8-bit RGB, as tensors [N, 3, H, W] in [-1, 1]; masks are
white where the image is to be repainted, read as greyscale and binarised at 50%; sides that are not
multiples of 8 are rounded down by cutting the right and bottom edges off (with a warning).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from latentdiffusion.errors import UserError

ImageInput = str | Path | Image.Image
Box = tuple[int, int, int, int]  # (left, top, right, bottom), right/bottom exclusive, as PIL crops


def load_image(source: ImageInput, what: str = "image") -> Image.Image:
    """An RGB image from a path or a PIL image: EXIF rotation applied, alpha dropped, 16-bit scaled."""
    image = _open(source, what)
    return to_rgb(ImageOps.exif_transpose(image) or image)


def load_mask(source: ImageInput) -> Image.Image:
    """A greyscale ("L") mask from a path or a PIL image (colour masks by luminance)."""
    image = _open(source, "mask")
    return to_8bit(ImageOps.exif_transpose(image) or image).convert("L")


def _open(source: ImageInput, what: str) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    if not isinstance(source, str | Path):
        raise UserError(f"{what} must be a file path or a PIL image, got {type(source).__name__}")
    try:
        with warnings.catch_warnings():  # Pillow warns between its limit and twice it: refused below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as image:  # reads the header only: the size is known before decoding
                check_pixels(image.size, what, source)
                image.load()
                return image
    except FileNotFoundError:
        raise UserError(f"cannot read {what} {str(source)!r}: no such file") from None
    except Image.DecompressionBombError:
        raise UserError(
            f"{what} {str(source)!r} has more than {max_pixels()} pixels (PIL.Image.MAX_IMAGE_PIXELS); "
            "give a smaller image"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError) as error:
        if isinstance(error, UserError):
            raise
        raise UserError(f"cannot read {what} {str(source)!r}: {error}") from None


def max_pixels() -> int:
    """The most pixels an input image may have: Pillow's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``,
    about 89 million, e.g. 9459x9459), or 2**28 when that check is turned off."""
    limit = Image.MAX_IMAGE_PIXELS
    return int(limit) if limit else 2**28


def check_pixels(size: tuple[int, int], what: str, source: ImageInput) -> None:
    """Refuse an image from its header's size, before its pixels are decoded (a small file can claim
    to be gigapixels: PNG and WebP compress a blank plane about 1000 to 1)."""
    width, height = size
    if width * height > max_pixels():
        raise UserError(
            f"{what} {str(source)!r} is {width}x{height}, more than {max_pixels()} pixels "
            "(PIL.Image.MAX_IMAGE_PIXELS); give a smaller image"
        )


def to_8bit(image: Image.Image) -> Image.Image:
    """16- and 32-bit integer images (modes I, I;16) scaled to 8 bits instead of clipped."""
    if image.mode not in ("I", "I;16", "I;16B", "I;16L", "F"):
        return image
    array = np.asarray(image, dtype=np.float64)
    top = 255.0 if array.max(initial=0) <= 255 else (65535.0 if array.max() <= 65535 else array.max())
    return Image.fromarray(np.clip(array / top * 255 + 0.5, 0, 255).astype(np.uint8), mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB (palette, greyscale, CMYK converted; transparency dropped)."""
    return to_8bit(image).convert("RGB") if image.mode != "RGB" else image


def round_down(image: Image.Image, multiple: int = 8, what: str = "image") -> Image.Image:
    """Cut the right and bottom edges so both sides are multiples of ``multiple`` (warns when it cuts)."""
    width, height = image.size
    w, h = width - width % multiple, height - height % multiple
    if w < multiple or h < multiple:
        raise UserError(f"{what} is {width}x{height}; each side must be at least {multiple} pixels")
    if (w, h) != (width, height):
        warnings.warn(
            f"{what} is {width}x{height}, not a multiple of {multiple}: cropped to {w}x{h} (right/bottom)",
            UserWarning,
            stacklevel=2,
        )
        image = image.crop((0, 0, w, h))
    return image


def fit_mask(mask: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The mask at the image's size: kept if equal, resized (with a warning) if only the scale differs
    (aspect ratios within 1%), refused otherwise."""
    if mask.size == size:
        return mask
    (mw, mh), (w, h) = mask.size, size
    if abs(math.log((mw / mh) / (w / h))) > 0.01:
        raise UserError(
            f"mask is {mw}x{mh} but the image is {w}x{h}: give a mask of the image's size or aspect ratio"
        )
    warnings.warn(f"mask is {mw}x{mh}, resized to the image's {w}x{h}", UserWarning, stacklevel=2)
    return mask.resize(size, Image.Resampling.BILINEAR)


def images_to_tensor(images: list[Image.Image], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """RGB images of one size -> [N, 3, H, W] in [-1, 1] (x / 127.5 - 1, computed as diffusers does)."""
    array = np.stack([np.asarray(image, dtype=np.float32) / 255.0 for image in images])  # [N, H, W, 3]
    tensor = torch.from_numpy(array).permute(0, 3, 1, 2) * 2.0 - 1.0
    return tensor.to(device=device, dtype=dtype)


def mask_to_tensor(mask: Image.Image, device: torch.device, invert: bool = False) -> torch.Tensor:
    """Greyscale mask -> [1, 1, H, W] of 0 (keep) and 1 (repaint): binarised at 0.5, optionally inverted."""
    values = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)
    binary = (values >= 0.5).float()
    binary = 1.0 - binary if invert else binary
    return binary[None, None].to(device)


def latent_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """[.., H, W] pixel mask -> [.., H/f, W/f]: a latent cell is repainted if any of its pixels is."""
    return F.max_pool2d(mask, factor) if factor > 1 else mask


def gaussian_blur(mask: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [N, 1, H, W] with standard deviation ``sigma`` pixels, truncated at
    3 sigma (so pixels further than that from the mask stay exactly 0); edges replicated."""
    if sigma <= 0:
        return mask
    radius = math.ceil(3 * sigma)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32, device=mask.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    x = F.pad(mask, (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    return F.conv2d(x, kernel.view(1, 1, -1, 1))


def feather(mask: torch.Tensor, blur: float) -> torch.Tensor:
    """Paste-back opacity of the generated image: 1 on the mask, falling off outside it over the blur."""
    return torch.maximum(gaussian_blur(mask, blur), mask)


def composite(original: Image.Image, generated: Image.Image, alpha: torch.Tensor) -> Image.Image:
    """alpha * generated + (1 - alpha) * original per pixel; where alpha is 0 the original comes back
    exactly. alpha: [1, 1, H, W] or [H, W] in [0, 1]."""
    a = alpha.reshape(alpha.shape[-2:]).cpu().numpy()[..., None]
    mixed = a * np.asarray(generated, dtype=np.float32) + (1 - a) * np.asarray(original, dtype=np.float32)
    return Image.fromarray(np.clip(np.rint(mixed), 0, 255).astype(np.uint8))


def mask_box(mask: torch.Tensor) -> Box | None:
    """The bounding box of the nonzero pixels of [.., H, W], or None for an empty mask."""
    plane = mask.reshape(mask.shape[-2:]) > 0
    rows, cols = plane.any(dim=1).nonzero(), plane.any(dim=0).nonzero()
    if len(rows) == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def pad_box(box: Box, padding: int, size: tuple[int, int]) -> Box:
    """``box`` grown by ``padding`` pixels on every side, clipped to an image of ``size``."""
    left, top, right, bottom = box
    width, height = size
    return (
        max(0, left - padding),
        max(0, top - padding),
        min(width, right + padding),
        min(height, bottom + padding),
    )


def extend_canvas(image: Image.Image, left: int, right: int, top: int, bottom: int) -> Image.Image:
    """A larger canvas with ``image`` at (left, top) and its edge pixels stretched over the new area."""
    array = np.asarray(image)
    padded = np.pad(array, ((top, bottom), (left, right), (0, 0)), mode="edge")
    return Image.fromarray(padded)
