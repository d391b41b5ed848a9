"""Helpers of the live fuzz test (test_fuzz_live.py): sessions, in-process data holders, the expected answer.

A ``Driver`` is a data holder run in the test process: the real ``DataHolderMachine`` (and, with training, the real
bottom segment) behind a raw DEALER socket with the party's real CurveZMQ key. It produces valid messages from the
label holder's real answers, and lets the test hold some of its messages back, so that its party stays in the state
the test wants to fuzz. Answers to the fuzz inputs (every ``ERROR``, every ``ECHO_REPLY``) are set aside for the
test to match; everything else goes to the machine, so the party's session goes on as a real one would.

``expect`` says what the label holder must do with one input from the attacker, from PROTOCOL.md sections 3, 6 and 9
(using the same decoder the node uses, so that the test compares the live node against the protocol layer, and a
divergence between the two — the node loop, the transport, a crash — shows up as a wrong answer).
"""

from __future__ import annotations

import csv
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import msgpack
import numpy as np
import zmq

from vfl.launch import prepare_session
from vfl.node.alignment import load_ids, psi_plan
from vfl.node.config import NodeConfig, load_config
from vfl.node.keys import load_public_key, load_secret_key
from vfl.node.runner import build_machine
from vfl.node.transport import largest_message_bytes
from vfl.protocol import (
    DEFAULT_LIMITS,
    Aligned,
    Echo,
    EchoReply,
    Error,
    ErrorCode,
    Finished,
    Hello,
    LabelHolderMachine,
    Log,
    RemoteProtocolError,
    Send,
    Tensor,
    decode,
    encode,
)
from vfl.protocol.codec import peek_type
from vfl.protocol.psi_phase import PsiPlan
from vfl.protocol.routing import new_routing_id, party_of

LABEL_HOLDER = "bank"
ATTACKER = "atk"
HONEST = "honest"
RUN = "fuzz-1"
#: generous: the test's own pauses (building a batch, pytest on a loaded box) must never look like a lost peer
TIMEOUTS = {"heartbeat": 0.5, "peer": 60.0, "handshake": 60.0, "join": 3600.0, "progress": 3600.0, "rejoin": 120.0}
N_IDS = 48
TRAINING_TYPES = frozenset({"FORWARD", "EVAL_FORWARD", "CHECKPOINT_DONE", "ROLLBACK"})


# ------------------------------------------------------------------------------------------------ sessions


def _write_csv(path: Path, ids: list[str], columns: dict[str, np.ndarray]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", *columns])
        for i, key in enumerate(ids):
            w.writerow([key, *(repr(float(c[i])) if c.dtype.kind == "f" else int(c[i]) for c in columns.values())])


def fuzz_session(tmp: Path, *, train: bool, epochs: int = 2) -> dict[str, Path]:
    """Configs of ``bank`` (label holder), ``atk`` and ``honest``: PSI over a few dozen IDs, optionally training."""
    tmp.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    ids = [f"id-{i:03d}" for i in range(N_IDS)]
    keep = {p: sorted(rng.choice(N_IDS, size=N_IDS - 4, replace=False).tolist()) for p in (LABEL_HOLDER, ATTACKER, HONEST)}
    x = rng.normal(size=(N_IDS, 3)).astype(np.float32)
    y = (x.sum(axis=1) > 0).astype(np.int64)
    for p in (LABEL_HOLDER, ATTACKER, HONEST):
        rows = keep[p]
        cols = {"label": y[rows]} if p == LABEL_HOLDER else {f"f{j}": x[rows, j] for j in range(3)}
        if not train:
            cols = {}
        _write_csv(tmp / f"{p}.csv", [ids[r] for r in rows], cols)
    data = {p: {"path": f"{p}.csv", "id_column": "id"} for p in (LABEL_HOLDER, ATTACKER, HONEST)}
    tables = None
    if train:
        out = str(tmp / "model")
        opt = {"kind": "sgd", "lr": 0.05}
        data[LABEL_HOLDER].update(label_column="label", features=[])
        tables = {
            LABEL_HOLDER: {
                "model": {"top": {"widths": [8, 2]}, "seed": 3},
                "train": {"task": "multiclass", "epochs": epochs, "validation_fraction": 0.25, "seed": 5,
                          "optimizer": opt, "output": out},
            },
            ATTACKER: {"model": {"bottom": {"widths": [4, 3]}, "seed": 1}, "train": {"optimizer": opt, "output": out}},
            HONEST: {"model": {"bottom": {"widths": [4, 3]}, "seed": 2}, "train": {"optimizer": opt, "output": out}},
        }
    return prepare_session(
        tmp, data_holders=[ATTACKER, HONEST], run=RUN, timeouts=TIMEOUTS, link_check={"rounds": 0}, data=data,
        psi={"workers": 1}, tables=tables, cut_width=3, batch_size=8, window=2,
    )


# ------------------------------------------------------------------------------------------------ answers


@dataclass(frozen=True)
class Expect:
    """What the label holder must do with one input: ``kind`` is "error" (``code``: None = any refusal code),
    "reply" (an ECHO_REPLY with ``seq``), "silent" (no answer), "any" (no answer or an ERROR: a connection libzmq
    itself ignores), or "filtered" (a valid input whose effect is a transition the fuzz must not take: not sent)."""

    kind: str
    code: int | None = None
    seq: int | None = None
    why: str = ""


SILENT = Expect("silent")
ANY = Expect("any")


def _unexpected(why: str) -> Expect:
    return Expect("error", int(ErrorCode.UNEXPECTED_MESSAGE), why=why)


class Oracle:
    """The label holder's required answer to an input from the attacker's key, per its party's state."""

    def __init__(self, lh_config: NodeConfig):
        cfg = lh_config
        self.limits = cfg.limits
        self.max_echo_bytes = largest_message_bytes(cfg)
        # a machine with the label holder's own session, only to ask it the HELLO checks of section 6
        plan = PsiPlan(items=[], engine=None) if cfg.session.psi else None  # never used: no PSI runs here
        self._hello_checks = LabelHolderMachine(party=cfg.party, run=cfg.run, config=cfg.session, now=0.0, psi=plan)

    def expect(self, frames: Sequence[bytes], *, state: str, routing_id: bytes, current: bool) -> Expect:
        try:
            msg = decode(frames, self.limits)
            failure = None
        except RemoteProtocolError as exc:
            msg, failure = None, exc
        deep = _depth_failure(frames, self.limits)
        if deep is not None:
            msg, failure = None, deep
        mtype = msg.TYPE if msg is not None else peek_type(frames)
        if mtype == "ERROR":
            return Expect("silent", why="[M2] an ERROR is never answered")
        if party_of(routing_id) != ATTACKER:
            return Expect("error", int(ErrorCode.IDENTITY_MISMATCH), why="[S4] routing id claims another party")
        if failure is not None:
            return Expect("error", int(failure.code), why=f"section 3: {failure}")
        if isinstance(msg, Hello):
            problem = self._hello_checks._check_hello(ATTACKER, msg)
            if problem is None:
                return Expect("filtered", why="a valid HELLO: [H6] restart / [S5] replacement")
            return Expect("error", int(problem.code), why=f"section 6: {problem}")
        if not current:
            return _unexpected("[S5] a connection whose HELLO was not accepted")
        t = msg.TYPE
        connected = state in ("READY", "PSI", "PSI_DONE", "ALIGNED", "TRAINING")
        if t == "HEARTBEAT" and connected:
            return SILENT
        if t == "BYE" and connected:
            return Expect("filtered", why="BYE ends the party's session")
        if state == "READY" and t == "ECHO":
            size = sum(x.array.nbytes for x in msg.tensors)
            if size > self.max_echo_bytes:
                return Expect("error", int(ErrorCode.TOO_LARGE), why="ECHO over the cap of section 7")
            return Expect("reply", seq=msg.seq, why="[M1]")
        if state == "READY" and t == "PSI_START":
            return Expect("filtered", why="PSI_START starts the PSI [P3]")
        if state == "PSI" and t in ("PSI_ITEMS", "PSI_RESULT"):
            return Expect("filtered", why="a PSI message out of its stream ends the session [P9]")
        if state == "TRAINING" and t in ("FORWARD", "EVAL_FORWARD", "CHECKPOINT_DONE"):
            return Expect("filtered", why="a wrong training message ends the session [X2]/[X6]")
        return _unexpected(f"[T1] {t} in {state}")


def matches(answer: Any, want: Expect) -> bool:
    if want.kind == "error":
        return isinstance(answer, Error) and (want.code is None or answer.code == want.code)
    if want.kind == "reply":
        return isinstance(answer, EchoReply) and answer.seq == want.seq
    return False


def describe(answer: Any) -> str:
    if isinstance(answer, Error):
        try:
            name = ErrorCode(answer.code).name
        except ValueError:
            name = str(answer.code)
        return f"ERROR {name}: {answer.message[:200]}"
    if isinstance(answer, (bytes, list, tuple)):
        return f"undecodable {answer!r:.200}"
    return f"{answer.TYPE}"


def frames_text(frames: Sequence[bytes], limit: int = 600) -> str:
    return repr([bytes(f) for f in frames])[:limit]


# ------------------------------------------------------------------------------------------------ sockets


class Link:
    """One DEALER connection with an allow-listed key; collects what the label holder answers on it."""

    def __init__(self, ctx: zmq.Context, cfg: NodeConfig, routing_id: bytes, *, label: str = ""):
        self.cfg = cfg
        self.routing_id = routing_id
        self.label = label or routing_id.decode("utf-8", "replace")
        s = ctx.socket(zmq.DEALER)
        s.linger = 0
        s.sndtimeo = 10_000
        s.sndhwm = s.rcvhwm = 100_000
        s.setsockopt(zmq.ROUTING_ID, routing_id)
        public, secret = load_secret_key(cfg.secret_key)
        s.curve_publickey, s.curve_secretkey = public, secret
        s.curve_serverkey = load_public_key(next(iter(cfg.partners.values())))
        s.connect(cfg.endpoint)
        self.sock = s
        self.answers: deque = deque()  # answers to fuzz inputs, in arrival order
        self.last_heard = time.monotonic()
        self.sent = 0

    def send(self, frames: Sequence[Any]) -> None:
        self.sent += 1
        self.sock.send_multipart(list(frames), copy=True)

    def poll(self) -> None:
        while self.sock.poll(0):
            self.take(self.sock.recv_multipart(zmq.NOBLOCK))

    def take(self, frames: list[bytes]) -> None:
        self.last_heard = time.monotonic()
        try:
            self.answers.append(decode(frames, DEFAULT_LIMITS))
        except RemoteProtocolError:
            self.answers.append(frames)  # the label holder sent something undecodable: a failure the test reports

    def close(self) -> None:
        self.sock.close(linger=0)


class Driver(Link):
    """A real data holder (its machine, its PSI, its bottom model) in the test process, on its own Link.

    ``hold``: message types the machine produced but the test does not send yet (released with ``release``).
    ``training_budget``: with training, how many of its training messages may go out (None: all).
    """

    def __init__(self, ctx: zmq.Context, config: Path, *, hold: Sequence[str] = ()):
        cfg = load_config(config)
        super().__init__(ctx, cfg, new_routing_id(cfg.party), label=cfg.party)
        from vfl.psi import PsiEngine

        self.ids = load_ids(cfg)
        self.engine = PsiEngine(workers=1)
        self.plan = psi_plan(cfg, self.ids, self.engine)
        self.machine = build_machine(cfg, time.monotonic(), self.plan)
        self.hold = set(hold)
        self.held: list[tuple[str, list]] = []
        self.training_budget: int | None = None
        self.samples: dict[str, list] = {}  # message type -> a few valid frame lists it sent (bases for mutations)
        self.rows = None
        self.finished: Finished | None = None
        self.logs: deque = deque(maxlen=200)
        self.started = False
        self.received: Counter = Counter()  # message types the machine was given

    # -- the machine's side

    def start(self) -> None:
        """Say HELLO (held if the test holds it). The machine is made now: its handshake timeout starts here."""
        self.started = True
        self.machine = build_machine(self.cfg, time.monotonic(), self.plan)
        self._execute(self.machine.start(time.monotonic()))

    def preview_hello(self) -> None:
        """Keep the HELLO this data holder will send among its samples, without sending it or starting the clock."""
        for out in self.machine.start(time.monotonic()):
            self._record(out.message.TYPE, [bytes(f) for f in encode(out.message, self.cfg.limits)])

    def _record(self, mtype: str, frames: list) -> None:
        bucket = self.samples.setdefault(mtype, [])
        if len(bucket) < 4:
            bucket.append(frames)

    def take(self, frames: list[bytes]) -> None:
        self.last_heard = time.monotonic()
        try:
            msg = decode(frames, DEFAULT_LIMITS)
        except RemoteProtocolError:
            self.answers.append(frames)
            return
        if isinstance(msg, (Error, EchoReply)):  # answers to the fuzz inputs (the real session has none)
            self.answers.append(msg)
            return
        self.received[msg.TYPE] += 1
        self._execute(self.machine.receive(frames, time.monotonic()))

    def pump(self, seconds: float = 0.0) -> None:
        """Receive, run timers and our own PSI/training work for ``seconds`` (at least one round)."""
        end = time.monotonic() + seconds
        while True:
            self.poll()
            now = time.monotonic()
            if self.started:
                self._execute(self.machine.handle_timer(now))
                for _ in range(64):
                    if not self.machine.has_work:
                        break
                    self._execute(self.machine.work(time.monotonic()))
            left = end - time.monotonic()
            if left <= 0:
                return
            self.sock.poll(int(min(left, 0.02) * 1000))

    def release(self, *types: str) -> None:
        self.hold -= set(types)
        self._flush_held()

    def allow_training(self, n: int | None) -> None:
        """Let ``n`` more training messages out (None: all from now on)."""
        self.training_budget = None if n is None else (self.training_budget or 0) + n
        self._flush_held()

    @property
    def joined(self) -> bool:
        """Its WELCOME came: the label holder has this party READY (whatever the machine's own next state)."""
        return self.machine.clock is not None and self.finished is None

    def holding(self, mtype: str) -> bool:
        return any(t == mtype for t, _ in self.held)

    def _blocked(self, mtype: str) -> bool:
        if mtype in self.hold:
            return True
        if mtype in TRAINING_TYPES and self.training_budget is not None:
            return self.training_budget <= 0
        return False

    def _flush_held(self) -> None:
        keep = []
        for mtype, frames in self.held:
            if self._blocked(mtype) or (keep and mtype != "HEARTBEAT"):  # order is kept but for heartbeats
                keep.append((mtype, frames))
            else:
                self._out(mtype, frames)
        self.held = keep

    def _out(self, mtype: str, frames: list) -> None:
        if mtype in TRAINING_TYPES and self.training_budget is not None:
            self.training_budget -= 1
        self.send(frames)

    def _execute(self, outputs) -> None:
        for out in outputs:
            if isinstance(out, Send):
                frames = [bytes(f) for f in encode(out.message, self.cfg.limits)]
                mtype = out.message.TYPE
                self._record(mtype, frames)
                if self._blocked(mtype) or (self.held and mtype != "HEARTBEAT"):
                    self.held.append((mtype, frames))
                else:
                    self._out(mtype, frames)
            elif isinstance(out, Aligned):
                self.rows = out.rows
                if self.cfg.session.train:
                    from vfl.node.training import build_bottom

                    segment = build_bottom(self.cfg, self.ids.table, out.rows)
                    self._execute(self.machine.start_training(segment, len(out.rows), time.monotonic()))
            elif isinstance(out, Finished):
                self.finished = out
            elif isinstance(out, Log):
                self.logs.append(f"{out.level} {out.text}")

    def leave(self) -> None:
        """After the alignment (no training): say BYE {ok: true}, as the node does once its rows are written."""
        self.release("BYE")
        self._execute(self.machine.finish_aligned(True, "fuzz test: done", time.monotonic()))

    def close(self) -> None:
        super().close()
        self.engine.close()


def echo(seq: int) -> list[bytes]:
    arr = np.arange(8, dtype=np.float32) + seq
    return [bytes(f) for f in encode(Echo(seq=seq, tensors=(Tensor("probe", arr),)))]


# ------------------------------------------------------------------------------------------------ mutations


@dataclass(frozen=True)
class Raw:
    """Bytes that go into a packed header as they are (e.g. nesting too deep for msgpack.packb)."""

    data: bytes


def pack_header(pairs: Sequence[tuple[Any, Any]]) -> bytes:
    """A msgpack map from ``pairs`` as given: keys may repeat (a duplicate-key header); values may be ``Raw``."""
    n = len(pairs)
    out = bytearray(bytes([0x80 | n]) if n < 16 else b"\xde" + n.to_bytes(2, "big"))
    for k, v in pairs:
        out += msgpack.packb(k, use_bin_type=True)
        out += v.data if isinstance(v, Raw) else msgpack.packb(v, use_bin_type=True)
    return bytes(out)


def nested(depth: int, kind: str) -> bytes:
    """``depth`` levels of one-element arrays or one-key maps around nil, packed by hand (no recursion)."""
    unit = b"\x91" if kind == "list" else b"\x81\xa1k"
    return unit * depth + b"\xc0"


#: PROTOCOL.md section 3 check 5 (issue 12): a header nesting deeper than this is BAD_HEADER
MAX_DEPTH = 32


def header_depth(frames: Sequence[bytes]) -> int:
    """How deep the header's values nest (the map itself is level 1), counted without recursion; 0 if unreadable."""
    h = header_of(frames)
    if h is None:
        return 0
    deepest, todo = 0, [(h, 1)]
    while todo:
        v, d = todo.pop()
        deepest = max(deepest, d)
        if isinstance(v, dict):
            todo += [(x, d + 1) for x in v.values()]
        elif isinstance(v, list):
            todo += [(x, d + 1) for x in v]
    return deepest


def _depth_failure(frames: Sequence[bytes], limits) -> RemoteProtocolError | None:
    """Checks 1-5 of section 3 when the header nests too deep (decoders without the bound accept it)."""
    if len(frames) < 2 or len(frames) > limits.max_frames or bytes(frames[0]) != b"VFL/1":
        return None  # an earlier check decides, as the decoder says
    if len(frames[1]) > limits.max_header_bytes or header_depth(frames) <= MAX_DEPTH + 3:  # +3: see DEPTHS
        return None
    return RemoteProtocolError(ErrorCode.BAD_HEADER, f"header nests deeper than {MAX_DEPTH} levels")


def header_of(frames: Sequence[bytes]) -> dict | None:
    if len(frames) < 2:
        return None
    try:
        h = msgpack.unpackb(frames[1], raw=False, strict_map_key=False)
    except Exception:  # noqa: BLE001
        return None
    return h if type(h) is dict else None
