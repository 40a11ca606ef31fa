"""Hint maps for ControlNet training: the shapes world's layout map, and hints computed from images.

The layout map (the hint of the shipped layout ControlNet) is the scene drawn flat: a 64x64 RGB image on
the background's palette colour in which each object's region is painted with its own palette colour
(``training.shapes.COLOURS``), with hard edges. A pixel belongs to the last-drawn object that covers at
least half of it (``shapes.coverage``), so the map holds palette colours only. The map therefore says
where each object is, its shape (the region's outline), its colour and the background's colour; a user
draws one with any paint program (filled circles, squares and upright triangles in the palette colours
on a background colour), and the ``seg_shapes`` preprocessor snaps a drawing in approximate colours to
the palette.

A training item of a ControlNet run is a tensor [6, H, W] in [-1, 1]: the image's three channels, then
the hint's (``split_item``), so that it travels through the loop's data pipeline (which passes ready-made
tensors through unchanged) with no new batch fields.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from latentdiffusion.training.data import Source, image_to_tensor, resize_and_crop, to_rgb
from latentdiffusion.training.shapes import COLOURS, IMAGE_SIZE, Scene, ShapesDataset, coverage, render

LAYOUT_HINT = "shapes-layout"  # the hint kind of the layout ControlNet (and its data set's name)
COVERED = 0.5  # an object owns a pixel of the layout map once it covers at least this fraction of it


def layout_mask(obj) -> np.ndarray:
    """[64, 64] bool: the pixels the object ``obj`` (a ``ShapeSpec``) owns in a layout map."""
    return coverage(obj) >= COVERED


def layout_map(scene: Scene) -> Image.Image:
    """The scene's layout map (module docstring): flat palette colours, hard edges."""
    pixels = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    pixels[:] = COLOURS[scene.background]
    for obj in scene.objects:
        pixels[layout_mask(obj)] = COLOURS[obj.colour]
    return Image.fromarray(pixels)


def join_item(image: Image.Image, hint: Image.Image) -> torch.Tensor:
    """[6, H, W] in [-1, 1]: the image's channels, then the hint's."""
    return torch.cat([image_to_tensor(image.convert("RGB")), image_to_tensor(hint.convert("RGB"))])


def split_item(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch [n, 6, H, W] in [-1, 1] -> (images [n, 3, H, W] in [-1, 1], hints [n, 3, H, W] in [0, 1],
    the range ControlNets take their hints in)."""
    return x[:, :3], (x[:, 3:] + 1) / 2


def object_weights(hints: torch.Tensor, size: int, weight: float) -> torch.Tensor:
    """[n, 1, size, size]: per-latent-pixel loss weights for layout-map hints [n, 3, H, W] in [0, 1].
    A latent pixel whose patch of the map holds any object pixel (a colour other than the corner's: the
    shapes world keeps objects off the edges, so the corner is background) weighs ``weight`` times a
    background one; each item's weights are scaled to mean 1, so the loss keeps its scale. Small objects,
    a few latent pixels each, otherwise count little beside the flat background."""
    background = hints[:, :, :1, :1]
    objects = (hints - background).abs().amax(dim=1, keepdim=True) > 0.5 / 255
    covered = torch.nn.functional.adaptive_max_pool2d(objects.float(), size)
    weights = 1 + (weight - 1) * covered
    return weights / weights.mean(dim=(1, 2, 3), keepdim=True)


class ShapesLayoutSource:
    """The shapes world as (image + layout map, caption) items; item ``i`` is the shapes data set's item
    ``i`` (same scenes and captions), so runs are as reproducible as the diffusion task's. At another
    ``resolution`` than 64 the image is resized bicubically (as the loop's preparation does), the map
    with nearest neighbour (it keeps palette colours only)."""

    def __init__(
        self,
        seed: int = 0,
        size: int | None = None,
        relational_fraction: float = 0.5,
        resolution: int = IMAGE_SIZE,
    ) -> None:
        self.dataset = ShapesDataset(seed, relational_fraction=relational_fraction)
        self.size, self.resolution = size, resolution

    def load(self, index: int) -> tuple[torch.Tensor, str]:
        scene, text = self.dataset.scene_and_caption(index)
        image, hint = render(scene), layout_map(scene)
        if self.resolution != IMAGE_SIZE:
            side = (self.resolution, self.resolution)
            image = image.resize(side, Image.Resampling.BICUBIC)
            hint = hint.resize(side, Image.Resampling.NEAREST)
        return join_item(image, hint), text


class PreprocessedSource:
    """Any captioned source with hints computed from its images by a ControlNet preprocessor
    (``pipelines.preprocessors``, e.g. canny): each image is resized and cropped to ``resolution`` first,
    as the loop's preparation would, then joined with its hint."""

    def __init__(self, source: Source, preprocessor: str, resolution: int, center_crop: bool = True) -> None:
        from latentdiffusion.pipelines.preprocessors import find_preprocessor

        self.source, self.preprocessor = source, find_preprocessor(preprocessor)
        self.resolution, self.center_crop = resolution, center_crop
        self.size = source.size

    def load(self, index: int) -> tuple[torch.Tensor, str]:
        from latentdiffusion.pipelines.preprocessors import Inputs

        image, text = self.source.load(index)
        if not isinstance(image, Image.Image):
            image = Image.fromarray(((image.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy())
        image = resize_and_crop(to_rgb(image), self.resolution, self.center_crop)
        a, b = (
            p.default if p else 0.0 for p in (self.preprocessor.threshold_a, self.preprocessor.threshold_b)
        )
        hint = self.preprocessor.run(np.asarray(image), Inputs(a, b, index, None))
        return join_item(image, Image.fromarray(hint[:, :, :3])), text
