"""Training losses: the first stage's adversarial terms and the diffusion objective's weighting.

- PatchGAN discriminator (Isola et al. 2017, Sec. 3.2.2) and hinge loss (Lim & Ye 2017), as the first
  stage of latent diffusion uses them (Esser et al. 2021, Sec. 3.1; Rombach et al. 2022, App. G);
- the adaptive weight lambda = ||grad L_rec|| / (||grad L_GAN|| + delta) (Esser et al. 2021, Eq. 7);
- edge-weighted L1 and an image-gradient L1 for the first stage's reconstruction term (sharp edges and
  corners, flat fills: the gradient-difference loss of Mathieu et al. 2016, Eq. 5, with alpha = 1);
- min-SNR-gamma loss weighting (Hang et al. 2023, Eq. 7 and its v-prediction form).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from latentdiffusion.errors import UserError

ADAPTIVE_WEIGHT_DELTA = 1e-4  # delta of Esser et al. 2021, Eq. 7
ADAPTIVE_WEIGHT_MAX = 1e4


class DiscriminatorBlock(nn.Module):
    """4x4 conv (stride 2 or 1), GroupNorm, LeakyReLU(0.2)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 4, stride=stride, padding=1, bias=False)
        # GroupNorm instead of pix2pix's BatchNorm: no batch statistics, so results do not depend on how
        # a global batch is split across processes.
        self.norm = nn.GroupNorm(min(32, out_channels // 4) or 1, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(self.norm(self.conv(x)), 0.2)


class PatchDiscriminator(nn.Module):
    """Image [N, C, H, W] -> real/fake logits per overlapping patch [N, 1, h, w] (pix2pix's N-layer
    PatchGAN: the channels double per layer up to 8x, the last two convs have stride 1)."""

    def __init__(self, in_channels: int = 3, channels: int = 64, num_layers: int = 3) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, channels, 4, stride=2, padding=1)
        widths = [channels * min(2**i, 8) for i in range(num_layers + 1)]
        strides = [2] * (num_layers - 1) + [1]
        self.blocks = nn.ModuleList(
            DiscriminatorBlock(widths[i], widths[i + 1], strides[i]) for i in range(num_layers)
        )
        self.conv_out = nn.Conv2d(widths[-1], 1, 4, stride=1, padding=1)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.conv_in(x), 0.2)
        for block in self.blocks:
            h = block(h)
        return self.conv_out(h)


def _init_weights(module: nn.Module) -> None:
    # DCGAN initialisation (Radford et al. 2016, Sec. 4), as pix2pix and taming-transformers use it.
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.GroupNorm):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(G(z)))]) (Lim & Ye 2017, Eq. 6)."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """-E[D(G(z))]: the generator side of the hinge game."""
    return -logits_fake.mean()


def adaptive_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """lambda = ||grad_{G_L} L_rec|| / (||grad_{G_L} L_GAN|| + delta), G_L the decoder's last layer
    (Esser et al. 2021, Eq. 7); detached, clamped to [0, 1e4]."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (gan_grad.norm() + ADAPTIVE_WEIGHT_DELTA)
    return weight.clamp(0.0, ADAPTIVE_WEIGHT_MAX).detach()


EDGE_THRESHOLD = 0.05  # a neighbour differing by more than this (images in [-1, 1]) marks an edge


def image_gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Finite differences of [N, C, H, W] images along width [N, C, H, W-1] and height [N, C, H-1, W]."""
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


def edge_mask(x: torch.Tensor, radius: int) -> torch.Tensor:
    """[N, 1, H, W] float mask of the pixels within ``radius`` px (Chebyshev) of an edge of ``x``: a pixel
    is on an edge where any channel differs from its right or lower neighbour by more than
    ``EDGE_THRESHOLD``; both pixels of such a pair count."""
    dx, dy = (g.abs().amax(dim=1, keepdim=True) > EDGE_THRESHOLD for g in image_gradients(x))
    edges = torch.zeros_like(x[:, :1], dtype=torch.bool)
    edges[..., :, 1:] |= dx
    edges[..., :, :-1] |= dx
    edges[..., 1:, :] |= dy
    edges[..., :-1, :] |= dy
    mask = edges.to(x.dtype)
    return F.max_pool2d(mask, 2 * radius + 1, stride=1, padding=radius) if radius > 0 else mask


def edge_weighted_l1(x: torch.Tensor, y: torch.Tensor, edge_weight: float, radius: int) -> torch.Tensor:
    """Weighted mean of |x - y| with weight 1 + ``edge_weight`` near the edges of the target ``x``
    (``edge_mask``); plain mean L1 at weight 0. Normalised by the mean weight, so the term keeps the
    scale of L1 while edges and corners, a small share of the pixels of flat images, count more."""
    if edge_weight == 0:
        return (x - y).abs().mean()
    weights = 1.0 + edge_weight * edge_mask(x, radius)
    return ((x - y).abs() * weights).mean() / weights.mean()


def gradient_l1(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """mean |d_w x - d_w y| + mean |d_h x - d_h y| (Mathieu et al. 2016, Eq. 5 with alpha = 1): zero only
    where the reconstruction's edges and flat stretches are the target's, so texture inside a flat fill
    and a blurred edge are both penalised."""
    return sum(
        ((gx - gy).abs().mean() for gx, gy in zip(image_gradients(x), image_gradients(y), strict=True)),
        x.new_zeros(()),
    )


def vp_x0_eps(prediction_type: str, z: torch.Tensor, prediction: torch.Tensor, alpha_bar: torch.Tensor):
    """(x0, eps) of a VP sample z = sqrt(a) x0 + sqrt(1 - a) eps from the network's prediction; ``alpha_bar``
    broadcasts against z. v = sqrt(a) eps - sqrt(1 - a) x0 (Salimans & Ho 2022)."""
    a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    if prediction_type == "v_prediction":
        return a * z - s * prediction, s * z + a * prediction
    if prediction_type == "epsilon":
        return (z - s * prediction) / a, prediction
    if prediction_type == "sample":
        return prediction, (z - a * prediction) / s
    raise UserError(f"this objective needs an eps, v or x0 model on a VP schedule, not {prediction_type!r}")


def snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) of a VP timestep (Kingma et al. 2021, Eq. 3)."""
    return alphas_cumprod / (1.0 - alphas_cumprod)


def shift_timesteps(fraction: torch.Tensor, shift: float) -> torch.Tensor:
    """Map uniform timestep fractions in [0, 1) towards high noise: s f / (1 + (s - 1) f), the timestep
    shift of Esser et al. 2024 (SD3, Sec. 5.3.2). shift 1 keeps them; shift 3 puts half of them above 0.75."""
    return shift * fraction / (1.0 + (shift - 1.0) * fraction)


def min_snr_weight(alphas_cumprod: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample loss weight of Min-SNR-gamma (Hang et al. 2023, Sec. 3.4).

    The x0 loss weighted by min(SNR, gamma) becomes, on the network's own target,
    min(SNR, gamma) / SNR for eps and min(SNR, gamma) / (SNR + 1) for v. Written as min(1, gamma / SNR)
    for eps so that a zero-terminal-SNR step (SNR = 0) gets weight 1 rather than 0 / 0. For the rectified
    flow's velocity (x0 = x_t - t v, so the x0 error is t times the v error) it is min(SNR, gamma) t^2 with
    t = 1 / (1 + sqrt(SNR)).
    """
    ratio = snr(alphas_cumprod.double())
    if prediction_type == "flow":
        t = 1.0 / (1.0 + ratio.sqrt())
        return (ratio.clamp(max=gamma) * t**2).float()
    if prediction_type == "epsilon":
        weight = (gamma / ratio).clamp(max=1.0)
    elif prediction_type == "v_prediction":
        weight = ratio.clamp(max=gamma) / (ratio + 1.0)
    else:  # x0 target: the weight is min(SNR, gamma) itself
        weight = ratio.clamp(max=gamma)
    return weight.float()
