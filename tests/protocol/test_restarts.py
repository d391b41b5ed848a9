"""PROTOCOL.md section 12 (restarts) on the machines, in memory: one test per clause [J1]-[J3]."""

from __future__ import annotations

import re

from vfl.protocol import (
    SessionConfig,
    Bye,
    DataHolderMachine,
    DataHolderState,
    ErrorCode,
    Finished,
    Heartbeat,
    Hello,
    LabelHolderMachine,
    PartyState,
    Send,
    Welcome,
)
from vfl.protocol.events import EXIT_PAUSED, Reconnect
from vfl.protocol.psi_phase import PsiPlan

from .test_machines import CFG, RUN, error_codes, feed, hello, label_holder, sends, wire


#: a session that trains: only there does a signal pause a party ([J2]). No PSI runs in these tests (no engine).
TRAIN = SessionConfig(cut_widths=dict(CFG.cut_widths), batch_size=32, window=2, model="m1", psi=True, train=True)
NO_PSI = PsiPlan(items=[], engine=None)


def joined_dh(lh, now=0.0, config=CFG, **kw) -> DataHolderMachine:
    """A data holder that said HELLO to ``lh`` and accepted its WELCOME (it stays READY, or starts its PSI)."""
    psi = NO_PSI if config.psi else None
    dh = DataHolderMachine(party="alice", run=RUN, config=config, now=now, hold_s=100.0, psi=psi, **kw)
    (hello_msg,) = sends(dh.start(now))
    (welcome,) = sends(lh.receive(b"alice/0000000000000001", "alice", wire(hello_msg), now))
    dh.receive(wire(welcome), now)
    assert dh.state in (DataHolderState.READY, DataHolderState.PSI)
    return dh


def training_lh(*ready) -> LabelHolderMachine:
    lh = LabelHolderMachine(party="bank", run=RUN, config=TRAIN, now=0.0, heartbeat_s=1.0, peer_timeout_s=5.0,
                            join_timeout_s=60.0, psi=NO_PSI)
    for p in ready:
        feed(lh, hello(p, cfg=TRAIN), p)
    return lh


def rejoin_welcome(lh, dh: DataHolderMachine, outputs, routing_id: bytes, now: float) -> None:
    """Hand the HELLO of a rejoin (on its fresh routing id) to ``lh`` and its WELCOME back to ``dh``.

    (A label holder that knew the old connection also tells that one it was REPLACED, [S5].)"""
    (welcome,) = [m for m in sends(feed(lh, sends(outputs)[0], routing_id=routing_id, now=now)) if isinstance(m, Welcome)]
    dh.receive(wire(welcome), now)


def rejoined(outputs) -> bool:
    """The outputs of a rejoin: a fresh socket, then a HELLO on it."""
    kinds = [type(o) for o in outputs if isinstance(o, (Reconnect, Send))]
    return kinds == [Reconnect, Send] and isinstance(sends(outputs)[0], Hello)


def test_J1_the_label_holder_names_one_fresh_instance_in_every_welcome_and_heartbeat():
    lh, other = label_holder(), label_holder()
    assert re.fullmatch(r"[0-9a-f]{32}", lh.instance) and lh.instance != other.instance
    (welcome,) = sends(feed(lh, hello()))
    assert isinstance(welcome, Welcome) and welcome.instance == lh.instance
    assert sends(lh.handle_timer(1.0)) == [Heartbeat(instance=lh.instance)]


def test_J1_a_restarted_label_holder_answers_an_unknown_connection_with_UNEXPECTED_MESSAGE_only():
    lh = label_holder()  # a new process: it knows no connection
    out = feed(lh, Heartbeat(), routing_id=b"alice/00000000000000ff")
    (err,) = sends(out)
    assert ErrorCode(err.code) is ErrorCode.UNEXPECTED_MESSAGE and err.ref == "HEARTBEAT"  # [S5], as before
    assert all(o.to == b"alice/00000000000000ff" for o in out if isinstance(o, Send))  # only to the sender


def test_J1_a_data_holder_whose_heartbeat_the_label_holder_does_not_know_rejoins_on_a_fresh_connection():
    restarted = label_holder()
    dh = joined_dh(label_holder())
    (err,) = sends(feed(restarted, Heartbeat(), routing_id=b"alice/0000000000000001"))
    out = dh.receive(wire(err), 2.0)
    assert rejoined(out) and dh.state is DataHolderState.CONNECTING and dh.rejoins == 1
    rejoin_welcome(restarted, dh, out, b"alice/0000000000000002", 2.0)
    assert dh.state is DataHolderState.READY and restarted.parties["alice"].state is PartyState.READY


def test_J1_a_data_holder_that_hears_a_new_instance_rejoins():
    lh = label_holder()
    dh = joined_dh(lh)
    assert dh.receive(wire(Heartbeat(instance=lh.instance)), 1.0) == []  # the same instance: nothing happens
    assert rejoined(dh.receive(wire(Heartbeat(instance=label_holder().instance)), 2.0))


def test_J1_a_dropped_connection_in_a_session_is_a_rejoin_and_before_welcome_a_fresh_hello():
    dh = joined_dh(label_holder())
    assert rejoined(dh.connection_lost(1.0)) and dh.rejoins == 1
    assert dh.connection_lost(1.2) == []  # before the WELCOME: a fresh connection, but not more than every 0.5 s
    assert dh.next_timer() == 1.5
    assert rejoined(dh.handle_timer(1.5)) and dh.rejoins == 1  # no rejoin spent: nothing to roll back


def test_J1_a_rejoining_data_holder_waits_up_to_its_rejoin_timeout_for_the_label_holder():
    dh = joined_dh(label_holder(), rejoin_timeout_s=30.0, handshake_timeout_s=5.0)
    dh.connection_lost(1.0)
    assert [o for o in dh.handle_timer(30.9) if isinstance(o, Finished)] == []
    (fin,) = [o for o in dh.handle_timer(31.0) if isinstance(o, Finished)]
    assert fin.exit_code == 3 and "did not come back within 30 s" in fin.reason


def test_J2_a_data_holder_stopped_by_a_signal_pauses_and_the_label_holder_keeps_its_place():
    lh = training_lh("bob")
    dh = joined_dh(lh, config=TRAIN)
    out = dh.close("stopped by SIGTERM", 1.0, pause=True)
    (bye,) = sends(out)
    assert bye == Bye(ok=False, reason="stopped by SIGTERM", pause=True) and dh.finished.exit_code == EXIT_PAUSED
    feed(lh, bye, routing_id=b"alice/0000000000000001", now=1.0)
    assert lh.finished is None and lh.parties["alice"].state is PartyState.LOST
    (fin,) = [o for o in lh.handle_timer(1.0 + lh.rejoin_timeout_s) if isinstance(o, Finished)]
    assert fin.exit_code == 3 and "'alice'" in fin.reason


def test_J2_a_paused_data_holder_restarted_rejoins():
    lh = training_lh("bob")
    dh = joined_dh(lh, config=TRAIN)
    feed(lh, sends(dh.close("stopped by SIGINT", 1.0, pause=True))[0], routing_id=b"alice/0000000000000001", now=1.0)
    welcomes = [m for m in sends(feed(lh, hello(cfg=TRAIN), routing_id=b"alice/0000000000000003", now=5.0))
                if isinstance(m, Welcome)]
    assert len(welcomes) == 1 and lh.parties["alice"].state is PartyState.READY


def test_J2_the_label_holder_pauses_and_its_data_holders_rejoin():
    lh = training_lh()
    dh = joined_dh(lh, config=TRAIN)
    out = lh.close("stopped by SIGTERM", 1.0, pause=True)
    assert lh.finished.exit_code == EXIT_PAUSED
    (bye,) = sends(out)
    assert bye.pause is True and bye.ok is False
    assert rejoined(dh.receive(wire(bye), 1.0)) and dh.finished is None


def test_J2_without_pause_or_without_training_a_signal_ends_the_session_as_before():
    for pause, config in [(False, TRAIN), (True, CFG)]:
        lh = training_lh() if config.train else label_holder()
        dh = joined_dh(lh, config=config)
        (bye,) = sends(lh.close("stopped by SIGTERM", 1.0, pause=pause))
        assert bye.pause is None and lh.finished.exit_code == 0
        dh.receive(wire(bye), 1.0)
        assert dh.finished.exit_code == 1


def test_J3_a_data_holder_rejoins_at_most_max_rejoins_times():
    dh = joined_dh(lh := label_holder(), max_rejoins=2)
    for i in range(2):
        out = dh.connection_lost(1.0 + i)
        assert rejoined(out)
        rejoin_welcome(lh, dh, out, f"alice/{i + 16:016x}".encode(), 1.0 + i)
        assert dh.state is DataHolderState.READY
    (fin,) = [o for o in dh.connection_lost(9.0) if isinstance(o, Finished)]
    assert fin.exit_code == 1 and "max_rejoins" in fin.reason
