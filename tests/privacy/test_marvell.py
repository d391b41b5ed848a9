"""marvell: the chosen noise meets the sumKL budget (computed analytically, as Li et al. do) with the least power,
a tighter budget costs more noise, the attacks fall, and degenerate batches never give NaN."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy.optimize import minimize

from vfl.privacy.audit import direction_leak_auc, norm_leak_auc
from vfl.privacy.marvell import marvell, marvell_noise, sum_kl

from .synthetic import batches_of, leaky_binary


def one_batch(seed=0, **kw):
    grads, labels, ids = leaky_binary(np.random.default_rng(seed), batches=1, **kw)
    return grads, labels


def test_sum_kl_matches_the_gaussian_kl_formula():
    # KL(N0 || N1) + KL(N1 || N0) for full covariance matrices, against the closed form
    rng = np.random.default_rng(0)
    d, u, v = 4, 0.3, 0.7
    delta = rng.standard_normal(d)
    axis = delta / np.linalg.norm(delta)
    lam10, lam20, lam11, lam21 = 0.5, 0.2, 0.1, 0.0

    def cov(base, lam1, lam2):
        return base * np.eye(d) + lam2 * np.eye(d) + (lam1 - lam2) * np.outer(axis, axis)

    s0, s1 = cov(u, lam10, lam20), cov(v, lam11, lam21)

    def kl(a, b):
        ib = np.linalg.inv(b)
        return 0.5 * (np.trace(ib @ a) + delta @ ib @ delta - d + math.log(np.linalg.det(b) / np.linalg.det(a)))

    expected = kl(s0, s1) + kl(s1, s0)
    assert sum_kl(u, v, d, float(delta @ delta), lam10, lam20, lam11, lam21) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("budget", [0.01, 0.1, 0.25, 1.0, 4.0, 16.0])
def test_the_chosen_noise_meets_the_budget(budget):
    grads, labels = one_batch()
    noise = marvell_noise(grads, labels, budget)
    assert noise.sumkl_before > 100 > budget  # this batch leaks: the budget has work to do
    assert noise.sumkl <= budget * (1 + 1e-9)
    assert noise.sumkl == pytest.approx(sum_kl(noise.u, noise.v, noise.d, noise.g, noise.lam10, noise.lam20,
                                               noise.lam11, noise.lam21))
    assert min(noise.lam10, noise.lam20, noise.lam11, noise.lam21) >= 0
    # the paper's structure: orthogonal noise only on the class of smaller variance
    assert noise.lam20 == 0 or noise.lam21 == 0


def test_a_tighter_budget_costs_more_noise_power():
    grads, labels = one_batch(1)
    powers = [marvell_noise(grads, labels, b).power for b in (16.0, 4.0, 1.0, 0.25, 0.1, 0.01)]
    assert all(a < b for a, b in zip(powers, powers[1:]))


def test_a_batch_within_budget_is_left_alone():
    rng = np.random.default_rng(2)
    g = rng.standard_normal((64, 8)).astype(np.float32)
    y = rng.integers(0, 2, 64)
    noise = marvell_noise(g, y, 1e6)
    assert noise.power == 0 and noise.sumkl == noise.sumkl_before
    assert np.array_equal(marvell(g, y, np.random.default_rng(0), sumkl=1e6), g)


def least_power_by_scipy(n, budget):
    """An independent solve of min power s.t. sumKL <= budget over all four variances (SLSQP, several starts)."""
    p, d = n.p, n.d

    def power(x):
        return p * (x[2] + (d - 1) * x[3]) + (1 - p) * (x[0] + (d - 1) * x[1])

    def slack(x):
        return budget - sum_kl(n.u, n.v, d, n.g, *np.maximum(x, 0))

    best = math.inf
    for scale in (0.3, 1.0, 3.0):
        x0 = np.array([n.lam10, n.lam20, n.lam11, n.lam21]) * scale + 1e-6
        r = minimize(power, x0, method="SLSQP", bounds=[(0, None)] * 4,
                     constraints=[{"type": "ineq", "fun": slack}], options={"maxiter": 500, "ftol": 1e-12})
        if r.success and slack(r.x) >= -1e-9 * budget:
            best = min(best, power(r.x))
    return best


@pytest.mark.parametrize("seed, rate, budget", [(3, 0.1, 0.25), (4, 0.5, 1.0), (5, 0.3, 4.0), (6, 0.05, 0.1)])
def test_the_power_is_the_least_that_meets_the_budget(seed, rate, budget):
    grads, labels = one_batch(seed, positive_rate=rate, width=6)
    n = marvell_noise(grads, labels, budget)
    assert n.power <= least_power_by_scipy(n, budget) * 1.005


def test_both_attacks_fall_on_a_leaky_set():
    grads, labels, ids = leaky_binary(np.random.default_rng(7), batches=30)
    assert norm_leak_auc(grads, labels) > 0.95 and direction_leak_auc(grads, labels, ids) > 0.95
    figures = []
    for budget in (4.0, 0.25, 0.05):
        rng = np.random.default_rng(8)
        out = np.concatenate([marvell(g, y, rng, sumkl=budget) for g, y in batches_of(grads, labels, ids)])
        figures.append((norm_leak_auc(out, labels), direction_leak_auc(out, labels, ids)))
    assert figures[0][0] < 0.9 and figures[0][1] < 0.9
    assert figures[-1][0] < 0.6 and figures[-1][1] < 0.6


def test_shape_dtype_and_determinism():
    grads, labels = one_batch(9)
    a = marvell(grads, labels, np.random.default_rng(1), sumkl=1.0)
    b = marvell(grads, labels, np.random.default_rng(1), sumkl=1.0)
    c = marvell(grads, labels, np.random.default_rng(2), sumkl=1.0)
    assert a.shape == grads.shape and a.dtype == np.float32
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert marvell(grads.astype(np.float64), labels.astype(np.float32), np.random.default_rng(1),
                   sumkl=1.0).dtype == np.float64


@pytest.mark.parametrize("g, y", [
    (np.ones((5, 3)), np.zeros(5)),                                     # one class present
    (np.ones((5, 3)), np.ones(5)),
    (np.zeros((4, 3)), np.array([0, 1, 0, 1])),                         # all zero
    (np.ones((4, 3)), np.array([0, 1, 0, 1])),                          # identical rows: nothing leaks
    (np.array([[1.0, 0], [0, 1], [0, 1.1]]), np.array([1, 0, 0])),      # one positive: its variance is 0
    (np.array([[1.0], [2.0], [5.0], [6.0]]), np.array([0, 0, 1, 1])),   # width 1
    (np.array([[1.0, 2.0], [1.0, 2.0], [3.0, 2.0]]), np.array([0, 0, 1])),  # two point masses
    (np.array([[1.0, 0], [-1.0, 0], [0, 1.0], [0, -1.0]]), np.array([0, 0, 1, 1])),  # equal means
    (np.zeros((1, 3)), np.array([1])),
    (np.zeros((0, 3)), np.zeros(0)),
])
def test_degenerate_batches_never_give_nan(g, y):
    out = marvell(g.astype(np.float32), y, np.random.default_rng(0), sumkl=0.5)
    assert out.shape == g.shape and np.isfinite(out).all()
    n = marvell_noise(g, y, 0.5) if len(y) else None
    if n is not None:
        assert n.sumkl <= 0.5 * (1 + 1e-9) and math.isfinite(n.power)


def test_a_single_class_batch_gets_isotropic_noise_at_its_scale():
    rng = np.random.default_rng(10)
    g = rng.standard_normal((4000, 4)).astype(np.float32) * 3
    noise = marvell(g, np.zeros(4000), np.random.default_rng(11), sumkl=1.0).astype(np.float64) - g
    # per-coordinate noise variance = mean squared row norm / width ~ 9; 16000 draws: relative SE of a
    # variance estimate sqrt(2 / 16000) ~ 1.1 %, tolerance 5 %
    expected = float((g.astype(np.float64) ** 2).sum(axis=1).mean()) / 4
    assert noise.var() == pytest.approx(expected, rel=0.05)


@settings(max_examples=100, deadline=None)
@given(st.integers(2, 30).flatmap(lambda n: st.tuples(
    hnp.arrays(np.float32, (n, 3), elements=st.floats(-100, 100, width=32)),
    hnp.arrays(np.int64, n, elements=st.integers(0, 1)))),
    st.floats(1e-3, 100))
def test_any_batch_gives_finite_gradients_within_budget(case, budget):
    g, y = case
    out = marvell(g, y, np.random.default_rng(0), sumkl=budget)
    assert np.isfinite(out).all()
    n = marvell_noise(g, y, budget)
    if n is not None:
        assert n.sumkl <= budget * (1 + 1e-6)


def test_bad_arguments():
    with pytest.raises(ValueError):
        marvell(np.ones((2, 2)), np.array([0, 1]), np.random.default_rng(0), sumkl=0.0)
    with pytest.raises(ValueError):
        marvell(np.ones((2, 2)), np.array([0, 2]), np.random.default_rng(0), sumkl=1.0)
