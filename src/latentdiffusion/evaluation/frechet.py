"""Frechet distance on the features of a small shapes-world classifier ("FD-shapes").

FID (Heusel et al. 2017, Sec. 3) compares generated with real images by the Frechet distance between
Gaussians fitted to their Inception features (Dowson & Landau 1982):

    d^2 = |mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)).

Inception has no business judging 64x64 images of flat shapes, and no weights are downloaded here, so the
feature network is ``ShapesClassifier``: a small CNN the project trains on the shapes world to predict
each image's scene attributes (``HEADS``); the features are its penultimate layer. Distances are
comparable with each other (same classifier, same sample sizes), not with published FID values.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from latentdiffusion.training.shapes import (
    COLOURS,
    IMAGE_SIZE,
    POSITIONS,
    SHAPES,
    Scene,
    ShapesDataset,
    images_to_tensor,
)

# Attribute -> number of classes. The second object's colour and shape have a "none" class (single form).
HEADS: dict[str, int] = {
    "background": len(COLOURS),
    "form": 2,
    "colour": len(COLOURS),
    "shape": len(SHAPES),
    "size": 2,
    "position": len(POSITIONS),
    "colour2": len(COLOURS) + 1,
    "shape2": len(SHAPES) + 1,
}
WIDTHS = (16, 32, 64, 64)  # channels per stage; each stage halves the side: 64 -> 4
FEATURE_DIM = 64
WEIGHTS_FILE = "classifier.safetensors"
LOG_EVERY = 100  # training steps between progress lines


def scene_labels(scene: Scene) -> list[int]:
    """The class index of every ``HEADS`` attribute of ``scene``, in ``HEADS`` order.

    Two objects are ordered by the image, not by the caption ("A left of B" and "B right of A" show the
    same thing): the one with the smaller coordinate along the relation's axis is the first.
    """
    colours, objects = list(COLOURS), scene.objects
    if scene.relation is not None:
        axis = 0 if scene.relation in ("left of", "right of") else 1
        objects = tuple(sorted(objects, key=lambda o: o.centre[axis]))
    first, second = objects[0], objects[1] if len(objects) > 1 else None
    return [
        colours.index(scene.background),
        0 if scene.relation is None else 1,
        colours.index(first.colour),
        SHAPES.index(first.shape),
        0 if first.size == "small" else 1,
        POSITIONS.index(first.position),
        len(COLOURS) if second is None else colours.index(second.colour),
        len(SHAPES) if second is None else SHAPES.index(second.shape),
    ]


class ClassifierStage(nn.Module):
    """3x3 conv, GroupNorm, SiLU, then a stride-2 3x3 conv: [N, C_in, H, W] -> [N, C, H/2, W/2]."""

    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.norm = nn.GroupNorm(min(8, channels), channels)
        self.down = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.down(F.silu(self.norm(self.conv(x)))))


class ShapesClassifier(nn.Module):
    """Images [N, 3, 64, 64] in [-1, 1] -> one logit vector per ``HEADS`` attribute.

    Four stages take 64x64 to 4x4; the 4x4 map is flattened (so that positions survive) into a
    ``FEATURE_DIM`` hidden layer, the features; one linear layer holds every head's logits.
    """

    def __init__(self) -> None:
        super().__init__()
        inputs = (3, *WIDTHS[:-1])
        self.stages = nn.ModuleList(ClassifierStage(c_in, c) for c_in, c in zip(inputs, WIDTHS, strict=True))
        side = IMAGE_SIZE // 2 ** len(WIDTHS)
        self.hidden = nn.Linear(WIDTHS[-1] * side * side, FEATURE_DIM)
        self.heads = nn.Linear(FEATURE_DIM, sum(HEADS.values()))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate layer, [N, FEATURE_DIM]."""
        for stage in self.stages:
            x = stage(x)
        return F.silu(self.hidden(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.heads(self.features(x)).split(list(HEADS.values()), dim=1)
        return dict(zip(HEADS, logits, strict=True))


def labelled_batch(dataset: ShapesDataset, start: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Items ``start .. start + size`` of ``dataset``: images [size, 3, 64, 64] and labels [size, heads]."""
    from latentdiffusion.training.shapes import render

    scenes = [dataset.scene_and_caption(i)[0] for i in range(start, start + size)]
    x = images_to_tensor([render(scene) for scene in scenes])
    return x, torch.tensor([scene_labels(scene) for scene in scenes])


def classification_loss(logits: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """The sum over heads of the mean cross-entropy."""
    return sum(F.cross_entropy(logits[name], labels[:, i]) for i, name in enumerate(HEADS))


def train_classifier(
    steps: int, batch_size: int, *, seed: int = 0, lr: float = 2e-3, log: Callable[[str], None] | None = None
) -> ShapesClassifier:
    """Adam (Kingma & Ba 2015) with cosine decay on fresh shapes-world items (every step new ones);
    ``log`` gets a progress line every ``LOG_EVERY`` steps."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ShapesClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))
    )
    dataset = ShapesDataset(seed)
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        x, labels = labelled_batch(dataset, step * batch_size, batch_size)
        loss = classification_loss(model(x), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if log is not None and (step + 1) % LOG_EVERY == 0:
            seconds = (time.perf_counter() - start) / (step + 1)
            log(f"  classifier step {step + 1}/{steps}: loss {loss.item():.3f}, {seconds:.3f} s/step")
    return model.eval().requires_grad_(False)


@torch.no_grad()
def accuracy(model: ShapesClassifier, x: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Per-head accuracy on images ``x`` with ``labels``."""
    logits = model(x)
    return {
        name: (logits[name].argmax(1) == labels[:, i]).float().mean().item() for i, name in enumerate(HEADS)
    }


def save_classifier(model: ShapesClassifier, path: Path) -> None:
    from latentdiffusion.checkpoints.safe_io import save_safetensors

    save_safetensors({k: v.contiguous() for k, v in model.state_dict().items()}, path)


def load_classifier(path: Path) -> ShapesClassifier:
    from latentdiffusion.checkpoints.safe_io import read_state_dict

    model = ShapesClassifier()
    model.load_state_dict(read_state_dict(path, torch.float32), strict=True)
    return model.eval().requires_grad_(False)


# -------------------------------------------------------------------------------------- distance


def _batches(images: Sequence[Image.Image] | torch.Tensor, size: int) -> Iterator[torch.Tensor]:
    for start in range(0, len(images), size):
        chunk = images[start : start + size]
        x = chunk if isinstance(chunk, torch.Tensor) else images_to_tensor(list(chunk))
        if x.shape[-1] != IMAGE_SIZE:
            x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True)
        yield x


@torch.no_grad()
def image_features(
    model: ShapesClassifier, images: Sequence[Image.Image] | torch.Tensor, batch_size: int = 64
) -> np.ndarray:
    """Penultimate-layer features [N, FEATURE_DIM] (float64) of PIL images or a [-1, 1] tensor."""
    return torch.cat([model.features(x) for x in _batches(images, batch_size)]).double().numpy()


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] of features [N, D]."""
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric positive semi-definite matrix (negative rounding -> 0)."""
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """d^2 between N(mu1, sigma1) and N(mu2, sigma2) (Dowson & Landau 1982; Heusel et al. 2017, Eq. 6).

    Tr((S1 S2)^(1/2)) is computed as the sum of the square roots of the eigenvalues of the symmetric
    PSD matrix S1^(1/2) S2 S1^(1/2), which has the same eigenvalues as S1 S2: no complex round-off, and
    singular covariances (fewer samples than features) are fine.
    """
    root = _psd_sqrt(sigma1)
    middle = np.linalg.eigvalsh(root @ sigma2 @ root)
    trace_sqrt = np.sqrt(np.clip(middle, 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


def feature_distance(features: np.ndarray, reference: np.ndarray) -> float:
    """The Frechet distance between the Gaussians fitted to two feature sets [N, D], [M, D]."""
    return frechet_distance(*gaussian_stats(features), *gaussian_stats(reference))
