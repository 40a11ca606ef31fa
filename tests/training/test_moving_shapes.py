"""The moving-shapes world: captions and their grammar, clip geometry, rendering, the dataset."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from latentdiffusion.training.moving_shapes import (
    BOUNCE_AXES,
    DIRECTION_VECTORS,
    DIRECTIONS,
    GROWTH,
    GROWTHS,
    SPEEDS,
    TRAVEL,
    MotionSpec,
    MovingShapesDataset,
    clip_for_prompt,
    format_motion_prompt,
    frames_to_tensor,
    held_out,
    parse_motion_prompt,
    render_clip,
    sample_clip,
    start_prompt,
    tensor_to_frames,
)
from latentdiffusion.training.shapes import (
    EDGE_MARGIN,
    GRID,
    IMAGE_SIZE,
    POSITIONS,
    SIZE_EXTENTS,
    SIZE_THRESHOLD,
    parse_prompt,
    position_of,
    render,
)

CLIPS = 200


def _clips(count: int = CLIPS, seed: int = 0, frames: int = 16):
    rng = np.random.default_rng(seed)
    return [sample_clip(rng, frames) for _ in range(count)]


def test_prompts_round_trip_through_the_grammar():
    specs = [
        MotionSpec("red", "circle", "blue", "moving", direction, speed, growth)
        for direction, speed, growth in itertools.product(DIRECTIONS, (None, *SPEEDS), (None, *GROWTHS))
    ]
    specs += [
        MotionSpec("green", "triangle", "white", "bouncing", direction, None, growth)
        for direction, growth in itertools.product(("right", "down"), (None, *GROWTHS))
    ]
    for spec in specs:
        assert parse_motion_prompt(format_motion_prompt(spec)) == spec
    assert format_motion_prompt(specs[0]) == "a red circle moving left on a blue background"
    assert (
        format_motion_prompt(MotionSpec("red", "square", "gray", "moving", "right", "quickly", "growing"))
        == "a red square moving right quickly and growing on a gray background"
    )
    assert parse_motion_prompt(
        "An Orange triangle  bouncing up and down on a black background."
    ) == MotionSpec("orange", "triangle", "black", "bouncing", "down")
    assert {format_motion_prompt(s).split(" bouncing ")[-1].split(" on ")[0] for s in specs[-6:]} >= set(
        BOUNCE_AXES
    )


@pytest.mark.parametrize(
    "prompt",
    [
        "a red circle on a blue background",  # a still of the shapes world
        "a red circle moving sideways on a blue background",
        "a red circle moving right on a red background",
        "a red circle bouncing right on a blue background",
        "a small red circle moving right on a blue background",
        "a red circle moving right slowly quickly on a blue background",
    ],
)
def test_prompts_outside_the_grammar_are_rejected(prompt):
    with pytest.raises(ValueError, match="moving-shapes grammar"):
        parse_motion_prompt(prompt)


def test_clip_geometry_follows_the_stated_rules():
    for clip in _clips():
        spec, objects = clip.spec, clip.frames
        centres = np.array([o.centre for o in objects])
        sizes = np.array([o.extent for o in objects])
        assert len(objects) == 16 and spec.colour != spec.background
        assert all(o.colour == spec.colour and o.shape == spec.shape for o in objects)
        assert sizes.max() < SIZE_THRESHOLD and sizes.min() >= 12.0
        assert ((centres - sizes[:, None] / 2) >= EDGE_MARGIN - 1e-9).all()
        assert ((centres + sizes[:, None] / 2) <= IMAGE_SIZE - EDGE_MARGIN + 1e-9).all()
        axis = 0 if spec.direction in ("left", "right") else 1
        assert np.ptp(centres[:, 1 - axis]) == 0  # straight along the axis
        ratio = sizes[-1] / sizes[0]
        expected = {None: 1.0, "growing": GROWTH, "shrinking": 1 / GROWTH}[spec.growth]
        assert ratio == pytest.approx(expected)
        steps = np.diff(centres[:, axis])
        if spec.motion == "moving":
            sign = sum(DIRECTION_VECTORS[spec.direction])
            assert np.allclose(steps, steps[0]) and sign * steps[0] > 0
            assert TRAVEL[spec.speed][0] - 1e-9 <= abs(steps.sum()) <= TRAVEL[spec.speed][1] + 1e-9
        else:
            assert spec.speed is None
            assert (np.diff(np.sign(steps[np.abs(steps) > 1e-9])) != 0).any()  # turns at least once


def test_the_stream_covers_every_motion():
    clips = _clips()
    assert {c.spec.direction for c in clips} == set(DIRECTIONS)
    assert {c.spec.motion for c in clips} == {"moving", "bouncing"}
    assert {c.spec.speed for c in clips} == {None, *SPEEDS}
    assert {c.spec.growth for c in clips} == {None, *GROWTHS}


def test_clip_for_prompt_shows_the_prompt():
    for seed in range(10):
        clip = clip_for_prompt(
            "a yellow square moving down slowly and shrinking on a purple background", seed
        )
        assert clip.spec == MotionSpec("yellow", "square", "purple", "moving", "down", "slowly", "shrinking")
        clip = clip_for_prompt("a black circle moving left on a white background", seed, frames=8)
        assert clip.spec.speed in SPEEDS and len(clip.frames) == 8


def test_the_start_prompt_puts_the_object_where_its_motion_has_room():
    cell = IMAGE_SIZE / GRID
    for index, clip in enumerate(_clips(120)):
        prompt, spec = format_motion_prompt(clip.spec), clip.spec
        still = start_prompt(prompt, index)
        assert still == start_prompt(prompt, index)  # a function of prompt and seed
        (obj,) = parse_prompt(still).objects  # a still prompt of the shapes world
        assert (obj.colour, obj.shape, obj.size) == (spec.colour, spec.shape, "small")
        assert parse_prompt(still).background == spec.background
        row, column = divmod(POSITIONS.index(obj.position), GRID)
        if spec.motion == "bouncing":  # where the world's clip of this prompt and seed starts
            assert obj.position == position_of(clip_for_prompt(prompt, index).frames[0].centre)
            continue
        dx, dy = DIRECTION_VECTORS[spec.direction]
        centre = ((column + 0.5) * cell, (row + 0.5) * cell)
        along = centre[0] if dx else centre[1]
        end = along + (dx or dy) * TRAVEL["quickly"][1]  # the fastest path from the cell's centre
        room = EDGE_MARGIN + SIZE_EXTENTS["small"][1] / 2
        assert room <= end <= IMAGE_SIZE - room, (prompt, still)
    with pytest.raises(ValueError):
        start_prompt("a red circle on a blue background", 0)


def test_frames_are_the_shapes_world_renderer_and_tensors_round_trip():
    clip = sample_clip(3)
    frames = render_clip(clip)
    assert [np.asarray(f).tolist() for f in frames[:2]] == [
        np.asarray(render(s)).tolist() for s in clip.scenes()[:2]
    ]
    tensor = frames_to_tensor(frames)
    assert tensor.shape == (3, 16, 64, 64) and tensor.dtype == torch.float32
    assert tensor.min() >= -1 and tensor.max() <= 1
    assert [np.asarray(f).tolist() for f in tensor_to_frames(tensor)] == [
        np.asarray(f).tolist() for f in frames
    ]
    with pytest.raises(ValueError, match="clip tensor"):
        tensor_to_frames(tensor[0])


def test_dataset_items_are_pure_functions_of_seed_and_index():
    first, again, other = (
        MovingShapesDataset(5, frames=4),
        MovingShapesDataset(5, frames=4),
        MovingShapesDataset(6, 4),
    )
    for index in (0, 7):
        clip, text = first[index]
        clip_again, text_again = again[index]
        assert torch.equal(clip, clip_again) and text == text_again
        assert clip.shape == (3, 4, 64, 64)
        parsed = parse_motion_prompt(text)
        spec = first.clip_and_caption(index)[0].spec
        assert parsed.speed in (None, spec.speed) and (parsed.colour, parsed.growth) == (
            spec.colour,
            spec.growth,
        )
    assert [first[i][1] for i in range(6)] != [other[i][1] for i in range(6)]
    assert held_out(first).seed == 6 and held_out(first).frames == 4
    with pytest.raises(IndexError):
        first[-1]
    with pytest.raises(ValueError, match="at least 2 frames"):
        MovingShapesDataset(0, frames=1)


def test_batches_split_global_batches_between_ranks():
    dataset = MovingShapesDataset(1, frames=3)
    clips, texts = next(dataset.batches(2, start=1))
    assert clips.shape == (2, 3, 3, 64, 64) and texts == [dataset[2][1], dataset[3][1]]
    rank_clips, rank_texts = next(dataset.batches(2, start=1, rank=1, world_size=2))
    assert rank_texts == [dataset[6][1], dataset[7][1]] and torch.equal(rank_clips[0], dataset[6][0])
    with pytest.raises(ValueError, match="rank"):
        next(dataset.batches(2, rank=2, world_size=2))
