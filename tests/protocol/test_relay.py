"""RELAY (protocol 1.10, segment chains): the message, its end-to-end key, and what a segment holder on the path can
and cannot do to a relayed message: drop it, but not forge, alter, replay, reorder or redirect it."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zmq.utils import z85

from vfl.protocol import (
    MESSAGE_TYPES,
    Bye,
    DataHolderMachine,
    Echo,
    Epoch,
    ErrorCode,
    Heartbeat,
    Limits,
    LocalProtocolError,
    Relay,
    RemoteProtocolError,
    Schedule,
    Tensor,
    decode,
    encode,
)
from vfl.protocol.messages import FieldKind
from vfl.protocol.relay import (
    HEADER_TENSOR,
    INSECURE_RELAY_KEY,
    RelayChannel,
    RelayKeyError,
    peek_inner_type,
    relay_key,
)

from ..fuzz_budget import examples
from .strategies import ids, tensor_tuples, wire_ints
from .test_machines import CFG, RUN, error_codes, feed, ready_lh, sends

CONN = "dh1/0123456789abcdef"
KEY = bytes(range(32))


def channels(key: bytes = KEY, conn: str = CONN, party: str = "dh1", limits: Limits = Limits()):
    """The party's end and the label holder's end of one relayed connection."""
    return (RelayChannel(key, RUN, party, conn, "up", limits=limits),
            RelayChannel(key, RUN, party, conn, "down", limits=limits))


def on_the_wire(msg: Relay) -> Relay:
    """What the next hop decodes: the RELAY encoded, its frames copied to fresh buffers, decoded (section 3)."""
    return decode([bytearray(memoryview(f).cast("B")) for f in encode(msg)])


def same(a, b) -> bool:
    return (type(a) is type(b) and a.header_fields() == b.header_fields() and len(a.tensor_list) == len(b.tensor_list)
            and all(x.same_as(y) for x, y in zip(a.tensor_list, b.tensor_list)))


def code_of(channel: RelayChannel, msg: Relay) -> ErrorCode:
    with pytest.raises(RemoteProtocolError) as info:
        channel.unwrap(msg)
    assert info.value.ref == "RELAY"
    return info.value.code


def epoch(n: int = 5, first_step: int = 0) -> Epoch:
    return Epoch(epoch=0, first_step=first_step, tensors=(Tensor("order", np.arange(n, dtype=np.int64)),))


# ------------------------------------------------------------------------------------------- the message type


def test_RELAY_is_a_known_type_with_its_fields_and_tensors():
    assert MESSAGE_TYPES["RELAY"] is Relay and Relay.CARRIES_TENSORS
    assert Relay.FIELDS == {"party": (FieldKind.ID, True), "conn": (FieldKind.STR, True),
                            "seq": (FieldKind.INT, True), "mac": (FieldKind.STR, True)}
    msg = Relay(party="dh1", conn=CONN, seq=3, mac="0" * 64, tensors=(Tensor(HEADER_TENSOR, np.zeros(4, np.uint8)),))
    assert same(on_the_wire(msg), msg)


@pytest.mark.parametrize("field", ["party", "conn", "seq", "mac"])
def test_RELAY_without_a_required_field_is_BAD_FIELD(field):
    header = {"type": "RELAY", "party": "dh1", "conn": CONN, "seq": 0, "mac": "0" * 64}
    del header[field]
    with pytest.raises(RemoteProtocolError) as info:
        decode([b"VFL/1", msgpack.packb(header)])
    assert info.value.code is ErrorCode.BAD_FIELD and field in info.value.detail


def test_a_machine_without_chains_answers_RELAY_with_UNEXPECTED_MESSAGE():
    """RELAY is a known type (no UNKNOWN_TYPE), but no state of a label holder or data holder expects one yet."""
    relay = channels()[0].wrap(Heartbeat())
    lh = ready_lh("alice")
    assert error_codes(feed(lh, relay)) == [ErrorCode.UNEXPECTED_MESSAGE]
    dh = DataHolderMachine(party="alice", run=RUN, config=CFG, now=0.0)
    dh.start(0.0)
    out = sends(dh.receive([bytes(memoryview(f).cast("B")) for f in encode(relay)], 0.1))
    assert [ErrorCode(m.code) for m in out] == [ErrorCode.UNEXPECTED_MESSAGE]


# ------------------------------------------------------------------------------------------------- the key


def keypair() -> tuple[bytes, bytes]:
    public, secret = zmq.curve_keypair()
    return z85.decode(public), z85.decode(secret)


def test_both_ends_derive_the_same_key_from_their_curve_keys():
    (p_pub, p_sec), (l_pub, l_sec) = keypair(), keypair()
    at_party = relay_key(p_sec, l_pub, "dh1", "bank", RUN)
    at_label_holder = relay_key(l_sec, p_pub, "dh1", "bank", RUN)
    assert at_party == at_label_holder and len(at_party) == 32
    # the key is bound to the run and to both party ids
    assert relay_key(p_sec, l_pub, "dh1", "bank", "run-2") != at_party
    assert relay_key(p_sec, l_pub, "dh2", "bank", RUN) != at_party
    assert relay_key(p_sec, l_pub, "dh1", "bank2", RUN) != at_party


@pytest.mark.parametrize("u", [0, 1])
def test_a_low_order_public_key_is_refused(u):
    _, secret = keypair()
    with pytest.raises(RelayKeyError, match="low-order"):
        relay_key(secret, u.to_bytes(32, "little"), "dh1", "bank", RUN)


def test_keys_that_are_not_32_raw_bytes_are_refused():
    public, secret = zmq.curve_keypair()  # Z85 text, 40 characters
    with pytest.raises(RelayKeyError, match="32 raw bytes"):
        relay_key(secret, public, "dh1", "bank", RUN)


def test_a_wrong_key_fails_the_MAC():
    (_, p_sec), (l_pub, _), (_, other_sec) = keypair(), keypair(), keypair()
    up, _ = channels(relay_key(p_sec, l_pub, "dh1", "bank", RUN))
    _, down = channels(relay_key(other_sec, l_pub, "dh1", "bank", RUN))
    assert code_of(down, on_the_wire(up.wrap(epoch()))) is ErrorCode.IDENTITY_MISMATCH


def test_insecure_mode_uses_one_public_key_at_both_ends():
    up, down = channels(INSECURE_RELAY_KEY)
    assert same(down.receive(on_the_wire(up.wrap(epoch()))), epoch())


# ---------------------------------------------------------------------------------------------- round trips


def _field_values(kind: str):
    return {
        FieldKind.STR: st.text(max_size=20),
        FieldKind.ID: ids,
        FieldKind.INT: wire_ints,
        FieldKind.BOOL: st.booleans(),
        FieldKind.MAP: st.dictionaries(st.text(max_size=5), st.integers(0, 9) | st.text(max_size=5), max_size=3),
        FieldKind.VERSION: st.tuples(wire_ints, wire_ints),
        FieldKind.ID_LIST: st.lists(ids, max_size=3).map(tuple),
    }[kind]


@st.composite
def inner_messages(draw):
    """Any message type but RELAY, with random values for its fields (optional ones maybe absent) and, when it
    carries tensors, up to 3 random tensors of any allowed dtype."""
    cls = draw(st.sampled_from([c for t, c in sorted(MESSAGE_TYPES.items()) if t != "RELAY"]))
    values = {}
    for name, (kind, required) in cls.FIELDS.items():
        if required or draw(st.booleans()):
            values[name] = draw(_field_values(kind))
    if cls.CARRIES_TENSORS:
        values["tensors"] = draw(tensor_tuples.filter(lambda ts: all(t.name != HEADER_TENSOR for t in ts)))
    return cls(**values)


@given(inner_messages(), st.integers(0, 3))
@settings(max_examples=examples(600), deadline=None, suppress_health_check=list(HealthCheck))
def test_every_message_round_trips_through_a_relay_in_both_directions(inner, earlier):
    up, down = channels()
    for _ in range(earlier):  # some traffic first: the sequence numbers move on
        down.receive(on_the_wire(up.wrap(Heartbeat())))
        up.receive(on_the_wire(down.wrap(Heartbeat())))
    relayed = on_the_wire(up.wrap(inner))
    assert (relayed.party, relayed.conn, relayed.seq) == ("dh1", CONN, earlier)
    assert same(down.receive(relayed), inner)
    assert same(up.receive(on_the_wire(down.wrap(inner))), inner)
    assert up.next_send == down.next_recv == down.next_send == up.next_recv == earlier + 1


def test_the_relay_carries_the_inner_header_then_the_inner_tensors_unchanged():
    inner = Schedule(epochs=3, first_epoch=0, first_step=0,
                     tensors=(Tensor("validation", np.arange(7, dtype=np.int64)),))
    relay = channels()[0].wrap(inner)
    frames = encode(inner)
    assert [t.name for t in relay.tensors] == [HEADER_TENSOR, "validation"]
    assert relay.tensors[0].array.dtype == np.uint8 and relay.tensors[0].array.tobytes() == frames[1]
    assert relay.tensors[1].same_as(inner.tensors[0])
    assert len(relay.mac) == 64 and relay.mac == relay.mac.lower()
    assert peek_inner_type(relay) == "SCHEDULE" and peek_inner_type(on_the_wire(relay)) == "SCHEDULE"


def test_wrap_and_unwrap_copy_no_tensor():
    order = np.arange(100_000, dtype=np.int64)
    up, down = channels()
    relay = up.wrap(Epoch(epoch=0, first_step=0, tensors=(Tensor("order", order),)))
    assert np.shares_memory(relay.tensors[1].array, order)
    buffers = [bytearray(memoryview(f).cast("B")) for f in encode(relay)]
    frames = down.unwrap(decode(buffers))
    assert np.shares_memory(np.frombuffer(frames[2], np.uint8), np.frombuffer(buffers[3], np.uint8))
    assert np.shares_memory(decode(frames).tensors[0].array, np.frombuffer(buffers[3], np.uint8))


def test_wrap_refuses_what_cannot_be_relayed():
    up, _ = channels(limits=Limits(max_tensors=2))
    with pytest.raises(LocalProtocolError):  # the inner tensors and ~header exceed max_tensors
        up.wrap(Echo(seq=0, tensors=(Tensor("a", np.zeros(1)), Tensor("b", np.zeros(1)))))
    with pytest.raises(LocalProtocolError):  # the name is RELAY's
        up.wrap(Echo(seq=0, tensors=(Tensor(HEADER_TENSOR, np.zeros(1)),)))
    with pytest.raises(LocalProtocolError):  # relays are forwarded, never nested
        up.wrap(channels()[0].wrap(Heartbeat()))
    assert up.next_send == 0


# ------------------------------------------------------------------------------ what a segment holder cannot do


def _flip(arr: np.ndarray, bit: int) -> np.ndarray:
    raw = bytearray(np.ascontiguousarray(arr).reshape(-1).view(np.uint8).tobytes())
    raw[bit // 8 % len(raw)] ^= 1 << (bit % 8)
    return np.frombuffer(bytes(raw), arr.dtype).reshape(arr.shape)


@given(inner_messages(), st.data())
@settings(max_examples=examples(600), deadline=None, suppress_health_check=list(HealthCheck))
def test_a_flipped_bit_in_the_inner_header_or_any_inner_tensor_fails_the_MAC(inner, data):
    up, down = channels()
    relay = on_the_wire(up.wrap(inner))
    touched = [i for i, t in enumerate(relay.tensors) if t.array.nbytes]  # "~header" always has bytes
    i = data.draw(st.sampled_from(touched))
    bit = data.draw(st.integers(0, 8 * relay.tensors[i].array.nbytes - 1))
    tensors = list(relay.tensors)
    tensors[i] = Tensor(tensors[i].name, _flip(tensors[i].array, bit))
    assert code_of(down, Relay(party=relay.party, conn=relay.conn, seq=relay.seq, mac=relay.mac,
                               tensors=tuple(tensors))) is ErrorCode.IDENTITY_MISMATCH
    assert down.next_recv == 0
    assert same(down.receive(relay), inner)  # the authentic one still goes through


@given(inner_messages(), st.data())
@settings(max_examples=examples(600), deadline=None, suppress_health_check=list(HealthCheck))
def test_a_flipped_bit_anywhere_on_the_wire_is_refused_or_changes_nothing(inner, data):
    """Any frame of the encoded RELAY, its own header included: the next hop's decode or the end's checks refuse
    it, or (a bit of an outer tensor descriptor that relabels the same bytes, or of a key the codec ignores) the
    end still gets exactly the message that was sent."""
    up, down = channels()
    frames = [bytearray(memoryview(f).cast("B")) for f in encode(up.wrap(inner))]
    i = data.draw(st.sampled_from([i for i, f in enumerate(frames) if f]))
    bit = data.draw(st.integers(0, 8 * len(frames[i]) - 1))
    frames[i][bit // 8] ^= 1 << (bit % 8)
    try:
        got = down.receive(decode(frames))
    except RemoteProtocolError:
        assert down.next_recv == 0
    else:
        assert same(got, inner) and i == 1


def test_moving_bytes_between_frames_fails_the_MAC():
    up, down = channels()
    relay = up.wrap(Echo(seq=1, tensors=(Tensor("a", np.arange(4, dtype=np.uint8)),)))
    h, a = relay.tensors[0].array, relay.tensors[1].array
    moved = (Tensor(HEADER_TENSOR, h[:-1]), Tensor("a", np.concatenate([h[-1:], a])))
    assert code_of(down, Relay(party="dh1", conn=CONN, seq=0, mac=relay.mac, tensors=moved)) \
        is ErrorCode.IDENTITY_MISMATCH


def test_a_rewritten_seq_or_mac_fails_the_MAC():
    up, down = channels()
    relay = up.wrap(epoch())
    for bad in (Relay(party="dh1", conn=CONN, seq=1, mac=relay.mac, tensors=relay.tensors),
                Relay(party="dh1", conn=CONN, seq=0, mac=("1" if relay.mac[0] == "0" else "0") + relay.mac[1:],
                      tensors=relay.tensors)):
        assert code_of(down, bad) is ErrorCode.IDENTITY_MISMATCH


def test_a_replayed_relay_is_UNEXPECTED_MESSAGE():
    up, down = channels()
    relay = on_the_wire(up.wrap(epoch()))
    down.unwrap(relay)
    assert code_of(down, relay) is ErrorCode.UNEXPECTED_MESSAGE
    assert down.next_recv == 1


def test_reordered_or_dropped_relays_are_UNEXPECTED_MESSAGE():
    up, down = channels()
    first, second, third = (on_the_wire(up.wrap(epoch(first_step=s))) for s in (0, 5, 10))
    with pytest.raises(RemoteProtocolError, match="skips 1 message"):
        down.unwrap(second)
    assert code_of(down, third) is ErrorCode.UNEXPECTED_MESSAGE
    assert down.next_recv == 0
    for relay, step in ((first, 0), (second, 5), (third, 10)):  # in order they all go through
        assert down.receive(relay).first_step == step


def test_a_relay_is_bound_to_its_direction():
    """A segment holder cannot reflect a party's message back down to it as if the label holder had sent it."""
    up, _ = channels()
    assert code_of(up, on_the_wire(up.wrap(epoch()))) is ErrorCode.IDENTITY_MISMATCH


def test_a_relay_of_another_party_or_connection_is_BAD_FIELD():
    up, down = channels()
    relay = up.wrap(epoch())
    assert code_of(down, Relay(party="dh2", conn=CONN, seq=0, mac=relay.mac, tensors=relay.tensors)) \
        is ErrorCode.BAD_FIELD
    assert code_of(down, Relay(party="dh1", conn="dh1/fedcba9876543210", seq=0, mac=relay.mac,
                               tensors=relay.tensors)) is ErrorCode.BAD_FIELD
    assert code_of(channels(conn="dh1/fedcba9876543210")[1], relay) is ErrorCode.BAD_FIELD


def test_a_relay_moved_to_a_new_connection_or_another_party_fails_the_MAC():
    """A party that reconnected has a new conn and sequence numbers from 0: its old connection's RELAYs, relabelled,
    do not verify there; nor does one party's RELAY relabelled as another's under the same key."""
    new_conn = "dh1/fedcba9876543210"
    relay = channels()[0].wrap(epoch())
    _, down_new = channels(conn=new_conn)
    assert code_of(down_new, Relay(party="dh1", conn=new_conn, seq=0, mac=relay.mac, tensors=relay.tensors)) \
        is ErrorCode.IDENTITY_MISMATCH
    _, down_dh2 = channels(party="dh2")
    assert code_of(down_dh2, Relay(party="dh2", conn=CONN, seq=0, mac=relay.mac, tensors=relay.tensors)) \
        is ErrorCode.IDENTITY_MISMATCH


@pytest.mark.parametrize("mac", ["", "0" * 63, "A" * 64, "g" * 64, "\u00e9" * 64, "0" * 65])
def test_a_mac_that_is_not_64_lowercase_hex_is_BAD_FIELD(mac):
    up, down = channels()
    relay = up.wrap(epoch())
    assert code_of(down, Relay(party="dh1", conn=CONN, seq=0, mac=mac, tensors=relay.tensors)) is ErrorCode.BAD_FIELD


def test_the_inner_header_must_come_first_as_uint8_1d():
    up, down = channels()
    relay = up.wrap(epoch())
    h, order = relay.tensors
    for tensors in ((), (order,), (order, h), (Tensor(HEADER_TENSOR, h.array.view(np.int8)), order),
                    (Tensor(HEADER_TENSOR, h.array.reshape(1, -1)), order)):
        assert code_of(down, Relay(party="dh1", conn=CONN, seq=0, mac=relay.mac, tensors=tensors)) \
            is ErrorCode.BAD_TENSOR
    assert peek_inner_type(Relay(party="dh1", conn=CONN, seq=0, mac=relay.mac, tensors=(order,))) is None


def test_an_inner_header_over_max_header_bytes_is_TOO_LARGE_before_the_MAC():
    up, _ = channels()
    _, down = channels(limits=Limits(max_header_bytes=64))
    relay = up.wrap(Bye(ok=False, reason="x" * 100))
    assert code_of(down, relay) is ErrorCode.TOO_LARGE and down.next_recv == 0


def test_an_authentic_inner_message_that_fails_section_3_is_its_own_error_and_counts():
    up_limits, down_limits = Limits(), Limits(max_tensor_bytes=16)  # the receiver's limits apply to the inner one
    _, down = channels(limits=down_limits)
    relay = RelayChannel(KEY, RUN, "dh1", CONN, "up", limits=up_limits).wrap(epoch(n=5))  # 40 bytes > 16
    with pytest.raises(RemoteProtocolError) as info:
        down.receive(relay)
    assert info.value.code is ErrorCode.TOO_LARGE and info.value.ref == "EPOCH"
    assert down.next_recv == 1
