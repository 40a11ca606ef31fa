"""The shapes world: vocabulary, placement rules, captions and their grammar, rendering, dataset."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from latentdiffusion.training import shapes
from latentdiffusion.training.shapes import (
    COLOURS,
    EDGE_MARGIN,
    IMAGE_SIZE,
    POSITIONS,
    RELATION_GAP,
    RELATION_SLOPE,
    RELATIONS,
    SHAPES,
    SIZE_EXTENTS,
    SIZES,
    ObjectSpec,
    PromptSpec,
    Scene,
    ShapesDataset,
    caption,
    coverage,
    describe,
    format_prompt,
    parse_prompt,
    relation_holds,
    render,
    sample_scene,
    scene_for_prompt,
)


def _scenes(count: int, seed: int = 0, form: str | None = None) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, form) for _ in range(count)]


def test_vocabulary_is_the_specified_world():
    assert COLOURS == {
        "red": (220, 40, 40),
        "green": (40, 170, 60),
        "blue": (40, 80, 220),
        "yellow": (240, 210, 40),
        "purple": (140, 60, 190),
        "orange": (245, 140, 30),
        "white": (245, 245, 245),
        "black": (20, 20, 20),
        "gray": (128, 128, 128),
    }
    assert SHAPES == ("circle", "square", "triangle")
    assert SIZES == ("small", "large")
    assert len(POSITIONS) == 9 and POSITIONS[4] == "center"
    assert RELATIONS == ("left of", "right of", "above", "below")


def test_objects_stay_inside_the_canvas_and_never_overlap():
    for scene in _scenes(400):
        boxes = []
        for obj in scene.objects:
            (x, y), half = obj.centre, obj.extent / 2
            assert min(x, y) - half >= EDGE_MARGIN
            assert max(x, y) + half <= IMAGE_SIZE - EDGE_MARGIN
            assert SIZE_EXTENTS[obj.size][0] <= obj.extent <= SIZE_EXTENTS[obj.size][1]
            boxes.append((x - half, y - half, x + half, y + half))
        for a, b in itertools.combinations(boxes, 2):
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], scene
        # Pixel check: covered fractions of different objects never share a pixel.
        if len(scene.objects) == 2:
            first, second = (coverage(obj) for obj in scene.objects)
            assert not np.any((first > 0) & (second > 0))


def test_single_scenes_cover_every_attribute_value():
    scenes = _scenes(400, form="single")
    objects = [scene.objects[0] for scene in scenes]
    assert {o.position for o in objects} == set(POSITIONS)
    assert {o.size for o in objects} == set(SIZES)
    assert {o.shape for o in objects} == set(SHAPES)
    assert {o.colour for o in objects} == set(COLOURS)
    assert all(scene.background != scene.objects[0].colour for scene in scenes)


def test_relational_scenes_are_unambiguous():
    for scene in _scenes(300, seed=1, form="relational"):
        first, second = scene.objects
        assert (first.colour, first.shape) != (second.colour, second.shape)
        assert scene.background not in (first.colour, second.colour)
        assert first.size == second.size == "small"
        dx, dy = first.centre[0] - second.centre[0], first.centre[1] - second.centre[1]
        along, across = (dx, dy) if scene.relation in ("left of", "right of") else (dy, dx)
        assert abs(along) >= (first.extent + second.extent) / 2 + RELATION_GAP
        assert abs(across) <= RELATION_SLOPE * abs(along)
        assert relation_holds(first.centre, second.centre, scene.relation)
        others = [r for r in RELATIONS if r != scene.relation]
        assert not any(relation_holds(first.centre, second.centre, r) for r in others)


def test_caption_round_trips_through_parse_prompt():
    rng = np.random.default_rng(3)
    stated = {"size": 0, "position": 0}
    for scene in _scenes(300, seed=2):
        text = caption(scene, rng)
        spec = parse_prompt(text)
        assert format_prompt(spec) == text
        full = describe(scene)
        assert (spec.background, spec.relation) == (full.background, full.relation)
        for said, true in zip(spec.objects, full.objects, strict=True):
            assert (said.colour, said.shape) == (true.colour, true.shape)
            for key in stated:
                if getattr(said, key) is not None:
                    assert getattr(said, key) == getattr(true, key)
                    stated[key] += 1
    assert 0 < stated["size"] < 300 and 0 < stated["position"] < 300  # both phrasings occur


def test_parse_prompt_reads_both_forms_leniently():
    assert parse_prompt("A large Red circle in the top left on a blue background.") == PromptSpec(
        (ObjectSpec("red", "circle", "large", "top left"),), "blue"
    )
    assert parse_prompt("an orange square on a gray background") == PromptSpec(
        (ObjectSpec("orange", "square"),), "gray"
    )
    assert parse_prompt("a red circle  left of a red square on a white background") == PromptSpec(
        (ObjectSpec("red", "circle"), ObjectSpec("red", "square")), "white", "left of"
    )


@pytest.mark.parametrize(
    "prompt, message",
    [
        ("a red circle", "grammar"),
        ("a pink circle on a blue background", "'pink'"),
        ("a red hexagon on a blue background", "'hexagon'"),
        ("red a circle on a blue background", "out of order"),
        ("a red circle in the middle on a blue background", "'middle'"),
        ("a small red circle left of a blue square on a white background", "no size or position"),
        ("a red circle above a blue square in the top on a white background", "no size or position"),
        ("a red circle on a red background", "background must differ"),
        ("a red circle above a red circle on a blue background", "told apart"),
        ("", "grammar"),
    ],
)
def test_parse_prompt_rejects_prompts_outside_the_grammar(prompt, message):
    with pytest.raises(ValueError, match=message):
        parse_prompt(prompt)


def test_scene_for_prompt_shows_what_the_prompt_states_and_varies_the_rest():
    prompt = "a green triangle in the bottom right on a purple background"
    scenes = [scene_for_prompt(prompt, seed) for seed in range(40)]
    for scene in scenes:
        (obj,) = scene.objects
        assert (obj.colour, obj.shape, obj.position, scene.background) == (
            "green",
            "triangle",
            "bottom right",
            "purple",
        )
    assert {scene.objects[0].size for scene in scenes} == set(SIZES)
    relational = scene_for_prompt("a blue square below a white circle on a black background", 0)
    assert relational.relation == "below"
    assert relational.objects[0].centre[1] > relational.objects[1].centre[1]


def test_render_is_deterministic_and_draws_the_scene():
    scene = sample_scene(7, "single")
    first, second = np.asarray(render(scene)), np.asarray(render(scene))
    assert first.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and first.dtype == np.uint8
    np.testing.assert_array_equal(first, second)
    assert tuple(first[0, 0]) == COLOURS[scene.background]
    x, y = (int(v) for v in scene.objects[0].centre)
    if scene.objects[0].shape != "triangle":  # a triangle's box centre can sit near its slanted edge
        assert tuple(first[y, x]) == COLOURS[scene.objects[0].colour]
    # Anti-aliasing: coverage equals the drawn area up to the 1/4-pixel supersampling grid.
    obj = scene.objects[0]
    assert coverage(obj).sum() == pytest.approx(shapes.AREA_FRACTIONS[obj.shape] * obj.extent**2, rel=0.1)


def test_dataset_items_are_pure_functions_of_seed_and_index():
    dataset = ShapesDataset(seed=11)
    image, text = dataset[5]
    _ = dataset[0], dataset[123]
    again_image, again_text = ShapesDataset(seed=11)[5]
    assert text == again_text
    np.testing.assert_array_equal(np.asarray(image), np.asarray(again_image))
    assert [ShapesDataset(seed=12)[i][1] for i in range(8)] != [dataset[i][1] for i in range(8)]
    assert {dataset.scene_and_caption(i)[0].form for i in range(20)} == {"single", "relational"}
    assert {ShapesDataset(0, form="relational").scene_and_caption(i)[0].form for i in range(5)} == {
        "relational"
    }
    with pytest.raises(IndexError):
        dataset[-1]
    with pytest.raises(ValueError, match="form"):
        ShapesDataset(form="pairs")


def test_relational_fraction_sets_the_share_of_two_object_scenes():
    def share(fraction: float) -> float:
        dataset = ShapesDataset(seed=3, relational_fraction=fraction)
        return np.mean([dataset.scene_and_caption(i)[0].form == "relational" for i in range(400)])

    assert share(0.0) == 0.0 and share(1.0) == 1.0
    assert 0.42 < share(0.5) < 0.58 and 0.68 < share(0.75) < 0.82
    # the default fraction keeps the dataset's original stream
    assert ShapesDataset(seed=3, relational_fraction=0.5)[7][1] == ShapesDataset(seed=3)[7][1]
    with pytest.raises(ValueError, match="relational_fraction"):
        ShapesDataset(relational_fraction=1.5)


def test_batches_are_tensors_in_range_and_split_across_ranks():
    dataset = ShapesDataset(seed=4)
    images, texts = next(dataset.batches(3))
    assert images.shape == (3, 3, IMAGE_SIZE, IMAGE_SIZE) and images.dtype == torch.float32
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert texts == [dataset[i][1] for i in range(3)]
    np.testing.assert_allclose(
        images[1].permute(1, 2, 0).numpy(), np.asarray(dataset[1][0]) / 127.5 - 1.0, atol=1e-6
    )
    rank0, rank1 = dataset.batches(2, rank=0, world_size=2), dataset.batches(2, rank=1, world_size=2)
    seen = [next(rank0)[1] + next(rank1)[1] for _ in range(2)]
    assert seen == [[dataset[i][1] for i in range(4)], [dataset[i][1] for i in range(4, 8)]]
    _, resumed = next(dataset.batches(2, start=1, rank=1, world_size=2))
    assert resumed == [dataset[i][1] for i in (6, 7)]
