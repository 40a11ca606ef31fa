"""Progress previews: the linear latent previewer (fit, output), a trained preview decoder carried in a
model folder, and the preview callback of generate."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from latentdiffusion.pipelines.preview import LatentPreviewer, fit_previewer, previewer_for


class LinearCodec(nn.Module):
    """An encoder whose latents are exactly an affine code of each 4x4 patch's mean colour."""

    def __init__(self) -> None:
        super().__init__()
        self.code = nn.Parameter(
            torch.tensor([[1.0, -0.5, 0.2], [0.1, 0.8, -0.3], [0.0, 0.3, 0.9], [0.5, 0.5, 0.5]])
        )
        self.offset = torch.tensor([0.1, -0.2, 0.3, 0.0])

    def to_latent(self, images: torch.Tensor) -> torch.Tensor:
        colours = F.avg_pool2d(images, 4)  # [N, 3, h, w]
        return torch.einsum("lc,nchw->nlhw", self.code, colours) + self.offset[None, :, None, None]


def test_fit_inverts_a_linear_code() -> None:
    codec = LinearCodec()
    previewer = fit_previewer(codec, factor=4)
    images = F.interpolate(torch.rand(2, 3, 3, 3) * 1.6 - 0.8, size=(32, 32), mode="bilinear")
    with torch.no_grad():
        latents = codec.to_latent(images)
    torch.testing.assert_close(previewer.to_rgb(latents), F.avg_pool2d(images, 4), atol=1e-4, rtol=1e-4)


def test_preview_images_have_latent_size_and_range() -> None:
    previewer = LatentPreviewer(weight=torch.randn(3, 4) * 10, bias=torch.zeros(3))
    latents = torch.randn(3, 4, 6, 5)
    rgb = previewer.to_rgb(latents)
    assert rgb.shape == (3, 3, 6, 5) and rgb.min() >= -1 and rgb.max() <= 1
    images = previewer(latents, scale=2)
    assert len(images) == 3 and images[0].size == (10, 12) and images[0].mode == "RGB"


def test_generate_hands_previews_to_the_callback(tiny_pipeline) -> None:
    seen, steps = [], []
    images = tiny_pipeline.generate(
        ["a", "b"],
        steps=3,
        width=32,
        height=48,
        preview=lambda step, total, previews: seen.append((step, total, [p.size for p in previews])),
        callback=lambda step, total, x, x0: steps.append(step),
    )
    assert len(images) == 2 and steps == [1, 2, 3]
    assert seen == [(i, 3, [(32, 48), (32, 48)]) for i in (1, 2, 3)]  # previews at the image's size
    assert previewer_for(tiny_pipeline.components) is previewer_for(tiny_pipeline.components)  # fitted once


def test_a_model_with_a_preview_decoder_previews_through_it(tmp_path) -> None:
    import warnings

    from latentdiffusion.checkpoints.native import load_native, save_native
    from latentdiffusion.components import build_components
    from latentdiffusion.config import TINY
    from latentdiffusion.models.preview_decoder import PREVIEW_FILE, PreviewDecoder
    from latentdiffusion.pipelines.pipeline import Pipeline
    from latentdiffusion.pipelines.preview import DecoderPreviewer

    components = build_components(TINY)
    factor = TINY.autoencoder.downsampling_factor
    components.preview_decoder = PreviewDecoder(TINY.autoencoder.latent_channels, factor, channels=8)
    save_native(components, tmp_path / "model")
    loaded = load_native(tmp_path / "model")
    previewer = previewer_for(loaded)
    assert isinstance(previewer, DecoderPreviewer)
    latents = torch.randn(1, TINY.autoencoder.latent_channels, 6, 5)
    expected = components.preview_decoder(latents).clamp(-1, 1)
    got = torch.tensor(list(previewer(latents, scale=factor)[0].getdata()), dtype=torch.float32)
    got = got.view(6 * factor, 5 * factor, 3).permute(2, 0, 1) / 127.5 - 1
    assert (got - expected[0]).abs().max() <= 2 / 255 + 1e-3  # fp16 weights, 8-bit output
    seen = []
    Pipeline(loaded).generate(
        "a", steps=1, width=32, height=16, preview=lambda s, n, p: seen.append(p[0].size)
    )
    assert seen == [(32, 16)]

    (tmp_path / "model" / PREVIEW_FILE).write_bytes(b"not safetensors")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert load_native(tmp_path / "model").preview_decoder is None
    assert any(PREVIEW_FILE in str(w.message) for w in caught)
