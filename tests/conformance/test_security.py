"""Section 2 [S3]/[S4] and section 8 [R3]: only allow-listed keys get anything delivered; identity is the key."""

from __future__ import annotations

import pytest
import zmq

from .kit import monitor_events, next_key
from .peer import SIGNATURE, Peer, envelope, pack, routing_id

QUIET = 1.0  # how long an unauthenticated connection listens for (there must be nothing)


def _impostor_traffic(kit, p, party):
    """A valid HELLO (as an allow-listed party), an ECHO and garbage: each would be answered if delivered."""
    p.send_raw(kit.hello_frames(party), pace=False)
    p.send_raw(envelope("ECHO", {"seq": 1}), pace=False)
    p.send_raw([SIGNATURE, b"\xc1"], pace=False)
    p.send_raw([b"garbage"], pace=False)


@pytest.mark.parametrize("rid", ["allow-listed", "own"])
def test_S3_key_not_on_allow_list_gets_nothing_delivered(kit, rid):
    """[S3]: a client with a CURVE key that is not on the allow-list (routing id = an allow-listed party's id, or
    its own) sends a valid HELLO, an ECHO and garbage: it gets no answer at all, the party it claims is not made
    READY, and a valid peer still completes the handshake."""
    victim = next_key(kit)
    public, secret = zmq.curve_keypair()
    p = kit.peer(key=victim, public=public, secret=secret,
                 routing_id=routing_id(victim.name) if rid == "allow-listed" else b"stranger")
    _impostor_traffic(kit, p, victim.name)
    p.expect_nothing(QUIET, "[S3] unlisted key")
    p.close()
    v = kit.peer(key=victim)
    kit.assert_not_ready(v, f"[S3] {victim.name} must not be READY after the impostor's HELLO")
    kit.assert_healthy("after [S3]")


def test_S3_unlisted_key_is_refused_in_the_CURVE_handshake(kit):
    """[S3] via ZAP (domain vfl): the client sees its handshake fail with an authentication error (status 400),
    which is what lets a data holder "report a key the label holder refused (ZAP failure) as such" ([L3])."""
    public, secret = zmq.curve_keypair()
    p = kit.peer(key=next_key(kit), public=public, secret=secret, routing_id=b"stranger", monitor=True)
    p.send_raw(kit.hello_frames("stranger"), pace=False)
    events = monitor_events(p, 2.0)
    names = [e for e, _ in events]
    assert "HANDSHAKE_FAILED_AUTH" in names, (
        f"[S3] an unlisted key must be refused by the ZAP handler (ZMQ_EVENT_HANDSHAKE_FAILED_AUTH on the client); "
        f"client socket events: {events}"
    )
    assert "HANDSHAKE_SUCCEEDED" not in names, f"[S3] handshake of an unlisted key succeeded: {events}"
    p.expect_nothing(0.2, "[S3]")
    kit.assert_healthy("after [S3]")


def test_S3_allow_listed_key_handshake_succeeds(kit):
    """Control for the test above: an allow-listed key's CURVE handshake succeeds."""
    p = kit.peer(key=next_key(kit), monitor=True)
    kit.handshake(p)
    events = monitor_events(p, 0.3)
    assert "HANDSHAKE_SUCCEEDED" in [e for e, _ in events], events
    kit.bye(p)


def test_R3_client_without_CURVE_gets_nothing(kit):
    """[R3]/[S3]: a NULL-mechanism client (no CURVE at all) with an allow-listed party's routing id gets nothing,
    and its HELLO does not make that party READY (a label holder must never fall back to --insecure)."""
    victim = next_key(kit)
    p = kit.peer(key=victim, curve=False)
    _impostor_traffic(kit, p, victim.name)
    p.expect_nothing(QUIET, "[R3] client without CURVE")
    p.close()
    v = kit.peer(key=victim)
    kit.assert_not_ready(v, f"[R3] {victim.name} must not be READY after the NULL client's HELLO")
    kit.assert_healthy("after [R3]")


def test_R3_client_with_wrong_server_key_gets_nothing(kit):
    """A client that expects another server key (allow-listed client key) cannot complete CURVE; nothing is
    delivered either way, and the node keeps serving."""
    key = next_key(kit)
    other_public, _ = zmq.curve_keypair()
    q = Peer(kit.ctx, kit.target.address, server_public=other_public, public=key.public, secret=key.secret,
             routing_id=routing_id(key.name), limits=kit.target.limits, label="wrong-server-key")
    kit.peers.append(q)
    _impostor_traffic(kit, q, key.name)
    q.expect_nothing(1.0, "wrong server key")
    q.maybe_ready = False
    q.close()
    kit.assert_healthy("after a client with the wrong server key")


# ----------------------------------------------------------------------------------------------------------------


def test_S4_routing_id_of_another_party_gets_IDENTITY_MISMATCH(kit):
    """[S4]: key of A, routing id B/<hex> (both allow-listed): every message (HELLO as A, HELLO as B, ECHO, BYE)
    gets IDENTITY_MISMATCH and is otherwise ignored: neither A nor B becomes READY."""
    a, b = kit.target.distinct(2)
    p = kit.peer(key=a, routing_id=routing_id(b.name))
    for frames, what in [
        (kit.hello_frames(a.name), "HELLO party A"),
        (kit.hello_frames(b.name), "HELLO party B"),
        (envelope("ECHO", {"seq": 1}), "ECHO"),
        (envelope("BYE", {"ok": True, "reason": "x"}), "BYE"),
    ]:
        p.send_raw(frames)
        p.expect_error("IDENTITY_MISMATCH", kit.T, f"[S4] key {a.name}, routing id {b.name}/...: {what}")
    p.maybe_ready = False
    p.close()
    for k in (a, b):
        q = kit.peer(key=k)
        kit.handshake(q, what=f"[S4] {k.name} after the mismatched connection")
        kit.bye(q)


@pytest.mark.parametrize("rid", ["none", "unknown", "case", "longer", "second_segment"])
def test_S4_routing_id_not_the_key_party_gets_IDENTITY_MISMATCH(kit, rid):
    """[S4]: no routing id at all (libzmq picks a random one), an unknown party, the party id in another case, the
    party id with a suffix before the '/', the party id only after the first '/': a valid HELLO gets
    IDENTITY_MISMATCH."""
    key = next_key(kit)
    rids = {
        "none": False,
        "unknown": routing_id("nobody-such"),
        "case": routing_id(key.name.upper()),
        "longer": routing_id(key.name + "x"),
        "second_segment": b"x/" + routing_id(key.name),
    }
    p = kit.peer(key=key, routing_id=rids[rid])
    p.send_raw(kit.hello_frames(key.name))
    p.expect_error("IDENTITY_MISMATCH", kit.T, f"[S4] routing id {rid}")
    p.maybe_ready = False
    p.close()
    kit.assert_not_ready(kit.peer(key=key), f"[S4] {key.name} must not be READY")


@pytest.mark.parametrize("which", ["another_hex", "the_same_routing_id"])
def test_S4_hijacked_routing_id_does_not_affect_the_real_session(kit, which):
    """[S4]/[S5]: A is READY; a connection with B's key and A's party in its routing id (another hex, or exactly
    A's live routing id) sends BYE and ECHO as A: it gets IDENTITY_MISMATCH or nothing at all (libzmq ignores a
    second connection with a routing id in use), and A's real connection is still READY."""
    a, b = kit.target.distinct(2)
    pa = kit.peer(key=a)
    kit.handshake(pa)
    h = kit.peer(key=b, routing_id=routing_id(a.name) if which == "another_hex" else pa.routing_id)
    h.send_raw(envelope("BYE", {"ok": True, "reason": "hijack"}))
    h.send_raw(envelope("ECHO", {"seq": 1}))
    got = h.drain(kit.quiet * 2)
    assert all(m.type == "ERROR" and m.code == 11 for m in got), (
        f"[S4] the hijacker may only get IDENTITY_MISMATCH, got {[m.summary() for m in got]}"
    )
    if which == "another_hex":
        assert len(got) == 2, f"[S4] BYE and ECHO on another party's routing id: two IDENTITY_MISMATCH, got {got}"
    h.close()
    kit.assert_ready(pa, "[S4] A's session after the hijack attempt")
    kit.bye(pa)


# ----------------------------------------------------------------------------------------------------------------
# The order of [S4] against section 3 and [M2] (section 2: decode, an ERROR is only logged, then [S4], then [S5]'s
# rule for a replaced connection, then a section 3 failure is answered, then the state table)

MALFORMED = {
    "bad_signature": [b"XXXXX", pack({"type": "ECHO", "seq": 1})],
    "bad_header": [SIGNATURE, b"\xc1"],
    "unknown_type": [SIGNATURE, pack({"type": "NOPE"})],
    "bad_tensor": [SIGNATURE, pack({"type": "ECHO", "seq": 1, "tensors": [{"name": "a", "dtype": "complex64",
                                                                           "shape": [1]}]}), b"\x00" * 8],
    "too_many_frames": [SIGNATURE, pack({"type": "ECHO", "seq": 1})] + [b""] * 70,
}


@pytest.mark.parametrize("which", list(MALFORMED))
def test_S4_applies_before_a_section_3_failure_is_answered(kit, which):
    """[S4]: a malformed message on a routing id naming another party gets IDENTITY_MISMATCH, not the code of its
    section 3 failure: whatever else is wrong with it."""
    a, b = kit.target.distinct(2)
    p = kit.peer(key=a, routing_id=routing_id(b.name))
    p.send_raw(MALFORMED[which])
    p.expect_error("IDENTITY_MISMATCH", kit.T, f"[S4] {which} on {b.name}'s routing id with {a.name}'s key")
    p.close()


@pytest.mark.parametrize("which", ["valid", "malformed"])
def test_M2_an_ERROR_on_another_partys_routing_id_is_only_logged(kit, which):
    """[M2] before [S4]: an ERROR (valid, or failing section 3) on a routing id naming another party gets no answer
    at all, not IDENTITY_MISMATCH; the probe after it (an ECHO) gets the next answer, IDENTITY_MISMATCH."""
    a, b = kit.target.distinct(2)
    p = kit.peer(key=a, routing_id=routing_id(b.name))
    fields = {"code": 6, "message": "x"} if which == "valid" else {"code": "6", "message": "x"}
    p.send_raw(envelope("ERROR", fields))
    p.send_raw(envelope("ECHO", {"seq": 1}))
    p.expect_error("IDENTITY_MISMATCH", kit.T, f"[M2] the {which} ERROR got an answer, or the probe none")
    p.expect_nothing(kit.quiet, "[M2]")
    p.close()


# ----------------------------------------------------------------------------------------------------------------
# [S5]: one connection per party, the one whose HELLO was accepted last


def test_S5_replaced_connection_gets_REPLACED_and_nothing_else(kit):
    """[S5]: A's second connection says HELLO: the first gets ERROR REPLACED (once), then no HEARTBEAT and nothing
    of A's session; each of its later messages (ECHO, HELLO, BYE, garbage: the rule of a replaced connection comes
    before section 3) gets REPLACED and is otherwise ignored (its BYE does not end A's session); an ERROR from it gets
    nothing ([M2]). The new connection gets WELCOME, HEARTBEATs and ECHO_REPLYs."""
    key = next_key(kit)
    old = kit.peer(key=key)
    kit.handshake(old, what="first connection")
    new = kit.peer(key=key)
    w = kit.handshake(new, what="[S5] HELLO on a new connection")
    old.expect_error("REPLACED", kit.T, "[S5] the old connection when the new one's HELLO was accepted")
    old.expect_nothing(2 * w.get("heartbeat_ms") / 1000, "[S5] a replaced connection gets nothing more")
    assert not [m for _, m in old.transcript if m.startswith("HEARTBEAT")], "[S5] HEARTBEAT to a replaced connection"
    for what, frames in [
        ("ECHO", envelope("ECHO", {"seq": 1})),
        ("HELLO", kit.hello_frames(key.name)),
        ("BYE", envelope("BYE", {"ok": True, "reason": "old connection"})),
        ("bad header", [SIGNATURE, b"\xc1"]),
    ]:
        old.send_raw(frames)
        old.expect_error("REPLACED", kit.T, f"[S5] {what} from the replaced connection")
    old.send_raw(envelope("ERROR", {"code": 6, "message": "x"}))
    old.send_raw(envelope("ECHO", {"seq": 2}))
    old.expect_error("REPLACED", kit.T, "[M2] the replaced connection's ERROR got an answer (or the probe none)")
    old.maybe_ready = False
    kit.assert_ready(new, "[S5] the new connection after the old one's messages")
    kit.bye(new)


def test_S5_non_HELLO_on_a_new_connection_of_a_live_party_is_UNEXPECTED(kit):
    """[S5]: A is READY on one connection; a second connection with A's key sends ECHO, HEARTBEAT and BYE before any
    HELLO: UNEXPECTED_MESSAGE each (a section 3 failure on it keeps its own code), and A's session is untouched."""
    key = next_key(kit)
    live = kit.peer(key=key)
    kit.handshake(live)
    other = kit.peer(key=key)
    for what, frames in [("ECHO", envelope("ECHO", {"seq": 1})), ("HEARTBEAT", envelope("HEARTBEAT")),
                         ("BYE", envelope("BYE", {"ok": True, "reason": "x"}))]:
        other.send_raw(frames)
        other.expect_error("UNEXPECTED_MESSAGE", kit.T, f"[S5] {what} on a connection that has not said HELLO")
    other.send_raw([SIGNATURE, b"\xc1"])
    other.expect_error("BAD_HEADER", kit.T, "section 3 before the state table on a connection without HELLO")
    kit.assert_ready(live, "[S5] the live connection")
    live.expect_nothing(kit.quiet, "[S5] the live connection gets none of the other's answers")
    kit.bye(live)


def test_S5_refused_HELLO_on_a_new_connection_replaces_nothing(kit):
    """[S5] replaces on an *accepted* HELLO only: a second connection's HELLO that gets CONFIG_MISMATCH leaves the
    first connection the party's (no REPLACED to it, it is still READY)."""
    key = next_key(kit)
    live = kit.peer(key=key)
    kit.handshake(live)
    other = kit.peer(key=key)
    other.send_raw(kit.hello_frames(key.name, run=kit.target.run + "-other"))
    other.expect_error("CONFIG_MISMATCH", kit.T, "[H4] the second connection's HELLO")
    kit.assert_ready(live, "[S5] the first connection after a refused HELLO elsewhere")
    kit.bye(live)
