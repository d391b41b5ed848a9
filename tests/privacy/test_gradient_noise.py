"""gradient_noise: rows clipped to L2 <= C, then N(0, (sigma C)^2) on every coordinate."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from vfl.privacy.gradient_noise import gradient_noise

batches = st.tuples(st.integers(1, 30), st.integers(1, 10)).flatmap(
    lambda shape: hnp.arrays(np.float32, shape, elements=st.floats(-1e4, 1e4, width=32)))


@settings(max_examples=200, deadline=None)
@given(batches, st.floats(1e-3, 1e3))
def test_without_noise_every_row_is_clipped_and_short_rows_are_kept(g, clip):
    out = gradient_noise(g, np.zeros(g.shape[0]), np.random.default_rng(0), clip=clip, sigma=0.0)
    assert out.shape == g.shape and out.dtype == np.float32
    before = np.linalg.norm(g.astype(np.float64), axis=1)
    after = np.linalg.norm(out.astype(np.float64), axis=1)
    assert np.all(after <= clip * (1 + 1e-6))
    short = before <= clip
    np.testing.assert_allclose(out[short], g[short], rtol=1e-6)
    np.testing.assert_allclose(after[~short], clip, rtol=1e-5)
    # a clipped row keeps its direction
    long = ~short
    if long.any():
        cos = (out[long].astype(np.float64) * g[long]).sum(axis=1) / (after[long] * before[long])
        np.testing.assert_allclose(cos, 1.0, atol=1e-5)


def test_noise_std_is_sigma_times_clip():
    # zero gradients, so the output is the noise: 100 000 draws, the sample std's relative standard error is
    # 1/sqrt(2 n) ~ 0.22 %; a 1.5 % tolerance is about 7 standard errors
    g = np.zeros((10_000, 10), np.float32)
    out = gradient_noise(g, np.zeros(10_000), np.random.default_rng(1), clip=2.0, sigma=0.75)
    assert out.std() == pytest.approx(1.5, rel=0.015)
    assert abs(out.mean()) < 5 * 1.5 / np.sqrt(out.size)


def test_deterministic_under_a_seed():
    g = np.random.default_rng(2).standard_normal((16, 4)).astype(np.float32)
    a = gradient_noise(g, np.zeros(16), np.random.default_rng(3), clip=1.0, sigma=1.0)
    b = gradient_noise(g, np.zeros(16), np.random.default_rng(3), clip=1.0, sigma=1.0)
    assert np.array_equal(a, b)


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError):
        gradient_noise(np.ones((2, 2)), np.zeros(2), np.random.default_rng(0), clip=0.0, sigma=1.0)
    with pytest.raises(ValueError):
        gradient_noise(np.ones((2, 2)), np.zeros(2), np.random.default_rng(0), clip=1.0, sigma=-1.0)
