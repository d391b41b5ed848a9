"""Version 1.6: the cut layer's wire precision. Section 6 (`activation_precision`, `gradient_precision` in the
session config: absent is float32, present is one of float16 / bfloat16 / int8, in the digest; [H3], [H4]) and
section 7 (the `bfloat16` dtype: 2-byte items, [M1] round trip, check 12).

The training tensors themselves ([X6], [X12]) need a kit that runs the PSI and the training phase; they are tested
in memory (tests/protocol/test_precision.py) and between real nodes (tests/node/test_precision_nodes.py)."""

from __future__ import annotations

import copy

import pytest

from .kit import next_key, next_seq
from .peer import config_digest, pack
from .test_handshake import _assert_mismatch

FIELDS = ("activation_precision", "gradient_precision")
LOSSY = ("float16", "bfloat16", "int8")


def _float32_target(kit) -> None:
    if any(f in kit.session for f in FIELDS):
        pytest.skip("the target's session has a cut-layer precision other than float32")


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize("precision", LOSSY)
def test_H4_a_precision_the_label_holder_does_not_use_is_CONFIG_MISMATCH_naming_it(kit, field, precision):
    """Section 6: a well-formed precision field is part of the config, so a data holder that sets one the label
    holder does not (float32: the field absent) gets CONFIG_MISMATCH whose diff names the field, its absent side
    shown as `float32`."""
    _float32_target(kit)
    cfg = {**copy.deepcopy(kit.session), field: precision}
    p = kit.peer(key=next_key(kit))
    p.send_raw(kit.hello_frames(p.party, config=cfg, digest=config_digest(cfg)))
    err = p.expect_error("CONFIG_MISMATCH", kit.T, f"[H4] {field} = {precision}")
    _assert_mismatch(err, {(field,): ("float32", precision)}, kit.session, cfg)
    kit.assert_not_ready(p, "[R1] after a refused HELLO")


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize("value", ["float32", "int4", "INT8", "bf16", "", 8, True, None, ["int8"], {"p": "int8"}])
def test_H3_a_malformed_precision_field_is_BAD_FIELD(kit, field, value):
    """Section 6: present, the field is one of the strings float16, bfloat16, int8 (float32 is said by leaving it
    out, so one config has one digest): anything else, with the config's own digest, is BAD_FIELD."""
    cfg = {**copy.deepcopy(kit.session), field: value}
    p = kit.peer(key=next_key(kit))
    p.send_raw(kit.hello_frames(p.party, config=cfg, digest=config_digest(cfg)))
    p.expect_error("BAD_FIELD", kit.T, f"[H3] {field} = {value!r}")
    kit.assert_not_ready(p, "[R1] after a refused HELLO")


@pytest.fixture
def int8_node(own_node):
    """A label holder of the test's own whose session has int8 activations and bfloat16 gradients."""
    return own_node(data_holders=["dh1"], session_strings={"activation_precision": "int8",
                                                           "gradient_precision": "bfloat16"})


def test_H5_a_data_holder_with_the_same_precisions_is_welcomed(int8_node):
    kit = int8_node
    assert kit.session["activation_precision"] == "int8"
    p = kit.peer(key=kit.target.parties["dh1"])
    kit.handshake(p, version=[1, 6], what="[H5] HELLO with the label holder's precisions")
    kit.bye(p)


def test_H4_a_1_5_data_holder_that_does_not_know_the_fields_gets_CONFIG_MISMATCH(int8_node):
    """Version 1.6: a 1.5 data holder sends its config without the precision fields; a label holder configured with
    int8 / bfloat16 must refuse it naming both fields (never welcome it and send tensors it would misread)."""
    kit = int8_node
    cfg = {k: v for k, v in copy.deepcopy(kit.session).items() if k not in FIELDS}
    p = kit.peer(key=kit.target.parties["dh1"])
    p.send_raw(kit.hello_frames(p.party, version=[1, 5], config=cfg, digest=config_digest(cfg)))
    err = p.expect_error("CONFIG_MISMATCH", kit.T, "[H4] a 1.5 HELLO without the precision fields")
    _assert_mismatch(err, {("activation_precision",): ("int8", "float32"),
                           ("gradient_precision",): ("bfloat16", "float32")}, kit.session, cfg)
    kit.assert_not_ready(p, "[R1] after a refused HELLO")


def _bf16_echo(seq: int, shape: list[int], data: bytes) -> list[bytes]:
    header = {"type": "ECHO", "seq": seq, "tensors": [{"name": "a", "dtype": "bfloat16", "shape": shape}]}
    return [b"VFL/1", pack(header), data]


def test_M1_echo_round_trip_bfloat16(kit):
    """Section 7 (1.6): `bfloat16` is on the allow-list with 2-byte items; an ECHO of one comes back identical in
    name, dtype, shape and bytes (bit patterns of infinity and NaN included: ECHO compares bytes, not values)."""
    p = kit.peer(key=next_key(kit))
    kit.handshake(p)
    data = bytes.fromhex("803f" "00c0" "807f" "c0ff" "0100" "0000")  # 1, -2, inf, NaN, a subnormal, 0
    seq = next_seq()
    p.send_raw(_bf16_echo(seq, [2, 3], data))
    r = p.expect("ECHO_REPLY", kit.T, "[M1] ECHO of a bfloat16 tensor")
    assert not r.problems, r.problems
    assert r.get("seq") == seq and r.tensors == [("a", "bfloat16", [2, 3], data)], r.tensors
    kit.bye(p)
