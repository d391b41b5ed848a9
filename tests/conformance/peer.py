"""A raw vfl/1 peer written from PROTOCOL.md only.

This module deliberately imports nothing from ``vfl``: it encodes the wire format of PROTOCOL.md sections 3-8
by hand with pyzmq + msgpack + numpy, so the conformance kit checks an implementation against the spec and not
against itself.

Everything here is bounded: every receive has a timeout, every send has a send timeout.
"""

from __future__ import annotations

import collections
import hashlib
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import msgpack
import numpy as np
import zmq

# --------------------------------------------------------------------------------------------------------------
# Constants of the spec
# --------------------------------------------------------------------------------------------------------------

SIGNATURE = b"VFL/1"  # section 3, frame 0

# section 8
CODES = {
    "BAD_SIGNATURE": 1,
    "UNSUPPORTED_VERSION": 2,
    "BAD_FRAMING": 3,
    "BAD_HEADER": 4,
    "UNKNOWN_TYPE": 5,
    "BAD_FIELD": 6,
    "BAD_TENSOR": 7,
    "TOO_LARGE": 8,
    "UNEXPECTED_MESSAGE": 9,
    "CONFIG_MISMATCH": 10,
    "IDENTITY_MISMATCH": 11,
    "UNKNOWN_PARTY": 12,
    "TIMEOUT": 13,
    "INTERNAL": 14,
    "PSI_FAILED": 15,
    "REPLACED": 16,
}
CODE_NAMES = {v: k for k, v in CODES.items()}

# section 7: wire name -> numpy dtype (all little-endian)
DTYPES = {
    "bool": np.dtype("?"),
    "uint8": np.dtype("<u1"),
    "uint16": np.dtype("<u2"),
    "uint32": np.dtype("<u4"),
    "uint64": np.dtype("<u8"),
    "int8": np.dtype("<i1"),
    "int16": np.dtype("<i2"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
    "float16": np.dtype("<f2"),
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
    # 1.6: the upper 16 bits of float32 bit patterns; numpy has no bfloat16, so the kit sends it as raw bytes
    "bfloat16": np.dtype("<u2"),
}
WIRE_NAME = {v: k for k, v in DTYPES.items() if k != "bfloat16"}  # a numpy uint16 array is a uint16 tensor

DEFAULT_LIMITS = {"max_header_bytes": 65536, "max_tensors": 64, "max_tensor_bytes": 268435456}

# section 5: field name -> (kind, required)
_STR, _ID, _INT, _BOOL, _MAP, _VERSION, _LIST_ID = "str", "id", "int", "bool", "map", "version", "list[id]"
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # section 2: party ids and run ids
FIELDS: dict[str, dict[str, tuple[str, bool]]] = {
    "HELLO": {
        "version": (_VERSION, True),
        "role": (_STR, True),
        "party": (_ID, True),
        "run": (_ID, True),
        "config": (_MAP, True),
        "digest": (_STR, True),
    },
    "WELCOME": {
        "version": (_VERSION, True),
        "party": (_ID, True),
        "run": (_ID, True),
        "digest": (_STR, True),
        "heartbeat_ms": (_INT, True),
        "peer_timeout_ms": (_INT, True),
        "data_holders": (_LIST_ID, True),
    },
    "ERROR": {"code": (_INT, True), "message": (_STR, True), "ref": (_STR, False), "diff": (_MAP, False)},
    "HEARTBEAT": {},
    "ECHO": {"seq": (_INT, True)},
    "ECHO_REPLY": {"seq": (_INT, True)},
    "BYE": {"ok": (_BOOL, True), "reason": (_STR, True)},
    # section 10 (the kit checks their fields, not the PSI itself)
    "PSI_START": {"n_items": (_INT, True), "chunk_size": (_INT, True), "buckets": (_INT, False),
                  "bucket_items": (_INT, False)},  # the bucket fields: 1.8, a session with psi_buckets
    "PSI_ITEMS": {"chunk": (_INT, True), "last": (_BOOL, True)},
    "PSI_REPLY": {"chunk": (_INT, True), "last": (_BOOL, True)},
    "PSI_RESULT": {"chunk": (_INT, True), "last": (_BOOL, True)},
    "PSI_ROWS": {"chunk": (_INT, True), "last": (_BOOL, True)},
    "PSI_BUCKET": {"bucket": (_INT, True), "n_items": (_INT, True)},  # 1.8
    # section 11 (the kit plays both ends of a segment holder, section 13, so it parses the training messages too)
    "SCHEDULE": {"epochs": (_INT, True), "first_epoch": (_INT, True), "first_step": (_INT, True),
                 "resume_digest": (_STR, False), "rows": (_INT, False)},
    "EPOCH": {"epoch": (_INT, True), "first_step": (_INT, True)},
    "FORWARD": {"step": (_INT, True)},
    "BACKWARD": {"step": (_INT, True)},
    "EVAL_FORWARD": {"epoch": (_INT, True), "batch": (_INT, True)},
    "CHECKPOINT": {"step": (_INT, True), "epoch": (_INT, True), "keep": (_BOOL, False)},
    "CHECKPOINT_DONE": {"step": (_INT, True), "digest": (_STR, True)},
    "ROLLBACK": {"step": (_INT, True)},
    "WINDOW": {"window": (_INT, True)},
    "TRAINING_DONE": {"epochs": (_INT, True), "keep_step": (_INT, True), "keep_epoch": (_INT, True),
                      "keep_digest": (_STR, False), "early_stop": (_BOOL, False)},
    # 1.10, section 13
    "RELAY": {"party": (_ID, True), "conn": (_STR, True), "seq": (_INT, True), "mac": (_STR, True)},
}
SESSION_TYPES = frozenset({"HELLO", "WELCOME", "ERROR", "HEARTBEAT", "ECHO", "ECHO_REPLY", "BYE"})  # sections 5-9
TYPES = frozenset(FIELDS)
TENSOR_TYPES = frozenset({"ECHO", "ECHO_REPLY", "PSI_ITEMS", "PSI_REPLY", "PSI_RESULT", "PSI_ROWS",  # may carry tensors
                          "SCHEDULE", "EPOCH", "FORWARD", "BACKWARD", "EVAL_FORWARD", "RELAY"})
PSI_LH = frozenset({"PSI_START", "PSI_ITEMS", "PSI_REPLY", "PSI_ROWS", "PSI_BUCKET"})  # the PSI messages a label holder sends
PSI_DH = frozenset({"PSI_START", "PSI_ITEMS", "PSI_RESULT", "PSI_BUCKET"})  # ... and a data holder
LH_TO_DH = frozenset({"WELCOME", "ERROR", "HEARTBEAT", "ECHO_REPLY", "BYE"}) | PSI_LH  # what a label holder may send
DH_TO_LH = frozenset({"HELLO", "ERROR", "HEARTBEAT", "ECHO", "BYE"}) | PSI_DH  # what a data holder may send
TRAIN_LH = frozenset({"SCHEDULE", "EPOCH", "BACKWARD", "CHECKPOINT", "ROLLBACK", "WINDOW", "TRAINING_DONE"})
TRAIN_DH = frozenset({"FORWARD", "EVAL_FORWARD", "CHECKPOINT_DONE", "ROLLBACK", "TRAINING_DONE"})
#: section 13: what travels between a segment holder and its neighbours (RELAY both ways; the cut layer in the clear)
UP_OF_HOP = DH_TO_LH | TRAIN_DH | {"RELAY"}  # what a party (data holder or segment holder) sends its downstream
DOWN_OF_HOP = LH_TO_DH | TRAIN_LH | {"RELAY"}  # what a label holder or segment holder sends a party upstream

INT_MAX = 2**63  # integers in fields are in [0, 2^63)


def routing_id(party: str) -> bytes:
    """[S1]: the routing id of a fresh data holder socket, ``<party>/<16 lowercase hex digits>``.

    Every kit connection gets its own (the label holder turns ROUTER_HANDOVER off, so two live connections with one
    routing id would make libzmq ignore the second). Attack tests pass a raw routing id of their choice instead.
    """
    return f"{party}/{secrets.token_hex(8)}".encode()


def is_id(x: Any) -> bool:
    """Section 5 field type id: a party/run id string."""
    return type(x) is str and ID_PATTERN.fullmatch(x) is not None


def is_int(x: Any) -> bool:
    """Section 3: a msgpack integer in [0, 2^63); a boolean is not an integer."""
    return type(x) is int and 0 <= x < INT_MAX


# --------------------------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------------------------


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def canonical(obj: Any) -> Any:
    """Every map's keys sorted (section 6)."""
    if isinstance(obj, dict):
        return {k: canonical(obj[k]) for k in sorted(obj)}
    if isinstance(obj, (list, tuple)):
        return [canonical(v) for v in obj]
    return obj


def config_digest(config: dict) -> str:
    """Section 6: lowercase hex SHA-256 of msgpack with every map's keys sorted."""
    return hashlib.sha256(pack(canonical(config))).hexdigest()


def tensor(name: str, array: np.ndarray) -> tuple[dict, bytes]:
    """A tensor descriptor and its frame: raw little-endian C-order bytes ([E4])."""
    arr = np.asarray(array)
    wire = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
    wire = np.dtype(wire)
    if wire.kind == "b":
        wire = np.dtype("?")
    if wire not in WIRE_NAME:
        raise ValueError(f"dtype {arr.dtype} is not on the allow-list")
    data = np.ascontiguousarray(arr, dtype=wire).tobytes(order="C")
    return {"name": name, "dtype": WIRE_NAME[wire], "shape": list(arr.shape)}, data


def envelope(
    type_: Any,
    fields: Optional[dict] = None,
    tensors: Iterable[tuple[str, np.ndarray]] = (),
    *,
    signature: bytes = SIGNATURE,
    tensors_key: bool = True,
) -> list[bytes]:
    """A well-formed message (unless the caller passes odd values): [signature, header, tensor frames...]."""
    header: dict = {"type": type_}
    frames: list[bytes] = []
    descs = []
    for name, arr in tensors:
        d, data = tensor(name, arr)
        descs.append(d)
        frames.append(data)
    if descs or tensors_key:
        header["tensors"] = descs
    header.update(fields or {})
    return [signature, pack(header), *frames]


# --------------------------------------------------------------------------------------------------------------
# Decoding and strict checking of what the node under test sends
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Msg:
    frames: list[bytes]
    header: Optional[dict] = None
    type: Optional[str] = None
    tensors: list[tuple[str, str, list[int], bytes]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    t: float = 0.0

    def get(self, key: str, default: Any = None) -> Any:
        return (self.header or {}).get(key, default)

    @property
    def code(self) -> Optional[int]:
        return self.get("code") if self.type == "ERROR" else None

    def summary(self) -> str:
        if self.header is None:
            return f"<undecodable {len(self.frames)} frames: {[f[:16] for f in self.frames[:3]]}>"
        h = {k: v for k, v in self.header.items() if k != "tensors"}
        if self.type == "ERROR" and is_int(h.get("code")):
            h["code"] = f"{h['code']} ({CODE_NAMES.get(h['code'], '?')})"
        s = f"{self.type} {h}"
        if self.tensors:
            s += f" tensors={[(n, d, s_) for n, d, s_, _ in self.tensors]}"
        if len(s) > 600:
            s = s[:600] + "..."
        return s


def _walk_strict(obj: Any, path: str, problems: list[str]) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            if type(k) is not str:
                problems.append(f"non-string map key {k!r} at {path or '/'}")
            _walk_strict(v, f"{path}/{k}", problems)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _walk_strict(v, f"{path}/{i}", problems)


def _check_field(kind: str, value: Any) -> bool:
    if kind == _STR:
        return type(value) is str
    if kind == _INT:
        return is_int(value)
    if kind == _BOOL:
        return type(value) is bool
    if kind == _MAP:
        return type(value) is dict
    if kind == _VERSION:
        return type(value) is list and len(value) == 2 and all(is_int(v) for v in value)
    if kind == _ID:
        return is_id(value)
    if kind == _LIST_ID:
        return type(value) is list and all(is_id(v) for v in value)
    raise AssertionError(kind)


def parse(frames: list[bytes], limits: dict = DEFAULT_LIMITS, allowed_types: frozenset = LH_TO_DH) -> Msg:
    """Decode a message sent by the node under test, noting every way it breaks sections 3 and 5."""
    m = Msg(frames=frames, t=time.monotonic())
    p = m.problems
    if len(frames) < 2:
        p.append(f"[E4/section 3] only {len(frames)} frame(s)")
        return m
    if frames[0] != SIGNATURE:
        p.append(f"[V1/section 3] frame 0 is {frames[0][:16]!r}, not {SIGNATURE!r}")
    if len(frames[1]) > limits["max_header_bytes"]:
        p.append(f"[section 3] header of {len(frames[1])} bytes exceeds max_header_bytes")
    try:
        header = msgpack.unpackb(frames[1], raw=False, strict_map_key=False, use_list=True)
    except Exception as exc:  # noqa: BLE001 - anything the decoder raises means "not one valid msgpack object"
        p.append(f"[section 3] header is not one valid msgpack object: {exc!r}")
        return m
    if type(header) is not dict:
        p.append(f"[section 3] header is a {type(header).__name__}, not a map")
        return m
    _walk_strict(header, "", p)
    m.header = header
    t = header.get("type")
    if type(t) is not str:
        p.append(f"[section 3] type is {t!r}")
        return m
    m.type = t
    if t not in TYPES:
        p.append(f"[section 5] unknown type {t!r}")
        return m
    if t not in allowed_types:
        p.append(f"[T1/section 5] a node sent {t}, which is not one of its role's message types")
    descs = header.get("tensors", [])
    ok_descs = True
    if type(descs) is not list or len(descs) > limits["max_tensors"]:
        p.append(f"[section 3] tensors is {descs!r:.80}")
        ok_descs = False
        descs = []
    names = set()
    for d in descs:
        if (
            type(d) is not dict
            or type(d.get("name")) is not str
            or not 1 <= len(d["name"]) <= 64
            or d["name"] in names
            or type(d.get("dtype")) is not str
            or type(d.get("shape")) is not list
            or len(d["shape"]) > 8
            or not all(is_int(s) for s in d["shape"])
        ):
            p.append(f"[section 3] bad tensor descriptor {d!r:.120}")
            ok_descs = False
            continue
        names.add(d["name"])
        if d["dtype"] not in DTYPES:
            p.append(f"[section 7] dtype {d['dtype']!r} not on the allow-list")
            ok_descs = False
    if ok_descs:
        if len(frames) != 2 + len(descs):
            p.append(f"[E4/section 3] {len(frames)} frames for {len(descs)} tensors")
        else:
            for d, data in zip(descs, frames[2:]):
                n = DTYPES[d["dtype"]].itemsize
                for s in d["shape"]:
                    n *= s
                if n != len(data):
                    p.append(f"[E4] tensor {d['name']!r} {d['dtype']}{d['shape']} has {len(data)} bytes, not {n}")
                m.tensors.append((d["name"], d["dtype"], list(d["shape"]), bytes(data)))
        if descs and t not in TENSOR_TYPES:
            p.append(f"[section 5] {t} carries tensors")
    for name, (kind, required) in FIELDS[t].items():
        if name not in header:
            if required:
                p.append(f"[section 5] {t} lacks required field {name!r}")
        elif not _check_field(kind, header[name]):
            p.append(f"[section 5] {t}.{name} = {header[name]!r:.80} is not a {kind}")
    if t == "ERROR" and is_int(header.get("code")) and header["code"] not in CODE_NAMES:
        p.append(f"[section 8] ERROR code {header['code']} is not in 1..{max(CODE_NAMES)}")
    return m


# --------------------------------------------------------------------------------------------------------------
# Pacing: keep the kit's own error-provoking traffic under the node's [R2] budget so that ordinary tests never
# lose an ERROR to rate limiting (the [R2] and flood tests bypass this on purpose, then mark the party drained).
# --------------------------------------------------------------------------------------------------------------


class Pacer:
    def __init__(self, per_second: int = 60):
        self.per_second = per_second
        self.sent: dict[bytes, collections.deque] = collections.defaultdict(collections.deque)

    def wait(self, key: bytes, n: int = 1) -> None:
        q = self.sent[key]
        deadline = time.monotonic() + 5.0
        while True:
            now = time.monotonic()
            while q and now - q[0] > 1.05:
                q.popleft()
            if len(q) + n <= self.per_second or now > deadline:
                break
            time.sleep(min(0.05, max(0.001, 1.06 - (now - q[0]))))
        now = time.monotonic()
        q.extend([now] * n)

    def drained(self, key: bytes) -> None:
        """The party's bucket at the node may be empty now: make the next paced send wait ~1 s."""
        now = time.monotonic()
        self.sent[key] = collections.deque([now] * self.per_second)


PACER = Pacer()


# --------------------------------------------------------------------------------------------------------------
# The peer
# --------------------------------------------------------------------------------------------------------------


class Peer:
    """One DEALER connection to the label holder, as a data holder (or an impostor) would open it."""

    def __init__(
        self,
        ctx: zmq.Context,
        address: str,
        *,
        server_public: Optional[bytes],
        public: Optional[bytes] = None,
        secret: Optional[bytes] = None,
        routing_id: Optional[bytes] = None,
        limits: Optional[dict] = None,
        monitor: bool = False,
        label: str = "",
        sockopts: Optional[dict] = None,
    ):
        self.limits = dict(limits or DEFAULT_LIMITS)
        self.allowed_types = LH_TO_DH  # what the node at the other end may send (a segment holder's input: more)
        self.label = label or (routing_id or b"?").decode("utf-8", "replace")
        self.routing_id = routing_id
        self.pace_key = routing_id or label.encode()
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.sndtimeo = 5000
        self.sock.rcvhwm = 10000
        self.sock.sndhwm = 10000
        for opt, value in (sockopts or {}).items():  # e.g. a small RCVHWM/RCVBUF for a peer that does not read
            self.sock.setsockopt(opt, value)
        if routing_id is not None:
            self.sock.setsockopt(zmq.ROUTING_ID, routing_id)
        if secret is not None:
            self.sock.curve_secretkey = secret
            self.sock.curve_publickey = public
            self.sock.curve_serverkey = server_public
        self.monitor = self.sock.get_monitor_socket() if monitor else None
        self.sock.connect(address)
        self.violations: list[str] = []
        self.transcript: collections.deque = collections.deque(maxlen=40)
        self.maybe_ready = False  # sent a HELLO not yet followed by a BYE
        self.closed = False

    # -- sending ------------------------------------------------------------------------------------------------

    def send_raw(self, frames: list[bytes], *, pace: bool = True, note: str = "", block: bool = True) -> bool:
        """Send one multipart message. With block=False, returns False instead of waiting when libzmq has no
        connected pipe to queue it on (e.g. a connection whose CURVE handshake was refused)."""
        if pace:
            PACER.wait(self.pace_key)
        try:
            self.sock.send_multipart(frames, flags=0 if block else zmq.NOBLOCK,
                                     copy=len(frames) < 8 and sum(map(len, frames)) < 65536)
        except zmq.Again:
            if block:
                raise
            return False
        self.transcript.append(("->", note or _describe_frames(frames)))
        return True

    def send(self, type_: Any, fields: Optional[dict] = None, tensors=(), *, pace: bool = False, **kw) -> None:
        if type_ == "HELLO":
            self.maybe_ready = True
        elif type_ == "BYE":
            self.maybe_ready = False
        self.send_raw(envelope(type_, fields, tensors, **kw), pace=pace)

    # -- receiving ----------------------------------------------------------------------------------------------

    def recv(self, timeout: float) -> Optional[Msg]:
        """The next message within ``timeout`` seconds, decoded and strictly checked, or None."""
        if self.sock.poll(int(max(0.0, timeout) * 1000), zmq.POLLIN) == 0:
            return None
        frames = self.sock.recv_multipart()
        m = parse(frames, self.limits, self.allowed_types)
        if m.problems:
            self.violations.extend(f"{self.label}: {p}  (message: {m.summary()})" for p in m.problems)
        self.transcript.append(("<-", m.summary()))
        if m.type == "WELCOME":
            self.maybe_ready = True  # whatever the test expected, the party is READY at the node now
        return m

    def recv_app(self, timeout: float) -> Optional[Msg]:
        """Like recv, skipping HEARTBEATs (a READY label holder may send them at any time, [L1])."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.recv(deadline - time.monotonic())
            if m is None or m.type != "HEARTBEAT" or m.problems:
                return m

    def drain(self, duration: float) -> list[Msg]:
        """Everything (except HEARTBEATs) that arrives within ``duration`` seconds."""
        out = []
        deadline = time.monotonic() + duration
        for _ in range(100000):
            m = self.recv_app(deadline - time.monotonic())
            if m is None:
                break
            out.append(m)
        return out

    def history(self) -> str:
        return "\n".join(f"    {d} {s}" for d, s in self.transcript)

    def expect(self, type_: str, timeout: float, what: str = "") -> Msg:
        m = self.recv_app(timeout)
        if m is None:
            raise AssertionError(f"{what}: expected {type_}, got nothing within {timeout:.1f} s\n{self.history()}")
        if m.type != type_:
            raise AssertionError(f"{what}: expected {type_}, got {m.summary()}\n{self.history()}")
        return m

    def expect_error(self, code: int | str, timeout: float, what: str = "") -> Msg:
        code = CODES[code] if isinstance(code, str) else code
        m = self.recv_app(timeout)
        want = f"ERROR {code} ({CODE_NAMES[code]})"
        if m is None:
            raise AssertionError(f"{what}: expected {want}, got nothing within {timeout:.1f} s\n{self.history()}")
        if m.type != "ERROR" or m.get("code") != code:
            raise AssertionError(f"{what}: expected {want}, got {m.summary()}\n{self.history()}")
        if m.problems:
            raise AssertionError(f"{what}: the ERROR itself is malformed: {m.problems}")
        return m

    def expect_nothing(self, duration: float, what: str = "") -> None:
        got = self.drain(duration)
        if got:
            raise AssertionError(
                f"{what}: expected no answer, got {[m.summary() for m in got]}\n{self.history()}"
            )

    # -- session helpers ----------------------------------------------------------------------------------------

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.monitor is not None:
            try:
                self.sock.disable_monitor()
            except zmq.ZMQError:
                pass
            self.monitor.close(linger=0)
        self.sock.close(linger=0)


def _describe_frames(frames: list[bytes]) -> str:
    if len(frames) >= 2:
        try:
            h = msgpack.unpackb(frames[1], raw=False, strict_map_key=False)
            hs = repr(h)
        except Exception:  # noqa: BLE001
            hs = repr(frames[1][:40])
        if len(hs) > 300:
            hs = hs[:300] + "..."
        return f"[{frames[0][:12]!r}, {hs}, +{len(frames) - 2} frames]"
    return f"{[f[:24] for f in frames]}"
