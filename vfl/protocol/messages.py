"""The message types of PROTOCOL.md section 5, as frozen keyword-only dataclasses.

Each class names its wire ``TYPE``, its header ``FIELDS`` (name -> field kind, required?) and whether it may carry
tensors. The codec is table-driven from these declarations, so adding a message type is adding a class here and a
row to PROTOCOL.md — nothing else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

#: Party ids and run ids (PROTOCOL.md section 2).
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MAX_INT = 2**63


class FieldKind:
    """How one header field is checked and converted (check 14 of PROTOCOL.md section 3)."""

    STR = "str"
    ID = "id"  # str matching ID_PATTERN
    INT = "int"
    BOOL = "bool"
    MAP = "map"
    VERSION = "version"  # list of two ints
    ID_LIST = "list[id]"


def is_wire_int(value: Any) -> bool:
    """A protocol integer: a msgpack int in [0, 2^63); ``True`` is not an integer."""
    return type(value) is int and 0 <= value < MAX_INT


def is_party_id(value: Any) -> bool:
    return type(value) is str and ID_PATTERN.fullmatch(value) is not None


def check_field(kind: str, value: Any) -> Any:
    """Return ``value`` converted to its Python form, or raise ``ValueError`` saying what is wrong with it."""
    if kind == FieldKind.STR:
        if type(value) is str:
            return value
        raise ValueError("must be a string")
    if kind == FieldKind.ID:
        if is_party_id(value):
            return value
        raise ValueError("must be an id: 1-64 of A-Z a-z 0-9 _ . - starting with a letter or digit")
    if kind == FieldKind.INT:
        if is_wire_int(value):
            return value
        raise ValueError("must be an integer in [0, 2^63)")
    if kind == FieldKind.BOOL:
        if type(value) is bool:
            return value
        raise ValueError("must be a boolean")
    if kind == FieldKind.MAP:
        if type(value) is dict:
            return value
        raise ValueError("must be a map")
    if kind == FieldKind.VERSION:
        if type(value) is list and len(value) == 2 and all(is_wire_int(v) for v in value):
            return (value[0], value[1])
        raise ValueError("must be [major, minor], two integers")
    if kind == FieldKind.ID_LIST:
        if type(value) is list and all(is_party_id(v) for v in value):
            return tuple(value)
        raise ValueError("must be a list of ids")
    raise AssertionError(f"unknown field kind {kind!r}")  # our own table is wrong


@dataclass(frozen=True)
class Tensor:
    """A named tensor as it travels: a numpy array, little-endian, C order on the wire.

    Received tensors are read-only views into the received frame when it is aligned (zero-copy).
    """

    name: str
    array: np.ndarray

    def same_as(self, other: "Tensor") -> bool:
        """Identical in name, dtype, shape and bytes (what ``ECHO_REPLY`` promises, PROTOCOL.md [M1])."""
        a, b = self.array, other.array
        return (
            self.name == other.name
            and a.dtype == b.dtype
            and a.shape == b.shape
            and np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()
        )


@dataclass(frozen=True, kw_only=True)
class Message:
    """Base of all messages. Subclasses set TYPE, FIELDS and CARRIES_TENSORS."""

    TYPE: ClassVar[str] = ""
    #: header field name -> (FieldKind, required)
    FIELDS: ClassVar[dict[str, tuple[str, bool]]] = {}
    CARRIES_TENSORS: ClassVar[bool] = False

    def header_fields(self) -> dict[str, Any]:
        """The header map entries of this message (without ``type`` and ``tensors``), in wire form."""
        out: dict[str, Any] = {}
        for name in self.FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            out[name] = list(value) if isinstance(value, tuple) else value
        return out

    @property
    def tensor_list(self) -> tuple[Tensor, ...]:
        return getattr(self, "tensors", ())


@dataclass(frozen=True, kw_only=True)
class Hello(Message):
    """A data holder's first message: who it is and the session config it was given (PROTOCOL.md section 6)."""

    TYPE: ClassVar[str] = "HELLO"
    FIELDS: ClassVar[dict[str, tuple[str, bool]]] = {
        "version": (FieldKind.VERSION, True),
        "role": (FieldKind.STR, True),
        "party": (FieldKind.ID, True),
        "run": (FieldKind.ID, True),
        "config": (FieldKind.MAP, True),
        "digest": (FieldKind.STR, True),
    }
    version: tuple[int, int]
    role: str
    party: str
    run: str
    config: dict
    digest: str


@dataclass(frozen=True, kw_only=True)
class Welcome(Message):
    """The label holder's acceptance of a HELLO, with the liveness settings the data holder must follow."""

    TYPE: ClassVar[str] = "WELCOME"
    FIELDS: ClassVar[dict[str, tuple[str, bool]]] = {
        "version": (FieldKind.VERSION, True),
        "party": (FieldKind.ID, True),
        "run": (FieldKind.ID, True),
        "digest": (FieldKind.STR, True),
        "heartbeat_ms": (FieldKind.INT, True),
        "peer_timeout_ms": (FieldKind.INT, True),
        "data_holders": (FieldKind.ID_LIST, True),
        "psi_nonce": (FieldKind.STR, False),
        "instance": (FieldKind.STR, False),
    }
    version: tuple[int, int]
    party: str
    run: str
    digest: str
    heartbeat_ms: int
    peer_timeout_ms: int
    data_holders: tuple[str, ...]
    psi_nonce: str | None = None  # hex; present when the session runs PSI (v1.1)
    #: 32 lowercase hex, fresh for every label holder process (v1.4): a data holder that later hears another one in
    #: a HEARTBEAT knows the label holder restarted and rejoins ([J1])
    instance: str | None = None


@dataclass(frozen=True, kw_only=True)
class Error(Message):
    """An error report. Never answered (PROTOCOL.md [M2]). ``code`` stays an int: a newer peer may send new codes."""

    TYPE: ClassVar[str] = "ERROR"
    FIELDS: ClassVar[dict[str, tuple[str, bool]]] = {
        "code": (FieldKind.INT, True),
        "message": (FieldKind.STR, True),
        "ref": (FieldKind.STR, False),
        "diff": (FieldKind.MAP, False),
    }
    code: int
    message: str
    ref: str | None = None
    diff: dict | None = None


@dataclass(frozen=True, kw_only=True)
class Heartbeat(Message):
    """Proof of life when there is nothing else to send (PROTOCOL.md [L1]).

    A label holder's heartbeat names its ``instance`` (v1.4, as in its WELCOME): a restarted label holder answers
    a connection it does not know with one, so that the data holder behind it rejoins ([J1])."""

    TYPE: ClassVar[str] = "HEARTBEAT"
    FIELDS: ClassVar[dict[str, tuple[str, bool]]] = {"instance": (FieldKind.STR, False)}
    instance: str | None = None


@dataclass(frozen=True, kw_only=True)
class Echo(Message):
    """A link check: the label holder sends the tensors straight back."""

    TYPE: ClassVar[str] = "ECHO"
    FIELDS: ClassVar[dict[str, tuple[str, bool]]] = {"seq": (FieldKind.INT, True)}
    CARRIES_TENSORS: ClassVar[bool] = True
    seq: int
    tensors: tuple[Tensor, ...] = field(default=())


@dataclass(frozen=True, kw_only=True)
class EchoReply(Message):
    TYPE: ClassVar[str] = "ECHO_REPLY"
    FIELDS: ClassVar[dict[str, tuple[str, bool]]] = {"seq": (FieldKind.INT, True)}
    CARRIES_TENSORS: ClassVar[bool] = True
    seq: int
    tensors: tuple[Tensor, ...] = field(default=())


@dataclass(frozen=True, kw_only=True)
class Bye(Message):
    """The sender leaves the session; ``ok`` says whether it finished normally.

    ``pause`` (v1.4): the sender was stopped (SIGINT/SIGTERM) and will be started again; its peers keep the session
    for it up to their rejoin timeout instead of ending it ([J2])."""

    TYPE: ClassVar[str] = "BYE"
    FIELDS: ClassVar[dict[str, tuple[str, bool]]] = {
        "ok": (FieldKind.BOOL, True),
        "reason": (FieldKind.STR, True),
        "pause": (FieldKind.BOOL, False),
    }
    ok: bool
    reason: str
    pause: bool | None = None


# ----------------------------------------------------------------------------------------------- PSI (v1.1)


@dataclass(frozen=True, kw_only=True)
class PsiStart(Message):
    """Opens one side of a pairwise PSI: its deduplicated set size and the chunk size of its streams. In a bucketed
    PSI (v1.8, session config ``psi_buckets``) the label holder's also names the number of ``buckets`` and the data
    holder's may name ``bucket_items``, the most items (its own and the peer's) it holds in one bucket."""

    TYPE: ClassVar[str] = "PSI_START"
    FIELDS: ClassVar[dict[str, tuple[str, bool]]] = {
        "n_items": (FieldKind.INT, True),
        "chunk_size": (FieldKind.INT, True),
        "buckets": (FieldKind.INT, False),
        "bucket_items": (FieldKind.INT, False),
        "resume": (FieldKind.INT, False),
        "resume_digest": (FieldKind.STR, False),
    }
    n_items: int
    chunk_size: int
    buckets: int | None = None
    bucket_items: int | None = None
    #: v1.9, bucketed PSI only: D -> L the buckets D finished in an interrupted run of this pair, L -> D the bucket
    #: both resume at; ``resume_digest`` (64 hex digits) is the chain digest of those buckets
    resume: int | None = None
    resume_digest: str | None = None


@dataclass(frozen=True, kw_only=True)
class PsiBucket(Message):
    """v1.8: opens the sender's side of bucket ``bucket`` of a bucketed PSI, which holds ``n_items`` of its items;
    that bucket's PSI_ITEMS, PSI_REPLY and PSI_RESULT streams follow, numbered from 0."""

    TYPE: ClassVar[str] = "PSI_BUCKET"
    FIELDS: ClassVar[dict[str, tuple[str, bool]]] = {
        "bucket": (FieldKind.INT, True),
        "n_items": (FieldKind.INT, True),
    }
    bucket: int
    n_items: int


@dataclass(frozen=True, kw_only=True)
class _PsiChunk(Message):
    """A numbered chunk of a PSI stream; only the stream's final chunk has ``last``."""

    FIELDS: ClassVar[dict[str, tuple[str, bool]]] = {"chunk": (FieldKind.INT, True), "last": (FieldKind.BOOL, True)}
    CARRIES_TENSORS: ClassVar[bool] = True
    chunk: int
    last: bool
    tensors: tuple[Tensor, ...] = field(default=())


@dataclass(frozen=True, kw_only=True)
class PsiItems(_PsiChunk):
    """The sender's own blinded points ``H(x)^k``: tensor ``points`` uint8 [n, 32]."""

    TYPE: ClassVar[str] = "PSI_ITEMS"


@dataclass(frozen=True, kw_only=True)
class PsiReply(_PsiChunk):
    """The label holder's answer to one PSI_ITEMS chunk: tensor ``tokens`` uint8 [n, 16], in the chunk's order."""

    TYPE: ClassVar[str] = "PSI_REPLY"


@dataclass(frozen=True, kw_only=True)
class PsiResult(_PsiChunk):
    """The pairwise intersection: tensors ``tokens`` uint8 [k, 16] and ``positions`` uint32 [k]."""

    TYPE: ClassVar[str] = "PSI_RESULT"


@dataclass(frozen=True, kw_only=True)
class PsiRows(_PsiChunk):
    """The final rows for one data holder: tensor ``positions`` uint32 [k] into its pairwise order."""

    TYPE: ClassVar[str] = "PSI_ROWS"


# ------------------------------------------------------------------------------------------- training (v1.2)


@dataclass(frozen=True, kw_only=True)
class Schedule(Message):
    """The label holder's explicit training plan: which aligned rows train and which validate, for how long."""

    TYPE: ClassVar[str] = "SCHEDULE"
    FIELDS: ClassVar[dict[str, tuple[str, bool]]] = {
        "epochs": (FieldKind.INT, True),
        "first_epoch": (FieldKind.INT, True),
        "first_step": (FieldKind.INT, True),
        "resume_digest": (FieldKind.STR, False),
        "rows": (FieldKind.INT, False),
    }
    CARRIES_TENSORS: ClassVar[bool] = True
    epochs: int
    first_epoch: int
    first_step: int
    tensors: tuple[Tensor, ...] = field(default=())  # "validation": int64 [n_val], positions in the aligned rows
    #: when ``first_step > 0``: the digest of the receiver's own checkpoint at ``first_step`` to resume from
    resume_digest: str | None = None
    #: v1.10, in a session with segment holders: the number of aligned rows (a segment holder ran no PSI, so it
    #: learns here the bound every position is checked against)
    rows: int | None = None


@dataclass(frozen=True, kw_only=True)
class Epoch(Message):
    """One epoch's batch order: step ``first_step + i`` uses rows ``order[i*B:(i+1)*B]`` (positions, int64)."""

    TYPE: ClassVar[str] = "EPOCH"
    FIELDS: ClassVar[dict[str, tuple[str, bool]]] = {
        "epoch": (FieldKind.INT, True),
        "first_step": (FieldKind.INT, True),
    }
    CARRIES_TENSORS: ClassVar[bool] = True
    epoch: int
    first_step: int
    tensors: tuple[Tensor, ...] = field(default=())  # "order": int64 [n_train]


@dataclass(frozen=True, kw_only=True)
class Forward(Message):
    """A data holder's cut-layer activations for one training step: tensor ``activations`` float32 [b, width]."""

    TYPE: ClassVar[str] = "FORWARD"
    FIELDS: ClassVar[dict[str, tuple[str, bool]]] = {"step": (FieldKind.INT, True)}
    CARRIES_TENSORS: ClassVar[bool] = True
    step: int
    tensors: tuple[Tensor, ...] = field(default=())


@dataclass(frozen=True, kw_only=True)
class Backward(Message):
    """The gradient of the loss w.r.t. one data holder's activations of a step: tensor ``gradient``."""

    TYPE: ClassVar[str] = "BACKWARD"
    FIELDS: ClassVar[dict[str, tuple[str, bool]]] = {"step": (FieldKind.INT, True)}
    CARRIES_TENSORS: ClassVar[bool] = True
    step: int
    tensors: tuple[Tensor, ...] = field(default=())


@dataclass(frozen=True, kw_only=True)
class EvalForward(Message):
    """Activations of validation batch ``batch`` after epoch ``epoch`` (no gradient comes back)."""

    TYPE: ClassVar[str] = "EVAL_FORWARD"
    FIELDS: ClassVar[dict[str, tuple[str, bool]]] = {"epoch": (FieldKind.INT, True), "batch": (FieldKind.INT, True)}
    CARRIES_TENSORS: ClassVar[bool] = True
    epoch: int
    batch: int
    tensors: tuple[Tensor, ...] = field(default=())


@dataclass(frozen=True, kw_only=True)
class Checkpoint(Message):
    """Save your segment as it is after ``step`` steps (every BACKWARD before ``step`` applied) and confirm."""

    TYPE: ClassVar[str] = "CHECKPOINT"
    FIELDS: ClassVar[dict[str, tuple[str, bool]]] = {
        "step": (FieldKind.INT, True),
        "epoch": (FieldKind.INT, True),
        "keep": (FieldKind.BOOL, False),
    }
    step: int
    epoch: int
    #: v1.5: the weights after ``step`` are the best so far ([train].keep = "best"): keep this checkpoint until a
    #: later CHECKPOINT with ``keep`` replaces it, or TRAINING_DONE names it
    keep: bool | None = None


@dataclass(frozen=True, kw_only=True)
class CheckpointDone(Message):
    """A data holder saved its checkpoint at ``step``; ``digest`` is the SHA-256 of the file it wrote."""

    TYPE: ClassVar[str] = "CHECKPOINT_DONE"
    FIELDS: ClassVar[dict[str, tuple[str, bool]]] = {"step": (FieldKind.INT, True), "digest": (FieldKind.STR, True)}
    step: int
    digest: str


@dataclass(frozen=True, kw_only=True)
class Rollback(Message):
    """A data holder restarted: drop the pipeline, and wait for a SCHEDULE that resumes from a checkpoint."""

    TYPE: ClassVar[str] = "ROLLBACK"
    FIELDS: ClassVar[dict[str, tuple[str, bool]]] = {"step": (FieldKind.INT, True)}
    step: int


@dataclass(frozen=True, kw_only=True)
class TrainingDone(Message):
    """v1.5: training is over after ``epochs`` epochs; the result is every party's segment as it was after
    ``keep_step`` steps, i.e. after epoch ``keep_epoch`` (0-based, as on the wire).

    ``keep_step`` is the last step unless ``[train].keep = "best"`` chose an earlier epoch; then ``keep_digest`` is
    the digest the receiver reported for its checkpoint at ``keep_step``, which it loads before saving its segment.
    ``early_stop``: the label holder stopped before the schedule's last epoch (``[train].patience``)."""

    TYPE: ClassVar[str] = "TRAINING_DONE"
    FIELDS: ClassVar[dict[str, tuple[str, bool]]] = {
        "epochs": (FieldKind.INT, True),
        "keep_step": (FieldKind.INT, True),
        "keep_epoch": (FieldKind.INT, True),
        "keep_digest": (FieldKind.STR, False),
        "early_stop": (FieldKind.BOOL, False),
    }
    epochs: int
    keep_step: int
    keep_epoch: int
    keep_digest: str | None = None
    early_stop: bool | None = None


@dataclass(frozen=True, kw_only=True)
class Window(Message):
    """v1.6, ``window = "auto"``: from now on this pipeline's window is ``window`` (the label holder timed its first
    steps at window 1 and chose it, at most the session's ``max_window``)."""

    TYPE: ClassVar[str] = "WINDOW"
    FIELDS: ClassVar[dict[str, tuple[str, bool]]] = {"window": (FieldKind.INT, True)}
    window: int


# ----------------------------------------------------------------------------------------- segment chains (v1.10)


@dataclass(frozen=True, kw_only=True)
class Relay(Message):
    """v1.10: a session message between the label holder and a party behind segment holders, carried hop by hop.

    The tensors carry the inner message: ``~header`` (uint8 [n], the inner frame 1 as encoded), then the inner
    tensors in order. ``party`` is the end party (the origin going up, the destination going down), ``conn`` its
    connection id at its hop, ``seq`` counts per ``conn`` and direction from 0, and ``mac`` (64 lowercase hex) is
    the HMAC-SHA256 that only the end party and the label holder can compute, so a segment holder on the path can
    drop a relayed message but neither forge, alter, replay nor reorder one (``vfl.protocol.relay``)."""

    TYPE: ClassVar[str] = "RELAY"
    FIELDS: ClassVar[dict[str, tuple[str, bool]]] = {
        "party": (FieldKind.ID, True),
        "conn": (FieldKind.STR, True),
        "seq": (FieldKind.INT, True),
        "mac": (FieldKind.STR, True),
    }
    CARRIES_TENSORS: ClassVar[bool] = True
    party: str
    conn: str
    seq: int
    mac: str
    tensors: tuple[Tensor, ...] = field(default=())


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        Hello, Welcome, Error, Heartbeat, Echo, EchoReply, Bye,
        PsiStart, PsiItems, PsiReply, PsiResult, PsiRows, PsiBucket,
        Schedule, Epoch, Forward, Backward, EvalForward, Checkpoint, CheckpointDone, Rollback, TrainingDone, Window,
        Relay,
    )
}
