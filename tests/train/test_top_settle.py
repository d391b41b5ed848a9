"""The label holder's top finishes a step (optimizer step, training outputs, audit) after the step's gradients are
returned, so its BACKWARDs need not wait for that work; every use of the model settles first, so the result is the
same as finishing at once."""

from __future__ import annotations

import numpy as np
import torch

from vfl.train.segments import TorchTop

from .test_top_privacy import ACTS, PARTIES, batch, top


def unsettled_step(segment: TorchTop, s: int) -> dict[str, np.ndarray]:
    sent = segment.train_step(s, batch(s), {p: ACTS[p][batch(s)] for p in PARTIES})
    assert segment.unsettled
    return sent


def weights(segment: TorchTop) -> list[torch.Tensor]:
    return [p.detach().clone() for p in segment.top.parameters()]


def test_a_step_returns_its_gradients_before_the_optimizer_moves_the_weights():
    segment = top()
    before = weights(segment)
    unsettled_step(segment, 0)
    assert all(torch.equal(a, b) for a, b in zip(before, weights(segment)))  # not stepped yet
    segment.settle()
    assert not segment.unsettled and not all(torch.equal(a, b) for a, b in zip(before, weights(segment)))


def test_settling_late_or_at_once_gives_the_same_gradients_weights_metrics_and_audit():
    early, late = top(), top()
    for s in range(6):
        a = unsettled_step(early, s)
        early.settle()  # as the node does once the BACKWARDs are out
        b = unsettled_step(late, s)  # the next step settles the last one itself
        assert all(np.array_equal(a[p], b[p]) for p in PARTIES), s
    m_early, m_late = early.end_epoch(0), late.end_epoch(0)  # end_epoch settles the last step
    assert m_early == m_late and any(k.startswith("leak_") for k in m_late), (m_early, m_late)
    assert all(torch.equal(a, b) for a, b in zip(weights(early), weights(late)))


def test_every_use_of_the_model_settles_first():
    acts = {p: ACTS[p][batch(1)] for p in PARTIES}
    uses = {
        "state": lambda seg: seg.state(),
        "end_epoch": lambda seg: seg.end_epoch(0),
        "eval_batch": lambda seg: seg.eval_batch(0, batch(1), acts),
        "predict": lambda seg: seg.predict(batch(1), acts),
    }
    for name, use in uses.items():
        segment = top()
        unsettled_step(segment, 0)
        stepped = top()
        unsettled_step(stepped, 0)
        stepped.settle()
        use(segment)
        assert not segment.unsettled, name
        assert all(torch.equal(a, b) for a, b in zip(weights(segment), weights(stepped))), name


def test_the_step_time_for_auto_window_includes_the_settling_of_the_step_before():
    segment = top()
    unsettled_step(segment, 0)
    segment.settle()
    assert segment._settle_seconds > 0
    unsettled_step(segment, 1)
    assert segment._settle_seconds == 0.0 and segment.last_step_seconds > 0
