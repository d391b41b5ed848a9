"""`window = "auto"` (PROTOCOL.md [X13], v1.6), in memory: the session config, the choice, WINDOW at both ends."""

from __future__ import annotations

import numpy as np
import pytest

from vfl.protocol import ErrorCode, Forward, RemoteProtocolError, SessionConfig, Tensor, Window
from vfl.protocol.session import DEFAULT_MAX_WINDOW
from vfl.protocol.training_phase import PROBE_STEPS, DataHolderTraining, LabelHolderTraining, TrainPlan, auto_window

from .test_training_phase import WIDTH, FakeBottom, FakeTop, deliver

FIXED = dict(cut_widths={"dh1": 4}, batch_size=8, model="m", psi=True, train=True)


def test_a_fixed_window_keeps_its_digest_and_auto_carries_max_window():
    assert "max_window" not in SessionConfig(window=4, **FIXED).to_wire()
    auto = SessionConfig(window="auto", max_window=8, **FIXED)
    assert auto.to_wire()["window"] == "auto" and auto.to_wire()["max_window"] == 8
    assert auto.first_window == 1 and SessionConfig(window=4, **FIXED).first_window == 4
    assert SessionConfig.from_wire(auto.to_wire()) == auto
    assert SessionConfig(window="auto", **FIXED).max_window == DEFAULT_MAX_WINDOW


@pytest.mark.parametrize("wire, match", [
    ({"window": "AUTO"}, "window must be an integer >= 1 or \"auto\""),
    ({"window": 0}, "window must be an integer >= 1 or \"auto\""),
    ({"window": "auto", "max_window": 0}, "max_window must be an integer in 1..1024"),
    ({"window": "auto", "max_window": True}, "max_window must be an integer"),
    ({"window": 2, "max_window": 4}, "max_window is present but window is not \"auto\""),
])
def test_a_peers_window_fields_are_checked(wire, match):
    value = {**SessionConfig(window=1, **FIXED).to_wire(), **wire}
    with pytest.raises(RemoteProtocolError, match=match) as info:
        SessionConfig.from_wire(value)
    assert info.value.code is ErrorCode.BAD_FIELD


def test_the_window_covers_a_whole_step_period_with_the_label_holders_own_compute():
    # 50 ms from one step to the next at window 1, 5 ms of it at the label holder: 10 steps in flight keep it busy
    assert auto_window([0.050] * 8, [0.005] * 8, 16) == 10
    assert auto_window([0.050] * 8, [0.001] * 8, 16) == 16  # capped
    assert auto_window([0.004] * 8, [0.005] * 8, 16) == 1  # compute-bound: no pipelining needed
    assert auto_window([0.05, 0.05, 9.0], [0.005, 0.005, 0.005], 64) == 10  # one slow step does not decide it
    assert auto_window([0.05], [0.0], 16) == 16


class TimedTop(FakeTop):
    def train_step(self, step, rows, activations):
        self.last_step_seconds = 0.004
        return super().train_step(step, rows, activations)


def fwd(step, rows=4):
    return Forward(step=step, tensors=(Tensor("activations", np.zeros((rows, WIDTH), np.float32)),))


def test_X13_the_label_holder_times_its_first_steps_at_window_1_then_announces_the_window_once():
    plan = TrainPlan(validation=np.arange(80, 84), epoch_orders=[np.arange(80)])
    t = LabelHolderTraining(TimedTop(), plan, parties=["dh1"], widths={"dh1": WIDTH}, batch_size=4, window=1,
                            n_rows=84, max_window=16)
    t.start(0.0)
    windows, now = [], 0.0
    for step in range(PROBE_STEPS + 1):
        assert t.window == 1
        now += 0.020  # 20 ms from one step to the next
        out, _ = t.on_forward("dh1", fwd(step), now)
        windows += [m for m in out["dh1"] if isinstance(m, Window)]
    assert windows == [Window(window=5)] and t.window == t.chosen_window == 5  # 20 ms / 4 ms
    assert t.probe == {"period_ms": pytest.approx(20.0), "step_ms": pytest.approx(4.0)}
    out = []
    for step in range(PROBE_STEPS + 1, 20):
        now += 0.001
        o, _ = t.on_forward("dh1", fwd(step), now)
        out += [m for m in o["dh1"] if isinstance(m, Window)]
    assert out == []  # only once


def test_X13_the_label_holder_accepts_as_many_forwards_ahead_as_the_window_it_announced():
    plan = TrainPlan(validation=np.arange(80, 84), epoch_orders=[np.arange(80)])
    t = LabelHolderTraining(TimedTop(), plan, parties=["dh1", "dh2"], widths={"dh1": WIDTH, "dh2": WIDTH},
                            batch_size=4, window=1, n_rows=84, max_window=16)
    t.start(0.0)
    now = 0.0
    for step in range(PROBE_STEPS + 1):
        now += 0.020
        t.on_forward("dh1", fwd(step), now)
        t.on_forward("dh2", fwd(step), now)
    assert t.window == 5
    for step in range(PROBE_STEPS + 1, PROBE_STEPS + 6):  # dh1 runs five steps ahead of dh2: within the window
        t.on_forward("dh1", fwd(step), now)
    with pytest.raises(RemoteProtocolError, match="exceeds the window 5"):
        t.on_forward("dh1", fwd(PROBE_STEPS + 6), now)


def test_X13_a_data_holder_takes_the_window_once_within_max_window():
    d = DataHolderTraining(FakeBottom(), n_rows=20, batch_size=4, window=1, width=WIDTH, max_window=8)
    plan = TrainPlan(validation=np.arange(16, 20), epoch_orders=[np.arange(16)])
    t = LabelHolderTraining(FakeTop(), plan, parties=["dh1"], widths={"dh1": WIDTH}, batch_size=4, window=1, n_rows=20)
    with pytest.raises(RemoteProtocolError, match="before SCHEDULE"):
        d.on_window(Window(window=2))
    for m in t.start()["dh1"]:
        deliver(t, d, m)
    with pytest.raises(RemoteProtocolError, match=r"outside 1\.\.8") as info:
        d.on_window(Window(window=9))
    assert info.value.code is ErrorCode.BAD_FIELD
    d.on_window(Window(window=3))
    assert d.window == 3
    sent = []
    while d.has_work:
        sent += d.work()
    assert [m.step for m in sent] == [0, 1, 2]  # three FORWARDs in flight now
    with pytest.raises(RemoteProtocolError, match="a second time") as info:
        d.on_window(Window(window=4))
    assert info.value.code is ErrorCode.UNEXPECTED_MESSAGE
    fixed = DataHolderTraining(FakeBottom(), n_rows=20, batch_size=4, window=2, width=WIDTH)
    with pytest.raises(RemoteProtocolError, match="fixed window"):
        fixed.on_window(Window(window=2))
