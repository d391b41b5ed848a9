"""RELAY (protocol 1.10): a session message between the label holder and a party behind segment holders, wrapped
so that only its two end points can make it.

In a segment chain a data holder (or segment holder) whose downstream is a segment holder still has its one session
with the label holder, but the session messages travel through the segment holders on its path. CURVE protects
each hop, not the path: every segment holder on it could otherwise forge a ``SCHEDULE``, rewrite an ``EPOCH``'s row
order, replay a ``CHECKPOINT`` or hide a ``BYE``'s reason. So each relayed message carries an HMAC-SHA256 under a
key that only the end party and the label holder hold, over the run, the direction, the end party, its connection
id and a sequence number per connection and direction: a segment holder can drop a relayed message (the session's
liveness rules notice) but not forge, alter, replay or reorder one, nor turn a message of one direction, party,
connection or run into one of another.

The key needs no extra exchange and no new key file: both ends already hold CURVE key pairs (raw Curve25519 keys),
so the party computes X25519(its secret, the label holder's public key), the label holder X25519(its secret, the
party's public key), the same shared secret; HKDF-SHA256 turns it into one 32-byte key per (run, party, label
holder). Both directions use that key; the direction is in every MAC.

One :class:`RelayChannel` is one end of one relayed connection: it wraps the messages it sends (``wrap``) and checks
and unwraps the ones it receives (``unwrap``, ``receive``); a segment holder forwards RELAYs unchecked and at most
peeks at the inner type (``peek_inner_type``). No I/O, no clocks: the node moves the frames.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from typing import Any

import msgpack
import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import SetupError
from .codec import DEFAULT_LIMITS, DTYPES, SIGNATURE, Limits, decode, encode, peek_type, wire_dtype
from .errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from .messages import Message, Relay, Tensor, is_party_id
from .text import peer_text

#: first item of every MAC input, and the start of the HKDF info: names the scheme and its version
RELAY_LABEL = b"vfl relay 1"
#: the name of a RELAY's first tensor, the inner message's header (a name no inner message may use: ``~`` marks it)
HEADER_TENSOR = "~header"
KEY_BYTES = 32
UP, DOWN = "up", "down"
#: The key of a session without CURVE keys (insecure mode, for debugging only). It is public, so it gives NO
#: authenticity: anyone on the path can forge relayed messages. It only keeps the message layout and the sequence
#: checks the same as in a secure session.
INSECURE_RELAY_KEY = hashlib.sha256(b"vfl relay 1: insecure mode, a public key that authenticates nothing").digest()

_MAC_HEX = re.compile(r"[0-9a-f]{64}")
_UINT8 = np.dtype(np.uint8)


class RelayKeyError(SetupError):
    """The CURVE keys at hand cannot give a relay key: not 32 raw bytes, or a low-order public key."""


def relay_key(own_secret: bytes, peer_public: bytes, party: str, label_holder: str, run: str) -> bytes:
    """The 32-byte relay key of ``party`` and ``label_holder`` in ``run``, the same at both ends.

    The party passes its CURVE secret and the label holder's CURVE public key, the label holder its secret and the
    party's public key (raw 32-byte Curve25519 keys: ``zmq.utils.z85.decode`` of the Z85 key files' text).
    key = HKDF-SHA256(ikm = X25519(own_secret, peer_public), salt = none, info = ``b"vfl relay 1\\0" + run + b"\\0"
    + party + b"\\0" + label_holder``, length 32). An all-zero shared secret (the peer's key is a low-order point,
    so the result would be known to everyone) is refused.
    """
    for what, key in (("own secret", own_secret), ("peer public", peer_public)):
        if len(key) != KEY_BYTES:
            raise RelayKeyError(f"relay key of {party!r}: the {what} key must be {KEY_BYTES} raw bytes, got {len(key)}"
                                " (decode a Z85 key with zmq.utils.z85.decode)")
    for what, name in (("run", run), ("party", party), ("label holder", label_holder)):
        if not is_party_id(name):
            raise RelayKeyError(f"relay key: the {what} {name!r} is not an id")
    try:
        shared = X25519PrivateKey.from_private_bytes(bytes(own_secret)).exchange(
            X25519PublicKey.from_public_bytes(bytes(peer_public)))
    except ValueError:  # cryptography refuses the all-zero output itself
        shared = bytes(KEY_BYTES)
    if not any(shared):
        raise RelayKeyError(
            f"relay key of {party!r} and {label_holder!r}: the peer's CURVE public key is a low-order point (X25519 "
            "gives all zeros, a key everyone knows); give it a real key pair made by `vfl keys generate`")
    info = b"\0".join([RELAY_LABEL, run.encode(), party.encode(), label_holder.encode()])
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared)


def _flat_bytes(arr: np.ndarray) -> np.ndarray:
    """The bytes of a C-contiguous array as a 1-D uint8 view (no copy; received tensors are always contiguous)."""
    return np.ascontiguousarray(arr).reshape(-1).view(_UINT8)


def relay_mac(key: bytes, run: str, direction: str, party: str, conn: str, seq: int, frames: list[Any]) -> str:
    """HMAC-SHA256 (64 lowercase hex) of one relayed message: over ``msgpack([b"vfl relay 1", run, direction,
    party, conn, seq])`` (``b"vfl relay 1"`` a msgpack bin, the others str and int in their shortest encodings),
    then for the inner header and each inner tensor frame in order, its length as 8 bytes little-endian and its
    bytes. The lengths keep bytes from moving between frames unnoticed; the tensor names, dtypes and shapes are in
    the inner header, so they are covered too."""
    mac = hmac.new(key, msgpack.packb([RELAY_LABEL, run, direction, party, conn, seq], use_bin_type=True),
                   hashlib.sha256)
    for frame in frames:
        view = memoryview(frame).cast("B")
        mac.update(view.nbytes.to_bytes(8, "little"))
        mac.update(view)
    return mac.hexdigest()


def peek_inner_type(msg: Relay) -> str | None:
    """The inner message's type, read from the first 4,096 bytes of ``~header`` at most, or None if they do not
    show it. For a segment holder, which forwards RELAYs without checking them (it cannot: it has no key), e.g. to
    log or count what passes; nothing it learns this way is authenticated."""
    if not msg.tensors or msg.tensors[0].name != HEADER_TENSOR:
        return None
    header = msg.tensors[0].array
    if header.dtype != _UINT8 or header.ndim != 1:
        return None
    return peek_type((b"", header))


class RelayChannel:
    """One end of one relayed connection: the party's (``sends="up"``) or the label holder's (``sends="down"``).

    ``conn`` is the end party's connection id at its hop (``"<party>/<16 hex>"``); a reconnected party has a new
    one, and so a new channel whose sequence numbers start again at 0 in each direction. ``limits`` are this end's
    (section 7): what it wraps and what it accepts.
    """

    def __init__(self, key: bytes, run: str, party: str, conn: str, sends: str, *, limits: Limits = DEFAULT_LIMITS):
        if len(key) != KEY_BYTES:
            raise ValueError(f"a relay key is {KEY_BYTES} bytes, got {len(key)}")
        if sends not in (UP, DOWN):
            raise ValueError(f"sends must be {UP!r} (the party's end) or {DOWN!r} (the label holder's), not {sends!r}")
        if not (is_party_id(run) and is_party_id(party)) or type(conn) is not str:
            raise ValueError(f"run and party must be ids and conn a string: {run!r}, {party!r}, {conn!r}")
        self._key = bytes(key)
        self.run, self.party, self.conn, self.sends = run, party, conn, sends
        self.receives = DOWN if sends == UP else UP
        self.limits = limits
        #: the ``seq`` of the next RELAY this end sends / accepts
        self.next_send = 0
        self.next_recv = 0

    def __repr__(self) -> str:  # never print the key
        return f"RelayChannel({self.party!r}, {self.conn!r}, sends={self.sends!r}, next_send={self.next_send}, " \
               f"next_recv={self.next_recv})"

    def _mac(self, direction: str, seq: int, frames: list[Any]) -> str:
        return relay_mac(self._key, self.run, direction, self.party, self.conn, seq, frames)

    def wrap(self, inner: Message) -> Relay:
        """The RELAY that carries ``inner``, with the next sequence number.

        Takes the message rather than its frames: the sender always has it, and encoding it here makes the relayed
        header and tensors exactly what ``codec.encode`` produces (and checks). Zero-copy: ``~header`` views the
        encoded header, and each inner tensor the buffer ``encode`` hands out (its own array when it was already
        C-contiguous little-endian). Raises ``LocalProtocolError`` for a message that cannot be relayed.
        """
        if isinstance(inner, Relay):
            raise LocalProtocolError(ErrorCode.BAD_FIELD, "a RELAY is forwarded as it is, never wrapped in another")
        if any(t.name == HEADER_TENSOR for t in inner.tensor_list):
            raise LocalProtocolError(ErrorCode.BAD_FIELD, f"{inner.TYPE}: the tensor name {HEADER_TENSOR!r} is RELAY's")
        if len(inner.tensor_list) + 1 > self.limits.max_tensors:
            raise LocalProtocolError(
                ErrorCode.TOO_LARGE,
                f"{inner.TYPE} has {len(inner.tensor_list)} tensors; relayed, with {HEADER_TENSOR!r}, that is more "
                f"than max_tensors {self.limits.max_tensors}")
        frames = encode(inner, self.limits)
        tensors = [Tensor(HEADER_TENSOR, np.frombuffer(frames[1], _UINT8))]
        for t, buf in zip(inner.tensor_list, frames[2:]):
            tensors.append(Tensor(t.name, np.frombuffer(buf, DTYPES[wire_dtype(t.array.dtype)]).reshape(t.array.shape)))
        seq = self.next_send
        mac = self._mac(self.sends, seq, frames[1:])
        self.next_send += 1
        return Relay(party=self.party, conn=self.conn, seq=seq, mac=mac, tensors=tuple(tensors))

    def unwrap(self, msg: Relay) -> list[Any]:
        """The inner message's frames ``[b"VFL/1", header, *tensor frames]`` (views of ``msg``'s buffers, no copy),
        ready for ``codec.decode``, once ``msg`` proves to be the next message of this connection from its other end.

        Checks in this order, each a ``RemoteProtocolError``: ``party`` and ``conn`` are this channel's
        (``BAD_FIELD``); ``mac`` is 64 lowercase hex digits (``BAD_FIELD``); the first tensor is ``~header``, uint8,
        1-D (``BAD_TENSOR``) and at most ``max_header_bytes`` long (``TOO_LARGE``); the MAC verifies
        (``IDENTITY_MISMATCH``: not authenticated by the end party, so altered or forged on the way); ``seq`` is the
        next one expected (``UNEXPECTED_MESSAGE``: an authentic RELAY replayed, reordered, or after dropped ones).
        Only a RELAY that passes them all advances ``next_recv``. Nothing is allocated in proportion to a claimed
        size: the codec has checked every tensor against its frame, and the MAC reads the buffers in place.
        """
        ref = Relay.TYPE
        if msg.party != self.party:
            raise RemoteProtocolError(
                ErrorCode.BAD_FIELD, f"RELAY.party {peer_text(msg.party, 64)!r} is not {self.party!r}, the end party "
                f"of connection {self.conn!r}", ref=ref)
        if msg.conn != self.conn:
            raise RemoteProtocolError(
                ErrorCode.BAD_FIELD, f"RELAY.conn {peer_text(msg.conn, 80)!r} is not {self.conn!r}, the connection "
                f"of {self.party!r}", ref=ref)
        if len(msg.mac) != 64 or not _MAC_HEX.fullmatch(msg.mac):
            raise RemoteProtocolError(ErrorCode.BAD_FIELD, "RELAY.mac must be 64 lowercase hex digits", ref=ref)
        if not msg.tensors or msg.tensors[0].name != HEADER_TENSOR:
            raise RemoteProtocolError(
                ErrorCode.BAD_TENSOR, f"RELAY's first tensor must be {HEADER_TENSOR!r}, the inner header", ref=ref)
        header = msg.tensors[0].array
        if header.dtype != _UINT8 or header.ndim != 1:
            raise RemoteProtocolError(ErrorCode.BAD_TENSOR, f"RELAY tensor {HEADER_TENSOR!r} must be uint8 [n]", ref=ref)
        if header.nbytes > self.limits.max_header_bytes:
            raise RemoteProtocolError(
                ErrorCode.TOO_LARGE, f"RELAY's inner header is {header.nbytes} bytes > max_header_bytes "
                f"{self.limits.max_header_bytes}", ref=ref)
        frames = [header, *(_flat_bytes(t.array) for t in msg.tensors[1:])]
        if not hmac.compare_digest(self._mac(self.receives, msg.seq, frames), msg.mac):
            raise RemoteProtocolError(
                ErrorCode.IDENTITY_MISMATCH,
                f"RELAY seq {msg.seq} of {self.party!r} ({self.receives}): the MAC does not verify, so the relayed "
                "message is not authenticated by its end party (altered or forged on the way, or the two ends "
                "derived different keys)", ref=ref)
        if msg.seq != self.next_recv:
            what = ("was received already: replayed or reordered on the way" if msg.seq < self.next_recv else
                    f"skips {msg.seq - self.next_recv} message(s): dropped or reordered on the way")
            raise RemoteProtocolError(
                ErrorCode.UNEXPECTED_MESSAGE,
                f"RELAY seq {msg.seq} of {self.party!r} ({self.receives}) {what} (expected seq {self.next_recv})",
                ref=ref)
        self.next_recv += 1
        return [SIGNATURE, *frames]

    def receive(self, msg: Relay) -> Message:
        """``unwrap`` and decode: the inner message, after every check of ``unwrap`` and of PROTOCOL.md section 3
        (with this end's limits). A RELAY inside a RELAY is ``UNEXPECTED_MESSAGE``: relays are forwarded, not
        nested. The sequence number counts even when the inner message then fails to decode: it was authentic."""
        inner = decode(self.unwrap(msg), self.limits)
        if isinstance(inner, Relay):
            raise RemoteProtocolError(ErrorCode.UNEXPECTED_MESSAGE, "a RELAY inside a RELAY", ref=Relay.TYPE)
        return inner
