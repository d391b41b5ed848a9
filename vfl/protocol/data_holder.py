"""The data holder's side of the session layer (PROTOCOL.md sections 6 and 9), sans-I/O.

A data holder has one peer, its label holder. It says HELLO, waits for WELCOME within its handshake timeout, runs the
configured link check (ECHO round trips, verifying every byte comes back), then leaves with BYE.
"""

from __future__ import annotations

import enum
import re
import traceback
from typing import Any, Callable, Sequence

from .codec import DEFAULT_LIMITS, PROTOCOL_VERSION, Limits, decode, peek_type
from .errors import ErrorCode, RemoteProtocolError
from .events import EXIT_PAUSED, Aligned, Finished, LinkChecked, Log, Output, Reconnect, Send
from .messages import (
    Backward,
    Bye,
    Checkpoint,
    Rollback,
    Echo,
    EchoReply,
    Error,
    Heartbeat,
    Hello,
    Message,
    PsiBucket,
    PsiItems,
    PsiReply,
    PsiRows,
    PsiStart,
    Schedule,
    Tensor,
    TrainingDone,
    Welcome,
    Window,
)
from .messages import Epoch as EpochMessage
from .psi_phase import DEFAULT_MAX_PSI_ITEMS, FinalRows, PairwisePsi, PsiPlan
from .text import peer_text
from .precision import PrecisionError
from .training_phase import BottomSegment, CheckpointError, DataHolderTraining
from .session import SessionConfig, describe_diff
from .timers import PeerClock, Reminder, TokenBucket

ERROR_BURST = 100  # [R2]
ERROR_RATE = 100.0
DEFAULT_MAX_REJOINS = 3  # [J3]: rejoins of one data holder process, whatever made it rejoin
#: [J1] a connection that drops before the WELCOME is replaced by a fresh one at most this often
RECONNECT_MIN_S = 0.5
WAITING_NOTE_S = 10.0  # how often a data holder that waits for its label holder says it still does


class DataHolderState(enum.Enum):
    CONNECTING = "CONNECTING"
    READY = "READY"
    PSI = "PSI"
    ALIGNED = "ALIGNED"
    TRAINING = "TRAINING"
    CLOSED = "CLOSED"


#: states with a live session: heartbeats and the peer timeout apply, BYE is sent on leaving
CONNECTED = frozenset(
    {DataHolderState.READY, DataHolderState.PSI, DataHolderState.ALIGNED, DataHolderState.TRAINING}
)
#: states in which the peer must keep the phase moving ([P10], [X?]): heartbeats alone do not count
PROGRESSING = frozenset({DataHolderState.PSI, DataHolderState.TRAINING})


Handler = Callable[["DataHolderMachine", Message, float], list[Output]]


class DataHolderMachine:
    """One data holder's session with its label holder."""

    def __init__(
        self,
        *,
        party: str,
        run: str,
        config: SessionConfig,
        now: float,
        handshake_timeout_s: float = 60.0,
        link_check: Sequence[Tensor] = (),
        link_rounds: int = 0,
        hold_s: float = 0.0,
        label_holder: str = "the label holder",
        limits: Limits = DEFAULT_LIMITS,
        psi: PsiPlan | None = None,
        progress_timeout_s: float = 600.0,
        max_psi_items: int = DEFAULT_MAX_PSI_ITEMS,
        rejoin_timeout_s: float = 120.0,
        max_rejoins: int = DEFAULT_MAX_REJOINS,
        role: str = "data_holder",
    ):
        """``role`` "segment_holder" (v1.10): the same session with the label holder, but no PSI (it holds no IDs):
        after its WELCOME it is aligned at once, and its SCHEDULE says how many rows the others aligned."""
        if role not in ("data_holder", "segment_holder"):
            raise ValueError(f"role must be data_holder or segment_holder, not {role!r}")
        self.role = role
        #: the node this party's connection goes to, when it is not the label holder (v1.10: its segment holder)
        self.link: str | None = None
        self.party = party
        self.run = run
        self.config = config
        self.limits = limits
        self.state = DataHolderState.CONNECTING
        self.handshake_deadline = now + handshake_timeout_s
        self._reminder = Reminder(now, WAITING_NOTE_S)  # "still waiting" while CONNECTING
        self.label_holder = label_holder
        self.link_check = tuple(link_check)
        self.link_rounds = link_rounds
        self.hold_s = hold_s
        self.finished: Finished | None = None
        self.clock: PeerClock | None = None
        self.heartbeat_s = 1.0
        self.peer_timeout_s = 30.0
        self.session_minor = PROTOCOL_VERSION[1]  # the session's minor version, from the WELCOME
        self._echo_seq = 0
        self._echo_sent_at = 0.0
        self._rtts: list[float] = []
        self._leave_at: float | None = None
        self._bucket = TokenBucket(ERROR_BURST, ERROR_RATE)
        self._cooling_since: float | None = None  # the label holder refuses our key for now ([B5], ZAP status 500)
        if role == "segment_holder":
            if party not in config.segments:
                raise ValueError(f"{party!r} is not a segment holder of this session")
            psi = None
        elif config.psi and psi is None:
            raise ValueError("the session config says psi = true: give the data holder a PsiPlan")
        if psi is not None and psi.buckets != config.psi_buckets:  # the session config is what both parties agreed on
            raise ValueError(f"the PsiPlan has buckets = {psi.buckets!r} but the session config psi_buckets = "
                             f"{config.psi_buckets!r}")
        self.psi_plan = psi if config.psi else None
        self.progress_timeout_s = progress_timeout_s
        self.max_psi_items = max_psi_items
        self._psi: PairwisePsi | None = None
        self._final: FinalRows | None = None
        self._nonce: str | None = None
        self._last_progress = 0.0
        self._train: DataHolderTraining | None = None
        self.rejoin_timeout_s = rejoin_timeout_s
        self.max_rejoins = max_rejoins
        self.rejoins = 0
        self._instance: str | None = None  # [J1] the label holder process we are in a session with
        self._socket_at = now  # when the current connection was opened
        self._reconnect_at: float | None = None  # [J1] a dropped connection before WELCOME: replace it then

    def start(self, now: float) -> list[Output]:
        """The first message on the connection ([S2])."""
        return [
            Send(
                message=Hello(
                    version=PROTOCOL_VERSION,
                    role=self.role,
                    party=self.party,
                    run=self.run,
                    config=self.config.to_wire(),
                    digest=self.config.digest,
                )
            )
        ]

    # ------------------------------------------------------------------------------------------------ inputs

    #: a data holder's one peer is the label holder: if it stops reading, the liveness rules end the session
    drops_non_readers = False

    def receive(self, *args: Any) -> list[Output]:
        """One message from the label holder: a transition, or an ERROR back; never an exception (see the LH's).

        A failure while handling it (a bug) is answered ``ERROR INTERNAL`` and ends this session ([R4]): the label
        holder is a data holder's only peer, so there is nobody else to go on serving, and a data holder left in a
        state it could not finish would wait forever where no timer runs (``READY``, ``ALIGNED``).

        Called ``receive(frames, now)``, or ``receive(routing_id, identity, frames, now)`` like the label holder's
        (the node loop's form): a data holder's socket has one peer, so routing id and identity say nothing here.
        """
        if len(args) not in (2, 4):
            raise TypeError(f"receive(frames, now) or receive(routing_id, identity, frames, now), not {len(args)} arguments")
        frames, now = args[-2:]
        if self.finished is not None:
            return []
        try:
            return self._receive(frames, now)
        except Exception as exc:  # noqa: BLE001 - a failure handling one message is answered, never a crash
            log = Log(
                level="ERROR",
                text=f"internal error handling a message from {self.label_holder}: {exc!r}\n{traceback.format_exc(limit=8)}",
            )
            failure = RemoteProtocolError(
                ErrorCode.INTERNAL,
                f"the data holder could not handle your message ({type(exc).__name__}); its log has the details",
            )
            reason = (f"internal error handling a message from {self.label_holder} ({type(exc).__name__}): this "
                      "data holder cannot go on with the session; its log has the details")
            return [log] + self._error(failure, now) + self._finish(1, reason)

    def _receive(self, frames: Sequence, now: float) -> list[Output]:
        try:
            msg = decode(frames, self.limits)
        except RemoteProtocolError as exc:
            if peek_type(frames) == Error.TYPE:  # [M2]
                return [Log(level="WARNING", text=f"{self.label_holder} sent a malformed ERROR (not answered): {peer_text(str(exc))}")]
            return self._error(exc, now)
        if self.clock is not None:
            self.clock.last_received = now
        if isinstance(msg, Error) and msg.code == ErrorCode.REPLACED:  # [S5]: another process with our key took over
            return self._finish(
                1,
                f"{self.label_holder} says this connection was replaced by a newer one with this party's key "
                f"({peer_text(msg.message)}); if no other copy of this node is running, someone else holds its "
                "secret key",
                bye=False,
            )
        handler = _TABLE.get((self.state, msg.TYPE))
        if handler is None:
            if isinstance(msg, Error):
                return [Log(level="WARNING", text=f"{self.label_holder} reports {_code_name(msg.code)}: {peer_text(msg.message, 400)}")]
            return self._error(
                RemoteProtocolError(
                    ErrorCode.UNEXPECTED_MESSAGE,
                    f"{msg.TYPE} is not allowed when the data holder is in state {self.state.value}",
                    ref=msg.TYPE,
                ),
                now,
            )
        return handler(self, msg, now)

    def handle_timer(self, now: float) -> list[Output]:
        if self.finished is not None:
            return []
        if self.state is DataHolderState.CONNECTING:
            if now >= self.handshake_deadline and self.rejoins:
                return self._finish(
                    3,
                    f"{self.label_holder} did not come back within {self.rejoin_timeout_s:g} s ([timeouts].rejoin); "
                    "start it again with its same command, then this node, to resume from the last checkpoint",
                )
            if now >= self.handshake_deadline:
                if self._cooling_since is not None:
                    return self._finish(
                        1,
                        f"{self.label_holder} kept refusing this node's key for now ([B5]: a connection with this key "
                        "was dropped and kept sending): stop any other process that uses this key, then start this "
                        "node again",
                        bye=False,
                    )
                return self._finish(
                    4,
                    f"no WELCOME from {self.label_holder} within the handshake timeout: is it running, is the address "
                    "right, and is its public key the one in this node's config?",
                )
            out: list[Output] = []
            waited = self._reminder.due(now)  # a node that waits never does so silently
            if waited is not None:
                timeout = self.handshake_deadline - self._reminder.since
                out.append(Log(level="INFO", text=f"still waiting for {self.label_holder} ({waited:.0f} s of {timeout:g} s)"))
            if self._reconnect_at is not None and now >= self._reconnect_at:
                self._reconnect_at, self._socket_at = None, now
                return out + [Reconnect()] + self.start(now)
            return out
        if self.state not in CONNECTED:
            return []
        if self.state in PROGRESSING and now >= self._last_progress + self.progress_timeout_s:
            phase = "PSI" if self.state is DataHolderState.PSI else "training"
            return self._finish(
                1,
                f"label holder {self.label_holder} made no progress in the {phase} for "
                f"{now - self._last_progress:.0f} s (progress timeout {self.progress_timeout_s:g} s)",
            )
        if now >= self.clock.lost_at(self.peer_timeout_s):
            return self._finish(
                3,
                f"label holder {self.label_holder} has sent nothing for {now - self.clock.last_received:.1f} s (peer "
                f"timeout {self.peer_timeout_s:g} s): it is stopped, hung or unreachable",
                bye=False,
            )
        if self._leave_at is not None and now >= self._leave_at:
            return self._leave(now)
        return self.keepalive(now)

    def keepalive(self, now: float) -> list[Output]:
        """Only the heartbeat due ([L1]), no timeout checks: what the node sends while it is busy with local work
        and reads nothing (building its training segment after the alignment)."""
        if self.finished is not None or self.state not in CONNECTED or self.clock is None:
            return []
        return [self._send(Heartbeat(), now)] if now >= self.clock.heartbeat_due(self.heartbeat_s) else []

    def next_timer(self) -> float | None:
        if self.finished is not None:
            return None
        if self.state is DataHolderState.CONNECTING:
            return min(self.handshake_deadline, self._reconnect_at or self.handshake_deadline, self._reminder.at)
        if self.state in CONNECTED:
            times = [self.clock.heartbeat_due(self.heartbeat_s), self.clock.lost_at(self.peer_timeout_s)]
            if self._leave_at is not None:
                times.append(self._leave_at)
            if self.state in PROGRESSING:
                times.append(self._last_progress + self.progress_timeout_s)
            return min(times)
        return None

    def close(self, reason: str, now: float, *, pause: bool = False) -> list[Output]:
        """We are stopping early (signal, error): tell the label holder.

        ``pause`` ([J2]): stopped by a signal, to be started again: in a session that trains, ``BYE {pause: true}``,
        and the label holder keeps the session for this party up to its rejoin timeout. Otherwise the session ends
        for everyone.
        """
        if self.finished is not None:
            return []
        if pause and self.config.train:  # a session without training has nothing to resume: it just ends
            out: list[Output] = []
            if self.state in CONNECTED:
                out.append(Send(message=Bye(ok=False, reason=reason, pause=True)))
            self.state = DataHolderState.CLOSED
            self.finished = Finished(
                exit_code=EXIT_PAUSED,
                reason=f"{reason}: paused; start this node again with the same command to rejoin and resume",
            )
            return out + [self.finished]
        return self._finish(0, reason, ok=False)

    def connection_lost(self, now: float) -> list[Output]:
        """The transport saw the connection to the label holder drop ([J1]).

        In a session, whatever was in flight is lost with it: rejoin on a fresh connection. Before the WELCOME
        (our HELLO may have gone down with it, or the label holder refuses the routing id because it still holds a
        half-open connection with it), open a fresh connection and say HELLO again, at most every
        ``RECONNECT_MIN_S``.
        """
        if self.finished is not None:
            return []
        if self.state in CONNECTED:
            return self._rejoin(f"the connection to {self.link or self.label_holder} dropped", now)
        if self.state is DataHolderState.CONNECTING and self._reconnect_at is None:
            self._reconnect_at = max(now, self._socket_at + RECONNECT_MIN_S)
            return self.handle_timer(now)
        return []

    def _rejoin(self, why: str, now: float) -> list[Output]:
        """[J1], [J3]: forget the session and say HELLO on a fresh connection; at most ``max_rejoins`` times."""
        self.rejoins += 1
        if self.rejoins > self.max_rejoins:
            return self._finish(
                1,
                f"{why}, and this data holder has rejoined {self.max_rejoins} times already ([train].max_rejoins): "
                "fix what keeps stopping the session, then start every node again to resume from the last checkpoint",
                bye=False,
            )
        self.state = DataHolderState.CONNECTING
        self.handshake_deadline = now + self.rejoin_timeout_s
        self._reminder = Reminder(now, WAITING_NOTE_S)
        self.clock, self._psi, self._final, self._nonce, self._train = None, None, None, None, None
        self._echo_seq, self._rtts, self._leave_at = 0, [], None
        self._socket_at, self._reconnect_at = now, None
        log = Log(
            level="WARNING",
            text=f"{why}: rejoining on a new connection (rejoin {self.rejoins} of at most {self.max_rejoins}); "
            f"waiting up to {self.rejoin_timeout_s:g} s for it",
        )
        return [log, Reconnect()] + self.start(now)

    def refused_by_zap(self, status: int = 400, now: float = 0.0) -> list[Output]:
        """The CURVE handshake was refused by the label holder's ZAP handler ([L3]).

        Status 400: our key is not allow-listed, which waiting will not change. Status 500 (or 300): refused for now
        ([B5]: a connection with our key was dropped and kept coming back). libzmq does not retry a connection whose
        handshake failed: a fresh one, at most every ``RECONNECT_MIN_S``, until the handshake timeout decides."""
        if self.finished is not None:
            return []
        if status in (300, 500):
            out: list[Output] = []
            if self._cooling_since is None:
                self._cooling_since = now
                out.append(
                    Log(
                        level="WARNING",
                        text=f"{self.label_holder} refuses this node's key for now (it closed a connection with this "
                        "key that kept sending after it was dropped); trying again until the handshake timeout",
                    )
                )
            if self.state is DataHolderState.CONNECTING and self._reconnect_at is None:
                self._reconnect_at = max(now, self._socket_at + RECONNECT_MIN_S)
                out += self.handle_timer(now)
            return out
        return self._finish(
            1,
            f"{self.label_holder} refused this node's key: add this party's public key to the label holder's "
            "[keys.partners], or check that this config uses the right key file",
            bye=False,
        )

    # ------------------------------------------------------------------------------------------------ helpers

    def _send(self, msg: Message, now: float) -> Send:
        if self.clock is not None:
            self.clock.last_sent = now
        return Send(message=msg)

    def _finish(self, code: int, reason: str, *, ok: bool | None = None, bye: bool = True) -> list[Output]:
        out: list[Output] = []
        if bye and self.state in CONNECTED:
            out.append(Send(message=Bye(ok=(code == 0) if ok is None else ok, reason=reason)))
        self.state = DataHolderState.CLOSED
        self.finished = Finished(exit_code=code, reason=reason)
        out.append(self.finished)
        return out

    def abort(self, reason: str) -> list[Output]:
        """End the session now (BYE {ok: false} naming ``reason``, exit 1): for a segment holder whose input broke
        the rules ([X2], [X6]), as the label holder ends a session whose data holder does."""
        if self.finished is not None:
            return []
        return self._finish(1, reason)

    def _error(self, exc: RemoteProtocolError, now: float) -> list[Output]:
        if not self._bucket.allow(now):
            return [Log(level="DEBUG", text=f"error to {self.label_holder} dropped (rate limit): {exc}")]
        err = Error(code=int(exc.code), message=exc.detail, ref=exc.ref, diff=exc.diff)
        return [Log(level="WARNING", text=f"{self.label_holder}: {peer_text(str(exc), 400)}"), self._send(err, now)]

    def _next_echo(self, now: float) -> list[Output]:
        if self._echo_seq >= self.link_rounds:
            if self.link_rounds:
                nbytes = sum(t.array.nbytes for t in self.link_check)
                done = LinkChecked(rounds=self.link_rounds, bytes_per_round=nbytes, rtts=tuple(self._rtts))
                out: list[Output] = [done]
            else:
                out = []
            if self.psi_plan is not None:
                return out + self._start_psi(now)
            if self.role == "segment_holder":  # no IDs, no PSI: its rows are the others' (SCHEDULE says how many)
                self.state = DataHolderState.ALIGNED
                return out + [Aligned(rows=None)]
            self._leave_at = now + self.hold_s
            if self.hold_s <= 0:
                out += self._leave(now)
            return out
        self._echo_sent_at = now
        return [self._send(Echo(seq=self._echo_seq, tensors=self.link_check), now)]

    def _leave(self, now: float) -> list[Output]:
        return self._finish(0, "link check done" if self.link_rounds else "session done")

    # ------------------------------------------------------------------------------------------------ PSI phase

    @property
    def has_work(self) -> bool:
        if self.finished is not None:
            return False
        if self._train is not None:
            return self._train.has_work
        return self._psi is not None and self._psi.has_work

    @property
    def work_first(self) -> bool:
        """A training FORWARD is due: the node computes it before it reads another message. So each FORWARD uses
        the weights after exactly the steps before its window (a window above 1 trains the same on every run,
        whatever the timing), and it leaves as soon as the BACKWARD that allowed it is applied. Bounded by the
        window. Validation batches (there may be thousands, and they change no weights) and our PSI stream instead
        alternate with reading (``has_work``), so heartbeats are still heard."""
        return self.finished is None and self._train is not None and self._train.forward_due

    def work(self, now: float) -> list[Output]:
        """Compute and send the next chunk of our own blinded stream, or the next FORWARD / EVAL_FORWARD."""
        if not self.has_work:
            return []
        if self._train is not None:
            try:
                msgs = self._train.work()
            except PrecisionError as exc:  # our own activations cannot be sent in the session's precision
                return self._finish(1, f"data holder {self.party}: {exc}")
            return [self._send(m, now) for m in msgs]
        return [self._send(m, now) for m in self._psi.work()]

    def start_training(self, bottom: BottomSegment, n_rows: int, now: float) -> list[Output]:
        """The node built the bottom segment over the aligned rows: wait for the label holder's SCHEDULE."""
        if self.state is not DataHolderState.ALIGNED or not self.config.train:
            return []
        self._bottom, self._n_rows = bottom, n_rows
        self._train = self._new_pipeline()
        return []

    def _new_pipeline(self) -> DataHolderTraining:
        reset = getattr(self._bottom, "new_pipeline", None)
        if reset is not None:  # a segment holder's inputs: what they sent for the old pipeline is void
            reset()
        return DataHolderTraining(
            self._bottom,
            n_rows=self._n_rows,
            batch_size=self.config.batch_size,
            window=self.config.first_window,
            width=self.config.chain.width(self.party),
            max_window=self.config.max_window if self.config.auto_window else None,
            precision=self.config.precision,
            party=self.party,
            lookahead=self.session_minor >= 7,
        )

    def _on_training_message(self, msg: Message, now: float) -> list[Output]:
        self._last_progress = now
        try:
            if self._train is None:
                raise RemoteProtocolError(ErrorCode.UNEXPECTED_MESSAGE, f"{msg.TYPE} in a session without training", ref=msg.TYPE)
            if isinstance(msg, Schedule):
                if self._train.epochs is not None:  # a resume without ROLLBACK first
                    self._train = self._new_pipeline()
                self._train.on_schedule(msg)
                self.state = DataHolderState.TRAINING
                return [Log(level="INFO", text=f"training: {msg.epochs - msg.first_epoch} epoch(s) from step {msg.first_step}")]
            if isinstance(msg, EpochMessage):
                self._train.on_epoch(msg)
                return []
            if isinstance(msg, Checkpoint):
                return [self._send(self._train.on_checkpoint(msg), now)]
            if isinstance(msg, Window):
                self._train.on_window(msg)
                return [Log(level="INFO", text=f"window auto: {msg.window}, as the label holder chose")]
            if isinstance(msg, TrainingDone):  # [X10]: load the kept weights, then confirm with the same message
                self._train.on_training_done(msg)
                return [Log(level="INFO", text=_done_text(msg)), self._send(msg, now)]
            if isinstance(msg, Rollback):  # another party restarted: drop the pipeline, acknowledge, await SCHEDULE
                self._train = self._new_pipeline()
                return [
                    self._send(Rollback(step=msg.step), now),
                    Log(level="WARNING", text=f"a party restarted: rolling back to the checkpoint at step {msg.step}"),
                ]
            self._train.on_backward(msg)
            return []
        except CheckpointError as exc:
            return self._finish(1, f"checkpoint: {exc}")
        except RemoteProtocolError as exc:
            out: list[Output] = [self._send(Error(code=int(exc.code), message=exc.detail, ref=exc.ref), now)]
            return out + self._finish(1, f"training with label holder {self.label_holder} failed: {exc}")

    @property
    def training_done(self) -> bool:
        """The bottom segment is a finished model: the label holder said so (TRAINING_DONE, v1.5, whose kept
        checkpoint is loaded by then), or, in a 1.4 session, every epoch of the schedule was trained here."""
        t = self._train
        if t is None or t.epochs is None:
            return False
        if self.session_minor >= 5:
            return t.done is not None
        return t.finished_epochs >= t.epochs

    def finish_aligned(self, ok: bool, reason: str, now: float) -> list[Output]:
        """The node has used the aligned rows (e.g. written them out): leave the session with ``ok``."""
        if self.state is not DataHolderState.ALIGNED:
            return []
        return self._finish(0 if ok else 1, reason)

    def _start_psi(self, now: float) -> list[Output]:
        self._psi = PairwisePsi(
            self.psi_plan, run=self.run, nonce=self._nonce, role="data_holder", max_peer_items=self.max_psi_items
        )
        self.state, self._last_progress = DataHolderState.PSI, now
        return [self._send(m, now) for m in self._psi.start()]

    def _psi_fatal(self, exc: RemoteProtocolError, now: float) -> list[Output]:
        out: list[Output] = [self._send(Error(code=int(exc.code), message=exc.detail, ref=exc.ref), now)]
        return out + self._finish(1, f"PSI with label holder {self.label_holder} failed: {exc}")

    def _on_psi_message(self, msg: Message, now: float) -> list[Output]:
        self._last_progress = now
        try:
            if isinstance(msg, PsiRows):
                if self._final is None:
                    raise RemoteProtocolError(ErrorCode.PSI_FAILED, "PSI_ROWS before our PSI result was sent", ref=msg.TYPE)
                rows = self._final.receive(msg)
                if rows is None:
                    return []
                self.state = DataHolderState.ALIGNED
                return [Log(level="INFO", text=f"rows aligned: {len(rows)} shared by every party"), Aligned(rows=rows)]
            if self._final is not None:
                raise RemoteProtocolError(ErrorCode.PSI_FAILED, f"{msg.TYPE} after the PSI result", ref=msg.TYPE)
            replies = self._psi.receive(msg)
        except RemoteProtocolError as exc:
            return self._psi_fatal(exc, now)
        out: list[Output] = [self._send(m, now) for m in replies]
        if isinstance(msg, PsiStart) and self._psi.resumed_at:
            r = self._psi.resumed_at
            out.append(Log(level="INFO", text=f"PSI: resuming at bucket {r} of {self._psi.exchange.k} (its first {r} "
                           "bucket(s) were finished by an earlier run of this pair)"))
        if self._psi.done:
            self._final = FinalRows(self._psi.rows)
            out.append(Log(level="INFO", text=f"PSI: {len(self._psi.rows)} IDs shared with the label holder"))
            # the exchange's state (both streams' tokens, the peer's points) is not needed again: a rejoin runs a
            # new PSI from psi_plan. Dropped now, it is not held through training (tens of MiB at 1M IDs)
            self._psi = None
        return out

    # ------------------------------------------------------------------------------------------------ transitions

    def _on_welcome(self, msg: Welcome, now: float) -> list[Output]:
        """[W1]: a WELCOME is checked before anything is based on it; a wrong one ends the session."""
        who = f"'{peer_text(msg.party, 64)}'"
        problem = self._check_welcome(msg)
        if problem is not None:
            err = Error(code=int(ErrorCode.BAD_FIELD), message=problem, ref=Welcome.TYPE)
            self.state = DataHolderState.READY  # so that _finish says BYE: the label holder is listening
            return [Send(message=err)] + self._finish(1, f"{who} sent a bad WELCOME: {problem}", ok=False)
        self._nonce = msg.psi_nonce
        if self.rejoins and msg.instance is not None and self._instance is not None:
            again = "restarted label holder" if msg.instance != self._instance else "label holder"
            log = Log(level="WARNING", text=f"rejoined the {again} {who}: it resumes the session")
        else:
            log = None
        self._instance = msg.instance
        self.label_holder = who
        self.heartbeat_s = max(msg.heartbeat_ms, 1) / 1000.0
        self.peer_timeout_s = max(msg.peer_timeout_ms, 1) / 1000.0
        self.state = DataHolderState.READY
        self.session_minor = msg.version[1]
        self.clock = PeerClock(last_received=now, last_sent=now)
        out: list[Output] = [log or Log(level="INFO", text=f"joined label holder {msg.party!r} (run {msg.run})")]
        return out + self._next_echo(now)

    def _check_welcome(self, msg: Welcome) -> str | None:
        """What PROTOCOL.md [W1] says a data holder MUST check in WELCOME; None when it is right."""
        major, minor = msg.version
        if major != PROTOCOL_VERSION[0] or minor > PROTOCOL_VERSION[1]:
            return (
                f"WELCOME.version {list(msg.version)} is not one this data holder speaks "
                f"({PROTOCOL_VERSION[0]}.0 to {PROTOCOL_VERSION[0]}.{PROTOCOL_VERSION[1]})"
            )
        if msg.run != self.run or msg.digest != self.config.digest:
            return (
                f"WELCOME is for run {peer_text(msg.run, 64)} with digest {peer_text(msg.digest[:16])} but this node "
                f"has run {self.run!r} and digest {self.config.digest[:16]}; the label holder broke [H4]"
            )
        mine = self.party in msg.data_holders if self.role == "data_holder" else self.party not in msg.data_holders
        if list(msg.data_holders) != list(self.config.data_holders) or not mine:
            return (
                f"WELCOME.data_holders {peer_text(list(msg.data_holders), 200)} is not this session's "
                f"{list(self.config.data_holders)}"
            )
        if self.psi_plan is not None and (
            msg.psi_nonce is None or not _NONCE.fullmatch(msg.psi_nonce)
        ):
            return "WELCOME.psi_nonce must be 32 lowercase hex digits in a session with PSI"
        if self.psi_plan is None and msg.psi_nonce is not None:
            return "WELCOME.psi_nonce is set in a session without PSI (or to a segment holder, which runs none)"
        if msg.instance is not None and not _NONCE.fullmatch(msg.instance):
            return "WELCOME.instance must be 32 lowercase hex digits"
        return None

    def _on_refusal(self, msg: Error, now: float) -> list[Output]:
        """[H7]: an ERROR in answer to HELLO is final."""
        diff = {  # the label holder wrote it: escaped and cut like any peer text, at most MAX_DIFF_LINES lines
            peer_text(k, 100): [_shown(x) for x in v]
            for k, v in list((msg.diff or {}).items())[:MAX_DIFF_LINES]
            if isinstance(v, list) and len(v) == 2
        }
        if diff:  # one line per differing field: the readable diff of [H4]
            text = (f"label holder refused HELLO: {_code_name(msg.code)}:\n  "
                    + describe_diff(diff, theirs=self.role.replace("_", " "), sep="\n  "))
        else:
            text = f"label holder refused HELLO: {_code_name(msg.code)}: {peer_text(msg.message, 400)}"
        return self._finish(1, text, bye=False)

    def _on_echo_reply(self, msg: EchoReply, now: float) -> list[Output]:
        if msg.seq != self._echo_seq or self._echo_seq >= self.link_rounds:
            return self._error(
                RemoteProtocolError(ErrorCode.UNEXPECTED_MESSAGE, f"ECHO_REPLY seq {msg.seq} answers no ECHO", ref=msg.TYPE),
                now,
            )
        if len(msg.tensors) != len(self.link_check) or not all(
            a.same_as(b) for a, b in zip(self.link_check, msg.tensors)
        ):
            return self._finish(1, f"ECHO_REPLY seq {msg.seq} from {self.label_holder} does not match the ECHO ([M1])")
        self._rtts.append(now - self._echo_sent_at)
        self._echo_seq += 1
        return self._next_echo(now)

    def _on_heartbeat(self, msg: Heartbeat, now: float) -> list[Output]:
        if msg.instance is not None and self._instance is not None and msg.instance != self._instance:
            return self._rejoin(f"{self.label_holder} restarted (a new instance) and no longer knows this session", now)
        return []

    def _on_bye(self, msg: Bye, now: float) -> list[Output]:
        if msg.pause and not msg.ok and self.config.train and self.state in CONNECTED:  # [J2]: it will be back
            return self._rejoin(f"{self.label_holder} paused ({peer_text(msg.reason, 400)})", now)
        self.state = DataHolderState.CLOSED
        self.finished = Finished(
            exit_code=0 if msg.ok else 1,
            reason=f"label holder {self.label_holder} ended the session: {peer_text(msg.reason, 400)}",
        )
        return [self.finished]

    def _on_error(self, msg: Error, now: float) -> list[Output]:
        if msg.code == ErrorCode.UNEXPECTED_MESSAGE and msg.ref == Heartbeat.TYPE:  # [J1]: it has no session with us
            return self._rejoin(f"{self.label_holder} no longer knows this session (it restarted?)", now)
        return [Log(level="WARNING", text=f"{self.label_holder} reports {_code_name(msg.code)}: {peer_text(msg.message, 400)}")]


_NONCE = re.compile(r"[0-9a-f]{32}")  # [P1], [W1]
MAX_DIFF_LINES = 64


def _shown(value: object) -> object:
    """A value from a peer's CONFIG_MISMATCH diff, safe to print with ``!r``: numbers as they are, the rest cut."""
    if isinstance(value, (int, float, bool)) or value is None:
        return value
    return peer_text(value, 120)


def _code_name(code: int) -> str:
    try:
        return ErrorCode(code).name
    except ValueError:
        return f"error code {code}"


def _done_text(msg: TrainingDone) -> str:
    text = f"training done after {msg.epochs} epoch(s)" + (" (the label holder stopped early)" if msg.early_stop else "")
    return text + f"; this segment keeps the weights after epoch {msg.keep_epoch + 1}"


_TABLE: dict[tuple[DataHolderState, str], Handler] = {
    (DataHolderState.CONNECTING, Welcome.TYPE): DataHolderMachine._on_welcome,
    (DataHolderState.CONNECTING, Error.TYPE): DataHolderMachine._on_refusal,
    (DataHolderState.CONNECTING, Bye.TYPE): DataHolderMachine._on_bye,
    (DataHolderState.READY, EchoReply.TYPE): DataHolderMachine._on_echo_reply,
    (DataHolderState.READY, Heartbeat.TYPE): DataHolderMachine._on_heartbeat,
    (DataHolderState.READY, Bye.TYPE): DataHolderMachine._on_bye,
    (DataHolderState.READY, Error.TYPE): DataHolderMachine._on_error,
    (DataHolderState.PSI, PsiStart.TYPE): DataHolderMachine._on_psi_message,
    (DataHolderState.PSI, PsiBucket.TYPE): DataHolderMachine._on_psi_message,
    (DataHolderState.PSI, PsiItems.TYPE): DataHolderMachine._on_psi_message,
    (DataHolderState.PSI, PsiReply.TYPE): DataHolderMachine._on_psi_message,
    (DataHolderState.PSI, PsiRows.TYPE): DataHolderMachine._on_psi_message,
    (DataHolderState.PSI, Heartbeat.TYPE): DataHolderMachine._on_heartbeat,
    (DataHolderState.PSI, Bye.TYPE): DataHolderMachine._on_bye,
    (DataHolderState.PSI, Error.TYPE): DataHolderMachine._on_error,
    (DataHolderState.ALIGNED, Heartbeat.TYPE): DataHolderMachine._on_heartbeat,
    (DataHolderState.ALIGNED, Schedule.TYPE): DataHolderMachine._on_training_message,
    (DataHolderState.TRAINING, EpochMessage.TYPE): DataHolderMachine._on_training_message,
    (DataHolderState.TRAINING, Backward.TYPE): DataHolderMachine._on_training_message,
    (DataHolderState.TRAINING, Checkpoint.TYPE): DataHolderMachine._on_training_message,
    (DataHolderState.TRAINING, TrainingDone.TYPE): DataHolderMachine._on_training_message,
    (DataHolderState.TRAINING, Window.TYPE): DataHolderMachine._on_training_message,
    (DataHolderState.TRAINING, Rollback.TYPE): DataHolderMachine._on_training_message,
    (DataHolderState.TRAINING, Schedule.TYPE): DataHolderMachine._on_training_message,
    (DataHolderState.TRAINING, Heartbeat.TYPE): DataHolderMachine._on_heartbeat,
    (DataHolderState.TRAINING, Bye.TYPE): DataHolderMachine._on_bye,
    (DataHolderState.TRAINING, Error.TYPE): DataHolderMachine._on_error,
    (DataHolderState.ALIGNED, Bye.TYPE): DataHolderMachine._on_bye,
    (DataHolderState.ALIGNED, Error.TYPE): DataHolderMachine._on_error,
}
"""(state, message type) -> transition; every other pair is UNEXPECTED_MESSAGE ([T1]) or, for ERROR, logged."""
