"""A live label holder in a segment chain (PROTOCOL.md section 13, v1.10): [C2], [C3] at the label holder's end.

The node under test is the label holder ``bank`` of the session ``dh1 -> seg1 -> bank``, ``dh2 -> bank``. The kit
plays the segment holder seg1 (a DEALER with seg1's key that joins as `segment_holder`) and, through it, data holder
dh1's relayed session (built and checked with the kit's own [C3] code, keys from the kit's key files). No data holder
ever completes the set (dh2 never joins), so the label holder stays before the PSI for the whole module.
"""

from __future__ import annotations

import time
from typing import Optional

import msgpack
import numpy as np
import pytest

from .chain import DH1, DH2, RUN, SEG, LabelHolderEnv, hello_fields
from .peer import CODES, Msg, Peer, envelope, pack, routing_id
from .relay import UP, Channel, flip

T = 5.0
QUIET = 0.4


class Env:
    def __init__(self, lh: LabelHolderEnv):
        self.lh = lh
        self.seg = lh.peer(SEG)
        self.seg.send("HELLO", hello_fields(SEG, "segment_holder"))
        self.welcome = self.seg.expect("WELCOME", 60.0, "seg1's HELLO to the label holder")
        self.channels: dict[str, Channel] = {}  # dh1's relayed connections the kit opened, by conn

    def recv(self, timeout: float) -> tuple[Optional[Msg], Optional[list[bytes]]]:
        """The next message for seg1 but HEARTBEATs, plain or relayed (the label holder heartbeats every READY
        party, relayed ones too), and for a RELAY of a connection the kit opened, its inner frames, checked ([C3])."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.seg.recv_app(max(0.0, deadline - time.monotonic()))
            if m is None:
                return None, None
            ch = self.channels.get(m.get("conn")) if m.type == "RELAY" and m.get("party") == DH1 else None
            if ch is None:
                return m, None
            inner = ch.check(m, "a RELAY for dh1")
            if _type(inner) != "HEARTBEAT":
                return m, inner

    def expect_error(self, code: str, what: str) -> Msg:
        m, _ = self.recv(T)
        assert m is not None and m.type == "ERROR" and m.code == CODES[code], (
            f"{what}: expected ERROR {code} to seg1, got {m.summary() if m else 'nothing'}\n{self.seg.history()}")
        return m

    def quiet(self, ch: Optional[Channel], what: str) -> None:
        """Nothing for seg1 within QUIET but relays to dh1's other connections ([S5] traffic of earlier tests)."""
        deadline = time.monotonic() + QUIET
        while True:
            m, _ = self.recv(max(0.0, deadline - time.monotonic()))
            if m is None:
                return
            assert m.type == "RELAY" and ch is not None and m.get("conn") != ch.conn, (
                f"{what}: expected nothing, got {m.summary()}")


@pytest.fixture(scope="module")
def env(request, tmp_path_factory, ctx):
    opts = request.config.option
    if opts.target and not opts.node_cmd:
        pytest.skip("starts a label holder of its own: give --node-cmd to test another implementation")
    lh = LabelHolderEnv(tmp_path_factory.mktemp("vfl-chain-lh"), opts.node_cmd, ctx)
    try:
        yield Env(lh)
    finally:
        lh.close()


@pytest.fixture(autouse=True)
def _lh_alive(request):
    yield
    if "env" in request.fixturenames:
        e = request.getfixturevalue("env")
        assert e.lh.proc.poll() is None, f"[R1] the label holder exited\n{e.lh.log_text()[-3000:]}"


def relayed_dh1(env: Env, what: str = "") -> Channel:
    """A new relayed connection of dh1 through seg1: HELLO up, WELCOME back, both authentic ([C3])."""
    ch = Channel(env.lh.relay_key(DH1), RUN, DH1, routing_id(DH1).decode(), UP)
    env.channels[ch.conn] = ch
    env.seg.send_raw(ch.wrap(envelope("HELLO", hello_fields(DH1))), pace=False)
    welcome = next_relay(env, ch, f"{what}: the label holder's answer to dh1's relayed HELLO")
    assert _type(welcome) == "WELCOME", f"{what}: expected a relayed WELCOME, got {_header(welcome)}"
    return ch


def next_relay(env: Env, ch: Channel, what: str) -> list[bytes]:
    """The next message seg1 gets for ``ch``'s connection (relays for dh1's older connections are skipped): a RELAY
    that verifies with the kit's key and is the next seq."""
    for _ in range(50):
        m, inner = env.recv(T)
        assert m is not None, f"{what}: nothing within {T} s\n{env.seg.history()}"
        if m.type == "RELAY" and m.get("party") == DH1 and m.get("conn") != ch.conn:
            continue  # e.g. ERROR REPLACED to an older connection of dh1 ([S5])
        assert inner is not None, f"{what}: expected a RELAY for {ch.conn}, got {m.summary()}"
        return inner
    raise AssertionError(f"{what}: too many relays for other connections")


def echo_round_trip(env: Env, ch: Channel, what: str) -> None:
    """The relayed session of ``ch`` is READY and its sequence numbers are where the kit expects them."""
    env.seg.send_raw(ch.wrap(envelope("ECHO", {"seq": 41}, [("x", np.arange(5, dtype="<i4"))])), pace=False)
    reply = next_relay(env, ch, f"{what}: relayed ECHO")
    h = _header(reply)
    assert h.get("type") == "ECHO_REPLY" and h.get("seq") == 41, f"{what}: {h}"
    assert reply[2] == np.arange(5, dtype="<i4").tobytes()


def _header(frames: list[bytes]) -> dict:
    return msgpack.unpackb(frames[1], raw=False, strict_map_key=False)


def _type(frames: list[bytes]):
    return _header(frames).get("type")


def _with(frames: list[bytes], **fields) -> list[bytes]:
    return [frames[0], pack({**_header(frames), **fields}), *frames[2:]]


# ----------------------------------------------------------------------------------------------------------------


def test_C5_label_holder_welcomes_a_segment_holder_without_psi_nonce(env):
    """[C5]: the segment holder's WELCOME has no psi_nonce, and its data_holders list does not contain it."""
    w = env.welcome
    assert "psi_nonce" not in w.header, f"[C5] WELCOME to a segment holder carries psi_nonce: {w.summary()}"
    assert w.get("data_holders") == [DH1, DH2] and SEG not in w.get("data_holders"), w.summary()


def test_C3_label_holder_relays_are_authentic_and_numbered(env):
    """[C3]: the label holder answers a relayed HELLO with a RELAY to the segment holder it came through, for the
    same party and conn, seq 0 "down", whose MAC verifies under the spec's relay key; the next relayed message of that
    connection gets seq 1 back."""
    ch = relayed_dh1(env, "[C3]")
    echo_round_trip(env, ch, "[C3]")
    assert ch.next_recv == 2 and ch.next_send == 2


FLIPS = {  # what the path altered -> how
    "inner_header_byte": lambda f: flip(f, 2, 5),
    "inner_tensor_byte": lambda f: flip(f, 3, 0),
    "mac_digit": lambda f: _with(f, mac=("0" if _header(f)["mac"][0] != "0" else "1") + _header(f)["mac"][1:]),
    "seq_without_its_mac": lambda f: _with(f, seq=_header(f)["seq"] + 1),
    "run_of_another_session": None,  # an authentic MAC, but for run "other-run"
    "direction_down": None,  # an authentic MAC, but for direction "down"
}


@pytest.mark.parametrize("which", list(FLIPS))
def test_C3_an_altered_RELAY_is_IDENTITY_MISMATCH_and_changes_nothing(env, which):
    """[C3]: a RELAY altered on the way (a byte of the inner header or of an inner tensor, the MAC, the seq) or
    carried to another run or direction fails the MAC: ERROR IDENTITY_MISMATCH to the segment holder (in the clear,
    not relayed), and nothing changes: the same seq, authentic, is then accepted and answered."""
    ch = relayed_dh1(env, f"[C3] {which}")
    inner = envelope("ECHO", {"seq": 41}, [("x", np.arange(5, dtype="<i4"))])
    good = ch.wrap(inner, advance=False)
    if which == "run_of_another_session":
        bad = Channel(ch.key, "other-run", DH1, ch.conn, UP).wrap(inner, seq=ch.next_send)
    elif which == "direction_down":
        bad = Channel(ch.key, RUN, DH1, ch.conn, "down").wrap(inner, seq=ch.next_send)
    else:
        bad = FLIPS[which](good)
    env.seg.send_raw(bad)
    err = env.expect_error("IDENTITY_MISMATCH", f"[C3] {which}")
    assert err.get("ref") in (None, "RELAY"), err.summary()
    env.quiet(ch, f"[C3] {which}: nothing else")
    echo_round_trip(env, ch, f"[C3] {which}: the authentic RELAY with the same seq")


def test_C3_a_replayed_RELAY_is_UNEXPECTED_MESSAGE(env):
    """[C3]: an authentic RELAY sent again (replayed) gets ERROR UNEXPECTED_MESSAGE to the segment holder and is not
    acted on (no second answer); the connection goes on at the next seq."""
    ch = relayed_dh1(env, "[C3] replay")
    frames = ch.wrap(envelope("ECHO", {"seq": 7}))
    env.seg.send_raw(frames, pace=False)
    assert _header(next_relay(env, ch, "[C3] the original"))["type"] == "ECHO_REPLY"
    env.seg.send_raw(frames)
    env.expect_error("UNEXPECTED_MESSAGE", "[C3] replayed RELAY")
    env.quiet(ch, "[C3] a replayed RELAY is not answered again")
    echo_round_trip(env, ch, "[C3] after the replay")


def test_C3_a_first_RELAY_of_an_unknown_conn_with_seq_above_0_is_UNEXPECTED_MESSAGE(env):
    """[C3]: the first RELAY of a conn the label holder does not know must have seq 0; an authentic one with seq 1
    (say, after a RELAY the path dropped) gets ERROR UNEXPECTED_MESSAGE, and that conn still starts at 0."""
    ch = Channel(env.lh.relay_key(DH1), RUN, DH1, routing_id(DH1).decode(), UP)
    env.channels[ch.conn] = ch
    env.seg.send_raw(ch.wrap(envelope("HELLO", hello_fields(DH1)), seq=1))
    env.expect_error("UNEXPECTED_MESSAGE", "[C3] first RELAY of a conn with seq 1")
    env.seg.send_raw(ch.wrap(envelope("HELLO", hello_fields(DH1))), pace=False)
    assert _type(next_relay(env, ch, "[C3] then seq 0")) == "WELCOME"


@pytest.mark.parametrize("sender", ["seg1_connection_without_HELLO", "dh2_direct_not_joined", "dh1_direct"])
def test_C3_a_RELAY_from_a_connection_that_is_not_a_joined_segment_holder_is_UNEXPECTED_MESSAGE(env, sender):
    """[C3]: only a joined segment holder feeding the label holder relays: an authentic RELAY of dh1 from another
    connection of seg1 (no HELLO on it), from dh2's own connection, or from dh1 itself gets ERROR
    UNEXPECTED_MESSAGE, and dh1's relayed session is untouched."""
    ch = relayed_dh1(env, f"[C3] {sender}")
    party = {"seg1_connection_without_HELLO": SEG, "dh2_direct_not_joined": DH2, "dh1_direct": DH1}[sender]
    p: Peer = env.lh.peer(party)
    p.send_raw(ch.wrap(envelope("ECHO", {"seq": 3}), advance=False))
    if sender == "dh1_direct":  # [C2] decides first for a party behind a segment holder: its own connection
        err = p.recv_app(T)
        assert err is not None and err.type == "ERROR" and err.code in (9, 11), (
            f"[C3]/[C2] a RELAY on dh1's own connection: expected UNEXPECTED_MESSAGE or IDENTITY_MISMATCH, got "
            f"{err and err.summary()}")
    else:
        p.expect_error("UNEXPECTED_MESSAGE", T, f"[C3] RELAY from {sender}")
    env.quiet(ch, f"[C3] {sender}: nothing reaches seg1")
    echo_round_trip(env, ch, f"[C3] {sender}: dh1's relayed session")
    p.close()


def test_C3_a_RELAY_whose_conn_is_not_its_partys_is_BAD_FIELD(env):
    """[C3]: conn is the end party's routing id at its hop, `<party>/<16 hex>`: one naming another party (or not of
    that form) is refused before anything else of it is used."""
    for conn in (routing_id(DH2).decode(), "dh1/XYZ", "dh1"):
        ch = Channel(env.lh.relay_key(DH1), RUN, DH1, conn, UP)
        env.seg.send_raw(ch.wrap(envelope("HELLO", hello_fields(DH1))))
        env.expect_error("BAD_FIELD", f"[C3] RELAY.conn {conn!r}")


# ----------------------------------------------------------------------------------------------------------------
# [C2] each party's session takes its configured route


@pytest.mark.parametrize("kind", ["HELLO", "ECHO", "HEARTBEAT"])
def test_C2_a_party_behind_a_segment_holder_on_its_own_connection_is_IDENTITY_MISMATCH(env, kind):
    """[C2]: dh1 is behind seg1, so anything it sends on a connection of its own to the label holder gets ERROR
    IDENTITY_MISMATCH naming the route its session takes (seg1), and is otherwise ignored: its relayed session is
    untouched."""
    ch = relayed_dh1(env, f"[C2] {kind}")
    p = env.lh.peer(DH1)
    p.send_raw(envelope(kind, {"HELLO": hello_fields(DH1), "ECHO": {"seq": 1}, "HEARTBEAT": {}}[kind]))
    err = p.expect_error("IDENTITY_MISMATCH", T, f"[C2] dh1's own connection, {kind}")
    assert SEG in err.get("message"), f"[C2] the ERROR must name the route (through {SEG}): {err.get('message')!r}"
    env.quiet(ch, f"[C2] {kind}: nothing for seg1")
    echo_round_trip(env, ch, f"[C2] {kind}: dh1's relayed session")
    p.close()


@pytest.mark.parametrize("party", [DH2, SEG, "mallory"])
def test_C2_a_RELAY_carrying_a_party_that_feeds_the_label_holder_directly_is_IDENTITY_MISMATCH(env, party):
    """[C2], [C3]: a RELAY (authentic under that party's relay key) carrying dh2 or seg1 itself, both of which
    feed the label holder directly, or a party that is not in the session at all, gets ERROR IDENTITY_MISMATCH to
    the segment holder."""
    key = env.lh.relay_key(party) if party in (DH2, SEG) else bytes(32)
    ch = Channel(key, RUN, party, routing_id(party).decode(), UP)
    role = "segment_holder" if party == SEG else "data_holder"
    env.seg.send_raw(ch.wrap(envelope("HELLO", hello_fields(party, role))))
    env.expect_error("IDENTITY_MISMATCH", f"[C2] RELAY carrying {party}")
    env.quiet(None, f"[C2] RELAY carrying {party}: nothing else")


def test_C3_a_RELAY_inside_a_RELAY_is_refused(env):
    """[C3]: relays are forwarded, never nested: an authentic RELAY whose inner message is itself a RELAY is
    refused with an ERROR; it passed the relay checks, so it counts in the sequence, and the relayed session goes
    on at the next seq."""
    ch = relayed_dh1(env, "[C3] nested")
    # a RELAY without tensors: well formed for section 3 (a real one's `~header` would clash with the outer one's)
    nested = envelope("RELAY", {"party": DH1, "conn": ch.conn, "seq": 1, "mac": "0" * 64})
    env.seg.send_raw(ch.wrap(nested), pace=False)
    m, inner = env.recv(T)
    assert m is not None, "[C3] a RELAY inside a RELAY must be refused with an ERROR"
    err = inner if m.type == "RELAY" else m.frames
    h = _header(err)
    assert h.get("type") == "ERROR", f"[C3] expected an ERROR for a RELAY inside a RELAY, got {h}"
    echo_round_trip(env, ch, "[C3] after a nested RELAY")


def test_C3_the_label_holder_keeps_at_most_4_relayed_connections_per_party(env):
    """[C3]: the label holder keeps the sequence state of at most 4 relayed connections of a party, the latest: after
    5 new connections of dh1 the first one is unknown again, so its next RELAY (seq above 0) is UNEXPECTED_MESSAGE,
    while the 4 latest still have theirs (the newest answers at its next seq)."""
    chans = [relayed_dh1(env, f"[C3] connection {i}") for i in range(5)]
    env.seg.send_raw(chans[0].wrap(envelope("ECHO", {"seq": 1})))
    env.expect_error("UNEXPECTED_MESSAGE", "[C3] a forgotten relayed connection, seq 1")
    echo_round_trip(env, chans[-1], "[C3] the newest connection")


def _tensor0(frames: list[bytes], **desc) -> list[bytes]:
    h = _header(frames)
    return [frames[0], pack({**h, "tensors": [{**h["tensors"][0], **desc}, *h["tensors"][1:]]}), *frames[2:]]


RELAY_CHECKS = {  # [C3] at the end receiver, in order: what is wrong -> the code
    "mac_uppercase": (lambda f: _with(f, mac=_header(f)["mac"].upper().replace("0", "A")), "BAD_FIELD"),
    "mac_63_digits": (lambda f: _with(f, mac=_header(f)["mac"][:-1]), "BAD_FIELD"),
    "first_tensor_not_header": (lambda f: _tensor0(f, name="header"), "BAD_TENSOR"),
    "header_int8": (lambda f: _tensor0(f, dtype="int8"), "BAD_TENSOR"),
    "header_2d": (lambda f: _tensor0(f, shape=[1, len(f[2])]), "BAD_TENSOR"),
    "header_over_max_header_bytes": (
        lambda f: [f[0], pack({**_header(f), "tensors": [{"name": "~header", "dtype": "uint8", "shape": [65537]},
                                                         *_header(f)["tensors"][1:]]}),
                   f[2] + b" " * (65537 - len(f[2])), *f[3:]], "TOO_LARGE"),
    "bad_mac_format_before_bad_header": (lambda f: _tensor0(_with(f, mac="x"), name="header"), "BAD_FIELD"),
    "bad_header_before_bad_mac": (lambda f: _tensor0(_with(f, mac="0" * 64), dtype="int8"), "BAD_TENSOR"),
}


@pytest.mark.parametrize("which", list(RELAY_CHECKS))
def test_C3_the_label_holder_checks_a_RELAY_in_the_order_of_C3(env, which):
    """[C3]: the end receiver checks, in this order, `mac` is 64 lowercase hex (BAD_FIELD), the first tensor is
    `~header`, uint8, 1-D (BAD_TENSOR) and at most max_header_bytes long (TOO_LARGE), then the MAC; each failure is
    answered to the segment holder, and the relayed session is unchanged (the same seq is then accepted)."""
    build, code = RELAY_CHECKS[which]
    ch = relayed_dh1(env, f"[C3] {which}")
    good = ch.wrap(envelope("ECHO", {"seq": 41}, [("x", np.arange(5, dtype="<i4"))]), advance=False)
    env.seg.send_raw(build(good))
    env.expect_error(code, f"[C3] {which}")
    echo_round_trip(env, ch, f"[C3] {which}: the authentic RELAY with the same seq")


def _relayed_error(env: Env, ch: Channel, code: str, what: str) -> dict:
    h = _header(next_relay(env, ch, what))
    assert h.get("type") == "ERROR" and h.get("code") == CODES[code], f"{what}: expected a relayed ERROR {code}, got {h}"
    return h


def test_C3_S4_H2_a_relayed_HELLO_for_another_party_is_IDENTITY_MISMATCH_on_its_conn(env):
    """[C3] -> [H2]: the inner message is handled as if the end party had sent it on a connection `conn` of its
    own, so a relayed HELLO of dh1 whose `party` is dh2 gets ERROR IDENTITY_MISMATCH, relayed back on that conn."""
    ch = Channel(env.lh.relay_key(DH1), RUN, DH1, routing_id(DH1).decode(), UP)
    env.channels[ch.conn] = ch
    env.seg.send_raw(ch.wrap(envelope("HELLO", {**hello_fields(DH1), "party": DH2})))
    _relayed_error(env, ch, "IDENTITY_MISMATCH", "[H2] relayed HELLO naming dh2")


def test_C3_S5_per_conn_a_relayed_message_of_a_conn_without_HELLO_or_replaced(env):
    """[C3] -> [S5] per conn: a relayed ECHO on a conn of dh1 that never said HELLO gets ERROR UNEXPECTED_MESSAGE,
    and on a conn that a newer conn's HELLO replaced, ERROR REPLACED, each relayed back on its own conn; the current
    conn goes on."""
    old = relayed_dh1(env, "[S5] old conn")
    new = relayed_dh1(env, "[S5] new conn")
    fresh = Channel(env.lh.relay_key(DH1), RUN, DH1, routing_id(DH1).decode(), UP)
    env.channels[fresh.conn] = fresh
    env.seg.send_raw(fresh.wrap(envelope("ECHO", {"seq": 1})))
    _relayed_error(env, fresh, "UNEXPECTED_MESSAGE", "[S5] relayed ECHO on a conn without HELLO")
    env.seg.send_raw(old.wrap(envelope("ECHO", {"seq": 1})))
    for _ in range(3):  # before it, maybe the ERROR REPLACED the old conn got when the new one said HELLO
        h = _relayed_error(env, old, "REPLACED", "[S5] relayed ECHO on a replaced conn")
        if h.get("ref") == "ECHO":
            break
    else:
        raise AssertionError("[S5] the replaced conn's ECHO got no ERROR REPLACED")
    echo_round_trip(env, new, "[S5] the current conn")
