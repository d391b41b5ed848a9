"""A misbehaving PSI peer ends the session with a clear error at the honest node: never a wrong result, never a hang.

The honest side is a real ``vfl psi`` process; the misbehaving side is a raw ZeroMQ peer in the test that speaks the
protocol by hand (real CURVE keys) and then breaks the PSI rules of PROTOCOL.md section 10.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pytest
import zmq
import zmq.auth

from vfl.protocol import (
    Bye,
    Error,
    ErrorCode,
    Heartbeat,
    Hello,
    PsiItems,
    PsiStart,
    SessionConfig,
    Tensor,
    Welcome,
    decode,
    encode,
)
from vfl.psi import PsiKey, encode_ids
from vfl.psi.curve import P, hash_domain, hash_to_curve

from .procs import Nodes
from .test_psi_nodes import psi_session

RUN = "psi-test"


class RawPeer:
    """A data holder or label holder written by hand, with bounded receives."""

    def __init__(self, sock: zmq.Socket, routing_id: bytes | None = None):
        self.sock = sock
        self.routing_id = routing_id

    def send(self, msg) -> None:
        frames = encode(msg)
        self.sock.send_multipart(([self.routing_id] if self.routing_id else []) + frames, copy=True)

    def recv(self, timeout: float = 10.0, skip=(Heartbeat,)):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.sock.poll(int(max(0.0, deadline - time.monotonic()) * 1000) or 1):
                continue
            frames = self.sock.recv_multipart()
            if self.routing_id is not None:
                self.routing_id, frames = frames[0], frames[1:]
            msg = decode(frames)
            if not isinstance(msg, skip):
                return msg
        raise AssertionError(f"nothing received within {timeout} s")

    def recv_type(self, cls, timeout: float = 20.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = self.recv(timeout=max(0.1, deadline - time.monotonic()), skip=(Heartbeat, PsiItems))
            if isinstance(msg, cls):
                return msg
        raise AssertionError(f"no {cls.__name__} within {timeout} s")


def session_config(cfg_text: str) -> SessionConfig:
    batch = int(re.search(r"batch_size = (\d+)", cfg_text).group(1))
    window = int(re.search(r"window = (\d+)", cfg_text).group(1))
    model = re.search(r'model = "([^"]+)"', cfg_text).group(1)
    widths = dict(re.findall(r"^(dh\d+) = (\d+)$", cfg_text.split("[session.cut_widths]")[1], re.M))
    return SessionConfig(cut_widths={k: int(v) for k, v in widths.items()}, batch_size=batch, window=window,
                         model=model, psi=True)


def raw_data_holder(ctx: zmq.Context, tmp_path: Path, endpoint: str) -> RawPeer:
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.routing_id = b"dh1"
    sock.curve_publickey, sock.curve_secretkey = zmq.auth.load_certificate(tmp_path / "keys" / "dh1.key_secret")
    sock.curve_serverkey = zmq.auth.load_certificate(tmp_path / "keys" / "bank.key")[0]
    sock.connect(endpoint)
    return RawPeer(sock)


def join(peer: RawPeer, cfg: SessionConfig) -> Welcome:
    peer.send(Hello(version=(1, 1), role="data_holder", party="dh1", run=RUN, config=cfg.to_wire(), digest=cfg.digest))
    welcome = peer.recv()
    assert isinstance(welcome, Welcome) and welcome.psi_nonce, welcome
    return welcome


def blinded(ids: list, welcome: Welcome) -> np.ndarray:
    key = PsiKey.generate()
    domain = hash_domain(RUN, bytes.fromhex(welcome.psi_nonce))
    pts = [key.encrypt(hash_to_curve(item, domain)) for item in encode_ids(ids)]
    return np.frombuffer(b"".join(pts), dtype=np.uint8).reshape(len(ids), 32)


TWIST_U = next(u for u in range(2, 100) if pow((u**3 + 486662 * u * u + u) % P, (P - 1) // 2, P) == P - 1)


def corrupt(points: np.ndarray, how: str) -> np.ndarray:
    pts = points.copy()
    if how == "u_not_reduced":
        pts[3] = np.frombuffer((P + 5).to_bytes(32, "little"), np.uint8)
    elif how == "top_bit":
        pts[3, 31] |= 0x80
    elif how == "twist":
        pts[3] = np.frombuffer(TWIST_U.to_bytes(32, "little"), np.uint8)
    elif how == "low_order":
        pts[3] = 0
    return pts


@pytest.fixture
def honest_label_holder(tmp_path):
    sets = {"bank": [f"id-{i}" for i in range(0, 120)], "dh1": [f"id-{i}" for i in range(40, 200)]}
    configs = psi_session(tmp_path, sets)
    text = configs["bank"].read_text().replace("progress = 30.0", "progress = 4.0")
    configs["bank"].write_text(text)
    with Nodes(tmp_path) as nodes:
        lh = nodes.start_command(["psi", "--config", str(configs["bank"])], "bank")
        lh.wait_for("listening on")
        endpoint = re.search(r"listening on (tcp://\S+)", lh.output).group(1)
        ctx = zmq.Context()
        try:
            peer = raw_data_holder(ctx, tmp_path, endpoint)
            yield lh, peer, session_config(text), sets
        finally:
            ctx.destroy(linger=0)


@pytest.mark.parametrize("how", ["u_not_reduced", "top_bit", "twist", "low_order"])
def test_P4_an_invalid_point_ends_the_psi_with_PSI_FAILED_at_the_label_holder(tmp_path, honest_label_holder, how):
    lh, peer, cfg, sets = honest_label_holder
    welcome = join(peer, cfg)
    ids = sets["dh1"]
    peer.send(PsiStart(n_items=len(ids), chunk_size=len(ids)))
    points = corrupt(blinded(ids, welcome), how)
    peer.send(PsiItems(chunk=0, last=True, tensors=(Tensor("points", points),)))
    err = peer.recv_type(Error)
    assert err.code == ErrorCode.PSI_FAILED and "point" in err.message
    assert lh.wait(timeout=20) == 1
    assert "PSI with data holder 'dh1' failed" in lh.output
    assert not (tmp_path / "bank-aligned.csv").exists()


def test_P4_a_truncated_stream_ends_the_psi_with_PSI_FAILED(tmp_path, honest_label_holder):
    lh, peer, cfg, sets = honest_label_holder
    welcome = join(peer, cfg)
    ids = sets["dh1"]
    points = blinded(ids, welcome)
    peer.send(PsiStart(n_items=len(ids), chunk_size=64))
    peer.send(PsiItems(chunk=0, last=False, tensors=(Tensor("points", points[:64]),)))
    peer.send(PsiItems(chunk=1, last=True, tensors=(Tensor("points", points[64:80]),)))  # 96 announced, 16 sent
    err = peer.recv_type(Error)
    assert err.code == ErrorCode.PSI_FAILED and ("ended" in err.message or "expected" in err.message), err.message
    assert lh.wait(timeout=20) == 1
    assert not (tmp_path / "bank-aligned.csv").exists()


def test_P4_a_skipped_chunk_ends_the_psi_with_PSI_FAILED(tmp_path, honest_label_holder):
    lh, peer, cfg, sets = honest_label_holder
    welcome = join(peer, cfg)
    ids = sets["dh1"]
    points = blinded(ids, welcome)
    peer.send(PsiStart(n_items=len(ids), chunk_size=64))
    peer.send(PsiItems(chunk=1, last=False, tensors=(Tensor("points", points[64:128]),)))
    err = peer.recv_type(Error)
    assert err.code == ErrorCode.PSI_FAILED and "chunk" in err.message
    assert lh.wait(timeout=20) == 1


def test_P10_a_peer_that_stalls_in_the_psi_is_given_up_on_not_waited_for_forever(tmp_path, honest_label_holder):
    lh, peer, cfg, sets = honest_label_holder
    join(peer, cfg)
    peer.send(PsiStart(n_items=10, chunk_size=10))
    started = time.monotonic()
    deadline = started + 30
    while lh.proc.poll() is None and time.monotonic() < deadline:  # keep the session alive, send no PSI data
        peer.send(Heartbeat())
        time.sleep(0.2)
    assert lh.proc.poll() == 1, lh.output
    assert "made no progress in the PSI" in lh.output
    assert time.monotonic() - started < 15


def test_P9_a_data_holder_leaving_mid_psi_ends_the_session(tmp_path, honest_label_holder):
    lh, peer, cfg, sets = honest_label_holder
    join(peer, cfg)
    peer.send(PsiStart(n_items=10, chunk_size=10))
    peer.send(Bye(ok=False, reason="operator pressed Ctrl-C"))
    assert lh.wait(timeout=20) == 1
    assert "data holder 'dh1' left before the rows were aligned: operator pressed Ctrl-C" in lh.output


def test_P6_a_result_with_a_token_the_label_holder_never_computed_is_refused(tmp_path, honest_label_holder):
    from vfl.protocol import PsiReply, PsiResult

    lh, peer, cfg, sets = honest_label_holder
    welcome = join(peer, cfg)
    ids = sets["dh1"]
    peer.send(PsiStart(n_items=len(ids), chunk_size=len(ids)))
    peer.send(PsiItems(chunk=0, last=True, tensors=(Tensor("points", blinded(ids, welcome)),)))
    fake = np.sort(np.frombuffer(np.random.default_rng(0).bytes(16 * 5), np.uint8).reshape(5, 16).view("S16"), axis=0)
    tokens = fake.view(np.uint8).reshape(5, 16)
    # wait for our reply and for the label holder's whole stream (the result may only follow it), in any order
    deadline = time.monotonic() + 30
    reply_seen = last_seen = False
    while not (reply_seen and last_seen) and time.monotonic() < deadline:
        msg = peer.recv(timeout=max(0.1, deadline - time.monotonic()), skip=(Heartbeat,))
        reply_seen = reply_seen or (isinstance(msg, PsiReply) and msg.last)
        last_seen = last_seen or (isinstance(msg, PsiItems) and msg.last)
    assert reply_seen and last_seen
    positions = np.arange(5, dtype=np.uint32)
    peer.send(PsiResult(chunk=0, last=True, tensors=(Tensor("tokens", tokens), Tensor("positions", positions))))
    err = peer.recv_type(Error)
    assert err.code == ErrorCode.PSI_FAILED and "token" in err.message
    assert lh.wait(timeout=20) == 1
    assert not (tmp_path / "bank-aligned.csv").exists()


def test_P4_the_data_holder_refuses_an_invalid_point_from_the_label_holder(tmp_path):
    """The reverse: an honest data holder and a label holder that sends a twist point."""
    sets = {"bank": [f"id-{i}" for i in range(0, 50)], "dh1": [f"id-{i}" for i in range(20, 90)]}
    configs = psi_session(tmp_path, sets)
    text = configs["bank"].read_text()
    endpoint = re.search(r'endpoint = "([^"]+)"', text).group(1)
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.ROUTER)
        sock.linger = 0
        sock.curve_server = True
        sock.curve_publickey, sock.curve_secretkey = zmq.auth.load_certificate(tmp_path / "keys" / "bank.key_secret")
        sock.bind(endpoint)
        raw_lh = RawPeer(sock, routing_id=b"?")
        with Nodes(tmp_path) as nodes:
            dh = nodes.start_command(["psi", "--config", str(configs["dh1"])], "dh1")
            hello = raw_lh.recv(timeout=30)
            assert isinstance(hello, Hello)
            nonce = "ab" * 16
            raw_lh.send(Welcome(version=(1, 1), party="bank", run=RUN, digest=hello.digest, heartbeat_ms=300,
                                peer_timeout_ms=5000, data_holders=("dh1",), psi_nonce=nonce))
            start = raw_lh.recv_type(PsiStart)
            assert start.n_items == 70
            welcome = Welcome(version=(1, 1), party="bank", run=RUN, digest="", heartbeat_ms=1, peer_timeout_ms=1,
                              data_holders=(), psi_nonce=nonce)
            bad = corrupt(blinded(sets["bank"], welcome), "twist")
            raw_lh.send(PsiStart(n_items=50, chunk_size=50))
            raw_lh.send(PsiItems(chunk=0, last=True, tensors=(Tensor("points", bad),)))
            assert dh.wait(timeout=30) == 1
            assert "PSI with label holder 'bank' failed" in dh.output and "twist" in dh.output
            assert not (tmp_path / "dh1-aligned.csv").exists()
    finally:
        ctx.destroy(linger=0)


class RawLabelHolder:
    """An honest label holder written by hand around vfl.psi's exchange, which can break the rules on request."""

    def __init__(self, ctx: zmq.Context, tmp_path: Path, endpoint: str):
        sock = ctx.socket(zmq.ROUTER)
        sock.linger = 0
        sock.curve_server = True
        sock.curve_publickey, sock.curve_secretkey = zmq.auth.load_certificate(tmp_path / "keys" / "bank.key_secret")
        sock.bind(endpoint)
        self.peer = RawPeer(sock, routing_id=b"?")

    def welcome(self, nonce: str | None = "ab" * 16) -> Hello:
        hello = self.peer.recv(timeout=30)
        assert isinstance(hello, Hello)
        self.peer.send(Welcome(version=(1, 1), party="bank", run=RUN, digest=hello.digest, heartbeat_ms=300,
                               peer_timeout_ms=5000, data_holders=("dh1",), psi_nonce=nonce))
        return hello

    def run_psi(self, ids: list, nonce: str = "ab" * 16):
        """The honest pairwise exchange, driven by vfl.psi.PsiReceiver; returns it once the result is checked."""
        from vfl.protocol.psi_phase import to_core, to_wire
        from vfl.psi import PsiEngine, PsiReceiver

        engine = PsiEngine(workers=1)
        receiver = PsiReceiver(encode_ids(ids), engine=engine, run_id=RUN, nonce=bytes.fromhex(nonce), chunk_size=64)
        start = self.peer.recv_type(PsiStart)
        receiver.receive(to_core(start))
        self.peer.send(to_wire(receiver.start()))
        for chunk in receiver.blinded_chunks():
            self.peer.send(to_wire(chunk))
        from vfl.protocol import PsiResult

        deadline = time.monotonic() + 30
        while not receiver.done and time.monotonic() < deadline:
            msg = self.peer.recv(timeout=30)
            for out in receiver.receive(to_core(msg)) if isinstance(msg, (PsiItems, PsiResult)) else []:
                self.peer.send(to_wire(out))  # [P6]: the receiver checks every result chunk it is given
        engine.close()
        assert receiver.done
        return receiver


@pytest.fixture
def raw_label_holder_session(tmp_path):
    sets = {"bank": [f"id-{i}" for i in range(0, 50)], "dh1": [f"id-{i}" for i in range(20, 90)]}
    configs = psi_session(tmp_path, sets)
    endpoint = re.search(r'endpoint = "([^"]+)"', configs["bank"].read_text()).group(1)
    ctx = zmq.Context()
    try:
        raw = RawLabelHolder(ctx, tmp_path, endpoint)
        with Nodes(tmp_path) as nodes:
            dh = nodes.start_command(["psi", "--config", str(configs["dh1"])], "dh1")
            yield raw, dh, sets
    finally:
        ctx.destroy(linger=0)


def test_P1_a_data_holder_gives_up_on_a_welcome_without_psi_nonce(tmp_path, raw_label_holder_session):
    raw, dh, sets = raw_label_holder_session
    raw.welcome(nonce=None)
    assert dh.wait(timeout=20) == 1
    assert "bad WELCOME: WELCOME.psi_nonce must be 32 lowercase hex digits" in dh.output


def test_P1_the_label_holder_sends_a_fresh_psi_nonce_in_every_welcome(tmp_path, honest_label_holder):
    lh, peer, cfg, sets = honest_label_holder
    first = join(peer, cfg)
    second = join(peer, cfg)  # a restart ([H6])
    for w in (first, second):
        assert len(w.psi_nonce) == 32 and bytes.fromhex(w.psi_nonce)
    assert first.psi_nonce != second.psi_nonce


def test_P2_P5_P8_the_data_holder_follows_the_exchange_and_checks_its_rows(tmp_path, raw_label_holder_session):
    """A hand-written honest label holder: the data holder opens with PSI_START and its stream ([P2]), its result
    passes the label holder's checks ([P5], checked by PsiReceiver as [P6] says), and it maps PSI_ROWS ([P8])."""
    from vfl.psi.multiparty import rows_chunks
    from vfl.protocol.psi_phase import to_wire

    raw, dh, sets = raw_label_holder_session
    raw.welcome()
    receiver = raw.run_psi(sets["bank"])
    assert sorted(sets["bank"][r] for r in receiver.rows) == [f"id-{i}" for i in range(20, 50)]
    positions = np.arange(len(receiver.rows), dtype=np.uint32)[::-1].copy()  # any order the label holder picks
    for chunk in rows_chunks(positions, 64):
        raw.peer.send(to_wire(chunk))
    assert dh.wait(timeout=30) == 0, dh.output
    import csv

    with open(tmp_path / "dh1-aligned.csv") as fh:
        got = [row[1] for row in list(csv.reader(fh))[1:]]
    assert got == [sets["bank"][r] for r in receiver.rows[positions.astype(np.int64)]]


def test_P8_repeated_positions_in_PSI_ROWS_are_refused(tmp_path, raw_label_holder_session):
    from vfl.protocol import PsiRows

    raw, dh, sets = raw_label_holder_session
    raw.welcome()
    raw.run_psi(sets["bank"])
    raw.peer.send(PsiRows(chunk=0, last=True, tensors=(Tensor("positions", np.array([0, 1, 1], dtype=np.uint32)),)))
    err = raw.peer.recv_type(Error)
    assert err.code == ErrorCode.PSI_FAILED and "repeat" in err.message
    assert dh.wait(timeout=20) == 1
    assert not (tmp_path / "dh1-aligned.csv").exists()
