"""Sans-I/O two-party DH-PSI (Meadows 1986; Huberman, Franklin & Hogg 1999), both parties learn the intersection.

Roles: the data holder D (:class:`PsiSender`) and the label holder L (:class:`PsiReceiver`). ``H`` is hash-to-curve
(:mod:`vfl.psi.curve`), ``^k`` the commutative X25519 cipher (:mod:`vfl.psi.cipher`), ``t(.)`` the first 16 bytes.

::

    D -> L  PsiStart {n_items = |X|, chunk_size}          L -> D  PsiStart {n_items = |Y|, chunk_size}
    D -> L  BlindedChunk i      H(x)^d, X deduped + shuffled, chunked
    L -> D  ReplyChunk i        t(H(x)^dl) for D's chunk i, in D's order
    L -> D  BlindedChunk j      H(y)^l, Y deduped + shuffled, chunked       (independent of D's stream)
    D: t(H(y)^ld) for all of L's points; intersect with the reply tokens
    D -> L  ResultChunk r       the joint tokens of the intersection in ascending order, each with its position in
                                L's stream (L cannot map a token to its own row without it: L never sees H(y)^ld)
    L: checks every token is one of the t(H(x)^dl) it computed, positions unique and in range

Both sides end with ``rows``: indices into their *original* input list, in the same order -- ascending joint token
``t(H(z)^dl)`` (pseudorandom, identical on both sides, unrelated to the IDs) -- and ``tokens``, the joint tokens.

Wire mapping (PROTOCOL.md section 10): ``PsiStart`` = ``PSI_START``; ``BlindedChunk`` = ``PSI_ITEMS`` (from D) and the
``H(y)^l`` half of ``PSI_REPLY`` (from L); ``ReplyChunk`` = the ``H(x)^dl`` half of ``PSI_REPLY``; ``ResultChunk`` =
``PSI_RESULT``. Chunks: every stream has exactly ``max(1, ceil(n / chunk_size))`` chunks numbered from 0, all full but
the last, and only the last has ``last=True`` (an empty set is one empty chunk with ``last=True``). Result chunks
hold at most the sender's ``chunk_size`` rows each.

Leakage: each side learns the intersection and the other's set size (inherent); the order of a party's stream is a
uniformly random permutation (OS CSPRNG), so positions reveal nothing about its input order. The number of
hash-to-curve tries is item-dependent but only observable locally.

Every received message is validated before use (type, state, chunk index, size, dtype, shape, canonical points, on
the main curve with ``verify_curve``, not of small order, token and position consistency, limits); a violation raises
a :class:`~vfl.psi.errors.PsiRemoteError` subclass and the session must be aborted -- never a silent wrong result.
The heavy work runs in :class:`~vfl.psi.engine.PsiEngine` synchronously inside these calls.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from ..arrays import has_repeats
from .cipher import PsiKey
from .curve import POINT_SIZE, hash_domain
from .engine import PsiEngine, check_points
from .items import ItemStore, distinct_rows, take_items
from .errors import (
    ChunkOrderError,
    DuplicateIdError,
    EmptyIntersectionError,
    InvalidIdError,
    InvalidResultError,
    LimitExceededError,
    MalformedMessageError,
    PsiStateError,
    TruncatedStreamError,
)

__all__ = [
    "TOKEN_SIZE",
    "DEFAULT_CHUNK_SIZE",
    "MAX_CHUNK_SIZE",
    "MAX_ITEMS",
    "PsiStart",
    "BlindedChunk",
    "ReplyChunk",
    "ResultChunk",
    "PsiSender",
    "PsiReceiver",
    "prepare_items",
    "secure_permutation",
    "run_in_memory",
]

TOKEN_SIZE = 16
DEFAULT_CHUNK_SIZE = 65536
MAX_CHUNK_SIZE = 1 << 20  # largest chunk we accept from a peer by default
MAX_ITEMS = (1 << 32) - 1  # positions travel as uint32


# --------------------------------------------------------------------------------------------------------- messages


@dataclass(frozen=True, kw_only=True)
class PsiStart:
    """Announces a party's (deduplicated) set size and the chunk size of the streams it sends."""

    n_items: int
    chunk_size: int


@dataclass(frozen=True, kw_only=True, eq=False)  # arrays: compare fields explicitly
class BlindedChunk:
    """``H(.)^k`` of the sender's own items, in its shuffled order: ``uint8 [n, 32]``."""

    chunk: int
    last: bool
    points: np.ndarray


@dataclass(frozen=True, kw_only=True, eq=False)  # arrays: compare fields explicitly
class ReplyChunk:
    """L's answer to D's chunk ``chunk``: ``t(H(x)^dl)`` in D's order, ``uint8 [n, 16]``."""

    chunk: int
    last: bool
    tokens: np.ndarray


@dataclass(frozen=True, kw_only=True, eq=False)  # arrays: compare fields explicitly
class ResultChunk:
    """D to L: the intersection as joint tokens (``uint8 [k, 16]``, ascending over the whole stream) and, for each,
    its position in L's blinded stream (``uint32 [k]``)."""

    chunk: int
    last: bool
    tokens: np.ndarray
    positions: np.ndarray


Message = PsiStart | BlindedChunk | ReplyChunk | ResultChunk


# ---------------------------------------------------------------------------------------------------------- helpers


def secure_permutation(n: int) -> np.ndarray:
    """A uniformly random permutation of ``range(n)`` from the OS CSPRNG (argsort of random 128-bit keys)."""
    if n <= 1:
        return np.arange(n, dtype=np.int64)
    keys = np.frombuffer(os.urandom(16 * n), dtype=np.uint64).reshape(n, 2)
    return np.lexsort((keys[:, 1], keys[:, 0])).astype(np.int64, copy=False)


def prepare_items(items: Sequence[bytes], *, dedupe: bool = False) -> np.ndarray:
    """Check the items are ``bytes`` and unique; returns the indices (into ``items``) of the distinct items.

    Duplicates raise :class:`DuplicateIdError` (count and one example) unless ``dedupe``, which keeps the first
    occurrence of every item. An :class:`~vfl.psi.items.ItemStore` (bytes by construction) is checked vectorised.
    """
    if isinstance(items, ItemStore):  # vectorised, and no dict of n Python objects
        unique_rows, repeat = distinct_rows(items)
        if repeat is not None and not dedupe:
            _raise_duplicates(len(items) - len(unique_rows), items[repeat])
        return unique_rows
    first: dict[bytes, int] = {}
    setdefault = first.setdefault
    for i, it in enumerate(items):
        if type(it) is not bytes:
            if isinstance(it, (bytes, bytearray, memoryview)):
                raise InvalidIdError(f"item {i} is {type(it).__name__}; pass bytes (see encode_ids)")
            raise InvalidIdError(f"item {i} is {type(it).__name__}, not bytes; encode IDs with encode_ids()")
        setdefault(it, i)
    n = len(items)
    if len(first) != n and not dedupe:
        seen: set[bytes] = set()
        example = None
        for it in items:
            if it in seen:
                example = it
                break
            seen.add(it)
        _raise_duplicates(n - len(first), example)
    return np.fromiter(first.values(), dtype=np.int64, count=len(first))


def _raise_duplicates(count: int, example: bytes) -> None:
    shown = example if len(example) <= 64 else example[:64] + b"..."
    raise DuplicateIdError(
        f"{count} duplicate ID{'s' if count != 1 else ''} in the input (e.g. {shown!r}); "
        "deduplicate first or pass dedupe=True",
        count=count,
        example=example,
    )


def _n_chunks(n: int, chunk_size: int) -> int:
    return max(1, -(-n // chunk_size))


def _chunk_len(n: int, chunk_size: int, i: int) -> int:
    return max(0, min(chunk_size, n - i * chunk_size))


def _keys(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Big-endian (hi, lo) uint64 keys of ``[n, 16]`` tokens: sorting by (hi, lo) is sorting the bytes."""
    be = np.ascontiguousarray(tokens).view(">u8")
    return be[:, 0].astype(np.uint64), be[:, 1].astype(np.uint64)


def _sort_order(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """Stable order by (hi, lo). Fast path: a stable sort on hi alone, which is already right unless two keys share
    hi but differ in lo (probability ~ n^2 / 2^65 for random tokens); then a full lexsort."""
    order = np.argsort(hi, kind="stable")
    if len(order) > 1:
        h = hi[order]
        tie = h[1:] == h[:-1]
        if tie.any():
            lo_s = lo[order]
            if np.any(tie & (lo_s[1:] != lo_s[:-1])):
                order = np.lexsort((lo, hi))
    return order


def _check_int(name: str, v: object, lo: int, hi: int) -> int:
    if type(v) is not int and not isinstance(v, np.integer) or isinstance(v, bool):
        raise MalformedMessageError(f"{name} must be an int, got {type(v).__name__}")
    v = int(v)  # type: ignore[arg-type]
    if not lo <= v <= hi:
        raise LimitExceededError(f"{name} = {v} outside the allowed range [{lo}, {hi}]")
    return v


def _check_bool(name: str, v: object) -> bool:
    if not isinstance(v, (bool, np.bool_)):
        raise MalformedMessageError(f"{name} must be a bool, got {type(v).__name__}")
    return bool(v)


def _check_tokens(tokens: object, what: str) -> np.ndarray:
    return check_points(tokens, width=TOKEN_SIZE, what=what)


# ------------------------------------------------------------------------------------------------------------ party


class _Party:
    """What both roles share: input preparation, key, own blinded stream, the peer's start and blinded stream.

    Arguments (both roles):

    ``items``           this party's IDs as ``bytes`` (see :func:`~vfl.psi.engine.encode_ids`); ``rows`` index it.
    ``engine``          the :class:`~vfl.psi.engine.PsiEngine` that does the crypto (may be shared by sessions).
    ``run_id, nonce``   hash-to-curve domain; both parties must use the same values (fresh nonce per session).
    ``chunk_size``      rows per chunk of the streams this party sends (announced in :class:`PsiStart`).
    ``dedupe``          drop repeated items (first occurrence wins) instead of raising :class:`DuplicateIdError`.
    ``verify_curve``    check every received point is on the main curve before exponentiating it (default on;
                        canonical form and small order are always checked).
    ``max_peer_items``  largest set size accepted from the peer; ``max_peer_chunk`` largest chunk size.
    ``key``             the secret exponent; a fresh one by default (only tests should pass one).
    """

    role = "party"

    def __init__(
        self,
        items: Sequence[bytes],
        *,
        engine: PsiEngine,
        run_id: bytes | str,
        nonce: bytes = b"",
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        dedupe: bool = False,
        verify_curve: bool = True,
        max_peer_items: int = MAX_ITEMS,
        max_peer_chunk: int = MAX_CHUNK_SIZE,
        key: PsiKey | None = None,
    ) -> None:
        if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
            raise ValueError(f"chunk_size must be in [1, {MAX_CHUNK_SIZE}]")
        self.engine = engine
        self.domain = hash_domain(run_id, nonce)
        self.chunk_size = int(chunk_size)
        self.verify_curve = bool(verify_curve)
        self.max_peer_items = min(int(max_peer_items), MAX_ITEMS)
        self.max_peer_chunk = int(max_peer_chunk)
        self._key = key or PsiKey.generate()

        unique_rows = prepare_items(items, dedupe=dedupe)
        if len(unique_rows) > MAX_ITEMS:
            raise ValueError(f"at most {MAX_ITEMS} items")
        perm = secure_permutation(len(unique_rows))
        #: stream position -> row index in the caller's original input
        self._stream_rows = unique_rows[perm]
        self._stream_items = take_items(items, self._stream_rows)  # compact when ``items`` is an ItemStore
        self.n_items = len(self._stream_rows)

        self._started = False
        self._sent_chunks = 0  # own blinded chunks produced so far
        self._iterating = False
        self._peer: PsiStart | None = None
        self._peer_next = 0  # next expected peer blinded chunk
        self._peer_done = False
        self._rows: np.ndarray | None = None
        self._tokens: np.ndarray | None = None
        self._setup()

    def _setup(self) -> None:
        """Role-specific state."""

    # ----------------------------------------------------------------------------------------------------- API

    def start(self) -> PsiStart:
        """The first message to send."""
        if self._started:
            raise PsiStateError("start() called twice")
        self._started = True
        return PsiStart(n_items=self.n_items, chunk_size=self.chunk_size)

    def blinded_chunks(self) -> Iterator[BlindedChunk]:
        """Our own ``H(item)^k`` stream, computed on the engine while it is consumed (call once, after start())."""
        if not self._started:
            raise PsiStateError("call start() before blinded_chunks()")
        if self._iterating:
            raise PsiStateError("blinded_chunks() can be iterated only once")
        self._iterating = True
        return self._blinded_gen()

    def _blinded_gen(self) -> Iterator[BlindedChunk]:
        total = _n_chunks(self.n_items, self.chunk_size)
        if self.n_items == 0:
            self._sent_chunks = 1
            yield BlindedChunk(chunk=0, last=True, points=np.empty((0, POINT_SIZE), dtype=np.uint8))
            return
        it = self.engine.iter_hash_encrypt(self._stream_items, self._key, self.domain, self.chunk_size)
        for i, pts in enumerate(it):
            self._sent_chunks = i + 1
            yield BlindedChunk(chunk=i, last=i == total - 1, points=pts)

    @property
    def done(self) -> bool:
        """True once this side knows the intersection."""
        return self._rows is not None

    @property
    def rows(self) -> np.ndarray:
        """Indices into the original input of the intersection, in the joint order (ascending token). ``int64``."""
        if self._rows is None:
            raise PsiStateError("the exchange has not finished")
        return self._rows

    @property
    def tokens(self) -> np.ndarray:
        """The joint tokens ``uint8 [k, 16]`` of :attr:`rows`, ascending."""
        if self._tokens is None:
            raise PsiStateError("the exchange has not finished")
        return self._tokens

    @property
    def peer_n_items(self) -> int | None:
        return None if self._peer is None else self._peer.n_items

    def require_nonempty(self) -> None:
        """Raise :class:`EmptyIntersectionError` if the finished intersection is empty."""
        if len(self.rows) == 0:
            raise EmptyIntersectionError("the private set intersection is empty")

    def receive(self, msg: Message) -> list[Message]:
        """Feed one message from the peer; returns the messages to send in response (possibly none)."""
        if isinstance(msg, PsiStart):
            self._on_start(msg)
            return []
        if isinstance(msg, BlindedChunk):
            i, last, pts = self._accept_peer_chunk(msg)
            enc = self.engine.encrypt(pts, self._key, check_curve=self.verify_curve)  # raises on a bad point
            self._peer_next = i + 1
            self._peer_done = last
            return self._on_peer_encrypted(i, last, enc)
        return self._on_other(msg)

    # --------------------------------------------------------------------------------------------- internals

    def _on_start(self, msg: PsiStart) -> None:
        if self._peer is not None:
            raise MalformedMessageError(f"{self.role}: second PsiStart")
        n = _check_int("PsiStart.n_items", msg.n_items, 0, self.max_peer_items)
        c = _check_int("PsiStart.chunk_size", msg.chunk_size, 1, self.max_peer_chunk)
        self._peer = PsiStart(n_items=n, chunk_size=c)

    def _require_peer(self, what: str) -> PsiStart:
        if self._peer is None:
            raise MalformedMessageError(f"{self.role}: {what} before the peer's PsiStart")
        return self._peer

    def _accept_peer_chunk(self, msg: BlindedChunk) -> tuple[int, bool, np.ndarray]:
        """Validate everything but curve membership (the engine checks that while encrypting); no state change."""
        peer = self._require_peer("BlindedChunk")
        if self._peer_done:
            raise ChunkOrderError(f"{self.role}: BlindedChunk after the peer's last chunk")
        i = _check_int("BlindedChunk.chunk", msg.chunk, 0, MAX_ITEMS)
        last = _check_bool("BlindedChunk.last", msg.last)
        if i != self._peer_next:
            raise ChunkOrderError(f"{self.role}: expected peer chunk {self._peer_next}, got {i} (missing or reordered)")
        total = _n_chunks(peer.n_items, peer.chunk_size)
        want = _chunk_len(peer.n_items, peer.chunk_size, i)
        pts = check_points(msg.points, what=f"BlindedChunk {i}")
        if last and i < total - 1:
            raise TruncatedStreamError(f"{self.role}: peer stream ended at chunk {i} but {total} chunks were announced")
        if len(pts) != want:
            err = TruncatedStreamError if last and len(pts) < want else ChunkOrderError
            raise err(f"{self.role}: peer chunk {i} has {len(pts)} points, expected {want}")
        if last != (i == total - 1):
            raise ChunkOrderError(f"{self.role}: peer chunk {i} is the final one but is not marked last")
        return i, last, pts

    def _on_peer_encrypted(self, i: int, last: bool, enc: np.ndarray) -> list[Message]:
        raise NotImplementedError

    def _on_other(self, msg: object) -> list[Message]:
        raise MalformedMessageError(f"{self.role}: unexpected message {type(msg).__name__}")


# ------------------------------------------------------------------------------------------------------- data holder


class PsiSender(_Party):
    """The data holder D: sends ``H(x)^d``, receives ``t(H(x)^dl)`` and ``H(y)^l``, computes and sends the result.

    ``receive`` returns the :class:`ResultChunk` list exactly once, when both of L's streams are complete.
    """

    role = "data holder"

    def _setup(self) -> None:
        self._reply_tokens = np.empty((self.n_items, TOKEN_SIZE), dtype=np.uint8)  # t(H(x)^dl), our order
        self._reply_next = 0
        self._reply_done = False
        self._peer_parts: list[np.ndarray] = []  # t(H(y)^ld), L's order; grows with what arrives, not what is announced

    def _on_peer_encrypted(self, i: int, last: bool, enc: np.ndarray) -> list[Message]:
        self._peer_parts.append(np.ascontiguousarray(enc[:, :TOKEN_SIZE]))
        return self._maybe_finish()

    def _on_other(self, msg: object) -> list[Message]:
        if not isinstance(msg, ReplyChunk):
            return super()._on_other(msg)
        self._require_peer("ReplyChunk")
        if self._reply_done:
            raise ChunkOrderError("data holder: ReplyChunk after the last reply")
        i = _check_int("ReplyChunk.chunk", msg.chunk, 0, MAX_ITEMS)
        last = _check_bool("ReplyChunk.last", msg.last)
        if i != self._reply_next:
            raise ChunkOrderError(f"data holder: expected reply {self._reply_next}, got {i} (missing or reordered)")
        if i >= self._sent_chunks:
            raise ChunkOrderError(f"data holder: reply to chunk {i}, which was not sent yet")
        total = _n_chunks(self.n_items, self.chunk_size)
        want = _chunk_len(self.n_items, self.chunk_size, i)
        tok = _check_tokens(msg.tokens, f"ReplyChunk {i}")
        if last and i < total - 1:
            raise TruncatedStreamError(f"data holder: replies ended at {i} but {total} chunks were sent")
        if len(tok) != want:
            err = TruncatedStreamError if last and len(tok) < want else ChunkOrderError
            raise err(f"data holder: reply {i} has {len(tok)} tokens, expected {want}")
        if last != (i == total - 1):
            raise ChunkOrderError(f"data holder: reply {i} is the final one but is not marked last")
        lo = i * self.chunk_size
        self._reply_tokens[lo : lo + want] = tok
        self._reply_next = i + 1
        self._reply_done = last
        return self._maybe_finish()

    def _maybe_finish(self) -> list[Message]:
        if not (self._reply_done and self._peer_done) or self._rows is not None:
            return []
        # every intermediate is dropped as soon as it is used: this is the bucket's peak (about 40 bytes an item less)
        peer_tokens = np.concatenate(self._peer_parts) if self._peer_parts else np.empty((0, TOKEN_SIZE), np.uint8)
        self._peer_parts = []
        mine_hi, mine_lo = _keys(self._reply_tokens)
        peer_hi, peer_lo = _keys(peer_tokens)
        del peer_tokens
        n = self.n_items
        hi = np.concatenate([mine_hi, peer_hi])
        del mine_hi, peer_hi
        lo = np.concatenate([mine_lo, peer_lo])
        del mine_lo, peer_lo
        order = _sort_order(hi, lo)
        hs, ls = hi[order], lo[order]
        del hi, lo
        eq = np.flatnonzero((hs[1:] == hs[:-1]) & (ls[1:] == ls[:-1]))
        del hs, ls
        a, b = order[eq], order[eq + 1]  # a < b (stable sort: our tokens come first among equals)
        if np.any(b < n):
            raise InvalidResultError("data holder: the label holder's replies contain a repeated token")
        if np.any(a >= n):
            raise InvalidResultError("data holder: the label holder sent the same point twice")
        mine_pos, peer_pos = a, b - n
        self._rows = self._stream_rows[mine_pos]
        self._tokens = self._reply_tokens[mine_pos]
        positions = peer_pos.astype(np.uint32)
        out: list[Message] = []
        k = len(mine_pos)
        c = self.chunk_size
        total = _n_chunks(k, c)
        for r in range(total):
            s = slice(r * c, min((r + 1) * c, k))
            out.append(
                ResultChunk(
                    chunk=r,
                    last=r == total - 1,
                    tokens=np.ascontiguousarray(self._tokens[s]),
                    positions=np.ascontiguousarray(positions[s]),
                )
            )
        # free what is no longer needed
        self._reply_tokens = self._reply_tokens[:0]
        self._peer_parts = []
        self._stream_items = []
        return out


# ------------------------------------------------------------------------------------------------------ label holder


class PsiReceiver(_Party):
    """The label holder L: answers D's chunks with ``t(H(x)^dl)``, sends ``H(y)^l``, receives the result.

    ``receive(BlindedChunk)`` returns the matching :class:`ReplyChunk`; the exchange is done after the last
    :class:`ResultChunk` has been received and checked.
    """

    role = "label holder"

    def _setup(self) -> None:
        self._their_parts: list[np.ndarray] = []  # t(H(x)^dl) we computed, D's order
        self._result_next = 0
        self._res_tokens: list[np.ndarray] = []
        self._res_pos: list[np.ndarray] = []
        self._res_count = 0
        self._res_last_token: bytes | None = None

    def _on_peer_encrypted(self, i: int, last: bool, enc: np.ndarray) -> list[Message]:
        tok = np.ascontiguousarray(enc[:, :TOKEN_SIZE])
        self._their_parts.append(tok)
        return [ReplyChunk(chunk=i, last=last, tokens=tok)]

    def _on_other(self, msg: object) -> list[Message]:
        if not isinstance(msg, ResultChunk):
            return super()._on_other(msg)
        peer = self._require_peer("ResultChunk")
        if self._rows is not None:
            raise ChunkOrderError("label holder: ResultChunk after the last result chunk")
        if not self._peer_done:
            raise ChunkOrderError("label holder: ResultChunk before all of the data holder's points were answered")
        i = _check_int("ResultChunk.chunk", msg.chunk, 0, MAX_ITEMS)
        last = _check_bool("ResultChunk.last", msg.last)
        if i != self._result_next:
            raise ChunkOrderError(f"label holder: expected result chunk {self._result_next}, got {i}")
        tok = _check_tokens(msg.tokens, f"ResultChunk {i}")
        pos = msg.positions
        if not isinstance(pos, np.ndarray) or pos.dtype != np.uint32 or pos.ndim != 1:
            raise MalformedMessageError(f"ResultChunk {i}: positions must be a 1-D uint32 array")
        if len(pos) != len(tok):
            raise MalformedMessageError(f"ResultChunk {i}: {len(tok)} tokens but {len(pos)} positions")
        k = len(tok)
        if k > peer.chunk_size:
            raise ChunkOrderError(f"ResultChunk {i}: {k} rows exceed the data holder's chunk size {peer.chunk_size}")
        bound = min(peer.n_items, self.n_items)
        if self._res_count + k > bound:
            raise LimitExceededError(f"result has more than min(|X|, |Y|) = {bound} rows")
        if k and int(pos.max()) >= self.n_items:
            raise InvalidResultError(f"ResultChunk {i}: position {int(pos.max())} >= our set size {self.n_items}")
        if k:
            # strictly ascending tokens across the whole stream: sorted, hence also no repeats
            hi, lo = _keys(tok)
            asc = (hi[1:] > hi[:-1]) | ((hi[1:] == hi[:-1]) & (lo[1:] > lo[:-1]))
            if not asc.all() or (self._res_last_token is not None and bytes(tok[0]) <= self._res_last_token):
                raise InvalidResultError(f"ResultChunk {i}: tokens are not strictly ascending")
            self._res_last_token = bytes(tok[-1])
        self._res_tokens.append(np.array(tok, copy=True))
        self._res_pos.append(np.array(pos, dtype=np.int64))
        self._res_count += k
        self._result_next = i + 1
        if last:
            self._finish()
        return []

    def _finish(self) -> None:
        tokens = np.concatenate(self._res_tokens) if self._res_tokens else np.empty((0, TOKEN_SIZE), np.uint8)
        pos = np.concatenate(self._res_pos) if self._res_pos else np.empty(0, np.int64)
        if has_repeats(pos):
            raise InvalidResultError("result names one of our rows twice")
        # every result token must be one we computed for the data holder: t(H(x)^dl)
        theirs = np.concatenate(self._their_parts) if self._their_parts else np.empty((0, TOKEN_SIZE), np.uint8)
        self._their_parts = []  # intermediates go as soon as they are used, as at the data holder
        th, tl = _keys(theirs)
        del theirs
        rh, rl = _keys(tokens)
        n = len(th)
        hi = np.concatenate([th, rh])
        del th, rh
        lo = np.concatenate([tl, rl])
        del tl, rl
        order = _sort_order(hi, lo)
        hs, ls = hi[order], lo[order]
        del hi, lo
        eq = (hs[1:] == hs[:-1]) & (ls[1:] == ls[:-1])
        del hs, ls
        matched = np.zeros(len(order), dtype=bool)
        b = order[np.flatnonzero(eq) + 1]  # the later of each equal pair; ours come first among equals
        if np.any(b < n):
            raise InvalidResultError("label holder: the data holder's points gave a repeated token")
        matched[b] = True
        if not matched[n:].all():
            raise InvalidResultError("result contains a token that matches none of the data holder's points")
        self._rows = self._stream_rows[pos]
        self._tokens = tokens
        self._res_tokens, self._res_pos = [], []
        self._their_parts = []
        self._stream_items = []


# --------------------------------------------------------------------------------------------------------- driver


def run_in_memory(sender: PsiSender, receiver: PsiReceiver) -> tuple[np.ndarray, np.ndarray]:
    """Drive both sides in one process (tests, benchmarks). Returns ``(sender.rows, receiver.rows)``.

    The two blinded streams are interleaved chunk by chunk, as two real parties would run concurrently, so that a
    shared engine always has work queued.
    """
    receiver.receive(sender.start())
    sender.receive(receiver.start())
    results: list[Message] = []
    d_iter: Iterator[BlindedChunk] | None = sender.blinded_chunks()
    l_iter: Iterator[BlindedChunk] | None = receiver.blinded_chunks()
    while d_iter is not None or l_iter is not None:
        if d_iter is not None:
            chunk = next(d_iter, None)
            if chunk is None:
                d_iter = None
            else:
                for reply in receiver.receive(chunk):
                    results += sender.receive(reply)
        if l_iter is not None:
            chunk = next(l_iter, None)
            if chunk is None:
                l_iter = None
            else:
                results += sender.receive(chunk)
    for res in results:
        receiver.receive(res)
    if not (sender.done and receiver.done):
        raise TruncatedStreamError("exchange did not complete")
    return sender.rows, receiver.rows
