"""The state machines of PROTOCOL.md sections 6 and 9, in memory: one test per clause, plus every (state, message)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
    Hello,
    LabelHolderMachine,
    LinkChecked,
    PartyState,
    PeerLeft,
    PeerReady,
    Send,
    SessionConfig,
    Tensor,
    Welcome,
    decode,
    encode,
)

from ..fuzz_budget import examples
from .strategies import hostile_frames, messages

CFG = SessionConfig(cut_widths={"alice": 8, "bob": 16}, batch_size=32, window=2, model="m1")
RUN = "run-1"


def wire(msg) -> list[bytes]:
    return [bytes(memoryview(f).cast("B")) for f in encode(msg)]


def hello(party="alice", run=RUN, cfg=CFG, **over) -> Hello:
    fields = dict(version=(1, 0), role="data_holder", party=party, run=run, config=cfg.to_wire(), digest=cfg.digest)
    fields.update(over)
    return Hello(**fields)


def label_holder(now=0.0, **kw) -> LabelHolderMachine:
    return LabelHolderMachine(party="bank", run=RUN, config=CFG, now=now, heartbeat_s=1.0, peer_timeout_s=5.0,
                              join_timeout_s=60.0, **kw)


def feed(lh: LabelHolderMachine, msg, party="alice", now=0.0, routing_id=None, identity=None):
    rid = routing_id if routing_id is not None else party.encode()
    return lh.receive(rid, identity if identity is not None else party, wire(msg), now)


def sends(outputs) -> list:
    return [o.message for o in outputs if isinstance(o, Send)]


def error_codes(outputs) -> list[ErrorCode]:
    return [ErrorCode(m.code) for m in sends(outputs) if isinstance(m, Error)]


def ready_lh(*parties, now=0.0) -> LabelHolderMachine:
    lh = label_holder(now)
    for p in parties:
        assert isinstance(sends(feed(lh, hello(p), p, now))[0], Welcome)
    return lh


# ------------------------------------------------------------------------------------------------ handshake (§6)


def test_H5_valid_hello_gets_welcome_and_peer_is_ready():
    lh = label_holder()
    out = feed(lh, hello())
    (welcome,) = sends(out)
    assert isinstance(welcome, Welcome)
    assert welcome.digest == CFG.digest and welcome.run == RUN and welcome.party == "bank"
    assert welcome.data_holders == ("alice", "bob") and welcome.heartbeat_ms == 1000 and welcome.peer_timeout_ms == 5000
    assert PeerReady(party="alice", restart=False) in out
    assert lh.parties["alice"].state is PartyState.READY


def test_H1_unknown_party_gets_UNKNOWN_PARTY():
    lh = label_holder()
    assert error_codes(feed(lh, hello("carol"), "carol")) == [ErrorCode.UNKNOWN_PARTY]


def test_H2_hello_party_not_the_authenticated_identity_gets_IDENTITY_MISMATCH():
    lh = label_holder()
    assert error_codes(feed(lh, hello("bob"), "alice")) == [ErrorCode.IDENTITY_MISMATCH]
    assert lh.parties["bob"].state is PartyState.IDLE


def test_S4_routing_id_not_the_authenticated_identity_gets_IDENTITY_MISMATCH():
    lh = label_holder()
    out = feed(lh, hello("alice"), routing_id=b"alice", identity="bob")
    assert error_codes(out) == [ErrorCode.IDENTITY_MISMATCH]
    assert all(p.state is PartyState.IDLE for p in lh.parties.values())


@pytest.mark.parametrize(
    "over",
    [
        {"role": "label_holder"},
        {"digest": "0" * 64},
        {"config": {"cut_widths": {"alice": 0}, "batch_size": 1, "window": 1, "model": "m"}},
        {"config": {"batch_size": 1}},
    ],
)
def test_H3_malformed_hello_gets_BAD_FIELD(over):
    from vfl.protocol import digest_of

    if "config" in over:
        over["digest"] = digest_of(over["config"])
    assert error_codes(feed(label_holder(), hello(**over))) == [ErrorCode.BAD_FIELD]


def test_H4_config_mismatch_lists_every_differing_field():
    theirs = SessionConfig(cut_widths={"alice": 8, "bob": 32}, batch_size=64, window=2, model="m1")
    out = feed(label_holder(), hello(run="other", cfg=theirs))
    (err,) = sends(out)
    assert err.code == ErrorCode.CONFIG_MISMATCH
    assert err.diff == {"batch_size": [32, 64], "cut_widths.bob": [16, 32], "run": [RUN, "other"]}
    for text in ("batch_size: label holder has 32, data holder has 64", "cut_widths.bob: label holder has 16",
                 "run: label holder has 'run-1', data holder has 'other'"):
        assert text in err.message


def test_H4_extra_and_missing_parties_show_in_the_diff():
    theirs = SessionConfig(cut_widths={"alice": 8, "carol": 8}, batch_size=32, window=2, model="m1")
    (err,) = sends(feed(label_holder(), hello(cfg=theirs)))
    assert err.diff == {"cut_widths.bob": [16, "<missing>"], "cut_widths.carol": ["<missing>", 8]}


def test_V2_hello_with_another_major_version_gets_UNSUPPORTED_VERSION():
    assert error_codes(feed(label_holder(), hello(version=(2, 0)))) == [ErrorCode.UNSUPPORTED_VERSION]


def test_hello_checks_run_in_the_documented_order():
    # wrong version AND wrong identity AND config mismatch: [V2] comes first, then [H2] before [H4]
    lh = label_holder()
    assert error_codes(feed(lh, hello("bob", version=(3, 0), run="x"), "alice")) == [ErrorCode.UNSUPPORTED_VERSION]
    assert error_codes(feed(lh, hello("bob", run="x"), "alice")) == [ErrorCode.IDENTITY_MISMATCH]


def test_welcome_names_the_lower_minor_version():
    from vfl.protocol import PROTOCOL_VERSION

    (welcome,) = sends(feed(label_holder(), hello(version=(1, 10))))
    assert welcome.version == PROTOCOL_VERSION == (1, 10)
    (welcome,) = sends(feed(label_holder(), hello(version=(1, 0))))
    assert welcome.version == (1, 0)


def test_H6_hello_from_a_ready_party_is_a_restart():
    lh = ready_lh("alice")
    out = feed(lh, hello(), now=1.0)
    assert isinstance(sends(out)[0], Welcome) and PeerReady(party="alice", restart=True) in out


def test_R1_refused_hello_leaves_a_ready_session_as_it_was():
    lh = ready_lh("alice")
    feed(lh, hello(run="other"), now=1.0)
    assert lh.parties["alice"].state is PartyState.READY


def test_H7_data_holder_treats_an_error_answer_to_hello_as_final():
    dh = DataHolderMachine(party="alice", run=RUN, config=CFG, now=0.0)
    dh.start(0.0)
    err = Error(code=int(ErrorCode.CONFIG_MISMATCH), message="config differs", diff={"batch_size": [32, 64]})
    (fin,) = dh.receive(wire(err), 0.1)
    assert isinstance(fin, Finished) and fin.exit_code == 1
    assert "CONFIG_MISMATCH" in fin.reason and "batch_size: label holder has 32, data holder has 64" in fin.reason
    assert dh.state is DataHolderState.CLOSED


# ------------------------------------------------------------------------------------------------ tables (§9)

LH_INBOUND = {
    "HELLO": hello(),
    "ECHO": Echo(seq=1, tensors=(Tensor("x", np.arange(3, dtype=np.int32)),)),
    "HEARTBEAT": Heartbeat(),
    "BYE": Bye(ok=True, reason="done"),
    "ERROR": Error(code=1, message="x"),
    "WELCOME": Welcome(version=(1, 0), party="x", run=RUN, digest="d", heartbeat_ms=1, peer_timeout_ms=1,
                       data_holders=("alice",)),
    "ECHO_REPLY": EchoReply(seq=1),
}

# (state, type) -> (answer type or error code or None, next state). PROTOCOL.md §9, label holder table.
LH_TABLE = {
    ("IDLE", "HELLO"): ("WELCOME", "READY"),
    ("IDLE", "ECHO"): (ErrorCode.UNEXPECTED_MESSAGE, "IDLE"),
    ("IDLE", "HEARTBEAT"): (ErrorCode.UNEXPECTED_MESSAGE, "IDLE"),
    ("IDLE", "BYE"): (ErrorCode.UNEXPECTED_MESSAGE, "IDLE"),
    ("IDLE", "ERROR"): (None, "IDLE"),
    ("IDLE", "WELCOME"): (ErrorCode.UNEXPECTED_MESSAGE, "IDLE"),
    ("IDLE", "ECHO_REPLY"): (ErrorCode.UNEXPECTED_MESSAGE, "IDLE"),
    ("READY", "HELLO"): ("WELCOME", "READY"),
    ("READY", "ECHO"): ("ECHO_REPLY", "READY"),
    ("READY", "HEARTBEAT"): (None, "READY"),
    ("READY", "BYE"): (None, "DONE"),
    ("READY", "ERROR"): (None, "READY"),
    ("READY", "WELCOME"): (ErrorCode.UNEXPECTED_MESSAGE, "READY"),
    ("READY", "ECHO_REPLY"): (ErrorCode.UNEXPECTED_MESSAGE, "READY"),
    ("DONE", "HELLO"): ("WELCOME", "READY"),
    ("DONE", "ECHO"): (ErrorCode.UNEXPECTED_MESSAGE, "DONE"),
    ("DONE", "HEARTBEAT"): (ErrorCode.UNEXPECTED_MESSAGE, "DONE"),
    ("DONE", "BYE"): (ErrorCode.UNEXPECTED_MESSAGE, "DONE"),
    ("DONE", "ERROR"): (None, "DONE"),
    ("DONE", "WELCOME"): (ErrorCode.UNEXPECTED_MESSAGE, "DONE"),
    ("DONE", "ECHO_REPLY"): (ErrorCode.UNEXPECTED_MESSAGE, "DONE"),
}


def lh_in_state(state: str) -> LabelHolderMachine:
    lh = ready_lh("bob")  # bob stays READY so alice's BYE does not end the session
    if state in ("READY", "DONE"):
        feed(lh, hello("alice"))
    if state == "DONE":
        feed(lh, Bye(ok=True, reason="done"))
    assert lh.parties["alice"].state.value == state
    return lh


@pytest.mark.parametrize(("state", "mtype"), sorted(LH_TABLE))
def test_T1_label_holder_follows_its_table(state, mtype):
    answer, next_state = LH_TABLE[(state, mtype)]
    lh = lh_in_state(state)
    out = feed(lh, LH_INBOUND[mtype], now=0.5)
    replies = sends(out)
    if answer is None:
        assert replies == []
    elif isinstance(answer, ErrorCode):
        assert error_codes(out) == [answer]
    else:
        assert [m.TYPE for m in replies] == [answer]
    assert lh.parties["alice"].state.value == next_state


def test_M1_echo_reply_carries_identical_tensors():
    lh = ready_lh("alice")
    tensors = (Tensor("a", np.arange(20000, dtype=np.float32).reshape(100, 200)), Tensor("b", np.array([True, False])))
    (reply,) = sends(feed(lh, Echo(seq=42, tensors=tensors)))
    assert isinstance(reply, EchoReply) and reply.seq == 42
    assert all(a.same_as(b) for a, b in zip(tensors, reply.tensors))


def test_M2_an_error_is_never_answered_even_when_malformed():
    lh = ready_lh("alice")
    assert sends(feed(lh, Error(code=999, message="from the future"))) == []
    import msgpack

    bad_error = [b"VFL/1", msgpack.packb({"type": "ERROR", "code": "not an int"})]
    assert sends(lh.receive(b"alice", "alice", bad_error, 0.0)) == []
    # and not even from a routing id that does not match its key
    assert sends(lh.receive(b"mallory", "alice", bad_error, 0.0)) == []


def test_R1_malformed_message_gets_error_and_changes_no_state():
    lh = ready_lh("alice")
    out = lh.receive(b"alice", "alice", [b"VFL/1", b"\xc1"], 1.0)
    assert error_codes(out) == [ErrorCode.BAD_HEADER]
    assert lh.parties["alice"].state is PartyState.READY and lh.finished is None


def test_R2_at_most_100_errors_per_second_to_one_peer():
    lh = ready_lh("alice")
    answered = sum(len(error_codes(lh.receive(b"alice", "alice", [b"junk"], 1.0))) for _ in range(300))
    assert answered == 100
    later = sum(len(error_codes(lh.receive(b"alice", "alice", [b"junk"], 1.5))) for _ in range(300))
    assert later == 50  # half a second refills half the bucket
    # another peer has its own bucket
    assert error_codes(lh.receive(b"bob", "bob", [b"junk"], 1.5)) == [ErrorCode.BAD_FRAMING]


def test_R3_message_without_authenticated_identity_is_dropped():
    lh = label_holder()
    assert sends(lh.receive(b"alice", None, wire(hello()), 0.0)) == []
    assert lh.parties["alice"].state is PartyState.IDLE


# ------------------------------------------------------------------------------------------------ liveness (§9)


def test_L1_heartbeat_when_nothing_was_sent_for_heartbeat_interval():
    lh = ready_lh("alice", now=0.0)
    assert lh.next_timer() == pytest.approx(1.0)
    assert sends(lh.handle_timer(0.9)) == []
    assert sends(lh.handle_timer(1.0)) == [Heartbeat(instance=lh.instance)]  # [J1]
    assert sends(lh.handle_timer(1.5)) == []  # we just sent one


def test_L1_data_holder_heartbeats_at_the_interval_the_welcome_set():
    dh = DataHolderMachine(party="alice", run=RUN, config=CFG, now=0.0)
    dh.start(0.0)
    lh = label_holder()
    (welcome,) = sends(feed(lh, hello()))
    dh.receive(wire(welcome), 0.0)  # link_rounds=0, hold 0: it leaves at once; use hold to stay
    dh2 = DataHolderMachine(party="alice", run=RUN, config=CFG, now=0.0, hold_s=100.0)
    dh2.start(0.0)
    dh2.receive(wire(welcome), 0.0)
    assert dh2.state is DataHolderState.READY
    assert sends(dh2.handle_timer(1.0)) == [Heartbeat()]


def test_L1_keepalive_sends_the_heartbeats_due_and_never_declares_a_silent_peer_lost():
    """While a node builds its training segment it reads nothing: its keep-alive sends heartbeats only."""
    lh = ready_lh("alice", "bob", now=0.0)
    assert sends(lh.keepalive(0.5)) == []
    assert sends(lh.keepalive(20.0)) == [Heartbeat(instance=lh.instance)] * 2  # 4 peer timeouts of silence: no BYE
    assert sends(lh.keepalive(20.5)) == [] and lh.finished is None
    assert all(p.state is PartyState.READY for p in lh.parties.values())
    dh = DataHolderMachine(party="alice", run=RUN, config=CFG, now=0.0, hold_s=100.0)
    dh.start(0.0)
    (welcome,) = sends(feed(label_holder(), hello()))
    dh.receive(wire(welcome), 0.0)
    assert sends(dh.keepalive(0.5)) == [] and sends(dh.keepalive(20.0)) == [Heartbeat()]
    assert dh.finished is None and dh.state is DataHolderState.READY


def test_L2_label_holder_reports_a_silent_peer_by_name_and_tells_the_others():
    lh = ready_lh("alice", "bob", now=0.0)
    feed(lh, Heartbeat(), "bob", now=4.0)
    out = lh.handle_timer(5.0)
    fin = [o for o in out if isinstance(o, Finished)][0]
    assert fin.exit_code == 3 and "'alice'" in fin.reason and "5.0 s" in fin.reason
    byes = [o for o in out if isinstance(o, Send) and isinstance(o.message, Bye)]
    assert sorted((b.to, b.message.ok) for b in byes) == [(b"alice", False), (b"bob", False)]
    assert all("'alice'" in b.message.reason for b in byes)  # every party's log names who ended the session
    errors = [o for o in out if isinstance(o, Send) and isinstance(o.message, Error)]
    assert [(e.to, e.message.code) for e in errors] == [(b"alice", ErrorCode.TIMEOUT)]  # the silent one hears why


def test_L2_data_holder_reports_a_silent_label_holder():
    dh = DataHolderMachine(party="alice", run=RUN, config=CFG, now=0.0, hold_s=100.0)
    dh.start(0.0)
    (welcome,) = sends(feed(label_holder(), hello()))
    dh.receive(wire(welcome), 0.0)
    (fin,) = [o for o in dh.handle_timer(5.0) if isinstance(o, Finished)]
    assert fin.exit_code == 3 and "'bank'" in fin.reason


def test_L3_label_holder_gives_up_naming_the_parties_that_never_joined():
    lh = ready_lh("alice")
    assert lh.next_timer() == pytest.approx(1.0)
    feed(lh, Heartbeat(), now=59.0)
    lh.handle_timer(59.5)
    (fin,) = [o for o in lh.handle_timer(60.0) if isinstance(o, Finished)]
    assert fin.exit_code == 4 and "bob" in fin.reason and "alice" not in fin.reason.split("did not join")[0]


def test_L3_data_holder_gives_up_without_welcome():
    dh = DataHolderMachine(party="alice", run=RUN, config=CFG, now=0.0, handshake_timeout_s=10.0)
    dh.start(0.0)
    assert dh.handle_timer(9.9) == []
    (fin,) = dh.handle_timer(10.0)
    assert fin.exit_code == 4 and "no WELCOME" in fin.reason


def test_L3_data_holder_reports_a_refused_key():
    dh = DataHolderMachine(party="alice", run=RUN, config=CFG, now=0.0)
    dh.start(0.0)
    (fin,) = dh.refused_by_zap()
    assert fin.exit_code == 1 and "refused this node's key" in fin.reason


# ------------------------------------------------------------------------------------------------ whole sessions


def run_session(dh: DataHolderMachine, lh: LabelHolderMachine, now=0.0, limit=100):
    """Pump messages between two machines in memory until both are quiet."""
    queue = [("lh", o) for o in dh.start(now)]
    seen = []
    for _ in range(limit):
        if not queue:
            break
        dest, out = queue.pop(0)
        seen.append(out)
        if not isinstance(out, Send):
            continue
        if dest == "lh":
            queue += [("dh", o) for o in lh.receive(dh.party.encode(), dh.party, wire(out.message), now)]
        else:
            queue += [("lh", o) for o in dh.receive(wire(out.message), now)]
    return seen


def test_a_link_check_session_ends_with_both_sides_finished_ok():
    lh = label_holder()
    tensors = [Tensor("x", np.arange(4096, dtype=np.float32).reshape(64, 64))]
    alice = DataHolderMachine(party="alice", run=RUN, config=CFG, now=0.0, link_check=tensors, link_rounds=3)
    bob = DataHolderMachine(party="bob", run=RUN, config=CFG, now=0.0)
    seen = run_session(alice, lh) + run_session(bob, lh)
    assert [o.rounds for o in seen if isinstance(o, LinkChecked)] == [3]
    assert alice.finished.exit_code == 0 and bob.finished.exit_code == 0
    assert lh.finished == Finished(exit_code=0, reason="every data holder finished and left")
    assert [o.party for o in seen if isinstance(o, PeerLeft)] == ["alice", "bob"]


def test_a_data_holder_that_leaves_with_an_error_makes_the_label_holder_exit_non_zero():
    lh = ready_lh("alice", "bob")
    feed(lh, Bye(ok=False, reason="disk full"), "alice")
    feed(lh, Bye(ok=True, reason="done"), "bob")
    assert lh.finished.exit_code == 1 and "alice" in lh.finished.reason


def test_label_holder_close_says_bye_to_ready_peers():
    lh = ready_lh("alice")
    out = lh.close("stopped by SIGTERM", 1.0)
    assert sends(out) == [Bye(ok=False, reason="stopped by SIGTERM")]
    assert lh.finished.exit_code == 0


# ------------------------------------------------------------------------------------------------ fuzzing


@given(st.lists(st.tuples(st.sampled_from(["alice", "bob", "carol"]), st.booleans(), messages | hostile_frames(),
                          st.floats(0, 2)), max_size=12))
@settings(max_examples=examples(1000), deadline=None, suppress_health_check=list(HealthCheck))
def test_label_holder_survives_any_sequence_of_inputs(steps):
    """Every (state, message) pair is a transition or an ERROR answer; nothing else escapes; answers are valid."""
    lh = label_holder()
    now = 0.0
    for party, own_routing_id, item, dt in steps:
        now += dt
        frames = wire(item) if not isinstance(item, list) else item
        routing_id = party.encode() if own_routing_id else b"mallory"
        for out in lh.receive(routing_id, party, frames, now) + lh.handle_timer(now):
            if isinstance(out, Send):
                decode(wire(out.message))  # everything we send is valid on the wire
        assert all(p.state in PartyState for p in lh.parties.values())


@given(st.lists(st.tuples(messages | hostile_frames(), st.floats(0, 2)), max_size=12), st.integers(0, 2))
@settings(max_examples=examples(1000), deadline=None, suppress_health_check=list(HealthCheck))
def test_data_holder_survives_any_sequence_of_inputs(steps, rounds):
    dh = DataHolderMachine(party="alice", run=RUN, config=CFG, now=0.0, link_rounds=rounds,
                           link_check=[Tensor("x", np.zeros(3, np.float32))])
    dh.start(0.0)
    now = 0.0
    for item, dt in steps:
        now += dt
        frames = wire(item) if not isinstance(item, list) else item
        for out in dh.receive(frames, now) + dh.handle_timer(now):
            if isinstance(out, Send):
                decode(wire(out.message))


DH_INBOUND = {
    "WELCOME": None,  # built per test from a real label holder
    "ECHO_REPLY": EchoReply(seq=0, tensors=(Tensor("x", np.zeros(3, np.float32)),)),
    "HEARTBEAT": Heartbeat(),
    "BYE": Bye(ok=True, reason="done"),
    "ERROR": Error(code=int(ErrorCode.INTERNAL), message="x"),
    "HELLO": hello(),
    "ECHO": Echo(seq=0),
}

# (state, type) -> (answer type or error code or None, next state). PROTOCOL.md §9, data holder table.
DH_TABLE = {
    ("CONNECTING", "WELCOME"): ("ECHO", "READY"),
    ("CONNECTING", "ECHO_REPLY"): (ErrorCode.UNEXPECTED_MESSAGE, "CONNECTING"),
    ("CONNECTING", "HEARTBEAT"): (ErrorCode.UNEXPECTED_MESSAGE, "CONNECTING"),
    ("CONNECTING", "BYE"): (None, "CLOSED"),
    ("CONNECTING", "ERROR"): (None, "CLOSED"),
    ("CONNECTING", "HELLO"): (ErrorCode.UNEXPECTED_MESSAGE, "CONNECTING"),
    ("CONNECTING", "ECHO"): (ErrorCode.UNEXPECTED_MESSAGE, "CONNECTING"),
    ("READY", "WELCOME"): (ErrorCode.UNEXPECTED_MESSAGE, "READY"),
    ("READY", "ECHO_REPLY"): ("ECHO", "READY"),
    ("READY", "HEARTBEAT"): (None, "READY"),
    ("READY", "BYE"): (None, "CLOSED"),
    ("READY", "ERROR"): (None, "READY"),
    ("READY", "HELLO"): (ErrorCode.UNEXPECTED_MESSAGE, "READY"),
    ("READY", "ECHO"): (ErrorCode.UNEXPECTED_MESSAGE, "READY"),
}


@pytest.mark.parametrize(("state", "mtype"), sorted(DH_TABLE))
def test_T1_data_holder_follows_its_table(state, mtype):
    answer, next_state = DH_TABLE[(state, mtype)]
    dh = DataHolderMachine(party="alice", run=RUN, config=CFG, now=0.0, link_rounds=5,
                           link_check=[Tensor("x", np.zeros(3, np.float32))])
    dh.start(0.0)
    (welcome,) = sends(feed(label_holder(), hello()))
    if state == "READY":
        dh.receive(wire(welcome), 0.0)
    out = dh.receive(wire(welcome if mtype == "WELCOME" else DH_INBOUND[mtype]), 0.5)
    replies = sends(out)
    if answer is None:
        assert replies == []
    elif isinstance(answer, ErrorCode):
        assert error_codes(out) == [answer]
    else:
        assert [m.TYPE for m in replies] == [answer]
    assert dh.state.value == next_state


@pytest.mark.parametrize("routing_id", [b"alice/ab|cd", b"alice/|", b"alice/0123456789abcdef|bank"])
def test_S5_a_real_routing_id_with_a_bar_is_answered_on_its_own_connection(routing_id):
    """A peer chooses its routing id's bytes: one with a '|' (the label holder's relayed routes look like
    '<conn>|<hop>', [C3]) is still a connection of its own: its HELLO is answered there, never taken for a relay."""
    lh = label_holder()
    out = feed(lh, hello(), routing_id=routing_id)
    (send,) = [o for o in out if isinstance(o, Send)]
    assert isinstance(send.message, Welcome) and send.to == routing_id
    assert lh.outgoing(send) is send
