"""label_dp: k-ary randomized response flips at the rate its epsilon implies, to the other classes uniformly."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vfl.privacy.label_dp import flip_probability, randomize_labels


def test_flip_probability_formula():
    for k in (2, 3, 10):
        for eps in (0.1, 1.0, 3.0):
            assert flip_probability(k, eps) == pytest.approx(1 - math.exp(eps) / (math.exp(eps) + k - 1))
    assert flip_probability(2, 1000.0) == pytest.approx(math.exp(-1000.0))  # no overflow
    assert flip_probability(2, 1e-9) == pytest.approx(0.5)


@given(st.integers(2, 50), st.floats(1e-6, 700))
def test_flip_probability_is_eps_label_dp(k, eps):
    # keep / (flip to one particular other class) = e^eps: the randomized-response guarantee
    q = flip_probability(k, eps)
    keep, each_other = 1 - q, q / (k - 1)
    assert 0 < q < 1 and keep / each_other == pytest.approx(math.exp(eps), rel=1e-9)


@pytest.mark.parametrize("k, eps", [(2, 0.5), (2, 2.0), (5, 1.0), (10, 3.0)])
def test_the_flip_rate_matches_epsilon(k, eps):
    # n = 20 000 seeded draws: the flip count is binomial(n, q); the tolerance is 5 binomial standard errors
    n = 20_000
    rng = np.random.default_rng(k * 100 + int(eps * 10))
    labels = rng.integers(0, k, n)
    out = randomize_labels(labels, k, eps, rng)
    q = flip_probability(k, eps)
    rate = np.mean(out != labels)
    assert abs(rate - q) <= 5 * math.sqrt(q * (1 - q) / n)
    # a flipped label is uniform over the other k - 1 classes: offsets (out - y) mod k among flips
    flipped = out != labels
    offsets = ((out - labels) % k)[flipped]
    m = flipped.sum()
    counts = np.bincount(offsets, minlength=k)
    assert counts[0] == 0
    expected = m / (k - 1)
    assert np.all(np.abs(counts[1:] - expected) <= 5 * math.sqrt(expected * (1 - 1 / (k - 1)) + 1e-9))


def test_shape_dtype_and_determinism():
    y = np.array([0.0, 1.0, 1.0, 0.0] * 50, dtype=np.float32)  # a binary task's float 0/1 labels
    a = randomize_labels(y, 2, 0.3, np.random.default_rng(5))
    b = randomize_labels(y, 2, 0.3, np.random.default_rng(5))
    assert a.dtype == np.float32 and a.shape == y.shape and np.array_equal(a, b)
    assert set(np.unique(a)) <= {0.0, 1.0} and not np.array_equal(a, y)
    ints = randomize_labels(np.arange(6) % 3, 3, 1.0, np.random.default_rng(0))
    assert ints.dtype == np.arange(1).dtype


def test_bad_arguments():
    with pytest.raises(ValueError):
        randomize_labels(np.array([0, 1]), 1, 1.0, np.random.default_rng(0))
    with pytest.raises(ValueError):
        randomize_labels(np.array([0, 3]), 3, 1.0, np.random.default_rng(0))
    with pytest.raises(ValueError):
        flip_probability(2, 0.0)
    with pytest.raises(ValueError):
        flip_probability(2, math.inf)
