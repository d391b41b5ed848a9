"""vfl.train.metrics: exact ROC AUC (ties), accuracy, losses, RMSE."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from vfl.train.metrics import (
    accuracy,
    binary_cross_entropy_with_logits,
    cross_entropy,
    evaluate,
    mean_squared_error,
    rmse,
    roc_auc,
)

try:
    from sklearn.metrics import roc_auc_score
except ImportError:  # pragma: no cover - sklearn is optional
    roc_auc_score = None


def brute_force_auc(y, s) -> float:
    pos = [v for v, t in zip(s, y) if t]
    neg = [v for v, t in zip(s, y) if not t]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


# small integer scores make ties frequent; floats cover the no-tie case
_scores = st.one_of(st.integers(-3, 3).map(float),
                    st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.booleans(), _scores), min_size=2, max_size=60))
def test_auc_equals_pairwise_brute_force(rows):
    y = np.array([r[0] for r in rows])
    s = np.array([r[1] for r in rows])
    got = roc_auc(y.astype(np.float32), s)
    if y.all() or not y.any():
        assert math.isnan(got)
        return
    assert got == pytest.approx(brute_force_auc(y, s), abs=1e-12)
    if roc_auc_score is not None:
        assert got == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_auc_ties_and_edges():
    assert roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75
    assert roc_auc([0, 0, 1, 1], [1, 2, 3, 4]) == 1.0
    assert roc_auc([1, 1, 0, 0], [1, 2, 3, 4]) == 0.0
    assert roc_auc([0, 1, 1], [1, 1, 2]) == 0.75  # one tie counts one half
    assert math.isnan(roc_auc([1, 1], [0.2, 0.3]))
    assert roc_auc(np.array([0, 1]), np.array([[0.1], [0.9]])) == 1.0  # [n, 1] scores
    with pytest.raises(ValueError, match="NaN"):
        roc_auc([0, 1], [0.1, float("nan")])
    with pytest.raises(ValueError, match="0 or 1"):
        roc_auc(np.array([0.0, 2.0]), [0.1, 0.2])


@pytest.mark.skipif(roc_auc_score is None, reason="scikit-learn not installed")
def test_auc_matches_sklearn_large():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 20000)
    s = np.round(rng.normal(size=20000) + y, 1)  # many ties
    assert roc_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_accuracy():
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.0, 5.0], [1.0, 0.0, 0.0]])
    assert accuracy(logits, [0, 1, 2, 2], "multiclass") == 0.75
    assert accuracy(np.array([[-1.0], [2.0], [0.0]]), np.array([0.0, 1.0, 1.0], np.float32), "binary") == 2 / 3
    with pytest.raises(ValueError):
        accuracy([1.0], [1.0], "regression")
    with pytest.raises(ValueError, match="rows"):
        accuracy(logits, [0, 1], "multiclass")


def test_rmse_and_mse():
    assert rmse([1.0, 2.0, 3.0], [1.0, 2.0, 5.0]) == pytest.approx(math.sqrt(4 / 3))
    assert mean_squared_error(np.array([[1.0], [3.0]]), [0.0, 0.0]) == 5.0
    assert math.isnan(rmse([], []))


def test_losses_match_torch():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(50, 4)) * 10
    y = rng.integers(0, 4, 50)
    ref = F.cross_entropy(torch.from_numpy(z), torch.from_numpy(y)).item()
    assert cross_entropy(z, y) == pytest.approx(ref, rel=1e-12)
    zb = rng.normal(size=50) * 30
    yb = rng.integers(0, 2, 50).astype(np.float64)
    ref = F.binary_cross_entropy_with_logits(torch.from_numpy(zb), torch.from_numpy(yb)).item()
    assert binary_cross_entropy_with_logits(zb[:, None], yb) == pytest.approx(ref, rel=1e-12)
    with pytest.raises(ValueError, match="out of range"):
        cross_entropy(z, np.full(50, 4))


def test_evaluate_keys():
    assert set(evaluate("multiclass", np.zeros((2, 3)), [0, 1])) == {"loss", "accuracy"}
    assert set(evaluate("binary", np.zeros((2, 1)), [0.0, 1.0])) == {"loss", "accuracy", "auc"}
    r = evaluate("regression", np.array([[1.0], [3.0]]), [1.0, 1.0])
    assert r == {"loss": 2.0, "rmse": math.sqrt(2.0)}
    with pytest.raises(ValueError):
        evaluate("ranking", [], [])
