"""[X14] against a real `vfl node` label holder process: in a 1.7 session the next epoch's EPOCH comes before the
data holder's validation, and a data holder that speaks 1.6 still gets one epoch at a time and finishes.

The data holder under observation is the real DataHolderMachine (real PSI, real bottom model) run in the test process
(tests/node/fuzz_support.py's Driver), so the order of what it hears and says is visible; beside it a real `vfl node`
data holder process. For the 1.6 case the test process's data holder announces version [1, 6] (the constant the
machine puts in its HELLO), as a node of the previous release would."""

from __future__ import annotations

import time

from vfl.protocol import DEFAULT_LIMITS, RemoteProtocolError, decode

from .fuzz_support import ATTACKER, HONEST, Driver
from .test_fuzz_live import live_session


class Recording(Driver):
    """A Driver that keeps the order of every message it heard (type, epoch) and sent (type, epoch)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.seq: list[tuple[str, str, int | None]] = []

    def take(self, frames):
        try:
            msg = decode(list(frames), DEFAULT_LIMITS)
            self.seq.append(("in", msg.TYPE, getattr(msg, "epoch", None)))
        except RemoteProtocolError:
            pass
        super().take(frames)

    def _out(self, mtype, frames):
        epoch = None
        if mtype == "EVAL_FORWARD":
            epoch = decode(list(frames), DEFAULT_LIMITS).epoch
        self.seq.append(("out", mtype, epoch))
        super()._out(mtype, frames)


def session(tmp_path) -> tuple[list, str, str]:
    """The whole session with the recording data holder: (its sequence, the label holder's log, its own log)."""
    with live_session(tmp_path, train=True, epochs=3) as (configs, ctx, nodes, lh, drivers):
        honest = nodes.start(configs[HONEST])
        lh.wait_for("listening on", timeout=60)
        d = Recording(ctx, configs[ATTACKER])
        drivers.append(d)
        d.start()
        deadline = time.monotonic() + 120
        while lh.proc.poll() is None and time.monotonic() < deadline:
            d.pump(0.05)
        assert lh.wait(timeout=60) == 0, lh.output[-3000:]
        assert honest.wait(timeout=60) == 0, honest.output[-3000:]
        return d.seq, lh.output, "\n".join(d.logs)


def position(seq, item):
    return seq.index(item)


def test_X14_in_a_1_7_session_the_next_epoch_arrives_before_the_data_holder_validates(tmp_path):
    seq, log, own = session(tmp_path)
    assert "training finished after 3 epoch(s)" in log, log[-2000:]
    assert [e for d, t, e in seq if (d, t) == ("in", "EPOCH")] == [0, 1, 2], seq
    # EPOCH 1 came with EPOCH 0, before any EVAL_FORWARD of epoch 0; EPOCH 2 before the validation of epoch 1
    assert position(seq, ("in", "EPOCH", 1)) < position(seq, ("out", "EVAL_FORWARD", 0)), seq
    assert position(seq, ("in", "EPOCH", 2)) < position(seq, ("out", "EVAL_FORWARD", 1)), seq
    assert position(seq, ("in", "EPOCH", 2)) > position(seq, ("out", "EVAL_FORWARD", 0)), seq  # never two ahead
    assert "ERROR" not in own, own


def test_X14_a_1_6_data_holder_gets_one_epoch_at_a_time_and_the_session_completes(tmp_path, monkeypatch):
    import vfl.protocol.data_holder as data_holder

    monkeypatch.setattr(data_holder, "PROTOCOL_VERSION", (1, 6))
    seq, log, own = session(tmp_path)
    assert "training finished after 3 epoch(s)" in log, log[-2000:]
    assert [e for d, t, e in seq if (d, t) == ("in", "EPOCH")] == [0, 1, 2], seq
    for e in (1, 2):  # each EPOCH only after every validation batch of the epoch before it went out
        last_eval = max(i for i, item in enumerate(seq) if item == ("out", "EVAL_FORWARD", e - 1))
        assert position(seq, ("in", "EPOCH", e)) > last_eval, seq
    assert "ERROR" not in own, own

