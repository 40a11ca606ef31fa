"""Every generation path of ``Pipeline`` runs the U-Net its backend serves (``Pipeline.served``): walks and
AnimateDiff clips call the backend's wrapped U-Net, and give the same frames as without a backend."""

from __future__ import annotations

import numpy as np
from PIL import Image
from tests.backends.marking import MarkingBackend

import latentdiffusion as ld
from latentdiffusion.models.motion import MotionConfig, MotionModules

SIZE = 32
STEPS = 2


def pixels(images) -> list[np.ndarray]:
    return [np.asarray(image) for image in images]


def with_and_without_backend(make):
    """``make(pipe)`` on the tiny model without a backend, then with a ``MarkingBackend``: both results
    and the backend."""
    pipe = ld.load("preset:tiny")
    plain = make(pipe)
    pipe.backend = MarkingBackend()
    return plain, make(pipe), pipe.backend


def test_a_walk_runs_on_the_backends_unet() -> None:
    def walk(pipe):
        return pipe.walk(["a red circle", "a blue square"], seeds=[1, 2], frames=2, steps=STEPS, width=SIZE)

    plain, served, backend = with_and_without_backend(walk)
    assert backend.calls >= 3 * STEPS  # three frames, each sampled by the wrapped U-Net
    assert all(np.array_equal(a, b) for a, b in zip(pixels(plain), pixels(served), strict=True))


def test_an_animation_runs_on_the_backends_unet() -> None:
    unet = ld.load("preset:tiny").unet.config
    widths = tuple(unet.model_channels * m for m in unet.channel_mult)
    motion = MotionModules(MotionConfig(block_channels=widths, layers=unet.num_res_blocks)).eval()

    def animate(pipe):
        return pipe.animate(
            "a red circle", width=SIZE, height=SIZE, motion_module=motion, frames=2, steps=STEPS
        )

    plain, served, backend = with_and_without_backend(animate)
    assert backend.calls >= STEPS
    assert all(np.array_equal(a, b) for a, b in zip(pixels(plain), pixels(served), strict=True))


def test_the_image_methods_run_on_the_backends_unet() -> None:
    picture = Image.new("RGB", (SIZE, SIZE), (200, 30, 30))
    mask = Image.new("L", (SIZE, SIZE), 255)
    pipe = ld.load("preset:tiny")
    pipe.backend = MarkingBackend()
    runs = {
        "generate": lambda: pipe.generate("a", width=SIZE, height=SIZE, steps=STEPS),
        "img2img": lambda: pipe.img2img(picture, "a", strength=1.0, steps=STEPS),
        "inpaint": lambda: pipe.inpaint(picture, mask, "a", steps=STEPS),
        "outpaint": lambda: pipe.outpaint(picture, "a", right=8, steps=STEPS),
    }
    for name, run in runs.items():
        before = pipe.backend.calls
        run()
        assert pipe.backend.calls - before >= 1, name
