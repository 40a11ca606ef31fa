"""ControlNet hint preprocessors that need no weights, with OpenCV, under the names AUTOMATIC1111's
ControlNet extension gives its modules; and the geometry that fits a hint to the output size.

Every preprocessor maps an RGB ``uint8`` array [H, W, 3] to a hint array [H, W, 3] (``inpaint``: [H, W, 4],
the mask in the fourth channel). What each computes:

- ``none``: the image as given (a depth, normal, pose or segmentation map the user brings).
- ``canny``: ``cv2.Canny(image, low, high)`` (Canny 1986), white edges on black, as ControlNet's own
  ``annotator/canny`` (thresholds: ``Control.low_threshold``/``high_threshold``).
- ``softedge_sobel``: soft edges without a network (HED/PiDiNet need weights): the grey image blurred
  with a Gaussian of std ``threshold_a`` (default 1), the Sobel gradient magnitude
  ``sqrt(gx^2 + gy^2)`` (3x3 kernels), scaled so its largest value is 255 (an all-flat image gives 0).
- ``scribble_xdog``: the extension's XDoG scribble: per channel, the Gaussian blur (std 5) minus the
  Gaussian blur (std 0.5), positive where a pixel is darker than its surroundings; a pixel is white where
  the smallest of the three exceeds ``threshold_a / 2`` (default threshold 32), black elsewhere.
- ``lineart_standard``: the extension's difference of Gaussians for drawings (dark lines on a light
  background): ``d = min over channels of (Gaussian(image, std 6) - image)`` clipped to [0, 255], divided
  by ``max(16, median of d where d > 8)``, times 127, clipped: white lines on black.
- ``shuffle``: the extension's content shuffle: the image resampled (``cv2.remap``, bilinear) at a smooth
  random flow: each of x and y is uniform noise on a coarse grid of ``H // 256 + 2`` by ``W // 256 + 2``
  cells, enlarged bicubically to ``H + 512`` by ``W + 512``, cropped by 256 on each side, stretched to
  [0, 1] and scaled to [0, W - 1] / [0, H - 1]. The noise is drawn from ``numpy.random.default_rng(seed)``
  (``Control.seed``), so the same seed gives the same hint.
- ``tile_resample``: the extension's tile downsample: for a rate ``threshold_a`` >= 1.1 (default 1: the
  image as given), ``cv2.resize`` with area averaging to ``int(W / rate)`` by ``int(H / rate)``; the hint
  is then fitted to the output size like any other.
- ``blur_gaussian``: ``cv2.GaussianBlur`` with std ``threshold_a`` (default 9, the extension's).
- ``invert``: ``255 - image`` (white-background drawings into the white-on-black form ControlNets expect).
- ``seg_shapes``: a flat-colour segmentation for the shapes world (``training.shapes``): every pixel
  replaced by the nearest colour (Euclidean, RGB) of that world's palette, so an anti-aliased or
  re-encoded picture becomes clean regions of palette colours.
- ``inpaint`` / ``inpaint_only``: the inpaint ControlNet's hint: the image with the mask (``Control.mask``;
  the inpainting pipeline supplies its own) as a fourth channel; the hint tensor is the image in [0, 1]
  with masked pixels set to -1, as diffusers' ControlNet-inpaint examples build it (``hint_tensor``).

Maps that need a network (depth, normals, poses, learned segmentation) are not computed here: supply
them as the image with the ``none`` preprocessor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from latentdiffusion.errors import UserError

SHUFFLE_CELL = 256  # pixels per coarse noise cell of the shuffle flow (the extension's f)
RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")  # A1111's ResizeMode 0, 1, 2


def cv2_module():
    """OpenCV, or the one-line error that says how to get it."""
    try:
        import cv2
    except ImportError:
        raise UserError(
            "ControlNet preprocessors need OpenCV: pip install 'latentdiffusion[control]' "
            "(opencv-python-headless), or supply the hint map as the image with preprocessor 'none'"
        ) from None
    return cv2


@dataclass(frozen=True)
class Parameter:
    """A preprocessor's setting as the extension's slider shows it (``threshold_a``/``threshold_b``)."""

    label: str
    default: float
    minimum: float
    maximum: float


@dataclass(frozen=True)
class Inputs:
    """What a preprocessor may read besides the image: its two parameters, a seed and a mask."""

    a: float
    b: float
    seed: int = 0
    mask: np.ndarray | None = None  # [H, W] uint8, 255 where the image is repainted


@dataclass(frozen=True)
class Preprocessor:
    """``run(image, inputs)``; ``resolution``: whether it runs at ``processor_res`` (the extension's
    detectors do; pass-through, tile, invert, shuffle and inpaint work on the image as it is)."""

    name: str
    run: Callable[[np.ndarray, Inputs], np.ndarray]
    threshold_a: Parameter | None = None
    threshold_b: Parameter | None = None
    resolution: bool = True
    needs_mask: bool = False


def three_channels(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[:, :, None], 3, axis=2)


def canny(image: np.ndarray, inputs: Inputs) -> np.ndarray:
    return three_channels(cv2_module().Canny(image, int(inputs.a), int(inputs.b)))


def softedge_sobel(image: np.ndarray, inputs: Inputs) -> np.ndarray:
    cv2 = cv2_module()
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
    grey = cv2.GaussianBlur(grey, (0, 0), inputs.a)
    magnitude = cv2.magnitude(cv2.Sobel(grey, cv2.CV_32F, 1, 0), cv2.Sobel(grey, cv2.CV_32F, 0, 1))
    peak = float(magnitude.max())
    scaled = magnitude * (255.0 / peak) if peak > 0 else magnitude
    return three_channels(np.clip(np.round(scaled), 0, 255).astype(np.uint8))


def scribble_xdog(image: np.ndarray, inputs: Inputs) -> np.ndarray:
    cv2 = cv2_module()
    x = image.astype(np.float32)
    response = np.min(cv2.GaussianBlur(x, (0, 0), 5.0) - cv2.GaussianBlur(x, (0, 0), 0.5), axis=2)
    return three_channels(np.where(2 * response > inputs.a, 255, 0).astype(np.uint8))


def lineart_standard(image: np.ndarray, inputs: Inputs) -> np.ndarray:
    cv2 = cv2_module()
    x = image.astype(np.float32)
    darkness = np.clip(np.min(cv2.GaussianBlur(x, (0, 0), 6.0) - x, axis=2), 0, 255)
    strong = darkness[darkness > 8]
    scale = max(16.0, float(np.median(strong))) if strong.size else 16.0
    return three_channels(np.clip(darkness / scale * 127, 0, 255).astype(np.uint8))


def smooth_noise(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """[H, W] float32 in [0, 1]: coarse uniform noise enlarged bicubically (the shuffle flow's part)."""
    cv2, f = cv2_module(), SHUFFLE_CELL
    coarse = rng.uniform(0.0, 1.0, size=(height // f + 2, width // f + 2))
    noise = cv2.resize(coarse, (width + 2 * f, height + 2 * f), interpolation=cv2.INTER_CUBIC)
    noise = noise[f : f + height, f : f + width]
    noise = noise - noise.min()
    peak = noise.max()
    return (noise / peak if peak > 0 else noise).astype(np.float32)


def shuffle(image: np.ndarray, inputs: Inputs) -> np.ndarray:
    cv2 = cv2_module()
    height, width = image.shape[:2]
    rng = np.random.default_rng(inputs.seed)
    x = smooth_noise(rng, height, width) * float(width - 1)
    y = smooth_noise(rng, height, width) * float(height - 1)
    return cv2.remap(image, np.stack([x, y], axis=2), None, cv2.INTER_LINEAR)


def tile_resample(image: np.ndarray, inputs: Inputs) -> np.ndarray:
    if inputs.a < 1.1:
        return image
    cv2 = cv2_module()
    height, width = image.shape[:2]
    size = (max(1, int(width / inputs.a)), max(1, int(height / inputs.a)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def blur_gaussian(image: np.ndarray, inputs: Inputs) -> np.ndarray:
    return cv2_module().GaussianBlur(image, (0, 0), float(inputs.a))


def invert(image: np.ndarray, inputs: Inputs) -> np.ndarray:
    return 255 - image


def shapes_palette() -> np.ndarray:
    from latentdiffusion.training.shapes import COLOURS

    return np.array(list(COLOURS.values()), dtype=np.int32)


def seg_shapes(image: np.ndarray, inputs: Inputs) -> np.ndarray:
    palette, pixels = shapes_palette(), image.astype(np.int32)
    distances = np.stack([((pixels - colour) ** 2).sum(axis=-1) for colour in palette])  # [colours, H, W]
    return palette[distances.argmin(axis=0)].astype(np.uint8)


def inpaint_hint(image: np.ndarray, inputs: Inputs) -> np.ndarray:
    if inputs.mask is None:
        raise UserError(
            "the inpaint preprocessor needs the mask: use it with inpainting (pipe.inpaint), "
            "or give ld.Control(..., mask=...)"
        )
    mask = inputs.mask
    if mask.shape != image.shape[:2]:
        mask = cv2_module().resize(mask, image.shape[1::-1], interpolation=cv2_module().INTER_NEAREST)
    return np.concatenate([image, np.where(mask > 127, 255, 0).astype(np.uint8)[:, :, None]], axis=2)


def pass_through(image: np.ndarray, inputs: Inputs) -> np.ndarray:
    return image


def _table(*preprocessors: Preprocessor) -> dict[str, Preprocessor]:
    return {p.name: p for p in preprocessors}


PREPROCESSORS: dict[str, Preprocessor] = _table(
    Preprocessor("none", pass_through, resolution=False),
    Preprocessor(
        "canny",
        canny,
        Parameter("Low Threshold", 100, 0, 255),
        Parameter("High Threshold", 200, 0, 255),
    ),
    Preprocessor("softedge_sobel", softedge_sobel, Parameter("Sigma", 1.0, 0.1, 16.0)),
    Preprocessor("scribble_xdog", scribble_xdog, Parameter("XDoG Threshold", 32, 1, 64)),
    Preprocessor("lineart_standard", lineart_standard),
    Preprocessor("shuffle", shuffle, resolution=False),
    Preprocessor(
        "tile_resample", tile_resample, Parameter("Down Sampling Rate", 1.0, 1.0, 8.0), resolution=False
    ),
    Preprocessor("blur_gaussian", blur_gaussian, Parameter("Sigma", 9.0, 0.01, 64.0)),
    Preprocessor("invert", invert, resolution=False),
    Preprocessor("seg_shapes", seg_shapes, resolution=False),
    Preprocessor("inpaint", inpaint_hint, resolution=False, needs_mask=True),
    Preprocessor("inpaint_only", inpaint_hint, resolution=False, needs_mask=True),
)


def find_preprocessor(name: str | None) -> Preprocessor:
    """The preprocessor called ``name`` (None: ``none``), or one error listing the known ones."""
    found = PREPROCESSORS.get(name or "none")
    if found is None:
        raise UserError(
            f"unknown control preprocessor {name!r}; known: {', '.join(PREPROCESSORS)} "
            "(depth, pose, normal and other maps that need a model are not computed here: they must be "
            "supplied as the image, with preprocessor 'none')"
        )
    return found


def parameter_value(parameter: Parameter | None, given: float | None, name: str, module: str) -> float:
    """``given`` (checked against the parameter's range) or the parameter's default."""
    if parameter is None or given is None:
        return 0.0 if parameter is None else parameter.default
    if not parameter.minimum <= given <= parameter.maximum:
        raise UserError(
            f"{module} {name} ({parameter.label}) must be in [{parameter.minimum:g}, {parameter.maximum:g}], "
            f"got {given:g}"
        )
    return float(given)


# ---- geometry: processor resolution, pixel perfect, resize modes ----


def resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``image`` at ``size`` (width, height): area averaging to shrink, bicubic to enlarge (the
    extension's choice for detector inputs)."""
    cv2 = cv2_module()
    if image.shape[1::-1] == tuple(size):
        return image
    shrinking = size[0] * size[1] < image.shape[0] * image.shape[1]
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC)


def at_resolution(image: np.ndarray, resolution: int) -> np.ndarray:
    """The image scaled so its shorter side is ``resolution`` pixels (the extension's processor_res;
    without its padding to multiples of 64)."""
    height, width = image.shape[:2]
    k = resolution / min(height, width)
    return resize(image, (max(1, round(width * k)), max(1, round(height * k))))


def pixel_perfect_resolution(size: tuple[int, int], width: int, height: int, resize_mode: str) -> int:
    """The extension's pixel-perfect processor resolution for an image of ``size`` (width, height): its
    shorter side scaled by the factor that fits it to the output (the smaller factor for "Resize and
    Fill", the larger otherwise), so the preprocessor works at the output's own scale."""
    k_h, k_w = height / size[1], width / size[0]
    k = min(k_h, k_w) if resize_mode == "Resize and Fill" else max(k_h, k_w)
    return max(1, round(k * min(size)))


def few_colours(hint: np.ndarray) -> bool:
    """Between 3 and 199 distinct colours: a segmentation or layout map, resized with nearest
    neighbour so that no new colours appear (the extension's rule)."""
    rgb = hint[:, :, :3].astype(np.int64)
    packed = (rgb[:, :, 0] << 16) | (rgb[:, :, 1] << 8) | rgb[:, :, 2]
    return 2 < len(np.unique(packed)) < 200


def resize_hint(hint: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``hint`` [H, W, C] at ``size`` (width, height): Lanczos (diffusers' hint resampling), nearest
    for few-colour maps; an inpaint hint's mask channel stays binary."""
    from PIL import Image

    if hint.shape[1::-1] == tuple(size):
        return hint
    method = Image.Resampling.NEAREST if few_colours(hint) else Image.Resampling.LANCZOS
    rgb = np.asarray(Image.fromarray(hint[:, :, :3]).resize(size, method))
    if hint.shape[2] == 3:
        return rgb
    mask = np.asarray(Image.fromarray(hint[:, :, 3]).resize(size, Image.Resampling.BILINEAR))
    return np.concatenate([rgb, np.where(mask > 127, 255, 0).astype(np.uint8)[:, :, None]], axis=2)


def fit_hint(hint: np.ndarray, width: int, height: int, resize_mode: str) -> np.ndarray:
    """``hint`` fitted to width x height as the extension's resize modes do:

    - "Just Resize": stretched to the size;
    - "Crop and Resize": scaled by the larger of the two factors (covers the output), then the centre
      crop, offset ``(new - target) // 2``;
    - "Resize and Fill": scaled by the smaller factor (fits inside), then centred, offset
      ``(target - new) // 2``, on a background of the per-channel median of the hint's border pixels
      (an inpaint hint's border is marked masked, so the fill is repainted).
    """
    if resize_mode == "Just Resize":
        return resize_hint(hint, (width, height))
    old_h, old_w = hint.shape[:2]
    k_h, k_w = height / old_h, width / old_w
    k = min(k_h, k_w) if resize_mode == "Resize and Fill" else max(k_h, k_w)
    scaled = resize_hint(hint, (max(1, round(old_w * k)), max(1, round(old_h * k))))
    new_h, new_w = scaled.shape[:2]
    if resize_mode == "Crop and Resize":
        top, left = max(0, (new_h - height) // 2), max(0, (new_w - width) // 2)
        return scaled[top : top + height, left : left + width]
    border = np.concatenate([hint[0], hint[-1], hint[:, 0], hint[:, -1]], axis=0)
    colour = np.median(border, axis=0).astype(np.uint8)
    if hint.shape[2] == 4:
        colour[3] = 255
    canvas = np.tile(colour[None, None], (height, width, 1))
    top, left = max(0, (height - new_h) // 2), max(0, (width - new_w) // 2)
    canvas[top : top + new_h, left : left + new_w] = scaled[:height, :width]
    return canvas
