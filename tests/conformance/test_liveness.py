"""Section 9 [L1]: a READY label holder heartbeats a peer it has sent nothing to for heartbeat_ms.

[L2] (peer lost, SIGSTOP) and [L3] (join/handshake timeouts) need process control of both sides and are covered
by the integration tests, not by this raw-peer kit."""

from __future__ import annotations

import time

from .kit import next_key


def test_L1_silent_READY_peer_receives_HEARTBEATs(kit):
    """After WELCOME the kit sends nothing: a HEARTBEAT arrives within 2 x heartbeat_ms, and another within
    2 x heartbeat_ms of the first. HEARTBEATs are well-formed (no tensors, v1 envelope: checked by the parser)."""
    p = kit.peer(key=next_key(kit))
    w = kit.handshake(p)
    hb = w.get("heartbeat_ms") / 1000.0
    t_welcome = w.t
    beats = []
    deadline = t_welcome + 4 * hb + 0.5
    while len(beats) < 2 and time.monotonic() < deadline:
        m = p.recv(deadline - time.monotonic())
        if m is None:
            break
        assert m.type == "HEARTBEAT", f"a silent READY peer should only get HEARTBEATs, got {m.summary()}"
        beats.append(m.t)
    assert beats, f"[L1] no HEARTBEAT within {4 * hb + 0.5:.1f} s of WELCOME (heartbeat_ms = {hb * 1000:.0f})"
    assert beats[0] - t_welcome <= 2 * hb + 0.2, (
        f"[L1] first HEARTBEAT {beats[0] - t_welcome:.2f} s after WELCOME; heartbeat_ms = {hb * 1000:.0f}"
    )
    assert len(beats) == 2 and beats[1] - beats[0] <= 2 * hb + 0.2, (
        f"[L1] second HEARTBEAT missing or late: {[round(b - t_welcome, 2) for b in beats]} s after WELCOME"
    )
    kit.assert_ready(p, "after [L1]")
    kit.bye(p)
