"""Section 2 [S3]/[S4] and section 8 [R3]: only allow-listed keys get anything delivered; identity is the key."""

from __future__ import annotations

import pytest
import zmq

from .kit import monitor_events, next_key
from .peer import SIGNATURE, Peer, envelope, routing_id

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
