"""PROTOCOL.md [C9], [X9] and the end of a chained session on the label holder's machine, in memory: a segment
holder that comes back takes the sessions behind it with it, the lost segment holder is the one named, and the BYEs
that end a session reach the parties behind a segment holder before the segment holder's own."""

from __future__ import annotations

from vfl.protocol import Bye, Finished, LabelHolderMachine, PartyState, Send, SessionConfig
from vfl.protocol.chain import Segment
from vfl.protocol.relay import RelayChannel

from .test_machines import RUN, hello, wire
from .test_restarts import NO_PSI

KEY = bytes(range(32))
#: dh1, dh2 -> seg1 -> bank
CHAIN = SessionConfig(cut_widths={"dh1": 4, "dh2": 4}, batch_size=8, window=1, model="m1", psi=True, train=True,
                      segments={"seg1": Segment(("dh1", "dh2"), 6, "concat")})


def chain_lh() -> LabelHolderMachine:
    return LabelHolderMachine(party="bank", run=RUN, config=CHAIN, now=0.0, heartbeat_s=1.0, peer_timeout_s=5.0,
                              join_timeout_s=60.0, rejoin_timeout_s=10.0, psi=NO_PSI,
                              relay_keys={"dh1": KEY, "dh2": KEY})


def seg_hello(lh: LabelHolderMachine, route: bytes, now: float) -> list:
    return lh.receive(route, "seg1", wire(hello("seg1", cfg=CHAIN, role="segment_holder", version=(1, 10))), now)


def relayed_hello(lh: LabelHolderMachine, party: str, conn: str, seg_route: bytes, now: float) -> list:
    channel = RelayChannel(KEY, run=RUN, party=party, conn=conn, sends="up")
    relay = channel.wrap(hello(party, cfg=CHAIN, version=(1, 10)))
    return lh.receive(seg_route, "seg1", wire(relay), now)


def joined_chain() -> LabelHolderMachine:
    lh = chain_lh()
    seg_hello(lh, b"seg1/0000000000000001", 0.0)
    for i, party in enumerate(("dh1", "dh2")):
        relayed_hello(lh, party, f"{party}/000000000000000{i + 1}", b"seg1/0000000000000001", 0.0)
    assert all(p.state is PartyState.READY for p in lh.parties.values())
    return lh


def test_C9_a_segment_holder_that_comes_back_makes_the_parties_behind_it_lost():
    """seg1 says HELLO on a new connection while dh1 and dh2 still count as connected: their relayed sessions went
    with seg1's old connection, so they are LOST from now on (the label holder waits for their rejoins) and nothing
    more goes to their old routes."""
    lh = joined_chain()
    out = seg_hello(lh, b"seg1/0000000000000002", 1.0)
    assert lh.parties["seg1"].state is PartyState.READY
    for party in ("dh1", "dh2"):
        assert lh.parties[party].state is PartyState.LOST and lh.parties[party].lost_at == 1.0
        assert lh.parties[party].route is None
    assert "segment holder 'seg1' rejoined" in " ".join(getattr(o, "text", "") for o in out)
    relayed_hello(lh, "dh1", "dh1/00000000000000a1", b"seg1/0000000000000002", 2.0)
    assert lh.parties["dh1"].state is PartyState.READY


def test_X9_the_lost_segment_holder_is_named_not_the_parties_behind_it():
    """seg1 and the parties behind it all go silent; when the rejoin timeout is over, the session ends (exit 3)
    naming seg1, whose loss is the cause of theirs."""
    lh = joined_chain()
    lh.handle_timer(6.0)  # the peer timeout: every party is lost
    assert all(p.state is PartyState.LOST for p in lh.parties.values())
    (finished,) = [o for o in lh.handle_timer(17.0) if isinstance(o, Finished)]
    assert finished.exit_code == 3
    assert finished.reason.startswith("segment holder 'seg1' stopped answering and did not come back within 10 s")


#: dh1, dh2 -> seg2 -> seg1 -> bank, the segment nearest the label holder listed first
LINE = SessionConfig(cut_widths={"dh1": 4, "dh2": 4}, batch_size=8, window=1, model="m1", psi=True, train=True,
                     segments={"seg1": Segment(("seg2",), 5, "concat"), "seg2": Segment(("dh1", "dh2"), 6, "concat")})


def test_the_BYEs_that_end_a_chained_session_reach_the_parties_behind_a_segment_holder_first():
    """A segment holder stops relaying once its own BYE has come: the BYEs for the parties behind it must come
    before it, the farthest first (dh1, dh2, then seg2, then seg1), whatever order the config lists them in."""
    lh = LabelHolderMachine(party="bank", run=RUN, config=LINE, now=0.0, heartbeat_s=1.0, peer_timeout_s=5.0,
                            join_timeout_s=60.0, psi=NO_PSI, relay_keys={"dh1": KEY, "dh2": KEY, "seg2": KEY})
    hop = b"seg1/0000000000000001"
    lh.receive(hop, "seg1", wire(hello("seg1", cfg=LINE, role="segment_holder", version=(1, 10))), 0.0)
    for i, (party, role) in enumerate((("seg2", "segment_holder"), ("dh1", "data_holder"), ("dh2", "data_holder"))):
        channel = RelayChannel(KEY, run=RUN, party=party, conn=f"{party}/000000000000000{i}", sends="up")
        lh.receive(hop, "seg1", wire(channel.wrap(hello(party, cfg=LINE, role=role, version=(1, 10)))), 0.0)
    assert all(p.state is PartyState.READY for p in lh.parties.values())
    out = lh.close("stopped by SIGTERM", 1.0)
    byes = [o for o in out if isinstance(o, Send)]
    assert all(isinstance(o.message, Bye) for o in byes)
    order = [o.to.split(b"/")[0] for o in byes]
    assert order[-2:] == [b"seg2", b"seg1"] and sorted(order[:2]) == [b"dh1", b"dh2"], order


def test_B4_relays_that_never_verify_cost_the_relayed_party_not_its_segment_holder():
    """A party behind seg1 (or seg1 itself) floods RELAYs whose MAC does not verify: each is answered to seg1, but the
    refused bytes are charged to the party the RELAYs claim; past that budget its relayed session is lost, and seg1's
    own connection is never closed (an honest segment holder cannot be disconnected by an input's garbage)."""
    from vfl.protocol import Disconnect, Error
    from vfl.protocol.errors import ErrorCode

    lh = joined_chain()
    seg_route = b"seg1/0000000000000001"
    forged = RelayChannel(bytes(32), run=RUN, party="dh1", conn="dh1/0000000000000001", sends="up")
    forged.next_send = 1  # the next message of dh1's relayed connection, under a key that is not dh1's
    blob = wire(forged.wrap(Bye(ok=True, reason="x" * 60000)))
    outs = []
    for i in range(2000):  # 2000 x ~60 kB: far more than the 64 MiB burst
        outs += lh.receive(seg_route, "seg1", blob, 1.0 + i * 1e-4)
        if lh.parties["dh1"].state is PartyState.LOST:
            break
    assert lh.parties["dh1"].state is PartyState.LOST
    assert lh.parties["seg1"].state is PartyState.READY and lh.parties["seg1"].route == seg_route
    assert not any(isinstance(o, Disconnect) for o in outs)
    codes = {ErrorCode(o.message.code) for o in outs if isinstance(o, Send) and isinstance(o.message, Error)}
    assert codes == {ErrorCode.IDENTITY_MISMATCH}
    assert all(o.to == seg_route for o in outs if isinstance(o, Send))
