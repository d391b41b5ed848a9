"""Envelope codec: messages <-> lists of frames (PROTOCOL.md sections 3 and 7).

``decode`` runs the checks of section 3 in order and raises ``RemoteProtocolError`` with the code of the first one
that fails — and nothing else, whatever the frames hold (a hypothesis test holds us to that). Tensor frames are
never copied when they are aligned: the arrays are read-only views into the received buffers, so a 16 MiB
activation costs no allocation here. ``encode`` hands out the arrays' own buffers for zero-copy sends.
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

SIGNATURE = b"VFL/1"
SIGNATURE_PREFIX = b"VFL/"
PROTOCOL_VERSION = (1, 2)
MAX_NDIM = 8
MAX_TENSOR_NAME = 64

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
_WIRE_NAME = {dt: name for name, dt in DTYPES.items()}


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


def peek_type(frames: Sequence[Any]) -> str | None:
    """The header's ``type`` if it can be read at all, else None. Used to honour [M2] on undecodable ERRORs."""
    try:
        header = msgpack.unpackb(memoryview(frames[1]), raw=False, strict_map_key=False)
    except Exception:  # noqa: BLE001 - anything unreadable simply has no type
        return None
    value = header.get("type") if type(header) is dict else None
    return value if type(value) is str else None


_ABSENT = object()


def _string_keys(pairs: list[tuple[Any, Any]]) -> dict:
    """msgpack map hook: string keys at every level of the header (check 5)."""
    out = {}
    for key, value in pairs:
        if type(key) is not str:
            raise ValueError("map key is not a string")
        out[key] = value
    return out


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
    try:
        header = msgpack.unpackb(hv, raw=False, strict_map_key=False, use_list=True, object_pairs_hook=_string_keys)
    except Exception as exc:  # noqa: BLE001 - every way a peer's bytes can fail to parse is the same error
        raise _fail(ErrorCode.BAD_HEADER, f"header is not valid msgpack ({type(exc).__name__})") from None
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
    # 12: each frame holds exactly its tensor
    for (name, dt, shape, _, count), view in zip(descriptors, views[2:]):
        nbytes = count * dt.itemsize
        if view.nbytes != nbytes:
            raise _fail(
                ErrorCode.BAD_TENSOR,
                f"tensor {name!r} {wire_dtype(dt)}{list(shape)} needs {nbytes} bytes, its frame has {view.nbytes}",
                mtype,
            )
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
