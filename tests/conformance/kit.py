"""Session-level helpers on top of the raw peer: handshakes, state set-up, health checks, clean-up."""

from __future__ import annotations

import itertools
import time
from typing import Optional

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from .peer import CODES, PACER, Msg, Peer, config_digest, envelope, routing_id as fresh_routing_id
from .target import PartyKey, Target

_seq = itertools.count(1000)


def next_seq() -> int:
    return next(_seq)


class Kit:
    """What a test gets: the target, a zmq context, and peers that are cleaned up (BYE, close) afterwards."""

    def __init__(self, target: Target, ctx: zmq.Context, answer_timeout: float = 3.0):
        self.target = target
        self.ctx = ctx
        self.T = answer_timeout  # how long to wait for an answer that must come
        self.quiet = 0.3  # how long to listen for an answer that must not come
        self.peers: list[Peer] = []

    # -- peers --------------------------------------------------------------------------------------------------

    def peer(
        self,
        role: str = "main",
        *,
        key: Optional[PartyKey] = None,
        routing_id: Optional[bytes] | bool = True,
        curve: bool = True,
        public: Optional[bytes] = None,
        secret: Optional[bytes] = None,
        monitor: bool = False,
        sockopts: Optional[dict] = None,
    ) -> Peer:
        """A raw peer with ``key``. ``routing_id``: True, a fresh ``<party>/<hex>`` of the key's party ([S1]); bytes,
        exactly that (attack tests); False, none (libzmq picks one)."""
        key = key or self.target.key(role)
        if routing_id is True:
            routing_id = fresh_routing_id(key.name)
        elif routing_id is False:
            routing_id = None
        p = Peer(
            self.ctx,
            self.target.address,
            server_public=self.target.server_public if curve else None,
            public=(public or key.public) if curve else None,
            secret=(secret or key.secret) if curve else None,
            routing_id=routing_id,
            limits=self.target.limits,
            monitor=monitor,
            sockopts=sockopts,
            label=(routing_id or b"").decode("utf-8", "replace") or key.name,
        )
        p.party = key.name  # type: ignore[attr-defined]
        self.peers.append(p)
        return p

    def close(self, p: Peer, bye: bool = True) -> None:
        if bye and p.maybe_ready and not p.closed:
            p.send("BYE", {"ok": True, "reason": "conformance kit: end of test"})
            # let the BYE leave before the socket goes (linger is 0); any ERROR answer is irrelevant
            p.drain(0.02)
        p.close()

    def finish(self) -> list[str]:
        violations = []
        for p in self.peers:
            try:
                self.close(p)
            except zmq.ZMQError:
                p.close()
            violations.extend(p.violations)
        self.peers.clear()
        return violations

    # -- messages -----------------------------------------------------------------------------------------------

    @property
    def session(self) -> dict:
        return self.target.session

    def hello_fields(self, party: str, **over) -> dict:
        cfg = over.pop("config", self.session)
        f = {
            "version": [1, 0],
            "role": "data_holder",
            "party": party,
            "run": self.target.run,
            "config": cfg,
            "digest": config_digest(cfg),
        }
        f.update(over)
        return f

    def hello_frames(self, party: str, **over) -> list[bytes]:
        return envelope("HELLO", self.hello_fields(party, **over))

    def handshake(self, p: Peer, party: Optional[str] = None, what: str = "handshake", **over) -> Msg:
        """Valid HELLO -> WELCOME, with the WELCOME checked against [H5] and section 5."""
        party = party or p.party  # type: ignore[attr-defined]
        p.send("HELLO", self.hello_fields(party, **over))
        w = p.expect("WELCOME", self.T, what)
        self.check_welcome(w, over.get("version", [1, 0]))
        return w

    def check_welcome(self, w: Msg, hello_version=(1, 0)) -> None:
        t = self.target
        assert not w.problems, f"malformed WELCOME: {w.problems}"
        v = w.get("version")
        assert v[0] == 1, f"WELCOME version {v}: major must be 1"
        assert v[1] <= hello_version[1], f"WELCOME version {v}: minor must be min(data holder's, label holder's)"
        assert w.get("run") == t.run, f"WELCOME run {w.get('run')!r} != {t.run!r}"
        assert w.get("digest") == config_digest(self.session), "WELCOME digest is not the session config's digest"
        if t.lh_party is not None:
            assert w.get("party") == t.lh_party, f"WELCOME party {w.get('party')!r}: must be the label holder's id"
        if t.heartbeat_ms is not None:
            assert w.get("heartbeat_ms") == t.heartbeat_ms, f"heartbeat_ms {w.get('heartbeat_ms')} != {t.heartbeat_ms}"
        if t.peer_timeout_ms is not None:
            assert w.get("peer_timeout_ms") == t.peer_timeout_ms, (
                f"peer_timeout_ms {w.get('peer_timeout_ms')} != {t.peer_timeout_ms}"
            )
        dh = w.get("data_holders")
        assert set(dh) <= set(self.session["cut_widths"]), f"WELCOME data_holders {dh} not in cut_widths"

    def bye(self, p: Peer, ok: bool = True) -> None:
        p.send("BYE", {"ok": ok, "reason": "conformance kit"})

    def echo(self, p: Peer, tensors=(), seq: Optional[int] = None, what: str = "ECHO round trip") -> Msg:
        """ECHO -> ECHO_REPLY with the same seq and identical tensors ([M1])."""
        seq = next_seq() if seq is None else seq
        tensors = list(tensors)
        p.send("ECHO", {"seq": seq}, tensors)
        r = p.expect("ECHO_REPLY", self.T, what)
        assert not r.problems, f"{what}: malformed ECHO_REPLY: {r.problems}"
        assert r.get("seq") == seq, f"{what}: ECHO_REPLY seq {r.get('seq')} != {seq}"
        want = []
        for name, arr in tensors:
            arr = np.asarray(arr)
            from .peer import tensor as _t

            d, data = _t(name, arr)
            want.append((d["name"], d["dtype"], d["shape"], data))
        got = [(n, d, s, b) for n, d, s, b in r.tensors]
        assert [g[:3] for g in got] == [w[:3] for w in want], f"{what}: tensors differ: {[g[:3] for g in got]}"
        for g, w_ in zip(got, want):
            assert g[3] == w_[3], f"{what}: bytes of tensor {g[0]!r} differ"
        return r

    # -- state probes (they also prove that nothing was sent before their answer) -------------------------------

    def assert_ready(self, p: Peer, what: str) -> None:
        """READY: an ECHO gets its ECHO_REPLY, and that is the next non-HEARTBEAT message."""
        self.echo(p, [("x", np.arange(3, dtype=np.int32))], what=f"{what} (state must be READY)")

    def assert_not_ready(self, p: Peer, what: str) -> None:
        """IDLE or DONE: an ECHO gets ERROR UNEXPECTED_MESSAGE, and that is the next non-HEARTBEAT message."""
        p.send_raw(envelope("ECHO", {"seq": next_seq()}))
        p.expect_error(CODES["UNEXPECTED_MESSAGE"], self.T, f"{what} (state must be IDLE/DONE: ECHO is unexpected)")

    def to_state(self, p: Peer, state: str, what: str = "") -> None:
        """Bring p's party into READY or DONE (IDLE is only reachable with a party that never connected)."""
        if state == "READY":
            self.handshake(p, what=f"{what}: set-up to READY")
        elif state == "DONE":
            self.handshake(p, what=f"{what}: set-up to DONE")
            self.bye(p)
            self.assert_not_ready(p, f"{what}: set-up to DONE")
        else:
            raise ValueError(state)

    # -- health -------------------------------------------------------------------------------------------------

    def assert_healthy(self, what: str = "after the test", echo: bool = True) -> None:
        """[R1]: the node is alive, and a valid peer completes HELLO/WELCOME (and an ECHO round trip)."""
        dead = self.target.alive()
        assert dead is None, f"{what}: {dead}"
        p = self.peer("probe")
        try:
            self.handshake(p, what=f"{what}: health check handshake")
            if echo:
                self.echo(p, [("h", np.arange(4, dtype=np.float32))], what=f"{what}: health check ECHO")
            self.bye(p)
        finally:
            self.close(p, bye=False)
            if p in self.peers:
                self.peers.remove(p)
                assert not p.violations, p.violations

    def drained(self, p: Peer) -> None:
        PACER.drained(p.pace_key)

    @staticmethod
    def sleep(s: float) -> None:
        time.sleep(s)


def monitor_events(p: Peer, duration: float, stop_at=("HANDSHAKE_FAILED_AUTH", "HANDSHAKE_SUCCEEDED")):
    """Monitor events of p's socket (a peer made with monitor=True) within ``duration`` seconds: (name, value)."""
    out = []
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        if not p.monitor.poll(int(max(1, (deadline - time.monotonic()) * 1000))):
            break
        ev = recv_monitor_message(p.monitor)
        out.append((zmq.Event(ev["event"]).name, ev["value"]))
        if out[-1][0] in stop_at:
            break
    return out


# ----------------------------------------------------------------------------------------------------------------
# Running one catalogued malformed message
# ----------------------------------------------------------------------------------------------------------------

_rr = itertools.count()
_GENERAL_ROLES = ["main", "alt", "third"]


def next_key(kit: Kit) -> PartyKey:
    """Spread the kit's traffic over the general parties (and so over the node's per-peer [R2] buckets)."""
    return kit.target.key(_GENERAL_ROLES[next(_rr) % len(_GENERAL_ROLES)])


def run_case(kit: Kit, case, health: bool = True) -> Optional[Msg]:
    """Send ``case`` from a peer in ``case.state``; check the answer ([E1]) or its absence ([M2]); check that
    the sender's state did not change and that the node still serves a valid peer ([R1])."""
    from .cases import Ctx

    key = next_key(kit)
    p = kit.peer(key=key)
    what = f"case {case.id!r}" + (f" ({case.note})" if case.note else "")
    if case.state == "READY":
        kit.handshake(p, what=f"{what}: set-up")
    frames = case.build(Ctx(key.name, kit.target.run, kit.session, kit.target.limits))
    p.send_raw(frames, pace=case.code is not None)
    err = None
    if case.code is not None:
        err = p.expect_error(case.code, kit.T, what)
        ref = err.get("ref")
        assert ref is None or type(ref) is str, f"{what}: ERROR.ref must be a str"
    if case.state == "READY":
        kit.assert_ready(p, f"{what}: after it")
        if case.code is None:
            p.expect_nothing(0.05, f"{what}: [M2]")
        kit.bye(p)
    else:
        kit.assert_not_ready(p, f"{what}: after it")
    kit.close(p)
    if health:
        kit.assert_healthy(f"{what}: after it")
    return err
