"""Layout placement scoring (``evaluation.layout_eval``) on rendered scenes with known answers."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np

from latentdiffusion.config import AutoencoderConfig
from latentdiffusion.evaluation.layout_eval import (
    MIN_IOU,
    LayoutResult,
    evaluate_reconstructions,
    format_table,
    layout_scenes,
    placements,
    reconstruction,
    scene_prompt,
)
from latentdiffusion.models.autoencoder import IdentityAutoencoder
from latentdiffusion.training.shapes import Scene, ShapeSpec, parse_prompt, render


def test_a_rendered_scene_is_placed_and_a_moved_or_recoloured_one_is_not():
    for scene in layout_scenes(6, 1) + layout_scenes(6, 2):
        found = placements(render(scene), scene)
        assert len(found) == len(scene.objects)
        assert all(p.placed and p.iou > 0.8 for p in found), (scene, found)
    square = ShapeSpec("red", "square", (16.0, 16.0), 14.0)
    scene = Scene((square,), "white")
    moved = Scene((replace(square, centre=(44.0, 44.0)),), "white")
    (far,) = placements(render(moved), scene)
    assert far.iou < MIN_IOU and not far.placed
    (blue,) = placements(render(Scene((replace(square, colour="blue"),), "white")), scene)
    assert blue.iou > 0.8 and not blue.colour and not blue.placed
    (circle,) = placements(render(Scene((replace(square, shape="circle"),), "white")), scene)
    assert circle.colour and not circle.shape and not circle.placed
    (nothing,) = placements(render(Scene((), "white")), scene)
    assert nothing.iou == 0 and not nothing.placed


def test_held_out_layouts_are_fixed_and_their_prompts_parse():
    assert layout_scenes(3, 2) == layout_scenes(3, 2) != layout_scenes(3, 2, seed=1)
    for scene in layout_scenes(4, 1) + layout_scenes(4, 2):
        spec = parse_prompt(scene_prompt(scene))
        assert len(spec.objects) == len(scene.objects)


def test_table_counts_an_image_only_when_every_object_is_placed():
    scenes = layout_scenes(2, 2)
    images = [render(scenes[0]), render(Scene(scenes[1].objects[:1], scenes[1].background))]
    result = LayoutResult("x", 2, images, [placements(i, s) for i, s in zip(images, scenes, strict=True)])
    assert result.scores["placed"] == 0.5 and result.scores["objects"] == 0.75
    assert "| x | 2 | 2 | 50.0% | 50.0% | 75.0% |" in format_table([result])


def test_the_first_stage_ceiling_judges_the_round_trip_of_the_rendered_scenes():
    vae = IdentityAutoencoder(AutoencoderConfig(identity=True, latent_channels=3, scaling_factor=1.0))
    pixel_space = SimpleNamespace(vae=vae, components=SimpleNamespace(autoencoder=vae))
    scenes = layout_scenes(3, 2)
    image = render(scenes[0])
    assert np.array_equal(np.asarray(reconstruction(pixel_space, image)), np.asarray(image))
    result = evaluate_reconstructions(pixel_space, scenes, "identity")
    assert result.scores["placed"] == 1.0 and result.objects == 2 and len(result.images) == 3
