"""The shapes-world prompt-adherence checker on the world's own images, perturbed images and wrong prompts."""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image, ImageFilter

from latentdiffusion.evaluation.shapes_checker import check, detect, label_components, summarise
from latentdiffusion.training.shapes import (
    COLOURS,
    POSITIONS,
    SHAPES,
    PromptSpec,
    Scene,
    ShapesDataset,
    describe,
    format_prompt,
    render,
    sample_scene,
)

SAMPLES = 300


def _perturb(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Slight blur, a JPEG round trip, a global colour shift and gaussian noise (std 8/255)."""
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8)))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    pixels = np.asarray(Image.open(buffer).convert("RGB"), dtype=np.float32)
    pixels = pixels + rng.uniform(-8, 8, size=3) + rng.normal(0, 8, size=pixels.shape)
    return Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))


def _accuracy(perturb: bool) -> dict[str, float]:
    dataset, rng = ShapesDataset(seed=2024), np.random.default_rng(0)
    results = []
    for index in range(SAMPLES):
        image, text = dataset[index]
        results.append(check(_perturb(image, rng) if perturb else image, text))
    return summarise(results)


def test_checker_agrees_with_the_dataset_on_clean_images():
    accuracy = _accuracy(perturb=False)
    print(f"\nclean images ({SAMPLES}):", {k: round(v, 4) for k, v in accuracy.items()})
    assert set(accuracy) == {"background", "colour", "shape", "size", "position", "relation", "all"}
    assert min(accuracy.values()) >= 0.99, accuracy


def test_checker_is_robust_to_noise_blur_and_colour_shift():
    accuracy = _accuracy(perturb=True)
    print(f"\nperturbed images ({SAMPLES}):", {k: round(v, 4) for k, v in accuracy.items()})
    assert min(accuracy.values()) >= 0.95, accuracy


def _other(values, current, avoid=()):
    return next(v for v in values if v != current and v not in avoid)


def _wrong_prompts(scene: Scene) -> dict[str, str]:
    """One prompt per attribute that misstates exactly that attribute of ``scene``."""
    spec = describe(scene)
    first = spec.objects[0]
    taken = {o.colour for o in spec.objects} | {spec.background}
    wrong = {
        "colour": replace(
            spec, objects=(replace(first, colour=_other(COLOURS, "", taken)), *spec.objects[1:])
        ),
        "shape": replace(
            spec, objects=(replace(first, shape=_other(SHAPES, first.shape)), *spec.objects[1:])
        ),
        "background": replace(spec, background=_other(COLOURS, "", taken)),
    }
    if spec.relation is None:
        wrong["position"] = replace(
            spec, objects=(replace(first, position=_other(POSITIONS, first.position)),)
        )
        wrong["size"] = replace(spec, objects=(replace(first, size=_other(("small", "large"), first.size)),))
    else:
        opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
        wrong["relation"] = replace(spec, relation=opposite[spec.relation])
    return {key: format_prompt(s) for key, s in wrong.items() if _showable(s)}


def _showable(spec: PromptSpec) -> bool:
    return spec.objects[0] != spec.objects[-1] or len(spec.objects) == 1


def test_wrong_prompts_are_detected():
    misses = []
    for seed in range(40):
        scene = sample_scene(seed, "single" if seed % 2 else "relational")
        image = render(scene)
        assert check(image, format_prompt(describe(scene)))["all"]
        for key, prompt in _wrong_prompts(scene).items():
            result = check(image, prompt)
            if result[key] or result["all"]:
                misses.append((prompt, result))
    assert not misses, misses[:5]


def test_swapped_objects_and_swapped_colours_fail():
    scene = next(
        s
        for s in (sample_scene(seed, "relational") for seed in range(100))
        if s.objects[0].colour != s.objects[1].colour and s.objects[0].shape != s.objects[1].shape
    )
    first, second = describe(scene).objects
    image = render(scene)
    swapped = PromptSpec((second, first), scene.background, scene.relation)
    result = check(image, format_prompt(swapped))
    assert result["colour"] and result["shape"] and not result["relation"] and not result["all"]
    # Colours swapped between the shapes: no assignment of objects makes colour and shape both right.
    recoloured = (replace(first, colour=second.colour), replace(second, colour=first.colour))
    result = check(image, format_prompt(PromptSpec(recoloured, scene.background, scene.relation)))
    assert not (result["colour"] and result["shape"]) and not result["all"]


def test_stray_specks_and_a_missing_object_are_handled():
    scene = sample_scene(3, "relational")
    pixels = np.asarray(render(scene)).copy()
    rng = np.random.default_rng(0)
    for _ in range(6):  # 2x2 specks of random palette colours: below the minimum object area
        y, x = rng.integers(4, 58, size=2)
        pixels[y : y + 2, x : x + 2] = COLOURS[list(COLOURS)[rng.integers(len(COLOURS))]]
    prompt = format_prompt(describe(scene))
    assert check(Image.fromarray(pixels), prompt)["all"]
    empty = Image.new("RGB", (64, 64), COLOURS[scene.background])
    assert check(empty, prompt) == {
        "background": True,
        "colour": False,
        "shape": False,
        "relation": False,
        "all": False,
    }


def test_detect_reports_measured_geometry_and_accepts_other_sizes():
    scene = sample_scene(5, "single")
    obj = scene.objects[0]
    background, (found,) = detect(render(scene).resize((128, 128), Image.Resampling.NEAREST))
    assert background == scene.background
    assert (found.colour, found.shape, found.size, found.position) == (
        obj.colour,
        obj.shape,
        obj.size,
        obj.position,
    )
    assert found.centre == pytest.approx(obj.centre, abs=0.3)
    assert found.extent == pytest.approx(obj.extent, rel=0.05)


def test_label_components_uses_8_connectivity():
    mask = np.zeros((6, 7), dtype=bool)
    mask[0, 0] = mask[1, 1] = True  # diagonal neighbours: one component
    mask[4:6, 4:7] = True
    mask[0, 6] = True
    labels = label_components(mask)
    assert labels.max() == 2 and (labels[~mask] == -1).all()
    assert labels[0, 0] == labels[1, 1] == 0 and labels[0, 6] == 1 and (labels[4:6, 4:7] == 2).all()
    assert (label_components(np.ones((3, 3), dtype=bool)) == 0).all()
    assert (label_components(np.zeros((3, 3), dtype=bool)) == -1).all()


def test_summarise_counts_each_attribute_over_the_results_that_state_it():
    results = [
        {"colour": True, "position": False, "all": False},
        {"colour": False, "all": False},
        {"colour": True, "relation": True, "all": True},
        {"colour": True, "all": True},
    ]
    assert summarise(results) == {"colour": 0.75, "position": 0.0, "relation": 1.0, "all": 0.5}


def test_check_rejects_prompts_outside_the_grammar():
    with pytest.raises(ValueError, match="grammar"):
        check(Image.new("RGB", (64, 64)), "a photo of a cat")
