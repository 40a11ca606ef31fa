import math

import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

from latentdiffusion.evaluation.reconstruction import (
    flat_regions,
    flatness,
    masked_psnr,
    object_mask,
    square_corners,
)


def _two_squares() -> torch.Tensor:
    """A 24x24 gray image with a red 6x6 square and a blue 8x8 square, in [-1, 1]."""
    x = torch.full((1, 3, 24, 24), 0.0)
    x[0, :, 3:9, 3:9] = torch.tensor([1.0, -1.0, -1.0])[:, None, None]
    x[0, :, 12:20, 12:20] = torch.tensor([-1.0, -1.0, 1.0])[:, None, None]
    return x


def test_object_mask_and_masked_psnr_count_only_object_pixels():
    x = _two_squares()
    mask = object_mask(x)
    assert mask.sum().item() == 36 + 64
    y = x.clone()
    y[0, :, 0, 0] += 0.5  # a background error: invisible to the object PSNR
    assert masked_psnr(x, y, mask) == math.inf
    y[0, 0, 4, 4] -= 0.2  # one channel of one object pixel: MSE 0.04 / (100 pixels * 3 channels)
    assert masked_psnr(x, y, mask) == pytest.approx(10 * math.log10(4 / (0.04 / 300)))


def test_flat_regions_erode_objects_and_keep_the_background_away_from_them():
    regions = flat_regions(_two_squares(), inset=2)[0]
    background, red, blue = regions
    assert red.sum().item() == 2 * 2 and blue.sum().item() == 4 * 4  # 6x6 and 8x8 eroded by 2 px per side
    assert not background[1:11, 1:11].any() and background[0, 23]  # 2 px around the red square excluded
    assert not (background & (red | blue)).any()


def test_flatness_is_zero_on_flat_fills_and_the_rms_deviation_otherwise():
    x = _two_squares()
    regions = flat_regions(x)
    assert flatness(x, regions) == (0.0, 0.0)
    y = x.clone()
    y[0, :, 14:18, 14:18] += torch.tensor([[1.0, -1.0], [-1.0, 1.0]]).repeat(2, 2) * 0.1  # checkerboard
    objects, background = flatness(y, regions)
    # the blue square's 16 flat pixels deviate by +-0.1 (12.75 on 0-255); the red square's 4 do not
    assert objects == pytest.approx(12.75 * math.sqrt(16 / 20)) and background == 0.0


def test_square_corners_is_one_for_sharp_or_blurred_squares_and_lower_for_rounded_ones():
    sharp = Image.new("RGB", (64, 64), (40, 80, 220))
    sharp.paste((245, 245, 245), (20, 20, 44, 44))
    blurred = sharp.filter(ImageFilter.GaussianBlur(0.7))  # blur keeps a rectangle's coverage separable
    rounded = Image.new("RGB", (64, 64), (40, 80, 220))
    ImageDraw.Draw(rounded).rounded_rectangle((20, 20, 43, 43), radius=6, fill=(245, 245, 245))
    corners = square_corners([sharp, blurred, rounded])
    assert corners[:2] == pytest.approx([1.0, 1.0], abs=0.02)
    assert corners[2] < 0.93  # below the strict checker's limit of 0.95 (radius 5 gives 0.950)
