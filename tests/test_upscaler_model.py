"""The shipped x4 upscaler (src/latentdiffusion/data/upscaler, installed after the `shapes-upscaler` run):
it loads offline by name and its outputs, shrunk back, give its inputs again (a super-resolution model must
be consistent with its input; a broken engine or an untrained model is not: 12-18 dB after 40-90 steps)."""

import pytest
from PIL import Image

import latentdiffusion as ld
from latentdiffusion.checkpoints.native import NATIVE_CONFIG
from latentdiffusion.metrics import psnr
from latentdiffusion.pipelines.loading import shipped_model_dir
from latentdiffusion.training.shapes import ShapesDataset, images_to_tensor
from latentdiffusion.training.upscaler import downsample

pytestmark = pytest.mark.skipif(
    not (shipped_model_dir("upscaler") / NATIVE_CONFIG).is_file(), reason="no upscaler is installed"
)

MINIMUM_CONSISTENCY_DB = 25.0  # the shipped upscaler (1800 steps) scores 26.7 dB on these four images


def test_shipped_upscaler_output_is_consistent_with_its_input():
    pipe = ld.load("upscaler")
    scores = []
    for image, caption in (ShapesDataset(2024)[i] for i in range(4)):  # not the training stream (seed 0)
        low = image.convert("RGB").resize((16, 16), Image.Resampling.BICUBIC)
        upscaled = pipe.upscale(low, caption, seed=0)[0]
        assert upscaled.size == (64, 64)
        scores.append(psnr(downsample(images_to_tensor([upscaled]), 4), images_to_tensor([low])).item())
    assert sum(scores) / len(scores) >= MINIMUM_CONSISTENCY_DB, scores
