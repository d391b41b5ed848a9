"""Hypothesis strategies for vfl.protocol: valid messages, arbitrary headers and arbitrary frame lists."""

from __future__ import annotations

import msgpack
import numpy as np
from hypothesis import strategies as st

from vfl.protocol import (
    DTYPES, SIGNATURE, Bye, Echo, EchoReply, Error, Heartbeat, Hello, Relay, SessionConfig, Tensor, Welcome,
)

ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,15}", fullmatch=True)
wire_ints = st.integers(min_value=0, max_value=2**63 - 1)
small_ints = st.integers(min_value=1, max_value=4096)


@st.composite
def session_configs(draw) -> SessionConfig:
    parties = draw(st.lists(ids, min_size=1, max_size=4, unique=True))
    return SessionConfig(
        cut_widths={p: draw(small_ints) for p in parties},
        batch_size=draw(small_ints),
        window=draw(st.integers(1, 16)),
        model=draw(st.text(min_size=1, max_size=20)),
    )


@st.composite
def tensors(draw, max_elems: int = 64) -> Tensor:
    name = draw(st.sampled_from(list(DTYPES)))
    dtype = DTYPES[name]
    shape = tuple(draw(st.lists(st.integers(0, 4), min_size=0, max_size=3)))
    n = int(np.prod(shape)) if shape else 1
    raw = draw(st.binary(min_size=n * dtype.itemsize, max_size=n * dtype.itemsize))
    arr = np.frombuffer(raw, dtype=np.uint8).view(dtype).reshape(shape) if n else np.zeros(shape, dtype)
    if dtype == np.dtype("?"):  # a sender sends bool tensors as the bytes 0 and 1 (check 12)
        arr = arr.view(np.uint8) != 0
    return Tensor(draw(st.text(min_size=1, max_size=8)), arr)


tensor_tuples = st.lists(tensors(), max_size=3, unique_by=lambda t: t.name).map(tuple)


@st.composite
def hellos(draw) -> Hello:
    cfg = draw(session_configs())
    return Hello(
        version=(1, draw(st.integers(0, 5))),
        role="data_holder",
        party=draw(st.sampled_from(sorted(cfg.cut_widths))),
        run=draw(ids),
        config=cfg.to_wire(),
        digest=cfg.digest,
    )


messages = st.one_of(
    hellos(),
    st.builds(
        Welcome,
        version=st.tuples(st.just(1), st.integers(0, 5)),
        party=ids,
        run=ids,
        digest=st.text(max_size=64),
        heartbeat_ms=wire_ints,
        peer_timeout_ms=wire_ints,
        data_holders=st.lists(ids, max_size=4).map(tuple),
    ),
    st.builds(
        Error,
        code=wire_ints,
        message=st.text(max_size=40),
        ref=st.none() | st.text(max_size=10),
        diff=st.none() | st.dictionaries(st.text(max_size=5), st.lists(st.integers(0, 9), max_size=2), max_size=3),
    ),
    st.builds(Heartbeat),
    st.builds(Echo, seq=wire_ints, tensors=tensor_tuples),
    st.builds(EchoReply, seq=wire_ints, tensors=tensor_tuples),
    st.builds(Bye, ok=st.booleans(), reason=st.text(max_size=40)),
    # v1.10: the codec checks RELAY like any message; what its tensors must hold is vfl.protocol.relay's to check
    st.builds(Relay, party=ids, conn=st.text(max_size=24), seq=wire_ints, mac=st.text(max_size=64),
              tensors=tensor_tuples),
)

# msgpack-able values of every kind, nested
msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)

type_names = st.sampled_from(["HELLO", "WELCOME", "ERROR", "HEARTBEAT", "ECHO", "ECHO_REPLY", "BYE", "FORWARD", ""])


@st.composite
def hostile_headers(draw) -> dict:
    """Header maps that look plausible: a known or unknown type, some right and some wrong fields, maybe tensors."""
    header = draw(st.dictionaries(st.text(max_size=10), msgpack_values, max_size=6))
    if draw(st.booleans()):
        header["type"] = draw(type_names | msgpack_values)
    if draw(st.booleans()):
        header["tensors"] = draw(
            st.lists(
                st.fixed_dictionaries(
                    {
                        "name": st.text(max_size=4) | msgpack_values,
                        "dtype": st.sampled_from([*DTYPES, "complex64", ">f4"]) | msgpack_values,
                        "shape": st.lists(st.integers(-2, 2**40), max_size=9) | msgpack_values,
                    }
                ),
                max_size=3,
            )
            | msgpack_values
        )
    for field in ("seq", "ok", "reason", "code", "message", "version", "party", "run", "config", "digest"):
        if draw(st.booleans()):
            header[field] = draw(msgpack_values)
    return header


@st.composite
def hostile_frames(draw) -> list[bytes]:
    """A signature (mostly right), a header (mostly msgpack), and up to 4 tensor frames of any length."""
    sig = draw(st.sampled_from([SIGNATURE, SIGNATURE, SIGNATURE, b"VFL/2", b"", b"HTTP/1.1"]) | st.binary(max_size=8))
    if draw(st.integers(0, 9)) == 0:
        header = draw(st.binary(max_size=64))
    else:
        header = msgpack.packb(draw(hostile_headers()), use_bin_type=True)
    rest = draw(st.lists(st.binary(max_size=64), max_size=4))
    frames = [sig, header, *rest]
    return frames[: draw(st.integers(0, len(frames)))] if draw(st.integers(0, 9)) == 0 else frames
