"""vfl.train.central: schedules, and split_step (as the nodes run it) reproducing train_central (the reference)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from vfl.train.central import (
    OptimizerSpec,
    Schedule,
    ScheduleError,
    as_targets,
    make_schedule,
    pullback,
    split_step,
    task_loss,
    train_central,
)
from vfl.train.models import Combiner, MlpSpec, build_mlp


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------------------ schedule


def test_make_schedule_is_explicit_and_complete():
    s = make_schedule(103, batch_size=10, epochs=3, seed=42, validation_fraction=0.2)
    assert s.validation.size == 21 and s.train.size == 82
    assert np.intersect1d(s.train, s.validation).size == 0
    np.testing.assert_array_equal(np.union1d(s.train, s.validation), np.arange(103))
    assert len(s.epochs) == 3 and s.n_steps == 27
    for batches in s.epochs:
        assert [b.size for b in batches] == [10] * 8 + [2]
        assert all(b.dtype == np.int64 for b in batches)
        np.testing.assert_array_equal(np.sort(np.concatenate(batches)), s.train)
    assert not np.array_equal(np.concatenate(s.epochs[0]), np.concatenate(s.epochs[1]))
    steps = list(s.steps())
    assert [st for st, _, _ in steps] == list(range(27)) and steps[9][1] == 1


def test_make_schedule_deterministic_and_seed_dependent():
    a = make_schedule(50, 8, 2, seed=7, validation_fraction=0.1)
    b = make_schedule(50, 8, 2, seed=7, validation_fraction=0.1)
    c = make_schedule(50, 8, 2, seed=8, validation_fraction=0.1)
    np.testing.assert_array_equal(a.validation, b.validation)
    for ea, eb in zip(a.epochs, b.epochs):
        for x, y in zip(ea, eb):
            np.testing.assert_array_equal(x, y)
    assert not np.array_equal(np.concatenate(a.epochs[0]), np.concatenate(c.epochs[0]))


def test_make_schedule_pinned_first_epoch():
    # pins the documented construction (one PCG64 stream: split permutation, then one permutation per epoch)
    from numpy.random import PCG64, Generator

    rng = Generator(PCG64(3))
    perm = rng.permutation(10)
    train = np.sort(perm[2:])
    first = train[rng.permutation(8)]
    s = make_schedule(10, 4, 1, seed=3, validation_fraction=0.2)
    np.testing.assert_array_equal(s.validation, np.sort(perm[:2]))
    np.testing.assert_array_equal(np.concatenate(s.epochs[0]), first)


def test_make_schedule_drop_last_and_arguments():
    s = make_schedule(10, 4, 2, seed=0, drop_last=True)
    assert all([b.size for b in e] == [4, 4] for e in s.epochs) and s.validation.size == 0
    with pytest.raises(ScheduleError, match="batch_size"):
        make_schedule(10, 0, 1, seed=0)
    with pytest.raises(ScheduleError, match="validation_fraction"):
        make_schedule(10, 2, 1, seed=0, validation_fraction=1.0)
    with pytest.raises(ScheduleError, match="no training rows"):
        make_schedule(1, 2, 1, seed=0, validation_fraction=0.6)


def test_schedule_validates_received_arrays():
    ok = dict(n_rows=6, train=[0, 1, 2, 3], validation=[4, 5], epochs=[[[0, 1], [2, 3]]])
    assert Schedule(**ok).n_steps == 2
    with pytest.raises(ScheduleError, match="overlap"):
        Schedule(**{**ok, "validation": [3, 4]})
    with pytest.raises(ScheduleError, match="out of range"):
        Schedule(**{**ok, "validation": [4, 6]})
    with pytest.raises(ScheduleError, match="not training rows"):
        Schedule(**{**ok, "epochs": [[[0, 4]]]})
    with pytest.raises(ScheduleError, match="repeats a row"):
        Schedule(**{**ok, "epochs": [[[0, 1], [1, 2]]]})
    with pytest.raises(ScheduleError, match="empty"):
        Schedule(**{**ok, "epochs": [[[]]]})
    with pytest.raises(ScheduleError, match="integer"):
        Schedule(**{**ok, "epochs": [[[0.0, 1.0]]]})


# --------------------------------------------------------------------------------------------- central vs split_step

N_ROWS = 80
DIMS = (3, 5, 2)  # three holders; think of the last one as the label holder's own features


def make_problem(task: str, mode: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    features = [rng.normal(size=(N_ROWS, d)).astype(np.float32) for d in DIMS]
    signal = sum(f.sum(axis=1) for f in features)
    if task == "multiclass":
        labels = np.digitize(signal, np.quantile(signal, [1 / 3, 2 / 3])).astype(np.int64)
        out_width = 3
    elif task == "binary":
        labels = (signal > 0).astype(np.float32)
        out_width = 1
    else:
        labels = (signal + 0.1 * rng.normal(size=N_ROWS)).astype(np.float32)
        out_width = 1
    widths = (4, 4, 4) if mode == "sum" else (4, 3, 2)
    bottoms = [build_mlp(d, MlpSpec((6, w), activation="tanh"), seed=10 + i)
               for i, (d, w) in enumerate(zip(DIMS, widths))]
    combiner = Combiner(widths, mode)
    top = build_mlp(combiner.out_features, MlpSpec((8, out_width)), seed=99)
    return features, labels, bottoms, top, combiner


OPTIMIZERS = {
    "sgd-momentum": OptimizerSpec("sgd", lr=0.05, momentum=0.9, weight_decay=1e-3),
    "adam": OptimizerSpec("adam", lr=0.01, weight_decay=1e-4),
}


def run_split(features, labels, bottoms, top, combiner, task, schedule, bottom_opt, top_opt):
    """The distributed loop, in one process: every step through split_step with one optimizer per segment."""
    bottoms = [copy.deepcopy(b) for b in bottoms]
    top = copy.deepcopy(top)
    optimizers = [bottom_opt.build(b.parameters()) for b in bottoms] + [top_opt.build(top.parameters())]
    targets = as_targets(task, labels)
    loss_fn = task_loss(task)
    losses = []
    for _, _, rows in schedule.steps():
        x = [torch.from_numpy(f[rows]) for f in features]
        result = split_step(bottoms, top, combiner, x, targets[torch.from_numpy(rows)], loss_fn,
                            optimizers=optimizers)
        losses.append(result.loss)
    return bottoms, top, losses


def max_abs_diff(state: dict, module: torch.nn.Module) -> float:
    other = module.state_dict()
    assert state.keys() == other.keys()
    return max((state[k] - other[k]).abs().max().item() for k in state)


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
@pytest.mark.parametrize("mode", ["concat", "sum"])
@pytest.mark.parametrize("task", ["multiclass", "binary", "regression"])
def test_split_step_reproduces_central_training(task, mode, opt):
    features, labels, bottoms, top, combiner = make_problem(task, mode)
    initial = [copy.deepcopy(m.state_dict()) for m in [*bottoms, top]]
    schedule = make_schedule(N_ROWS, batch_size=16, epochs=3, seed=5, validation_fraction=0.2)
    top_opt = OptimizerSpec("adam", lr=0.005) if opt == "adam" else OptimizerSpec("sgd", lr=0.1, momentum=0.5)

    central = train_central(features, labels, bottoms, top, combiner=combiner, task=task, schedule=schedule,
                            bottom_optimizers=OPTIMIZERS[opt], top_optimizer=top_opt)
    split_bottoms, split_top, split_losses = run_split(features, labels, bottoms, top, combiner, task, schedule,
                                                       OPTIMIZERS[opt], top_opt)

    # the inputs were not trained in place (train_central and run_split work on copies)
    for state, m in zip(initial, [*bottoms, top]):
        assert max_abs_diff(state, m) == 0.0
    # training moved every segment ...
    for state, st0 in zip([*central.bottom_states, central.top_state], initial):
        assert max((state[k] - st0[k]).abs().max().item() for k in state) > 1e-3
    # ... and split_step got to the same weights and losses
    for state, m in zip([*central.bottom_states, central.top_state], [*split_bottoms, split_top]):
        assert max_abs_diff(state, m) <= 1e-6
    assert len(split_losses) == schedule.n_steps == len(central.step_losses)
    np.testing.assert_allclose(split_losses, central.step_losses, rtol=0, atol=1e-6)


def test_split_step_cut_gradients_are_what_each_holder_needs():
    features, labels, bottoms, top, combiner = make_problem("binary", "concat")
    rows = np.arange(16)
    x = [torch.from_numpy(f[rows]) for f in features]
    y = as_targets("binary", labels[rows])
    # autograd through the whole composed graph
    acts = [b(xi) for b, xi in zip(bottoms, x)]
    for a in acts:
        a.retain_grad()
    task_loss("binary")(top(combiner.combine(acts)), y).backward()
    expected = [a.grad.clone() for a in acts]
    for m in [*bottoms, top]:
        m.zero_grad(set_to_none=True)
    result = split_step(bottoms, top, combiner, x, y, task_loss("binary"))
    assert [g.shape for g in result.cut_grads] == [(16, 4), (16, 3), (16, 2)]
    for g, e in zip(result.cut_grads, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-7)
    assert all(p.grad is not None for m in [*bottoms, top] for p in m.parameters())


def test_train_central_is_deterministic_and_records_history():
    features, labels, bottoms, top, combiner = make_problem("binary", "concat")
    schedule = make_schedule(N_ROWS, 16, 2, seed=1, validation_fraction=0.25)
    kw = dict(combiner=combiner, task="binary", schedule=schedule, bottom_optimizers=OPTIMIZERS["adam"],
              top_optimizer=OPTIMIZERS["adam"])
    a = train_central(features, labels, bottoms, top, **kw)
    b = train_central(features, labels, bottoms, top, **kw)
    assert a.step_losses == b.step_losses and a.history == b.history
    for sa, sb in zip(a.bottom_states, b.bottom_states):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [h["epoch"] for h in a.history] == [0, 1]
    assert set(a.history[0]) == {"epoch", "steps", "train_loss", "train_accuracy", "train_auc",
                                 "val_loss", "val_accuracy", "val_auc"}


def test_train_central_accepts_plain_epoch_lists():
    features, labels, bottoms, top, combiner = make_problem("regression", "sum")
    schedule = make_schedule(N_ROWS, 20, 2, seed=2, validation_fraction=0.1)
    plain = [[b.tolist() for b in e] for e in schedule.epochs]
    kw = dict(combiner=combiner, task="regression", bottom_optimizers=OPTIMIZERS["sgd-momentum"],
              top_optimizer=OPTIMIZERS["sgd-momentum"])
    a = train_central(features, labels, bottoms, top, schedule=schedule, **kw)
    b = train_central(features, labels, bottoms, top, schedule=plain, validation=schedule.validation, **kw)
    assert a.step_losses == b.step_losses and a.history == b.history
    assert set(a.history[-1]) == {"epoch", "steps", "train_loss", "train_rmse", "val_loss", "val_rmse"}


def test_train_central_learns():
    features, labels, bottoms, top, combiner = make_problem("binary", "concat", seed=3)
    schedule = make_schedule(N_ROWS, 8, 30, seed=0, validation_fraction=0.25)
    r = train_central(features, labels, bottoms, top, combiner=combiner, task="binary", schedule=schedule,
                      bottom_optimizers=OptimizerSpec("adam", lr=0.02), top_optimizer=OptimizerSpec("adam", lr=0.02))
    assert r.history[-1]["train_loss"] < 0.5 * r.history[0]["train_loss"]
    assert r.history[-1]["val_auc"] > 0.9


def test_train_central_argument_errors():
    features, labels, bottoms, top, combiner = make_problem("binary", "concat")
    schedule = make_schedule(N_ROWS, 16, 1, seed=0)
    with pytest.raises(ValueError, match="2 feature arrays but 3 bottom"):
        train_central(features[:2], labels, bottoms, top, combiner=combiner, task="binary", schedule=schedule)
    with pytest.raises(ValueError, match="float32"):
        train_central([f.astype(np.float64) for f in features], labels, bottoms, top, combiner=combiner,
                      task="binary", schedule=schedule)
    with pytest.raises(ValueError, match="unknown task"):
        train_central(features, labels, bottoms, top, combiner=combiner, task="ranking", schedule=schedule)
    with pytest.raises(ValueError, match="unknown optimizer"):
        OptimizerSpec("rmsprop")
    assert OptimizerSpec.from_dict(OPTIMIZERS["adam"].to_dict()) == OPTIMIZERS["adam"]


def test_pullback_gives_the_gradients_of_backward_with_grad_bit_for_bit():
    gen = torch.Generator().manual_seed(11)
    for scale in (1e-3, 1.0, 1e3):
        x = torch.randn(17, 5, generator=gen) * scale
        g = torch.randn(17, 4, generator=gen) / scale
        a, b, c = (build_mlp(5, MlpSpec(widths=(8, 4), activation="tanh"), seed=2) for _ in range(3))
        a(x).backward(g)
        pullback(b(x), g).backward()
        out = c(x)
        grads = torch.autograd.grad(pullback(out, g), list(c.parameters()))
        for pa, pb, gc in zip(a.parameters(), b.parameters(), grads):
            assert torch.equal(pa.grad, pb.grad) and torch.equal(pa.grad, gc)
    with pytest.raises(ValueError, match="shape"):
        pullback(torch.ones(3, 4, requires_grad=True), torch.ones(1, 4))  # would broadcast
