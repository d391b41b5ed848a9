"""The label holder's side of the session layer (PROTOCOL.md sections 6 and 9), sans-I/O.

One ``PartyState`` per expected data holder, one transition table shared by all of them. The node feeds in the
frames it received (with the routing id and the identity the CURVE handshake proved) and ``now``; the machine answers
with ``Send``/``Log``/... outputs and never touches a socket or a clock.
"""

from __future__ import annotations

import enum
import re
import secrets
import traceback
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence

from .codec import DEFAULT_LIMITS, PROTOCOL_VERSION, Limits, decode, decode_or_failure, encode, peek_type
from .errors import ErrorCode, RemoteProtocolError
from .events import EXIT_PAUSED, Aligned, Disconnect, EpochDone, Finished, Log, Output, PeerLeft, PeerReady, Send
from .messages import (
    Bye,
    CheckpointDone,
    Echo,
    EchoReply,
    Error,
    EvalForward,
    Forward,
    Heartbeat,
    Hello,
    Message,
    PsiBucket,
    PsiItems,
    PsiResult,
    PsiStart,
    Relay,
    Rollback,
    TrainingDone,
    Welcome,
    Window,
)
from .relay import RelayChannel
from .psi_phase import DEFAULT_MAX_PSI_ITEMS, PairwisePsi, PsiPlan, combine, final_rows_messages, new_nonce, positions_for
from .routing import party_of
from .text import peer_text
from .precision import PrecisionError
from .training_phase import BestEpoch, CheckpointError, LabelHolderTraining, TopSegment, TrainPlan
from .session import SessionConfig, config_diff, describe_diff, digest_of
from .timers import PeerClock, Reminder, TokenBucket

ERROR_BURST = 100  # [R2]
ERROR_RATE = 100.0
MAX_TRACKED_ROUTING_IDS = 1024  # error buckets (per identity) and retired routing ids are bounded too
#: [B4] refused bytes a party may send: a burst of 64 MiB, refilled at 1 MiB/s. An honest node's messages are never
#: refused; past this a connection is only costing the label holder the decryption of its garbage
REFUSED_BURST_BYTES = 64 * 2**20
REFUSED_BYTES_PER_S = float(2**20)
#: [B4] the same for a key on the allow-list that is not in this session: it has nothing to say but HELLO (refused),
#: so a few refused HELLOs fit, and a flood from it is closed after a couple of MiB instead of 64
OUTSIDER_REFUSED_BURST_BYTES = 2 * 2**20
OUTSIDER_REFUSED_BYTES_PER_S = float(64 * 2**10)
#: [B5] a dropped connection that comes back: its key is refused at the CURVE handshake for 1 s, then 2, 4, ... 8 s
KEY_COOLDOWN_FIRST_S = 1.0
KEY_COOLDOWN_MAX_S = 8.0
WAITING_NOTE_S = 10.0  # how often a node that waits for a peer says it still does
DEFAULT_MAX_REJOINS = 3  # [train].max_rejoins: each rejoin rolls every party back to the last checkpoint
#: [C4] relayed connections the label holder keeps per party (each a sequence state): a restarting party's latest
MAX_RELAYS_PER_PARTY = 4
#: a relayed party's connection: "<party>/<16 hex>" ([S1]), as its RELAY's ``conn`` names it
_CONN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}/[0-9a-f]{16}")



def _refused_budget(in_session: bool) -> tuple[float, float]:
    """[B4]: (burst bytes, bytes per second) of refused messages allowed to a party of this session or an outsider."""
    if in_session:
        return REFUSED_BURST_BYTES, REFUSED_BYTES_PER_S
    return OUTSIDER_REFUSED_BURST_BYTES, OUTSIDER_REFUSED_BYTES_PER_S

class PartyState(enum.Enum):
    IDLE = "IDLE"
    READY = "READY"
    PSI = "PSI"
    PSI_DONE = "PSI_DONE"
    ALIGNED = "ALIGNED"
    TRAINING = "TRAINING"
    LOST = "LOST"  # stopped answering during training: it may restart and rejoin within the rejoin timeout
    DONE = "DONE"


#: states with a live session: heartbeats and the peer timeout apply, BYE is expected on leaving
CONNECTED = frozenset(
    {PartyState.READY, PartyState.PSI, PartyState.PSI_DONE, PartyState.ALIGNED, PartyState.TRAINING}
)


@dataclass
class _Party:
    name: str
    state: PartyState = PartyState.IDLE
    clock: PeerClock | None = None
    joined: bool = False
    left_ok: bool = True
    nonce: str | None = None
    psi: PairwisePsi | None = None
    #: [P19] the nonce of this pair's unfinished bucketed PSI that has finished buckets: its next WELCOME reuses it
    resume_nonce: str | None = None
    last_progress: float = 0.0
    lost_at: float = 0.0
    rolling_back: bool = False  # ROLLBACK sent, its echo not yet back: drop the party's stale pipeline messages
    #: [S5] the routing id of the connection whose HELLO we last accepted: the only one this party's messages go to
    route: bytes | None = None
    rejoins: int = 0  # HELLOs accepted after training started (each one rolls every party back)
    minor: int = 0  # the minor version of the session with this party (min of both sides, as WELCOME says)


Handler = Callable[["LabelHolderMachine", _Party, Message, float], list[Output]]


class RelayRoute(bytes):
    """The routing id of a relayed party's connection ([C3]): ``<conn>|<hop's routing id>`` as bytes (so [S4]'s
    ``party_of`` reads the party), but its own type: a peer picks the bytes of a real routing id, and one holding a
    ``|`` must still be answered on its own connection, never taken for a relay."""

    conn: str
    hop: bytes

    @classmethod
    def of(cls, conn: str, hop: bytes) -> "RelayRoute":
        route = cls(conn.encode() + b"|" + hop)
        route.conn, route.hop = conn, hop
        return route

    @property
    def party(self) -> str:
        return party_of(self)


class LabelHolderMachine:
    """Accepts HELLOs, answers ECHOs, keeps every READY data holder alive or reports it lost."""

    def __init__(
        self,
        *,
        party: str,
        run: str,
        config: SessionConfig,
        now: float,
        heartbeat_s: float = 1.0,
        peer_timeout_s: float = 30.0,
        join_timeout_s: float = 600.0,
        progress_timeout_s: float = 600.0,
        rejoin_timeout_s: float = 120.0,
        limits: Limits = DEFAULT_LIMITS,
        psi: PsiPlan | None = None,
        max_echo_bytes: int | None = None,
        max_psi_items: int = DEFAULT_MAX_PSI_ITEMS,
        max_rejoins: int = DEFAULT_MAX_REJOINS,
        min_minor: int = 0,
        relay_keys: dict[str, bytes] | None = None,
    ):
        """``min_minor``: the lowest minor version a data holder may speak; 5 when ``[train].keep = "best"`` or
        ``patience`` is set, because then a data holder must understand TRAINING_DONE to save the right weights.

        ``relay_keys`` (v1.10): for every party behind a segment holder, the key that authenticates its relayed
        session end to end ([C3]); a party without one cannot join."""
        self.party = party
        self.chain = config.chain
        self.relay_keys = dict(relay_keys or {})
        #: (party, conn) -> the sequence state of one relayed connection, oldest first
        self._relays: OrderedDict[tuple[str, str], RelayChannel] = OrderedDict()
        self.min_minor = min_minor
        #: [X10] the TRAINING_DONE each data holder at 1.5 has not confirmed yet; the run finishes when none is left
        self._done_sent: dict[str, TrainingDone] = {}
        self._done_announced = False  # TRAINING_DONE went out (to every party at 1.5, in the same round)
        self.run = run
        self.config = config
        self.heartbeat_s = heartbeat_s
        self.peer_timeout_s = peer_timeout_s
        self.join_deadline = now + join_timeout_s
        self._started_at = now
        self._join_reminder = Reminder(now, WAITING_NOTE_S)  # "still waiting for ... to join", while some have not
        self.progress_timeout_s = progress_timeout_s
        self.rejoin_timeout_s = rejoin_timeout_s
        self.limits = limits
        #: ECHO payload cap (section 7): no larger than the largest message of the session, so a peer's echoes can
        #: never need more of its send budget than the session itself does
        self.max_echo_bytes = max_echo_bytes
        self.max_psi_items = max_psi_items
        self.max_rejoins = max_rejoins
        #: [J1] this process's instance nonce, in every WELCOME and HEARTBEAT: a data holder that hears another one
        #: knows its label holder restarted (and so forgot the session) and rejoins
        self.instance = secrets.token_hex(16)
        if config.psi and psi is None:
            raise ValueError("the session config says psi = true: give the label holder a PsiPlan")
        if config.psi and psi.buckets != config.psi_buckets:  # the session config is what both parties agreed on
            raise ValueError(f"the PsiPlan has buckets = {psi.buckets!r} but the session config psi_buckets = "
                             f"{config.psi_buckets!r}")
        self.psi = psi if config.psi else None
        #: the label holder's own rows in the final order, once every pairwise PSI is done
        self.final_rows = None
        self._work_turn = 0
        self.training: LabelHolderTraining | None = None
        self.parties = {name: _Party(name) for name in config.parties}
        if self.psi is not None:  # [P19]: pairs an earlier process of this run left unfinished, found by the node
            for name, nonce in self.psi.resume_nonces.items():
                if name in self.parties:
                    self.parties[name].resume_nonce = nonce
        self.finished: Finished | None = None
        self._wire_config = config.to_wire()
        self._digest = config.digest
        #: [R2] error budget and [B4] refused-bytes budget of each authenticated identity (never keyed by a routing
        #: id the peer picks): identity -> (errors, refused bytes)
        self._buckets: OrderedDict[str, tuple[TokenBucket, TokenBucket]] = OrderedDict()
        self._inbound: Sequence = ()  # the message being handled: a refusal of it costs its size from [B4]
        #: [B5] identity -> (refused at the handshake until, the next cooldown) once a dropped connection came back
        self._cooldowns: OrderedDict[str, tuple[float, float]] = OrderedDict()
        #: routing ids we no longer talk to: replaced by a newer connection ([S5]) or dropped for not reading (§7)
        self._retired: OrderedDict[bytes, str] = OrderedDict()

    #: the node drops the send queue of a peer that does not read and tells ``peer_not_reading`` (PROTOCOL.md §7)
    drops_non_readers = True

    def start(self, now: float) -> list[Output]:
        """Nothing to say first: data holders speak first ([S2]). Here so that both role machines start alike."""
        return []

    # ------------------------------------------------------------------------------------------------ inputs

    def receive(self, routing_id: bytes, identity: str | None, frames: Sequence, now: float) -> list[Output]:
        """One multipart message from ``routing_id``; ``identity`` is the party its CURVE key is bound to.

        ``identity`` is None when the message carries no authenticated identity ([R3]: dropped). Whatever the
        message, the answer is a transition or an ERROR to its sender: a failure while handling one peer's message
        (a bug, an input nobody foresaw) is answered with ``ERROR INTERNAL`` and logged, never raised, so one
        partner cannot end the node for the others.
        """
        if self.finished is not None:
            return []
        if identity is None:
            return [Log(level="WARNING", text=f"dropped a message from routing id {peer_text(routing_id, 80)}: no authenticated identity")]
        self._inbound = frames
        try:
            return self._receive(routing_id, identity, frames, now)
        except Exception as exc:  # noqa: BLE001 - the rule of the section: answered, never a node exit
            failure = RemoteProtocolError(
                ErrorCode.INTERNAL,
                f"the label holder could not handle your message ({type(exc).__name__}); its log has the details",
            )
            log = Log(
                level="ERROR",
                text=f"internal error handling a message from {identity!r}: {exc!r}\n{traceback.format_exc(limit=8)}",
            )
            return [log] + self._error(routing_id, identity, failure, now)
        finally:
            self._inbound = ()  # do not keep the peer's buffers alive past their message

    def _receive(self, routing_id: bytes, identity: str, frames: Sequence, now: float) -> list[Output]:
        msg, failure, mtype = decode_or_failure(frames, self.limits)
        if mtype == Error.TYPE:  # [M2]: never answered
            return [self._log_error(identity, msg, failure)]
        claimed = party_of(routing_id)
        if claimed != identity:  # [S4]
            return self._error(
                routing_id,
                identity,
                RemoteProtocolError(
                    ErrorCode.IDENTITY_MISMATCH,
                    f"your key belongs to party {identity!r} but your routing id claims party {peer_text(claimed, 64)}; "
                    f"a data holder's routing id is '<party>/<16 hex digits>' ([S1])",
                    ref=mtype if isinstance(mtype, str) else None,
                ),
                now,
            )
        retired = self._retired.get(routing_id)
        if retired is not None:
            if retired != "replaced":  # dropped ([B2], [B4]): it gets nothing more, and its connection is closed
                return self._came_back(routing_id, identity, now)
            return self._error(routing_id, identity, _replaced_error(mtype if isinstance(mtype, str) else None), now)
        if failure is not None:
            return self._error(routing_id, identity, failure, now)
        assert msg is not None
        relayed = isinstance(routing_id, RelayRoute)
        if isinstance(msg, Relay):
            if relayed:
                return self._error(routing_id, identity, RemoteProtocolError(
                    ErrorCode.BAD_FIELD, "a RELAY inside a RELAY ([C3])", ref=msg.TYPE), now)
            return self._on_relay(routing_id, identity, msg, now)
        if identity in self.parties and self.chain.relayed(identity) != relayed:  # [C2]
            route = self.chain.route(identity)
            why = (f"party {identity!r} is behind segment holder {route[0]!r} in this session: its session goes "
                   f"through {' -> '.join(route)} as RELAY" if route else
                   f"party {identity!r} feeds the label holder directly in this session: no RELAY for it")
            return self._error(routing_id, identity, RemoteProtocolError(
                ErrorCode.IDENTITY_MISMATCH, why, ref=msg.TYPE), now)
        p = self.parties.get(identity)
        if p is None:  # a key on the allow-list (or an insecure peer) that is not in this session
            if isinstance(msg, Hello):
                return self._refuse_hello(routing_id, identity, msg, now)
            return self._unexpected(routing_id, identity, msg, "IDLE", now)
        current = routing_id == p.route
        if not current and not isinstance(msg, Hello):  # [S5]: a connection speaks for its party after its HELLO
            return self._not_joined(routing_id, identity, msg, now)
        if current and p.state in CONNECTED:
            p.clock.last_received = now
        handler = _TABLE.get((p.state, msg.TYPE))
        if handler is None:
            return self._unexpected(routing_id, identity, msg, p.state.value, now)
        if isinstance(msg, Hello):
            return self._on_hello(p, msg, now, routing_id)
        return handler(self, p, msg, now)

    def peer_not_reading(self, routing_id: bytes, why: str, now: float) -> list[Output]:
        """The node dropped ``routing_id``'s send queue: it stayed over its budget or stalled (PROTOCOL.md §7).

        That connection gets one ``ERROR TOO_LARGE`` (best effort) and nothing else, ever, and the node closes it
        (again whenever it reconnects and sends). Its party is LOST: like a party that
        went silent in training, it may restart and rejoin within the rejoin timeout, and otherwise the session
        ends naming it. The other parties' messages were never behind its queue.
        """
        if self.finished is not None or routing_id in self._retired:
            return []
        self._retire(routing_id, "not reading")
        p = next((q for q in self.parties.values() if q.route == routing_id), None)
        err = Error(
            code=int(ErrorCode.TOO_LARGE),
            message=f"you are not reading ({why}): the label holder dropped this connection's queue and will send "
            "it nothing more; restart this node to rejoin",
        )
        out: list[Output] = [Send(to=routing_id, message=err), Disconnect(to=routing_id)]
        if p is None or p.state not in CONNECTED:
            return out
        p.route, p.state, p.lost_at = None, PartyState.LOST, now
        return out + [
            Log(
                level="WARNING",
                text=f"{self._role(p.name)} {p.name!r} is not reading ({why}): dropped its connection; waiting up to "
                f"{self.rejoin_timeout_s:g} s for it to restart and rejoin",
            )
        ]

    def handle_timer(self, now: float) -> list[Output]:
        """Heartbeats due, lost peers, the join deadline ([L1], [L2], [L3])."""
        if self.finished is not None:
            return []
        out: list[Output] = []
        missing = [p.name for p in self.parties.values() if not p.joined]
        if missing and now >= self.join_deadline:
            return self._finish(
                4,
                f"data holder(s) {', '.join(missing)} did not join within the join timeout; check that they are "
                "running, point at this node's address and use keys on its allow-list",
                now,
            )
        waited = self._join_reminder.due(now) if missing else None  # a node that waits never does so silently
        if waited is not None:
            timeout = self.join_deadline - self._started_at
            out.append(Log(level="INFO", text=f"still waiting for {len(missing)} of {len(self.parties)} data "
                           f"holder(s) to join ({waited:.0f} s of the {timeout:g} s join timeout)"))
        for p in self.parties.values():
            if p.state is PartyState.LOST and now >= p.lost_at + self.rejoin_timeout_s:
                step = self.training.latest_checkpoint if self.training is not None else None
                where = f"from the checkpoint at step {step}" if step is not None else "from the start"
                p = self._lost_cause(p)
                return self._finish(
                    3,
                    f"{self._role(p.name)} {p.name!r} stopped answering and did not come back within {self.rejoin_timeout_s:g} s; "
                    f"to resume {where}, start every node again with its same `vfl node --config ...` command",
                    now,
                    lost=p.name,
                )
            if p.state not in CONNECTED:
                continue
            if p.state in (PartyState.PSI, PartyState.TRAINING) and now >= p.last_progress + self.progress_timeout_s:
                phase = "PSI" if p.state is PartyState.PSI else "training"
                reason = (
                    f"{self._role(p.name)} {p.name!r} made no progress in the {phase} for {now - p.last_progress:.0f} s "
                    f"(progress timeout {self.progress_timeout_s:g} s)"
                )
                return [self._timeout_error(p, reason, now)] + self._finish(1, reason, now)
            if now >= p.clock.lost_at(self.peer_timeout_s) and self.config.train:  # [X8]: from the join on
                reason = f"you sent nothing for {now - p.clock.last_received:.1f} s (peer timeout {self.peer_timeout_s:g} s)"
                out.append(self._timeout_error(p, reason, now))
                out.append(self._send(p, Bye(ok=False, reason=f"{reason}: you were declared lost; restart to rejoin"), now))
                p.state, p.lost_at = PartyState.LOST, now  # training can resume if it comes back
                out.append(
                    Log(
                        level="WARNING",
                        text=f"{self._role(p.name)} {p.name!r} has sent nothing for {now - p.clock.last_received:.1f} s: "
                        f"waiting up to {self.rejoin_timeout_s:g} s for it to restart and rejoin",
                    )
                )
                continue
            if now >= p.clock.lost_at(self.peer_timeout_s):
                silent = now - p.clock.last_received
                reason = (
                    f"{self._role(p.name)} {p.name!r} has sent nothing for {silent:.1f} s (peer timeout "
                    f"{self.peer_timeout_s:g} s): it is stopped, hung or unreachable"
                )
                return [self._timeout_error(p, reason, now)] + self._finish(3, reason, now)
            out += self._heartbeat(p, now)
        return out

    def keepalive(self, now: float) -> list[Output]:
        """Only the heartbeats due ([L1]), no timeout checks: what the node sends while it is busy with local work
        and reads nothing (building its training segment after the alignment); its peers stay alive here and
        their messages wait unread, so no peer may be declared lost for a silence this node did not listen to."""
        if self.finished is not None:
            return []
        return [out for p in self.parties.values() if p.state in CONNECTED for out in self._heartbeat(p, now)]

    def _heartbeat(self, p: _Party, now: float) -> list[Output]:
        """[L1]: a HEARTBEAT to ``p`` if nothing went to it for the heartbeat interval."""
        return [self._send(p, Heartbeat(instance=self.instance), now)] if now >= p.clock.heartbeat_due(self.heartbeat_s) else []

    def next_timer(self) -> float | None:
        """When ``handle_timer`` next has something to do (None: never)."""
        if self.finished is not None:
            return None
        live = [p for p in self.parties.values() if p.state in CONNECTED]
        times = [p.clock.heartbeat_due(self.heartbeat_s) for p in live]
        times += [p.clock.lost_at(self.peer_timeout_s) for p in live]
        times += [
            p.last_progress + self.progress_timeout_s
            for p in live
            if p.state in (PartyState.PSI, PartyState.TRAINING)
        ]
        if any(not p.joined for p in self.parties.values()):
            times += [self.join_deadline, self._join_reminder.at]
        times += [p.lost_at + self.rejoin_timeout_s for p in self.parties.values() if p.state is PartyState.LOST]
        return min(times) if times else None

    def close(self, reason: str, now: float, *, pause: bool = False) -> list[Output]:
        """We are stopping (signal, error): tell every connected data holder why.

        ``pause`` ([J2]): this node was stopped by a signal and will be started again; in a session that trains,
        the data holders keep the session and rejoin the restarted label holder, which resumes from its last
        committed checkpoint. Otherwise the session ends for everyone.
        """
        if self.finished is not None:
            return []
        if pause and self.config.train:  # a session without training has nothing to resume: it just ends
            return self._finish(
                EXIT_PAUSED,
                f"{reason}: paused; start this node again with the same command to resume from the last checkpoint",
                now,
                ok=False,
                pause=True,
            )
        return self._finish(0, reason, now, ok=False)

    @property
    def training_done(self) -> bool:
        """Every epoch of the plan was trained and evaluated: the top segment is a finished model."""
        return self.training is not None and self.training.done

    def refused_by_zap(self, status: int = 400, now: float = 0.0) -> list[Output]:
        """Only a connecting node sees its key refused; the label holder's own ZAP handler does the refusing."""
        return []

    def connection_lost(self, now: float) -> list[Output]:
        """Only a connecting node rejoins on a dropped connection ([J1]); the label holder's peers come back to it."""
        return []

    def finish_aligned(self, ok: bool, reason: str, now: float) -> list[Output]:
        """The node has used the aligned rows (e.g. written them out). On success the session goes on until the data
        holders leave; on failure (``ok`` False) it ends with exit 1 and tells every data holder ``reason``."""
        if ok or self.finished is not None:
            return []
        return self._finish(1, reason, now, ok=False)

    # ------------------------------------------------------------------------------------------------ helpers

    # ------------------------------------------------------------------------------------------------ relays (v1.10)

    def _on_relay(self, hop_route: bytes, hop: str, msg: Relay, now: float) -> list[Output]:
        """[C3]: a RELAY from a segment holder that feeds the label holder, carrying the session message of a party
        behind it. It is checked (the route, the end party's MAC and sequence) and then handled exactly as if that
        party had sent the inner message on a connection of its own: the routing id ``<conn>|<hop's routing id>``."""
        def refuse(code: ErrorCode, why: str) -> list[Output]:
            return self._error(hop_route, hop, RemoteProtocolError(code, why, ref=msg.TYPE), now)

        q = self.parties.get(hop)
        if q is None or hop not in self.config.segments or q.route != hop_route or q.state not in CONNECTED:
            return refuse(ErrorCode.UNEXPECTED_MESSAGE, "RELAY from a party that is not a joined segment holder "
                          "feeding this label holder")
        party = msg.party
        if party not in self.parties or not self.chain.relayed(party) or self.chain.lh_hop(party) != hop:
            return refuse(ErrorCode.IDENTITY_MISMATCH, f"RELAY for {peer_text(party, 64)}: not a party behind "
                          f"segment holder {hop!r} in this session")
        if not _CONN.fullmatch(msg.conn) or party_of(msg.conn.encode()) != party:
            return refuse(ErrorCode.BAD_FIELD, "RELAY.conn must be '<party>/<16 hex digits>' of its party")
        key = (party, msg.conn)
        channel = self._relays.get(key)
        if channel is None:
            secret = self.relay_keys.get(party)
            if secret is None:
                return refuse(ErrorCode.UNKNOWN_PARTY, f"this label holder has no key for {party!r}: add its public "
                              "key to the label holder's [keys.partners]")
            if msg.seq != 0:  # a connection this process never heard open (it restarted, or the relay dropped)
                return refuse(ErrorCode.UNEXPECTED_MESSAGE, f"RELAY seq {msg.seq} of a relayed connection this label "
                              "holder does not know")
            channel = RelayChannel(secret, run=self.run, party=party, conn=msg.conn, sends="down",
                                   limits=self.limits)
            mine = [k for k in self._relays if k[0] == party]
            for old in mine[: max(0, len(mine) + 1 - MAX_RELAYS_PER_PARTY)]:
                del self._relays[old]
            self._relays[key] = channel
        try:
            inner = channel.unwrap(msg)
        except RemoteProtocolError as exc:
            if not channel.next_recv:  # nothing of it was ever authentic: keep no state for it
                self._relays.pop(key, None)
            return self._refuse_relay(hop_route, hop, party, exc, now)
        self._relays.move_to_end(key)
        return self._receive(RelayRoute.of(msg.conn, hop_route), party, inner, now)

    def outgoing(self, out: Output) -> Output | None:
        """What the node sends for ``out``: a message to a relayed party's connection goes as RELAY to the segment
        holder it came through, authenticated for that party ([C3]); a connection the label holder no longer knows
        gets nothing. Anything else unchanged. The node calls this for every output before acting on it."""
        to = getattr(out, "to", None)
        if not isinstance(to, RelayRoute):  # a real routing id, whatever bytes its peer chose
            return out
        if not isinstance(out, Send):
            return None  # a Disconnect of a relayed connection: there is no socket of ours to close
        channel = self._relays.get((to.party, to.conn))
        if channel is None:
            return None
        return Send(to=to.hop, message=channel.wrap(out.message))

    def _send(self, p: _Party, msg: Message, now: float) -> Send:
        if p.clock is not None:
            p.clock.last_sent = now
        return Send(to=p.route, message=msg)

    def _timeout_error(self, p: _Party, reason: str, now: float) -> Send:
        """[L2]: the silent (or stalled) party hears why it is being dropped, if it still listens at all."""
        return self._send(p, Error(code=int(ErrorCode.TIMEOUT), message=reason), now)

    def _retire(self, routing_id: bytes, why: str) -> None:
        self._retired[routing_id] = why
        while len(self._retired) > MAX_TRACKED_ROUTING_IDS:
            self._retired.popitem(last=False)

    def _finish(
        self, code: int, reason: str, now: float, *, lost: str | None = None, ok: bool | None = None, pause: bool = False
    ) -> list[Output]:
        bye_ok = code == 0 if ok is None else ok
        # the parties behind a segment holder first, the farthest first: a segment holder ends with its own BYE, so
        # the BYEs it relays to its inputs must reach it before that one does ([C6] in reverse)
        out: list[Output] = [
            self._send(p, Bye(ok=bye_ok, reason=reason, pause=True if pause else None), now)
            for p in (self.parties[name] for name in reversed(self.control_order))
            if p.state in CONNECTED and p.name != lost
        ]
        self.finished = Finished(exit_code=code, reason=reason)
        out.append(self.finished)
        return out

    def _error(self, routing_id: bytes, identity: str, exc: RemoteProtocolError, now: float) -> list[Output]:
        """Answer a peer's mistake with ERROR, unless its party has used up its error budget ([R2]).

        The budget belongs to the authenticated identity: opening more connections, or picking other routing ids,
        buys a partner no more ERRORs.
        """
        bucket, refused = self._budgets(identity)
        size = sum(memoryview(f).nbytes for f in self._inbound)  # only on this path: never for a handled message
        if not refused.allow(now, cost=size):
            return self._misbehaving(routing_id, identity, now)
        who = peer_text(identity, 64)
        if not bucket.allow(now):
            return [Log(level="DEBUG", text=f"error to {who} dropped (rate limit): {peer_text(str(exc))}")]
        party = self.parties.get(identity)
        if party is not None and party.state in CONNECTED and routing_id == party.route:
            party.clock.last_sent = now
        err = Error(code=int(exc.code), message=exc.detail, ref=exc.ref, diff=exc.diff)
        return [Log(level="WARNING", text=f"{who}: {peer_text(str(exc), 400)}"), Send(to=routing_id, message=err)]

    def _budgets(self, key: str) -> tuple[TokenBucket, TokenBucket]:
        """[R2] errors and [B4] refused bytes of ``key`` (an authenticated identity, or ``hop>party`` for RELAYs
        that failed their end-to-end checks), created on first use, at most ``MAX_TRACKED_ROUTING_IDS`` kept."""
        budgets = self._buckets.pop(key, None) or (
            TokenBucket(ERROR_BURST, ERROR_RATE),
            TokenBucket(*_refused_budget(key.split(">")[-1] in self.parties)),
        )
        self._buckets[key] = budgets
        while len(self._buckets) > MAX_TRACKED_ROUTING_IDS:
            self._buckets.popitem(last=False)
        return budgets

    def _refuse_relay(self, hop_route: bytes, hop: str, party: str, exc: RemoteProtocolError,
                      now: float) -> list[Output]:
        """A RELAY that failed [C3]'s end-to-end checks: answered to the segment holder it came from, but charged to
        the party it claims to be from ([B4]). The label holder cannot tell whether that party sent garbage or the
        segment holder altered it; either way only the relayed party's session pays: past its budget it is lost
        (the segment holder could have dropped its messages anyway), and a party behind an honest segment holder
        cannot get that segment holder's own connection closed by flooding it with RELAYs that never verify."""
        bucket, refused = self._budgets(f"{hop}>{party}")
        size = sum(memoryview(f).nbytes for f in self._inbound)
        if not refused.allow(now, cost=size):
            p = self.parties[party]
            if p.state in CONNECTED and isinstance(p.route, RelayRoute):
                p.route, p.state, p.lost_at = None, PartyState.LOST, now
                return [Log(level="WARNING", text=f"{self._role(party)} {party!r}: more RELAYs that do not verify came "
                            f"through segment holder {hop!r} than the refused-bytes budget allows ([B4]); its relayed "
                            f"session is lost, waiting up to {self.rejoin_timeout_s:g} s for it to rejoin")]
            return [Log(level="DEBUG", text=f"dropped a RELAY for {party!r} from {hop!r} (refused-bytes budget)")]
        out: list[Output] = [Log(level="WARNING", text=f"refused a RELAY for {party!r} from segment holder {hop!r}: "
                                 f"{peer_text(str(exc), 300)}")]
        if bucket.allow(now):
            out.append(Send(to=hop_route, message=Error(code=int(exc.code), message=exc.detail, ref=exc.ref)))
        return out

    def _came_back(self, routing_id: bytes, identity: str, now: float) -> list[Output]:
        """[B5]: a connection dropped for [B2]/[B4] sent again (its DEALER reconnected by itself, or this was still
        queued): close it again, and refuse its key at the handshake for a cooldown that doubles each time it
        happens again (at most ``KEY_COOLDOWN_MAX_S``). A restarted honest node is refused only while that lasts
        and keeps trying ([L3])."""
        until, next_s = self._cooldowns.pop(identity, (0.0, KEY_COOLDOWN_FIRST_S))
        if now < until:  # already cooling down: this one was queued before the refusals began
            self._cooldowns[identity] = (until, next_s)
            return [Disconnect(to=routing_id), Log(level="DEBUG", text=f"closed {identity!r}'s dropped connection")]
        self._cooldowns[identity] = (now + next_s, min(KEY_COOLDOWN_MAX_S, 2 * next_s))
        while len(self._cooldowns) > MAX_TRACKED_ROUTING_IDS:
            self._cooldowns.popitem(last=False)
        return [
            Disconnect(to=routing_id, refuse_key_s=next_s),
            Log(
                level="WARNING",
                text=f"{peer_text(identity, 64)}'s dropped connection came back: closed it again, and refusing its key "
                f"for {next_s:g} s ([B5])",
            ),
        ]

    def _misbehaving(self, routing_id: bytes, identity: str, now: float) -> list[Output]:
        """[B4]: this connection has sent more refused bytes than its budget: close it; its party is lost."""
        self._retire(routing_id, "misbehaving")
        burst, rate = _refused_budget(identity in self.parties)
        reason = (
            f"sent more than {burst / 2**20:g} MiB of messages the label holder had to refuse "
            f"(budget refilled at {rate / 2**20:g} MiB/s)"
        )
        err = Error(code=int(ErrorCode.TOO_LARGE), message=f"you {reason}: this connection is closed")
        out: list[Output] = [Send(to=routing_id, message=err), Disconnect(to=routing_id)]
        p = self.parties.get(identity)
        if p is not None and p.route == routing_id and p.state in CONNECTED:
            p.route, p.state, p.lost_at = None, PartyState.LOST, now
            text = (
                f"{self._role(p.name)} {p.name!r} {reason}: closed its connection; waiting up to {self.rejoin_timeout_s:g} s "
                "for it to restart and rejoin"
            )
        else:
            text = f"{peer_text(identity, 64)} {reason}: closed its connection"
        return out + [Log(level="WARNING", text=text)]

    def _not_joined(self, routing_id: bytes, identity: str, msg: Message, now: float) -> list[Output]:
        """[S5], [J1]: a message on a connection that has not said HELLO (to this label holder process).

        ``ERROR UNEXPECTED_MESSAGE`` with ``ref`` the message's type: a data holder that was in a session with an
        earlier label holder process hears it in answer to its next HEARTBEAT and says HELLO again on a fresh
        connection. It goes to the sender's own routing id only, within its party's [R2] budget.
        """
        return self._error(
            routing_id,
            identity,
            RemoteProtocolError(
                ErrorCode.UNEXPECTED_MESSAGE,
                f"{msg.TYPE} on a connection that has not said HELLO: the label holder talks to party "
                f"{identity!r} on the connection whose HELLO it accepted last (if it restarted, say HELLO again)",
                ref=msg.TYPE,
            ),
            now,
        )

    def _unexpected(self, routing_id: bytes, identity: str, msg: Message, state: str, now: float) -> list[Output]:
        return self._error(
            routing_id,
            identity,
            RemoteProtocolError(
                ErrorCode.UNEXPECTED_MESSAGE,
                f"{msg.TYPE} is not allowed when the label holder has you in state {state}",
                ref=msg.TYPE,
            ),
            now,
        )

    def _log_error(self, identity: str, msg: Message | None, failure: RemoteProtocolError | None) -> Log:
        if isinstance(msg, Error):
            try:
                name = ErrorCode(msg.code).name
            except ValueError:
                name = f"code {msg.code}"
            return Log(level="WARNING", text=f"{identity} reports {name}: {peer_text(msg.message, 400)}")
        return Log(level="WARNING", text=f"{identity} sent a malformed ERROR (not answered): {peer_text(str(failure))}")

    def _check_hello(self, identity: str, msg: Hello) -> RemoteProtocolError | None:
        """The HELLO checks in the order of PROTOCOL.md §6: [V2], [H3], [H2], [H1], [H4]."""

        def refuse(code: ErrorCode, detail: str, diff: dict | None = None) -> RemoteProtocolError:
            return RemoteProtocolError(code, detail, ref=Hello.TYPE, diff=diff)

        if msg.version[0] != PROTOCOL_VERSION[0]:
            return refuse(ErrorCode.UNSUPPORTED_VERSION, f"HELLO.version {list(msg.version)}: this label holder speaks 1.x")
        if msg.version[1] < self.min_minor:
            return refuse(
                ErrorCode.UNSUPPORTED_VERSION,
                f"HELLO.version {list(msg.version)}: this run keeps its best epoch or stops early ([train].keep / "
                f"patience), which needs data holders at 1.{self.min_minor} or later; upgrade vfl on that node",
            )
        if msg.role not in ("data_holder", "segment_holder"):
            return refuse(ErrorCode.BAD_FIELD, "HELLO.role must be 'data_holder' or 'segment_holder', got "
                          f"{peer_text(msg.role, 40)}")
        try:
            same = digest_of(msg.config) == msg.digest
        except RemoteProtocolError as exc:  # a config deeper than a walk may go
            return exc
        if not same:
            return refuse(ErrorCode.BAD_FIELD, "HELLO.digest is not the SHA-256 of HELLO.config's canonical encoding")
        try:
            SessionConfig.from_wire(msg.config)
        except RemoteProtocolError as exc:
            return exc
        if msg.party != identity:
            return refuse(
                ErrorCode.IDENTITY_MISMATCH,
                f"HELLO.party is {peer_text(msg.party, 64)} but your key belongs to party {identity!r}",
            )
        if identity not in self.parties:
            return refuse(
                ErrorCode.UNKNOWN_PARTY,
                f"party {identity!r} is not in this session (parties: {', '.join(self.parties)})",
            )
        role = "segment_holder" if identity in self.config.segments else "data_holder"
        if msg.role != role:
            return refuse(ErrorCode.BAD_FIELD, f"HELLO.role is {peer_text(msg.role, 40)} but {identity!r} is a "
                          f"{role.replace('_', ' ')} in this session")
        theirs = {"run": msg.run, **msg.config}
        ours = {"run": self.run, **self._wire_config}
        if msg.run != self.run or msg.digest != self._digest:
            diff = config_diff(ours, theirs, budget=self.limits.max_header_bytes // 4)
            return refuse(ErrorCode.CONFIG_MISMATCH, "config differs: " + describe_diff(
                diff, theirs=role.replace("_", " ")), diff=diff)
        return None

    def _refuse_hello(self, routing_id: bytes, identity: str, msg: Hello, now: float) -> list[Output]:
        problem = self._check_hello(identity, msg)
        assert problem is not None  # an unknown party always fails [H1]
        return self._error(routing_id, identity, problem, now)

    # ------------------------------------------------------------------------------------------------ transitions

    def _on_hello(self, p: _Party, msg: Hello, now: float, routing_id: bytes) -> list[Output]:
        """[H1]-[H4], then [S5]: the connection this HELLO came on is the party's from now on."""
        problem = self._check_hello(p.name, msg)
        if problem is not None:
            return self._error(routing_id, p.name, problem, now)
        out: list[Output] = []
        if self.training is not None and p.joined:  # a rejoin: it will roll every party back to the checkpoint
            p.rejoins += 1
            if p.rejoins > self.max_rejoins:
                reason = (
                    f"{self._role(p.name)} {p.name!r} rejoined {p.rejoins} times, more than [train].max_rejoins = "
                    f"{self.max_rejoins}: each rejoin rolls every party back; fix what keeps stopping it, then start "
                    "every node again to resume from the latest checkpoint"
                )
                refusal = Error(code=int(ErrorCode.UNEXPECTED_MESSAGE), message=reason, ref=Hello.TYPE)
                return [Send(to=routing_id, message=refusal)] + self._finish(1, reason, now, lost=p.name)
        if p.route is not None and p.route != routing_id:
            old = p.route
            self._retire(old, "replaced")
            out += [
                Send(to=old, message=Error(code=int(ErrorCode.REPLACED), message=_replaced_error(None).detail)),
                Log(level="WARNING", text=f"{self._role(p.name)} {p.name!r}: a new connection with its key replaced the old one"),
            ]
        p.route = routing_id
        restart = p.state in CONNECTED
        returning = p.joined
        p.state, p.joined = PartyState.READY, True
        p.clock = PeerClock(last_received=now, last_sent=now)
        segment = p.name in self.config.segments
        p.nonce = None if segment else self._pair_nonce(p)  # a segment holder runs no PSI ([C5])
        p.psi = None
        p.minor = min(PROTOCOL_VERSION[1], msg.version[1])
        welcome = Welcome(
            version=(PROTOCOL_VERSION[0], p.minor),
            party=self.party,
            run=self.run,
            digest=self._digest,
            heartbeat_ms=int(self.heartbeat_s * 1000),
            peer_timeout_ms=int(self.peer_timeout_s * 1000),
            data_holders=self.config.data_holders,
            psi_nonce=p.nonce,
            instance=self.instance,
        )
        out += [
            self._send(p, welcome, now),
            PeerReady(party=p.name, restart=restart),
            Log(level="INFO", text=f"{self._role(p.name)} {p.name!r} {'rejoined' if returning else 'joined'}"),
        ]
        if segment and returning:
            out += self._behind_lost(p, now)
        if segment and self.final_rows is not None:  # joined (or rejoined) after the rows were aligned
            p.state = PartyState.ALIGNED
            if self.training is not None:
                out += self._resume(now)
        return out

    def _lost_cause(self, p: _Party) -> _Party:
        """The party to name for lost ``p``: the lost segment holder nearest to the label holder on ``p``'s route, if
        any (the parties behind a lost segment holder are lost because it is: their only route is through it)."""
        for name in reversed(self.chain.route(p.name)):
            if self.parties[name].state is PartyState.LOST:
                return self.parties[name]
        return p

    def _behind_lost(self, p: _Party, now: float) -> list[Output]:
        """[C9]: segment holder ``p`` came back on a new connection, so the relayed sessions of every party behind it
        died with its old one (it closes its inputs' connections so that they rejoin). Each of them is lost as of now:
        the resume waits for their HELLOs (up to the rejoin timeout) instead of rolling back sessions that no longer
        exist, and their old routes get nothing more."""
        gone = [q for q in (self.parties[name] for name in self.chain.upstream(p.name)) if q.state in CONNECTED]
        for q in gone:
            q.state, q.lost_at, q.route = PartyState.LOST, now, None
        if not gone:
            return []
        names = ", ".join(repr(q.name) for q in gone)
        return [Log(level="WARNING", text=f"segment holder {p.name!r} came back on a new connection: the sessions of "
                    f"{names} behind it went with the old one; waiting up to {self.rejoin_timeout_s:g} s for them to "
                    "rejoin through it")]

    def _role(self, name: str) -> str:
        return "segment holder" if name in self.config.segments else "data holder"

    def _pair_nonce(self, p: _Party) -> str | None:
        """[P1], [P19]: a fresh nonce for every pairwise PSI, except that an unfinished bucketed PSI with finished
        buckets keeps its nonce (and so its partition), so that the restarted pair resumes after those buckets."""
        if self.psi is None:
            return None
        if self.psi.buckets != 1 and self.final_rows is None:
            if p.psi is not None:  # this process ran the pair: what it holds finished now decides (none: [P1])
                p.resume_nonce = p.nonce if p.psi.finished_buckets else None
            if p.resume_nonce is not None:
                return p.resume_nonce
        p.resume_nonce = None
        return new_nonce()

    def _on_echo(self, p: _Party, msg: Echo, now: float) -> list[Output]:
        """[M1], within the ECHO cap of section 7 (the reply also counts toward the peer's send budget)."""
        size = sum(t.array.nbytes for t in msg.tensors)
        if self.max_echo_bytes is not None and size > self.max_echo_bytes:
            return self._error(
                p.route,
                p.name,
                RemoteProtocolError(
                    ErrorCode.TOO_LARGE,
                    f"ECHO carries {size} bytes of tensors; this label holder echoes at most {self.max_echo_bytes} "
                    "(its largest session message): use a smaller [link_check].shape",
                    ref=msg.TYPE,
                ),
                now,
            )
        return [self._send(p, EchoReply(seq=msg.seq, tensors=msg.tensors), now)]

    def _on_heartbeat(self, p: _Party, msg: Heartbeat, now: float) -> list[Output]:
        return []

    def _on_bye(self, p: _Party, msg: Bye, now: float) -> list[Output]:
        if p.state is PartyState.LOST and msg.pause:
            return []  # [J2]: it said so already
        if msg.pause and self.config.train and p.state in CONNECTED:  # [J2]: it will be started again: keep its place
            p.state, p.lost_at = PartyState.LOST, now
            return [
                Log(
                    level="WARNING",
                    text=f"{self._role(p.name)} {p.name!r} paused ({peer_text(msg.reason)}): waiting up to "
                    f"{self.rejoin_timeout_s:g} s for it to be started again and rejoin",
                )
            ]
        if self.config.train and p.state is not PartyState.DONE:
            return self._finish(
                1, f"{self._role(p.name)} {p.name!r} left during the session: {peer_text(msg.reason)}", now, lost=p.name
            )
        if self.psi is not None and p.state is not PartyState.ALIGNED:
            return self._finish(
                1, f"{self._role(p.name)} {p.name!r} left before the rows were aligned: {peer_text(msg.reason)}", now, lost=p.name
            )
        p.state, p.left_ok = PartyState.DONE, msg.ok
        out: list[Output] = [PeerLeft(party=p.name, ok=msg.ok, reason=peer_text(msg.reason))]
        out.append(Log(level="INFO" if msg.ok else "WARNING", text=f"{self._role(p.name)} {p.name!r} left: {peer_text(msg.reason)}"))
        if all(q.state is PartyState.DONE for q in self.parties.values()):
            failed = [q.name for q in self.parties.values() if not q.left_ok]
            if failed:
                self.finished = Finished(exit_code=1, reason=f"data holder(s) {', '.join(failed)} left with an error")
            else:
                self.finished = Finished(exit_code=0, reason="every data holder finished and left")
            out.append(self.finished)
        return out

    # ------------------------------------------------------------------------------------------------ PSI phase

    @property
    def has_work(self) -> bool:
        """Our own blinded streams still have chunks to compute, or training the rest of a step (or of the epoch it
        ended) whose BACKWARDs went out (the node calls ``work`` instead of sleeping)."""
        if self.finished is not None:
            return False
        if self._settling:
            return True
        return any(p.psi is not None and p.psi.has_work for p in self.parties.values())

    def work(self, now: float) -> list[Output]:
        """Finish the last training step, or the epoch it ended (its BACKWARDs are on their way), or compute and send
        the next chunk of one data holder's stream, taking the data holders in turn."""
        if self._settling:
            return self._settle_training(now)
        busy = [p for p in self.parties.values() if p.psi is not None and p.psi.has_work]
        if self.finished is not None or not busy:
            return []
        p = busy[self._work_turn % len(busy)]
        self._work_turn += 1
        return [self._send(p, m, now) for m in p.psi.work()]

    def _psi_fatal(self, p: _Party, exc: RemoteProtocolError, now: float) -> list[Output]:
        """A PSI with a misbehaving peer has no right answer: tell it why and end the session for everyone."""
        err = Error(code=int(exc.code), message=exc.detail, ref=exc.ref)
        out: list[Output] = [self._send(p, err, now)]
        return out + self._finish(1, f"PSI with data holder {p.name!r} failed: {exc}", now)

    def _on_psi_start(self, p: _Party, msg: PsiStart, now: float) -> list[Output]:
        if self.psi is None:
            return self._unexpected(p.route, p.name, msg, "READY (this session has no PSI)", now)
        p.psi = PairwisePsi(
            self.psi, run=self.run, nonce=p.nonce, role="label_holder", max_peer_items=self.max_psi_items, peer=p.name
        )
        p.state, p.last_progress = PartyState.PSI, now
        try:
            replies = p.psi.receive(msg)
        except RemoteProtocolError as exc:
            return self._psi_fatal(p, exc, now)
        out = [self._send(p, m, now) for m in p.psi.start() + replies]
        out.append(Log(level="INFO", text=f"PSI with data holder {p.name!r}: it has {msg.n_items} IDs"))
        if p.psi.bucketed:
            k, r = p.psi.exchange.k, p.psi.resumed_at
            text = f"{k} buckets" + (f"; resuming at bucket {r} (the first {r} finished earlier)" if r else "")
            out.append(Log(level="INFO", text=f"PSI with data holder {p.name!r}: {text}"))
        if p.psi.done:  # [P22]: a resumed pair whose every bucket was finished before
            out += self._pair_done(p, now)
        return out

    def _on_psi_message(self, p: _Party, msg: Message, now: float) -> list[Output]:
        p.last_progress = now
        try:
            replies = p.psi.receive(msg)
        except RemoteProtocolError as exc:
            return self._psi_fatal(p, exc, now)
        out: list[Output] = [self._send(p, m, now) for m in replies]
        if p.psi.done:
            out += self._pair_done(p, now)
        return out

    def _pair_done(self, p: _Party, now: float) -> list[Output]:
        p.state = PartyState.PSI_DONE
        out: list[Output] = [Log(level="INFO", text=f"PSI with data holder {p.name!r}: {len(p.psi.rows)} shared IDs")]
        return out + self._maybe_align(now)

    def _maybe_align(self, now: float) -> list[Output]:
        """Once every pairwise PSI is done: the final rows, and each data holder's positions in the final order."""
        parties = [self.parties[name] for name in self.config.data_holders]
        first_time = self.final_rows is None
        settled = (
            (PartyState.PSI_DONE, PartyState.ALIGNED)
            if first_time
            else (PartyState.PSI_DONE, PartyState.ALIGNED, PartyState.DONE, PartyState.TRAINING)
        )
        if any(q.state not in settled for q in parties):
            return []
        out: list[Output] = []
        if first_time:
            plan = combine([q.psi for q in parties])
            if len(plan.label_rows) < self.psi.min_rows:
                return self._finish(
                    1,
                    f"the intersection across all parties has {len(plan.label_rows)} rows, fewer than the "
                    f"{self.psi.min_rows} this session needs; check that every party uses the same ID column and "
                    "ID format",
                    now,
                )
            self.final_rows = plan.label_rows
            positions = dict(zip(self.config.data_holders, plan.positions))
        else:  # a data holder restarted after the alignment: same final rows, its new pairwise order
            positions = {}
            for q in parties:
                if q.state is PartyState.PSI_DONE:
                    try:
                        positions[q.name] = positions_for(self.final_rows, q.psi.rows)
                    except ValueError as exc:
                        return self._finish(1, f"data holder {q.name!r} rejoined with other IDs: {exc}", now)
        for q in parties:
            if q.state is PartyState.PSI_DONE:
                out += [self._send(q, m, now) for m in final_rows_messages(positions[q.name], self.psi.chunk_size)]
                q.state = PartyState.ALIGNED
        for name in self.config.segment_holders:  # [C5]: no PSI of their own; aligned with the others
            if self.parties[name].state is PartyState.READY:
                self.parties[name].state = PartyState.ALIGNED
        if first_time:
            out.append(Log(level="INFO", text=f"rows aligned: {len(self.final_rows)} shared by every party"))
            out.append(Aligned(rows=self.final_rows))
        elif self.training is not None:
            out += self._resume(now)
        return out

    # ------------------------------------------------------------------------------------------------ training

    def start_training(
        self,
        top: TopSegment,
        plan: TrainPlan,
        now: float,
        first_step: int = 0,
        resume_digests: dict[str, str] | None = None,
        best: BestEpoch | None = None,
    ) -> list[Output]:
        """The node built the top segment over the aligned rows: send every data holder the schedule.

        ``first_step`` > 0 resumes from the checkpoint every party holds at that step (``resume_digests``: the
        digest each data holder reported for it; ``best``: the best epoch recorded with it).
        """
        if self.final_rows is None or not self.config.train or self.training is not None:
            return []
        self._top, self._plan = top, plan
        return self._begin(first_step, resume_digests or {}, now, best=best)

    def _begin(
        self, first_step: int, digests: dict[str, str], now: float, rollback: bool = False, best: BestEpoch | None = None
    ) -> list[Output]:
        self._done_announced, self._done_sent = False, {}  # a rollback's pipeline ends with its own TRAINING_DONE
        self.training = LabelHolderTraining(
            self._top,
            self._plan,
            parties=self.control_order,
            inputs=self.chain.inputs(None),
            widths=self.chain.input_widths(None),
            announce_rows=bool(self.config.segments),
            batch_size=self.config.batch_size,
            window=self.config.first_window,
            max_window=self.config.max_window if self.config.auto_window else None,
            lookahead=all(self.parties[name].minor >= 7 for name in self.config.parties),
            n_rows=len(self.final_rows),
            first_step=first_step,
            resume_digests=digests,
            best=best,
            precision=self.config.precision,
        )
        if first_step > 0 and digests:  # resumed from a committed checkpoint: until the next one commits, a party
            # that restarts again resumes from this one (not "before the first checkpoint")
            self.training.latest_checkpoint, self.training.latest_digests = first_step, dict(digests)
        out: list[Output] = []
        for name, msgs in self.training.start(now).items():
            p = self.parties[name]
            if rollback and p.state is PartyState.TRAINING:
                p.rolling_back = True
                out.append(self._send(p, Rollback(step=first_step), now))
            p.state, p.last_progress = PartyState.TRAINING, now
            out += [self._send(p, m, now) for m in msgs]
        return out

    @property
    def control_order(self) -> tuple[str, ...]:
        """[C6] the order in which parties get each round of training control (SCHEDULE, CHECKPOINT, ...): every
        segment holder before the parties behind it, so a message to a party behind it passes it after its own."""
        segs = sorted(self.config.segments, key=lambda name: (self.chain.depth(name), name))
        return tuple(segs) + self.config.data_holders

    def _resume(self, now: float) -> list[Output]:
        """A data holder restarted mid-training and has its rows again: everyone goes back to the latest checkpoint."""
        if any(q.state not in (PartyState.ALIGNED, PartyState.TRAINING) for q in self.parties.values()):
            return []  # someone else is still rejoining
        step = self.training.latest_checkpoint
        if step is None:
            who = "a segment holder or data holder" if self.config.segments else "a data holder"
            return self._finish(1, f"{who} restarted before the first checkpoint was complete", now)
        digests = self.training.latest_digests
        best = self.training.committed_best
        try:
            self._top.restore(step)
        except CheckpointError as exc:
            return self._finish(1, f"cannot resume: {exc}", now)
        out: list[Output] = [Log(level="WARNING", text=f"resuming every party from the checkpoint at step {step}")]
        return out + self._begin(step, digests, now, rollback=True, best=best)

    def _on_training_message(self, p: _Party, msg: Message, now: float) -> list[Output]:
        p.last_progress = now
        if isinstance(msg, Rollback):
            if not p.rolling_back:
                return self._unexpected(p.route, p.name, msg, "TRAINING (no rollback pending)", now)
            p.rolling_back = False
            return []
        if p.rolling_back:  # sent before it saw our ROLLBACK: belongs to the abandoned pipeline
            return [Log(level="DEBUG", text=f"dropped a stale {msg.TYPE} from {p.name!r} (rollback pending)")]
        if isinstance(msg, TrainingDone):
            return self._on_training_done(p, msg, now)
        try:
            if isinstance(msg, Forward):
                per_party, metrics = self.training.on_forward(p.name, msg, now)
            elif isinstance(msg, CheckpointDone):
                self.training.on_checkpoint_done(p.name, msg)
                per_party, metrics = {}, []
            else:
                per_party, metrics = self.training.on_eval(p.name, msg, now)
        except CheckpointError as exc:
            return self._finish(1, f"checkpoint: {exc}", now)
        except PrecisionError as exc:  # our own gradient cannot be sent in the session's precision: never garbage
            return self._finish(1, f"label holder {self.party}: {exc}", now)
        except RemoteProtocolError as exc:
            err = Error(code=int(exc.code), message=exc.detail, ref=exc.ref)
            return [self._send(p, err, now)] + self._finish(1, f"training with data holder {p.name!r} failed: {exc}", now)
        return self._training_outputs(per_party, metrics, now)

    @property
    def _settling(self) -> bool:
        """Training has work waiting for the last step's BACKWARDs to leave (``LabelHolderTraining.settle``), and
        every data holder is in the pipeline: while one rejoins, the pipeline is about to be rolled back, and what it
        would close (an epoch, its checkpoint) belongs to the abandoned one."""
        return (self.finished is None and self.training is not None and self.training.unsettled
                and all(q.state is PartyState.TRAINING for q in self.parties.values()))

    def _settle_training(self, now: float) -> list[Output]:
        """The rest of the last step, or of the epoch it ended, once its BACKWARDs are out (``LabelHolderTraining
        .settle``), and what that says: the next epoch's CHECKPOINT and EPOCH, the epoch's metrics, TRAINING_DONE."""
        try:
            per_party, metrics = self.training.settle(now)
        except CheckpointError as exc:
            return self._finish(1, f"checkpoint: {exc}", now)
        except PrecisionError as exc:
            return self._finish(1, f"label holder {self.party}: {exc}", now)
        return self._training_outputs(per_party, metrics, now)

    def _training_outputs(self, per_party: dict[str, list[Message]], metrics: list[dict], now: float) -> list[Output]:
        out: list[Output] = []
        if any(isinstance(m, Window) for msgs in per_party.values() for m in msgs):
            t = self.training
            out.append(Log(level="INFO", text=(
                f"window auto: {t.window} (a step took {t.probe['period_ms']:.1f} ms from one to the next at window 1, "
                f"{t.probe['step_ms']:.1f} ms of it here; max_window {self.config.max_window})")))
        # in the order they were made, across parties ([C6]: a segment holder passes them on in arrival order)
        events = getattr(per_party, "events", None)
        if events is None:
            events = [(name, m) for name, msgs in per_party.items() for m in msgs]
        for name, m in events:
            q = self.parties[name]  # TRAINING_DONE (v1.5) only to a party that speaks 1.5
            if q.state is not PartyState.TRAINING:  # rejoining: a fresh SCHEDULE after the rollback is all it gets
                continue
            if not (isinstance(m, TrainingDone) and q.minor < 5):
                out.append(self._send(q, m, now))
        out += [EpochDone(metrics=m) for m in metrics]
        # once: FORWARDs of an epoch sent ahead ([X14]) may still arrive after TRAINING_DONE went out, and each
        # would otherwise find no TRAINING_DONE in its answer and finish the run before every party confirmed
        if self.training.done and not self._done_announced:
            self._done_announced = True
            self._done_sent = {q.name: m for q in self.parties.values() if q.minor >= 5
                               for m in per_party.get(q.name, []) if isinstance(m, TrainingDone)}
            if not self._done_sent:  # no data holder at 1.5 to confirm it: done now, as in 1.4
                out += self._finish(0, self._finished_text(), now)
        return out

    def _on_training_done(self, p: _Party, msg: TrainingDone, now: float) -> list[Output]:
        """[X10]: a data holder confirms TRAINING_DONE once its kept weights are loaded. Only when every data holder
        at 1.5 has, the run is finished: this node saves its segment, marks the run finished, and says BYE."""
        sent = self._done_sent.get(p.name)
        if sent is None or msg != sent:
            return self._unexpected(p.route, p.name, msg, "TRAINING (no TRAINING_DONE of this party to confirm)",
                                    now)
        del self._done_sent[p.name]
        if self._done_sent:
            return []
        return self._finish(0, self._finished_text(), now)

    def _finished_text(self) -> str:
        """What BYE and the log say when training ends: how many epochs, why, and which epoch's weights are kept."""
        t = self.training
        kept = t.kept
        shown = t.history[-1] if t.history else {}
        if kept is not None:  # the kept epoch's line (it may predate this process, after a resume: then its loss)
            shown = next((h for h in t.history if h["epoch"] == kept.epoch + 1), {"val_loss": kept.val_loss})
        summary = ", ".join(f"{k} {v:.4g}" for k, v in shown.items() if k.startswith("val_") and isinstance(v, float))
        text = f"training finished after {t.epoch} epoch(s)"
        if t.stopped_early:
            text += f" (early stop: validation loss not improved for {t.plan.patience} epoch(s))"
        if kept is not None:
            text += f"; kept the weights after epoch {kept.epoch + 1}, the best validation loss"
        return text + (f": {summary}" if summary else "")


def _replaced_error(ref: str | None) -> RemoteProtocolError:
    """[S5]: what a replaced connection hears (once when replaced, then for anything it still sends)."""
    return RemoteProtocolError(
        ErrorCode.REPLACED,
        "this connection was replaced by a newer connection with the same key ([S5]); if that was not you, "
        "someone else holds this party's secret key",
        ref=ref,
    )


_TABLE: dict[tuple[PartyState, str], Handler] = {
    (PartyState.IDLE, Hello.TYPE): LabelHolderMachine._on_hello,
    (PartyState.DONE, Hello.TYPE): LabelHolderMachine._on_hello,
    (PartyState.READY, Hello.TYPE): LabelHolderMachine._on_hello,
    (PartyState.READY, Echo.TYPE): LabelHolderMachine._on_echo,
    (PartyState.READY, Heartbeat.TYPE): LabelHolderMachine._on_heartbeat,
    (PartyState.READY, Bye.TYPE): LabelHolderMachine._on_bye,
    (PartyState.READY, PsiStart.TYPE): LabelHolderMachine._on_psi_start,
    (PartyState.PSI, PsiBucket.TYPE): LabelHolderMachine._on_psi_message,
    (PartyState.PSI, PsiItems.TYPE): LabelHolderMachine._on_psi_message,
    (PartyState.PSI, PsiResult.TYPE): LabelHolderMachine._on_psi_message,
    (PartyState.PSI, Heartbeat.TYPE): LabelHolderMachine._on_heartbeat,
    (PartyState.PSI, Hello.TYPE): LabelHolderMachine._on_hello,
    (PartyState.PSI, Bye.TYPE): LabelHolderMachine._on_bye,
    (PartyState.PSI_DONE, Heartbeat.TYPE): LabelHolderMachine._on_heartbeat,
    (PartyState.PSI_DONE, Hello.TYPE): LabelHolderMachine._on_hello,
    (PartyState.PSI_DONE, Bye.TYPE): LabelHolderMachine._on_bye,
    (PartyState.ALIGNED, Heartbeat.TYPE): LabelHolderMachine._on_heartbeat,
    (PartyState.ALIGNED, Hello.TYPE): LabelHolderMachine._on_hello,
    (PartyState.ALIGNED, Bye.TYPE): LabelHolderMachine._on_bye,
    (PartyState.TRAINING, Forward.TYPE): LabelHolderMachine._on_training_message,
    (PartyState.TRAINING, EvalForward.TYPE): LabelHolderMachine._on_training_message,
    (PartyState.TRAINING, Heartbeat.TYPE): LabelHolderMachine._on_heartbeat,
    (PartyState.TRAINING, Bye.TYPE): LabelHolderMachine._on_bye,
    (PartyState.TRAINING, CheckpointDone.TYPE): LabelHolderMachine._on_training_message,
    (PartyState.TRAINING, Rollback.TYPE): LabelHolderMachine._on_training_message,
    (PartyState.TRAINING, TrainingDone.TYPE): LabelHolderMachine._on_training_message,
    (PartyState.TRAINING, Hello.TYPE): LabelHolderMachine._on_hello,
    (PartyState.LOST, Hello.TYPE): LabelHolderMachine._on_hello,
    (PartyState.LOST, Bye.TYPE): LabelHolderMachine._on_bye,  # [J2]: a paused party ends the session after all
}
"""(state, message type) -> transition. Every pair not listed is UNEXPECTED_MESSAGE ([T1]); ERROR never gets here."""
