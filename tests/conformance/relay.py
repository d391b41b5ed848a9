"""RELAY (PROTOCOL.md section 13, [C3]) written from the spec, for the kit's scripted chain neighbours.

Like ``peer.py`` this imports nothing from ``vfl``: the relay key (X25519 + HKDF-SHA256 with the `cryptography`
package) and the MAC (HMAC-SHA256 over the msgpack prefix and the length-prefixed frames) are computed here from the
text of [C3], so a node whose relays verify against the kit derives the keys and MACs the spec says, not merely the
ones its own code agrees with.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field

import msgpack
import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from zmq.utils import z85

from .peer import SIGNATURE, Msg, pack

LABEL = b"vfl relay 1"
HEADER = "~header"
UP, DOWN = "up", "down"


def relay_key(own_secret_z85: bytes, peer_public_z85: bytes, *, run: str, party: str, label_holder: str) -> bytes:
    """[C3]: HKDF-SHA256(ikm = X25519(own secret, peer public), salt = none, info = "vfl relay 1" 0 R 0 P 0 L, 32)."""
    shared = X25519PrivateKey.from_private_bytes(z85.decode(own_secret_z85)).exchange(
        X25519PublicKey.from_public_bytes(z85.decode(peer_public_z85)))
    info = b"\0".join([LABEL, run.encode(), party.encode(), label_holder.encode()])
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def relay_mac(key: bytes, *, run: str, direction: str, party: str, conn: str, seq: int, frames: list[bytes]) -> str:
    """[C3]: lowercase hex HMAC-SHA256 over msgpack([b"vfl relay 1", R, direction, P, conn, seq]), then each of
    the inner header and tensor frames as 8 bytes little-endian length + bytes."""
    mac = hmac.new(key, pack([LABEL, run, direction, party, conn, seq]), hashlib.sha256)
    for f in frames:
        mac.update(len(f).to_bytes(8, "little"))
        mac.update(f)
    return mac.hexdigest()


def relay_frames(inner: list[bytes], *, party: str, conn: str, seq: int, mac: str, extra: dict | None = None) -> list[bytes]:
    """The RELAY envelope carrying ``inner`` (a message as ``peer.envelope`` builds it: [VFL/1, header, tensors...]):
    first tensor ``~header`` uint8 [n], then the inner tensors with their names, dtypes and shapes."""
    inner_header = msgpack.unpackb(inner[1], raw=False, strict_map_key=False)
    descs = [{"name": HEADER, "dtype": "uint8", "shape": [len(inner[1])]}]
    descs += [dict(d) for d in inner_header.get("tensors") or []]
    header = {"type": "RELAY", "tensors": descs, "party": party, "conn": conn, "seq": seq, "mac": mac}
    header.update(extra or {})
    return [SIGNATURE, pack(header), inner[1], *inner[2:]]


@dataclass
class Channel:
    """One relayed connection as one of its ends sees it: the party's (``sends="up"``) or the label holder's."""

    key: bytes
    run: str
    party: str
    conn: str
    sends: str
    next_send: int = 0
    next_recv: int = 0
    log: list = field(default_factory=list)

    @property
    def receives(self) -> str:
        return DOWN if self.sends == UP else UP

    def mac(self, direction: str, seq: int, frames: list[bytes]) -> str:
        return relay_mac(self.key, run=self.run, direction=direction, party=self.party, conn=self.conn, seq=seq,
                         frames=frames)

    def wrap(self, inner: list[bytes], *, seq: int | None = None, advance: bool = True) -> list[bytes]:
        """An authentic RELAY of ``inner`` with the next ``seq`` (or the one given)."""
        s = self.next_send if seq is None else seq
        frames = relay_frames(inner, party=self.party, conn=self.conn, seq=s, mac=self.mac(self.sends, s, inner[1:]))
        if advance and seq is None:
            self.next_send += 1
        return frames

    def check(self, m: Msg, what: str = "") -> list[bytes]:
        """Assert that ``m`` is the next authentic RELAY of this connection from its other end; its inner frames."""
        assert m.type == "RELAY", f"{what}: expected a RELAY, got {m.summary()}"
        assert not m.problems, f"{what}: malformed RELAY: {m.problems}"
        assert m.get("party") == self.party and m.get("conn") == self.conn, (
            f"{what}: RELAY for party {m.get('party')!r} conn {m.get('conn')!r}, expected {self.party!r} {self.conn!r}")
        assert m.tensors and m.tensors[0][:2] == (HEADER, "uint8") and len(m.tensors[0][2]) == 1, (
            f"{what}: the first tensor of a RELAY must be {HEADER!r} uint8 [n]: {[t[:3] for t in m.tensors]}")
        inner = [SIGNATURE, *(t[3] for t in m.tensors)]
        want = self.mac(self.receives, m.get("seq"), inner[1:])
        assert m.get("mac") == want, f"{what}: [C3] the RELAY's MAC does not verify with the spec's relay key"
        assert m.get("seq") == self.next_recv, f"{what}: [C3] RELAY seq {m.get('seq')}, expected {self.next_recv}"
        self.next_recv += 1
        return inner


def inner_of(m: Msg) -> list[bytes]:
    """The inner message of a RELAY, unchecked: [VFL/1, ~header, tensor frames...]."""
    return [SIGNATURE, *(t[3] for t in m.tensors)]


def flip(frames: list[bytes], frame: int, at: int = -1) -> list[bytes]:
    """``frames`` with one byte of ``frames[frame]`` flipped (a RELAY altered on the way)."""
    out = list(frames)
    b = bytearray(out[frame])
    b[at] ^= 0x01
    out[frame] = bytes(b)
    return out


def int64(values) -> np.ndarray:
    return np.asarray(values, dtype="<i8")
