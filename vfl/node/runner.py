"""The node loop: move frames between the socket and the role's state machine, and do what the machine says.

This is the only place that reads the clock or touches the socket; every decision is the machine's. The loop never
blocks longer than ``MAX_SLEEP_S`` so signals and timers are seen promptly, and a peer's garbage only ever reaches
the machine, which answers it and goes on.
"""

from __future__ import annotations

import json
import logging
import signal
import statistics
import time
from typing import Iterable

import numpy as np
import zmq

from ..protocol import (
    Aligned,
    DataHolderMachine,
    Disconnect,
    EpochDone,
    Error,
    Finished,
    LabelHolderMachine,
    LinkChecked,
    Log,
    Output,
    PeerLeft,
    PeerReady,
    Send,
    Tensor,
    encode,
)
from ..protocol.codec import DTYPES
from ..protocol.events import Reconnect
from ..protocol.errors import LocalProtocolError
from ..protocol.label_holder import DEFAULT_MAX_REJOINS
from ..protocol.text import peer_text
from ..psi import PsiEngine
from .alignment import PartyIds, load_ids, psi_plan, write_aligned
from .background import Abandoned
from .catch_up import CatchUp
from .spill import remove_spill, spill_folder, spill_size
from .config import NodeConfig
from .keys import label_holder_relay_keys, own_relay_key
from ..protocol.relayed import RelayedParty
from ..protocol.segment_holder import SegmentHolderMachine
from .outbox import Outbox, frames_bytes
from .progress import Progress
from .transport import LINGER_MS, Transport, largest_message_bytes, outbox_bytes

MAX_SLEEP_S = 0.2
FINAL_FLUSH_S = 2.0  # how long a finishing node keeps trying to hand its last messages (BYE, ERROR) to libzmq
MAX_BATCH = 256  # messages handled per wake-up before timers get a turn
HOUSEKEEPING_S = 0.01  # while messages keep arriving, timers and progress are looked at this often, not per message

INSECURE_WARNING = (
    "INSECURE MODE: CurveZMQ is off. Anyone who can reach this port can connect and claim any party id, and all "
    "traffic is in clear text. Use this only for debugging on a trusted machine."
)


def _link_check_tensor(cfg: NodeConfig) -> list[Tensor]:
    lc = cfg.link_check
    if lc.rounds == 0:
        return []
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=int(np.prod(lc.shape)) * DTYPES[lc.dtype].itemsize, dtype=np.uint8)
    return [Tensor("link_check", arr.view(DTYPES[lc.dtype]).reshape(lc.shape))]


def build_machine(cfg: NodeConfig, now: float, psi=None) -> LabelHolderMachine | DataHolderMachine:
    t = cfg.timeouts
    if cfg.is_label_holder:
        return LabelHolderMachine(
            party=cfg.party,
            run=cfg.run,
            config=cfg.session,
            now=now,
            heartbeat_s=t.heartbeat,
            peer_timeout_s=t.peer,
            join_timeout_s=t.join,
            progress_timeout_s=t.progress,
            rejoin_timeout_s=t.rejoin,
            limits=cfg.limits,
            psi=psi,
            max_echo_bytes=largest_message_bytes(cfg),
            max_psi_items=cfg.psi.max_items,
            max_rejoins=cfg.train.max_rejoins if cfg.train is not None else DEFAULT_MAX_REJOINS,
            # keep = "best" / patience end with TRAINING_DONE naming the epoch to keep: data holders must speak 1.5
            min_minor=5 if cfg.train is not None and (cfg.train.keep == "best" or cfg.train.patience) else 0,
            relay_keys=label_holder_relay_keys(cfg) if cfg.session.segments else None,
        )
    machine = DataHolderMachine(
        party=cfg.party,
        run=cfg.run,
        config=cfg.session,
        now=now,
        handshake_timeout_s=t.handshake,
        link_check=_link_check_tensor(cfg),
        link_rounds=cfg.link_check.rounds,
        hold_s=cfg.link_check.hold,
        label_holder=f"the label holder at {cfg.endpoint}",
        limits=cfg.limits,
        psi=psi,
        progress_timeout_s=t.progress,
        max_psi_items=cfg.psi.max_items,
        rejoin_timeout_s=t.rejoin,
        max_rejoins=cfg.train.max_rejoins if cfg.train is not None else DEFAULT_MAX_REJOINS,
        role=cfg.role,
    )
    if cfg.is_segment_holder:
        return SegmentHolderMachine(machine, party=cfg.party, config=cfg.session, limits=cfg.limits,
                                    relay_key=own_relay_key(cfg))
    key = own_relay_key(cfg)
    if key is not None:  # behind a segment holder: the session goes up as RELAY ([C3])
        return RelayedParty(machine, key=key, limits=cfg.limits, hop=f"segment holder {cfg.downstream!r}")
    return machine


class NodeRunner:
    """Runs one node until its machine finishes or a signal asks it to stop. ``run()`` returns the exit code."""

    def __init__(
        self,
        cfg: NodeConfig,
        log: logging.Logger | None = None,
        *,
        ids: PartyIds | None = None,
        start: str = "auto",
        end_session: bool = False,
    ):
        """``ids``: the party's IDs, already read and checked (``load_ids``), when the session runs PSI. ``start``:
        ``auto``, ``fresh`` or ``resume`` (``vfl node --fresh/--resume``; see ``lifecycle``).

        ``end_session``: SIGINT/SIGTERM end the session for every party. By default the first one pauses this
        party (PROTOCOL.md [J2]: the others wait for it to be started again) and a second one ends the session."""
        self.end_session = end_session
        self.signals = 0
        self.poller: zmq.Poller | None = None  # rebuilt whenever the data holder opens a fresh socket
        self.cfg = cfg
        self.ids = ids
        self.start = start
        self.engine: PsiEngine | None = None  # the PSI's worker pool, when the session runs PSI
        self.machine: LabelHolderMachine | DataHolderMachine | None = None  # built when the loop starts
        self.training = None  # the SessionTraining of a training (or prediction) session, once the IDs are read
        self.progress: Progress | None = None  # the label holder's progress display
        self.clean_exit = True  # False: libzmq did not shut down; the process must exit hard
        self.aligned = False  # the rows were aligned (and written): a bucketed PSI's spill folder is no longer needed
        self.log = log or logging.getLogger(f"vfl.node.{cfg.party}")
        self.stop_requested: str | None = None
        self.bytes_sent = 0
        self.bytes_received = 0
        #: bytes handed to libzmq per message type (header + tensor frames, as in ``bytes_sent``): logged at exit
        self.sent_by_type: dict[str, int] = {}
        #: encoded messages libzmq could not take yet (no connection, full queue), per peer: the loop never blocks on
        #: a send, and a peer that does not read only ever holds up its own messages
        self.outbox = Outbox(outbox_bytes(cfg), stall_s=cfg.timeouts.peer)
        #: peers a send failed for (EHOSTUNREACH): said once, then quiet until a send to them succeeds again
        self.unreachable: set[bytes | None] = set()

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stop_requested = signal.Signals(signum).name
        self.signals += 1

    def run(self) -> int:
        cfg = self.cfg
        if cfg.insecure:
            self.log.warning(INSECURE_WARNING)
        if cfg.session.psi and self.ids is None:
            self.ids = load_ids(cfg)
        if cfg.session.train:
            from .training import SessionTraining  # imports torch: only a training session pays for it

            self.training = SessionTraining(cfg, self.ids, self.log, self.start)
            self.training.check()
        if cfg.session.psi:
            # [psi].cluster: connect now, so an unreachable cluster is a setup error (exit 2) before any session. Its
            # waits are bounded by half the peer timeout: a node blocked on its cluster sends no heartbeats, so it
            # must give up soon enough to tell its peers why before they give up on it
            self.engine = PsiEngine(workers=cfg.psi.workers or None, cluster=cfg.psi.cluster,
                                    cluster_timeout=cfg.timeouts.peer / 2)
            if cfg.psi.cluster is not None:
                self.engine.start()
                self.log.info("PSI on the Dask cluster at %s (%d worker threads)", cfg.psi.cluster,
                              self.engine.cluster_threads)
        try:
            transport = Transport(cfg, rows=len(self.ids.items) if self.ids is not None else 0)
        except BaseException:
            if self.engine is not None:
                self.engine.close()
            raise
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            role = "label holder" if cfg.is_label_holder else "data holder"
            verb = "listening on" if cfg.is_label_holder else "connecting to"
            security = "insecure" if cfg.insecure else "CurveZMQ"
            if cfg.is_label_holder:
                n = len(cfg.session.data_holders)
                waits = f"waiting up to {cfg.timeouts.join:g} s for {n} data holder{'s' if n != 1 else ''} to join"
            else:
                waits = f"waiting up to {cfg.timeouts.handshake:g} s for the label holder to answer"
            self.log.info("%s %r (run %s) %s %s [%s]; %s", role, cfg.party, cfg.run, verb, transport.endpoint, security,
                          waits)
            try:
                return self._loop(transport)
            except Exception as exc:  # a bug or a local failure: tell the peers before dying, so nobody waits for us
                machine = self.machine
                if machine is not None and machine.finished is None:
                    self._execute(transport, machine.close(f"internal error at {cfg.party!r}: {type(exc).__name__}", time.monotonic()))
                    self._flush(transport, until=time.monotonic() + FINAL_FLUSH_S)
                raise
        finally:
            # a peer that never answered (refused key, wrong address) gets nothing more: do not linger for it
            self.clean_exit = transport.close(linger_ms=LINGER_MS if self.bytes_received else 0)
            if self.engine is not None:
                self.engine.close()
                self._leave_spill()
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _loop(self, transport: Transport) -> int:
        psi = None
        if self.cfg.session.psi:
            psi = psi_plan(self.cfg, self.ids, self.engine)
        machine = self.machine = build_machine(self.cfg, time.monotonic(), psi)
        if hasattr(machine, "connected"):
            machine.connected(transport.routing_id)
        pending: list[Output] = machine.start(time.monotonic())
        poll_flags = zmq.POLLIN
        housekeeping_at = 0.0  # timers and the progress display: at most every HOUSEKEEPING_S while messages flow
        timeouts = self.cfg.timeouts
        catch_up = CatchUp(busy_s=timeouts.heartbeat, limit_s=max(1.0, min(10.0, timeouts.peer / 2)))
        looked_at = time.monotonic()  # when the loop last read the socket (or found it empty)
        while True:
            finished = self._execute(transport, pending)
            if self.poller is None:
                poller = self.poller = zmq.Poller()
                for sock in transport.poll_items():
                    poller.register(sock, zmq.POLLIN)
                poll_flags = zmq.POLLIN
            if self.outbox:
                self._flush(transport)
                if self.outbox and finished is None and machine.drops_non_readers:
                    pending = self._drop_non_readers(time.monotonic())
                    if pending:
                        continue
            if finished is not None:
                if self.bytes_received:  # someone is listening: give the last messages a moment to go out
                    self._flush(transport, until=time.monotonic() + FINAL_FLUSH_S)
                return self._report(finished)
            now = time.monotonic()
            catch_up.busy(looked_at, now)  # a long step: what the peers sent meanwhile is read before the timers
            if now >= housekeeping_at and not catch_up.defer_timers(now, transport.has_input()):
                housekeeping_at = now + HOUSEKEEPING_S
                self._show_progress(machine)
                pending = machine.handle_timer(now)
                if pending:
                    continue
            if self.stop_requested:
                pause = not self.end_session and self.signals < 2
                pending = machine.close(f"stopped by {self.stop_requested}", now, pause=pause)
                if not pending:  # nothing left to say: the machine had already finished
                    return 0
                continue
            waiting = transport.has_input()
            if not waiting:
                looked_at = time.monotonic()  # nothing unread: the peers' messages so far are all in
            if getattr(machine, "work_first", False) or (not waiting and machine.has_work and not self.outbox):
                # a data holder's next FORWARD goes before anything else is read (``work_first``: bounded by the
                # window); our own PSI stream: compute one chunk now that the answers above are on their way (and only
                # once libzmq has taken the earlier chunks: a peer that reads slowly paces the stream, it does not
                # fill memory)
                pending = machine.work(now)
                continue
            if waiting:  # messages already waiting: no need to ask the poller
                ready = {transport.socket: zmq.POLLIN}
            else:
                deadline = machine.next_timer()
                if deadline is not None and housekeeping_at - HOUSEKEEPING_S < deadline <= now:
                    housekeeping_at = 0.0  # a timer fell due since the timers were last looked at: look now
                    pending = []
                    continue
                sleep = MAX_SLEEP_S if deadline is None else min(MAX_SLEEP_S, max(0.0, deadline - now))
                flags = zmq.POLLIN | zmq.POLLOUT if self.outbox else zmq.POLLIN
                if flags != poll_flags:
                    poller.modify(transport.socket, flags)
                    poll_flags = flags
                ready = dict(poller.poll(int(sleep * 1000)))
            pending = []
            looked_at = time.monotonic()
            if transport.socket in ready:
                for _ in range(MAX_BATCH):
                    received = transport.recv()
                    if received is None:
                        break
                    now = time.monotonic()
                    self.bytes_received += sum(len(f) for f in received.frames)
                    new = machine.receive(received.routing_id, received.identity, received.frames, now)
                    pending += new
                    # the node must act on an alignment before the next message is read; while our own PSI stream
                    # is waiting, answer one message at a time so that the two streams interleave; and an answer goes
                    # out before the next message is read: across a WAN a window of FORWARDs arrives in one burst,
                    # and computing it whole before the first BACKWARD leaves would add W steps to every round trip
                    if (machine.finished is not None or machine.has_work
                            or any(type(o) is Aligned or type(o) is Send for o in new)):
                        break
            # The connection's events after its messages: what the label holder said before the drop (a BYE that
            # pauses or ends the session) is heard first, in order. Once the machine chose a fresh connection, the
            # old one's events are dropped with it (a rejoin on the drop too would end the session it rejoins).
            if (transport.monitor is not None and transport.monitor in ready and not transport.has_input()
                    and not any(type(o) is Reconnect for o in pending)):
                for event in transport.monitor_events():
                    if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                        pending += machine.refused_by_zap(event["value"], time.monotonic())
                    elif event["event"] == zmq.EVENT_DISCONNECTED:
                        pending += machine.connection_lost(time.monotonic())
                    else:
                        self.log.warning("CURVE handshake with %s failed (protocol error %s)", transport.endpoint, event["value"])

    def _encode(self, out: Send) -> list:
        """The frames of one message. Our own ERROR can outgrow the limits (it quotes what a peer sent, a diff of
        its config): then it goes out cut short, without the diff, and the node never stops over its own answer."""
        try:
            return encode(out.message, self.cfg.limits)
        except LocalProtocolError as exc:
            if not isinstance(out.message, Error):
                raise
            self.log.warning("an ERROR to %s was too large to send (%s): sending it cut short", peer_text(out.to, 80), exc)
            short = Error(code=out.message.code, message=peer_text(out.message.message, 200), ref=out.message.ref)
            return encode(short, self.cfg.limits)

    def _execute(self, transport: Transport, outputs: Iterable[Output]) -> Finished | None:
        finished = None
        outgoing = getattr(self.machine, "outgoing", None)  # relays (v1.10): what a message goes out as
        for out in outputs:
            if outgoing is not None:
                out = outgoing(out)
                if out is None:
                    continue
            if isinstance(out, Send):
                frames = self._encode(out)
                if out.to not in self.outbox and self._try_send(transport, frames, out.to, out.message.TYPE):
                    continue  # the common case: libzmq took it at once
                self.outbox.push(out.to, frames, out.message.TYPE, time.monotonic())
            elif isinstance(out, Reconnect):  # the data holder rejoins on a fresh socket (PROTOCOL.md [J1])
                self.outbox = Outbox(outbox_bytes(self.cfg), stall_s=self.cfg.timeouts.peer)  # the old socket's
                transport.reconnect()
                connected = getattr(self.machine, "connected", None)
                if connected is not None:  # a relayed session numbers its RELAYs per connection ([C3])
                    connected(transport.routing_id)
                self.poller = None  # the loop registers the new socket
            elif isinstance(out, Disconnect):
                self.outbox.drop(out.to)
                if out.refuse_key_s > 0:  # before the close: its key is known by the connection
                    transport.refuse_key(out.to, out.refuse_key_s)
                if transport.disconnect(out.to):
                    self.log.debug("closed the connection of %s", peer_text(out.to, 80))
            elif isinstance(out, Log):
                self.log.log(logging.getLevelName(out.level), out.text)
            elif isinstance(out, (PeerReady, PeerLeft)):
                pass  # the machine logs these; later phases act on them
            elif isinstance(out, LinkChecked):
                self._report_link(out)
            elif isinstance(out, Aligned):
                finished = self._aligned(out, transport) or finished
            elif isinstance(out, EpochDone):
                self.training.epoch_done(out.metrics)
                self._show_progress(self.machine)  # the last epoch ends the training before the loop looks again
            elif isinstance(out, Finished):
                finished = out if self.training is None else self.training.finish(out, self.machine.training_done)
        return finished

    def _try_send(self, transport: Transport, frames, to: bytes | None, mtype: str) -> bool:
        """Hand one message to libzmq now; False if it must wait in the outbox (no connection, full queue)."""
        try:
            transport.send(frames, to)
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:  # EHOSTUNREACH: the peer is gone; liveness rules deal with it
            self._unreachable(to, mtype, exc)
            return True
        n = frames_bytes(frames)
        self.bytes_sent += n
        self.sent_by_type[mtype] = self.sent_by_type.get(mtype, 0) + n
        self.unreachable.discard(to)
        return True

    def _unreachable(self, to: bytes | None, mtype: str, exc: zmq.ZMQError) -> None:
        """Once per outage: a lost peer is retried every heartbeat, and the liveness rules say what happens next."""
        who = peer_text(to, 80) if to else "the label holder"
        if to in self.unreachable:
            self.log.debug("could not send %s to %s: %s", mtype, who, exc.strerror)
            return
        self.unreachable.add(to)
        self.log.warning("cannot reach %s (%s sending %s): its messages are dropped until it is back", who,
                         exc.strerror, mtype)

    def _flush(self, transport: Transport, until: float | None = None) -> None:
        """Hand queued messages to libzmq, each peer's in order, without blocking (or, with ``until``, retrying).

        A peer whose queue libzmq cannot take now is skipped, not waited for: the others' messages go on.
        """
        while True:
            for to in self.outbox.peers():
                while to in self.outbox:
                    frames, mtype = self.outbox.head(to)
                    try:
                        transport.send(frames, to)
                    except zmq.Again:
                        break
                    except zmq.ZMQError as exc:  # EHOSTUNREACH: the peer is gone; liveness rules deal with it
                        self._unreachable(to, mtype, exc)
                    else:
                        n = frames_bytes(frames)
                        self.bytes_sent += n
                        self.sent_by_type[mtype] = self.sent_by_type.get(mtype, 0) + n
                        self.unreachable.discard(to)
                    self.outbox.pop(to, time.monotonic())
            if not self.outbox or until is None or time.monotonic() >= until:
                return
            transport.socket.poll(50, zmq.POLLOUT)

    def _drop_non_readers(self, now: float) -> list[Output]:
        """Peers over their send budget (PROTOCOL.md section 7): drop their queues; the machine ends their part."""
        outputs: list[Output] = []
        for to, why in list(self.outbox.over_budget(now)):
            freed = self.outbox.drop(to)
            self.log.warning("%s is not reading (%s): dropped %d queued bytes", peer_text(to, 80), why, freed)
            outputs += self.machine.peer_not_reading(to, why, now)
        return outputs

    def _leave_spill(self) -> None:
        """A bucketed PSI's spilled IDs outlive the node only while its PSI is unfinished: then the same command
        resumes from the buckets both parties finished ([P19]). Once the rows were aligned they are removed."""
        cfg = self.cfg
        if self.aligned or cfg.session.psi_buckets == 1:
            remove_spill(cfg)
            return
        size = spill_size(cfg)
        if size:
            self.log.warning(
                "the PSI did not finish: kept its %.1f MiB of spilled IDs (0600) in %s, so that the same command "
                "resumes from the buckets both parties finished; delete that folder to start the PSI over",
                size / 2**20, spill_folder(cfg),
            )

    def _aligned(self, aligned: Aligned, transport: Transport) -> Finished | None:
        """Write this party's IDs in the agreed order (if asked to), then train on them or leave the session."""
        now = time.monotonic()
        out = self.cfg.psi.output
        ok, reason = True, f"rows aligned: {len(aligned.rows)}"
        if out is not None:
            try:
                write_aligned(out, self.ids, aligned.rows)  # the path stays local: BYE's reason goes to the peer
                self.log.info("wrote %d aligned IDs to %s", len(aligned.rows), out)
            except OSError as exc:
                ok, reason = False, f"cannot write the aligned IDs to {out}: {exc.strerror}"
                self.log.error("%s", reason)
        if ok:  # nothing resumes from the spilled buckets once the rows are aligned (and written)
            self.aligned = True
            remove_spill(self.cfg)
        if ok and self.training is not None:
            tick = lambda: self._keep_alive(transport)  # noqa: E731
            return self._execute(transport, self.training.start(self.machine, aligned.rows, now, time.monotonic, tick))
        return self._execute(transport, self.machine.finish_aligned(ok, reason, now))

    def _keep_alive(self, transport: Transport) -> None:
        """While the training segment is built (``background``): the heartbeats due and the queued messages go out,
        nothing is read. A stop request (SIGINT/SIGTERM) abandons the build: the loop then closes the session."""
        if self.stop_requested:
            raise Abandoned(self.stop_requested)
        sends = self.machine.keepalive(time.monotonic())
        if self.outbox:
            self._flush(transport)
        self._execute(transport, sends)

    def _show_progress(self, machine) -> None:
        training = getattr(machine, "training", None)
        if training is None or self.cfg.session.predict:
            return
        if self.progress is None:
            self.progress = Progress(self.log)
        self.progress.update(training.progress, self.training.last_loss, time.monotonic())

    def _report_link(self, lc: LinkChecked) -> None:
        if not lc.rtts:
            return
        median = statistics.median(lc.rtts)
        rate = 2 * lc.bytes_per_round / median / 1e6 if median > 0 else float("inf")
        self.log.info(
            "link check: %d round trips of %d bytes, median RTT %.2f ms, %.0f MB/s both ways",
            lc.rounds,
            lc.bytes_per_round,
            median * 1000,
            rate,
        )

    def _report(self, finished: Finished) -> int:
        level = logging.INFO if finished.exit_code == 0 else logging.ERROR
        # one JSON object, sorted keys: bench/wan.py reads the step messages' bytes (FORWARD, BACKWARD) from it
        self.log.info("sent by type: %s", json.dumps(self.sent_by_type, sort_keys=True, separators=(",", ":")))
        self.log.log(
            level,
            "%s (exit %d; sent %d bytes, received %d bytes)",
            finished.reason,
            finished.exit_code,
            self.bytes_sent,
            self.bytes_received,
        )
        return finished.exit_code
