"""How faithfully a first stage redraws shapes-world images: measures of a reconstruction y of images x
(both [N, 3, H, W] in [-1, 1]) that a whole-image PSNR hides, because the objects are a small share of
the pixels and their edges, corners and fills are what a person looks at.

- ``object_mask``: the pixels whose colour differs from the background (the top-left pixel: the world
  keeps a 2 px background frame), edges and anti-aliasing included;
- ``masked_psnr``: PSNR over a mask's pixels only (object-pixel PSNR);
- ``flat_regions`` / ``flatness``: the fills' and the background's pixels away from every edge (objects
  eroded, background kept away from objects, by ``inset`` px); the root-mean-square deviation of the
  reconstruction from its own mean in each such region, on the 0-255 scale (the data's is 0): texture,
  grids and colour gradients inside a fill all raise it;
- ``square_corners``: the strict checker's corner measure (``shapes_checker``: mass in a square's
  corner patches over that of a sharp-cornered rectangle with the same row and column profiles; about 1
  for a sharp square, lower for rounded corners), for each square found.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

OBJECT_THRESHOLD = 0.1  # summed |colour - background| over channels (images in [-1, 1])
FLAT_INSET = 2  # px between a flat region and the nearest edge


def object_mask(x: torch.Tensor, threshold: float = OBJECT_THRESHOLD) -> torch.Tensor:
    """[N, 1, H, W] bool: pixels whose colour differs from the image's top-left pixel."""
    return (x - x[:, :, :1, :1]).abs().sum(dim=1, keepdim=True) > threshold


def masked_psnr(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, data_range: float = 2.0) -> float:
    """PSNR in dB over the pixels (all channels) where ``mask`` [N, 1, H, W] is set, pooled over images."""
    weights = mask.to(x.dtype).expand_as(x)
    mse = (((x - y) ** 2) * weights).sum() / weights.sum().clamp(min=1)
    return float(10 * torch.log10(data_range**2 / mse)) if mse > 0 else float("inf")


def _erode(mask: torch.Tensor, steps: int) -> torch.Tensor:
    """Pixels of ``mask`` [N, 1, H, W] whose 3x3 neighbourhood lies in it, ``steps`` times; the image's
    border is no edge (the mask is extended beyond it)."""
    eroded = mask.float()
    for _ in range(steps):
        eroded = -F.max_pool2d(-F.pad(eroded, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return eroded > 0.5


def flat_regions(x: torch.Tensor, inset: int = FLAT_INSET) -> list[list[torch.Tensor]]:
    """Per image, boolean [H, W] masks of its flat regions: the background ``inset`` px away from every
    object, and each object (connected component of ``object_mask``) eroded by ``inset`` px; empty
    regions are left out."""
    from latentdiffusion.evaluation.shapes_checker import label_components

    objects = object_mask(x)
    background = _erode(~objects, inset)
    regions = []
    for i in range(x.shape[0]):
        labels = torch.from_numpy(label_components(objects[i, 0].numpy()))
        masks = [background[i, 0]]
        for label in range(int(labels.max()) + 1):
            masks.append(_erode((labels == label)[None, None], inset)[0, 0])
        regions.append([m for m in masks if m.any()])
    return regions


def flatness(y: torch.Tensor, regions: list[list[torch.Tensor]]) -> tuple[float, float]:
    """(objects, background): the root-mean-square deviation (0-255 scale) of ``y`` from its mean inside
    each flat region, pooled over the pixels of all object regions and of all background regions."""
    sums, counts = [0.0, 0.0], [0, 0]
    for image, masks in zip(y, regions, strict=True):
        for index, mask in enumerate(masks):
            values = image[:, mask] * 127.5  # [3, pixels] on the 0-255 scale
            kind = 0 if index else 1  # the first region of each image is its background
            sums[kind] += float(((values - values.mean(dim=1, keepdim=True)) ** 2).sum() / 3)
            counts[kind] += mask.sum().item()
    return tuple(float(np.sqrt(s / max(c, 1))) for s, c in zip(sums, counts, strict=True))


def square_corners(images: list[Image.Image]) -> list[float]:
    """The strict checker's corner measure of every object it reads as a square in ``images``."""
    from latentdiffusion.evaluation.shapes_checker import analyse

    return [
        d.measures["corners"]
        for image in images
        for d in analyse(image).detections
        if d.shape == "square" and d.measures and "corners" in d.measures
    ]
