"""The leakage audit: the attacks' figures on sets where the answer is known, sklearn's AUC, and LeakAudit giving
exactly what an attacker computes on the same gradients."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from sklearn.metrics import roc_auc_score

from vfl.privacy.audit import LeakAudit, cluster_attack_accuracy, direction_leak_auc, norm_leak_auc
from vfl.privacy.spec import PrivacyError

from .synthetic import batches_of, leaky_binary


def folded(auc):
    return max(auc, 1 - auc)


def test_norm_attack_finds_imbalanced_positives_with_larger_norms():
    rng = np.random.default_rng(0)
    y = (rng.random(2000) < 0.1).astype(np.int64)
    scale = np.where(y == 1, 3.0, 1.0)[:, None]
    g = (rng.standard_normal((2000, 8)) * 0.1 + 1.0) * scale
    assert norm_leak_auc(g.astype(np.float32), y) > 0.99


def test_random_gradients_leak_nothing():
    # 4000 rows, about 2000 per class: the AUC of an uninformative score has standard error
    # sqrt((n+ + n- + 1) / (12 n+ n-)) ~ 0.0065, so 0.5 +- 0.03 is more than 4 standard errors wide
    rng = np.random.default_rng(1)
    g = rng.standard_normal((4000, 8)).astype(np.float32)
    y = rng.integers(0, 2, 4000)
    ids = np.arange(4000) // 40
    assert abs(norm_leak_auc(g, y) - 0.5) < 0.03
    assert abs(direction_leak_auc(g, y, ids) - 0.5) < 0.03


@settings(max_examples=150, deadline=None)
@given(st.integers(2, 60).flatmap(lambda n: st.tuples(
    hnp.arrays(np.float32, (n, 3), elements=st.sampled_from([0.0, 0.5, -1.0, 2.0, 1e-3])),  # ties on purpose
    hnp.arrays(np.int64, n, elements=st.integers(0, 1)))))
def test_norm_auc_equals_sklearns_with_ties(case):
    g, y = case
    if y.min() == y.max():
        assert math.isnan(norm_leak_auc(g, y))
        return
    norms = np.sqrt((g.astype(np.float64) ** 2).sum(axis=1))
    assert norm_leak_auc(g, y) == pytest.approx(folded(roc_auc_score(y, norms)), abs=1e-12)


def test_direction_auc_is_sklearns_on_the_documented_scores():
    rng = np.random.default_rng(2)
    g = rng.standard_normal((300, 5)).astype(np.float32)
    y = rng.integers(0, 2, 300)
    ids = np.repeat(np.arange(10), 30)
    scores, truth = [], []
    for b in range(10):
        rows = np.flatnonzero(ids == b)
        ref, rest = rows[0], rows[1:]
        gr = g.astype(np.float64)
        cos = gr[rest] @ gr[ref] / (np.linalg.norm(gr[rest], axis=1) * np.linalg.norm(gr[ref]))
        scores.append(cos if y[ref] == 1 else -cos)
        truth.append(y[rest])
    expected = folded(roc_auc_score(np.concatenate(truth), np.concatenate(scores)))
    assert direction_leak_auc(g, y, ids) == pytest.approx(expected, abs=1e-9)


def test_direction_attack_reads_the_sign_of_a_split_networks_gradient():
    grads, labels, ids = leaky_binary(np.random.default_rng(3), positive_rate=0.5)
    assert direction_leak_auc(grads, labels, ids) > 0.99
    # the batch ids group rows, whatever their values or order
    perm = np.random.default_rng(4).permutation(len(labels))
    assert direction_leak_auc(grads[perm], labels[perm], ids[perm] * 7 + 3) > 0.99


def test_degenerate_inputs_give_nan_not_errors():
    g = np.ones((5, 3), np.float32)
    assert math.isnan(norm_leak_auc(g, np.zeros(5)))
    assert math.isnan(direction_leak_auc(g, np.array([1, 0, 0, 0, 0]), np.arange(5)))  # every row a reference
    assert math.isnan(direction_leak_auc(np.zeros((0, 3)), np.zeros(0), np.zeros(0)))
    assert math.isnan(cluster_attack_accuracy(g, np.arange(5), np.zeros(5), 5))
    # zero gradients: cosine 0, no crash
    assert direction_leak_auc(np.zeros((6, 3)), np.array([1, 0, 1, 0, 1, 0]), np.zeros(6)) == 0.5


def test_bad_inputs_are_refused():
    with pytest.raises(PrivacyError):
        norm_leak_auc(np.ones((3, 2)), np.array([0, 1, 2]))
    with pytest.raises(PrivacyError):
        direction_leak_auc(np.ones((3, 2)), np.array([0, 1, 1]), np.zeros(2))
    with pytest.raises(PrivacyError):
        norm_leak_auc(np.ones(3), np.array([0, 1, 1]))


def multiclass_grads(rng, *, batches=20, batch=50, width=12, k=4, noise=0.05):
    """Multiclass split-network gradients: ``W^T (softmax(z) - onehot(y))`` with a fixed W per step."""
    grads, labels, ids = [], [], []
    for step in range(batches):
        w = rng.standard_normal((k, width))
        y = rng.integers(0, k, batch)
        z = 0.3 * rng.standard_normal((batch, k))
        p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        g = (p - np.eye(k)[y]) @ w + noise * rng.standard_normal((batch, width))
        grads.append(g.astype(np.float32))
        labels.append(y)
        ids.append(np.full(batch, step))
    return np.concatenate(grads), np.concatenate(labels), np.concatenate(ids)


def test_cluster_attack_recovers_multiclass_labels():
    g, y, ids = multiclass_grads(np.random.default_rng(5))
    assert cluster_attack_accuracy(g, y, ids, 4) > 0.9
    # on random gradients it is near chance (1/4): 920 attacked rows, binomial SE ~ 0.014, tolerance 5 SE
    r = np.random.default_rng(6).standard_normal(g.shape)
    assert abs(cluster_attack_accuracy(r, y, ids, 4) - 0.25) < 0.07


def test_cluster_attack_on_a_hand_made_batch():
    g = np.array([[1, 0], [0, 1], [0.9, 0.1], [0.2, 0.8], [1, 0.2]], np.float32)
    y = np.array([0, 1, 0, 1, 1])
    # references rows 0 (class 0) and 1 (class 1); rows 2, 3 are right, row 4 (closer to class 0) wrong
    assert cluster_attack_accuracy(g, y, np.zeros(5), 2) == pytest.approx(2 / 3)


def test_leak_audit_matches_an_attacker_on_the_same_gradients():
    grads, labels, ids = leaky_binary(np.random.default_rng(7))
    audit = LeakAudit("binary", 2)
    other = np.random.default_rng(8).standard_normal(grads.shape).astype(np.float32)
    for (g, y), (o, _) in zip(batches_of(grads, labels, ids), batches_of(other, labels, ids)):
        audit.add("dh1", g, y.astype(np.float32))  # binary labels arrive as float32 0/1
        audit.add("dh2", o, y)
    result = audit.result()
    assert result["dh1"] == {"leak_auc_norm": norm_leak_auc(grads, labels),
                             "leak_auc_direction": direction_leak_auc(grads, labels, ids)}
    assert result["dh1"]["leak_auc_norm"] > 0.95 and result["dh1"]["leak_auc_direction"] > 0.95
    assert result["dh2"]["leak_auc_direction"] == direction_leak_auc(other, labels, ids)
    assert audit.result() == {}  # reset for the next epoch


def test_leak_audit_multiclass_and_regression():
    g, y, ids = multiclass_grads(np.random.default_rng(9))
    audit = LeakAudit("multiclass", 4)
    for step in np.unique(ids):
        audit.add("dh1", g[ids == step], y[ids == step])
    assert audit.result() == {"dh1": {"leak_attack_accuracy": cluster_attack_accuracy(g, y, ids, 4)}}
    reg = LeakAudit("regression", 0)
    reg.add("dh1", g, np.zeros(len(g)))
    assert reg.result() == {}
    with pytest.raises(PrivacyError):
        LeakAudit("ranking", 2)
    with pytest.raises(PrivacyError):
        LeakAudit("binary", 2).add("dh1", g[:3], np.array([0, 1, 3]))


def test_a_diverged_step_gives_nan_figures_not_an_error():
    audit = LeakAudit("binary", 2)
    g = np.ones((4, 2), np.float32)
    audit.add("dh1", g, np.array([0, 1, 0, 1]))
    audit.add("dh1", np.full((4, 2), np.nan, np.float32), np.array([0, 1, 0, 1]))
    figures = audit.result()["dh1"]
    assert set(figures) == {"leak_auc_norm", "leak_auc_direction"} and all(map(math.isnan, figures.values()))
    audit.add("dh1", g * np.arange(1, 5)[:, None], np.array([0, 1, 0, 1]))
    assert audit.result()["dh1"]["leak_auc_norm"] == 0.75  # the next epoch is scored again


def test_an_audit_carried_over_a_checkpoint_reports_what_an_uninterrupted_one_does():
    """``state`` / ``load_state``: a label holder resumed mid-epoch goes on from the epoch so far (its checkpoint
    carries it), and the epoch's figures are those of all its steps, to the last bit."""
    rng = np.random.default_rng(3)
    steps = [(rng.normal(size=(8, 4)).astype(np.float32), rng.integers(0, 2, size=8)) for _ in range(5)]
    whole, before = LeakAudit("binary", 2), LeakAudit("binary", 2)
    for i, (g, y) in enumerate(steps):
        whole.add("dh1", g, y)
        if i < 2:
            before.add("dh1", g, y)
    resumed = LeakAudit("binary", 2)
    resumed.load_state(before.state())
    for g, y in steps[2:]:
        resumed.add("dh1", g, y)
    want = whole.result()
    assert resumed.result() == want and not math.isnan(want["dh1"]["leak_auc_direction"])
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    many, again = LeakAudit("multiclass", 3), LeakAudit("multiclass", 3)
    many.add("dh2", steps[0][0], labels)
    again.load_state(many.state())
    assert again.result() == many.result()
