"""Issue 12 in memory: the label holder routes by the authenticated key and bounds what one partner can make it do.

One test per new MUST of PROTOCOL.md 1.3 that the session machines carry ([S4] prefix and order, [S5], [B2], [B3],
[R2] per identity, [R4], [W1], [P11], [X8] max_rejoins). The same rules against live nodes are in
``tests/conformance`` and ``tests/node/test_hardening_nodes.py``.
"""

from __future__ import annotations

import numpy as np
import pytest

from vfl.protocol import (
    Bye,
    DataHolderMachine,
    DataHolderState,
    Echo,
    EchoReply,
    Error,
    ErrorCode,
    Finished,
    Heartbeat,
    PartyState,
    Send,
    Tensor,
    Welcome,
)
from vfl.protocol.events import Log, Reconnect
from vfl.protocol.routing import new_routing_id, party_of

from .test_machines import CFG, RUN, error_codes, feed, hello, label_holder, sends, wire

A1, A2 = b"alice/0000000000000001", b"alice/0000000000000002"


def joined(lh, rid, party="alice", now=0.0):
    out = feed(lh, hello(party), party, now, routing_id=rid)
    assert isinstance(sends(out)[-1], Welcome), out
    return out


def to(outputs, rid) -> list:
    return [o.message for o in outputs if isinstance(o, Send) and o.to == rid]


def test_S1_routing_ids_are_party_slash_16_hex_and_fresh_per_socket():
    a, b = new_routing_id("dh1"), new_routing_id("dh1")
    assert a != b and party_of(a) == "dh1" and len(a.split(b"/")[1]) == 16
    int(a.split(b"/")[1], 16)


def test_S4_the_part_before_the_slash_must_be_the_authenticated_party():
    lh = label_holder()
    out = feed(lh, hello("bob"), routing_id=b"bob/0000000000000001", identity="alice")
    assert error_codes(out) == [ErrorCode.IDENTITY_MISMATCH]
    assert all(p.state is PartyState.IDLE for p in lh.parties.values())


def test_S4_comes_before_the_section_3_checks():
    lh = label_holder()
    out = lh.receive(b"bob/0000000000000001", "alice", [b"VFL/1", b"\xc1"], 0.0)  # a malformed header as well
    assert error_codes(out) == [ErrorCode.IDENTITY_MISMATCH]


def test_S4_a_1_2_data_holder_with_its_bare_party_id_is_accepted():
    lh = label_holder()
    joined(lh, b"alice")


def test_S5_a_hijacker_with_another_key_gets_nothing_addressed_to_the_party():
    lh = label_holder()
    joined(lh, A1)
    out = feed(lh, Heartbeat(), "bob", 0.1, routing_id=b"alice/ffffffffffffffff", identity="bob")
    assert error_codes(out) == [ErrorCode.IDENTITY_MISMATCH]
    later = lh.handle_timer(1.5)
    assert [type(m) for m in to(later, A1)] == [Heartbeat]  # alice's traffic still goes to alice's connection
    assert all(o.to == A1 for o in later if isinstance(o, Send))


def test_S5_a_newer_hello_with_the_same_key_replaces_the_old_connection():
    lh = label_holder()
    joined(lh, A1)
    out = joined(lh, A2, now=1.0)
    assert [ErrorCode(m.code) for m in to(out, A1)] == [ErrorCode.REPLACED]
    assert isinstance(to(out, A2)[-1], Welcome)
    later = lh.handle_timer(2.5)
    assert {o.to for o in later if isinstance(o, Send)} == {A2}
    # the replaced connection hears REPLACED for anything it still sends, and changes nothing
    out = feed(lh, Echo(seq=1), now=2.6, routing_id=A1)
    assert error_codes(out) == [ErrorCode.REPLACED] and to(out, A1)
    out = feed(lh, hello(), now=2.7, routing_id=A1)
    assert error_codes(out) == [ErrorCode.REPLACED]
    assert lh.parties["alice"].route == A2


def test_S5_a_message_other_than_hello_on_a_connection_that_has_not_said_hello_is_unexpected():
    lh = label_holder()
    joined(lh, A1)
    out = feed(lh, Echo(seq=0), routing_id=A2)
    assert error_codes(out) == [ErrorCode.UNEXPECTED_MESSAGE] and to(out, A2)
    assert lh.parties["alice"].route == A1


def test_S5_a_refused_hello_on_a_new_connection_does_not_replace():
    lh = label_holder()
    joined(lh, A1)
    out = feed(lh, hello(run="other-run"), routing_id=A2)
    assert error_codes(out) == [ErrorCode.CONFIG_MISMATCH]
    assert lh.parties["alice"].route == A1 and not to(out, A1)


def test_S5_a_data_holder_told_REPLACED_stops_and_says_so():
    dh = DataHolderMachine(party="alice", run=RUN, config=CFG, now=0.0, hold_s=100.0)
    dh.start(0.0)
    welcome = Welcome(version=(1, 0), party="bank", run=RUN, digest=CFG.digest, heartbeat_ms=1000,
                      peer_timeout_ms=5000, data_holders=("alice", "bob"))
    dh.receive(wire(welcome), 0.0)
    out = dh.receive(wire(Error(code=int(ErrorCode.REPLACED), message="replaced")), 1.0)
    fin = [o for o in out if isinstance(o, Finished)][0]
    assert fin.exit_code == 1 and "replaced" in fin.reason
    assert dh.state is DataHolderState.CLOSED


def test_R2_the_error_budget_belongs_to_the_identity_not_the_routing_id():
    lh = label_holder()
    answered = 0
    for i in range(300):  # 300 routing ids, one garbage message each, all at one instant
        out = lh.receive(f"alice/{i:016x}".encode(), "alice", [b"junk"], 0.0)
        answered += len(error_codes(out))
    assert answered == 100


def test_R4_a_failure_while_handling_a_message_is_ERROR_INTERNAL_and_the_machine_goes_on(monkeypatch):
    lh = label_holder()
    joined(lh, A1)

    def broken(self, p, msg, now):
        raise RecursionError("a walk nobody bounded")

    monkeypatch.setattr(type(lh), "_on_echo", broken)
    from vfl.protocol import label_holder as module

    monkeypatch.setitem(module._TABLE, (PartyState.READY, Echo.TYPE), broken)
    out = feed(lh, Echo(seq=0), routing_id=A1)
    assert error_codes(out) == [ErrorCode.INTERNAL]
    assert lh.finished is None
    assert isinstance(sends(feed(lh, hello("bob"), "bob", routing_id=b"bob/0000000000000001"))[-1], Welcome)


def test_R4_a_data_holder_that_fails_handling_a_message_answers_INTERNAL_and_ends_its_session(monkeypatch):
    """A data holder's only peer is the label holder: after ERROR INTERNAL it leaves (BYE ok false, exit 1) instead
    of waiting forever in a state it could not finish."""
    from vfl.protocol import data_holder as module

    dh = DataHolderMachine(party="alice", run=RUN, config=CFG, now=0.0, hold_s=100.0)
    dh.start(0.0)
    welcome = Welcome(version=(1, 0), party="bank", run=RUN, digest=CFG.digest, heartbeat_ms=1000,
                      peer_timeout_ms=5000, data_holders=("alice", "bob"))
    dh.receive(wire(welcome), 0.0)
    assert dh.state is DataHolderState.READY

    def broken(*args):
        raise RecursionError("a walk nobody bounded")

    monkeypatch.setitem(module._TABLE, (DataHolderState.READY, Heartbeat.TYPE), broken)
    out = dh.receive(wire(Heartbeat()), 1.0)
    messages = sends(out)
    assert [ErrorCode(m.code) for m in messages if isinstance(m, Error)] == [ErrorCode.INTERNAL]
    assert isinstance(messages[-1], Bye) and messages[-1].ok is False and "RecursionError" in messages[-1].reason
    fin = [o for o in out if isinstance(o, Finished)][0]
    assert fin.exit_code == 1 and "internal error" in fin.reason and "RecursionError" in fin.reason
    assert dh.state is DataHolderState.CLOSED and dh.receive(wire(Heartbeat()), 2.0) == []


def test_B3_an_echo_larger_than_the_largest_session_message_is_TOO_LARGE():
    lh = label_holder(max_echo_bytes=1024)
    joined(lh, A1)
    small = Tensor("x", np.zeros(128, np.float64))  # 1024 bytes: at the cap
    big = Tensor("x", np.zeros(129, np.float64))
    assert isinstance(sends(feed(lh, Echo(seq=0, tensors=(small,)), routing_id=A1))[0], EchoReply)
    out = feed(lh, Echo(seq=1, tensors=(big,)), routing_id=A1)
    assert error_codes(out) == [ErrorCode.TOO_LARGE] and not any(isinstance(m, EchoReply) for m in sends(out))


def test_B2_a_peer_that_does_not_read_is_told_TOO_LARGE_and_lost_and_its_connection_gets_nothing_more():
    lh = label_holder()
    joined(lh, A1)
    joined(lh, b"bob/0000000000000001", "bob")
    out = lh.peer_not_reading(A1, "queue over 32 MiB", 1.0)
    assert [ErrorCode(m.code) for m in to(out, A1)] == [ErrorCode.TOO_LARGE]
    assert lh.parties["alice"].state is PartyState.LOST and lh.finished is None
    assert not sends(feed(lh, Echo(seq=0), now=1.2, routing_id=A1))
    assert lh.peer_not_reading(A1, "again", 1.3) == []
    # alice may come back on a new connection within the rejoin timeout
    joined(lh, A2, now=2.0)
    assert lh.parties["alice"].state is PartyState.READY
    # and one that does not is named when the session ends
    lh2 = label_holder(rejoin_timeout_s=10.0)
    joined(lh2, A1)
    lh2.peer_not_reading(A1, "stalled", 0.0)
    fin = [o for o in lh2.handle_timer(11.0) if isinstance(o, Finished)][0]
    assert fin.exit_code == 3 and "'alice'" in fin.reason


def test_L2_a_silent_peer_gets_TIMEOUT_and_BYE_and_the_others_are_told_who():
    lh = label_holder()
    joined(lh, A1)
    bob = b"bob/0000000000000001"
    joined(lh, bob, "bob")
    feed(lh, Heartbeat(), "bob", 4.0, routing_id=bob)
    out = lh.handle_timer(5.0)
    assert [type(m) for m in to(out, A1)] == [Error, Bye] and to(out, A1)[0].code == ErrorCode.TIMEOUT
    (bye,) = to(out, bob)
    assert isinstance(bye, Bye) and "'alice'" in bye.reason


@pytest.mark.parametrize(
    "change, field",
    [
        ({"version": (2, 0)}, "version"),
        ({"version": (1, 99)}, "version"),
        ({"run": "other"}, "run"),
        ({"data_holders": ("alice",)}, "data_holders"),
        ({"data_holders": ("bob", "alice")}, "data_holders"),
        ({"psi_nonce": "ab" * 16}, "psi_nonce"),
    ],
)
def test_W1_a_data_holder_refuses_a_bad_WELCOME_with_BAD_FIELD_BYE_and_exit_1(change, field):
    dh = DataHolderMachine(party="alice", run=RUN, config=CFG, now=0.0, hold_s=100.0)
    dh.start(0.0)
    fields = dict(version=(1, 0), party="bank", run=RUN, digest=CFG.digest, heartbeat_ms=1000,
                  peer_timeout_ms=5000, data_holders=("alice", "bob"))
    fields.update(change)
    out = dh.receive(wire(Welcome(**fields)), 0.0)
    msgs = sends(out)
    assert [type(m) for m in msgs] == [Error, Bye] and msgs[0].code == ErrorCode.BAD_FIELD
    assert field in msgs[0].message
    fin = [o for o in out if isinstance(o, Finished)][0]
    assert fin.exit_code == 1


def test_X8_rejoins_after_training_started_are_bounded_by_max_rejoins():
    lh = label_holder(max_rejoins=1)
    joined(lh, A1)
    lh.training = object()  # training has started: every further HELLO of alice is a rejoin
    joined(lh, A2, now=1.0)  # rejoin 1: allowed
    out = feed(lh, hello(), now=2.0, routing_id=b"alice/0000000000000003")
    assert error_codes(out) == [ErrorCode.UNEXPECTED_MESSAGE]
    fin = [o for o in out if isinstance(o, Finished)][0]
    assert fin.exit_code == 1 and "max_rejoins" in fin.reason and "'alice'" in fin.reason


def test_B4_a_party_that_sends_more_refused_bytes_than_its_budget_is_closed_and_lost():
    from vfl.protocol import Disconnect
    from vfl.protocol.label_holder import REFUSED_BURST_BYTES

    lh = label_holder()
    joined(lh, A1)
    junk = [b"VFL/1", b"\xc1" * 60_000]  # a malformed header (BAD_HEADER), 60 kB a time
    outs = []
    for i in range(REFUSED_BURST_BYTES // 60_000 + 2):
        outs.append(lh.receive(A1, "alice", junk, 0.0))
        if any(isinstance(o, Disconnect) for o in outs[-1]):
            break
    assert all(error_codes(o) in ([ErrorCode.BAD_HEADER], []) for o in outs[:-1])  # refused, not yet closed
    last = outs[-1]
    assert Disconnect(to=A1) in last and [ErrorCode(m.code) for m in to(last, A1)] == [ErrorCode.TOO_LARGE]
    assert lh.parties["alice"].state is PartyState.LOST and lh.finished is None
    # closed again if it comes back, and its key is refused at the handshake for a while ([B5])
    assert Disconnect(to=A1, refuse_key_s=1.0) in lh.receive(A1, "alice", wire(Heartbeat()), 0.1)
    joined(lh, A2, now=1.2)  # a restart with its key may rejoin
    assert lh.parties["alice"].state is PartyState.READY


def test_B5_a_dropped_connection_that_comes_back_gets_its_key_refused_for_a_doubling_cooldown():
    from vfl.protocol import Disconnect
    from vfl.protocol.label_holder import KEY_COOLDOWN_MAX_S

    lh = label_holder()
    joined(lh, A1)
    lh.peer_not_reading(A1, "test", 0.0)  # [B2]: dropped
    hb = wire(Heartbeat())
    closes = lambda out: [o for o in out if isinstance(o, Disconnect)]  # noqa: E731
    assert closes(lh.receive(A1, "alice", hb, 1.0)) == [Disconnect(to=A1, refuse_key_s=1.0)]
    # what was still queued when the refusals began closes again, without a longer cooldown
    assert closes(lh.receive(A1, "alice", hb, 1.5)) == [Disconnect(to=A1)]
    seen = []
    now = 2.0
    for _ in range(6):  # each time it gets through again after a cooldown, the next one is twice as long
        (d,) = closes(lh.receive(A1, "alice", hb, now))
        seen.append(d.refuse_key_s)
        now += d.refuse_key_s + 0.01
    assert seen == [2.0, 4.0, 8.0, 8.0, 8.0, 8.0] and KEY_COOLDOWN_MAX_S == 8.0
    assert lh.finished is None


def test_B4_a_key_outside_the_session_has_a_budget_of_a_few_refused_HELLOs_not_64_MiB():
    """An allow-listed key in no session of this label holder (a partner of another project) has nothing to say
    here but HELLO: its flood of 1 MiB ECHOs is closed after about 2 MiB, while the session's parties keep theirs."""
    from vfl.protocol import Disconnect
    from vfl.protocol.label_holder import OUTSIDER_REFUSED_BURST_BYTES, REFUSED_BURST_BYTES

    lh = label_holder()
    joined(lh, A1)
    mallory = b"mallory/00000000000000aa"
    echo = wire(Echo(seq=0, tensors=[Tensor("x", np.zeros(2**18, dtype=np.float32))]))  # 1 MiB
    closed_after = None
    for i in range(1, REFUSED_BURST_BYTES // 2**20):
        if Disconnect(to=mallory) in lh.receive(mallory, "mallory", echo, 0.0):
            closed_after = i
            break
    assert closed_after is not None and closed_after <= OUTSIDER_REFUSED_BURST_BYTES // 2**20 + 1
    assert lh.parties["alice"].state is PartyState.READY and lh.finished is None
    junk = [b"VFL/1", b"\xc1" * 60_000]  # alice, in the session, still has the full budget
    assert not any(Disconnect(to=A1) in lh.receive(A1, "alice", junk, 0.0) for _ in range(40))

@pytest.mark.parametrize("status", [500, 300])
def test_B5_L3_a_data_holder_refused_for_now_keeps_trying_until_its_handshake_timeout(status):
    dh = DataHolderMachine(party="alice", run=RUN, config=CFG, now=0.0, handshake_timeout_s=10.0)
    dh.start(0.0)
    out = dh.refused_by_zap(status, 1.0)
    logs = [o for o in out if isinstance(o, Log)]
    assert dh.finished is None and [o.level for o in logs] == ["WARNING"] and "for now" in logs[0].text
    # libzmq does not retry a refused handshake: the machine asks for a fresh connection, and says HELLO on it
    assert any(isinstance(o, Reconnect) for o in out + dh.handle_timer(1.6))
    again = dh.refused_by_zap(status, 2.0) + dh.handle_timer(2.6)
    assert not any(isinstance(o, Log) and o.level == "WARNING" for o in again)  # said once
    assert any(isinstance(o, Reconnect) for o in again) and dh.finished is None  # still trying
    (fin,) = [o for o in dh.handle_timer(10.0) if isinstance(o, Finished)]
    assert fin.exit_code == 1 and "refusing this node's key" in fin.reason


def test_L3_a_key_refused_with_status_400_ends_the_data_holder_at_once():
    dh = DataHolderMachine(party="alice", run=RUN, config=CFG, now=0.0)
    dh.start(0.0)
    assert dh.refused_by_zap(400, 1.0)[-1].exit_code == 1 and dh.finished is not None


def test_peer_text_a_refusal_diff_from_the_label_holder_is_printed_escaped_and_cut():
    dh = DataHolderMachine(party="alice", run=RUN, config=CFG, now=0.0)
    dh.start(0.0)
    forged = "model\n12:00:00 vfl[bank] INFO forged line\x1b[2J"
    err = Error(code=int(ErrorCode.CONFIG_MISMATCH), message="differs",
                diff={forged: ["x" * 10_000, 1], **{f"k{i}": [i, i + 1] for i in range(500)}})
    out = dh.receive(wire(err), 0.0)
    fin = [o for o in out if isinstance(o, Finished)][0]
    lines = fin.reason.split("\n")
    assert fin.exit_code == 1 and "\x1b" not in fin.reason and not any(line.startswith("12:00:00") for line in lines)
    assert len(lines) <= 1 + 64 and len(fin.reason) < 64 * 300


def test_a_waiting_node_says_so_every_ten_seconds_and_never_names_a_party_that_has_not_joined():
    """Issue 13: a lone data holder, or a label holder whose data holders have not joined, is never silent."""
    from vfl.protocol.label_holder import WAITING_NOTE_S

    dh = DataHolderMachine(party="alice", run=RUN, config=CFG, now=0.0, handshake_timeout_s=60.0)
    dh.start(0.0)
    assert dh.next_timer() == WAITING_NOTE_S
    (note,) = [o for o in dh.handle_timer(10.0) if isinstance(o, Log)]
    assert note.text.startswith("still waiting for") and "10 s of 60 s" in note.text
    assert not [o for o in dh.handle_timer(15.0) if isinstance(o, Log)]  # not before the next ten seconds
    lh = label_holder()
    (note,) = [o for o in lh.handle_timer(WAITING_NOTE_S) if isinstance(o, Log)]
    assert "still waiting for 2 of 2 data holder(s) to join" in note.text and "alice" not in note.text
    joined(lh, A1, now=19.5)
    (note,) = [o for o in lh.handle_timer(20.0) if isinstance(o, Log)]
    assert "1 of 2" in note.text
