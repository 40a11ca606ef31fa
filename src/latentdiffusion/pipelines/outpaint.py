"""Outpainting: extend the canvas and inpaint the new area.

The image (sides rounded down to multiples of 8) is placed on a canvas larger by ``left``, ``right``,
``top`` and ``bottom`` pixels (each a multiple of 8); the new area starts as the image's edge pixels
stretched outwards and is repainted with ``inpaint`` under a mask that is white exactly there. With
paste-back on, the original pixels come back unchanged except for the feathered seam.
"""

from __future__ import annotations

from dataclasses import replace

from PIL import Image

from latentdiffusion.components import Components
from latentdiffusion.errors import UserError
from latentdiffusion.pipelines.images import extend_canvas, round_down
from latentdiffusion.pipelines.inpaint import MaskOptions, inpaint
from latentdiffusion.pipelines.request import Request
from latentdiffusion.pipelines.text_to_image import size_multiple


def validate_extension(sides: dict[str, int], multiple: int) -> None:
    for name, value in sides.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value % multiple:
            raise UserError(f"{name} must be a whole multiple of {multiple} pixels >= 0, got {value!r}")
    if not any(sides.values()):
        raise UserError("give at least one of left, right, top, bottom to extend the image by")


def outpaint_mask(size: tuple[int, int], left: int, top: int, inner: tuple[int, int]) -> Image.Image:
    """White over the canvas, black over the original image placed at (left, top)."""
    mask = Image.new("L", size, 255)
    mask.paste(0, (left, top, left + inner[0], top + inner[1]))
    return mask


def outpaint(
    components: Components,
    image: Image.Image,
    request: Request,
    *,
    left: int,
    right: int,
    top: int,
    bottom: int,
    strength: float,
    mask_options: MaskOptions,
) -> list[Image.Image]:
    """One extended image per (prompt, negative prompt, seed) of ``request``."""
    f = size_multiple(components)
    validate_extension({"left": left, "right": right, "top": top, "bottom": bottom}, f)
    image = round_down(image, f)
    canvas = extend_canvas(image, left, right, top, bottom)
    mask = outpaint_mask(canvas.size, left, top, image.size)
    mask_options = replace(mask_options, invert=False)
    return inpaint(components, canvas, mask, request, strength=strength, mask_options=mask_options)
