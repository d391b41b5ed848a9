"""max_norm: every non-zero row of a batch leaves with the batch's largest L2 norm; zero rows stay zero."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from vfl.privacy.audit import norm_leak_auc
from vfl.privacy.max_norm import max_norm

from .synthetic import batches_of, leaky_binary

batches = st.tuples(st.integers(1, 40), st.integers(1, 12)).flatmap(
    lambda shape: hnp.arrays(np.float32, shape, elements=st.floats(-1e3, 1e3, width=32)))


@settings(max_examples=200, deadline=None)
@given(batches, st.integers(0, 2 ** 32 - 1))
def test_every_row_gets_the_largest_norm_and_zero_rows_stay_zero(g, seed):
    labels = np.zeros(g.shape[0], dtype=np.int64)
    out = max_norm(g, labels, np.random.default_rng(seed))
    assert out.shape == g.shape and out.dtype == np.float32
    before = np.linalg.norm(g.astype(np.float64), axis=1)
    after = np.linalg.norm(out.astype(np.float64), axis=1)
    zero = before == 0
    assert np.all(out[zero] == 0)
    np.testing.assert_allclose(after[~zero], before.max(), rtol=1e-5)


def test_the_noise_is_orthogonal_to_the_gradient():
    rng = np.random.default_rng(1)
    g = rng.standard_normal((50, 8)).astype(np.float32)
    out = max_norm(g, np.zeros(50), rng).astype(np.float64)
    g64 = g.astype(np.float64)
    added = out - g64
    cos = np.einsum("ij,ij->i", added, g64) / (np.linalg.norm(added, axis=1) * np.linalg.norm(g64, axis=1) + 1e-300)
    assert np.abs(cos).max() < 1e-4


def test_width_one_scales_keeping_the_sign():
    g = np.array([[0.5], [-2.0], [0.0], [1.0]], dtype=np.float32)
    out = max_norm(g, np.zeros(4), np.random.default_rng(0))
    assert out[:, 0].tolist() == [2.0, -2.0, 0.0, 2.0]


def test_deterministic_under_a_seed():
    g = np.random.default_rng(3).standard_normal((32, 6)).astype(np.float32)
    a = max_norm(g, np.zeros(32), np.random.default_rng(7))
    b = max_norm(g, np.zeros(32), np.random.default_rng(7))
    c = max_norm(g, np.zeros(32), np.random.default_rng(8))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_it_defeats_the_norm_attack_on_a_leaky_set():
    grads, labels, ids = leaky_binary(np.random.default_rng(0))
    assert norm_leak_auc(grads, labels) > 0.95
    rng = np.random.default_rng(1)
    defended = np.concatenate([max_norm(g, y, rng) for g, y in batches_of(grads, labels, ids)])
    # norms now differ only between batches (each batch's largest norm), which says nothing about a row's label
    assert norm_leak_auc(defended, labels) < 0.65


def test_empty_batch():
    out = max_norm(np.zeros((0, 4), np.float32), np.zeros(0), np.random.default_rng(0))
    assert out.shape == (0, 4) and out.dtype == np.float32
