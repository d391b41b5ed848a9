"""The PSI phase of a session (PROTOCOL.md section 10): wire messages <-> ``vfl.psi``'s sans-I/O exchange.

The session machines own one of these per pairwise PSI. They translate PSI_* messages into the exchange's
dataclasses and back, turn every ``PsiRemoteError`` into a ``RemoteProtocolError(PSI_FAILED)`` (the honest party
then ends the session: a PSI with a misbehaving peer has no right answer), and hand out the party's own blinded
stream one chunk at a time (``work()``), so the node loop can keep heartbeats and other peers going between chunks.

A session whose config has ``psi_buckets`` (v1.8) runs the bucketed PSI of ``vfl.psi.buckets`` instead: the same
messages plus PSI_BUCKET, and PSI_START's ``buckets`` / ``bucket_items``; the party's items come from the plan's
bucket source (the node's spills them to files). Without it the wire is exactly that of 1.1, and a PSI_START carrying
the bucket fields, or a PSI_BUCKET, is a PSI_FAILED: never read as something else.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..psi import buckets as bucketed
from ..psi import exchange as core
from ..psi import multiparty
from ..psi.engine import PsiEngine
from ..psi.errors import PsiError, PsiRemoteError
from .errors import ErrorCode, RemoteProtocolError
from .messages import Message, PsiBucket, PsiItems, PsiReply, PsiResult, PsiRows, PsiStart, Tensor

NONCE_HEX_CHARS = 32
#: [psi].max_items default: the most IDs a peer may announce (bounds what one PSI_START makes us hold)
DEFAULT_MAX_PSI_ITEMS = 100_000_000


@dataclass(frozen=True)
class PsiPlan:
    """A party's PSI inputs: its IDs encoded as bytes (``vfl.psi.encode_ids``), the engine and the stream settings."""

    items: Sequence[bytes]
    engine: PsiEngine
    chunk_size: int = core.DEFAULT_CHUNK_SIZE
    dedupe: bool = False
    min_rows: int = 1
    #: v1.8: 1 (the unbucketed PSI), a fixed K, or "auto" (the session config's ``psi_buckets``)
    buckets: int | str = 1
    #: the most items (own + the peer's) this party holds in one bucket (from ``[psi].memory_mb``); None: no budget
    capacity: int | None = None
    #: makes the bucket source of one pairwise PSI, given its nonce and the peer's party id (the node's spills to
    #: files, and finds there what an interrupted run of the pair finished); None: in memory
    source: Callable[[str, str], bucketed.BucketSource] | None = None
    #: v1.9, label holder: data holder -> the nonce of its pairwise PSI that an earlier process of this run left
    #: unfinished with at least one finished bucket (the node found them in its spill folder); WELCOME reuses it
    resume_nonces: Mapping[str, str] = field(default_factory=dict)

    def bucket_source(self, nonce: str, peer: str = "") -> bucketed.BucketSource:
        if self.source is not None:
            return self.source(nonce, peer)
        return bucketed.MemoryBuckets(self.items, dedupe=self.dedupe)


def new_nonce() -> str:
    """A fresh per-pair hashing nonce, chosen by the label holder and sent in WELCOME."""
    return secrets.token_hex(NONCE_HEX_CHARS // 2)


def _psi_failed(exc: PsiError, ref: str) -> RemoteProtocolError:
    return RemoteProtocolError(ErrorCode.PSI_FAILED, f"{exc.code}: {exc}", ref=ref)


def _tensor(msg: Message, name: str) -> np.ndarray:
    tensors = {t.name: t.array for t in msg.tensor_list}
    if name not in tensors:
        raise RemoteProtocolError(ErrorCode.BAD_TENSOR, f"{msg.TYPE} needs a tensor named {name!r}", ref=msg.TYPE)
    return tensors[name]


_DIGEST_HEX = re.compile(r"[0-9a-f]{64}")


def _resume_digest(msg: PsiStart) -> bytes | None:
    d = msg.resume_digest
    if d is None:
        return None
    if not _DIGEST_HEX.fullmatch(d):
        raise RemoteProtocolError(ErrorCode.PSI_FAILED, "PSI_START.resume_digest must be 64 lowercase hex digits",
                                  ref=msg.TYPE)
    return bytes.fromhex(d)


def to_core(msg: Message, *, bucketed_psi: bool = False):
    """A PSI_* wire message as the exchange's dataclass (shapes and dtypes are checked by the exchange).

    ``bucketed_psi``: the session runs the bucketed PSI (v1.8). Otherwise PSI_START's bucket fields and PSI_BUCKET
    are refused, so that a peer asking for buckets is never read as an unbucketed one."""
    if isinstance(msg, PsiStart):
        if bucketed_psi:
            return bucketed.BucketedStart(
                n_items=msg.n_items, chunk_size=msg.chunk_size, buckets=msg.buckets, bucket_items=msg.bucket_items,
                resume=msg.resume, resume_digest=_resume_digest(msg),
            )
        for name in ("buckets", "bucket_items", "resume", "resume_digest"):
            if getattr(msg, name) is not None:
                raise RemoteProtocolError(
                    ErrorCode.PSI_FAILED,
                    f"PSI_START.{name} in a session without bucketed PSI (the session config has no psi_buckets)",
                    ref=msg.TYPE,
                )
        return core.PsiStart(n_items=msg.n_items, chunk_size=msg.chunk_size)
    if isinstance(msg, PsiBucket):
        if not bucketed_psi:
            raise RemoteProtocolError(
                ErrorCode.PSI_FAILED,
                "PSI_BUCKET in a session without bucketed PSI (the session config has no psi_buckets)",
                ref=msg.TYPE,
            )
        return bucketed.BucketStart(bucket=msg.bucket, n_items=msg.n_items)
    if isinstance(msg, PsiItems):
        return core.BlindedChunk(chunk=msg.chunk, last=msg.last, points=_tensor(msg, "points"))
    if isinstance(msg, PsiReply):
        return core.ReplyChunk(chunk=msg.chunk, last=msg.last, tokens=_tensor(msg, "tokens"))
    if isinstance(msg, PsiResult):
        return core.ResultChunk(
            chunk=msg.chunk, last=msg.last, tokens=_tensor(msg, "tokens"), positions=_tensor(msg, "positions")
        )
    if isinstance(msg, PsiRows):
        return multiparty.RowsChunk(chunk=msg.chunk, last=msg.last, positions=_tensor(msg, "positions"))
    raise TypeError(f"not a PSI message: {msg.TYPE}")


def to_wire(item) -> Message:
    """The exchange's dataclass as a PSI_* wire message."""
    if isinstance(item, core.PsiStart):
        return PsiStart(n_items=item.n_items, chunk_size=item.chunk_size)
    if isinstance(item, bucketed.BucketedStart):
        return PsiStart(
            n_items=item.n_items, chunk_size=item.chunk_size, buckets=item.buckets, bucket_items=item.bucket_items,
            resume=item.resume, resume_digest=None if item.resume_digest is None else item.resume_digest.hex(),
        )
    if isinstance(item, bucketed.BucketStart):
        return PsiBucket(bucket=item.bucket, n_items=item.n_items)
    if isinstance(item, core.BlindedChunk):
        return PsiItems(chunk=item.chunk, last=item.last, tensors=(Tensor("points", item.points),))
    if isinstance(item, core.ReplyChunk):
        return PsiReply(chunk=item.chunk, last=item.last, tensors=(Tensor("tokens", item.tokens),))
    if isinstance(item, core.ResultChunk):
        return PsiResult(
            chunk=item.chunk,
            last=item.last,
            tensors=(Tensor("tokens", item.tokens), Tensor("positions", item.positions)),
        )
    if isinstance(item, multiparty.RowsChunk):
        return PsiRows(chunk=item.chunk, last=item.last, tensors=(Tensor("positions", item.positions),))
    raise TypeError(f"not a PSI item: {type(item).__name__}")


class PairwisePsi:
    """One side of one pairwise PSI as seen on the wire.

    ``sender`` (data holder) or ``receiver`` (label holder) from ``vfl.psi.exchange`` -- or, when the plan asks for
    buckets, from ``vfl.psi.buckets`` -- does the work; this class keeps the party's own blinded stream as a lazy
    iterator for ``work()`` and converts every message.
    """

    def __init__(self, plan: PsiPlan, *, run: str, nonce: str, role: str, max_peer_items: int = DEFAULT_MAX_PSI_ITEMS,
                 peer: str = ""):
        self.bucketed = plan.buckets != 1
        self.role = role.replace("_", " ")
        if self.bucketed:
            party_cls = bucketed.BucketedSender if role == "data_holder" else bucketed.BucketedReceiver
            self.exchange = party_cls(
                plan.bucket_source(nonce, peer),
                engine=plan.engine,
                run_id=run,
                nonce=bytes.fromhex(nonce),
                chunk_size=plan.chunk_size,
                buckets=plan.buckets,
                capacity=plan.capacity,
                max_peer_items=max_peer_items,
            )
        else:
            party_cls = core.PsiSender if role == "data_holder" else core.PsiReceiver
            self.exchange = party_cls(
                plan.items,
                engine=plan.engine,
                run_id=run,
                nonce=bytes.fromhex(nonce),
                chunk_size=plan.chunk_size,
                dedupe=plan.dedupe,
                max_peer_items=max_peer_items,
            )
        self.max_peer_items = max_peer_items
        self._stream: Iterator | None = None
        self.received_chunks = 0

    def start(self) -> list[Message]:
        """Our PSI_START; our own stream starts flowing through ``work()``."""
        first = self.exchange.start()
        if not self.bucketed:
            self._stream = self.exchange.blinded_chunks()
        return [to_wire(first)]

    @property
    def has_work(self) -> bool:
        if self.bucketed:
            return self.exchange.has_work
        return self._stream is not None

    def work(self) -> list[Message]:
        """The next chunk of our own blinded stream (the expensive part: hash-to-curve and one exponentiation)."""
        if self.bucketed:
            return [to_wire(m) for m in self.exchange.work()]
        if self._stream is None:
            return []
        chunk = next(self._stream, None)
        if chunk is None or chunk.last:
            self._stream = None
        return [] if chunk is None else [to_wire(chunk)]

    def receive(self, msg: Message) -> list[Message]:
        """A PSI_* message from the peer; returns what to send back. Raises ``RemoteProtocolError(PSI_FAILED)``.

        A PSI_START announcing more IDs than ``[psi].max_items`` is refused with ``TOO_LARGE`` before anything is
        allocated for it: the size a peer announces bounds what we hold for its stream.
        """
        if isinstance(msg, PsiStart) and type(msg.n_items) is int and msg.n_items > self.max_peer_items:
            raise RemoteProtocolError(
                ErrorCode.TOO_LARGE,
                f"PSI_START.n_items = {msg.n_items} is more than this party accepts ([psi].max_items = "
                f"{self.max_peer_items}); split the ID set, or have the operators raise [psi].max_items",
                ref=msg.TYPE,
            )
        try:
            out = self.exchange.receive(to_core(msg, bucketed_psi=self.bucketed))
        except PsiRemoteError as exc:
            raise _psi_failed(exc, msg.TYPE) from None
        except OSError as exc:  # the bucket source's files (the node's spill folder): a full disk, a path in the way
            # ends the pair now, for both parties, instead of an INTERNAL answer that leaves the pair waiting; the
            # path stays out of the text, which goes to the peer (the node logs its spill folder itself)
            raise RemoteProtocolError(
                ErrorCode.INTERNAL,
                f"the {self.role} cannot write or read its PSI spill files ({exc.strerror or type(exc).__name__}); "
                "check its psi-buckets folder (next to its [psi].output), then start the nodes again",
                ref=msg.TYPE,
            ) from None
        self.received_chunks += 1
        return [to_wire(item) for item in out]

    @property
    def done(self) -> bool:
        return self.exchange.done

    @property
    def finished_buckets(self) -> int:
        """Buckets of a bucketed PSI finished so far (a resume starts after them); 0 without buckets."""
        return self.exchange.finished_buckets if self.bucketed else 0

    @property
    def resumed_at(self) -> int:
        """The bucket this bucketed PSI resumed at (0: it started at the first)."""
        return self.exchange.resumed_at if self.bucketed else 0

    @property
    def rows(self) -> np.ndarray:
        """Our rows of the pairwise intersection (indices into our input), in the pairwise order."""
        return self.exchange.rows


class FinalRows:
    """A data holder's side of PSI_ROWS: positions into its pairwise order -> its own rows in the final order."""

    def __init__(self, pairwise_rows: np.ndarray):
        self._receiver = multiparty.FinalRowsReceiver(pairwise_rows)

    def receive(self, msg: PsiRows) -> np.ndarray | None:
        """The final rows once the last chunk is in, else None."""
        try:
            self._receiver.receive(to_core(msg))
        except PsiRemoteError as exc:
            raise _psi_failed(exc, msg.TYPE) from None
        return self._receiver.rows if self._receiver.done else None


def final_rows_messages(positions: np.ndarray, chunk_size: int) -> list[Message]:
    return [to_wire(c) for c in multiparty.rows_chunks(positions, chunk_size)]


def combine(pairwise: Sequence[PairwisePsi]) -> multiparty.MultipartyPlan:
    """The label holder's final rows and, per data holder (in the given order), the positions to send it."""
    return multiparty.combine([multiparty.PairwiseResult(rows=p.rows) for p in pairwise], allow_empty=True)


def positions_for(final_rows: np.ndarray, pairwise_rows: np.ndarray) -> np.ndarray:
    """Positions of ``final_rows`` in a (new) pairwise order; ValueError if one of them is missing there."""
    order = np.argsort(pairwise_rows, kind="stable")
    idx = np.searchsorted(pairwise_rows, final_rows, sorter=order)
    idx = np.minimum(idx, max(len(order) - 1, 0))
    where = order[idx] if len(order) else np.empty(0, np.int64)
    if len(final_rows) and (len(order) == 0 or not np.array_equal(pairwise_rows[where], final_rows)):
        raise ValueError("some of the aligned rows are no longer shared")
    return where.astype(np.uint32)
