from dataclasses import replace

import pytest
import torch

from latentdiffusion.components import build_components
from latentdiffusion.config import TINY
from latentdiffusion.errors import UserError
from latentdiffusion.evaluation.caption_reliance import caption_reliance, moved_captions
from latentdiffusion.training.shapes import ShapesDataset, images_to_tensor


@pytest.fixture(scope="module")
def scenes():
    data = ShapesDataset(7, relational_fraction=0.0)
    items = [data[i] for i in range(4)]
    images = images_to_tensor([image.resize((32, 32)) for image, _ in items])
    return images, [caption for _, caption in items]


def tiny_model(seed: int = 0):
    return build_components(TINY, seed=seed)


def test_moved_captions_leave_no_caption_in_place():
    captions = ["a", "b", "c", "d"]
    moved = moved_captions(captions)
    assert sorted(moved) == captions
    assert all(m != c for m, c in zip(moved, captions, strict=True))


def test_a_network_that_reads_its_captions_scores_other_than_one(scenes):
    found = caption_reliance(tiny_model(), *scenes, timesteps=(999, 500))
    assert [r.timestep for r in found] == [999, 500]
    assert all(r.own > 0 and r.ratio != pytest.approx(1.0, abs=1e-6) for r in found)


def test_a_network_deaf_to_its_captions_scores_exactly_one(scenes):
    components = tiny_model()
    for name, module in components.network.named_modules():
        if name.endswith("attn2.to_out"):  # cross-attention's output projection: no text reaches the stream
            torch.nn.init.zeros_(module.weight)
            torch.nn.init.zeros_(module.bias)
    for reliance in caption_reliance(components, *scenes, timesteps=(999, 300)):
        assert reliance.own > 0
        assert reliance.ratio == 1.0


def test_the_same_seed_gives_the_same_numbers(scenes):
    first = caption_reliance(tiny_model(), *scenes, timesteps=(600,), seed=3)
    again = caption_reliance(tiny_model(), *scenes, timesteps=(600,), seed=3)
    other = caption_reliance(tiny_model(), *scenes, timesteps=(600,), seed=4)
    assert first == again
    assert first != other


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda images, captions: (images, captions[:3]), "one caption per image"),
        (lambda images, captions: (images, ["same"] * 4), "two different captions"),
    ],
)
def test_bad_inputs_are_refused(scenes, change, message):
    with pytest.raises(UserError, match=message):
        caption_reliance(tiny_model(), *change(*scenes))


def test_timesteps_outside_the_schedule_are_refused(scenes):
    with pytest.raises(UserError, match=r"timesteps must be in \[0, 1000\)"):
        caption_reliance(tiny_model(), *scenes, timesteps=(1000,))


def test_a_flow_model_is_refused(scenes):
    components = tiny_model()
    components.config = replace(components.config, schedule=replace(TINY.schedule, process="flow"))
    with pytest.raises(UserError, match="discrete-time"):
        caption_reliance(components, *scenes)
