"""The weight-free ControlNet preprocessors (``pipelines.preprocessors``): OpenCV's own answer where a
preprocessor is one OpenCV call, exact answers on drawn pictures elsewhere, shapes and ranges for all."""

import numpy as np
import pytest
from PIL import Image, ImageDraw

import latentdiffusion as ld
from latentdiffusion.errors import UserError
from latentdiffusion.pipelines.control import hint_array
from latentdiffusion.pipelines.preprocessors import PREPROCESSORS

cv2 = pytest.importorskip("cv2")


def shapes_picture() -> Image.Image:
    image = Image.new("RGB", (48, 40), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((4, 4, 24, 30), fill=(220, 40, 40))
    draw.rectangle((26, 10, 44, 36), fill=(40, 80, 220))
    return image


def line_drawing() -> Image.Image:
    """A black 2-pixel vertical line on white at columns 20-21 of a 48 x 40 picture."""
    image = Image.new("RGB", (48, 40), "white")
    ImageDraw.Draw(image).rectangle((20, 0, 21, 39), fill="black")
    return image


def run(name: str, image: Image.Image, **options) -> np.ndarray:
    return hint_array(ld.Control(None, image, preprocessor=name, **options))


MASK = Image.new("L", (48, 40), 0)
MASK.paste(255, (10, 10, 30, 30))


@pytest.mark.parametrize("name", list(PREPROCESSORS))
def test_every_preprocessor_gives_a_uint8_map_and_is_deterministic(name):
    options = {"mask": MASK} if PREPROCESSORS[name].needs_mask else {}
    first, second = run(name, shapes_picture(), **options), run(name, shapes_picture(), **options)
    channels = 4 if PREPROCESSORS[name].needs_mask else 3
    assert first.dtype == np.uint8 and first.ndim == 3 and first.shape[2] == channels
    assert first.shape[:2] == (40, 48)
    assert np.array_equal(first, second)


def test_single_opencv_calls_equal_opencv():
    picture = shapes_picture()
    array = np.asarray(picture)
    assert np.array_equal(run("none", picture), array)
    assert np.array_equal(run("invert", picture), 255 - array)
    assert np.array_equal(
        run("blur_gaussian", picture, threshold_a=2.5), cv2.GaussianBlur(array, (0, 0), 2.5)
    )
    assert np.array_equal(run("blur_gaussian", picture), cv2.GaussianBlur(array, (0, 0), 9.0))  # default
    tiled = run("tile_resample", picture, threshold_a=2.0)
    assert np.array_equal(tiled, cv2.resize(array, (24, 20), interpolation=cv2.INTER_AREA))
    assert np.array_equal(run("tile_resample", picture), array)  # rate 1: the image as given


def test_canny_thresholds_reach_opencv():
    picture = shapes_picture()
    edges = run("canny", picture, low_threshold=20, high_threshold=60)
    assert np.array_equal(edges[:, :, 1], cv2.Canny(np.asarray(picture), 20, 60))


def test_lines_of_a_drawing():
    """lineart_standard, scribble_xdog and softedge_sobel light up the drawn line, black far away
    (lineart_standard divides by the median line darkness: a uniform line is 127)."""
    for name in ("lineart_standard", "scribble_xdog", "softedge_sobel"):
        hint = run(name, line_drawing())
        assert (hint[:, :, 0] == hint[:, :, 2]).all(), name  # grey
        assert hint[:, 18:24, 0].max() == (127 if name == "lineart_standard" else 255), name
        assert hint[:, :10, 0].max() == 0 and hint[:, 32:, 0].max() == 0, name


def test_lineart_standard_by_hand():
    """On the line, darkness = blur(std 6) - 0 per channel; its median over pixels above 8 sets the scale
    (the line's pixels all have the same darkness along a full-height line, up to the borders)."""
    x = np.asarray(line_drawing()).astype(np.float32)
    darkness = np.clip((cv2.GaussianBlur(x, (0, 0), 6.0) - x).min(axis=2), 0, 255)
    expected = np.clip(darkness / max(16, np.median(darkness[darkness > 8])) * 127, 0, 255).astype(np.uint8)
    assert np.array_equal(run("lineart_standard", line_drawing())[:, :, 0], expected)


def test_flat_pictures_have_no_edges():
    flat = Image.new("RGB", (32, 24), (90, 120, 30))
    for name in ("canny", "softedge_sobel", "scribble_xdog", "lineart_standard"):
        assert run(name, flat).max() == 0, name


def test_softedge_is_the_normalised_sobel_magnitude():
    grey = np.zeros((24, 32), np.float32)
    grey[:, 16:] = 200  # a vertical step
    step = Image.fromarray(np.repeat(grey.astype(np.uint8)[:, :, None], 3, axis=2))
    hint = run("softedge_sobel", step, threshold_a=1.0)[:, :, 0].astype(float)
    blurred = cv2.GaussianBlur(grey, (0, 0), 1.0)
    gx = cv2.Sobel(blurred, cv2.CV_32F, 1, 0)
    expected = np.abs(gx) / np.abs(gx).max() * 255  # no vertical gradient anywhere
    assert np.abs(hint - expected).max() <= 1
    assert hint[:, 15:17].min() == 255 or hint[:, 15:17].max() == 255


def test_scribble_threshold():
    faint = Image.new("RGB", (48, 40), "white")
    ImageDraw.Draw(faint).rectangle((20, 0, 21, 39), fill=(230, 230, 230))  # response ~ 20
    assert run("scribble_xdog", faint).max() == 255
    assert run("scribble_xdog", faint, threshold_a=64).max() == 0


def test_shuffle_moves_content_with_a_seeded_flow():
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    a, b = run("shuffle", picture, seed=1), run("shuffle", picture, seed=2)
    assert not np.array_equal(a, b)
    assert not np.array_equal(a, np.asarray(picture))
    assert np.array_equal(
        run("shuffle", Image.new("RGB", (48, 40), (7, 8, 9))), np.full((40, 48, 3), (7, 8, 9))
    )


def test_seg_shapes_snaps_to_the_palette():
    from latentdiffusion.training.shapes import COLOURS

    palette = np.array(list(COLOURS.values()))
    rng = np.random.default_rng(3)
    labels = rng.integers(0, len(palette), (40, 48))
    noisy = np.clip(palette[labels] + rng.integers(-12, 13, (40, 48, 3)), 0, 255).astype(np.uint8)
    assert np.array_equal(run("seg_shapes", Image.fromarray(noisy)), palette[labels])


def test_inpaint_hint_carries_the_mask():
    hint = run("inpaint", shapes_picture(), mask=MASK)
    assert np.array_equal(hint[:, :, :3], np.asarray(shapes_picture()))
    assert np.array_equal(hint[:, :, 3], np.asarray(MASK))
    with pytest.raises(UserError, match="needs the mask"):
        run("inpaint", shapes_picture())


def test_unknown_preprocessor_names_the_known_ones():
    with pytest.raises(UserError, match=r"known: none, canny, .*seg_shapes.*depth.*must be supplied"):
        ld.Control(None, shapes_picture(), preprocessor="depth_midas").validate()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(preprocessor="blur_gaussian", threshold_a=100.0), r"blur_gaussian threshold_a \(Sigma\)"),
        (dict(preprocessor="scribble_xdog", threshold_a=float("nan")), "threshold_a"),
        (dict(processor_res=0), "processor_res"),
    ],
)
def test_bad_preprocessor_settings(options, message):
    with pytest.raises(UserError, match=message):
        ld.Control(None, shapes_picture(), **options).validate()


def test_processor_res_runs_the_detector_at_that_resolution():
    hint = run("canny", shapes_picture(), processor_res=80)  # shorter side 40 -> 80
    assert hint.shape == (80, 96, 3)
    assert run("invert", shapes_picture(), processor_res=80).shape == (40, 48, 3)  # no resolution


def test_missing_opencv_says_what_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(UserError, match=r"latentdiffusion\[control\]"):
        run("blur_gaussian", shapes_picture())
