"""Tests of the classifier two-sample test (fast: early-stopped MLP and small samples)."""

from __future__ import annotations

import zlib

import jax
import numpy as np
import pytest

from numpyro_simformer.diagnostics import c2st, c2st_fast, c2st_null_std

NUM_SAMPLES = 400
TOLERANCE = 4 * c2st_null_std(NUM_SAMPLES, NUM_SAMPLES)  # 4 binomial stds of the accuracy: 0.071


@pytest.fixture
def rng(request) -> np.random.Generator:
    """One generator per test, seeded from the test's name (nothing global)."""
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))


def test_identical_distributions_score_one_half(rng):
    samples_a, samples_b = rng.normal(size=(2, NUM_SAMPLES, 3))
    assert abs(c2st_fast(samples_a, samples_b) - 0.5) < TOLERANCE


def test_shifted_distribution_is_detected(rng):
    """A deliberately wrong answer (one std shift in one of 3 dims; Bayes accuracy 0.69)."""
    samples_a, samples_b = rng.normal(size=(2, NUM_SAMPLES, 3))
    samples_b[:, 0] += 1.0
    assert c2st_fast(samples_a, samples_b) > 0.5 + TOLERANCE
    assert c2st(samples_a, samples_b, classifier="rf") > 0.5 + TOLERANCE


def test_exact_sbibm_definition_runs_and_detects_shift(rng):
    samples_a, samples_b = rng.normal(size=(2, 200, 2))
    samples_b += 2.0
    assert c2st(samples_a, samples_b) > 0.8


def test_random_forest_on_identical_distributions(rng):
    samples_a, samples_b = rng.normal(size=(2, NUM_SAMPLES, 2))
    assert abs(c2st(samples_a, samples_b, classifier="rf") - 0.5) < TOLERANCE


def test_accepts_jax_and_one_dimensional_arrays(rng):
    samples_a = jax.numpy.asarray(rng.normal(size=200))
    samples_b = rng.normal(size=200) + 3.0
    accuracy = c2st_fast(samples_a, samples_b)
    assert isinstance(accuracy, float) and accuracy > 0.9


def test_deterministic_given_seed(rng):
    samples_a, samples_b = rng.normal(size=(2, 100, 2))
    assert c2st_fast(samples_a, samples_b, seed=3) == c2st_fast(samples_a, samples_b, seed=3)


def test_null_std():
    assert c2st_null_std(500, 500) == pytest.approx(0.5 / np.sqrt(1000))
    with pytest.raises(ValueError):
        c2st_null_std(0, 0)


@pytest.mark.parametrize(
    ("samples_a", "samples_b", "kwargs", "match"),
    [
        (np.zeros((50, 2)), np.zeros((50, 3)), {}, "same dimension"),
        (np.full((50, 2), np.nan), np.zeros((50, 2)), {}, "non-finite"),
        (np.zeros((50, 2)), np.full((50, 2), np.inf), {}, "samples_b.*non-finite"),
        (np.zeros((9, 2)), np.zeros((50, 2)), {}, "at least 10"),
        (np.zeros((50, 2, 2)), np.zeros((50, 2, 2)), {}, "shape"),
        (np.zeros((50, 2)), np.zeros((50, 2)), {"classifier": "svm"}, "classifier"),
        (np.zeros((50, 2)), np.zeros((50, 2)), {"classifier": "rf", "early_stopping": True}, "early_stopping"),
        (np.zeros((50, 2)), np.zeros((50, 2)), {"n_folds": 1}, "n_folds"),
    ],
)
def test_errors(samples_a, samples_b, kwargs, match):
    with pytest.raises(ValueError, match=match):
        c2st(samples_a, samples_b, **kwargs)
