"""Image reconstruction metrics: PSNR and SSIM (Wang et al. 2004).

Both take batches [N, C, H, W] on the same scale (``data_range`` = max - min of that scale: 2.0 for
images in [-1, 1], 1.0 for [0, 1], 255 for 8-bit) and return one value per image, [N].

They sit below both ``training`` (validation scores) and ``evaluation`` (which builds on trained models
and the training data), so neither package imports the other in a circle.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SSIM_K1, SSIM_K2 = 0.01, 0.03  # Wang et al. 2004, Eq. 13
SSIM_WINDOW, SSIM_SIGMA = 11, 1.5  # Gaussian window of Wang et al. 2004, Sec. III-C


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """10 log10(range^2 / MSE) per image, in dB (infinite for identical images)."""
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(dim=1)
    return (10.0 * torch.log10(data_range**2 / mse)).float()


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Normalised 1-D Gaussian [size], float64."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def _blur(x: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter per channel, 'valid' (no padding), as the reference implementation."""
    channels = x.shape[1]
    kx = window.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    ky = window.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    return F.conv2d(F.conv2d(x, kx, groups=channels), ky, groups=channels)


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Mean structural similarity per image (Wang et al. 2004, Eq. 13, Gaussian 11x11 window, sigma 1.5),
    averaged over channels and valid window positions. Computed in float64."""
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(
            f"ssim needs two [N, C, H, W] batches of one shape, got {tuple(x.shape)}, {tuple(y.shape)}"
        )
    if min(x.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"ssim needs images at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {tuple(x.shape[-2:])}")
    x, y = x.double(), y.double()
    window = gaussian_window().to(x.device)
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    mu_x, mu_y = _blur(x, window), _blur(y, window)
    var_x = _blur(x * x, window) - mu_x**2
    var_y = _blur(y * y, window) - mu_y**2
    cov = _blur(x * y, window) - mu_x * mu_y
    numerator = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    denominator = (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    return (numerator / denominator).flatten(1).mean(dim=1).float()
