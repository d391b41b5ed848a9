"""Wire precision of the cut-layer tensors (PROTOCOL.md §6 and §11, version 1.6), sans-I/O and numpy only.

The models compute in float32 everywhere; only the wire changes. A sender encodes the float32 activations of a
FORWARD / EVAL_FORWARD, or the float32 gradient of a BACKWARD, right before the message is built (``encode``); the
receiver checks and decodes them back to float32 right after it arrives (``decode``). Which precision each direction
uses is in the session config, so in its digest: both ends always agree, and a peer that does not know the fields
gets ``CONFIG_MISMATCH`` instead of misreading the bytes.

The encodings, exactly (``x`` is a float32 matrix ``[rows, width]``):

- ``float32``: ``x`` itself, dtype ``float32`` (4 bytes a value). Exact.
- ``float16``: IEEE binary16, rounded to nearest even (numpy's ``astype``), dtype ``float16``. Relative error at most
  2^-11 for ``2^-14 <= |x| <= 65504``, absolute at most 2^-25 below; ``|x| >= 65520`` does not fit (refused).
- ``bfloat16``: the upper 16 bits of each float32 after rounding to nearest even on the 16 dropped bits, carried under
  the wire dtype ``bfloat16`` (2 bytes, little-endian ``uint16`` bit patterns; decoded by shifting back 16 bits).
  Relative error at most 2^-8 for normal values (``|x| >= 2^-126``), absolute at most 2^-134 below; a value that
  rounds past the largest bfloat16 (``|x| >= 2^128 - 2^119``, about 3.3961e38) does not fit (refused).
- ``int8``: per-row symmetric scale. ``m[i] = max_j |x[i, j]|``; ``scale[i] = float32(m[i] / 127)`` (computed in
  float64, rounded once), then moved one float32 step up if ``m[i] / scale[i] > 127`` (only when the division
  rounded down, e.g. ``m[i]`` tiny so ``scale[i]`` is subnormal or 0), and one step down if
  ``float32(127) * scale[i]`` overflows float32; an all-zero row has ``scale[i] = 0``. ``q[i, j] =
  round_half_even(x[i, j] / scale[i])`` in float64 (0 where ``scale[i] = 0``), clipped to [-127, 127], dtype
  ``int8``; sent as the tensor ``<name>`` and ``scale`` as ``<name>_scale`` float32 ``[rows]`` in the same message.
  Decoded as ``float32(q) * scale[i]`` in float32 arithmetic. Error per element at most ``scale[i] / 2`` plus the
  float32 rounding of that product (relative 2^-24).

Which dtype a tensor travels as names its encoding, so the receiver's check is one comparison with the session's
precision: a ``uint16`` tensor could hold anything, a ``bfloat16`` one can only be bfloat16 bit patterns, and a node of
1.5 refuses the unknown dtype (``BAD_TENSOR``, §3 check 9) instead of reading it as integers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from ..errors import VflError
from .codec import BFLOAT16
from .errors import ErrorCode, RemoteProtocolError
from .messages import Message, Tensor

#: the wire precisions of PROTOCOL.md §6, default first (absent from the session config means float32)
PRECISIONS = ("float32", "float16", "bfloat16", "int8")
DEFAULT_PRECISION = "float32"
#: name suffix of the int8 scale tensor: ``activations`` + ``activations_scale``, ``gradient`` + ``gradient_scale``
SCALE_SUFFIX = "_scale"
INT8_MAX = 127

_F32 = np.dtype("<f4")
_F16 = np.dtype("<f2")
_I8 = np.dtype("i1")
_BF16_EXP = 0x7F80  # exponent bits of a bfloat16: all ones is infinity or NaN


class PrecisionError(VflError):
    """This party's own cut-layer tensor cannot be sent in the session's precision: non-finite values, or values
    beyond the precision's range. Raised at the sender, before anything is sent; it ends the session."""


@dataclass(frozen=True)
class CutPrecision:
    """The wire precision of each direction of the cut layer: activations (FORWARD, EVAL_FORWARD) and gradients
    (BACKWARD)."""

    activations: str = DEFAULT_PRECISION
    gradients: str = DEFAULT_PRECISION

    def __post_init__(self) -> None:
        for field, value in (("activation_precision", self.activations), ("gradient_precision", self.gradients)):
            if value not in PRECISIONS:
                raise ValueError(f"{field} must be one of {', '.join(PRECISIONS)}, got {value!r}")

    def describe(self) -> str:
        """For the log line every node writes once: ``activations int8, gradients bfloat16``."""
        return f"activations {self.activations}, gradients {self.gradients}"


def wire_bytes(precision: str, rows: int, width: int) -> int:
    """Bytes of the tensor frames of one ``[rows, width]`` cut-layer tensor in ``precision`` (headers not counted)."""
    if precision == "int8":
        return rows * width + 4 * rows
    return rows * width * (4 if precision == "float32" else 2)


# ------------------------------------------------------------------------------------------------------ encode


def bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> the uint16 bit patterns of bfloat16, rounding to nearest even. ``x`` must be finite (an infinity
    stays one, but a NaN's payload could round into an infinity: the sender refuses non-finite input first)."""
    bits = np.ascontiguousarray(x, dtype=_F32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    return rounded.astype(np.uint16)


def bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    """The bit patterns of bfloat16 (uint16 or the wire's ``BFLOAT16``) -> float32, exactly."""
    u16 = np.ascontiguousarray(bits).view(np.uint16)
    return (u16.astype(np.uint32) << np.uint32(16)).view(_F32)


def int8_quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 [rows, width] (finite) -> (q int8 [rows, width], scale float32 [rows]); the module docstring says how."""
    x32 = np.asarray(x, dtype=_F32)
    rows = x32.shape[0]
    m = np.abs(x32).max(axis=1) if x32.size else np.zeros(rows, _F32)
    m64 = m.astype(np.float64)
    scale = (m64 / INT8_MAX).astype(_F32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        low = (m > 0) & ~(m64 / scale.astype(np.float64) <= INT8_MAX)  # the one rounding went down (or to 0)
        scale = np.where(low, np.nextafter(scale, np.float32(np.inf)), scale)
        high = ~np.isfinite(np.float32(INT8_MAX) * scale)  # 127 * scale would decode to infinity
        scale = np.where(high, np.nextafter(scale, np.float32(0)), scale).astype(_F32)
        s64 = scale.astype(np.float64)[:, None]
        q = np.where(s64 > 0, np.rint(x32.astype(np.float64) / np.where(s64 > 0, s64, 1.0)), 0.0)
    return np.clip(q, -INT8_MAX, INT8_MAX).astype(_I8), scale


def int8_dequantize(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``float32(q) * scale[row]`` in float32 arithmetic (what every receiver computes)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return q.astype(_F32) * np.asarray(scale, dtype=_F32)[:, None]


def encode(name: str, x: np.ndarray, precision: str, what: str) -> tuple[Tensor, ...]:
    """The tensors that carry the float32 matrix ``x`` as ``name`` in ``precision``.

    ``what`` says which message and party this is for the error (``FORWARD step 12 of dh1``). Raises
    ``PrecisionError`` for non-finite input or values beyond the precision's range: a node never sends garbage, and
    its peer would refuse it anyway ([X6])."""
    x32 = np.asarray(x, dtype=_F32)
    finite = np.isfinite(x32)
    if not finite.all():
        bad = int(x32.size - np.count_nonzero(finite))
        raise PrecisionError(
            f"{what}: the {name} hold NaN or infinity ({bad} of {x32.size} values); nothing was sent. The model "
            "diverged: lower the learning rate ([train.optimizer].lr) or standardise the features ([data].standardize)"
        )
    if precision == "float32":
        return (Tensor(name, x32),)
    if precision == "float16":
        with np.errstate(over="ignore"):
            h = x32.astype(_F16)
        if not np.isfinite(h).all():
            raise PrecisionError(
                f"{what}: the {name} exceed float16's range (|x| up to {float(np.abs(x32).max()):.4g}, float16 "
                "holds at most 65504); nothing was sent. Use bfloat16 or float32 for "
                f"[session].{'activation' if name == 'activations' else 'gradient'}_precision at every party"
            )
        return (Tensor(name, h),)
    if precision == "bfloat16":
        bits = bfloat16_bits(x32)
        if ((bits & _BF16_EXP) == _BF16_EXP).any():
            raise PrecisionError(
                f"{what}: the {name} exceed bfloat16's range (|x| up to {float(np.abs(x32).max()):.4g}, about 3.39e38 "
                "at most); nothing was sent. The model diverged: lower the learning rate ([train.optimizer].lr)"
            )
        return (Tensor(name, bits.view(BFLOAT16)),)
    if precision == "int8":
        if x32.ndim != 2:
            raise PrecisionError(f"{what}: int8 needs a [rows, width] matrix of {name}, got shape {list(x32.shape)}")
        q, scale = int8_quantize(x32)
        return (Tensor(name, q), Tensor(name + SCALE_SUFFIX, scale))
    raise PrecisionError(f"{what}: unknown precision {precision!r} (one of {', '.join(PRECISIONS)})")


def as_received(x: np.ndarray, precision: str) -> np.ndarray:
    """What a receiver decodes from ``encode(x)`` (float32), for a sender that must know exactly what it sent (the
    label holder's leakage audit). Encoding it again sends the same values (int8: the same ``q``; its scale may move
    by one float32 step). Values ``encode`` would refuse come back non-finite; ``encode`` still refuses them."""
    x32 = np.asarray(x, dtype=_F32)
    with np.errstate(over="ignore", invalid="ignore"):
        if precision == "float16":
            return x32.astype(_F16).astype(_F32)
        if precision == "bfloat16":
            return bfloat16_to_float32(bfloat16_bits(x32))
        if precision == "int8" and x32.ndim == 2 and np.isfinite(x32).all():
            return int8_dequantize(*int8_quantize(x32))
    return x32


# ------------------------------------------------------------------------------------------------------ decode


def _bad(msg: Message, detail: str) -> RemoteProtocolError:
    return RemoteProtocolError(ErrorCode.BAD_TENSOR, f"{msg.TYPE}.{detail}", ref=msg.TYPE)


def _got(arr: np.ndarray | None) -> str:
    if arr is None:
        return "none"
    dtype = "bfloat16" if arr.dtype == BFLOAT16 else str(arr.dtype)
    return f"{dtype}{list(arr.shape)}"


_WIRE = {"float32": _F32, "float16": _F16, "bfloat16": BFLOAT16, "int8": _I8}


def decode(msg: Message, name: str, rows: int, width: int, precision: str) -> np.ndarray:
    """[X6]: the cut-layer tensor ``name`` of ``msg`` as float32 ``[rows, width]``, after checking it is exactly what
    ``precision`` sends: the dtype, the shapes ``[rows, width]`` (and ``[rows]`` for the int8 scale), finite and
    non-negative scales, finite decoded values. Anything else is ``RemoteProtocolError(BAD_TENSOR)``.

    float32 comes back as the read-only view of the received frame (no copy), as before version 1.6."""
    tensors: Mapping[str, np.ndarray] = {t.name: t.array for t in msg.tensor_list}
    arr = tensors.get(name)
    want = _WIRE[precision]
    if arr is None or arr.dtype != want or arr.shape != (rows, width):
        extra = f" and {name + SCALE_SUFFIX!r} float32 [{rows}]" if precision == "int8" else ""
        raise RemoteProtocolError(
            ErrorCode.BAD_TENSOR,
            f"{msg.TYPE} needs {name!r} {precision} [{rows}, {width}]{extra}, got {_got(arr)}",
            ref=msg.TYPE,
        )
    if precision == "float32":
        out = arr
    elif precision == "float16":
        out = arr.astype(_F32)
    elif precision == "bfloat16":
        if arr.size and ((arr.view(np.uint16) & _BF16_EXP) == _BF16_EXP).any():
            raise _bad(msg, f"{name} holds NaN or infinity")
        return bfloat16_to_float32(arr)
    else:
        scale = tensors.get(name + SCALE_SUFFIX)
        if scale is None or scale.dtype != _F32 or scale.shape != (rows,):
            raise _bad(msg, f"{name + SCALE_SUFFIX} must be float32 [{rows}] (int8 precision), got {_got(scale)}")
        if not (np.isfinite(scale) & (scale >= 0)).all():
            raise _bad(msg, f"{name + SCALE_SUFFIX} holds a negative, NaN or infinite scale")
        if arr.size and int(arr.min()) < -INT8_MAX:
            raise _bad(msg, f"{name} holds -128 (int8 values are clipped to [-127, 127])")
        out = int8_dequantize(arr, scale)
    if not np.isfinite(out).all():
        raise _bad(msg, f"{name} holds NaN or infinity" + (" once decoded" if precision == "int8" else ""))
    return out
