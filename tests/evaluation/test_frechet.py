"""The Frechet distance against closed forms and scipy, and the shapes-world feature classifier."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from latentdiffusion.evaluation import frechet
from latentdiffusion.training.shapes import COLOURS, SHAPES, Scene, ShapesDataset, ShapeSpec


def random_covariance(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_distance_of_a_set_to_itself_is_zero():
    features = np.random.default_rng(0).normal(size=(200, 16))
    assert abs(frechet.feature_distance(features, features)) < 1e-9


def test_shifted_gaussians_give_the_squared_shift():
    rng = np.random.default_rng(1)
    sigma, mu = random_covariance(rng, 8), rng.normal(size=8)
    shift = rng.normal(size=8)
    assert frechet.frechet_distance(mu, sigma, mu + shift, sigma) == pytest.approx(shift @ shift, rel=1e-9)


def test_diagonal_gaussians_closed_form():
    # For commuting (diagonal) covariances Tr((S1 S2)^(1/2)) = sum sqrt(a_i b_i).
    rng = np.random.default_rng(2)
    a, b = rng.uniform(0.1, 3, size=6), rng.uniform(0.1, 3, size=6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    expected = (mu1 - mu2) @ (mu1 - mu2) + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    got = frechet.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(expected, rel=1e-9)


def test_matches_the_sqrtm_formula():
    rng = np.random.default_rng(3)
    s1, s2 = random_covariance(rng, 12), random_covariance(rng, 12)
    mu1, mu2 = rng.normal(size=12), rng.normal(size=12)
    root = scipy.linalg.sqrtm(s1 @ s2).real
    expected = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1 + s2 - 2 * root)
    assert frechet.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_fewer_samples_than_features_stays_finite_and_non_negative():
    rng = np.random.default_rng(4)
    small, reference = rng.normal(size=(5, 32)), rng.normal(size=(100, 32))
    distance = frechet.feature_distance(small, reference)
    assert np.isfinite(distance) and distance > 0


def test_scene_labels_follow_the_image_not_the_caption():
    left = ShapeSpec("red", "circle", (15.0, 30.0), 14.0)
    right = ShapeSpec("blue", "square", (45.0, 32.0), 13.0)
    as_left_of = Scene((left, right), "white", "left of")
    as_right_of = Scene((right, left), "white", "right of")
    labels = frechet.scene_labels(as_left_of)
    assert labels == frechet.scene_labels(as_right_of)
    colours = list(COLOURS)
    assert labels[2:4] == [colours.index("red"), SHAPES.index("circle")]
    assert labels[6:8] == [colours.index("blue"), SHAPES.index("square")]


def test_single_scene_labels_have_no_second_object():
    scene = Scene((ShapeSpec("green", "triangle", (50.0, 50.0), 30.0),), "black")
    labels = frechet.scene_labels(scene)
    assert labels[1] == 0 and labels[4] == 1  # single form, large
    assert labels[6:] == [len(COLOURS), len(SHAPES)]
    assert len(labels) == len(frechet.HEADS)


def test_classifier_shapes_training_and_round_trip(tmp_path):
    model = frechet.train_classifier(steps=2, batch_size=4)
    x, labels = frechet.labelled_batch(ShapesDataset(7), 0, 3)
    logits = model(x)
    assert {name: tuple(v.shape) for name, v in logits.items()} == {
        n: (3, k) for n, k in frechet.HEADS.items()
    }
    assert set(frechet.accuracy(model, x, labels)) == set(frechet.HEADS)
    frechet.save_classifier(model, tmp_path / frechet.WEIGHTS_FILE)
    loaded = frechet.load_classifier(tmp_path / frechet.WEIGHTS_FILE)
    images = [ShapesDataset(7)[i][0] for i in range(3)]
    features = frechet.image_features(loaded, images)
    assert features.shape == (3, frechet.FEATURE_DIM)
    np.testing.assert_allclose(features, frechet.image_features(model, x), atol=1e-6)
    small = torch.nn.functional.interpolate(x, size=(32, 32))  # other sizes are resized to 64x64
    assert frechet.image_features(model, small).shape == (3, frechet.FEATURE_DIM)


def test_classifier_training_logs_progress_every_log_every_steps(monkeypatch):
    monkeypatch.setattr(frechet, "LOG_EVERY", 2)
    lines: list[str] = []
    frechet.train_classifier(steps=5, batch_size=2, log=lines.append)
    assert [line.split(":")[0].strip() for line in lines] == ["classifier step 2/5", "classifier step 4/5"]
    assert all(line.endswith(" s/step") for line in lines)
