"""Layout-to-image placement on the shapes world: do the generated objects sit where a layout map puts
them, with the right colour and shape?

For a held-out scene (``training.shapes.sample_scene`` from a seed no training run uses), the prompt
states every attribute the grammar can (``format_prompt(describe(scene))``: size, colour, shape, position
and background of one object; or two objects and their relation) and the hint is the scene's layout map
(``training.layout.layout_map``). The strict checker (``shapes_checker.detect``) finds the objects in the
generated image; each layout object is matched with the detection whose region overlaps its layout region
most, where a detection's region is the pixels its best-fitting template (shape, centre, extent) owns
(``layout_mask``). An object is *placed* when that intersection over union is at least ``MIN_IOU`` and
the detection's colour and shape are the layout's; an image counts when all its objects are placed.

The first stage bounds what any generator can score: ``evaluate_reconstructions`` runs the same checker
on the rendered scenes after an encode/decode round trip through the model's autoencoder.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from latentdiffusion.evaluation.shapes_checker import Detection, detect
from latentdiffusion.training.layout import layout_map, layout_mask
from latentdiffusion.training.shapes import (
    Scene,
    ShapeSpec,
    describe,
    format_prompt,
    render,
    sample_scene,
)

MIN_IOU = 0.5
HELD_OUT_SEED = 4242  # training draws scenes from (run seed, index) streams; this seed's stream is apart
FORM_OF_COUNT = {1: "single", 2: "relational"}


@dataclass(frozen=True)
class Placement:
    """How one layout object came out: the best overlap and whether colour and shape match."""

    iou: float
    colour: bool
    shape: bool

    @property
    def placed(self) -> bool:
        return self.iou >= MIN_IOU and self.colour and self.shape


def layout_scenes(n: int, objects: int, seed: int = HELD_OUT_SEED) -> list[Scene]:
    """``n`` random scenes with ``objects`` (1 or 2) objects, a pure function of ``seed``."""
    rng = np.random.default_rng((seed, objects))
    return [sample_scene(rng, FORM_OF_COUNT[objects]) for _ in range(n)]


def scene_prompt(scene: Scene) -> str:
    """The caption that states every attribute of ``scene`` the grammar can."""
    return format_prompt(describe(scene))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def detection_mask(detection: Detection) -> np.ndarray:
    return layout_mask(ShapeSpec(detection.colour, detection.shape, detection.centre, detection.extent))


def placements(image: Image.Image, scene: Scene) -> list[Placement]:
    """One ``Placement`` per layout object of ``scene`` in ``image``."""
    _, detections = detect(image)
    masks = [detection_mask(d) for d in detections]
    results = []
    for obj in scene.objects:
        target = layout_mask(obj)
        overlaps = [iou(target, mask) for mask in masks]
        if not overlaps:
            results.append(Placement(0.0, False, False))
            continue
        best = int(np.argmax(overlaps))
        found = detections[best]
        results.append(Placement(overlaps[best], found.colour == obj.colour, found.shape == obj.shape))
    return results


@dataclass(frozen=True)
class LayoutResult:
    label: str
    objects: int
    images: list[Image.Image]
    placements: list[list[Placement]]

    @property
    def scores(self) -> dict[str, float]:
        """Shares of images whose objects are all placed / all where the layout puts them (IoU only),
        share of objects placed, mean IoU."""
        flat = [p for image in self.placements for p in image]
        return {
            "placed": float(np.mean([all(p.placed for p in image) for image in self.placements])),
            "where": float(np.mean([all(p.iou >= MIN_IOU for p in image) for image in self.placements])),
            "objects": float(np.mean([p.placed for p in flat])),
            "iou": float(np.mean([p.iou for p in flat])),
        }


def generate_layouts(
    pipe,
    scenes: Sequence[Scene],
    controlnet=None,
    *,
    seed: int = 0,
    strength: float = 1.0,
    control_mode: str = "Balanced",
    **settings,
) -> list[Image.Image]:
    """Image ``i`` from scene ``i``'s prompt with seed ``seed + i``; with ``controlnet`` (a loaded
    ControlNet or a path) its layout map is the hint, at ``strength`` in ``control_mode``."""
    import latentdiffusion as ld

    images = []
    for i, scene in enumerate(scenes):
        control = None
        if controlnet is not None:
            unit = ld.Control(controlnet, layout_map(scene), strength=strength, control_mode=control_mode)
            control = [unit]
        images += pipe.generate(scene_prompt(scene), seed=seed + i, control=control, **settings)
    return images


def evaluate_layouts(pipe, scenes: Sequence[Scene], label: str, controlnet=None, **settings) -> LayoutResult:
    images = generate_layouts(pipe, scenes, controlnet, **settings)
    return judged(label, images, scenes)


def judged(label: str, images: Sequence[Image.Image], scenes: Sequence[Scene]) -> LayoutResult:
    found = [placements(image, scene) for image, scene in zip(images, scenes, strict=True)]
    return LayoutResult(label, len(scenes[0].objects), list(images), found)


def reconstruction(pipe, image: Image.Image) -> Image.Image:
    """``image`` encoded (posterior mode) and decoded by ``pipe``'s autoencoder."""
    import torch

    from latentdiffusion.pipelines.text_to_image import decode_images
    from latentdiffusion.training.data import image_to_tensor

    vae = pipe.vae
    parameter = next(vae.parameters())
    x = image_to_tensor(image.convert("RGB"))[None].to(parameter.device, parameter.dtype)
    with torch.no_grad():
        return decode_images(pipe.components, vae.to_latent(x))[0]


def evaluate_reconstructions(pipe, scenes: Sequence[Scene], label: str) -> LayoutResult:
    """The checker on each scene's rendering after the autoencoder's round trip: the first stage's
    ceiling for any generator that decodes through it."""
    return judged(label, [reconstruction(pipe, render(scene)) for scene in scenes], scenes)


def format_table(results: Sequence[LayoutResult]) -> str:
    """A markdown table: one row per (model, objects per layout)."""
    lines = [
        "| model | objects | n | placed (IoU >= 0.5, colour, shape) | IoU >= 0.5 | objects placed "
        "| mean IoU |",
        "|---|---|---|---|---|---|---|",
    ]
    for result in results:
        s = result.scores
        cells = [_percent(s["placed"]), _percent(s["where"]), _percent(s["objects"]), f"{s['iou']:.3f}"]
        lines.append(
            f"| {result.label} | {result.objects} | {len(result.images)} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def _percent(value: float) -> str:
    return "-" if math.isnan(value) else f"{100 * value:.1f}%"
