"""Wire capture for integration tests: a recording TCP relay, a ZMTP 3.x parser and a vfl envelope reader.

Everything here is independent of vfl's own transport and codec on purpose: tests use it to check what actually
travels on the wire. It is only meaningful with CurveZMQ off (``insecure = true``); with CURVE the frames after the
handshake are ciphertext (the greeting then names the mechanism ``CURVE``, which :func:`parse_zmtp` reports).

- :class:`TcpRelay` listens on a free 127.0.0.1 port, forwards each accepted connection to an upstream 127.0.0.1
  port, and records every byte in both directions per connection. Its threads stop by themselves after
  ``lifetime`` seconds at the latest and always on :meth:`TcpRelay.stop` (use it as a context manager).
- :func:`parse_zmtp` splits one direction of a connection (RFC 23/ZMTP 3.x) into its greeting, command frames
  and reassembled multipart messages.
- :func:`read_envelope` reads a message as PROTOCOL.md section 3 describes it, with plain ``msgpack`` and ``numpy``.
- :class:`ByteSearch` finds which of many needles (each at least 8 bytes) occur anywhere in some byte streams.
"""

from __future__ import annotations

import math
import socket
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import msgpack
import numpy as np

LOOPBACK = "127.0.0.1"


# ------------------------------------------------------------------------------------------------ relay


@dataclass
class Connection:
    """One relayed TCP connection: ``c2s`` is what the connecting side sent, ``s2c`` what the upstream sent back."""

    index: int
    c2s: bytearray = field(default_factory=bytearray)
    s2c: bytearray = field(default_factory=bytearray)
    upstream_connected: bool = False


class TcpRelay:
    """A recording TCP forwarder ``127.0.0.1:port -> 127.0.0.1:upstream_port`` with a bounded lifetime."""

    def __init__(self, upstream_port: int, *, lifetime: float = 120.0, connect_timeout: float = 10.0):
        self.upstream_port = upstream_port
        self.lifetime = lifetime
        self.connect_timeout = connect_timeout
        self.connections: list[Connection] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind((LOOPBACK, 0))
        self._listener.listen(16)
        self._listener.settimeout(0.1)
        self.port: int = self._listener.getsockname()[1]
        self._deadline = 0.0

    # -- lifecycle

    def start(self) -> "TcpRelay":
        self._deadline = time.monotonic() + self.lifetime
        self._spawn(self._accept_loop, "relay-accept")
        return self

    def stop(self, timeout: float = 5.0, drain: float = 2.0) -> None:
        """Let the connections finish by themselves for up to ``drain`` seconds (both ends have usually closed
        already, so this only reads their last bytes), then stop accepting, close every socket and join every thread
        (all within ``timeout``)."""
        end = time.monotonic() + drain
        for t in [t for t in self._threads if t.name != "relay-accept"]:
            t.join(max(0.0, end - time.monotonic()))
        self._stop.set()
        try:
            self._listener.close()
        except OSError:
            pass
        with self._lock:
            sockets = list(self._sockets)
        for s in sockets:
            try:
                s.close()
            except OSError:
                pass
        end = time.monotonic() + timeout
        for t in list(self._threads):
            t.join(max(0.0, end - time.monotonic()))
        alive = [t.name for t in self._threads if t.is_alive()]
        if alive:
            self.errors.append(f"relay threads still alive after stop: {alive}")

    def __enter__(self) -> "TcpRelay":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- internals

    def _running(self) -> bool:
        return not self._stop.is_set() and time.monotonic() < self._deadline

    def _spawn(self, target, name: str, *args) -> None:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._threads.append(t)
        t.start()

    def _track(self, s: socket.socket) -> socket.socket:
        with self._lock:
            self._sockets.append(s)
        return s

    def _accept_loop(self) -> None:
        while self._running():
            try:
                client, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self._track(client)
            conn = Connection(index=len(self.connections))
            self.connections.append(conn)
            upstream = self._connect_upstream()
            if upstream is None:
                self.errors.append(f"connection {conn.index}: upstream 127.0.0.1:{self.upstream_port} unreachable")
                client.close()
                continue
            conn.upstream_connected = True
            self._spawn(self._pump, f"relay-{conn.index}-c2s", client, upstream, conn.c2s)
            self._spawn(self._pump, f"relay-{conn.index}-s2c", upstream, client, conn.s2c)
        self._listener.close()

    def _connect_upstream(self) -> socket.socket | None:
        end = time.monotonic() + self.connect_timeout
        while self._running() and time.monotonic() < end:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.settimeout(1.0)
                s.connect((LOOPBACK, self.upstream_port))
                return self._track(s)
            except OSError:
                s.close()
                time.sleep(0.05)
        return None

    def _pump(self, src: socket.socket, dst: socket.socket, record: bytearray) -> None:
        src.settimeout(0.1)
        try:
            while self._running():
                try:
                    data = src.recv(1 << 16)
                except socket.timeout:
                    continue
                if not data:
                    break
                record += data  # one writer per direction
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s, how in ((dst, socket.SHUT_WR), (src, socket.SHUT_RD)):
                try:
                    s.shutdown(how)
                except OSError:
                    pass


# ------------------------------------------------------------------------------------------------ ZMTP


@dataclass
class ZmtpStream:
    """One direction of a ZMTP 3.x connection."""

    version: tuple[int, int]
    mechanism: bytes
    as_server: int
    commands: list[tuple[bytes, bytes]]  # (name, body after the name)
    messages: list[list[bytes]]  # multipart messages, reassembled
    trailing: bytes  # bytes after the last complete message or command (a connection cut mid-message)


def parse_zmtp(data: bytes) -> ZmtpStream:
    """Parse a byte stream as RFC 23/ZMTP 3.x: a 64-byte greeting, then frames. Raises ValueError on a violation."""
    data = bytes(data)
    if len(data) < 64:
        raise ValueError(f"stream of {len(data)} bytes is shorter than a ZMTP greeting")
    if data[0] != 0xFF or data[9] != 0x7F:
        raise ValueError(f"not a ZMTP 3 signature: {data[:10].hex()}")
    if data[10] != 3:
        raise ValueError(f"ZMTP major version {data[10]}, expected 3")
    version = (data[10], data[11])
    mechanism = data[12:32].rstrip(b"\0")
    as_server = data[32]
    commands: list[tuple[bytes, bytes]] = []
    messages: list[list[bytes]] = []
    parts: list[bytes] = []
    i = 64
    n = len(data)
    done = i  # end of the last complete message or command
    while i < n:
        flags = data[i]
        if flags & 0xF8:
            raise ValueError(f"reserved flag bits set at offset {i}: {flags:#04x}")
        more, long, command = flags & 1, flags & 2, flags & 4
        head = 9 if long else 2
        if i + head > n:
            break
        size = int.from_bytes(data[i + 1 : i + 9], "big") if long else data[i + 1]
        body_at = i + head
        if body_at + size > n:
            break
        body = data[body_at : body_at + size]
        i = body_at + size
        if command:
            if more:
                raise ValueError(f"command frame with MORE at offset {body_at}")
            if parts:
                raise ValueError(f"command frame inside a multipart message at offset {body_at}")
            if not body or body[0] + 1 > len(body):
                raise ValueError(f"malformed command frame at offset {body_at}")
            commands.append((body[1 : 1 + body[0]], body[1 + body[0] :]))
            done = i
            continue
        parts.append(body)
        if not more:
            messages.append(parts)
            parts = []
            done = i
    trailing = data[done:]
    return ZmtpStream(version, mechanism, as_server, commands, messages, trailing)


# ------------------------------------------------------------------------------------------------ vfl envelope

#: PROTOCOL.md section 7, written out here rather than imported (this module checks the wire, not vfl's codec).
WIRE_DTYPES = {
    "bool": "?",
    "uint8": "u1",
    "uint16": "<u2",
    "uint32": "<u4",
    "uint64": "<u8",
    "int8": "i1",
    "int16": "<i2",
    "int32": "<i4",
    "int64": "<i8",
    "float16": "<f2",
    "float32": "<f4",
    "float64": "<f8",
    "bfloat16": "<u2",  # 1.6: bfloat16 bit patterns (upper halves of float32)
}


@dataclass
class Envelope:
    type: str
    header: dict
    tensors: dict[str, np.ndarray]


def read_envelope(frames: Sequence[bytes]) -> Envelope:
    """Frame 0 ``VFL/1``, frame 1 a msgpack map, then one frame per tensor. Raises ValueError if it is not that."""
    if len(frames) < 2 or frames[0] != b"VFL/1":
        raise ValueError(f"not a vfl envelope: {len(frames)} frames, frame 0 {bytes(frames[0][:16])!r}")
    header = msgpack.unpackb(frames[1], raw=False, strict_map_key=True)
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise ValueError(f"header is not a map with a string type: {header!r}")
    specs = header.get("tensors", [])
    if len(frames) != 2 + len(specs):
        raise ValueError(f"{header['type']}: {len(frames)} frames for {len(specs)} tensors")
    tensors = {}
    for spec, buf in zip(specs, frames[2:]):
        dtype = np.dtype(WIRE_DTYPES[spec["dtype"]])
        shape = tuple(spec["shape"])
        if len(buf) != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"{header['type']}: tensor {spec['name']!r} has {len(buf)} bytes for {shape} {dtype}")
        tensors[spec["name"]] = np.frombuffer(buf, dtype=dtype).reshape(shape)
    return Envelope(header["type"], header, tensors)


# ------------------------------------------------------------------------------------------------ search


class ByteSearch:
    """Which needles occur in any of the streams. Needles must be at least 8 bytes long.

    Every 8-byte window of every stream goes into one sorted array; a needle whose first 8 bytes are not there
    cannot occur, and the rare candidate is confirmed with a plain substring search. So thousands of needles cost
    one ``np.isin``, not thousands of passes over the capture.
    """

    WINDOW = 8

    def __init__(self, streams: Iterable[bytes]):
        self.streams = [bytes(s) for s in streams]
        keys = [np.empty(0, dtype="<u8")]
        for s in self.streams:
            if len(s) >= self.WINDOW:
                arr = np.frombuffer(s, dtype=np.uint8)
                win = np.lib.stride_tricks.sliding_window_view(arr, self.WINDOW)
                keys.append(np.ascontiguousarray(win).view("<u8").ravel())
        self._keys = np.unique(np.concatenate(keys))
        self.total_bytes = sum(len(s) for s in self.streams)

    def found(self, needles: Iterable[bytes]) -> list[bytes]:
        """The needles that occur somewhere (in input order, without repeats)."""
        needles = list(dict.fromkeys(bytes(n) for n in needles))
        if not needles:
            return []
        short = [n for n in needles if len(n) < self.WINDOW]
        if short:
            raise ValueError(f"needles must be at least {self.WINDOW} bytes: {short[:3]!r}")
        prefixes = np.frombuffer(b"".join(n[: self.WINDOW] for n in needles), dtype="<u8")
        candidates = np.flatnonzero(np.isin(prefixes, self._keys))
        return [needles[i] for i in candidates.tolist() if any(needles[i] in s for s in self.streams)]
