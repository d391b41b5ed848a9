"""Envelope codec: messages <-> lists of frames (PROTOCOL.md sections 3 and 7).

``decode`` runs the checks of section 3 in order and raises ``RemoteProtocolError`` with the code of the first one
that fails — and nothing else, whatever the frames hold (a hypothesis test holds us to that). Tensor frames are
never copied when they are aligned: the arrays are read-only views into the received buffers, so a 16 MiB
activation costs no allocation here. ``encode`` hands out the arrays' own buffers for zero-copy sends.

What a peer's header can cost is bounded before it is built (issue 12): at most ``MAX_HEADER_DEPTH`` levels, no
claimed length beyond the bytes present, no duplicate keys; after a failed decode the type peek reads only a
``PEEK_BYTES`` prefix. So one message costs a small multiple of ``max_header_bytes``, never of what it claims.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any, Sequence

import msgpack
import numpy as np

from .errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from .messages import MAX_INT, MESSAGE_TYPES, Message, Tensor, check_field
from .text import peer_text

SIGNATURE = b"VFL/1"
SIGNATURE_PREFIX = b"VFL/"
PROTOCOL_VERSION = (1, 10)
MAX_NDIM = 8
MAX_TENSOR_NAME = 64

#: numpy has no bfloat16 (version 1.6): on the wire the dtype is named ``bfloat16`` and its 2-byte items are the
#: upper halves of float32 bit patterns. A one-field structured dtype over ``<u2`` keeps it distinct from ``uint16``
#: in the name lookups below (same bytes, another name); ``vfl.protocol.precision`` converts it.
BFLOAT16 = np.dtype([("bfloat16", "<u2")])

#: wire dtype name -> numpy dtype (little-endian). PROTOCOL.md section 7.
DTYPES: dict[str, np.dtype] = {
    name: np.dtype(code)
    for name, code in {
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
    }.items()
}
DTYPES["bfloat16"] = BFLOAT16
_WIRE_NAME = {dt: name for name, dt in DTYPES.items()}
_BOOL = DTYPES["bool"]


@dataclass(frozen=True)
class Limits:
    """The limits of PROTOCOL.md section 7. Both sides configure them; the receiver enforces its own."""

    max_header_bytes: int = 65_536
    max_tensors: int = 64
    max_tensor_bytes: int = 256 * 2**20

    @property
    def max_frames(self) -> int:
        return 2 + self.max_tensors

    @property
    def max_frame_bytes(self) -> int:
        """The libzmq ``MAXMSGSIZE`` backstop: no legal frame is larger."""
        return self.max_tensor_bytes + self.max_header_bytes


DEFAULT_LIMITS = Limits()


def wire_dtype(dtype: np.dtype) -> str | None:
    """The wire name of a numpy dtype, whatever its byte order, or None if it is not allowed."""
    dt = np.dtype(dtype)
    if dt.byteorder == ">":
        dt = dt.newbyteorder("<")
    return _WIRE_NAME.get(dt)


# --------------------------------------------------------------------------------------------------- encode

_local = threading.local()


def _packer() -> msgpack.Packer:
    """One reusable packer per thread: building a Packer costs as much as packing a small header."""
    packer = getattr(_local, "packer", None)
    if packer is None:
        packer = _local.packer = msgpack.Packer(use_bin_type=True)
    return packer



def encode(msg: Message, limits: Limits = DEFAULT_LIMITS) -> list[Any]:
    """Frames for ``msg``: signature, header, then each tensor's buffer (no copy when already C-contiguous LE)."""
    tensors = msg.tensor_list
    if tensors and not msg.CARRIES_TENSORS:
        raise LocalProtocolError(ErrorCode.BAD_TENSOR, f"{msg.TYPE} carries no tensors")
    if len(tensors) > limits.max_tensors:
        raise LocalProtocolError(ErrorCode.TOO_LARGE, f"{len(tensors)} tensors > max_tensors {limits.max_tensors}")
    fields = msg.header_fields()
    for name, (kind, required) in msg.FIELDS.items():
        if name not in fields:
            if required:
                raise LocalProtocolError(ErrorCode.BAD_FIELD, f"{msg.TYPE}.{name} is required")
            continue
        try:
            check_field(kind, fields[name])
        except ValueError as exc:
            raise LocalProtocolError(ErrorCode.BAD_FIELD, f"{msg.TYPE}.{name} {exc}") from None
    descriptors = []
    buffers = []
    seen = set()
    for t in tensors:
        arr = t.array
        name = _WIRE_NAME.get(arr.dtype) or wire_dtype(arr.dtype)  # the first lookup finds every native dtype
        if name is None:
            raise LocalProtocolError(ErrorCode.BAD_TENSOR, f"tensor {t.name!r}: dtype {arr.dtype} not allowed")
        if not (1 <= len(t.name) <= MAX_TENSOR_NAME) or t.name in seen:
            raise LocalProtocolError(ErrorCode.BAD_FIELD, f"tensor name {t.name!r} empty, too long or repeated")
        if arr.ndim > MAX_NDIM:
            raise LocalProtocolError(ErrorCode.BAD_FIELD, f"tensor {t.name!r} has {arr.ndim} > 8 dimensions")
        if arr.nbytes > limits.max_tensor_bytes:
            raise LocalProtocolError(ErrorCode.TOO_LARGE, f"tensor {t.name!r} is {arr.nbytes} bytes")
        if arr.dtype == _BOOL and arr.size and arr.view(np.uint8).max() > 1:
            arr = arr.view(np.uint8) != 0  # a bool view of raw bytes: send each one's truth value, as 0 or 1
        seen.add(t.name)
        if not arr.flags.c_contiguous or arr.dtype.byteorder == ">":
            arr = np.asarray(arr, dtype=DTYPES[name], order="C")
        descriptors.append({"name": t.name, "dtype": name, "shape": list(arr.shape)})
        buffers.append(arr.reshape(-1).view(np.uint8) if arr.size else b"")
    header = {"type": msg.TYPE, **fields}
    if descriptors:
        header["tensors"] = descriptors
    packed = _packer().pack(header)
    if len(packed) > limits.max_header_bytes:
        raise LocalProtocolError(ErrorCode.TOO_LARGE, f"{msg.TYPE} header is {len(packed)} bytes")
    return [SIGNATURE, packed, *buffers]


# --------------------------------------------------------------------------------------------------- decode


def _fail(code: ErrorCode, detail: str, ref: str | None = None) -> RemoteProtocolError:
    return RemoteProtocolError(code, detail, ref=ref)


#: The type peek ([M2]) looks at no more than this prefix of frame 1, whatever the frame's size ([E2]).
PEEK_BYTES = 4096
#: first bytes of a msgpack str (fixstr, str8, str16, str32): header keys and ``type`` must be one
_STR_MARKERS = frozenset([*range(0xA0, 0xC0), 0xD9, 0xDA, 0xDB])


def decode_or_failure(frames: Sequence, limits: Limits = DEFAULT_LIMITS):
    """``(message, failure, type)``: the decoded message, or None and the ``RemoteProtocolError`` to answer it with
    later (a receiver first applies [M2] and [S4], which need the type, read from the header's prefix)."""
    try:
        msg = decode(frames, limits)
    except RemoteProtocolError as exc:
        return None, exc, peek_type(frames)
    return msg, None, msg.TYPE


def peek_type(frames: Sequence[Any]) -> str | None:
    """The header's ``type`` if the first ``PEEK_BYTES`` of frame 1 show it, else None. Used to honour [M2].

    Runs after ``decode`` has refused the message, so frame 1 may be anything up to libzmq's frame cap (256 MiB):
    only a bounded prefix is copied, the first map's keys are read one at a time, the values before ``type`` are
    skipped without being built (msgpack's skip builds no objects), and every length a string may claim is bounded
    by the prefix. The cost is at most a few KiB whatever the frame holds.
    """
    try:
        prefix = bytes(memoryview(frames[1]).cast("B")[:PEEK_BYTES])
    except (IndexError, TypeError, ValueError):
        return None
    bound = max(len(prefix), 1)  # nothing in the prefix can honestly claim more elements or bytes than it has
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=PEEK_BYTES, max_str_len=bound, max_bin_len=bound,
                                max_array_len=bound, max_map_len=bound, max_ext_len=bound)
    unpacker.feed(prefix)
    try:
        for _ in range(unpacker.read_map_header()):  # ends with OutOfData at the end of the prefix at the latest
            if prefix[unpacker.tell()] not in _STR_MARKERS:
                return None  # a key that is not a string: no header (check 5), so no type
            if unpacker.unpack() == "type":
                if prefix[unpacker.tell()] not in _STR_MARKERS:
                    return None
                return unpacker.unpack()
            unpacker.skip()
    except Exception:  # noqa: BLE001 - anything unreadable (not a map, cut off by the prefix) simply has no type
        return None
    return None


#: PROTOCOL.md section 3 check 5: the header map is level 1; anything nested deeper than this is BAD_HEADER.
MAX_HEADER_DEPTH = 32
#: first bytes that open a msgpack container: fixmap, fixarray, array16/32, map16/32
_CONTAINER_MARKERS = frozenset([*range(0x80, 0xA0), 0xDC, 0xDD, 0xDE, 0xDF])
_NOT_CONTAINER_MARKERS = bytes(b for b in range(256) if b not in _CONTAINER_MARKERS)
#: headers whose (container marker bytes x length) stay under this skip the structural scan: msgpack pre-allocates
#: at most that many list slots for them (each container claims at most the header's length), i.e. <= 8 MiB
_FAST_SLOTS = 1 << 20


def _scalar_sizes() -> list[int]:
    """First byte -> size of the whole encoding, for msgpack values whose first byte says it (0: look closer)."""
    size = [0] * 256
    for b in [*range(0x00, 0x80), *range(0xE0, 0x100), 0xC0, 0xC2, 0xC3]:  # fixints, nil, false, true
        size[b] = 1
    for b in range(0xA0, 0xC0):  # fixstr
        size[b] = 1 + (b & 0x1F)
    for b, n in {0xCA: 5, 0xCB: 9, 0xCC: 2, 0xCD: 3, 0xCE: 5, 0xCF: 9, 0xD0: 2, 0xD1: 3, 0xD2: 5, 0xD3: 9,
                 0xD4: 3, 0xD5: 4, 0xD6: 6, 0xD7: 10, 0xD8: 18}.items():  # floats, ints, fixext
        size[b] = n
    return size


_SCALAR_SIZE = _scalar_sizes()
#: str8/16/32, bin8/16/32, ext8/16/32: first byte -> (bytes of the length field, bytes between it and the payload)
_SIZED = {0xD9: (1, 0), 0xDA: (2, 0), 0xDB: (4, 0), 0xC4: (1, 0), 0xC5: (2, 0), 0xC6: (4, 0),
          0xC7: (1, 1), 0xC8: (2, 1), 0xC9: (4, 1)}
#: array16/32, map16/32: first byte -> (bytes of the count field, values per entry)
_COUNTED = {0xDC: (2, 1), 0xDD: (4, 1), 0xDE: (2, 2), 0xDF: (4, 2)}


class _HeaderProblem(ValueError):
    """A header that is msgpack but not a header (check 5); the text is what the peer is told."""


def _scan(buf: bytes) -> None:
    """Walk the msgpack structure of ``buf`` without building it, iteratively; raise ``_HeaderProblem`` unless it
    is exactly one object nested at most ``MAX_HEADER_DEPTH`` levels whose containers never claim more elements
    than bytes remain (each element takes at least one byte).

    msgpack allocates a list for the count an array or map *claims* before reading its elements, up to 1024
    levels deep: unchecked, a 64 KiB header of nested 5-byte array headers costs ~70 MiB. After this scan the
    pre-allocations of the real unpack add up to at most one slot per header byte.
    """
    n = len(buf)
    pos = 0
    left = [1]  # elements still to read in each open container; the bottom entry is the one top-level object
    pending = 1  # sum(left)
    size = _SCALAR_SIZE
    try:
        while left:
            b = buf[pos]
            pos += 1
            left[-1] -= 1
            pending -= 1
            s = size[b]
            if s:
                pos += s - 1
            elif b in _SIZED:
                width, gap = _SIZED[b]
                pos += width + gap + int.from_bytes(buf[pos : pos + width], "big")
            else:
                if 0x90 <= b <= 0x9F:
                    count = b & 0x0F
                elif 0x80 <= b <= 0x8F:
                    count = 2 * (b & 0x0F)
                elif b in _COUNTED:
                    width, per = _COUNTED[b]
                    count = per * int.from_bytes(buf[pos : pos + width], "big")
                    pos += width
                else:
                    raise _HeaderProblem("header holds the never-used msgpack byte 0xc1")
                if len(left) > MAX_HEADER_DEPTH:
                    raise _HeaderProblem(f"header nests deeper than {MAX_HEADER_DEPTH} levels")
                pending += count
                if pending > n - pos:
                    raise _HeaderProblem("header claims more elements than it has bytes")
                left.append(count)
            while left and not left[-1]:
                left.pop()
    except IndexError:
        raise _HeaderProblem("header is truncated msgpack") from None
    if pos != n:
        raise _HeaderProblem("header is truncated msgpack" if pos > n else "header has bytes after its one msgpack object")


def _header_map(pairs: list[tuple[Any, Any]]) -> dict:
    """msgpack map hook: string keys at every level of the header, each at most once (check 5)."""
    out = {}
    for key, value in pairs:
        if type(key) is not str:
            raise _HeaderProblem("header map keys must be strings (at every level)")
        out[key] = value
    if len(out) != len(pairs):
        raise _HeaderProblem(f"header map has a duplicate key {peer_text(_first_duplicate(pairs), 40)!r}")
    return out


def _first_duplicate(pairs: list[tuple[Any, Any]]) -> str:
    seen = set()
    for key, _ in pairs:
        if key in seen:
            return key
        seen.add(key)
    return ""


def _unpack_header(hv: memoryview) -> Any:
    """Check 5 before anything is built in proportion to what the header claims: bounded lengths, bounded depth
    (``MAX_HEADER_DEPTH``), string keys, no duplicate keys. Raises ``RemoteProtocolError(BAD_HEADER)``.

    Lengths: ``unpackb`` bounds every length a str, bin, ext, array or map may claim by ``len(buf)`` (its
    documented default, "max_xxx_len options are configured automatically from len(packed)"; passing the same
    limits again costs 5% of a small message's decode), and ``len(buf) <= max_header_bytes`` (check 4).
    """
    buf = hv.tobytes()
    try:
        # with at most MAX_HEADER_DEPTH containers the depth cannot exceed it, and msgpack's pre-allocation is at
        # most (containers x len(buf)) slots: the common small header skips the (pure Python) scan
        if len(buf) > MAX_HEADER_DEPTH:
            markers = len(buf.translate(None, _NOT_CONTAINER_MARKERS))  # >= the number of containers
            if markers > MAX_HEADER_DEPTH or markers * len(buf) > _FAST_SLOTS:
                _scan(buf)
        return msgpack.unpackb(buf, raw=False, strict_map_key=False, use_list=True, object_pairs_hook=_header_map)
    except _HeaderProblem as exc:
        raise _fail(ErrorCode.BAD_HEADER, str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - every way a peer's bytes can fail to parse is the same error
        raise _fail(ErrorCode.BAD_HEADER, f"header is not valid msgpack ({type(exc).__name__})") from None


_ABSENT = object()


def _check_descriptors(
    raw: Any, limits: Limits, ref: str
) -> list[tuple[str, np.dtype | None, tuple[int, ...], str, int]]:
    """Check 8 (shape of the ``tensors`` list) and collect (name, dtype or None, shape, wire dtype, element count)."""
    if raw is _ABSENT:
        return []
    if type(raw) is not list:
        raise _fail(ErrorCode.BAD_FIELD, "header 'tensors' must be a list", ref)
    if len(raw) > limits.max_tensors:
        raise _fail(ErrorCode.BAD_FIELD, f"{len(raw)} tensors > max_tensors {limits.max_tensors}", ref)
    out = []
    names = set()
    for i, d in enumerate(raw):
        if type(d) is not dict:
            raise _fail(ErrorCode.BAD_FIELD, f"tensors[{i}] must be a map", ref)
        name, dtype, shape = d.get("name"), d.get("dtype"), d.get("shape")
        if type(name) is not str or not (1 <= len(name) <= MAX_TENSOR_NAME) or name in names:
            raise _fail(ErrorCode.BAD_FIELD, f"tensors[{i}].name must be a unique string of 1-64 chars", ref)
        if type(dtype) is not str:
            raise _fail(ErrorCode.BAD_FIELD, f"tensors[{i}].dtype must be a string", ref)
        if type(shape) is not list or len(shape) > MAX_NDIM:
            raise _fail(ErrorCode.BAD_FIELD, f"tensors[{i}].shape must be a list of at most 8 integers >= 0", ref)
        count = 1
        for dim in shape:  # is_wire_int, inlined: this runs for every tensor of every message
            if type(dim) is not int or not 0 <= dim < MAX_INT:
                raise _fail(ErrorCode.BAD_FIELD, f"tensors[{i}].shape must be a list of at most 8 integers >= 0", ref)
            count *= dim
        names.add(name)
        out.append((name, DTYPES.get(dtype), tuple(shape), dtype, count))
    return out


def decode(frames: Sequence[Any], limits: Limits = DEFAULT_LIMITS) -> Message:
    """Decode one multipart message, applying PROTOCOL.md section 3's checks in order.

    ``frames`` may be bytes, memoryviews or anything with the buffer protocol (e.g. ``zmq.Frame``).
    Raises ``RemoteProtocolError`` and nothing else.
    """
    # 1, 2: frame count bounds
    if len(frames) < 2:
        raise _fail(ErrorCode.BAD_FRAMING, f"a message has at least 2 frames, got {len(frames)}")
    if len(frames) > limits.max_frames:
        raise _fail(ErrorCode.TOO_LARGE, f"{len(frames)} frames > {limits.max_frames} (max_tensors + 2)")
    try:
        views = [memoryview(f).cast("B") for f in frames]
    except TypeError:  # not a buffer, or a multi-dimensional non-contiguous one: only local callers can do that
        raise _fail(ErrorCode.BAD_FRAMING, "frames must be byte buffers") from None
    # 3: signature
    sig = views[0].tobytes() if views[0].nbytes <= 16 else bytes(views[0][:16])
    if sig != SIGNATURE:
        if sig.startswith(SIGNATURE_PREFIX) and 1 <= len(sig) - len(SIGNATURE_PREFIX) <= 3 and sig[4:].isdigit():
            raise _fail(
                ErrorCode.UNSUPPORTED_VERSION,
                f"signature {sig[:16]!r}: this node speaks only {SIGNATURE.decode()} (protocol major version 1)",
            )
        raise _fail(ErrorCode.BAD_SIGNATURE, f"frame 0 must be {SIGNATURE!r}, got {sig[:16]!r}")
    # 4, 5: header size, then msgpack map
    hv = views[1]
    if hv.nbytes > limits.max_header_bytes:
        raise _fail(ErrorCode.TOO_LARGE, f"header is {hv.nbytes} bytes > max_header_bytes {limits.max_header_bytes}")
    header = _unpack_header(hv)
    if type(header) is not dict:
        raise _fail(ErrorCode.BAD_HEADER, "header must be a msgpack map with string keys")
    # 6, 7: type
    mtype = header.get("type")
    if type(mtype) is not str:
        raise _fail(ErrorCode.BAD_FIELD, "header field 'type' must be a string")
    cls = MESSAGE_TYPES.get(mtype)
    if cls is None:
        raise _fail(ErrorCode.UNKNOWN_TYPE, f"unknown message type {mtype[:40]!r}", mtype[:40])
    # 8, 9: tensor descriptors and dtypes
    descriptors = _check_descriptors(header.get("tensors", _ABSENT), limits, mtype)
    for name, dt, _, wire, _ in descriptors:
        if dt is None:
            raise _fail(ErrorCode.BAD_TENSOR, f"tensor {name!r}: dtype {wire[:20]!r} is not allowed", mtype)
    # 10: frame count matches
    if len(frames) != 2 + len(descriptors):
        raise _fail(
            ErrorCode.BAD_FRAMING,
            f"{mtype} declares {len(descriptors)} tensors so it has {2 + len(descriptors)} frames, got {len(frames)}",
            mtype,
        )
    # 11: sizes of every tensor, before anything is built from them. The product of the non-zero dimensions is
    # bounded too, so that a zero-size tensor with absurd other dimensions cannot overflow numpy's shape arithmetic.
    max_bytes = limits.max_tensor_bytes
    for name, dt, shape, _, count in descriptors:
        nbytes = count * dt.itemsize
        if nbytes > max_bytes or (not nbytes and math.prod(d for d in shape if d) * dt.itemsize > max_bytes):
            raise _fail(ErrorCode.TOO_LARGE, f"tensor {name!r} {list(shape)} exceeds {max_bytes} bytes", mtype)
    # 12: each frame holds exactly its tensor, and a bool tensor only the bytes 0 and 1 (numpy reads any other
    # byte as an invalid bool whose arithmetic is undefined)
    for (name, dt, shape, _, count), view in zip(descriptors, views[2:]):
        nbytes = count * dt.itemsize
        if view.nbytes != nbytes:
            raise _fail(
                ErrorCode.BAD_TENSOR,
                f"tensor {name!r} {wire_dtype(dt)}{list(shape)} needs {nbytes} bytes, its frame has {view.nbytes}",
                mtype,
            )
        if dt is _BOOL and nbytes and np.frombuffer(view, np.uint8).max() > 1:
            raise _fail(ErrorCode.BAD_TENSOR, f"bool tensor {name!r} holds bytes other than 0 and 1", mtype)
    # 13: only some types carry tensors
    if descriptors and not cls.CARRIES_TENSORS:
        raise _fail(ErrorCode.BAD_TENSOR, f"{mtype} carries no tensors", mtype)
    # 14: fields
    values: dict[str, Any] = {}
    for fname, (kind, required) in cls.FIELDS.items():
        if fname not in header:
            if required:
                raise _fail(ErrorCode.BAD_FIELD, f"{mtype}.{fname} is missing", mtype)
            continue
        try:
            values[fname] = check_field(kind, header[fname])
        except ValueError as exc:
            raise _fail(ErrorCode.BAD_FIELD, f"{mtype}.{fname} {exc}", mtype) from None
    if cls.CARRIES_TENSORS:
        values["tensors"] = tuple(
            Tensor(name, _view(view, dt, shape)) for (name, dt, shape, _, _), view in zip(descriptors, views[2:])
        )
    return cls(**values)


def _view(view: memoryview, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """A read-only array over the frame; copied only when the frame is misaligned for the dtype."""
    arr = np.frombuffer(view, dtype=dtype).reshape(shape)
    if not arr.flags.aligned:
        arr = arr.copy()
        arr.flags.writeable = False
    return arr
