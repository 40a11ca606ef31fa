"""The shapes-world prompt-adherence checker on the world's own images, perturbed images and wrong prompts."""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from latentdiffusion.evaluation.shapes_checker import (
    MAX_TEXTURE,
    analyse,
    check,
    detect,
    label_components,
    name_colour,
    summarise,
)
from latentdiffusion.training.shapes import (
    COLOURS,
    IMAGE_SIZE,
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
PERTURBED_SAMPLES = 100  # per kind of mild perturbation (300 each measured: all accepted)


def _perturb(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Slight blur, a JPEG round trip, a global colour shift and gaussian noise (std 8/255)."""
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8)))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    pixels = np.asarray(Image.open(buffer).convert("RGB"), dtype=np.float32)
    pixels = pixels + rng.uniform(-8, 8, size=3) + rng.normal(0, 8, size=pixels.shape)
    return Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))


def _mild(image: Image.Image, rng: np.random.Generator, blur: bool, noise: bool) -> Image.Image:
    """The strict checker's calibration perturbations: Gaussian blur of sigma 0.5-0.7 px, noise of std 4."""
    if blur:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 0.7)))
    if noise:
        pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, 4, size=(64, 64, 3))
        image = Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))
    return image


def _accuracy(perturb, strict: bool = True, samples: int = SAMPLES) -> dict[str, float]:
    dataset, rng = ShapesDataset(seed=2024), np.random.default_rng(0)
    results = []
    for index in range(samples):
        image, text = dataset[index]
        results.append(check(perturb(image, rng), text, strict=strict))
    return summarise(results)


def test_checker_agrees_with_the_dataset_on_clean_images():
    for strict in (True, False):
        accuracy = _accuracy(lambda image, rng: image, strict)
        print(f"\nclean images ({SAMPLES}, strict={strict}):", {k: round(v, 4) for k, v in accuracy.items()})
        lenient = {"background", "colour", "shape", "size", "position", "relation", "all"}
        assert set(accuracy) == (lenient | {"flat", "count"} if strict else lenient)
        assert min(accuracy.values()) == 1.0, accuracy


@pytest.mark.parametrize("blur, noise", [(True, False), (False, True), (True, True)])
def test_strict_checker_accepts_the_dataset_after_mild_blur_and_noise(blur, noise):
    accuracy = _accuracy(lambda image, rng: _mild(image, rng, blur, noise), samples=PERTURBED_SAMPLES)
    print(
        f"\nblur={blur} noise={noise} ({PERTURBED_SAMPLES}):", {k: round(v, 4) for k, v in accuracy.items()}
    )
    assert min(accuracy.values()) == 1.0, accuracy


def test_lenient_checker_is_robust_to_noise_blur_and_colour_shift():
    accuracy = _accuracy(_perturb, strict=False)
    print(f"\nperturbed images ({SAMPLES}):", {k: round(v, 4) for k, v in accuracy.items()})
    assert min(accuracy.values()) >= 0.95, accuracy


# ------------------------------------------------------------------ strict criteria on drawn defects

SCALE = 4  # defects are drawn at 4x and box-downsampled, as the world's renderer does
BLUE, WHITE = COLOURS["blue"], COLOURS["white"]


def _drawn(draw_at_4x) -> Image.Image:
    """A 64x64 image of what ``draw_at_4x(draw)`` draws in blue on white on a 256x256 canvas."""
    canvas = Image.new("RGB", (64 * SCALE, 64 * SCALE), WHITE)
    draw_at_4x(ImageDraw.Draw(canvas))
    return canvas.resize((64, 64), Image.Resampling.BOX)


def _box(left, top, right, bottom):
    return [SCALE * left, SCALE * top, SCALE * right - 1, SCALE * bottom - 1]


def _only(image: Image.Image):
    (found,) = analyse(image).detections
    return found


def _square(draw):
    draw.rectangle(_box(18, 18, 46, 46), fill=BLUE)


def _pillow(draw):  # concave sides and rounded corners
    draw.rounded_rectangle(_box(18, 18, 46, 46), radius=SCALE * 6, fill=BLUE)
    for box in ((10, 29, 22, 35), (42, 29, 54, 35), (29, 10, 35, 22), (29, 42, 35, 54)):
        draw.ellipse(_box(*box), fill=WHITE)


def _rounded(draw):
    draw.rounded_rectangle(_box(18, 18, 46, 46), radius=SCALE * 7, fill=BLUE)


def _concave(draw):
    for box in ((18, 18, 46, 46),):
        draw.rectangle(_box(*box), fill=BLUE)
    for box in ((12, 24, 21, 40), (43, 24, 52, 40), (24, 12, 40, 21), (24, 43, 40, 52)):
        draw.ellipse(_box(*box), fill=WHITE)


def _triangle(draw):
    draw.polygon([(SCALE * 32, SCALE * 18), (SCALE * 46, SCALE * 46), (SCALE * 18, SCALE * 46)], fill=BLUE)


def _stemmed(draw):
    _triangle(draw)
    draw.rectangle(_box(30, 46, 34, 56), fill=BLUE)


def _notched(draw):
    _triangle(draw)
    draw.polygon([(SCALE * 32, SCALE * 34), (SCALE * 38, SCALE * 46), (SCALE * 26, SCALE * 46)], fill=WHITE)


def _flat_topped(draw):  # a trapezoid: no point at the top
    draw.polygon(
        [
            (SCALE * 27, SCALE * 22),
            (SCALE * 37, SCALE * 22),
            (SCALE * 46, SCALE * 46),
            (SCALE * 18, SCALE * 46),
        ],
        fill=BLUE,
    )


def _blob(draw):
    angles = np.linspace(0, 2 * np.pi, 40, endpoint=False)
    radii = 11 + 3 * np.sin(3 * angles) + 2 * np.cos(5 * angles)
    points = [
        (SCALE * (32 + r * np.cos(a)), SCALE * (32 + r * np.sin(a)))
        for r, a in zip(radii, angles, strict=True)
    ]
    draw.polygon(points, fill=BLUE)


def _circle(draw):
    draw.ellipse(_box(20, 20, 44, 44), fill=BLUE)


def test_drawn_reference_shapes_pass_every_criterion():
    for draw, shape in ((_square, "square"), (_triangle, "triangle"), (_circle, "circle")):
        found = _only(_drawn(draw))
        assert (found.shape, found.defects) == (shape, ()), found.measures
        assert check(_drawn(draw), f"a blue {shape} on a white background")["all"]


@pytest.mark.parametrize(
    "draw, defect",
    [
        (_pillow, "box fill"),
        (_rounded, "corners"),
        (_concave, "side bow"),
        (_stemmed, "skew"),
        (_notched, "triangle bow"),
        (_flat_topped, "apex width"),
    ],
)
def test_each_shape_criterion_rejects_its_defect(draw, defect):
    image = _drawn(draw)
    found = _only(image)
    assert defect in found.defects, found.measures
    prompt = f"a blue {found.shape} on a white background"
    assert not check(image, prompt)["shape"] and check(image, prompt, strict=False)["shape"]


def test_a_blob_is_no_shape():
    found = _only(_drawn(_blob))
    assert found.defects, found.measures
    for shape in SHAPES:
        assert not check(_drawn(_blob), f"a blue {shape} on a white background")["shape"]


def _grid_texture(pixels: np.ndarray, where: np.ndarray, amplitude: float = 20) -> Image.Image:
    ys, xs = np.indices(where.shape)
    checker = np.where((ys // 2 + xs // 2) % 2 == 0, amplitude, -amplitude)[..., None]
    textured = np.where(where[..., None], pixels + checker, pixels)
    return Image.fromarray(np.clip(textured, 0, 255).astype(np.uint8))


def test_grid_texture_in_the_fill_or_the_background_is_not_flat():
    image = _drawn(_square)
    pixels = np.asarray(image, dtype=np.float32)
    inside = np.zeros((64, 64), dtype=bool)
    inside[20:44, 20:44] = True
    textured = _grid_texture(pixels, inside)
    assert _only(textured).texture > MAX_TEXTURE >= _only(image).texture
    prompt = "a blue square on a white background"
    result = check(textured, prompt)
    assert result["shape"] and not result["flat"] and not result["all"]
    assert check(textured, prompt, strict=False)["all"]
    background = np.zeros((64, 64), dtype=bool)
    background[4:14, 4:60] = True
    assert not check(_grid_texture(pixels, background, 10), prompt)["flat"]


def test_an_extra_object_fails_the_count():
    def two(draw):
        _square(draw)
        draw.ellipse(_box(50, 50, 58, 58), fill=COLOURS["red"])

    prompt = "a blue square on a white background"
    result = check(_drawn(two), prompt)
    assert result["shape"] and result["colour"] and not result["count"] and not result["all"]
    assert check(_drawn(two), prompt, strict=False)["all"]


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
    assert check(Image.fromarray(pixels), prompt, strict=False)["all"]
    strict = check(Image.fromarray(pixels), prompt)
    assert strict["count"] and not strict["flat"]  # too small to count as objects, but not a flat background
    empty = Image.new("RGB", (64, 64), COLOURS[scene.background])
    lenient = {"background": True, "colour": False, "shape": False, "relation": False, "all": False}
    assert check(empty, prompt, strict=False) == lenient
    assert check(empty, prompt) == lenient | {"flat": False, "count": False}


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


def test_a_colour_near_the_background_is_an_object_only_for_a_palette_that_names_it():
    leaf = (40, 140, 60)  # 30 from the world's green: under half the distance to green's nearest colour
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), COLOURS["green"])
    ImageDraw.Draw(image).rectangle((16, 16, 40, 40), fill=leaf)
    assert detect(image) == ("green", [])
    background, found = detect(image, {**COLOURS, "leaf": leaf})
    assert background == "green" and [d.shape for d in found] == ["square"]
    assert name_colour(found[0].rgb, {**COLOURS, "leaf": leaf}, exclude=background) == "leaf"
