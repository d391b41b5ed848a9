"""A segment holder (PROTOCOL.md section 13, v1.10), sans-I/O: a model segment between its inputs and its downstream.

Towards its downstream (the label holder, or another segment holder) it is a party like a data holder: one session
with the label holder (its own ``DataHolderMachine`` with role ``segment_holder``, no PSI) whose training pipeline
sends FORWARDs of its segment's activations and applies BACKWARDs. Its inputs connect to it: their FORWARDs are its
segment's input (``Feed``), and each BACKWARD it applies sends one BACKWARD to each input. Everything else its inputs
and the label holder say to each other passes through it as RELAY, unchanged and authenticated end to end, so it can
route but not forge ([C3]); it looks at the type of what it relays only to keep its inputs' pipelines apart ([C7]).

Outputs: ``Send(to=None)`` goes downstream, ``Send(to=routing id)`` to that input's connection.
"""

from __future__ import annotations

import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .codec import DEFAULT_LIMITS, SIGNATURE, Limits, decode, decode_or_failure, peek_type
from .data_holder import DataHolderMachine
from .errors import ErrorCode, RemoteProtocolError, VflError
from .events import Aligned, Finished, Log, Output, Send
from .messages import Backward, Bye, Error, EvalForward, Forward, Hello, Message, Relay, Rollback, Schedule
from .precision import PrecisionError
from .precision import decode as decode_cut
from .precision import encode as encode_cut
from .relay import RelayChannel, _flat_bytes, peek_inner_type
from .relayed import up_as_relay
from .routing import party_of
from .session import SessionConfig
from .text import peer_text
from .timers import TokenBucket

ERROR_BURST, ERROR_RATE = 100, 100.0  # [R2], per input


class ModelSegment:
    """What a segment holder computes: its model over the combination of its inputs' activations (``TorchMiddle``)."""

    def forward(self, step: int, activations: Mapping[str, np.ndarray], train: bool) -> np.ndarray: ...

    def backward(self, step: int, gradient: np.ndarray) -> dict[str, np.ndarray]: ...

    def checkpoint(self, step: int, epoch: int, keep: bool = False) -> str: ...

    def restore(self, step: int, digest: str | None) -> None: ...


@dataclass
class _Input:
    """One input of this segment holder: its connection and the cut-layer messages of its current pipeline."""

    name: str
    width: int
    route: bytes | None = None  # the routing id of its connection whose HELLO passed last
    forwards: dict[int, np.ndarray] = field(default_factory=dict)
    evals: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)
    next_forward: int = 0
    next_backward: int = 0  # the next step whose BACKWARD it gets from us
    next_eval: dict[int, int] = field(default_factory=dict)  # epoch -> next validation batch
    #: [C7] its messages belong to an abandoned pipeline until it echoes ROLLBACK (or gets a SCHEDULE without one)
    rolling_back: bool = False
    echo_due: bool = False  # a ROLLBACK to it passed through us: its echo ends ``rolling_back``
    errors: TokenBucket = field(default_factory=lambda: TokenBucket(ERROR_BURST, ERROR_RATE))

    def clear(self, first_step: int) -> None:
        self.forwards.clear()
        self.evals.clear()
        self.next_eval.clear()
        self.next_forward = self.next_backward = first_step


class Feed:
    """The bottom segment of the segment holder's own pipeline (``BottomSegment``): a step's forward is its segment
    over its inputs' activations for that step, computed once they are all in (``ready``)."""

    def __init__(self, segment: ModelSegment, inputs: Mapping[str, _Input], config: SessionConfig, party: str):
        self.segment = segment
        self.inputs = inputs
        self.precision = config.precision
        self.party = party
        self.pipeline = None  # the DataHolderTraining it computes for (its rows, window, validation)
        self.sent: list[Send] = []  # BACKWARDs for the inputs, taken by the machine after each event
        self.fault: tuple[str, RemoteProtocolError] | None = None  # an input sent what this step cannot use

    # hooks DataHolderTraining calls
    def ready(self, kind: str, key) -> bool:
        if self.fault is not None:
            return False
        for q in self.inputs.values():
            box = q.forwards if kind == "train" else q.evals
            if key not in box:
                return False
        return True

    def _take(self, kind: str, key, rows: np.ndarray) -> dict[str, np.ndarray]:
        acts = {}
        for name, q in self.inputs.items():
            arr = (q.forwards if kind == "train" else q.evals).pop(key)
            if arr.shape[0] != len(rows):
                what = f"step {key}" if kind == "train" else f"validation batch {key[1]} of epoch {key[0]}"
                raise _InputFault(name, RemoteProtocolError(
                    ErrorCode.BAD_TENSOR, f"activations of {what} have {arr.shape[0]} rows; the batch has {len(rows)}",
                    ref=Forward.TYPE if kind == "train" else EvalForward.TYPE))
            acts[name] = arr
        return acts

    def forward(self, step: int, rows: np.ndarray, train: bool) -> np.ndarray:
        return self.segment.forward(step, self._take("train", step, rows), True)

    def forward_eval(self, epoch: int, batch: int, rows: np.ndarray) -> np.ndarray:
        return self.segment.forward(-1, self._take("eval", (epoch, batch), rows), False)

    def backward(self, step: int, gradient: np.ndarray) -> None:
        grads = self.segment.backward(step, gradient)
        for name, q in self.inputs.items():
            q.next_backward = step + 1
            if q.route is None or q.rolling_back:
                continue
            tensors = encode_cut("gradient", grads[name], self.precision.gradients, f"BACKWARD step {step} to {name}")
            self.sent.append(Send(to=q.route, message=Backward(step=step, tensors=tensors)))

    def checkpoint(self, step: int, epoch: int, keep: bool = False) -> str:
        return self.segment.checkpoint(step, epoch, keep=keep)

    def restore(self, step: int, digest: str | None) -> None:
        self.segment.restore(step, digest)

    def new_pipeline(self) -> None:
        """The own pipeline starts over (a ROLLBACK, or a SCHEDULE that resumes): what any input sent for the old one
        is void, and until each input echoes its own ROLLBACK (or gets its SCHEDULE) it still speaks for it."""
        restore = getattr(self.segment, "drop_in_flight", None)
        if restore is not None:
            restore()
        for q in self.inputs.values():
            q.clear(0)
            q.rolling_back = True
            q.echo_due = False


class _InputFault(VflError):
    """An input's activations turned out unusable only when its step was computed (another row count than the
    batch): the machine answers that input and ends the session; never leaves the machine."""

    def __init__(self, party: str, error: RemoteProtocolError):
        super().__init__(str(error))
        self.party, self.error = party, error


class SegmentHolderMachine:
    """One segment holder: its own session downstream, its inputs upstream, the relays between them."""

    #: the inputs' connections are the node's to keep alive; liveness is the label holder's, end to end
    drops_non_readers = False

    def __init__(
        self,
        own: DataHolderMachine,
        *,
        party: str,
        config: SessionConfig,
        limits: Limits = DEFAULT_LIMITS,
        relay_key: bytes | None = None,
    ):
        """``own``: this party's session with the label holder (role ``segment_holder``). ``relay_key``: when this
        segment holder does not feed the label holder directly, the key of its own relayed session ([C3])."""
        self.own = own
        self.party = party
        self.config = config
        self.chain = config.chain
        self.limits = limits
        self.relay_key = relay_key
        self.relayed = self.chain.relayed(party)
        if self.relayed and relay_key is None:
            raise ValueError(f"segment holder {party!r} is behind another one: give it its relay key")
        if self.relayed:  # its connection goes to the next segment holder, not to the label holder
            own.link = f"segment holder {self.chain.downstream(party)!r}"
        self.inputs = {p: _Input(p, w) for p, w in self.chain.input_widths(party).items()}
        self.feed: Feed | None = None
        self._channel: RelayChannel | None = None  # our own relayed session's, per downstream connection
        self.finished: Finished | None = None

    # ------------------------------------------------------------------------------------------------ lifecycle

    def start(self, now: float) -> list[Output]:
        return self._own(self.own.start(now))

    def connected(self, routing_id: bytes) -> None:
        """The node opened a downstream connection with routing id ``routing_id``: our relayed session's messages
        on it are numbered from 0 ([C3])."""
        if self.relayed:
            self._channel = RelayChannel(self.relay_key, run=self.own.run, party=self.party,
                                         conn=routing_id.decode(), sends="up", limits=self.limits)


    def start_training(self, segment: ModelSegment, now: float) -> list[Output]:
        self.feed = Feed(segment, self.inputs, self.config, self.party)
        return self._own(self.own.start_training(self.feed, None, now))

    @property
    def has_work(self) -> bool:
        return self.finished is None and self.own.has_work

    @property
    def work_first(self) -> bool:
        return self.finished is None and self.own.work_first

    def work(self, now: float) -> list[Output]:
        return self._guard(lambda: self.own.work(now), now)

    def handle_timer(self, now: float) -> list[Output]:
        return self._own(self.own.handle_timer(now))

    def keepalive(self, now: float) -> list[Output]:
        return self._own(self.own.keepalive(now))

    def next_timer(self) -> float | None:
        return self.own.next_timer()

    def close(self, reason: str, now: float, *, pause: bool = False) -> list[Output]:
        return self._own(self.own.close(reason, now, pause=pause))

    def connection_lost(self, now: float) -> list[Output]:
        return self._own(self.own.connection_lost(now))

    def refused_by_zap(self, status: int = 400, now: float = 0.0) -> list[Output]:
        return self._own(self.own.refused_by_zap(status, now))

    @property
    def training_done(self) -> bool:
        return self.own.training_done

    # ------------------------------------------------------------------------------------------------ downstream

    def receive_down(self, frames: Sequence, now: float) -> list[Output]:
        """A message from our downstream: for us (our session's, or a BACKWARD), or a RELAY for a party behind us.

        Once our own session has ended, the relayed BYEs for the parties behind us still pass: when we end the
        session, the label holder's BYEs that end it for them come through us after our BYE (the node drains them).
        Nothing else does: training control still in flight (a CHECKPOINT after a BACKWARD we no longer compute)
        would only break their pipelines ([C6])."""
        if self.finished is not None and peek_type(frames) != Relay.TYPE:
            return []
        if peek_type(frames) != Relay.TYPE:
            mtype = peek_type(frames)
            if self.relayed and mtype not in (Backward.TYPE, Error.TYPE):
                return [Log(level="WARNING", text=f"dropped a {peer_text(str(mtype), 40)} from the segment holder "
                            "downstream: only BACKWARD, ERROR and RELAY come from it")]
            if self.relayed and mtype == Error.TYPE:  # the hop's own complaint, about our FORWARDs
                return [Log(level="WARNING", text="the segment holder downstream reports an error: "
                            + peer_text(_error_text(frames, self.limits), 400))]
            return self._guard(lambda: self.own.receive(frames, now), now)
        try:
            msg = decode(frames, self.limits)
        except RemoteProtocolError as exc:
            return [Log(level="WARNING", text=f"dropped a malformed RELAY from downstream: {exc}")]
        if msg.party == self.party:
            if self.finished is not None:
                return []
            if self._channel is None:
                return [Log(level="WARNING", text="dropped a RELAY for this segment holder, which feeds the label "
                            "holder directly")]
            try:
                inner = self._channel.unwrap(msg)
            except RemoteProtocolError as exc:
                return [Log(level="WARNING", text=f"dropped a RELAY that is not the label holder's: {exc}")]
            return self._guard(lambda: self.own.receive(inner, now), now)
        hop = self.chain.hop_towards(self.party, msg.party) if msg.party in self.chain.cut_widths or \
            msg.party in self.chain.segments else None
        if hop is None:
            return [Log(level="WARNING", text=f"dropped a RELAY for {peer_text(msg.party, 64)}, who is not behind "
                        "this segment holder")]
        q = self.inputs[hop]
        if self.finished is not None and peek_inner_type(msg) != Bye.TYPE:
            return []
        if q.route is None:
            return [Log(level="DEBUG", text=f"dropped a RELAY for {msg.party!r}: {hop!r} is not connected")]
        if hop == msg.party:  # [C7]: what the label holder says to a direct input about its pipeline
            inner = peek_inner_type(msg)
            if inner == Rollback.TYPE:
                q.rolling_back, q.echo_due = True, True
                q.clear(0)
            elif inner == Schedule.TYPE:
                first = self._first_step(msg)
                if first is None:
                    return [Log(level="WARNING", text=f"dropped a malformed relayed SCHEDULE for {hop!r}")]
                q.clear(first)
                if not q.echo_due:  # it rejoined: it gets no ROLLBACK, and its old pipeline died with its connection
                    q.rolling_back = False
        return [Send(to=q.route, message=msg)]

    def _first_step(self, msg: Relay) -> int | None:
        """``first_step`` of a relayed SCHEDULE (its header only; the label holder's MAC is the receiver's to check)."""
        try:
            inner = decode([SIGNATURE, msg.tensor_list[0].array, *[_flat_bytes(t.array) for t in msg.tensor_list[1:]]],
                           self.limits)
        except (RemoteProtocolError, IndexError, ValueError):
            return None
        return inner.first_step if isinstance(inner, Schedule) else None

    # ------------------------------------------------------------------------------------------------ upstream

    def receive_up(self, routing_id: bytes, identity: str | None, frames: Sequence, now: float) -> list[Output]:
        """A message from one of our inputs' connections (``identity``: the party its CURVE key belongs to)."""
        if self.finished is not None:
            return []
        if identity is None:
            return [Log(level="WARNING", text=f"dropped a message from {peer_text(routing_id, 80)}: no identity")]
        # the label holder's order (section 2: [S3]-[S5] apply to the inputs' connections): decode; an ERROR is
        # only logged ([M2]); then [S4], before a section 3 failure is answered
        msg, failure, mtype = decode_or_failure(frames, self.limits)
        if mtype == Error.TYPE:
            if msg is None:
                return []
            return [Log(level="WARNING", text=f"input {identity!r} reports: {peer_text(msg.message, 400)}")]
        ref = mtype if isinstance(mtype, str) else None
        if party_of(routing_id) != identity:  # [S4]
            return self._refuse(identity, routing_id, RemoteProtocolError(
                ErrorCode.IDENTITY_MISMATCH, f"your key belongs to {identity!r} but your routing id claims "
                f"{peer_text(party_of(routing_id), 64)}", ref=ref), now)
        if failure is not None:
            return self._refuse(identity, routing_id, failure, now)
        assert msg is not None
        q = self.inputs.get(identity)
        if q is None:
            return self._refuse(identity, routing_id, RemoteProtocolError(
                ErrorCode.UNKNOWN_PARTY, f"{identity!r} is not an input of segment holder {self.party!r}",
                ref=msg.TYPE), now)
        if isinstance(msg, Relay):
            return self._relay_up(q, routing_id, msg, now)
        if routing_id != q.route:
            return self._refuse(identity, routing_id, RemoteProtocolError(
                ErrorCode.UNEXPECTED_MESSAGE, f"{msg.TYPE} on a connection that has not said HELLO (through us)",
                ref=msg.TYPE), now)
        if isinstance(msg, (Forward, EvalForward)):
            if q.rolling_back:
                return [Log(level="DEBUG", text=f"dropped a stale {msg.TYPE} of {identity!r} (rollback pending)")]
            try:
                self._take_cut(q, msg)
            except RemoteProtocolError as exc:  # [X2], [X6]: as the label holder does, the session ends
                err = Error(code=int(exc.code), message=exc.detail, ref=exc.ref)
                reason = f"training with input {identity!r} failed at segment holder {self.party!r}: {exc}"
                return [Send(to=routing_id, message=err)] + self._end(reason, now)
            return self._guard(lambda: [], now)
        return self._refuse(identity, routing_id, RemoteProtocolError(
            ErrorCode.UNEXPECTED_MESSAGE, f"{msg.TYPE} goes to the label holder as RELAY, or is not an input's to send",
            ref=msg.TYPE), now)

    def _relay_up(self, q: _Input, routing_id: bytes, msg: Relay, now: float) -> list[Output]:
        """[C3]: a relayed message from ``q`` itself or from a party behind it, passed downstream unchanged."""
        behind = msg.party == q.name or (q.name in self.chain.segments and msg.party in self.chain.upstream(q.name))
        if not behind:
            return self._refuse(q.name, routing_id, RemoteProtocolError(
                ErrorCode.IDENTITY_MISMATCH, f"RELAY for {peer_text(msg.party, 64)} from {q.name!r}, who does not "
                "speak for it", ref=msg.TYPE), now)
        if msg.party == q.name:
            inner = peek_inner_type(msg)
            if inner == Hello.TYPE:  # a new connection of this input: its messages go there from now on ([S5])
                if q.route != routing_id:
                    q.route = routing_id
                    q.clear(0)
                    # until its SCHEDULE passes, nothing of the pipeline in progress is its: no BACKWARD goes to it
                    q.rolling_back, q.echo_due = True, False
            elif routing_id != q.route:
                return [Log(level="DEBUG", text=f"dropped a RELAY of {q.name!r} from a connection it replaced")]
            elif inner == Rollback.TYPE and q.echo_due:  # its echo: its messages are the new pipeline's again
                q.rolling_back = q.echo_due = False
        elif routing_id != q.route:
            return [Log(level="DEBUG", text=f"dropped a RELAY through {q.name!r} on a connection it replaced")]
        return [Send(to=None, message=msg)]

    def _take_cut(self, q: _Input, msg: Forward | EvalForward) -> None:
        """[X2], [X6] for one input, as the label holder checks them: in order, within the window, the right shape."""
        train = self.own._train
        if train is None or train.epochs is None:
            raise RemoteProtocolError(ErrorCode.UNEXPECTED_MESSAGE, f"{msg.TYPE} before this segment holder's "
                                      "SCHEDULE", ref=msg.TYPE)
        n = _rows_of(msg)
        if isinstance(msg, Forward):
            if msg.step != q.next_forward:
                raise RemoteProtocolError(ErrorCode.UNEXPECTED_MESSAGE, f"FORWARD for step {msg.step}; expected step "
                                          f"{q.next_forward}", ref=msg.TYPE)
            if msg.step >= q.next_backward + train.window:
                raise RemoteProtocolError(ErrorCode.UNEXPECTED_MESSAGE, f"FORWARD for step {msg.step} exceeds the "
                                          f"window {train.window} (step {q.next_backward} is unanswered)", ref=msg.TYPE)
            q.forwards[msg.step] = decode_cut(msg, "activations", n, q.width, self.config.precision.activations)
            q.next_forward += 1
            return
        # [X5]: an input validates epoch e once it has every BACKWARD of e's steps from us (it validates on the
        # weights after e's last step), and until our own validation of e is sent (e is then closed)
        expected = q.next_eval.get(msg.epoch, 0)
        ends = {e: end for e, _first, end in train._open}
        end = ends.get(msg.epoch)
        if train.done is not None or end is None or q.next_backward < end:
            raise RemoteProtocolError(ErrorCode.UNEXPECTED_MESSAGE, f"EVAL_FORWARD epoch {msg.epoch} batch "
                                      f"{msg.batch} outside a validation of {q.name!r}: "
                                      + (f"it has not had the BACKWARD of step {end - 1}, epoch {msg.epoch}'s last"
                                         if end is not None and train.done is None else
                                         f"epoch {msg.epoch} is not open"), ref=msg.TYPE)
        if msg.batch != expected or msg.batch >= len(train.validation):
            raise RemoteProtocolError(ErrorCode.UNEXPECTED_MESSAGE, f"EVAL_FORWARD epoch {msg.epoch} batch "
                                      f"{msg.batch}; expected batch {expected} of epoch {msg.epoch}", ref=msg.TYPE)
        q.evals[(msg.epoch, msg.batch)] = decode_cut(msg, "activations", n, q.width,
                                                     self.config.precision.activations)
        q.next_eval = {e: b for e, b in q.next_eval.items() if e in ends}
        q.next_eval[msg.epoch] = msg.batch + 1

    # ------------------------------------------------------------------------------------------------ helpers

    def _own(self, outs: list[Output]) -> list[Output]:
        """Our own session's outputs, then the BACKWARDs our segment computed for the inputs. (A segment holder
        behind another one wraps its session's messages as RELAY when the node sends them: ``outgoing``.)"""
        result: list[Output] = []
        for out in outs:
            if isinstance(out, Finished):
                self.finished = out
            result.append(out)
        if self.feed is not None and self.feed.sent:
            result += self.feed.sent
            self.feed.sent = []
        return result

    def outgoing(self, out: Output) -> Output | None:
        """What the node sends for ``out``: behind another segment holder, our own session's messages go up as
        RELAY on the channel of the current downstream connection ([C3]); the rest as it is. Wrapped when sent, not
        when made: a rejoin's HELLO follows its ``Reconnect`` in one batch and belongs to the new connection
        (wrapped when made, it went up numbered for the old one, the label holder took it as the old connection's,
        and its answers, relayed for the old ``conn``, were refused on the new one: the rejoin never completed)."""
        return up_as_relay(out, self._channel) if self.relayed else out

    def _guard(self, call, now: float) -> list[Output]:
        """Run our own machine; an input's bad activations found only when its step is computed end the session."""
        try:
            outs = call()
        except _InputFault as fault:
            q = self.inputs[fault.party]
            out: list[Output] = []
            if q.route is not None:
                out.append(Send(to=q.route, message=Error(code=int(fault.error.code), message=fault.error.detail,
                                                          ref=fault.error.ref)))
            return self._own(out) + self._end(f"input {fault.party!r}: {fault.error}", now)
        except PrecisionError as exc:
            return self._end(f"segment holder {self.party}: {exc}", now)
        return self._own(outs)

    def _end(self, reason: str, now: float) -> list[Output]:
        """End our session (BYE downstream: the label holder then ends it for everyone), exit 1."""
        return self._own(self.own.abort(reason))

    def _refuse(self, identity: str, routing_id: bytes, exc: RemoteProtocolError, now: float) -> list[Output]:
        q = self.inputs.get(identity)
        if q is not None and not q.errors.allow(now):
            return []
        err = Error(code=int(exc.code), message=exc.detail, ref=exc.ref)
        return [Log(level="WARNING", text=f"{identity!r}: {peer_text(str(exc), 300)}"), Send(to=routing_id, message=err)]


def _rows_of(msg: Message) -> int:
    """The declared row count of a cut-layer message (its ``activations`` tensor), for the shape check."""
    for t in msg.tensor_list:
        if t.name == "activations" and t.array.ndim == 2:
            return int(t.array.shape[0])
    return -1


def _error_text(frames: Sequence, limits: Limits) -> str:
    try:
        msg = decode(frames, limits)
    except RemoteProtocolError as exc:
        return f"(malformed ERROR: {exc})"
    return getattr(msg, "message", "")
