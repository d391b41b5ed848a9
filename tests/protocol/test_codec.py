"""The envelope of PROTOCOL.md section 3: one test per check, round trips, zero-copy, and fuzzing of ``decode``."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vfl.protocol import (
    DEFAULT_LIMITS,
    SIGNATURE,
    Bye,
    Echo,
    ErrorCode,
    Heartbeat,
    Limits,
    LocalProtocolError,
    RemoteProtocolError,
    Tensor,
    decode,
    encode,
)

from ..fuzz_budget import examples
from .strategies import hostile_frames, hostile_headers, messages

FUZZ = settings(max_examples=examples(3000), deadline=None, suppress_health_check=list(HealthCheck))


def frames_of(header: dict, *tensor_frames: bytes, sig: bytes = SIGNATURE) -> list[bytes]:
    return [sig, msgpack.packb(header, use_bin_type=True), *tensor_frames]


def code_of(frames, limits: Limits = DEFAULT_LIMITS) -> ErrorCode:
    with pytest.raises(RemoteProtocolError) as info:
        decode(frames, limits)
    return info.value.code


ECHO_1 = {"type": "ECHO", "seq": 1, "tensors": [{"name": "x", "dtype": "float32", "shape": [2, 3]}]}


# --------------------------------------------------------------------------------------------- the ordered checks


def test_check1_fewer_than_two_frames_is_BAD_FRAMING():
    assert code_of([]) is ErrorCode.BAD_FRAMING
    assert code_of([SIGNATURE]) is ErrorCode.BAD_FRAMING


def test_check2_more_than_max_tensors_plus_two_frames_is_TOO_LARGE():
    frames = frames_of({"type": "HEARTBEAT"}) + [b""] * (DEFAULT_LIMITS.max_tensors + 1)
    assert code_of(frames) is ErrorCode.TOO_LARGE


def test_check3_other_major_version_is_UNSUPPORTED_VERSION():
    assert code_of(frames_of({"type": "HEARTBEAT"}, sig=b"VFL/2")) is ErrorCode.UNSUPPORTED_VERSION


@pytest.mark.parametrize("sig", [b"", b"VFL1", b"vfl/1", b"VFL/1 ", b"\x00" * 5, b"GET / HTTP/1.1"])
def test_check3_anything_else_is_BAD_SIGNATURE(sig):
    assert code_of(frames_of({"type": "HEARTBEAT"}, sig=sig)) is ErrorCode.BAD_SIGNATURE


def test_check4_oversize_header_is_TOO_LARGE():
    frames = frames_of({"type": "HEARTBEAT", "pad": "x" * 70_000})
    assert code_of(frames) is ErrorCode.TOO_LARGE


@pytest.mark.parametrize(
    "header",
    [
        b"",
        b"\xc1",  # never-used msgpack byte
        b"\x92\x01",  # truncated array
        msgpack.packb({"type": "HEARTBEAT"}) + b"\x00",  # trailing data
        msgpack.packb([1, 2]),  # not a map
        msgpack.packb({1: "x"}),  # non-string key
        msgpack.packb({b"type": "HEARTBEAT"}, use_bin_type=True),  # bytes key
        b"\x81\xa4type\xa2\xff\xfe",  # invalid UTF-8
        b"\x91" * 5000,  # nested too deep
    ],
)
def test_check5_not_one_msgpack_map_is_BAD_HEADER(header):
    assert code_of([SIGNATURE, header]) is ErrorCode.BAD_HEADER


@pytest.mark.parametrize("header", [{}, {"type": 5}, {"type": None}, {"type": b"HELLO"}])
def test_check6_missing_or_non_string_type_is_BAD_FIELD(header):
    assert code_of(frames_of(header)) is ErrorCode.BAD_FIELD


def test_check7_unknown_type_is_UNKNOWN_TYPE():
    assert code_of(frames_of({"type": "TRAIN_STEP", "step": 1})) is ErrorCode.UNKNOWN_TYPE


@pytest.mark.parametrize(
    "tensors",
    [
        "x",
        ["x"],
        [{"name": "", "dtype": "float32", "shape": [1]}],
        [{"name": "x" * 65, "dtype": "float32", "shape": [1]}],
        [{"name": "x", "dtype": 1, "shape": [1]}],
        [{"name": "x", "dtype": "float32", "shape": [-1]}],
        [{"name": "x", "dtype": "float32", "shape": [True]}],
        [{"name": "x", "dtype": "float32", "shape": [1] * 9}],
        [{"name": "x", "dtype": "float32", "shape": [1]}, {"name": "x", "dtype": "float32", "shape": [1]}],
    ],
)
def test_check8_malformed_tensor_list_is_BAD_FIELD(tensors):
    assert code_of(frames_of({"type": "ECHO", "seq": 0, "tensors": tensors}, b"\x00" * 4)) is ErrorCode.BAD_FIELD


@pytest.mark.parametrize("dtype", ["complex64", "float128", ">f4", "object", "U8", "bfloat16"])
def test_check9_dtype_not_on_the_allow_list_is_BAD_TENSOR(dtype):
    header = {"type": "ECHO", "seq": 0, "tensors": [{"name": "x", "dtype": dtype, "shape": [1]}]}
    assert code_of(frames_of(header, b"\x00" * 8)) is ErrorCode.BAD_TENSOR


def test_check10_frame_count_not_matching_tensors_is_BAD_FRAMING():
    assert code_of(frames_of(ECHO_1)) is ErrorCode.BAD_FRAMING
    assert code_of(frames_of(ECHO_1, b"\x00" * 24, b"")) is ErrorCode.BAD_FRAMING


def test_check11_claimed_size_over_max_tensor_bytes_is_TOO_LARGE_before_any_allocation():
    header = {"type": "ECHO", "seq": 0, "tensors": [{"name": "x", "dtype": "float64", "shape": [2**30, 2**30]}]}
    assert code_of(frames_of(header, b"")) is ErrorCode.TOO_LARGE


@pytest.mark.parametrize("size", [0, 23, 25, 48])
def test_check12_frame_bytes_not_prod_shape_times_itemsize_is_BAD_TENSOR(size):
    assert code_of(frames_of(ECHO_1, b"\x00" * size)) is ErrorCode.BAD_TENSOR


def test_check13_tensors_on_a_type_that_carries_none_is_BAD_TENSOR():
    header = {"type": "HEARTBEAT", "tensors": [{"name": "x", "dtype": "uint8", "shape": [1]}]}
    assert code_of(frames_of(header, b"\x00")) is ErrorCode.BAD_TENSOR


@pytest.mark.parametrize(
    "header",
    [
        {"type": "ECHO"},
        {"type": "ECHO", "seq": -1},
        {"type": "ECHO", "seq": True},
        {"type": "ECHO", "seq": 1.0},
        {"type": "ECHO", "seq": 2**63},
        {"type": "BYE", "ok": 1, "reason": "x"},
        {"type": "BYE", "ok": True, "reason": b"x"},
        {"type": "ERROR", "code": 1, "message": "x", "diff": []},
        {"type": "HELLO", "version": [1], "role": "data_holder", "party": "a", "run": "r", "config": {}, "digest": ""},
        {"type": "HELLO", "version": [1, 0], "role": "data_holder", "party": "-a", "run": "r", "config": {}, "digest": ""},
        {"type": "WELCOME", "version": [1, 0], "party": "a", "run": "r", "digest": "", "heartbeat_ms": 1,
         "peer_timeout_ms": 1, "data_holders": ["ok", "no way"]},
    ],
)
def test_check14_missing_or_mistyped_field_is_BAD_FIELD(header):
    assert code_of(frames_of(header)) is ErrorCode.BAD_FIELD


def test_the_first_failing_check_decides_the_code():
    # bad dtype (check 9) and wrong frame count (check 10) and bad field (check 14): check 9 wins
    header = {"type": "ECHO", "seq": "x", "tensors": [{"name": "x", "dtype": "complex64", "shape": [1]}]}
    assert code_of(frames_of(header)) is ErrorCode.BAD_TENSOR


def test_E3_unknown_header_keys_are_ignored():
    msg = decode(frames_of({"type": "BYE", "ok": True, "reason": "r", "future_field": {"x": [1, 2]}}))
    assert msg == Bye(ok=True, reason="r")


def test_tensors_key_may_be_omitted_when_empty():
    assert decode(frames_of({"type": "ECHO", "seq": 3})) == Echo(seq=3)


# --------------------------------------------------------------------------------------------- round trips, zero copy


@given(messages)
@settings(max_examples=examples(500), deadline=None)
def test_every_message_round_trips(msg):
    back = decode([bytes(memoryview(f).cast("B")) for f in encode(msg)])
    assert type(back) is type(msg)
    assert back.header_fields() == msg.header_fields()
    assert len(back.tensor_list) == len(msg.tensor_list)
    assert all(a.same_as(b) for a, b in zip(msg.tensor_list, back.tensor_list))


def test_E4_tensors_go_out_little_endian_c_order():
    big_endian_fortran = np.asfortranarray(np.arange(6, dtype=">i4").reshape(2, 3))
    frames = encode(Echo(seq=0, tensors=(Tensor("x", big_endian_fortran),)))
    assert bytes(memoryview(frames[2]).cast("B")) == np.arange(6, dtype="<i4").tobytes()


def test_large_aligned_tensors_decode_as_read_only_views_without_copies():
    payload = np.arange(128 * 256, dtype=np.float32).reshape(128, 256)
    frames = [bytes(memoryview(f).cast("B")) for f in encode(Echo(seq=0, tensors=(Tensor("x", payload),)))]
    buf = bytearray(frames[2])  # an aligned, writable buffer, as zmq hands us
    msg = decode([frames[0], frames[1], buf])
    arr = msg.tensors[0].array
    assert np.shares_memory(arr, np.frombuffer(buf, dtype=np.uint8))
    np.testing.assert_array_equal(arr, payload)


def test_misaligned_tensor_frames_are_copied_into_aligned_arrays():
    payload = np.arange(16, dtype=np.float64)
    raw = bytearray(b"\x00" + payload.tobytes())
    header = msgpack.packb({"type": "ECHO", "seq": 0, "tensors": [{"name": "x", "dtype": "float64", "shape": [16]}]})
    arr = decode([SIGNATURE, header, memoryview(raw)[1:]]).tensors[0].array
    assert arr.flags.aligned and not arr.flags.writeable
    np.testing.assert_array_equal(arr, payload)


def test_encoding_our_own_malformed_message_is_a_LocalProtocolError():
    with pytest.raises(LocalProtocolError):
        encode(Echo(seq=-1))
    with pytest.raises(LocalProtocolError):
        encode(Echo(seq=0, tensors=(Tensor("x", np.zeros(2, dtype=np.complex64)),)))
    with pytest.raises(LocalProtocolError):
        encode(Heartbeat(), Limits(max_header_bytes=2))


# --------------------------------------------------------------------------------------------- fuzzing: 12,000 cases


def _decodes_or_remote_error(frames) -> None:
    try:
        decode(frames)
    except RemoteProtocolError as exc:
        assert isinstance(exc.code, ErrorCode)


@given(st.lists(st.binary(max_size=40), max_size=6))
@FUZZ
def test_fuzz_random_frames_decode_or_raise_RemoteProtocolError(frames):
    _decodes_or_remote_error(frames)


@given(hostile_frames())
@FUZZ
def test_fuzz_hostile_frames_decode_or_raise_RemoteProtocolError(frames):
    _decodes_or_remote_error(frames)


@given(hostile_headers(), st.lists(st.binary(max_size=32), max_size=3))
@FUZZ
def test_fuzz_hostile_headers_with_valid_signature(header, tensor_frames):
    _decodes_or_remote_error([SIGNATURE, msgpack.packb(header, use_bin_type=True), *tensor_frames])


@given(messages, st.data())
@FUZZ
def test_fuzz_mutated_valid_messages(msg, data):
    frames = [bytearray(memoryview(f).cast("B")) for f in encode(msg)]
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(frames) - 1))
        action = data.draw(st.sampled_from(["flip", "truncate", "extend", "drop", "dup"]))
        if action == "flip" and frames[i]:
            j = data.draw(st.integers(0, len(frames[i]) - 1))
            frames[i][j] ^= data.draw(st.integers(1, 255))
        elif action == "truncate":
            del frames[i][data.draw(st.integers(0, len(frames[i]))) :]
        elif action == "extend":
            frames[i] += data.draw(st.binary(min_size=1, max_size=8))
        elif action == "drop" and len(frames) > 1:
            del frames[i]
        elif action == "dup":
            frames.insert(i, bytearray(frames[i]))
    _decodes_or_remote_error(frames)
