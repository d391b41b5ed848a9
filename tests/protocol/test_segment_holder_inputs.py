"""The segment holder's machine in memory (PROTOCOL.md section 13): what it answers its inputs.

The same rules the conformance kit checks on a live segment holder (tests/conformance/test_segment_holder.py), here
without sockets: [S4] and [M2] in the label holder's order on its input side, and [C7]'s EVAL_FORWARD check ([X5]).
"""

from __future__ import annotations

import numpy as np

from vfl.protocol import DataHolderMachine, SessionConfig, Send, encode
from vfl.protocol.codec import SIGNATURE
from vfl.protocol.errors import ErrorCode
from vfl.protocol.events import Aligned, Finished
from vfl.protocol.messages import Bye, Epoch, Error, EvalForward, Hello, Schedule, Tensor, Welcome
from vfl.protocol.relay import RelayChannel
from vfl.protocol.segment_holder import SegmentHolderMachine
from vfl.protocol.session import digest_of

RUN = "r1"
SESSION = {"cut_widths": {"dh1": 4, "dh2": 4}, "batch_size": 4, "window": 2, "model": "m", "psi": True,
           "train": True, "segments": {"seg1": {"inputs": ["dh1"], "width": 4, "combine": "concat"}}}
DH1 = b"dh1/0123456789abcdef"


class Zeros:
    """A segment that computes nothing: these tests never get as far as a step."""

    def forward(self, step, activations, train):
        return np.zeros((len(next(iter(activations.values()))), 4), np.float32)


def machine() -> SegmentHolderMachine:
    cfg = SessionConfig.from_wire(SESSION)
    own = DataHolderMachine(party="seg1", run=RUN, config=cfg, now=0.0, role="segment_holder")
    m = SegmentHolderMachine(own, party="seg1", config=cfg)
    m.start(0.0)
    return m


def errors(outs) -> list[tuple[bytes | None, int]]:
    return [(o.to, o.message.code) for o in outs if isinstance(o, Send) and isinstance(o.message, Error)]


def test_S4_a_malformed_message_on_another_partys_routing_id_is_IDENTITY_MISMATCH():
    m = machine()
    outs = m.receive_up(b"dh2/0123456789abcdef", "dh1", [b"XXXXX", b"\xc1"], 1.0)
    assert errors(outs) == [(b"dh2/0123456789abcdef", ErrorCode.IDENTITY_MISMATCH)]
    # on its own routing id the same message gets the code of its first failing section 3 check
    assert errors(m.receive_up(DH1, "dh1", [b"XXXXX", b"\xc1"], 1.0)) == [(DH1, ErrorCode.BAD_SIGNATURE)]


def test_M2_an_ERROR_from_an_input_is_never_answered_whatever_its_routing_id():
    m = machine()
    valid = encode(Error(code=int(ErrorCode.BAD_FIELD), message="x"))
    malformed = [SIGNATURE, b"\x83\xa4type\xa5ERROR\xa4code\xa16\xa7message\xa1x"]  # code is a str
    for rid in (DH1, b"dh2/0123456789abcdef"):
        for frames in (valid, malformed):
            assert errors(m.receive_up(rid, "dh1", frames, 1.0)) == []


def _relay(channel: RelayChannel, msg) -> list:
    return encode(channel.wrap(msg))


def test_C7_an_EVAL_FORWARD_outside_the_inputs_validation_ends_the_session():
    """[C7] / [X5]: right after its SCHEDULE and EPOCH, before any step, an input cannot be validating."""
    m = machine()
    cfg = SessionConfig.from_wire(SESSION)
    outs = m.receive_down(encode(Welcome(version=(1, 10), party="bank", run=RUN, digest=digest_of(cfg.to_wire()),
                                         heartbeat_ms=1000, peer_timeout_ms=60000,
                                         data_holders=("dh1", "dh2"))), 1.0)
    assert any(isinstance(o, Aligned) for o in outs), outs
    m.start_training(Zeros(), 1.0)
    validation = Tensor("validation", np.arange(12, 16, dtype=np.int64))
    schedule = Schedule(epochs=1, first_epoch=0, first_step=0, rows=16, tensors=(validation,))
    epoch = Epoch(epoch=0, first_step=0, tensors=(Tensor("order", np.arange(12, dtype=np.int64)),))
    m.receive_down(encode(schedule), 1.0)
    m.receive_down(encode(epoch), 1.0)
    up = RelayChannel(bytes(32), run=RUN, party="dh1", conn=DH1.decode(), sends="up")
    down = RelayChannel(bytes(32), run=RUN, party="dh1", conn=DH1.decode(), sends="down")
    hello = Hello(version=(1, 10), role="data_holder", party="dh1", run=RUN, config=SESSION, digest=digest_of(SESSION))
    assert m.receive_up(DH1, "dh1", _relay(up, hello), 1.0)  # forwarded: DH1 is dh1's current connection
    for msg in (schedule, epoch):  # dh1's own, relayed through us: its FORWARDs are its pipeline's from now on
        m.receive_down(_relay(down, msg), 1.0)
    acts = Tensor("activations", np.zeros((4, 4), np.float32))
    outs = m.receive_up(DH1, "dh1", encode(EvalForward(epoch=0, batch=0, tensors=(acts,))), 1.0)
    assert errors(outs) == [(DH1, ErrorCode.UNEXPECTED_MESSAGE)]
    assert any(isinstance(o, Send) and isinstance(o.message, Bye) and o.message.ok is False for o in outs), outs
    assert any(isinstance(o, Finished) and o.exit_code == 1 for o in outs), outs
