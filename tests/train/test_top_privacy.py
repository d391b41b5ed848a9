"""The label holder's top segment with a defence and the audit, in memory: the defence is the last thing done to each
data holder's gradient, from a generator fixed by the seed, the step and the party; the audit sees exactly what is
returned (sent), with the TRUE labels; a rollback never counts a step twice; no defence changes nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vfl.privacy.audit import LeakAudit
from vfl.privacy.label_dp import flip_probability
from vfl.privacy.spec import PrivacySpec
from vfl.train.central import OptimizerSpec
from vfl.train.models import Combiner, MlpSpec, build_mlp
from vfl.train.segments import TorchTop, label_dp_targets, privacy_rng

N, BATCH = 96, 16
PARTIES = ["dh1", "dh2"]
RNG = np.random.default_rng(7)
ACTS = {p: RNG.normal(size=(N, 4)).astype(np.float32) for p in PARTIES}
TRUE = (RNG.random(N) < 0.3).astype(np.float32)


def top(privacy: PrivacySpec = PrivacySpec(), audit: bool = True, targets=TRUE, seed: int = 11) -> TorchTop:
    model = build_mlp(8, MlpSpec(widths=(8, 1)), seed=3)
    return TorchTop(top=model, optimizer=OptimizerSpec.from_dict({"kind": "sgd", "lr": 0.1}).build(model.parameters()),
                    combiner=Combiner([4, 4]), order=PARTIES, task="binary", targets=targets, privacy=privacy,
                    audit=audit, true_targets=TRUE, privacy_seed=seed, n_classes=2)


def batch(step: int) -> np.ndarray:
    return np.arange(step * BATCH, (step + 1) * BATCH) % N


def steps(segment: TorchTop, numbers) -> list[dict[str, np.ndarray]]:
    return [segment.train_step(s, batch(s), {p: ACTS[p][batch(s)] for p in PARTIES}) for s in numbers]


def audited(sent: list[dict[str, np.ndarray]], numbers) -> dict:
    audit = LeakAudit("binary", 2)
    for s, grads in zip(numbers, sent):
        for p in PARTIES:
            audit.add(p, grads[p], TRUE[batch(s)].astype(np.int64))
    return audit.result()


def test_no_defence_returns_the_plain_gradients_and_the_audit_changes_nothing(one_thread):
    with_audit, without = steps(top(), range(4)), steps(top(audit=False), range(4))
    for a, b in zip(with_audit, without):
        assert all(np.array_equal(a[p], b[p]) and a[p].dtype == np.float32 for p in PARTIES)
    plain = top(audit=False)
    assert "leak_auc_norm" not in plain.end_epoch(0)


def test_the_audit_reports_what_was_sent_nested_by_party(one_thread):
    segment = top(PrivacySpec.from_table({"defence": "gradient_noise", "clip": 0.1, "sigma": 0.5}))
    sent = steps(segment, range(6))
    metrics = segment.end_epoch(0)
    expected = audited(sent, range(6))
    for key in ("leak_auc_norm", "leak_auc_direction"):
        assert metrics[key] == {p: expected[p][key] for p in PARTIES}
    assert isinstance(metrics["train_loss"], float)
    assert "leak_auc_norm" not in segment.end_epoch(1)  # each epoch starts empty


def test_max_norm_is_applied_to_what_is_returned(one_thread):
    sent = steps(top(PrivacySpec.from_table({"defence": "max_norm"})), range(3))
    for grads in sent:
        for p in PARTIES:
            norms = np.linalg.norm(grads[p].astype(np.float64), axis=1)
            assert np.allclose(norms[norms > 0], norms.max(), rtol=1e-5)


def test_the_defence_is_the_same_for_the_same_seed_step_and_party(one_thread):
    spec = PrivacySpec.from_table({"defence": "gradient_noise", "clip": 1.0, "sigma": 1.0})
    a, b = steps(top(spec), range(3)), steps(top(spec), range(3))
    other = steps(top(spec, seed=12), range(3))
    for x, y, z in zip(a, b, other):
        for p in PARTIES:
            assert np.array_equal(x[p], y[p]) and not np.array_equal(x[p], z[p])
    assert not np.array_equal(privacy_rng(11, 0, "dh1").random(4), privacy_rng(11, 0, "dh2").random(4))
    assert not np.array_equal(privacy_rng(11, 0, "dh1").random(4), privacy_rng(11, 1, "dh1").random(4))


def test_a_rollback_drops_what_the_audit_had_of_the_epoch(one_thread):
    segment = top()
    steps(segment, range(4))
    again = steps(segment, [2, 3, 4])  # a rejoin rolled every party back to the checkpoint at step 2
    metrics = segment.end_epoch(0)
    expected = audited(again, [2, 3, 4])
    assert metrics["leak_auc_norm"] == {p: expected[p]["leak_auc_norm"] for p in PARTIES}


def test_the_audit_and_the_metrics_use_the_true_labels_when_training_on_others(one_thread):
    flipped = 1.0 - TRUE  # what label_dp at a tiny epsilon could train on
    segment = top(targets=flipped)
    sent = steps(segment, range(6))
    metrics = segment.end_epoch(0)
    expected = audited(sent, range(6))
    assert metrics["leak_auc_direction"] == {p: expected[p]["leak_auc_direction"] for p in PARTIES}
    assert np.array_equal(segment.targets.numpy(), flipped) and np.array_equal(segment.true_targets.numpy(), TRUE)


def test_label_dp_targets_are_randomised_once_from_the_seed_at_the_rate_epsilon_implies():
    labels = (np.random.default_rng(1).random(20_000) < 0.5).astype(np.float32)
    spec = PrivacySpec.from_table({"defence": "label_dp", "epsilon": 1.0})
    first, second = label_dp_targets(spec, labels, 2, seed=5), label_dp_targets(spec, labels, 2, seed=5)
    assert np.array_equal(first, second) and first.dtype == labels.dtype
    assert not np.array_equal(first, label_dp_targets(spec, labels, 2, seed=6))
    # the flip rate within 5 binomial standard errors of 1 - e/(e + 1) (about 0.27), a bound fixed by the seed
    p = flip_probability(2, 1.0)
    rate = float(np.mean(first != labels))
    assert abs(rate - p) <= 5 * np.sqrt(p * (1 - p) / len(labels)), (rate, p)
    for other in ("none", "max_norm"):
        assert label_dp_targets(PrivacySpec.from_table({"defence": other}), labels, 2, seed=5) is labels


@pytest.mark.parametrize("task", ["multiclass", "regression"])
def test_other_tasks(one_thread, task):
    targets = (np.arange(N) % 3).astype(np.int64) if task == "multiclass" else RNG.normal(size=N).astype(np.float32)
    out = 3 if task == "multiclass" else 1
    model = build_mlp(8, MlpSpec(widths=(8, out)), seed=3)
    segment = TorchTop(top=model, optimizer=OptimizerSpec.from_dict({"kind": "sgd", "lr": 0.1}).build(model.parameters()),
                       combiner=Combiner([4, 4]), order=PARTIES, task=task, targets=targets, audit=True,
                       privacy=PrivacySpec.from_table({"defence": "max_norm"}), n_classes=3)
    steps(segment, range(3))
    metrics = segment.end_epoch(0)
    if task == "multiclass":
        assert set(metrics["leak_attack_accuracy"]) == set(PARTIES)
    else:
        assert not any(k.startswith("leak_") for k in metrics)
    assert torch.is_tensor(segment.targets)
