import math

import numpy as np
import pytest
import torch
from scipy.ndimage import correlate1d

from latentdiffusion.metrics import gaussian_window, psnr, ssim


def reference_ssim(x: np.ndarray, y: np.ndarray, data_range: float) -> float:
    """Wang et al. 2004 written independently with scipy: Gaussian-filtered moments, valid region."""
    window = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
    window /= window.sum()

    def blur(a):
        return correlate1d(correlate1d(a, window, axis=0, mode="constant"), window, axis=1, mode="constant")[
            5:-5, 5:-5
        ]

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for a, b in zip(x, y, strict=True):  # channels
        mu_a, mu_b = blur(a), blur(b)
        var_a, var_b = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2
        cov = blur(a * b) - mu_a * mu_b
        s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
        values.append(s.mean())
    return float(np.mean(values))


def test_psnr_of_a_known_error():
    x = torch.zeros(2, 3, 8, 8)
    y = x + torch.tensor([0.1, 0.2]).view(2, 1, 1, 1)
    expected = [10 * math.log10(4 / 0.01), 10 * math.log10(4 / 0.04)]
    assert psnr(x, y, data_range=2.0).tolist() == pytest.approx(expected, rel=1e-6)
    assert torch.isinf(psnr(x, x)).all()


def test_ssim_matches_an_independent_implementation():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 24, 20, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    ours = ssim(x, y, data_range=2.0)
    for i in range(2):
        assert ours[i].item() == pytest.approx(
            reference_ssim(x[i].double().numpy(), y[i].double().numpy(), 2.0), abs=1e-6
        )


def test_ssim_properties():
    x = torch.rand(1, 3, 16, 16)
    assert ssim(x, x, 1.0).item() == pytest.approx(1.0, abs=1e-6)
    noisier = [ssim(x, (x + s * torch.randn_like(x)).clamp(0, 1), 1.0).item() for s in (0.05, 0.2)]
    assert 1.0 > noisier[0] > noisier[1]
    assert gaussian_window().sum().item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8))
