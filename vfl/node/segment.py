"""A segment holder's node process (PROTOCOL.md section 13, v1.10): two sockets and the segment holder's machine.

It connects one DEALER to its downstream (the label holder, or the next segment holder) and binds one ROUTER for its
inputs (CurveZMQ server with its inputs' keys on the allow-list). Every decision is the machine's
(``vfl.protocol.segment_holder``); this loop moves frames, reads the clock, builds the torch segment once the machine
is aligned, and saves it when training is done. Like every node it never blocks longer than ``MAX_SLEEP_S``.
"""

from __future__ import annotations

import logging
import signal
import time
from typing import Iterable

import zmq

from ..protocol import Aligned, Disconnect, Finished, Log, Output, Send, encode
from ..protocol.events import Reconnect
from ..protocol.text import peer_text
from .config import NodeConfig, TrainingSetupError
from .outbox import Outbox, frames_bytes
from .runner import FINAL_FLUSH_S, HOUSEKEEPING_S, INSECURE_WARNING, MAX_BATCH, MAX_SLEEP_S, build_machine
from .transport import LINGER_MS, Transport, outbox_bytes

#: the outbox key of the downstream connection (an input's key is its routing id)
DOWN = None
#: how long a segment holder whose session ended (not paused) still passes the label holder's last RELAYs (the BYEs
#: that end the session for the parties behind it) on to its inputs, at most; it stops as soon as downstream closes
DRAIN_S = 5.0


def build_segment(cfg: NodeConfig):
    """The torch segment of this segment holder, over its inputs' combined cut layers ([model].segment)."""
    from ..train.models import ModelError, build_model
    from ..train.segments import TorchMiddle, middle_in_features
    from ..train.specs import OptimizerSpec
    from .training import checkpointer, dropout_seed

    t = cfg.train
    seg = cfg.session.segments[cfg.party]
    widths = cfg.session.chain.input_widths(cfg.party)
    try:
        model = build_model(middle_in_features(widths, seg.combine), t.segment.get("factory", t.segment),
                            out_features=seg.width, seed=t.seed)
    except ModelError as exc:
        raise TrainingSetupError(f"[model].segment: {exc}") from None
    optimizer = OptimizerSpec.from_dict(t.optimizer).build(model.parameters())
    return TorchMiddle(model, optimizer, widths, seg.combine, checkpointer(cfg), dropout_seed=dropout_seed(cfg))


def load_trained_segment(cfg: NodeConfig, segment) -> None:
    """`vfl predict`: this segment holder's trained weights (its training run's ``PARTY-segment.pt``)."""
    from ..train.models import ModelError, load_weights
    from .training import read_segment, segment_path

    path = segment_path(cfg)
    state = read_segment(path)
    if state.get("vfl_party") != cfg.party or state.get("vfl_model") != cfg.session.model:
        raise TrainingSetupError(
            f"{path} is party {state.get('vfl_party')!r}'s segment for model {state.get('vfl_model')!r}, not this node's")
    try:
        load_weights(segment.model, state, f"the trained segment {path}", "model")
    except ModelError as exc:
        raise TrainingSetupError(f"party {cfg.party!r}: {path} does not fit [model].segment: {exc}") from None


class SegmentRunner:
    """Runs one segment holder until its session ends or a signal stops it; ``run()`` returns the exit code."""

    def __init__(self, cfg: NodeConfig, log: logging.Logger | None = None, *, end_session: bool = False):
        self.cfg = cfg
        self.log = log or logging.getLogger(f"vfl.node.{cfg.party}")
        self.end_session = end_session
        self.signals = 0
        self.stop_requested: str | None = None
        self.machine = None
        self.segment = None
        self.outbox = Outbox(outbox_bytes(cfg), stall_s=cfg.timeouts.peer)
        self.bytes_sent = self.bytes_received = 0
        self.sent_by_type: dict[str, int] = {}

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stop_requested = signal.Signals(signum).name
        self.signals += 1

    def run(self) -> int:
        cfg = self.cfg
        if cfg.insecure:
            self.log.warning(INSECURE_WARNING)
        import torch  # the segment's compute: one thread unless [train].threads says otherwise

        torch.set_num_threads(cfg.train.threads)
        self.segment = build_segment(cfg)  # a spec that does not fit is a setup error before any connection
        if cfg.session.predict:  # `vfl predict`: the trained segment, forward only
            load_trained_segment(cfg, self.segment)
        inputs = cfg.session.chain.inputs(cfg.party)
        # downstream brings EPOCHs (its own and relayed ones) over rows it cannot count before SCHEDULE: frames up to
        # max_tensor_bytes ([B1]'s E at the largest tensor); its inputs send cut layers and relayed PSI chunks only
        self.down = Transport(cfg, rows=cfg.limits.max_tensor_bytes // 8)
        try:
            self.up = Transport(cfg, server=True, endpoint=cfg.bind,
                                partners={p: cfg.partners[p] for p in inputs if p in cfg.partners})
        except BaseException:
            self.down.close(linger_ms=0)
            raise
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.log.info("segment holder %r (run %s) listening on %s for %s, connecting to %s [%s]", cfg.party,
                          cfg.run, self.up.endpoint, ", ".join(inputs), self.down.endpoint,
                          "insecure" if cfg.insecure else "CurveZMQ")
            try:
                return self._loop()
            except Exception as exc:
                m = self.machine
                if m is not None and m.finished is None:
                    self._execute(m.close(f"internal error at {cfg.party!r}: {type(exc).__name__}", time.monotonic()))
                    self._flush(until=time.monotonic() + FINAL_FLUSH_S)
                raise
        finally:
            self.up.close(linger_ms=LINGER_MS if self.bytes_received else 0)
            self.down.close(linger_ms=LINGER_MS if self.bytes_received else 0)
            for s, handler in previous.items():
                signal.signal(s, handler)

    # ------------------------------------------------------------------------------------------------ loop

    def _poller(self) -> zmq.Poller:
        poller = zmq.Poller()
        for sock in (self.down.socket, self.down.monitor, self.up.socket):
            if sock is not None:
                poller.register(sock, zmq.POLLIN)
        return poller

    def _loop(self) -> int:
        machine = self.machine = build_machine(self.cfg, time.monotonic())
        machine.connected(self.down.routing_id)
        pending: list[Output] = machine.start(time.monotonic())
        poller = self._poller()
        housekeeping_at = 0.0
        while True:
            finished = self._execute(pending)
            pending = []
            if self.outbox:
                self._flush()
                self._drop_non_readers(time.monotonic())
            if self._repoll:
                poller, self._repoll = self._poller(), False
            if finished is not None:
                if self.bytes_received:
                    if not self.paused:
                        self._drain(until=time.monotonic() + min(DRAIN_S, self.cfg.timeouts.peer))
                    self._flush(until=time.monotonic() + FINAL_FLUSH_S)
                return self._report(finished)
            now = time.monotonic()
            if now >= housekeeping_at:
                housekeeping_at = now + HOUSEKEEPING_S
                pending = machine.handle_timer(now)
                if pending:
                    continue
            if self.stop_requested:
                self.paused = not self.end_session and self.signals < 2
                pending = machine.close(f"stopped by {self.stop_requested}", now, pause=self.paused)
                if not pending:
                    return 0
                continue
            waiting = self.down.has_input() or self.up.has_input()
            if machine.work_first or (not waiting and machine.has_work and not self.outbox):
                pending = machine.work(now)
                continue
            if not waiting:
                deadline = machine.next_timer()
                sleep = MAX_SLEEP_S if deadline is None else min(MAX_SLEEP_S, max(0.0, deadline - now))
                if self.outbox:
                    sleep = min(sleep, 0.005)
                poller.poll(int(sleep * 1000))
            for _ in range(MAX_BATCH):  # downstream first: a BACKWARD frees the window for the inputs' FORWARDs
                received = self.down.recv()
                if received is None:
                    break
                self.bytes_received += sum(len(f) for f in received.frames)
                new = machine.receive_down(received.frames, time.monotonic())
                pending += new
                if machine.finished is not None or any(type(o) is Aligned for o in new) or machine.work_first:
                    break
            if not pending or not machine.work_first:
                for _ in range(MAX_BATCH):
                    received = self.up.recv()
                    if received is None:
                        break
                    self.bytes_received += sum(len(f) for f in received.frames)
                    pending += machine.receive_up(received.routing_id, received.identity, received.frames,
                                                  time.monotonic())
                    if machine.finished is not None or machine.work_first:
                        break
            if self.down.monitor is not None and not any(type(o) is Reconnect for o in pending):
                for event in self.down.monitor_events():
                    if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                        pending += machine.refused_by_zap(event["value"], time.monotonic())
                    elif event["event"] == zmq.EVENT_DISCONNECTED:
                        pending += machine.connection_lost(time.monotonic())

    _repoll = False
    paused = False  # stopped by a signal that pauses ([J2]): the parties behind us rejoin, nothing to pass on

    def _drain(self, until: float) -> None:
        """Our session ended without a pause, most often by our own BYE: the label holder then ends the session for
        every party, and its BYEs to the parties behind us come through us ([C6]), after ours. Pass them on (the
        machine relays for the parties behind it after its own session ended) until the label holder closes the
        connection, or ``until``. Without this they would see only their connection drop and wait their whole rejoin
        timeout for a label holder that has already stopped."""
        poller = zmq.Poller()
        for sock in (self.down.socket, self.down.monitor):
            if sock is not None:
                poller.register(sock, zmq.POLLIN)
        closed = False
        while time.monotonic() < until:
            for _ in range(MAX_BATCH):
                received = self.down.recv()
                if received is None:
                    break
                self._execute(self.machine.receive_down(received.frames, time.monotonic()))
            if self.outbox:
                self._flush()
            if closed:  # what was queued before the connection closed has been passed on
                return
            if self.down.monitor is not None:
                closed = any(e["event"] == zmq.EVENT_DISCONNECTED for e in self.down.monitor_events())
            if not closed:
                poller.poll(50)

    def _execute(self, outputs: Iterable[Output]) -> Finished | None:
        finished = None
        for out in outputs:
            out = self.machine.outgoing(out)  # our own session's messages go up as RELAY behind another hop
            if isinstance(out, Send):
                frames = encode(out.message, self.cfg.limits)
                if out.to not in self.outbox and self._try_send(frames, out.to, out.message.TYPE):
                    continue
                self.outbox.push(out.to, frames, out.message.TYPE, time.monotonic())
            elif isinstance(out, Reconnect):  # our own session rejoins ([J1]) on a fresh downstream connection
                self.outbox.drop(DOWN)
                self.down.reconnect()
                self.machine.connected(self.down.routing_id)
                self._repoll = True
                for q in self.machine.inputs.values():  # their relayed sessions were lost with ours: they rejoin
                    if q.route is not None:
                        self.outbox.drop(q.route)
                        self.up.disconnect(q.route)
                        q.route = None
            elif isinstance(out, Disconnect):
                if out.to is not None:
                    self.outbox.drop(out.to)
                    self.up.disconnect(out.to)
            elif isinstance(out, Log):
                self.log.log(logging.getLevelName(out.level), out.text)
            elif isinstance(out, Aligned):  # no PSI of our own: the others' rows are aligned, training may begin
                finished = self._execute(self.machine.start_training(self.segment, time.monotonic())) or finished
            elif isinstance(out, Finished):
                finished = self._finish(out)
        return finished

    def _finish(self, finished: Finished) -> Finished:
        """A successful session saves the trained segment (its kept checkpoint is loaded by then, [X10])."""
        if finished.exit_code != 0:
            return finished
        from .training import INTERRUPTED, save_segment, segment_path

        if self.cfg.session.predict:  # nothing of a prediction stays here: the label holder writes predictions.csv
            return finished
        if not self.machine.training_done:
            return Finished(exit_code=INTERRUPTED, reason=f"{finished.reason} before the training finished: nothing "
                            f"was saved as this party's result; the checkpoints in {self.cfg.train.checkpoint_dir} "
                            "are kept")
        try:
            path = save_segment(self.cfg, self.segment.state())
        except OSError as exc:
            return Finished(exit_code=1, reason=f"training finished, but this party's segment could not be saved to "
                            f"{segment_path(self.cfg)}: {exc.strerror or exc}")
        self.log.info("saved this party's segment to %s", path)
        return finished

    def _transport(self, to: bytes | None) -> Transport:
        return self.down if to is DOWN else self.up

    def _try_send(self, frames, to: bytes | None, mtype: str) -> bool:
        try:
            self._transport(to).send(frames, to)
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:  # EHOSTUNREACH: an input is gone; the label holder's liveness rules decide
            self.log.debug("could not send %s to %s: %s", mtype, peer_text(to, 80) if to else "downstream",
                           exc.strerror)
            return True
        n = frames_bytes(frames)
        self.bytes_sent += n
        self.sent_by_type[mtype] = self.sent_by_type.get(mtype, 0) + n
        return True

    def _flush(self, until: float | None = None) -> None:
        while True:
            for to in self.outbox.peers():
                while to in self.outbox:
                    frames, mtype = self.outbox.head(to)
                    if not self._try_send(frames, to, mtype):
                        break
                    self.outbox.pop(to, time.monotonic())
            if not self.outbox or until is None or time.monotonic() >= until:
                return
            time.sleep(0.02)

    def _drop_non_readers(self, now: float) -> None:
        """[B2] towards the inputs: an input whose queue stays over budget (or stalls) is not reading. Its queue is
        dropped and its connection closed, so it costs this node at most its budget and never delays the others;
        its relayed session then times out at the label holder ([X8]), which it may rejoin like any party. The
        downstream's liveness is our own session's (its timeouts)."""
        for to, why in list(self.outbox.over_budget(now)):
            if to is DOWN:
                continue
            freed = self.outbox.drop(to)
            self.log.warning("input %s is not reading (%s): dropped %d queued bytes and its connection",
                             peer_text(to, 80), why, freed)
            self.up.disconnect(to)
            for q in self.machine.inputs.values():
                if q.route == to:
                    q.route = None

    def _report(self, finished: Finished) -> int:
        import json

        self.log.info("sent by type: %s", json.dumps(self.sent_by_type, sort_keys=True, separators=(",", ":")))
        self.log.log(logging.INFO if finished.exit_code == 0 else logging.ERROR,
                     "%s (exit %d; sent %d bytes, received %d bytes)", finished.reason, finished.exit_code,
                     self.bytes_sent, self.bytes_received)
        return finished.exit_code
