"""The catalogue of malformed messages: each one fails exactly the check of PROTOCOL.md section 3 it is filed
under (or, in ORDERING, several checks, of which the first decides the code)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import msgpack
import numpy as np

from .peer import CODES, SIGNATURE, config_digest, pack


@dataclass
class Ctx:
    party: str
    run: str
    session: dict
    limits: dict

    @property
    def max_tensors(self) -> int:
        return self.limits["max_tensors"]

    @property
    def max_header(self) -> int:
        return self.limits["max_header_bytes"]

    @property
    def max_tensor(self) -> int:
        return self.limits["max_tensor_bytes"]

    def hello(self, **over) -> dict:
        cfg = over.pop("config", self.session)
        h = {"type": "HELLO", "version": [1, 0], "role": "data_holder", "party": self.party, "run": self.run,
             "config": cfg, "digest": config_digest(cfg)}
        h.update(over)
        return h


@dataclass
class Case:
    id: str
    code: Optional[int]  # None: the node must not answer at all
    build: Callable[[Ctx], list[bytes]]
    state: str = "READY"  # the sender's state when it sends the message: READY or IDLE (IDLE/DONE)
    note: str = ""


def d(name, dtype, shape) -> dict:
    return {"name": name, "dtype": dtype, "shape": shape}


def echo(*descs, seq=1, **extra) -> dict:
    h = {"type": "ECHO", "seq": seq, "tensors": list(descs)}
    h.update(extra)
    return h


def msg(header, *tensor_frames, sig=SIGNATURE) -> list[bytes]:
    return [sig, header if isinstance(header, bytes) else pack(header), *tensor_frames]


def padded_echo(size: int) -> bytes:
    """A valid ECHO header of exactly ``size`` bytes (padding in an unknown key)."""
    base = pack({"type": "ECHO", "seq": 1, "tensors": [], "pad": ""})
    n = size - len(base)
    for extra in range(0, 8):  # the str header grows by 1, 2 or 4 bytes as the padding gets longer
        s = "x" * max(0, n - extra)
        b = pack({"type": "ECHO", "seq": 1, "tensors": [], "pad": s})
        if len(b) == size:
            return b
    raise AssertionError(f"cannot pad an ECHO header to {size} bytes")


F4_3 = np.arange(3, dtype="<f4").tobytes()
U = CODES

MAX_DEPTH = 32  # section 3 check 5: the header map is level 1


def nest(depth: int, kind: str = "l"):
    """``depth`` nested containers (lists, maps, or alternating) around 0."""
    value: object = 0
    for i in range(depth):
        k = kind if kind != "lm" else "lm"[i % 2]
        value = [value] if k == "l" else {"k": value}
    return value


def raw_map(*pairs: tuple[str, bytes]) -> bytes:
    """A msgpack map written pair by pair (key, packed value): it can hold a key twice, which packb cannot."""
    assert len(pairs) < 16
    return bytes([0x80 | len(pairs)]) + b"".join(pack(k) + v for k, v in pairs)


def hello_with_duplicate_config_key(c: Ctx) -> list[bytes]:
    """A valid HELLO, except that its config map holds ``batch_size`` twice (with the same value)."""
    cfg = [(k, pack(v)) for k, v in c.session.items()] + [("batch_size", pack(c.session["batch_size"]))]
    fields = [(k, pack(v)) for k, v in c.hello().items() if k != "config"]
    return [SIGNATURE, raw_map(*fields, ("config", raw_map(*cfg)))]


BAD_UTF8_VALUE = b"\x84\xa4type\xa4ECHO\xa3seq\x01\xa7tensors\x90\xa1x\xa2\xff\xfe"
BAD_UTF8_KEY = b"\x84\xa4type\xa4ECHO\xa3seq\x01\xa7tensors\x90\xa2\xff\xfe\x01"

# --------------------------------------------------------------------------------------------------------------

C1 = [  # at least 2 frames -> BAD_FRAMING
    Case("signature_only", U["BAD_FRAMING"], lambda c: [SIGNATURE]),
    Case("one_empty_frame", U["BAD_FRAMING"], lambda c: [b""]),
    Case("header_only", U["BAD_FRAMING"], lambda c: [pack(echo())]),
    Case("one_garbage_frame", U["BAD_FRAMING"], lambda c: [b"\x00garbage\xff"]),
]

C2 = [  # at most 2 + max_tensors frames -> TOO_LARGE
    Case("max_plus_one_empty_frames", U["TOO_LARGE"], lambda c: msg(echo()) + [b""] * (c.max_tensors + 1)),
    Case("max_plus_one_matching_descs", U["TOO_LARGE"],
         lambda c: msg(echo(*[d(f"t{i}", "uint8", [0]) for i in range(c.max_tensors + 1)]))
         + [b""] * (c.max_tensors + 1)),
    Case("200_garbage_frames", U["TOO_LARGE"], lambda c: [b"junk"] * 200),
]

C3_VERSION = [  # frame 0 names another major version -> UNSUPPORTED_VERSION ([V1])
    Case("VFL/2", U["UNSUPPORTED_VERSION"], lambda c: msg(echo(), sig=b"VFL/2")),
    Case("VFL/0", U["UNSUPPORTED_VERSION"], lambda c: msg(echo(), sig=b"VFL/0")),
    Case("VFL/9", U["UNSUPPORTED_VERSION"], lambda c: msg(echo(), sig=b"VFL/9")),
    Case("VFL/10", U["UNSUPPORTED_VERSION"], lambda c: msg(echo(), sig=b"VFL/10")),
    Case("VFL/999", U["UNSUPPORTED_VERSION"], lambda c: msg(echo(), sig=b"VFL/999")),
    # check 3 compares bytes: only exactly `VFL/1` is v1; a leading zero names "another" version
    Case("VFL/01", U["UNSUPPORTED_VERSION"], lambda c: msg(echo(), sig=b"VFL/01")),
    Case("VFL/001", U["UNSUPPORTED_VERSION"], lambda c: msg(echo(), sig=b"VFL/001")),
    Case("VFL/2_hello_in_IDLE", U["UNSUPPORTED_VERSION"], lambda c: msg(c.hello(version=[2, 0]), sig=b"VFL/2"),
         state="IDLE"),
    Case("VFL/2_future_header", U["UNSUPPORTED_VERSION"],
         lambda c: [b"VFL/2", b"\xc1 a v2 header this node cannot read", b"\x00" * 10]),
]

C3_SIGNATURE = [  # frame 0 is anything else -> BAD_SIGNATURE
    Case("lowercase", U["BAD_SIGNATURE"], lambda c: msg(echo(), sig=b"vfl/1")),
    Case("no_slash", U["BAD_SIGNATURE"], lambda c: msg(echo(), sig=b"VFL1")),
    Case("empty", U["BAD_SIGNATURE"], lambda c: msg(echo(), sig=b"")),
    Case("XXXXX", U["BAD_SIGNATURE"], lambda c: msg(echo(), sig=b"XXXXX")),
    Case("zeros", U["BAD_SIGNATURE"], lambda c: msg(echo(), sig=b"\x00" * 5)),
    Case("reversed", U["BAD_SIGNATURE"], lambda c: msg(echo(), sig=b"1/LFV")),
    Case("dash", U["BAD_SIGNATURE"], lambda c: msg(echo(), sig=b"VFL-1")),
    Case("frames_swapped", U["BAD_SIGNATURE"], lambda c: [pack(echo()), SIGNATURE]),
    Case("hello_bad_signature_in_IDLE", U["BAD_SIGNATURE"], lambda c: msg(c.hello(), sig=b"HELLO"), state="IDLE"),
    # check 3 names a major version only as `VFL/` + 1-3 ASCII digits; anything else is not a vfl signature
    Case("VFL/_four_digits", U["BAD_SIGNATURE"], lambda c: msg(echo(), sig=b"VFL/1000")),
    Case("VFL/_no_digits", U["BAD_SIGNATURE"], lambda c: msg(echo(), sig=b"VFL/")),
    Case("VFL/_letters", U["BAD_SIGNATURE"], lambda c: msg(echo(), sig=b"VFL/x")),
    Case("VFL/_digit_and_letter", U["BAD_SIGNATURE"], lambda c: msg(echo(), sig=b"VFL/2x")),
    Case("VFL/1_trailing_space", U["BAD_SIGNATURE"], lambda c: msg(echo(), sig=b"VFL/1 ")),
]

C4 = [  # frame 1 at most max_header_bytes -> TOO_LARGE
    Case("valid_msgpack_one_byte_over", U["TOO_LARGE"], lambda c: msg(padded_echo(c.max_header + 1))),
    Case("garbage_one_byte_over", U["TOO_LARGE"], lambda c: [SIGNATURE, b"\xc1" * (c.max_header + 1)]),
    Case("one_MiB_header", U["TOO_LARGE"], lambda c: msg(padded_echo(max(c.max_header + 1, 1 << 20)))),
]

C5 = [  # exactly one valid msgpack object, a map -> BAD_HEADER
    Case("empty_header", U["BAD_HEADER"], lambda c: [SIGNATURE, b""]),
    Case("never_used_byte", U["BAD_HEADER"], lambda c: [SIGNATURE, b"\xc1"]),
    Case("truncated_map", U["BAD_HEADER"], lambda c: [SIGNATURE, pack(echo())[:-3]]),
    Case("two_objects", U["BAD_HEADER"], lambda c: [SIGNATURE, pack(echo()) + pack({})]),
    Case("trailing_byte", U["BAD_HEADER"], lambda c: [SIGNATURE, pack(echo()) + b"\x00"]),
    Case("header_is_list", U["BAD_HEADER"], lambda c: [SIGNATURE, pack(["ECHO", 1])]),
    Case("header_is_str", U["BAD_HEADER"], lambda c: [SIGNATURE, pack("ECHO")]),
    Case("header_is_int", U["BAD_HEADER"], lambda c: [SIGNATURE, pack(5)]),
    Case("header_is_nil", U["BAD_HEADER"], lambda c: [SIGNATURE, pack(None)]),
    Case("header_is_bin", U["BAD_HEADER"], lambda c: [SIGNATURE, pack(pack(echo()))]),
    Case("int_map_key", U["BAD_HEADER"], lambda c: [SIGNATURE, pack({**echo(), 7: "x"})]),
    Case("bin_map_key", U["BAD_HEADER"], lambda c: [SIGNATURE, pack({**echo(), b"x": 1})]),
    Case("nested_int_map_key", U["BAD_HEADER"], lambda c: [SIGNATURE, pack(echo(extra_field={"a": {1: 2}}))]),
    Case("invalid_utf8_value", U["BAD_HEADER"], lambda c: [SIGNATURE, BAD_UTF8_VALUE]),
    Case("invalid_utf8_key", U["BAD_HEADER"], lambda c: [SIGNATURE, BAD_UTF8_KEY]),
    Case("nested_bin_map_key", U["BAD_HEADER"], lambda c: [SIGNATURE, pack(echo(extra_field={"a": {b"k": 2}}))],
         note="string map keys at every level"),
    Case("bin_key_in_tensor_descriptor", U["BAD_HEADER"],
         lambda c: [SIGNATURE, pack(echo({"name": "a", "dtype": "uint8", "shape": [1], b"x": 1})), b"\x01"]),
    Case("map_key_in_list_is_int", U["BAD_HEADER"], lambda c: [SIGNATURE, pack(echo(extra_field=[{"a": 1}, {2: 3}]))]),
    Case("hello_nested_bin_key_in_IDLE", U["BAD_HEADER"],
         lambda c: [SIGNATURE, pack(c.hello(config={**c.session, "cut_widths": {b"dh1": 8}}))], state="IDLE"),
    Case("hello_nested_int_key_in_IDLE", U["BAD_HEADER"],
         lambda c: [SIGNATURE, pack(c.hello(config={**c.session, "cut_widths": {1: 8}}))], state="IDLE"),
    # nesting: at most 32 levels, the header map being level 1 ([E5])
    Case("nested_33_levels_lists", U["BAD_HEADER"], lambda c: [SIGNATURE, pack(echo(x=nest(MAX_DEPTH)))]),
    Case("nested_33_levels_maps", U["BAD_HEADER"], lambda c: [SIGNATURE, pack(echo(x=nest(MAX_DEPTH, "m")))]),
    Case("nested_33_levels_in_a_tensor_descriptor", U["BAD_HEADER"],
         lambda c: [SIGNATURE, pack(echo({**d("a", "uint8", [1]), "x": nest(MAX_DEPTH - 2)})), b"\x01"]),
    Case("nested_5000_levels", U["BAD_HEADER"],
         lambda c: [SIGNATURE, raw_map(("type", pack("ECHO")), ("seq", pack(1)), ("x", b"\x91" * 5000 + b"\x00"))]),
    Case("hello_config_nested_33_levels_in_IDLE", U["BAD_HEADER"],
         lambda c: [SIGNATURE, pack(c.hello(config={**c.session, "x": nest(MAX_DEPTH - 1, "lm")}))], state="IDLE"),
    # duplicate keys in any map
    Case("duplicate_key_in_header", U["BAD_HEADER"],
         lambda c: [SIGNATURE, raw_map(("type", pack("ECHO")), ("seq", pack(1)), ("seq", pack(2)))]),
    Case("duplicate_type_key", U["BAD_HEADER"],
         lambda c: [SIGNATURE, raw_map(("type", pack("ECHO")), ("seq", pack(1)), ("type", pack("ECHO")))]),
    Case("duplicate_key_in_tensor_descriptor", U["BAD_HEADER"],
         lambda c: [SIGNATURE, raw_map(("type", pack("ECHO")), ("seq", pack(1)), ("tensors", b"\x91" + raw_map(
             ("name", pack("a")), ("dtype", pack("uint8")), ("shape", pack([1])), ("name", pack("b"))))), b"\x01"]),
    Case("duplicate_key_in_hello_config_in_IDLE", U["BAD_HEADER"], lambda c: hello_with_duplicate_config_key(c),
         state="IDLE", note="config map holds batch_size twice"),
]

C6 = [  # type present and a string -> BAD_FIELD
    Case("type_missing", U["BAD_FIELD"], lambda c: msg({"seq": 1, "tensors": []})),
    Case("type_int", U["BAD_FIELD"], lambda c: msg({**echo(), "type": 5})),
    Case("type_nil", U["BAD_FIELD"], lambda c: msg({**echo(), "type": None})),
    Case("type_bool", U["BAD_FIELD"], lambda c: msg({**echo(), "type": True})),
    Case("type_bin", U["BAD_FIELD"], lambda c: msg({**echo(), "type": b"ECHO"})),
    Case("type_list", U["BAD_FIELD"], lambda c: msg({**echo(), "type": ["ECHO"]})),
    Case("type_map", U["BAD_FIELD"], lambda c: msg({**echo(), "type": {"ECHO": 1}})),
    Case("empty_map", U["BAD_FIELD"], lambda c: msg({})),
]

C7 = [  # an unknown message type -> UNKNOWN_TYPE
    Case("FOO", U["UNKNOWN_TYPE"], lambda c: msg({**echo(), "type": "FOO"})),
    Case("lowercase_echo", U["UNKNOWN_TYPE"], lambda c: msg({**echo(), "type": "echo"})),
    Case("trailing_space", U["UNKNOWN_TYPE"], lambda c: msg({**echo(), "type": "ECHO "})),
    Case("empty_string", U["UNKNOWN_TYPE"], lambda c: msg({**echo(), "type": ""})),
    Case("PREDICT", U["UNKNOWN_TYPE"], lambda c: msg({"type": "PREDICT", "step": 0})),
    Case("TRAIN_STEP_with_tensor", U["UNKNOWN_TYPE"],
         lambda c: msg({"type": "TRAIN_STEP", "step": 0, "tensors": [d("act", "float32", [1, 3])]}, F4_3)),
    Case("SNAPSHOT_in_IDLE", U["UNKNOWN_TYPE"], lambda c: msg({"type": "SNAPSHOT", "step": 1}), state="IDLE"),
]


def _c8(id_, descs, *frames, n=None):
    return Case(id_, U["BAD_FIELD"], lambda c: msg({"type": "ECHO", "seq": 1, "tensors": descs}, *frames))


C8 = [  # tensors well-formed -> BAD_FIELD
    _c8("tensors_str", "x"),
    _c8("tensors_map", {"name": "a", "dtype": "uint8", "shape": [0]}, b""),
    _c8("tensors_nil", None),
    _c8("tensors_int", 3),
    _c8("entry_int", [5], b""),
    _c8("entry_list", [["a", "uint8", [1]]], b"\x01"),
    _c8("name_missing", [{"dtype": "uint8", "shape": [1]}], b"\x01"),
    _c8("name_empty", [d("", "uint8", [1])], b"\x01"),
    _c8("name_65_chars", [d("n" * 65, "uint8", [1])], b"\x01"),
    _c8("name_int", [d(5, "uint8", [1])], b"\x01"),
    _c8("name_bin", [d(b"a", "uint8", [1])], b"\x01"),
    _c8("names_duplicate", [d("a", "uint8", [1]), d("a", "uint8", [1])], b"\x01", b"\x02"),
    _c8("dtype_missing", [{"name": "a", "shape": [1]}], b"\x01"),
    _c8("dtype_int", [d("a", 5, [1])], b"\x01"),
    _c8("dtype_nil", [d("a", None, [1])], b"\x01"),
    _c8("shape_missing", [{"name": "a", "dtype": "uint8"}], b"\x01"),
    _c8("shape_str", [d("a", "uint8", "1")], b"\x01"),
    _c8("shape_int", [d("a", "uint8", 1)], b"\x01"),
    _c8("shape_nil", [d("a", "uint8", None)], b"\x01"),
    _c8("shape_9_dims", [d("a", "uint8", [1] * 9)], b"\x01"),
    _c8("shape_negative", [d("a", "uint8", [-1])], b""),
    _c8("shape_float", [d("a", "uint8", [1.0])], b"\x01"),
    _c8("shape_bool", [d("a", "uint8", [True])], b"\x01"),
    _c8("shape_2_pow_63", [d("a", "uint8", [2**63])], b""),
    _c8("shape_str_dim", [d("a", "uint8", ["1"])], b"\x01"),
    Case("max_tensors_plus_one_descs", U["BAD_FIELD"],
         lambda c: msg(echo(*[d(f"t{i}", "uint8", [0]) for i in range(c.max_tensors + 1)]))),
]

BAD_DTYPES = ["complex64", "complex128", "float128", "bf16", "BFLOAT16", "object", "str",
              "<f4", ">f4", "f4", "float", "int", "Float32", "FLOAT32", "float32 ", "", "?", "b1"]
C9 = [  # dtype on the allow-list -> BAD_TENSOR
    Case(f"dtype_{dt or 'empty'}".replace(" ", "_"), U["BAD_TENSOR"],
         lambda c, dt=dt: msg(echo(d("a", dt, [1])), bytes(8))) for dt in BAD_DTYPES
] + [
    Case("second_tensor_bad_dtype", U["BAD_TENSOR"],
         lambda c: msg(echo(d("a", "float32", [3]), d("b", "complex64", [1])), F4_3, bytes(8))),
]

C10 = [  # frame count is 2 + len(tensors) -> BAD_FRAMING
    Case("one_desc_no_frame", U["BAD_FRAMING"], lambda c: msg(echo(d("a", "float32", [3])))),
    Case("no_desc_one_frame", U["BAD_FRAMING"], lambda c: msg(echo(), F4_3)),
    Case("tensors_omitted_one_frame", U["BAD_FRAMING"], lambda c: msg({"type": "ECHO", "seq": 1}, F4_3)),
    Case("two_descs_three_frames", U["BAD_FRAMING"],
         lambda c: msg(echo(d("a", "float32", [3]), d("b", "float32", [3])), F4_3, F4_3, F4_3)),
    Case("two_descs_one_frame", U["BAD_FRAMING"],
         lambda c: msg(echo(d("a", "float32", [3]), d("b", "float32", [3])), F4_3)),
    Case("heartbeat_extra_frame", U["BAD_FRAMING"], lambda c: msg({"type": "HEARTBEAT"}, b"")),
    Case("hello_extra_frame_in_IDLE", U["BAD_FRAMING"], lambda c: msg(c.hello(), b"x"), state="IDLE"),
]

C11 = [  # prod(shape) * itemsize <= max_tensor_bytes -> TOO_LARGE (claimed sizes; frames are tiny)
    Case("uint8_max_plus_one", U["TOO_LARGE"], lambda c: msg(echo(d("a", "uint8", [c.max_tensor + 1])), b"")),
    Case("float64_itemsize_counts", U["TOO_LARGE"],
         lambda c: msg(echo(d("a", "float64", [c.max_tensor // 8 + 1])), b"")),
    Case("2d_over", U["TOO_LARGE"], lambda c: msg(echo(d("a", "float32", [c.max_tensor // 4, 2])), b"")),
    Case("int64_product_wraps_to_zero", U["TOO_LARGE"], lambda c: msg(echo(d("a", "uint8", [2**62, 4])), b""),
         note="2^62 * 4 = 2^64 wraps to 0 in int64/uint64 arithmetic"),
    Case("float32_2pow32_squared_wraps", U["TOO_LARGE"],
         lambda c: msg(echo(d("a", "float32", [2**32, 2**32])), b""), note="2^64 * 4 wraps to 0"),
    Case("8_dims_of_2pow31", U["TOO_LARGE"], lambda c: msg(echo(d("a", "uint8", [2**31] * 8)), b"")),
    Case("int16_2pow63_minus_1", U["TOO_LARGE"], lambda c: msg(echo(d("a", "int16", [2**63 - 1])), b"")),
    Case("zero_size_but_huge_other_dims", U["TOO_LARGE"], lambda c: msg(echo(d("a", "float64", [0, 2**62])), b""),
         note="check 11 bounds the product of the non-zero dimensions too"),
    Case("second_tensor_over", U["TOO_LARGE"],
         lambda c: msg(echo(d("a", "float32", [3]), d("b", "uint8", [c.max_tensor + 1])), F4_3, b"")),
]

C12 = [  # frame is exactly prod(shape) * itemsize bytes -> BAD_TENSOR
    Case("one_byte_short", U["BAD_TENSOR"], lambda c: msg(echo(d("a", "float32", [3])), F4_3[:-1])),
    Case("one_byte_long", U["BAD_TENSOR"], lambda c: msg(echo(d("a", "float32", [3])), F4_3 + b"\x00")),
    Case("scalar_empty_frame", U["BAD_TENSOR"], lambda c: msg(echo(d("a", "float64", [])), b"")),
    Case("zero_size_with_bytes", U["BAD_TENSOR"], lambda c: msg(echo(d("a", "uint8", [0])), b"\x01")),
    Case("itemsize_ignored", U["BAD_TENSOR"], lambda c: msg(echo(d("a", "int16", [2, 3])), bytes(6))),
    Case("bfloat16_itemsize_ignored", U["BAD_TENSOR"], lambda c: msg(echo(d("a", "bfloat16", [2, 3])), bytes(6))),
    Case("bfloat16_odd_bytes", U["BAD_TENSOR"], lambda c: msg(echo(d("a", "bfloat16", [3])), bytes(5))),
    Case("bool_short", U["BAD_TENSOR"], lambda c: msg(echo(d("a", "bool", [4])), b"\x01\x00\x01")),
    Case("bool_byte_2", U["BAD_TENSOR"], lambda c: msg(echo(d("a", "bool", [4])), b"\x01\x00\x02\x01")),
    Case("bool_byte_ff", U["BAD_TENSOR"], lambda c: msg(echo(d("a", "bool", [2, 2])), b"\x00\x00\x00\xff")),
    Case("bool_second_tensor_byte_80", U["BAD_TENSOR"],
         lambda c: msg(echo(d("a", "uint8", [2]), d("b", "bool", [1])), b"\x07\x09", b"\x80")),
    Case("claimed_exactly_max_tiny_frame", U["BAD_TENSOR"],
         lambda c: msg(echo(d("a", "uint8", [c.max_tensor])), b"\x00")),
    Case("second_tensor_wrong", U["BAD_TENSOR"],
         lambda c: msg(echo(d("a", "float32", [3]), d("b", "float32", [3])), F4_3, F4_3[:4])),
]

C13 = [  # tensors only on types that may carry them -> BAD_TENSOR
    Case("hello_with_tensor_in_IDLE", U["BAD_TENSOR"],
         lambda c: msg({**c.hello(), "tensors": [d("a", "float32", [3])]}, F4_3), state="IDLE"),
    Case("heartbeat_with_tensor", U["BAD_TENSOR"],
         lambda c: msg({"type": "HEARTBEAT", "tensors": [d("a", "float32", [3])]}, F4_3)),
    Case("bye_with_tensor", U["BAD_TENSOR"],
         lambda c: msg({"type": "BYE", "ok": True, "reason": "x", "tensors": [d("a", "float32", [3])]}, F4_3)),
    Case("welcome_with_tensor", U["BAD_TENSOR"],
         lambda c: msg({"type": "WELCOME", "version": [1, 0], "party": "x", "run": c.run, "digest": "0" * 64,
                        "heartbeat_ms": 1000, "peer_timeout_ms": 1000, "data_holders": [],
                        "tensors": [d("a", "uint8", [0])]}, b"")),
    Case("zero_size_tensor_still_counts", U["BAD_TENSOR"],
         lambda c: msg({"type": "HEARTBEAT", "tensors": [d("a", "uint8", [0])]}, b"")),
]


def _c14(id_, header, state="READY"):
    return Case(id_, U["BAD_FIELD"], lambda c: msg(header(c) if callable(header) else header), state=state)


def _hello14(id_, **over):
    drop = [k for k, v in over.items() if v is _DROP]

    def build(c):
        h = c.hello(**{k: v for k, v in over.items() if v is not _DROP})
        for k in drop:
            h.pop(k)
        return msg(h)

    return Case(f"hello_{id_}_in_IDLE", U["BAD_FIELD"], build, state="IDLE")


_DROP = object()
WELCOME_OK = {"type": "WELCOME", "version": [1, 0], "party": "x", "run": "r", "digest": "0" * 64,
              "heartbeat_ms": 1000, "peer_timeout_ms": 1000, "data_holders": []}

C14 = [  # required fields present and typed -> BAD_FIELD
    _c14("echo_seq_missing", {"type": "ECHO", "tensors": []}),
    _c14("echo_seq_str", echo(seq="1")),
    _c14("echo_seq_true", echo(seq=True)),
    _c14("echo_seq_false", echo(seq=False)),
    _c14("echo_seq_negative", echo(seq=-1)),
    _c14("echo_seq_2pow63", echo(seq=2**63)),
    _c14("echo_seq_2pow64_minus_1", echo(seq=2**64 - 1)),
    _c14("echo_seq_float", echo(seq=1.0)),
    _c14("echo_seq_nil", echo(seq=None)),
    _c14("echo_seq_list", echo(seq=[1])),
    _c14("bye_ok_missing", {"type": "BYE", "reason": "x"}),
    _c14("bye_ok_int", {"type": "BYE", "ok": 1, "reason": "x"}),
    _c14("bye_ok_str", {"type": "BYE", "ok": "true", "reason": "x"}),
    _c14("bye_ok_nil", {"type": "BYE", "ok": None, "reason": "x"}),
    _c14("bye_reason_missing", {"type": "BYE", "ok": True}),
    _c14("bye_reason_int", {"type": "BYE", "ok": True, "reason": 5}),
    _c14("bye_reason_bin", {"type": "BYE", "ok": True, "reason": b"x"}),
    _c14("echo_reply_seq_str", {"type": "ECHO_REPLY", "seq": "1"}),
    _c14("welcome_data_holders_missing", {k: v for k, v in WELCOME_OK.items() if k != "data_holders"}),
    _c14("welcome_heartbeat_bool", {**WELCOME_OK, "heartbeat_ms": True}),
    _c14("welcome_version_str", {**WELCOME_OK, "version": "1.0"}),
    _hello14("version_missing", version=_DROP),
    _hello14("role_missing", role=_DROP),
    _hello14("party_missing", party=_DROP),
    _hello14("run_missing", run=_DROP),
    _hello14("config_missing", config=_DROP),
    _hello14("digest_missing", digest=_DROP),
    _hello14("version_str", version="1.0"),
    _hello14("version_one_item", version=[1]),
    _hello14("version_three_items", version=[1, 0, 0]),
    _hello14("version_str_items", version=["1", "0"]),
    _hello14("version_bool_major", version=[True, 0]),
    _hello14("version_negative_minor", version=[1, -1]),
    _hello14("version_minor_2pow63", version=[1, 2**63]),
    _hello14("role_int", role=5),
    _hello14("party_int", party=5),
    _hello14("party_nil", party=None),
    _hello14("run_int", run=1),
    _hello14("config_list", config=[]),
    _hello14("config_str", config="cfg"),
    _hello14("digest_int", digest=5),
    _hello14("digest_bin", digest=b"\x00" * 32),
    # `party` and `run` are of type id: a string matching ^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$ (section 5)
    _hello14("party_empty", party=""),
    _hello14("party_leading_dash", party="-dh1"),
    _hello14("party_space", party="dh 1"),
    _hello14("party_65_chars", party="p" * 65),
    _hello14("party_non_ascii", party="d\u00e9h1"),
    _hello14("party_trailing_newline", party="dh1\n"),
    _hello14("run_empty", run=""),
    _hello14("run_slash", run="conformance/1"),
    _hello14("run_65_chars", run="r" * 65),
    _c14("welcome_party_not_id", {**WELCOME_OK, "party": "bank!"}),
    _c14("welcome_data_holders_not_ids", {**WELCOME_OK, "data_holders": ["dh1", ""]}),
]

ORDERING = [  # several checks fail: the first decides
    Case("1_before_3__one_bad_frame", U["BAD_FRAMING"], lambda c: [b"XXXXX"]),
    Case("2_before_3__too_many_frames_bad_signature", U["TOO_LARGE"], lambda c: [b"XXXXX"] + [b""] * (c.max_tensors + 2)),
    Case("2_before_3__too_many_frames_VFL/2", U["TOO_LARGE"], lambda c: [b"VFL/2", pack(echo())] + [b""] * (c.max_tensors + 1)),
    Case("3_before_4__bad_signature_oversize_header", U["BAD_SIGNATURE"],
         lambda c: [b"XXXXX", b"\xc1" * (c.max_header + 1)]),
    Case("3_before_4__VFL/2_oversize_header", U["UNSUPPORTED_VERSION"],
         lambda c: [b"VFL/2", b"\xc1" * (c.max_header + 1)]),
    Case("3_before_5__bad_signature_bad_msgpack", U["BAD_SIGNATURE"], lambda c: [b"XXXXX", b"\xc1"]),
    Case("4_before_5__oversize_garbage", U["TOO_LARGE"], lambda c: [SIGNATURE, b"\xc1" * (c.max_header + 1)]),
    Case("5_before_6__list_header", U["BAD_HEADER"], lambda c: [SIGNATURE, pack([{"type": 5}])]),
    Case("6_before_7_and_8__type_int_bad_tensors", U["BAD_FIELD"],
         lambda c: msg({"type": 7, "tensors": "x"})),
    Case("7_before_8__unknown_type_bad_tensors", U["UNKNOWN_TYPE"], lambda c: msg({"type": "FOO", "tensors": 5})),
    Case("7_before_10__unknown_type_frame_mismatch", U["UNKNOWN_TYPE"], lambda c: msg({"type": "FOO"}, b"a", b"b")),
    Case("7_before_14__unknown_type_no_fields", U["UNKNOWN_TYPE"], lambda c: msg({"type": "WELCOME_BACK"})),
    Case("8_before_9__bad_desc_then_bad_dtype", U["BAD_FIELD"],
         lambda c: msg(echo(d("a", "uint16", [1]), d("", "float32", [1])), bytes(2), bytes(4))),
    Case("8_before_10__bad_desc_frame_mismatch", U["BAD_FIELD"], lambda c: msg(echo(d("a", "uint8", [-1])))),
    Case("9_before_10__bad_dtype_frame_mismatch", U["BAD_TENSOR"], lambda c: msg(echo(d("a", "complex64", [1])))),
    Case("9_before_11__bad_dtype_huge_shape", U["BAD_TENSOR"],
         lambda c: msg(echo(d("a", "complex64", [2**62])), b"")),
    Case("10_before_11__frame_mismatch_huge_shape", U["BAD_FRAMING"],
         lambda c: msg(echo(d("a", "uint8", [c.max_tensor + 1])))),
    Case("11_before_12__all_tensors", U["TOO_LARGE"],
         lambda c: msg(echo(d("a", "float32", [3]), d("b", "uint8", [c.max_tensor + 1])), b"\x00", b""),
         note="check 11 covers every tensor before check 12 looks at any frame"),
    Case("12_before_13__hello_tensor_wrong_size", U["BAD_TENSOR"],
         lambda c: msg({**c.hello(), "tensors": [d("a", "float32", [3])]}, b"\x00"), state="IDLE"),
    Case("12_before_14__echo_wrong_bytes_no_seq", U["BAD_TENSOR"],
         lambda c: msg({"type": "ECHO", "tensors": [d("a", "float32", [3])]}, b"\x00")),
    Case("13_before_14__hello_tensor_no_fields", U["BAD_TENSOR"],
         lambda c: msg({"type": "HELLO", "tensors": [d("a", "uint8", [1])]}, b"\x01"), state="IDLE"),
    Case("13_before_14__bye_tensor_ok_int", U["BAD_TENSOR"],
         lambda c: msg({"type": "BYE", "ok": 1, "tensors": [d("a", "uint8", [1])]}, b"\x01")),
    Case("14_before_state__welcome_bad_field", U["BAD_FIELD"], lambda c: msg({**WELCOME_OK, "run": 5})),
    Case("14_before_state__echo_bad_seq_in_IDLE", U["BAD_FIELD"], lambda c: msg(echo(seq="x")), state="IDLE"),
]

# Messages whose header names the type ERROR and that fail a check: the node must not answer ([M2]).
M2_MALFORMED_ERRORS = [
    Case("code_str", None, lambda c: msg({"type": "ERROR", "code": "6", "message": "x"})),
    Case("code_bool", None, lambda c: msg({"type": "ERROR", "code": True, "message": "x"})),
    Case("message_missing", None, lambda c: msg({"type": "ERROR", "code": 6})),
    Case("code_missing", None, lambda c: msg({"type": "ERROR", "message": "x"})),
    Case("ref_int", None, lambda c: msg({"type": "ERROR", "code": 6, "message": "x", "ref": 5})),
    Case("diff_list", None, lambda c: msg({"type": "ERROR", "code": 10, "message": "x", "diff": []})),
    Case("with_tensor", None,
         lambda c: msg({"type": "ERROR", "code": 6, "message": "x", "tensors": [d("a", "float32", [3])]}, F4_3)),
    Case("frame_mismatch", None, lambda c: msg({"type": "ERROR", "code": 6, "message": "x"}, b"extra")),
    Case("bad_dtype", None,
         lambda c: msg({"type": "ERROR", "code": 6, "message": "x", "tensors": [d("a", "uint16", [1])]}, b"\x00\x00")),
    Case("tensor_too_large", None,
         lambda c: msg({"type": "ERROR", "code": 6, "message": "x",
                        "tensors": [d("a", "uint8", [c.max_tensor + 1])]}, b"")),
    Case("bad_tensor_descriptor", None,
         lambda c: msg({"type": "ERROR", "code": 6, "message": "x", "tensors": [{"name": 1}]}, b"")),
    Case("signature_VFL/2", None, lambda c: msg({"type": "ERROR", "code": 2, "message": "x"}, sig=b"VFL/2"),
         note="a v2 node's ERROR to a v1 node: answering it would ping-pong between versions"),
    Case("bad_signature", None, lambda c: msg({"type": "ERROR", "code": 1, "message": "x"}, sig=b"XXXXX")),
    Case("too_many_frames", None,
         lambda c: msg({"type": "ERROR", "code": 6, "message": "x"}) + [b""] * (c.max_tensors + 1)),
    Case("code_out_of_range", None, lambda c: msg({"type": "ERROR", "code": 99, "message": "x"})),
    Case("code_negative", None, lambda c: msg({"type": "ERROR", "code": -1, "message": "x"})),
]

# Valid messages at the limits: they must be accepted (ECHO_REPLY), not refused.
BOUNDARY_ECHOS = [
    ("header_exactly_max_header_bytes", lambda c: msg(padded_echo(c.max_header))),
    ("max_tensors_tensors", lambda c: msg(echo(*[d(f"t{i}", "uint8", [1]) for i in range(c.max_tensors)]),
                                          *[bytes([i % 256]) for i in range(c.max_tensors)])),
    ("name_64_chars", lambda c: msg(echo(d("n" * 64, "uint8", [2])), b"\x01\x02")),
    ("shape_8_dims", lambda c: msg(echo(d("a", "int8", [1, 2, 1, 2, 1, 2, 1, 2])), bytes(range(16)))),
    ("zero_size_tensor", lambda c: msg(echo(d("a", "float64", [0, 5])), b"")),
    ("scalar_tensor", lambda c: msg(echo(d("a", "float64", [])), np.float64(2.5).tobytes())),
    ("tensors_omitted", lambda c: msg({"type": "ECHO", "seq": 1})),
    ("seq_zero", lambda c: msg(echo(seq=0))),
    ("seq_2pow63_minus_1", lambda c: msg(echo(seq=2**63 - 1))),
    ("unicode_tensor_name", lambda c: msg(echo(d("\u00e9t\u00e9-\u2603", "uint8", [1])), b"\x07")),
    # check 5 asks for valid msgpack with UTF-8 strings and string keys; extension types are valid msgpack, and an
    # unknown key is ignored ([E3])
    ("ext_type_in_unknown_key", lambda c: msg(echo(x_ext=msgpack.ExtType(5, b"abc")))),
    ("timestamp_in_unknown_key", lambda c: msg(echo(x_ts=msgpack.Timestamp(1, 0)))),
    ("bin_value_in_unknown_key", lambda c: msg(echo(x_bin=b"\x00\xff"))),
    ("party_id_64_chars_in_tensor_name_ok", lambda c: msg(echo(d("t" * 64, "uint8", [0])), b"")),
    ("nested_32_levels_lists", lambda c: msg(echo(x=nest(MAX_DEPTH - 1)))),
    ("nested_32_levels_alternating", lambda c: msg(echo(x=nest(MAX_DEPTH - 1, "lm")))),
    ("bool_bytes_0_and_1", lambda c: msg(echo(d("a", "bool", [4])), b"\x01\x00\x00\x01")),
    ("same_key_in_two_maps", lambda c: msg(echo(x={"k": 1}, y={"k": 2}))),
]
