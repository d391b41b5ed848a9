"""Issue 12 findings 3 and 4 against a live label holder: bounded decoding, with real processes and real keys.

An allow-listed data holder (its own valid CurveZMQ key, a raw pyzmq DEALER written from PROTOCOL.md) sends

* finding 3: a 3 KB ``HELLO`` whose ``config`` nests 1,000 deep (it raised ``RecursionError`` in the session config
  canonicaliser and the label holder exited) -> ``ERROR BAD_HEADER`` (section 3 check 5: deeper than 32 levels);
* finding 4: an 8 MB header frame (the type peek after the failed decode unpacked all of it: 565 MB)
  -> ``ERROR TOO_LARGE`` (check 4), and the label holder's peak RSS grows by less than 64 MiB;
* a ``HELLO`` whose config carries 60 KB of unknown keys (its [H4] diff made the label holder build an ERROR larger
  than ``max_header_bytes``, which it could not encode, and it exited) -> a bounded ``ERROR CONFIG_MISMATCH``.

After each, the label holder is alive, a real data holder node completes its session beside the attacker, and the
attacker's own honest ``HELLO`` is still answered with ``WELCOME``. Memory is the label holder's VmHWM (peak RSS)
from /proc, reset before the attack with ``clear_refs``; nothing here depends on the wall clock except bounded waits.
"""

from __future__ import annotations

import hashlib
import re
import struct
import time
import tomllib
from pathlib import Path

import msgpack
import pytest
import zmq
import zmq.auth

from vfl.launch import prepare_session

from .procs import Node, Nodes

FAST = {"heartbeat": 0.3, "peer": 3.0, "handshake": 15.0, "join": 60.0}
RUN = "bounds"
BAD_HEADER, TOO_LARGE, UNEXPECTED_MESSAGE, CONFIG_MISMATCH = 4, 8, 9, 10  # PROTOCOL.md section 8
MiB = 2**20
RECV_S = 10.0


def routing_id(party: str) -> bytes:
    """The routing id a data holder's socket sets. On main it is the party id; with [S1] it becomes
    ``<party>/<16 lowercase hex>`` — change this one line then: ``f"{party}/{secrets.token_hex(8)}".encode()``."""
    return party.encode()


def canonical(value):
    if isinstance(value, dict):
        return {k: canonical(value[k]) for k in sorted(value)}
    return value


def digest(config: dict) -> str:
    """Section 6, for the flat configs this test sends honestly."""
    return hashlib.sha256(msgpack.packb(canonical(config), use_bin_type=True)).hexdigest()


class RawPeer:
    """A DEALER with a party's real CurveZMQ key that sends whatever frames it is given."""

    def __init__(self, ctx: zmq.Context, endpoint: str, keys: Path, party: str):
        server_public, _ = zmq.auth.load_certificate(keys / "bank.key")
        public, secret = zmq.auth.load_certificate(keys / f"{party}.key_secret")
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.sndtimeo = int(RECV_S * 1000)
        self.sock.routing_id = routing_id(party)
        self.sock.curve_serverkey, self.sock.curve_publickey, self.sock.curve_secretkey = server_public, public, secret
        self.sock.connect(endpoint)

    def send(self, header: bytes | dict, *tensors: bytes) -> None:
        packed = header if isinstance(header, bytes) else msgpack.packb(header, use_bin_type=True)
        self.sock.send_multipart([b"VFL/1", packed, *tensors])

    def recv(self, wanted: str, node: Node | None = None) -> dict:
        """The next message of type ``wanted`` (heartbeats skipped), within RECV_S seconds."""
        deadline = time.monotonic() + RECV_S
        while (left := deadline - time.monotonic()) > 0:
            if not self.sock.poll(int(left * 1000)):
                break
            frames = self.sock.recv_multipart()
            header = msgpack.unpackb(frames[1], raw=False)
            if header.get("type") == wanted:
                return header
            assert header.get("type") == "HEARTBEAT", f"expected {wanted}, got {header}"
        state = "" if node is None else f"; the node {'runs' if node.proc.poll() is None else 'exited'}:\n{node.output}"
        raise AssertionError(f"no {wanted} within {RECV_S} s{state}")


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in bytes."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}


def reset_peak(pid: int) -> None:
    """Make VmHWM the current RSS (Linux clear_refs 5), so that the next peak is the attack's."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


@pytest.fixture
def live(tmp_path):
    """A label holder for dh1 (a real node, started by the test) and dh2 (the raw peer), and its endpoint."""
    link = {"rounds": 2, "shape": [64, 32], "dtype": "float32", "hold": 0.0}
    cfg = prepare_session(tmp_path, data_holders=["dh1", "dh2"], run=RUN, timeouts=FAST, link_check=link)
    ctx = zmq.Context()
    with Nodes(tmp_path) as nodes:
        lh = nodes.start(cfg["bank"])
        lh.wait_for("listening on")
        endpoint = re.search(r"listening on (tcp://\S+)", lh.output).group(1)
        peer = RawPeer(ctx, endpoint, tmp_path / "keys", "dh2")
        try:
            yield nodes, cfg, lh, peer
        finally:
            ctx.destroy(linger=0)


def session_config(cfg_path: Path) -> dict:
    """The label holder's session config as it goes on the wire (section 6), read from the data holder's file."""
    s = tomllib.loads(cfg_path.read_text())["session"]
    return {"cut_widths": dict(s["cut_widths"]), "batch_size": s["batch_size"], "window": s["window"],
            "model": s["model"]}


def honest_hello(config: dict) -> dict:
    return {"type": "HELLO", "version": [1, 0], "role": "data_holder", "party": "dh2", "run": RUN,
            "config": config, "digest": digest(config)}


def serves_on(nodes: Nodes, cfg: dict, lh: Node, peer: RawPeer) -> None:
    """The label holder is alive, a real data holder completes its session, the attacker's honest HELLO is
    WELCOMEd, and after both leave the label holder ends the session normally."""
    assert lh.proc.poll() is None, lh.output
    dh1 = nodes.start(cfg["dh1"])
    assert dh1.wait(timeout=60) == 0, dh1.output
    assert "link check: 2 round trips" in dh1.output
    lh.wait_for("data holder 'dh1' left")
    peer.send(honest_hello(session_config(cfg["dh2"])))
    welcome = peer.recv("WELCOME")
    assert welcome["party"] == "bank" and sorted(welcome["data_holders"]) == ["dh1", "dh2"]
    peer.send({"type": "BYE", "ok": True, "reason": "test done"})
    assert lh.wait(timeout=30) == 0, lh.output


def nested_map(depth: int) -> dict:
    value: dict = {}
    for _ in range(depth):
        value = {"k": value}
    return value


def test_finding3_a_HELLO_whose_config_nests_1000_deep_is_BAD_HEADER_and_the_label_holder_serves_on(live):
    nodes, cfg, lh, peer = live
    config = {**session_config(cfg["dh2"]), "x": nested_map(1000)}
    hello = msgpack.packb({**honest_hello(session_config(cfg["dh2"])), "config": config}, use_bin_type=True)
    assert len(hello) < 4096  # the 3 KB HELLO of the finding
    peer.send(hello)
    error = peer.recv("ERROR", lh)
    assert error["code"] == BAD_HEADER and "deeper than 32" in error["message"], error
    serves_on(nodes, cfg, lh, peer)
    assert "RecursionError" not in lh.output


def test_finding4_an_8_MB_header_is_TOO_LARGE_and_grows_the_label_holder_by_under_64_MiB(live):
    nodes, cfg, lh, peer = live
    # type first, so a peek finds it; then 8 MB of empty maps (~70 bytes each when built: ~565 MB)
    n = 8_000_000
    header = (b"\x82" + msgpack.packb("type") + msgpack.packb("HEARTBEAT") + msgpack.packb("pad")
              + b"\xdd" + struct.pack(">I", n) + b"\x80" * n)
    peer.send({"type": "HEARTBEAT"})  # connect and authenticate first (not READY yet: UNEXPECTED_MESSAGE)
    assert peer.recv("ERROR", lh)["code"] == UNEXPECTED_MESSAGE
    before = memory(lh.proc.pid)
    reset_peak(lh.proc.pid)
    peer.send(header)
    error = peer.recv("ERROR", lh)
    after = memory(lh.proc.pid)
    growth = after["VmHWM"] - before["VmRSS"]
    print(f"label holder RSS {before['VmRSS'] / MiB:.1f} MiB before, peak {after['VmHWM'] / MiB:.1f} MiB while "
          f"refusing an {len(header) / 1e6:.1f} MB header: growth {growth / MiB:.1f} MiB")
    assert error["code"] == TOO_LARGE, error
    assert growth < 64 * MiB, f"the label holder's peak RSS grew by {growth / MiB:.0f} MiB"
    serves_on(nodes, cfg, lh, peer)


def test_H4_a_HELLO_whose_config_carries_60_KB_of_unknown_keys_gets_a_bounded_CONFIG_MISMATCH(live):
    """The diff of [H4] lists the peer's values; unbounded, its ERROR outgrew max_header_bytes and the label
    holder could not encode its own answer."""
    nodes, cfg, lh, peer = live
    config = {**session_config(cfg["dh2"]), "junk": "x" * 30_000, **{f"k{i}": i for i in range(4000)}}
    hello = msgpack.packb({**honest_hello(session_config(cfg["dh2"])), "config": config, "digest": digest(config)},
                          use_bin_type=True)
    assert 50_000 < len(hello) < 65_536
    peer.send(hello)
    error = peer.recv("ERROR", lh)
    assert error["code"] == CONFIG_MISMATCH and "junk: label holder has '<missing>'" in error["message"], error
    serves_on(nodes, cfg, lh, peer)
