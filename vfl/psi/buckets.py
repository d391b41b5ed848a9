"""Bucketed PSI (sans-I/O): the two-party exchange of :mod:`vfl.psi.exchange`, run bucket by bucket.

Why: one exchange holds every item, point and token of both sets at once (about 560 MiB per party at 1M items). A
party that partitions its distinct items into ``K`` buckets by a keyed hash, and runs one exchange per bucket with
the same secret exponent, holds only one bucket's working set at a time; the peer does the same with the same
partition function, so an item shared by both lands in the same bucket on both sides and the union of the per-bucket
intersections is the intersection.

::

    D -> L  BucketedStart {n_items = |X|, chunk_size, bucket_items = D's per-bucket capacity (or none)}
    L -> D  BucketedStart {n_items = |Y|, chunk_size, buckets = K}            L decides K (see choose_buckets)
    for b = 0 .. K-1, in this order, each exactly once:
      D -> L  BucketStart {bucket = b, n_items = |X_b|}, then the exchange of X_b and Y_b (BlindedChunk, ReplyChunk,
      L -> D  BucketStart {bucket = b, n_items = |Y_b|}   ResultChunk, chunks numbered from 0 within the bucket)

``X_b = {x in X : bucket(x) = b}`` with ``bucket(x) = BLAKE2b-64(x; key = bucket_key(run, nonce)) mod K``. The key
comes from the pair's ``psi_nonce``, which the label holder draws fresh for every pair and session (PROTOCOL.md
[P1]), so a partition never repeats across runs. D opens bucket ``b + 1`` right after sending bucket ``b``'s result;
L opens its side of a bucket when D's ``BucketStart`` arrives, after it has checked the previous bucket's result.

Both sides end with ``rows``: indices into their original input, in the joint order ``(bucket, joint token)``. With
``K = 1`` the one bucket is the whole set, so rows, tokens and order are exactly those of one plain exchange.

The items themselves stay with the caller: a :class:`BucketSource` partitions them and hands out one bucket at a
time (:class:`MemoryBuckets` keeps them in memory; the node's source spills every bucket to a file), and receives
every finished bucket's rows (``commit``), so that a node can persist them. Nothing here does I/O.

**Resume** (v1.9, [P19]-[P22]): a pairwise PSI that was interrupted (a party killed, or its connection lost) and
started again with the same nonce (the label holder reuses a pair's nonce while it holds finished buckets of it)
picks up at the first bucket both parties have not finished. The source reports what an earlier run of the pair
finished (:meth:`BucketSource.earlier`: K, the peer's set size, and per finished bucket both sizes and a digest of
its joint tokens); D announces how many buckets it finished and the chain digest of them, L answers with the bucket
both resume at, ``r = min(c_D, c_L)``, and its chain digest of buckets ``0 .. r-1``; each side checks the other's
digest against its own, so the parties never splice different buckets together. The finished buckets keep the rows
and order of the run that finished them; the others are exchanged afresh with fresh secret exponents (a key is never
stored), under the same partition. Nothing of a finished bucket is sent again.

Every received field is checked before use ([P12]-[P15] of PROTOCOL.md): K in range and as agreed, no more buckets
than the peer's and our own budget allow, bucket indices in order and each exactly once, per-bucket sizes adding up
to the announced set size, and no bucket larger than this party's capacity.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from . import exchange as core
from .cipher import PsiKey
from .curve import hash_domain
from .engine import PsiEngine
from .errors import (
    ChunkOrderError,
    InvalidResultError,
    LimitExceededError,
    MalformedMessageError,
    PsiStateError,
    TruncatedStreamError,
)
from .items import take_items

__all__ = [
    "MAX_BUCKETS",
    "ITEM_BYTES",
    "AUTO",
    "BucketedStart",
    "BucketStart",
    "FinishedBucket",
    "EarlierRun",
    "bucket_digest",
    "chain_digest",
    "BucketSource",
    "MemoryBuckets",
    "BucketedSender",
    "BucketedReceiver",
    "bucket_key",
    "assign_buckets",
    "group_by_bucket",
    "capacity_for",
    "choose_buckets",
    "run_bucketed_in_memory",
]

MAX_BUCKETS = 1 << 16
#: bytes one item (own or the peer's) costs a party while its bucket is open, an estimate with margin: the item's
#: bytes object and list slot, its point and token, row indices, and the sort keys of the intersection
ITEM_BYTES = 256
AUTO = "auto"
#: a bucket's size (own + peer) is binomial around its mean, with at most twice the variance when the sets overlap
#: (a shared item is in the same bucket at both); K is chosen so that mean + SIGMAS * sqrt(2 * mean) + SIGMAS fits the
#: capacity: with K <= 65536 buckets, the chance that an honest bucket overflows is below 1e-6
SIGMAS = 7
_PERSON = b"vfl/psi/bucket1"  # BLAKE2b personalisation of the bucket-key derivation (domain separation from H)
_DIGEST_PERSON = b"vfl/psi/bdigest1"  # ... of a finished bucket's digest
_CHAIN_PERSON = b"vfl/psi/resume1"  # ... of the chain digest of finished buckets
_HASH_BATCH = 1 << 16
DIGEST_BYTES = 32
#: what a user does about a resume the parties cannot agree on: it fails again at every start until one party's
#: finished buckets are gone (the label holder then draws a fresh nonce, or the data holder announces none)
_START_OVER = "; delete the psi-buckets folder of either party to start the PSI over"


# --------------------------------------------------------------------------------------------------------- messages


@dataclass(frozen=True, kw_only=True)
class BucketedStart:
    """``PSI_START`` of a bucketed PSI: the set size, the chunk size, and D's capacity or L's K."""

    n_items: int
    chunk_size: int
    buckets: int | None = None  # L -> D: the number of buckets K
    bucket_items: int | None = None  # D -> L: the most items (own + peer) D holds in one bucket; None: no budget
    #: v1.9: D -> L the buckets D finished in an earlier run of this pair; L -> D the bucket both resume at (None: 0)
    resume: int | None = None
    #: v1.9: the chain digest (:func:`chain_digest`) of the buckets ``resume`` counts; present exactly when it is >= 1
    resume_digest: bytes | None = None


@dataclass(frozen=True, kw_only=True)
class BucketStart:
    """``PSI_BUCKET``: opens the sender's side of bucket ``bucket``, which holds ``n_items`` of its items."""

    bucket: int
    n_items: int


Message = BucketedStart | BucketStart | core.BlindedChunk | core.ReplyChunk | core.ResultChunk


# ---------------------------------------------------------------------------------------------------- partitioning


def bucket_key(run_id: bytes | str, nonce: bytes) -> bytes:
    """The pair's 32-byte bucket key: BLAKE2b of the hash-to-curve domain (run id and nonce), personalised so that
    it is independent of ``H``. Fresh whenever the nonce is, which the label holder draws per pair and session."""
    return hashlib.blake2b(hash_domain(run_id, nonce), digest_size=32, person=_PERSON).digest()


def assign_buckets(items: Sequence[bytes], key: bytes, k: int) -> np.ndarray:
    """Each item's bucket, ``uint32``: ``BLAKE2b-64(item; key) mod k`` (little-endian; the bias of the modulus is
    below 2^-47 for k <= 65536). With ``k = 1`` every item is in bucket 0 and nothing is hashed."""
    if not 1 <= k <= MAX_BUCKETS:
        raise ValueError(f"k must be in [1, {MAX_BUCKETS}]")
    if k == 1:
        return np.zeros(len(items), dtype=np.uint32)
    b2 = hashlib.blake2b
    out = np.empty(len(items), dtype=np.uint32)
    for lo in range(0, len(items), _HASH_BATCH):  # in batches: no list of n digests at 10M items
        digests = b"".join([b2(it, key=key, digest_size=8).digest() for it in items[lo : lo + _HASH_BATCH]])
        out[lo : lo + _HASH_BATCH] = np.frombuffer(digests, dtype="<u8") % np.uint64(k)
    return out


@dataclass(frozen=True, eq=False)  # arrays: compare fields explicitly
class Grouping:
    """Distinct rows grouped by bucket: bucket ``b`` is ``rows[bounds[b]:bounds[b + 1]]`` (``int64``)."""

    rows: np.ndarray
    bounds: np.ndarray

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.bounds)

    def bucket(self, b: int) -> np.ndarray:
        return self.rows[self.bounds[b] : self.bounds[b + 1]]


def group_by_bucket(items: Sequence[bytes], unique_rows: np.ndarray, key: bytes, k: int) -> Grouping:
    """Group the distinct rows ``unique_rows`` (indices into ``items``) by bucket, keeping their order in a bucket."""
    n = len(unique_rows)
    if k == 1:
        return Grouping(rows=unique_rows, bounds=np.array([0, n], dtype=np.int64))
    sub = items if n == len(items) else take_items(items, unique_rows)  # compact when ``items`` is an ItemStore
    which = assign_buckets(sub, key, k)
    del sub
    order = np.argsort(which, kind="stable")
    bounds = np.zeros(k + 1, dtype=np.int64)
    np.cumsum(np.bincount(which, minlength=k), out=bounds[1:])
    return Grouping(rows=unique_rows[order], bounds=bounds)


def capacity_for(memory_mb: int) -> int:
    """The most items (own + the peer's) one bucket may hold within a budget of ``memory_mb`` MiB."""
    return max(1, (int(memory_mb) << 20) // ITEM_BYTES)


#: [P18]: the smallest per-bucket capacity a peer may announce (that of ``memory_mb = 1``), and so the most buckets an
#: "auto" K may have for a given total: a peer cannot make the other party spill into tens of thousands of files
MIN_BUCKET_ITEMS = capacity_for(1)


def bucket_fits(total: int, k: int, capacity: int) -> bool:
    """Does a bucket of the mean size ``total / k``, plus ``SIGMAS * sqrt(2 * mean) + SIGMAS``, fit ``capacity``?"""
    mean = total / k
    return mean + SIGMAS * math.sqrt(2 * mean) + SIGMAS <= capacity


def choose_buckets(total: int, capacity: int | None) -> int:
    """The fewest buckets K (at most :data:`MAX_BUCKETS`) such that a bucket of ``mean = total / K`` items, plus
    ``SIGMAS * sqrt(2 * mean) + SIGMAS``, fits ``capacity`` items; 1 without a capacity."""
    if capacity is None or total <= 0:
        return 1

    def fits(k: int) -> bool:
        return bucket_fits(total, k, capacity)

    lo = max(1, -(-total // capacity)) - 1  # fewer buckets than total / capacity cannot fit
    if lo >= MAX_BUCKETS:
        return MAX_BUCKETS  # nothing fits: the per-bucket capacity check refuses the PSI, naming the numbers
    hi = lo + 1
    while hi < MAX_BUCKETS and not fits(hi):  # fits() grows with k: double until it holds ...
        lo, hi = hi, min(MAX_BUCKETS, 2 * hi)
    while hi - lo > 1:  # ... then bisect to the smallest k that fits
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi


@dataclass(frozen=True, kw_only=True)
class FinishedBucket:
    """What a resume needs of a bucket an exchange finished: both parties' sizes in it and its digest."""

    own_items: int
    peer_items: int
    digest: bytes  # bucket_digest of the bucket: the same at both parties


@dataclass(frozen=True, kw_only=True)
class EarlierRun:
    """What an earlier, interrupted run of this pair (same run, nonce, peer and own set) left: its K, the peer's set
    size, and its finished buckets ``0 .. len(finished) - 1`` (a contiguous prefix: buckets finish in order)."""

    k: int
    peer_n_items: int
    finished: tuple[FinishedBucket, ...]


def bucket_digest(b: int, n_data_holder: int, n_label_holder: int, tokens: np.ndarray) -> bytes:
    """A finished bucket's digest: its index, both parties' sizes in it (data holder's first) and its joint tokens
    in the joint order. Both parties know all of it, so both compute the same 32 bytes, and it reveals nothing new."""
    h = hashlib.blake2b(digest_size=DIGEST_BYTES, person=_DIGEST_PERSON)
    h.update(np.array([b, n_data_holder, n_label_holder], dtype="<u8").tobytes())
    h.update(np.ascontiguousarray(tokens, dtype=np.uint8).tobytes())
    return h.digest()


def chain_digest(k: int, digests: Sequence[bytes]) -> bytes:
    """The chain digest of finished buckets ``0 .. len(digests) - 1`` of a ``k``-bucket PSI: equal at both parties
    exactly when they finished the same buckets with the same sizes and tokens."""
    h = hashlib.blake2b(digest_size=DIGEST_BYTES, person=_CHAIN_PERSON)
    h.update(np.array([k, len(digests)], dtype="<u8").tobytes())
    for d in digests:
        h.update(d)
    return h.digest()


class BucketSource(Protocol):
    """Where a party's items wait while their bucket is closed. The bucketed parties call it; it may do I/O (the
    node's spills to files), the parties never do."""

    #: the number of distinct items (after the duplicate check or ``dedupe``)
    n_items: int

    def earlier(self) -> EarlierRun | None:
        """What an earlier run of this pair finished (same run, nonce, peer and own set), or None."""

    def partition(self, key: bytes, k: int, keep: int = 0, peer_n_items: int = 0) -> np.ndarray:
        """Partition the distinct items into ``k`` buckets with ``key``; returns the counts, ``int64 [k]``.
        ``keep``: buckets ``0 .. keep - 1`` are the earlier run's finished ones, kept with their results (they need
        no items); every other result of the earlier run is dropped. ``peer_n_items``: the peer's set size, which a
        later resume of this PSI checks (:class:`EarlierRun`)."""

    def bucket(self, b: int) -> tuple[Sequence[bytes], np.ndarray]:
        """Bucket ``b``'s items and, for each, its row index in the caller's original input (``int64``)."""

    def commit(self, b: int, rows: np.ndarray, finished: FinishedBucket) -> None:
        """Bucket ``b`` is finished: its intersection rows (original row indices) in the joint order, and what a
        resume needs of it. A source that persists it must do so before the party sends anything more."""

    def result(self, b: int) -> np.ndarray:
        """A finished bucket's rows (this run's or, for a kept bucket, the earlier run's)."""

    def close(self) -> None:
        """The pairwise PSI is over (every bucket committed): drop what is held in memory for it."""


class MemoryBuckets:
    """A :class:`BucketSource` that keeps the items in memory (tests, benchmarks, small sets)."""

    def __init__(self, items: Sequence[bytes], *, dedupe: bool = False, unique_rows: np.ndarray | None = None) -> None:
        """``unique_rows``: the distinct items' indices, when the caller has already checked them (``prepare_items``);
        otherwise they are computed here (which raises DuplicateIdError / InvalidIdError)."""
        self.items = items
        if unique_rows is None:
            unique_rows = core.prepare_items(items, dedupe=dedupe)
        self.unique_rows = np.asarray(unique_rows, dtype=np.int64)
        self.n_items = len(self.unique_rows)
        self.grouping: Grouping | None = None
        self.committed: dict[int, np.ndarray] = {}
        self.finished: dict[int, FinishedBucket] = {}
        self.k: int | None = None
        self.peer_n_items: int | None = None
        self._earlier: EarlierRun | None = None

    @classmethod
    def after(cls, old: "MemoryBuckets") -> "MemoryBuckets":
        """A restarted party's source: the same items, and what ``old`` (the interrupted run) finished, as the
        node's spill folder keeps it across a kill."""
        new = cls(old.items, unique_rows=old.unique_rows)
        n = 0
        while n in old.finished:
            n += 1
        if old.k is not None and old.peer_n_items is not None and n:
            new._earlier = EarlierRun(k=old.k, peer_n_items=old.peer_n_items,
                                      finished=tuple(old.finished[b] for b in range(n)))
            new.committed = {b: old.committed[b] for b in range(n)}
        return new

    def earlier(self) -> EarlierRun | None:
        return self._earlier

    def partition(self, key: bytes, k: int, keep: int = 0, peer_n_items: int = 0) -> np.ndarray:
        self.grouping = group_by_bucket(self.items, self.unique_rows, key, k)
        self.k, self.peer_n_items = k, peer_n_items
        self.committed = {b: r for b, r in self.committed.items() if b < keep}
        earlier = self._earlier.finished if self._earlier is not None else ()
        self.finished = {b: f for b, f in enumerate(earlier) if b < keep}
        return self.grouping.counts

    def bucket(self, b: int) -> tuple[Sequence[bytes], np.ndarray]:
        if self.grouping is None:
            raise PsiStateError("partition() before bucket()")
        rows = self.grouping.bucket(b)
        return take_items(self.items, rows), rows

    def commit(self, b: int, rows: np.ndarray, finished: FinishedBucket) -> None:
        self.committed[b] = rows
        self.finished[b] = finished

    def result(self, b: int) -> np.ndarray:
        return self.committed[b]

    def close(self) -> None:
        self.grouping = None


# ------------------------------------------------------------------------------------------------------------ party


def _opt_int(name: str, v: object, lo: int, hi: int) -> int | None:
    return None if v is None else core._check_int(name, v, lo, hi)


class _BucketedParty:
    """What both roles share: the pair's key, the agreed K, the per-bucket exchanges one at a time, the checks.

    ``buckets``: an int K (set by hand, the same at both parties: the session config carries it) or ``"auto"`` (the
    label holder chooses K from both set sizes and both capacities). ``capacity``: the most items (own + the peer's)
    this party holds in one bucket (:func:`capacity_for` of ``[psi].memory_mb``), or None for no budget. The other
    arguments are those of :class:`~vfl.psi.exchange.PsiSender`; ``max_peer_items`` bounds the peer's whole set.
    """

    role = "party"
    exchange_cls: type[core._Party] = core._Party

    def __init__(
        self,
        source: BucketSource,
        *,
        engine: PsiEngine,
        run_id: bytes | str,
        nonce: bytes = b"",
        chunk_size: int = core.DEFAULT_CHUNK_SIZE,
        buckets: int | str = AUTO,
        capacity: int | None = None,
        verify_curve: bool = True,
        max_peer_items: int = core.MAX_ITEMS,
        max_peer_chunk: int = core.MAX_CHUNK_SIZE,
        key: PsiKey | None = None,
        min_bucket_items: int = MIN_BUCKET_ITEMS,
    ) -> None:
        if not 1 <= chunk_size <= core.MAX_CHUNK_SIZE:
            raise ValueError(f"chunk_size must be in [1, {core.MAX_CHUNK_SIZE}]")
        if buckets != AUTO and not (type(buckets) is int and 1 <= buckets <= MAX_BUCKETS):
            raise ValueError(f"buckets must be 'auto' or an int in [1, {MAX_BUCKETS}]")
        if capacity is not None and capacity < 1:
            raise ValueError("capacity must be >= 1 or None")
        self.source = source
        self.engine = engine
        self.run_id, self.nonce = run_id, nonce
        self.chunk_size = int(chunk_size)
        self.buckets_setting = buckets
        self.capacity = capacity
        self.verify_curve = bool(verify_curve)
        self.max_peer_items = min(int(max_peer_items), core.MAX_ITEMS)
        self.max_peer_chunk = int(max_peer_chunk)
        self.min_bucket_items = int(min_bucket_items)  # [P18]; tests lower it to bucket small sets
        self._key = key or PsiKey.generate()  # one secret exponent for every bucket of the pair
        self._bucket_key = bucket_key(run_id, nonce)
        self.n_items = source.n_items
        self.k: int | None = None
        self._peer: BucketedStart | None = None
        self._own_counts: np.ndarray | None = None
        self._started = False
        self._bucket = -1  # the open bucket (or the last one finished)
        self._sub: core._Party | None = None  # the open bucket's exchange
        self._sub_rows: np.ndarray | None = None  # its items' original rows
        self._peer_opened = False  # the peer's BucketStart for the open bucket arrived
        self._peer_announced = 0  # sum of the peer's per-bucket sizes so far
        self._stream: Iterator[core.BlindedChunk] | None = None
        self._rows: np.ndarray | None = None
        self._earlier = source.earlier()  # what an interrupted run of this pair finished (v1.9 resume)
        self.resumed_at = 0  # the bucket this run started at: the buckets before it were finished by an earlier run

    # ----------------------------------------------------------------------------------------------------- API

    @property
    def done(self) -> bool:
        return self._rows is not None

    @property
    def rows(self) -> np.ndarray:
        """Indices into the original input of the intersection, in the joint order (bucket, joint token)."""
        if self._rows is None:
            raise PsiStateError("the bucketed exchange has not finished")
        return self._rows

    @property
    def peer_n_items(self) -> int | None:
        return None if self._peer is None else self._peer.n_items

    @property
    def finished_buckets(self) -> int:
        """How many buckets are finished (and committed to the source), counting those an earlier run finished."""
        if self._rows is not None:
            return int(self.k)  # type: ignore[arg-type]
        if self.k is None:
            return 0
        return self._bucket if self._sub is not None else self._bucket + 1

    @property
    def has_work(self) -> bool:
        return self._stream is not None

    def work(self) -> list[Message]:
        """The next chunk of our own blinded stream in the open bucket (hash-to-curve and one exponentiation)."""
        if self._stream is None:
            return []
        chunk = next(self._stream, None)
        if chunk is None or chunk.last:
            self._stream = None
        return [] if chunk is None else [chunk]

    def receive(self, msg: Message) -> list[Message]:
        """Feed one message from the peer; returns the messages to send in response (possibly none)."""
        if isinstance(msg, BucketedStart):
            return self._on_start(msg)
        if self._peer is None:
            raise MalformedMessageError(f"{self.role}: {type(msg).__name__} before the peer's PSI_START")
        if isinstance(msg, BucketStart):
            return self._on_bucket(msg)
        if isinstance(msg, (core.BlindedChunk, core.ReplyChunk, core.ResultChunk)):
            if self._sub is None or not self._peer_opened:
                raise ChunkOrderError(f"{self.role}: {type(msg).__name__} outside an open bucket")
            out = self._sub.receive(msg)
            return out + self._after_sub()
        raise MalformedMessageError(f"{self.role}: unexpected message {type(msg).__name__}")

    # --------------------------------------------------------------------------------------------- internals

    def _check_peer_start(self, msg: BucketedStart) -> BucketedStart:
        if self._peer is not None:
            raise MalformedMessageError(f"{self.role}: second PSI_START")
        n = core._check_int("PSI_START.n_items", msg.n_items, 0, self.max_peer_items)
        c = core._check_int("PSI_START.chunk_size", msg.chunk_size, 1, self.max_peer_chunk)
        resume = _opt_int("PSI_START.resume", msg.resume, 1, MAX_BUCKETS)
        digest = msg.resume_digest
        if (resume is None) != (digest is None):
            raise MalformedMessageError(f"{self.role}: PSI_START has resume without resume_digest or the other way round")
        if digest is not None and not (type(digest) is bytes and len(digest) == DIGEST_BYTES):
            raise MalformedMessageError(f"{self.role}: PSI_START.resume_digest must be {DIGEST_BYTES} bytes")
        return BucketedStart(
            n_items=n,
            chunk_size=c,
            buckets=_opt_int("PSI_START.buckets", msg.buckets, 1, MAX_BUCKETS),
            bucket_items=_opt_int("PSI_START.bucket_items", msg.bucket_items, self.min_bucket_items, core.MAX_ITEMS),
            resume=resume,
            resume_digest=digest,
        )

    def _own_chain(self, r: int) -> bytes:
        """Our chain digest of the earlier run's first ``r`` finished buckets."""
        assert self._earlier is not None and self.k is not None
        return chain_digest(self.k, [f.digest for f in self._earlier.finished[:r]])

    def _partition(self, r: int) -> list[Message]:
        """Partition for K = self.k and start at bucket ``r`` (the buckets before it are the earlier run's)."""
        assert self.k is not None and self._peer is not None
        self._own_counts = np.asarray(
            self.source.partition(self._bucket_key, self.k, keep=r, peer_n_items=self._peer.n_items), dtype=np.int64
        )
        kept = self._earlier.finished[:r] if r else ()
        for b, f in enumerate(kept):
            if f.own_items != int(self._own_counts[b]):
                raise PsiStateError(
                    f"bucket {b} holds {self._own_counts[b]} of our items now but {f.own_items} when it was finished: "
                    "the bucket source resumed a run of another set"
                )
        self.resumed_at, self._bucket = r, r - 1
        self._peer_announced = sum(f.peer_items for f in kept)
        if r == self.k:  # every bucket was finished before: nothing to exchange
            self._finish_pair()
        return []

    def _on_start(self, msg: BucketedStart) -> list[Message]:
        raise NotImplementedError

    def _check_bucket(self, msg: BucketStart) -> tuple[int, int]:
        """The peer's BucketStart for the bucket it may open now: index in range and in order, size consistent."""
        assert self.k is not None and self._peer is not None
        b = core._check_int("PSI_BUCKET.bucket", msg.bucket, 0, core.MAX_ITEMS)
        n = core._check_int("PSI_BUCKET.n_items", msg.n_items, 0, core.MAX_ITEMS)
        if b >= self.k:
            raise LimitExceededError(f"{self.role}: PSI_BUCKET.bucket = {b} but the PSI has {self.k} buckets (0..{self.k - 1})")
        opened, may_open = self._peer_buckets()
        if b < opened:
            raise ChunkOrderError(f"{self.role}: PSI_BUCKET.bucket = {b} repeats a bucket (each bucket opens exactly once)")
        if may_open is None:
            raise ChunkOrderError(f"{self.role}: PSI_BUCKET.bucket = {b} arrived before bucket {self._bucket} finished")
        if b != may_open:
            raise ChunkOrderError(f"{self.role}: PSI_BUCKET.bucket = {b} skips ahead; expected bucket {may_open}")
        remaining = self._peer.n_items - self._peer_announced
        if n > remaining:
            raise LimitExceededError(
                f"{self.role}: bucket {b} has {n} items but only {remaining} of the peer's announced "
                f"{self._peer.n_items} are left"
            )
        if b == self.k - 1 and n != remaining:
            raise TruncatedStreamError(
                f"{self.role}: the peer's buckets hold {self._peer_announced + n} items, not the {self._peer.n_items} "
                "its PSI_START announced"
            )
        own = int(self._own_counts[b])  # type: ignore[index]
        if self.capacity is not None and own + n > self.capacity:
            raise LimitExceededError(
                f"{self.role}: bucket {b} holds {own} + {n} items, more than this party's capacity of {self.capacity} "
                "items per bucket ([psi].memory_mb)"
            )
        return b, n

    def _peer_buckets(self) -> tuple[int, int | None]:
        """How many buckets the peer has opened, and the one it may open now (None: none until ours finishes)."""
        raise NotImplementedError

    def _open_own(self, b: int) -> core._Party:
        """Bucket ``b``'s exchange over our own items of that bucket; our stream starts flowing through work()."""
        items, rows = self.source.bucket(b)
        sub = self.exchange_cls(
            items,
            engine=self.engine,
            run_id=self.run_id,
            nonce=self.nonce,
            chunk_size=self.chunk_size,
            verify_curve=self.verify_curve,
            max_peer_items=core.MAX_ITEMS,  # the bucket checks bound the peer's bucket
            max_peer_chunk=self.max_peer_chunk,
            key=self._key,
        )
        if sub.n_items != int(self._own_counts[b]):  # type: ignore[index]
            raise PsiStateError(f"the bucket source gave {sub.n_items} items for bucket {b}, not {self._own_counts[b]}")
        self._bucket, self._sub, self._sub_rows, self._peer_opened = b, sub, np.asarray(rows, np.int64), False
        sub.start()
        self._stream = sub.blinded_chunks()
        return sub

    def _peer_opens(self, n: int) -> None:
        self._peer_announced += n
        self._peer_opened = True
        self._sub.receive(core.PsiStart(n_items=n, chunk_size=self._peer.chunk_size))  # type: ignore[union-attr]

    def _finish_bucket(self) -> None:
        """The open bucket's rows (original indices, joint order) are final: commit them and close the bucket."""
        sub = self._sub
        assert sub is not None and sub.peer_n_items is not None
        rows = self._sub_rows[sub.rows]  # type: ignore[index]
        own, peer = sub.n_items, sub.peer_n_items
        n_d, n_l = (own, peer) if isinstance(self, BucketedSender) else (peer, own)
        finished = FinishedBucket(own_items=own, peer_items=peer,
                                  digest=bucket_digest(self._bucket, n_d, n_l, sub.tokens))
        self.source.commit(self._bucket, rows, finished)
        self._sub, self._sub_rows, self._stream = None, None, None
        if self._bucket == self.k - 1:  # type: ignore[operator]
            self._finish_pair()

    def _finish_pair(self) -> None:
        parts = [np.asarray(self.source.result(b), dtype=np.int64) for b in range(self.k)]  # type: ignore[arg-type]
        self._rows = np.concatenate(parts) if parts else np.empty(0, np.int64)
        self.source.close()

    def _after_sub(self) -> list[Message]:
        raise NotImplementedError


class BucketedSender(_BucketedParty):
    """The data holder D of a bucketed PSI: announces its capacity, opens every bucket in order, sends the results."""

    role = "data holder"
    exchange_cls = core.PsiSender

    def start(self) -> BucketedStart:
        if self._started:
            raise PsiStateError("start() called twice")
        self._started = True
        c = 0 if self._earlier is None else len(self._earlier.finished)
        digest = None
        if c:
            digest = chain_digest(self._earlier.k, [f.digest for f in self._earlier.finished])  # type: ignore[union-attr]
        return BucketedStart(n_items=self.n_items, chunk_size=self.chunk_size, bucket_items=self.capacity,
                             resume=c or None, resume_digest=digest)

    def _on_start(self, msg: BucketedStart) -> list[Message]:
        if not self._started:
            raise PsiStateError("call start() before feeding the label holder's PSI_START")
        peer = self._check_peer_start(msg)
        if peer.bucket_items is not None:
            raise MalformedMessageError("data holder: the label holder's PSI_START has bucket_items (only D sends it)")
        if peer.buckets is None:
            raise MalformedMessageError("data holder: PSI_START.buckets is missing from the label holder's start of a bucketed PSI")
        k = peer.buckets
        if self.buckets_setting != AUTO and k != self.buckets_setting:
            raise MalformedMessageError(f"data holder: PSI_START.buckets = {k}, but the session agreed on {self.buckets_setting}")
        total = self.n_items + peer.n_items
        need = choose_buckets(total, self.capacity)
        most = max(need, choose_buckets(total, self.min_bucket_items))
        if self.buckets_setting == AUTO and k > most:  # [P18]: checked before a single item is partitioned
            raise LimitExceededError(
                f"data holder: PSI_START.buckets = {k} is more than any budget needs for {self.n_items} + "
                f"{peer.n_items} items (at most {most}: a bucket of {self.min_bucket_items} items)"
            )
        if k < need:
            raise LimitExceededError(
                f"data holder: PSI_START.buckets = {k} is too few for {self.n_items} + {peer.n_items} items within "
                f"this party's capacity of {self.capacity} items per bucket (needs at least {need})"
            )
        self._peer, self.k = peer, k
        r = peer.resume or 0
        if r:  # [P21]: the label holder may resume only at a bucket we finished, of the same PSI
            mine = 0 if self._earlier is None else len(self._earlier.finished)
            if r > mine:
                raise MalformedMessageError(
                    f"data holder: PSI_START.resume = {r}, but this data holder finished {mine} bucket(s) of this pair"
                )
            assert self._earlier is not None
            if k != self._earlier.k or peer.n_items != self._earlier.peer_n_items:
                raise MalformedMessageError(
                    f"data holder: PSI_START.resume = {r} for a PSI of {k} buckets and {peer.n_items} label holder "
                    f"IDs, but the buckets we finished are of {self._earlier.k} buckets and {self._earlier.peer_n_items} IDs"
                )
            if peer.resume_digest != self._own_chain(r):
                raise InvalidResultError(
                    f"data holder: the label holder's first {r} finished bucket(s) differ from ours "
                    "(PSI_START.resume_digest): the parties cannot resume this PSI" + _START_OVER
                )
        self._partition(r)
        return [] if self.done else self._open_next()

    def _open_next(self) -> list[Message]:
        b = self._bucket + 1
        sub = self._open_own(b)
        return [BucketStart(bucket=b, n_items=sub.n_items)]

    def _peer_buckets(self) -> tuple[int, int | None]:
        # D opens every bucket first; L may open the one D has open, once
        if self._sub is not None and not self._peer_opened:
            return self._bucket, self._bucket
        return self._bucket + 1, None

    def _on_bucket(self, msg: BucketStart) -> list[Message]:
        b, n = self._check_bucket(msg)
        self._peer_opens(n)
        return []

    def _after_sub(self) -> list[Message]:
        return []

    def receive(self, msg: Message) -> list[Message]:
        out = super().receive(msg)
        if self._sub is not None and self._sub.done:  # the results of the open bucket are in ``out``
            self._finish_bucket()
            if not self.done:
                out = out + self._open_next()
        return out


class BucketedReceiver(_BucketedParty):
    """The label holder L of a bucketed PSI: decides K, answers every bucket D opens, checks each bucket's result."""

    role = "label holder"
    exchange_cls = core.PsiReceiver

    def start(self) -> BucketedStart:
        """Our PSI_START, after the data holder's (K depends on its size and capacity)."""
        if self._started:
            raise PsiStateError("start() called twice")
        if self.k is None:
            raise PsiStateError("the label holder's start() comes after the data holder's PSI_START")
        self._started = True
        r = self.resumed_at
        return BucketedStart(n_items=self.n_items, chunk_size=self.chunk_size, buckets=self.k,
                             resume=r or None, resume_digest=self._own_chain(r) if r else None)

    def _on_start(self, msg: BucketedStart) -> list[Message]:
        peer = self._check_peer_start(msg)
        if peer.buckets is not None:
            raise MalformedMessageError("label holder: the data holder's PSI_START has buckets (the label holder decides K)")
        if self.buckets_setting != AUTO:
            k = self.buckets_setting
        else:
            total = self.n_items + peer.n_items
            k = max(choose_buckets(total, self.capacity), choose_buckets(total, peer.bucket_items))
            for whose, cap in (("this party's capacity", self.capacity),
                               ("the data holder's PSI_START.bucket_items", peer.bucket_items)):
                if cap is not None and not bucket_fits(total, k, cap):  # [P18]: refused before partitioning
                    raise LimitExceededError(
                        f"label holder: {self.n_items} + {peer.n_items} items do not fit {whose} of {cap} items "
                        f"per bucket even in {MAX_BUCKETS} buckets; raise [psi].memory_mb"
                    )
        self._peer, self.k = peer, int(k)
        r = self._resume_point(peer)
        return self._partition(r)

    def _resume_point(self, peer: BucketedStart) -> int:
        """[P20]: the bucket both parties resume at: the fewer of the buckets D says it finished and of those we
        finished, when both are of this very PSI (same K and D's set size); 0 (start over) otherwise."""
        theirs, e = peer.resume or 0, self._earlier
        if theirs > self.k:  # type: ignore[operator]
            raise LimitExceededError(f"label holder: PSI_START.resume = {theirs} is more than the {self.k} buckets")
        if not theirs or e is None or not e.finished or e.k != self.k or e.peer_n_items != peer.n_items:
            return 0
        r = min(theirs, len(e.finished))
        if r == theirs and peer.resume_digest != self._own_chain(r):
            raise InvalidResultError(
                f"label holder: the data holder's {r} finished bucket(s) differ from ours (PSI_START.resume_digest): "
                "the parties cannot resume this PSI" + _START_OVER
            )
        return r

    def _peer_buckets(self) -> tuple[int, int | None]:
        # D may open the next bucket once the open one's result is checked
        return self._bucket + 1, None if self._sub is not None else self._bucket + 1

    def _on_bucket(self, msg: BucketStart) -> list[Message]:
        if not self._started:
            raise PsiStateError("send our PSI_START before the data holder's buckets")
        b, n = self._check_bucket(msg)
        sub = self._open_own(b)
        self._peer_opens(n)
        return [BucketStart(bucket=b, n_items=sub.n_items)]

    def _after_sub(self) -> list[Message]:
        if self._sub is not None and self._sub.done:
            self._finish_bucket()
        return []


# --------------------------------------------------------------------------------------------------------- driver


def run_bucketed_in_memory(sender: BucketedSender, receiver: BucketedReceiver) -> tuple[np.ndarray, np.ndarray]:
    """Drive both sides in one process (tests, benchmarks), each side's stream interleaved with the other's, as
    two real parties run concurrently. Returns ``(sender.rows, receiver.rows)``."""
    receiver.receive(sender.start())
    to_l: list[Message] = sender.receive(receiver.start())  # D partitions and opens bucket 0
    to_d: list[Message] = []
    while to_l or to_d or sender.has_work or receiver.has_work:  # every turn moves a message or computes a chunk
        while to_l:
            to_d += receiver.receive(to_l.pop(0))
        to_l += sender.work()
        while to_d:
            to_l += sender.receive(to_d.pop(0))
        to_d += receiver.work()
    if not (sender.done and receiver.done):
        raise TruncatedStreamError("bucketed exchange did not complete")
    return sender.rows, receiver.rows
