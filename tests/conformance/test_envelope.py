"""Section 3 (envelope checks [E1]-[E4]), section 4 [V1], section 5 [M1]."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from . import cases as C
from .kit import next_key, next_seq, run_case
from .peer import SIGNATURE, pack


def _ids(cs):
    return [c.id for c in cs]


@pytest.mark.parametrize("case", C.C1, ids=_ids(C.C1))
def test_E1_check1_too_few_frames_gets_BAD_FRAMING(kit, case):
    run_case(kit, case)


@pytest.mark.parametrize("case", C.C2, ids=_ids(C.C2))
def test_E1_check2_too_many_frames_gets_TOO_LARGE(kit, case):
    run_case(kit, case)


@pytest.mark.parametrize("case", C.C3_VERSION, ids=_ids(C.C3_VERSION))
def test_V1_other_major_signature_gets_UNSUPPORTED_VERSION_in_v1_envelope(kit, case):
    # the kit's parser flags any answer whose frame 0 is not VFL/1, so this also checks "sent in a v1 envelope"
    run_case(kit, case)


@pytest.mark.parametrize("case", C.C3_SIGNATURE, ids=_ids(C.C3_SIGNATURE))
def test_E1_check3_bad_signature_gets_BAD_SIGNATURE(kit, case):
    run_case(kit, case)


@pytest.mark.parametrize("case", C.C4, ids=_ids(C.C4))
def test_E1_check4_oversize_header_gets_TOO_LARGE(kit, case):
    run_case(kit, case)


@pytest.mark.parametrize("case", C.C5, ids=_ids(C.C5))
def test_E1_check5_bad_msgpack_or_not_a_map_gets_BAD_HEADER(kit, case):
    run_case(kit, case)


@pytest.mark.parametrize("case", C.C6, ids=_ids(C.C6))
def test_E1_check6_missing_or_nonstring_type_gets_BAD_FIELD(kit, case):
    run_case(kit, case)


@pytest.mark.parametrize("case", C.C7, ids=_ids(C.C7))
def test_E1_check7_unknown_type_gets_UNKNOWN_TYPE(kit, case):
    run_case(kit, case)


@pytest.mark.parametrize("case", C.C8, ids=_ids(C.C8))
def test_E1_check8_bad_tensor_descriptors_get_BAD_FIELD(kit, case):
    run_case(kit, case)


@pytest.mark.parametrize("case", C.C9, ids=_ids(C.C9))
def test_E1_check9_disallowed_dtype_gets_BAD_TENSOR(kit, case):
    run_case(kit, case)


@pytest.mark.parametrize("case", C.C10, ids=_ids(C.C10))
def test_E1_check10_frame_count_mismatch_gets_BAD_FRAMING(kit, case):
    run_case(kit, case)


@pytest.mark.parametrize("case", C.C11, ids=_ids(C.C11))
def test_E1_check11_oversize_tensor_gets_TOO_LARGE(kit, case):
    run_case(kit, case)


@pytest.mark.parametrize("case", C.C12, ids=_ids(C.C12))
def test_E1_check12_shape_bytes_mismatch_gets_BAD_TENSOR(kit, case):
    run_case(kit, case)


@pytest.mark.parametrize("case", C.C13, ids=_ids(C.C13))
def test_E1_check13_tensors_on_tensorless_type_get_BAD_TENSOR(kit, case):
    run_case(kit, case)


@pytest.mark.parametrize("case", C.C14, ids=_ids(C.C14))
def test_E1_check14_wrong_field_types_get_BAD_FIELD(kit, case):
    run_case(kit, case)


@pytest.mark.parametrize("case", C.ORDERING, ids=_ids(C.ORDERING))
def test_E1_first_failing_check_decides_the_code(kit, case):
    run_case(kit, case)


@pytest.mark.parametrize("build", [b for _, b in C.BOUNDARY_ECHOS], ids=[i for i, _ in C.BOUNDARY_ECHOS])
def test_E1_messages_at_the_limits_are_accepted(kit, build):
    """Valid messages right at a limit pass every check: the ECHO gets its ECHO_REPLY with the same tensors."""
    key = next_key(kit)
    p = kit.peer(key=key)
    kit.handshake(p)
    frames = build(C.Ctx(key.name, kit.target.run, kit.session, kit.target.limits))
    p.send_raw(frames)
    r = p.expect("ECHO_REPLY", kit.T, "a valid ECHO at the limits")
    import msgpack

    h = msgpack.unpackb(frames[1], raw=False)
    assert r.get("seq") == h["seq"], f"ECHO_REPLY seq {r.get('seq')} != {h['seq']}"
    sent = [(t["name"], t["dtype"], t["shape"], f) for t, f in zip(h.get("tensors", []), frames[2:])]
    assert [t[:3] for t in r.tensors] == [t[:3] for t in sent], "[M1] tensors differ in name, dtype or shape"
    assert [t[3] for t in r.tensors] == [t[3] for t in sent], "[M1] tensor bytes differ"
    kit.bye(p)


# ----------------------------------------------------------------------------------------------------------------


def _vm(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        m = re.match(r"(Vm\w+):\s+(\d+) kB", line)
        if m:
            out[m.group(1)] = int(m.group(2)) * 1024
    return out


def test_E2_claimed_sizes_are_not_allocated(kit, local_target):
    """Messages that claim the largest allowed tensors (64 x max_tensor_bytes) with 1-byte frames get BAD_TENSOR,
    and the node's peak virtual memory does not grow with the claims."""
    if not Path(f"/proc/{local_target.proc.pid}/status").exists():
        pytest.skip("needs /proc")
    lim = kit.target.limits
    n = lim["max_tensors"]
    descs = [C.d(f"t{i}", "uint8", [lim["max_tensor_bytes"]]) for i in range(n)]
    big = [SIGNATURE, pack(C.echo(*descs))] + [b"\x00"] * n
    small = [SIGNATURE, pack(C.echo(*[C.d(f"t{i}", "uint8", [64]) for i in range(n)]))] + [b"\x00"] * n
    one = [SIGNATURE, pack(C.echo(C.d("t", "float64", [lim["max_tensor_bytes"] // 8])))] + [b"\x00" * 8]
    p = kit.peer(key=next_key(kit))
    kit.handshake(p)
    for _ in range(3):  # warm up whatever code paths the node loads lazily
        p.send_raw(small)
        p.expect_error("BAD_TENSOR", kit.T, "warm-up: 64 tensors of 64 bytes with 1-byte frames")
    kit.echo(p, [("w", np.zeros(1000, dtype=np.float32))])
    before = _vm(local_target.proc.pid)
    for i in range(10):
        p.send_raw(big)
        p.expect_error("BAD_TENSOR", kit.T, f"[E2] #{i}: 64 tensors claiming max_tensor_bytes each, 1-byte frames")
        p.send_raw(one)
        p.expect_error("BAD_TENSOR", kit.T, f"[E2] #{i}: one tensor claiming max_tensor_bytes, an 8-byte frame")
    after = _vm(local_target.proc.pid)
    grew = after["VmPeak"] - before["VmPeak"]
    assert grew < 64 << 20, (
        f"[E2] the node's peak virtual memory grew by {grew >> 20} MiB while it refused messages that claim "
        f"{n} x {lim['max_tensor_bytes'] >> 20} MiB with 1-byte frames: it allocates from claimed shapes"
    )
    kit.assert_ready(p, "after [E2]")
    kit.bye(p)


# ----------------------------------------------------------------------------------------------------------------


def test_E3_unknown_header_keys_are_ignored(kit):
    """HELLO, ECHO, HEARTBEAT and BYE with extra top-level keys (of every msgpack kind) are handled as without."""
    extra = {"x_future": 1, "x_map": {"a": [1, "b", None]}, "x_float": 1.5, "x_bin": b"\x00\xff", "x_nil": None,
             "x_bool": False, "x_neg": -5}
    p = kit.peer(key=next_key(kit))
    p.send("HELLO", {**kit.hello_fields(p.party), **extra})
    kit.check_welcome(p.expect("WELCOME", kit.T, "[E3] HELLO with unknown keys"))
    seq = next_seq()
    t = np.arange(6, dtype=np.int16).reshape(2, 3)
    p.send("ECHO", {"seq": seq, **extra}, [("t", t)])
    r = p.expect("ECHO_REPLY", kit.T, "[E3] ECHO with unknown keys")
    assert r.get("seq") == seq and r.tensors == [("t", "int16", [2, 3], t.tobytes())]
    p.send("HEARTBEAT", extra)
    kit.assert_ready(p, "[E3] HEARTBEAT with unknown keys is no error")
    p.send("BYE", {"ok": True, "reason": "x", **extra})
    kit.assert_not_ready(p, "[E3] BYE with unknown keys ends the session")


def test_E3_unknown_keys_in_tensor_descriptors_are_ignored(kit):
    """An extra key inside a tensor descriptor map (also part of the header) is ignored."""
    p = kit.peer(key=next_key(kit))
    kit.handshake(p)
    seq = next_seq()
    desc = {"name": "a", "dtype": "float32", "shape": [3], "x_strides": [4], "x_device": "cpu"}
    p.send_raw([SIGNATURE, pack({"type": "ECHO", "seq": seq, "tensors": [desc]}), C.F4_3])
    r = p.expect("ECHO_REPLY", kit.T, "[E3] tensor descriptor with unknown keys")
    assert r.tensors == [("a", "float32", [3], C.F4_3)]
    kit.bye(p)


# ----------------------------------------------------------------------------------------------------------------

ALL_DTYPES = {
    "bool": np.array([True, False, True]),
    "uint8": np.arange(256, dtype=np.uint8),
    "int8": np.arange(-128, 128, dtype=np.int8),
    "int16": np.array([-32768, -1, 0, 1, 32767], dtype=np.int16),
    "int32": np.array([[-(2**31), 7], [2**31 - 1, 0]], dtype=np.int32),
    "int64": np.array([-(2**63), 2**63 - 1, 12345], dtype=np.int64),
    "float16": np.array([0.5, -0.0, np.inf, -np.inf, np.nan], dtype=np.float16),
    "float32": np.array([1.5, np.nan, -np.inf, 1e-45], dtype=np.float32),
    "float64": np.array([np.pi, np.nan, 5e-324, -0.0], dtype=np.float64),
}


def test_M1_echo_round_trip_every_dtype(kit):
    """[M1]/[E4]: ECHO_REPLY carries the same seq and tensors identical in name, dtype, shape and bytes
    (NaN payloads and -0.0 included: bytes, not values, are compared)."""
    p = kit.peer(key=next_key(kit))
    kit.handshake(p)
    kit.echo(p, list(ALL_DTYPES.items()))
    kit.bye(p)


def test_M1_echo_round_trip_large_and_odd_shapes(kit):
    """A large float32 tensor (1 MiB, or half the ECHO cap L of [B3] if that is less), a 64 KiB + 1 byte tensor
    (or L / 4 + 1), a big-endian source array (sent little-endian), a Fortran-order source array (sent C order),
    zero-size and 0-d tensors, in one message, order kept."""
    rng = np.random.default_rng(7)
    cap = kit.target.largest_message
    big = rng.standard_normal(min(1 << 18, cap // 8)).astype(np.float32)  # 1 MiB
    odd = rng.integers(0, 256, min(1 << 16, cap // 4) + 1, dtype=np.uint8)
    be = np.arange(12, dtype=">i4").reshape(3, 4)
    fortran = np.asfortranarray(rng.standard_normal((5, 7)))
    p = kit.peer(key=next_key(kit))
    kit.handshake(p)
    kit.echo(p, [("z_big", big), ("a_odd", odd), ("be", be), ("fortran", fortran),
                 ("empty", np.zeros((0, 3), np.float32)), ("scalar", np.array(3, np.int64)),
                 ("flag", np.array(True))])
    kit.echo(p, [], seq=0, what="ECHO with no tensors, seq 0")
    kit.echo(p, [("x", big)], seq=2**63 - 1, what="ECHO with the largest seq")
    kit.bye(p)


def test_M1_many_echoes_in_flight_keep_order_and_seq(kit):
    """50 ECHOs sent back to back get 50 ECHO_REPLYs, each with its ECHO's seq and tensor."""
    p = kit.peer(key=next_key(kit))
    kit.handshake(p)
    seqs = [next_seq() for _ in range(50)]
    for s in seqs:
        p.send("ECHO", {"seq": s}, [("v", np.full(100, s, dtype=np.int64))])
    got = {}
    for _ in seqs:
        r = p.expect("ECHO_REPLY", kit.T, "[M1] pipelined ECHOs")
        got[r.get("seq")] = r.tensors
    assert sorted(got) == sorted(seqs), "[M1] every ECHO gets exactly one ECHO_REPLY with its seq"
    for s in seqs:
        assert got[s] == [("v", "int64", [100], np.full(100, s, dtype=np.int64).tobytes())]
    kit.bye(p)


def test_E4_node_messages_are_well_formed(kit):
    """Everything the node sends is checked by the kit's parser (signature, header, tensors, field types); this
    test provokes one of each kind a label holder sends: WELCOME, ECHO_REPLY, ERROR (with and without diff)."""
    p = kit.peer(key=next_key(kit))
    kit.handshake(p)
    kit.echo(p, [("a", np.arange(10, dtype=np.float64))])
    p.send("WELCOME", {})
    p.expect_error("BAD_FIELD", kit.T)
    p.send_raw(kit.hello_frames(p.party, run="x-other-run"))
    e = p.expect_error("CONFIG_MISMATCH", kit.T)
    assert type(e.get("diff")) is dict
    assert not p.violations, p.violations


# ----------------------------------------------------------------------------------------------------------------
# [B3] the ECHO cap: L, the session's largest message (section 7)


def _tensors_of(total: int) -> list:
    """Two uint8 tensors holding ``total`` bytes in all (the cap counts every tensor of the ECHO)."""
    half = total // 2
    return [("a", np.zeros(half, np.uint8)), ("b", np.ones(total - half, np.uint8))]


def test_B3_ECHO_of_L_bytes_is_echoed_one_more_byte_is_TOO_LARGE(kit):
    """[B3]: an ECHO whose tensors hold L bytes in all gets its ECHO_REPLY; L + 1 bytes gets ERROR TOO_LARGE and no
    ECHO_REPLY (the probe ECHO after it gets the next answer); the peer stays READY."""
    if not kit.target.largest_exact:
        pytest.skip("needs the node's [link_check].shape (and [psi].chunk_size) in the --session file to know L")
    cap = kit.target.largest_message
    p = kit.peer(key=next_key(kit))
    kit.handshake(p)
    kit.echo(p, _tensors_of(cap), what=f"[B3] an ECHO of exactly L = {cap} bytes")
    p.send("ECHO", {"seq": next_seq()}, _tensors_of(cap + 1))
    p.expect_error("TOO_LARGE", kit.T, f"[B3] an ECHO of L + 1 = {cap + 1} bytes")
    kit.assert_ready(p, "[B3] after the refused ECHO (its reply must not follow either)")
    kit.bye(p)
