"""Wire precision of the cut layer (PROTOCOL.md §6, §7, §11, version 1.6), in memory.

Each precision's round trip through the real codec (encode -> frames -> decode), its documented error bound, int8's
zero and extreme rows, the sender's refusal of values it cannot send, the receiver's [X6] checks, the session
config's fields and digest, and the machines of section 11 with each precision."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from vfl.protocol import Backward, ErrorCode, Forward, RemoteProtocolError, SessionConfig, Tensor, decode, encode
from vfl.protocol.codec import BFLOAT16, DTYPES
from vfl.protocol.precision import (
    PRECISIONS, CutPrecision, PrecisionError, bfloat16_bits, bfloat16_to_float32, int8_quantize, wire_bytes,
)
from vfl.protocol.precision import decode as decode_cut
from vfl.protocol.precision import encode as encode_cut
from vfl.protocol.session import config_diff, digest_of

F32_MAX = float(np.finfo(np.float32).max)
BF16_SAFE = float(np.float32(3.38e38))  # below the largest bfloat16 (about 3.3895e38)
finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
matrices = hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=8), elements=finite32)


def wire_round_trip(x: np.ndarray, precision: str, name: str = "activations") -> np.ndarray:
    """Encode for the wire, through the codec's frames, and decode as the receiver does."""
    msg = Forward(step=0, tensors=encode_cut(name, x, precision, "FORWARD step 0 of dh1"))
    received = decode([bytes(memoryview(f)) for f in encode(msg)])
    return decode_cut(received, name, x.shape[0], x.shape[1], precision)


# ------------------------------------------------------------------------------------------------ round trips


@given(matrices)
def test_float32_round_trip_is_exact(x):
    out = wire_round_trip(x, "float32")
    assert out.dtype == np.float32 and out.tobytes() == x.tobytes()


@given(hnp.arrays(np.float32, (3, 5), elements=st.floats(-65504, 65504, width=32)))
def test_float16_error_bound(x):
    """Relative error <= 2^-11 for |x| >= 2^-14 (normal float16), absolute <= 2^-25 below (subnormal)."""
    out = wire_round_trip(x, "float16")
    err = np.abs(out.astype(np.float64) - x.astype(np.float64))
    bound = np.maximum(np.abs(x.astype(np.float64)) * 2.0**-11, 2.0**-25)
    assert (err <= bound).all()


@given(hnp.arrays(np.float32, (3, 5), elements=st.floats(-BF16_SAFE, BF16_SAFE, width=32)))
def test_bfloat16_error_bound(x):
    """Relative error <= 2^-8 for normal values (|x| >= 2^-126), absolute <= 2^-134 below."""
    out = wire_round_trip(x, "bfloat16")
    err = np.abs(out.astype(np.float64) - x.astype(np.float64))
    bound = np.maximum(np.abs(x.astype(np.float64)) * 2.0**-8, 2.0**-134)
    assert (err <= bound).all()


def test_bfloat16_rounds_to_nearest_even_on_the_dropped_bits():
    bits = np.array([0x3F800000, 0x3F808000, 0x3F818000, 0x3F808001, 0x3F807FFF, 0x80000000], np.uint32)
    assert bfloat16_bits(bits.view(np.float32)).tolist() == [0x3F80, 0x3F80, 0x3F82, 0x3F81, 0x3F80, 0x8000]
    assert bfloat16_to_float32(np.array([0x3F80, 0xC000], np.uint16)).tolist() == [1.0, -2.0]


def _int8_bound_holds(x: np.ndarray) -> None:
    out = wire_round_trip(x, "int8")
    _, scale = int8_quantize(x)
    err = np.abs(out.astype(np.float64) - x.astype(np.float64))
    # scale/2 from the rounding to an integer, plus the float32 rounding of the product q * scale (the decoder's)
    bound = scale.astype(np.float64)[:, None] / 2 + np.abs(out.astype(np.float64)) * 2.0**-24 + 2.0**-150
    assert (err <= bound).all(), (x, out, scale)
    assert np.isfinite(scale).all() and (scale >= 0).all()


@given(matrices)
def test_int8_error_is_at_most_half_a_scale_step(x):
    _int8_bound_holds(x)


@pytest.mark.parametrize(
    "rows",
    [
        [[0.0, 0.0, 0.0], [0.0, -0.0, 0.0]],  # all-zero rows: scale 0, decoded exactly 0
        [[1e38, -1e38, 3.0], [-F32_MAX, F32_MAX, 0.0]],  # near the top of float32: 127 * scale must not overflow
        [[1e-45, -1e-45, 0.0], [3e-44, 1e-40, -2e-39]],  # subnormal: the scale itself would round to 0
        [[1e-30, 5.0, -7.0], [-127.0, 127.0, 63.5]],  # mixed magnitudes and signs in one row
    ],
)
def test_int8_zero_and_extreme_rows(rows):
    x = np.array(rows, np.float32)
    _int8_bound_holds(x)
    q, scale = int8_quantize(x)
    assert q.dtype == np.int8 and q.min() >= -127 and q.max() <= 127
    for i, row in enumerate(x):
        if not row.any():
            assert scale[i] == 0 and not q[i].any()
        elif np.abs(row).max() >= 1e-30:  # the row's largest |value| is +-127 steps
            assert np.abs(q[i]).max() == 127
        else:  # subnormal: the scale is subnormal too (never 0 for a row that is not all zero); the bound above holds
            assert scale[i] > 0 and np.abs(q[i]).max() >= 1


def test_int8_scale_is_max_abs_over_127_per_row():
    x = np.array([[254.0, -1.0, 3.0], [-12.7, 0.0, 1.27]], np.float32)
    q, scale = int8_quantize(x)
    assert scale.tolist() == [np.float32(2.0), np.float32(12.7 / 127)]
    assert q[0].tolist() == [127, 0, 2]  # -0.5 -> -0 and 1.5 -> 2: round half to even
    assert q[1].tolist() == [-127, 0, 13]


def test_wire_bytes_per_precision():
    assert [wire_bytes(p, 128, 64) for p in PRECISIONS] == [32768, 16384, 16384, 128 * 64 + 512]
    tensors = encode_cut("gradient", np.ones((128, 64), np.float32), "int8", "BACKWARD step 0 to dh1")
    assert [(t.name, t.array.dtype, t.array.shape) for t in tensors] == [
        ("gradient", np.int8, (128, 64)), ("gradient_scale", np.float32, (128,))
    ]
    assert sum(t.array.nbytes for t in tensors) == wire_bytes("int8", 128, 64)


# ------------------------------------------------------------------------------------------------ the sender


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_is_refused_at_the_sender_naming_the_step_and_party(precision, bad):
    x = np.ones((4, 3), np.float32)
    x[2, 1] = bad
    with pytest.raises(PrecisionError, match=r"FORWARD step 7 of dh1: the activations hold NaN or infinity \(1 of 12"):
        encode_cut("activations", x, precision, "FORWARD step 7 of dh1")


@pytest.mark.parametrize(("precision", "value"), [("float16", 70000.0), ("bfloat16", F32_MAX)])
def test_values_beyond_the_precisions_range_are_refused_at_the_sender(precision, value):
    x = np.full((2, 2), value, np.float32)
    with pytest.raises(PrecisionError, match=f"BACKWARD step 3 to dh2: the gradient exceed {precision}'s range"):
        encode_cut("gradient", x, precision, "BACKWARD step 3 to dh2")


# ------------------------------------------------------------------------------------------------ the receiver


def received(*tensors: Tensor) -> Forward:
    """A FORWARD as it arrives: through the codec, so the arrays are the codec's views of the frames."""
    return decode([bytes(memoryview(f)) for f in encode(Forward(step=0, tensors=tensors))])


def refused(msg, precision: str, rows: int = 2, width: int = 3) -> str:
    with pytest.raises(RemoteProtocolError) as info:
        decode_cut(msg, "activations", rows, width, precision)
    assert info.value.code is ErrorCode.BAD_TENSOR and info.value.ref == "FORWARD"
    return info.value.detail


GOOD = {p: encode_cut("activations", np.ones((2, 3), np.float32), p, "test") for p in PRECISIONS}


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("sent", PRECISIONS)
def test_X6_a_tensor_of_another_precision_is_refused(precision, sent):
    msg = received(*GOOD[sent])
    if sent == precision:
        np.testing.assert_allclose(decode_cut(msg, "activations", 2, 3, precision), 1.0, rtol=2**-23)
    else:
        assert f"needs 'activations' {precision} [2, 3]" in refused(msg, precision)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("shape", [(3, 3), (2, 4), (1, 3)])
def test_X6_a_well_encoded_tensor_of_the_wrong_shape_is_refused(precision, shape):
    refused(received(*encode_cut("activations", np.ones(shape, np.float32), precision, "t")), precision)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("shape", [(6,), (2, 3, 1), (3, 2)])
def test_X6_the_right_values_in_another_shape_are_refused(precision, shape):
    tensors = [Tensor(t.name, t.array.reshape(shape)) if t.name == "activations" else t for t in GOOD[precision]]
    refused(received(*tensors), precision)


@pytest.mark.parametrize(
    "scale",
    [np.array([1.0, -1.0], np.float32), np.array([np.nan, 1.0], np.float32), np.array([1.0, np.inf], np.float32),
     np.array([1.0, 1.0, 1.0], np.float32), np.array([[1.0, 1.0]], np.float32), np.array([1.0, 1.0], np.float64),
     None],
)
def test_X6_int8_scales_must_be_float32_rows_finite_and_non_negative(scale):
    q = np.ones((2, 3), np.int8)
    tensors = (Tensor("activations", q),) + (() if scale is None else (Tensor("activations_scale", scale),))
    assert "activations_scale" in refused(received(*tensors), "int8")


def test_X6_int8_refuses_minus_128_and_a_product_that_overflows():
    q = np.full((2, 3), -128, np.int8)
    assert "-128" in refused(received(Tensor("activations", q), Tensor("activations_scale", np.ones(2, np.float32))),
                             "int8")
    q = np.full((2, 3), 127, np.int8)
    huge = np.array([1.0, F32_MAX], np.float32)
    assert "NaN or infinity once decoded" in refused(
        received(Tensor("activations", q), Tensor("activations_scale", huge)), "int8")


@pytest.mark.parametrize("bits", [0x7F80, 0xFF80, 0x7FC0, 0x7F81])
def test_X6_bfloat16_infinity_or_nan_is_refused(bits):
    arr = np.full((2, 3), 0x3F80, np.uint16)
    arr[1, 2] = bits
    assert "NaN or infinity" in refused(received(Tensor("activations", arr.view(BFLOAT16))), "bfloat16")


def test_X6_float16_infinity_is_refused():
    arr = np.ones((2, 3), np.float16)
    arr[0, 0] = np.inf
    assert "NaN or infinity" in refused(received(Tensor("activations", arr)), "float16")


def test_bfloat16_is_its_own_wire_dtype_of_two_bytes():
    """§7: ``bfloat16`` is on the allow-list, distinct from ``uint16``; check 12 counts 2 bytes an item."""
    (t,) = GOOD["bfloat16"]
    frames = encode(Forward(step=0, tensors=(t,)))
    import msgpack

    header = msgpack.unpackb(frames[1])
    assert header["tensors"] == [{"name": "activations", "dtype": "bfloat16", "shape": [2, 3]}]
    assert DTYPES["bfloat16"].itemsize == 2 and DTYPES["bfloat16"] != DTYPES["uint16"]
    with pytest.raises(RemoteProtocolError) as info:
        decode([frames[0], frames[1], bytes(11)])
    assert info.value.code is ErrorCode.BAD_TENSOR
    # uint16 bits are not bfloat16, whatever they hold
    as_uint16 = received(Tensor("activations", np.full((2, 3), 0x3F80, np.uint16)))
    assert "got uint16[2, 3]" in refused(as_uint16, "bfloat16")


# ------------------------------------------------------------------------------------------------ session config


def config(**kw) -> SessionConfig:
    return SessionConfig(cut_widths={"dh1": 4}, batch_size=8, window=2, model="m", **kw)


def test_float32_is_absent_from_the_wire_so_every_earlier_digest_is_unchanged():
    assert config().to_wire() == {"cut_widths": {"dh1": 4}, "batch_size": 8, "window": 2, "model": "m"}
    assert config(activation_precision="float32", gradient_precision="float32").digest == config().digest


@pytest.mark.parametrize("field", ["activation_precision", "gradient_precision"])
@pytest.mark.parametrize("precision", PRECISIONS[1:])
def test_each_precision_is_in_the_digest_and_parses_back(field, precision):
    c = config(**{field: precision})
    assert c.to_wire()[field] == precision and c.digest != config().digest
    assert SessionConfig.from_wire(c.to_wire()) == c


def test_a_1_5_config_without_the_fields_differs_naming_the_field():
    """A 1.5 data holder sends no precision fields: the label holder configured with int8 sees a CONFIG_MISMATCH
    whose diff names the field (absent shows as float32), never a silent misread."""
    ours = config(activation_precision="int8", gradient_precision="bfloat16").to_wire()
    theirs = config().to_wire()
    assert digest_of(ours) != digest_of(theirs)
    assert config_diff(ours, theirs) == {
        "activation_precision": ["int8", "float32"], "gradient_precision": ["bfloat16", "float32"]
    }


@pytest.mark.parametrize("value", ["float32", "int4", "INT8", "", 8, None, True, ["int8"]])
def test_a_malformed_precision_field_is_BAD_FIELD(value):
    wire = {**config().to_wire(), "activation_precision": value}
    with pytest.raises(RemoteProtocolError) as info:
        SessionConfig.from_wire(wire)
    assert info.value.code is ErrorCode.BAD_FIELD and "activation_precision" in info.value.detail


def test_cut_precision_describes_itself_and_refuses_unknown_names():
    assert config(activation_precision="int8", gradient_precision="bfloat16").precision.describe() == (
        "activations int8, gradients bfloat16"
    )
    with pytest.raises(ValueError, match="gradient_precision must be one of float32, float16, bfloat16, int8"):
        CutPrecision(gradients="fp8")
    with pytest.raises(ValueError, match="activation_precision"):
        config(activation_precision="half")


# ------------------------------------------------------------------------------------------------ section 11


@settings(max_examples=20, deadline=None)
@given(st.sampled_from(PRECISIONS), st.sampled_from(PRECISIONS))
def test_X6_machines_send_and_check_the_session_precision(acts, grads):
    """A data holder's FORWARD and EVAL_FORWARD carry its activations in the activation precision, the label
    holder's BACKWARD the gradient in the gradient precision; each side hands float32 to its model."""
    from .test_training_phase import WIDTH, FakeBottom, FakeTop, deliver, plan
    from vfl.protocol.training_phase import DataHolderTraining, LabelHolderTraining

    precision = CutPrecision(activations=acts, gradients=grads)
    top, bottom = FakeTop(), FakeBottom()
    got = []
    bottom.backward = lambda step, gradient: got.append(gradient)
    t = LabelHolderTraining(top, plan(epochs=1), parties=["dh1"], widths={"dh1": WIDTH}, batch_size=4, window=1,
                            n_rows=20, precision=precision)
    d = DataHolderTraining(bottom, n_rows=20, batch_size=4, window=1, width=WIDTH, precision=precision, party="dh1")
    for m in t.start()["dh1"]:
        deliver(t, d, m)
    wire = {"float32": np.float32, "float16": np.float16, "bfloat16": BFLOAT16, "int8": np.int8}
    while d.has_work:
        (m,) = d.work()
        assert m.tensor_list[0].array.dtype == wire[acts]
        assert [x.name for x in m.tensor_list] == ["activations"] + (["activations_scale"] if acts == "int8" else [])
        wire_msg = decode([bytes(memoryview(f)) for f in encode(m)])
        out, _ = (t.on_forward if m.TYPE == "FORWARD" else t.on_eval)("dh1", wire_msg)
        for reply in out["dh1"]:
            if isinstance(reply, Backward):
                assert reply.tensor_list[0].array.dtype == wire[grads]
                reply = decode([bytes(memoryview(f)) for f in encode(reply)])
            deliver(t, d, reply)
    assert t.done and got and all(g.dtype == np.float32 for g in got)
    # the fake top's gradient is all ones: exact in every precision but int8, whose 127 * float32(1/127) is 1 + 2^-23
    np.testing.assert_allclose(np.concatenate(got), 1.0, rtol=0 if grads != "int8" else 2**-23)


def test_X6_a_label_holder_refuses_activations_in_another_precision():
    from .test_training_phase import FakeTop, plan
    from vfl.protocol.training_phase import LabelHolderTraining

    t = LabelHolderTraining(FakeTop(), plan(), parties=["dh1"], widths={"dh1": 3}, batch_size=4, window=1,
                            n_rows=20, precision=CutPrecision(activations="int8"))
    t.start()
    with pytest.raises(RemoteProtocolError) as info:
        t.on_forward("dh1", received(Tensor("activations", np.ones((4, 3), np.float32))))
    assert info.value.code is ErrorCode.BAD_TENSOR and "needs 'activations' int8 [4, 3]" in info.value.detail


def test_a_data_holder_whose_activations_are_not_finite_sends_nothing():
    from .test_training_phase import FakeTop, plan
    from vfl.protocol.training_phase import DataHolderTraining, LabelHolderTraining

    class NanBottom:
        def forward(self, step, rows, train):
            return np.full((len(rows), 3), np.nan, np.float32)

        def checkpoint(self, step, epoch, keep=False):
            return "d"

    t = LabelHolderTraining(FakeTop(), plan(), parties=["dh1"], widths={"dh1": 3}, batch_size=4, window=1,
                            n_rows=20, precision=CutPrecision(activations="bfloat16"))
    d = DataHolderTraining(NanBottom(), n_rows=20, batch_size=4, window=1, width=3,
                           precision=CutPrecision(activations="bfloat16"), party="dh1")
    msgs = t.start()["dh1"]
    d.on_schedule(msgs[0])
    d.on_epoch(msgs[2])
    with pytest.raises(PrecisionError, match="FORWARD step 0 of dh1: the activations hold NaN or infinity"):
        d.work()


# ------------------------------------------------------------------------------------------------ the handshake


def test_H4_a_1_5_data_holder_without_the_fields_gets_CONFIG_MISMATCH_naming_activation_precision():
    """The HELLO a 1.5 data holder sends (version [1, 5], a config without the precision fields) to a label holder
    configured with int8 activations: CONFIG_MISMATCH whose diff and message name the field, never a WELCOME."""
    from vfl.protocol import Hello, LabelHolderMachine, Send
    from vfl.protocol.psi_phase import PsiPlan

    base = dict(cut_widths={"alice": 8}, batch_size=32, window=1, model="m1", psi=True, train=True)
    lh = LabelHolderMachine(party="bank", run="run-1", config=SessionConfig(**base, activation_precision="int8"),
                            now=0.0, heartbeat_s=1.0, peer_timeout_s=5.0, join_timeout_s=60.0,
                            psi=PsiPlan(items=[], engine=None))
    wire = {"cut_widths": {"alice": 8}, "batch_size": 32, "window": 1, "model": "m1", "psi": True, "train": True}
    hello = Hello(version=(1, 5), role="data_holder", party="alice", run="run-1", config=wire, digest=digest_of(wire))
    frames = [bytes(memoryview(f).cast("B")) for f in encode(hello)]
    (err,) = [o.message for o in lh.receive(b"alice", "alice", frames, 0.0) if isinstance(o, Send)]
    assert err.TYPE == "ERROR" and err.code == ErrorCode.CONFIG_MISMATCH
    assert err.diff == {"activation_precision": ["int8", "float32"]}
    assert "activation_precision: label holder has 'int8', data holder has 'float32'" in err.message


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["float32", "float16", "bfloat16", "int8"]),
       st.lists(st.floats(-1e3, 1e3, width=32), min_size=6, max_size=6), st.integers(1, 4))
def test_as_received_is_what_the_receiver_decodes_and_sending_it_again_sends_the_same(precision, values, rows):
    """The label holder's audit scores ``as_received`` gradients: they must be what a data holder decodes."""
    from vfl.protocol.precision import as_received, decode, encode

    x = np.resize(np.asarray(values, np.float32), (rows, 6))
    msg = Backward(step=0, tensors=encode("gradient", x, precision, "test"))
    got = decode(msg, "gradient", rows, 6, precision)
    seen = as_received(x, precision)
    np.testing.assert_array_equal(seen, got)
    again = decode(Backward(step=0, tensors=encode("gradient", seen, precision, "test")), "gradient", rows, 6, precision)
    np.testing.assert_allclose(again, got, rtol=2 ** -22, atol=0)  # int8: the scale may move one float32 step
