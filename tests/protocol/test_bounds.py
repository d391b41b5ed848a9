"""Bounded decoding (issue 12, findings 3 and 4): every rule that bounds what a peer's header may cost.

One test per rule, named after it: the header's nesting depth and duplicate keys (section 3 check 5), the lengths a
header may claim, the bounded type peek ([M2] after a failed decode, [E2]), bool tensor bytes (check 12), and the
depth and size limits of the session config canonicaliser and of the diff (section 6). Memory is measured with
tracemalloc (msgpack allocates through Python's allocator), never with a clock.
"""

from __future__ import annotations

import struct
import tracemalloc

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vfl.protocol import (
    SIGNATURE,
    Bye,
    Echo,
    Error,
    ErrorCode,
    RemoteProtocolError,
    Tensor,
    config_diff,
    decode,
    describe_diff,
    digest_of,
    encode,
)
from vfl.protocol import codec
from vfl.protocol.codec import MAX_HEADER_DEPTH, PEEK_BYTES, peek_type

from ..fuzz_budget import examples
from .strategies import msgpack_values

FUZZ = settings(max_examples=examples(1500), deadline=None, suppress_health_check=list(HealthCheck))
MiB = 2**20


def code_of(header: bytes, *tensor_frames: bytes) -> ErrorCode:
    with pytest.raises(RemoteProtocolError) as info:
        decode([SIGNATURE, header, *tensor_frames])
    return info.value.code


def nest(depth: int, kinds: str = "l") -> object:
    """A value that is ``depth`` containers deep, cycling through ``kinds`` ('l' list, 'm' map) from the inside."""
    value: object = 0
    for i in range(depth):
        value = [value] if kinds[i % len(kinds)] == "l" else {"k": value}
    return value


def bye_with(extra: object, **more: object) -> bytes:
    """A valid BYE header with one more (unknown, so ignored by [E3]) key holding ``extra``."""
    return msgpack.packb({"type": "BYE", "ok": True, "reason": "r", "x": extra, **more}, use_bin_type=True)


def peak_bytes(fn, *args) -> tuple[object, int]:
    """``fn(*args)`` and the peak of Python-allocator memory it took (the arguments are allocated before)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        try:
            result: object = fn(*args)
        except RemoteProtocolError as exc:
            result = exc
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


#: many small containers beside the deep value: the header then takes the structural scan instead of the fast path
SCAN_PATH = {"pad": [[] for _ in range(40)]}


# --------------------------------------------------------------------------------------------- check 5: depth


@pytest.mark.parametrize("path", [{}, SCAN_PATH], ids=["fast_path", "scan_path"])
@pytest.mark.parametrize("kinds", ["l", "m", "lm"])
def test_check5_header_nested_deeper_than_32_levels_is_BAD_HEADER(kinds, path):
    # the header map is level 1, so its value "x" may be 31 containers deep and no deeper
    assert decode([SIGNATURE, bye_with(nest(MAX_HEADER_DEPTH - 1, kinds), **path)]) == Bye(ok=True, reason="r")
    assert code_of(bye_with(nest(MAX_HEADER_DEPTH, kinds), **path)) is ErrorCode.BAD_HEADER


@pytest.mark.parametrize("depth", [33, 500, 1000, 1023, 1024, 5000])
def test_check5_nesting_far_beyond_the_limit_is_BAD_HEADER_without_recursion(depth):
    # hand-built: one fixarray byte per level, so even 5000 levels fit in one small header
    header = b"\x81\xa1x" + b"\x91" * depth + b"\x00"
    assert code_of(header) is ErrorCode.BAD_HEADER


@given(depth=st.integers(0, 80), kinds=st.text("lm", min_size=1, max_size=4), pad=st.integers(0, 40))
@FUZZ
def test_check5_depth_rule_holds_for_any_nesting(depth, kinds, pad):
    header = bye_with(nest(depth, kinds), pad=[[] for _ in range(pad)])
    if 1 + depth > MAX_HEADER_DEPTH:
        assert code_of(header) is ErrorCode.BAD_HEADER
    else:
        assert decode([SIGNATURE, header]) == Bye(ok=True, reason="r")


# --------------------------------------------------------------------------------------------- check 5: duplicates


def _map(*pairs: tuple[object, object]) -> bytes:
    """A msgpack map written pair by pair, so that it can hold a key twice (``packb`` of a dict cannot)."""
    assert len(pairs) < 16
    return bytes([0x80 | len(pairs)]) + b"".join(msgpack.packb(k) + v for k, v in pairs)


def test_check5_duplicate_key_in_the_header_map_is_BAD_HEADER():
    header = _map(("type", msgpack.packb("BYE")), ("ok", msgpack.packb(True)), ("reason", msgpack.packb("r")),
                  ("ok", msgpack.packb(False)))
    assert code_of(header) is ErrorCode.BAD_HEADER
    # the same pairs without the repetition are a valid BYE
    assert decode([SIGNATURE, _map(("type", msgpack.packb("BYE")), ("ok", msgpack.packb(True)),
                                   ("reason", msgpack.packb("r")))]) == Bye(ok=True, reason="r")


def test_check5_duplicate_key_in_a_nested_map_is_BAD_HEADER():
    descriptor = _map(("name", msgpack.packb("x")), ("dtype", msgpack.packb("uint8")),
                      ("shape", msgpack.packb([1])), ("dtype", msgpack.packb("int8")))
    header = _map(("type", msgpack.packb("ECHO")), ("seq", msgpack.packb(0)), ("tensors", b"\x91" + descriptor))
    assert code_of(header, b"\x00") is ErrorCode.BAD_HEADER
    config = _map(("batch_size", msgpack.packb(1)), ("batch_size", msgpack.packb(2)))
    assert code_of(_map(("type", msgpack.packb("BYE")), ("ok", msgpack.packb(True)), ("reason", msgpack.packb("r")),
                        ("x", b"\x91\x91" + config))) is ErrorCode.BAD_HEADER


@given(header=st.dictionaries(st.text(max_size=6), msgpack_values, min_size=1, max_size=6), data=st.data())
@FUZZ
def test_check5_duplicate_key_rule_holds_at_any_level(header, data):
    """Repeat one key of a random map at a random depth: whatever else the header holds, it is BAD_HEADER."""
    key = data.draw(st.sampled_from(sorted(header)))
    dup = _map(*((k, msgpack.packb(v, use_bin_type=True)) for k, v in header.items()),
               (key, msgpack.packb(data.draw(msgpack_values), use_bin_type=True)))
    depth = data.draw(st.integers(0, 5))
    assert code_of(_map(("type", msgpack.packb("BYE")), ("x", b"\x91" * depth + dup))) is ErrorCode.BAD_HEADER


# --------------------------------------------------------------------------------------------- check 5: claimed sizes


def _claims(marker: bytes, count: int, depth: int, size: int) -> bytes:
    """``depth`` nested containers each claiming ``count`` elements, padded with zeros to ``size`` bytes."""
    body = (marker + struct.pack(">I", count)) * depth
    return body + b"\x00" * (size - len(body))


@pytest.mark.parametrize(
    "header",
    [
        _claims(b"\xdd", 65536, 1000, 65536),  # arrays: msgpack pre-allocates each claimed list
        _claims(b"\xdf", 32768, 1000, 65536),  # maps: the pairs hook makes msgpack pre-allocate them too
        _claims(b"\xdd", 2**32 - 1, 1, 64),
        b"\x81\xa1x\xdb" + struct.pack(">I", 2**31) + b"abc",  # a str claiming 2 GiB
        b"\x81\xa1x\xc6" + struct.pack(">I", 2**31) + b"abc",  # bin
        b"\x81\xa1x\xc9" + struct.pack(">I", 2**31) + b"\x01abc",  # ext
    ],
    ids=["nested_array_claims", "nested_map_claims", "array_claims_4g", "str_2g", "bin_2g", "ext_2g"],
)
def test_check5_lengths_a_header_claims_are_bounded_by_its_size_before_anything_is_built(header):
    result, peak = peak_bytes(decode, [SIGNATURE, header])
    assert isinstance(result, RemoteProtocolError) and result.code is ErrorCode.BAD_HEADER
    assert peak < 2 * MiB, f"decoding a {len(header)} byte header took {peak / MiB:.1f} MiB"


def test_check5_the_fast_path_pre_allocates_a_bounded_amount():
    """Headers with few containers skip the scan; the most msgpack can then pre-allocate is _FAST_SLOTS slots."""
    depth = codec._FAST_SLOTS // 65536  # nested arrays, each claiming the whole 64 KiB header
    header = _claims(b"\xdd", 65536, depth, 65536)
    result, peak = peak_bytes(decode, [SIGNATURE, header])
    assert isinstance(result, RemoteProtocolError) and result.code is ErrorCode.BAD_HEADER
    assert peak < 8 * codec._FAST_SLOTS + 1 * MiB, f"{peak / MiB:.1f} MiB"


def test_check5_worst_valid_header_costs_a_bounded_multiple_of_its_size():
    """The largest allocation a valid header can cause: 64 KiB of empty maps in one array (~70 bytes each)."""
    fixed = len(msgpack.packb({"type": "BYE", "ok": True, "reason": "", "x": [{}] * 65536})) - 65536
    header = msgpack.packb({"type": "BYE", "ok": True, "reason": "", "x": [{}] * (65536 - fixed)})
    assert 65_000 < len(header) <= 65_536
    result, peak = peak_bytes(decode, [SIGNATURE, header])
    assert result == Bye(ok=True, reason="")
    assert peak < 8 * MiB, f"{peak / MiB:.1f} MiB"


packed_headers = msgpack_values.map(lambda v: msgpack.packb(v, use_bin_type=True))


@st.composite
def mutated(draw, base) -> bytes:
    buf = bytearray(draw(base))
    for _ in range(draw(st.integers(0, 3))):
        if buf:
            buf[draw(st.integers(0, len(buf) - 1))] = draw(st.integers(0, 255))
    return bytes(buf)


@given(st.binary(max_size=300) | mutated(packed_headers) | mutated(st.builds(bye_with, msgpack_values)))
@FUZZ
def test_check5_the_fast_path_and_the_structural_scan_agree(header):
    """Small headers with few containers skip the scan; forcing the scan on them changes no outcome."""

    def outcome(fast_slots: int) -> object:
        old = codec._FAST_SLOTS
        codec._FAST_SLOTS = fast_slots
        try:
            return repr(codec._unpack_header(memoryview(header)))  # repr: NaN != NaN
        except RemoteProtocolError as exc:
            return exc.code
        finally:
            codec._FAST_SLOTS = old

    assert outcome(0) == outcome(1 << 30)


# --------------------------------------------------------------------------------------------- [M2]: the type peek


def test_M2_type_peek_reads_only_a_bounded_prefix_of_an_8_MB_header():
    """Finding 4: the peek after a failed decode unpacked the whole frame (8 MB cost 565 MB)."""
    n = 8_000_000
    frame = b"\x82" + msgpack.packb("type") + msgpack.packb("ERROR") + msgpack.packb("pad") + b"\xdd" + \
        struct.pack(">I", n) + b"\x80" * n
    assert code_of(frame) is ErrorCode.TOO_LARGE
    mtype, peak = peak_bytes(peek_type, [SIGNATURE, frame])
    assert mtype == "ERROR"
    assert peak < 64 * 1024, f"peeking at an {len(frame)} byte frame took {peak} bytes"


def test_M2_type_peek_finds_the_type_after_other_keys_and_not_beyond_the_prefix():
    early = msgpack.packb({"seq": [1, {"a": "b"}], "tensors": [{"name": "x"}], "type": "ERROR", "pad": "x" * 9000})
    assert peek_type([SIGNATURE, early]) == "ERROR"
    late = msgpack.packb({"pad": "x" * PEEK_BYTES, "type": "ERROR"})
    assert peek_type([SIGNATURE, late]) is None


@pytest.mark.parametrize(
    "frames",
    [[], [SIGNATURE], [SIGNATURE, b""], [SIGNATURE, b"\x93\x01\x02\x03"], [SIGNATURE, b"\x81\x01\xa5ERROR"],
     [SIGNATURE, b"\x81\xa4type\x05"], [SIGNATURE, b"\x81\xa4type\xa5ERR"], [SIGNATURE, "not a buffer"]],
    ids=["no_frames", "no_header", "empty", "array", "int_key", "int_type", "cut_type", "not_a_buffer"],
)
def test_M2_type_peek_of_an_unreadable_header_is_None(frames):
    assert peek_type(frames) is None


@given(st.binary(max_size=200) | msgpack_values.map(lambda v: msgpack.packb(v, use_bin_type=True)))
@FUZZ
def test_M2_type_peek_never_raises(header):
    result = peek_type([SIGNATURE, header])
    assert result is None or type(result) is str


# --------------------------------------------------------------------------------------------- check 12: bool bytes


@pytest.mark.parametrize("byte", [2, 0x7F, 0xFF])
def test_check12_bool_tensor_bytes_other_than_0_or_1_are_BAD_TENSOR(byte):
    header = msgpack.packb({"type": "ECHO", "seq": 0, "tensors": [{"name": "b", "dtype": "bool", "shape": [3]}]})
    assert code_of(header, bytes([0, 1, byte])) is ErrorCode.BAD_TENSOR
    back = decode([SIGNATURE, header, b"\x00\x01\x01"])
    np.testing.assert_array_equal(back.tensors[0].array, [False, True, True])


def test_check12_a_sender_sends_bool_tensors_as_the_bytes_0_and_1():
    forged = np.frombuffer(b"\x00\x02\x01\xff", np.uint8).view(np.bool_)  # a bool view of raw bytes
    frames = encode(Echo(seq=0, tensors=(Tensor("b", forged),)))
    assert bytes(memoryview(frames[2]).cast("B")) == b"\x00\x01\x01\x01"
    np.testing.assert_array_equal(decode(frames).tensors[0].array, [False, True, True, True])


# --------------------------------------------------------------------------------------------- section 6: config


def test_H3_a_session_config_nested_1000_deep_is_BAD_FIELD_not_RecursionError():
    """Finding 3: a 3 KB HELLO whose config nested 1,000 deep raised RecursionError in the canonicaliser."""
    with pytest.raises(RemoteProtocolError) as info:
        digest_of({"cut_widths": {"dh1": 1}, "x": nest(1000, "lm")})
    assert info.value.code is ErrorCode.BAD_FIELD and "deeper than 32" in info.value.detail
    # the codec refuses such a HELLO before the canonicaliser sees it
    hello = {"type": "HELLO", "version": [1, 2], "role": "data_holder", "party": "dh1", "run": "r",
             "config": {"cut_widths": {"dh1": 1}, "x": nest(1000, "m")}, "digest": "0" * 64}
    assert code_of(msgpack.packb(hello)) is ErrorCode.BAD_HEADER


def test_H4_config_diff_walks_any_depth_without_recursion():
    deep = {"x": nest(5000, "m")}
    diff = config_diff({"x": 1}, deep)
    assert diff["x"] == [1, "<missing>"]
    (deep_path,) = set(diff) - {"x"}
    assert deep_path.startswith("x.k.k.k") and diff[deep_path] == ["<missing>", 0]


def test_H4_config_diff_of_a_hostile_config_fits_in_one_ERROR():
    """A peer's config may carry unknown keys ([E3]) with long values; the ERROR that lists them must stay sendable."""
    ours = {"cut_widths": {"dh1": 4}, "batch_size": 32, "window": 2, "model": "m"}
    theirs = {**ours, "junk": "x" * 60_000, "deep": nest(30, "l"), "k" * 5000: 1,
              **{f"extra{i}": i for i in range(5000)}}
    diff = config_diff(ours, theirs)
    assert "(more)" in diff
    err = Error(code=int(ErrorCode.CONFIG_MISMATCH), message="config differs: " + describe_diff(diff), diff=diff)
    assert len(encode(err)[1]) < 65_536 // 2


def test_H4_honest_config_diff_is_unchanged():
    ours = {"cut_widths": {"dh1": 4, "dh2": 8}, "batch_size": 32, "window": 2, "model": "m"}
    theirs = {"cut_widths": {"dh1": 4, "dh3": 8}, "batch_size": 64, "window": 2, "model": "m", "psi": True}
    assert config_diff(ours, theirs) == {
        "batch_size": [32, 64],
        "cut_widths.dh2": [8, "<missing>"],
        "cut_widths.dh3": ["<missing>", 8],
        "psi": ["<missing>", True],
    }
