"""Several data holders: a star of pairwise PSIs with the label holder, then one intersection and one order.

The label holder L runs one two-party exchange (:mod:`vfl.psi.exchange`) with every data holder D_1..D_m, each with
its own fresh key and nonce, and ends with, per D_i, a :class:`PairwiseResult`: its own rows shared with D_i, in the
pairwise joint order (ascending joint token ``t_i``). D_i holds its own rows of the same pairwise intersection in
the same order. Then:

1. L intersects its row sets: the final rows are L's rows present in every pairwise result.
2. The final order is the pairwise order of the first data holder D_1 (ascending ``t_1``), restricted to the final
   rows. It is deterministic, identical for everyone, and unrelated to the IDs.
3. L sends each D_i (``PSI_ROWS``, as :class:`RowsChunk` messages) the list of *positions* -- indices into D_i's
   pairwise order -- of the surviving rows, in the final order. D_i maps them to its own rows
   (:class:`FinalRowsReceiver`). Nobody learns another party's IDs or tokens.

Leakage (beyond each pairwise PSI's own): L learns every pairwise intersection (inherent in the star). Each D_i
learns the size of the final intersection and which of its rows shared with L are also shared by all the other data
holders. The final order gives D_i nothing more: it is the order of D_1's joint tokens, which D_i cannot compute
(pseudorandom under keys it does not hold); D_1 sees its positions ascending (its own token order).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..arrays import has_repeats
from .errors import (
    ChunkOrderError,
    EmptyIntersectionError,
    InvalidResultError,
    LimitExceededError,
    MalformedMessageError,
    PsiLocalError,
    PsiStateError,
)
from .exchange import DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, TOKEN_SIZE, _check_bool, _check_int

__all__ = [
    "PairwiseResult",
    "MultipartyPlan",
    "RowsChunk",
    "combine",
    "rows_chunks",
    "FinalRowsReceiver",
    "apply_positions",
]


@dataclass(frozen=True, kw_only=True, eq=False)  # arrays: compare fields explicitly
class PairwiseResult:
    """L's side of one pairwise PSI: its rows (``int64 [k]``) in pairwise order and, optionally, the tokens
    (``uint8 [k, 16]``; a bucketed PSI does not keep them: only the rows decide the combination)."""

    rows: np.ndarray
    tokens: np.ndarray | None = None

    @classmethod
    def of(cls, receiver) -> PairwiseResult:
        """From a finished :class:`~vfl.psi.exchange.PsiReceiver`."""
        return cls(rows=receiver.rows, tokens=receiver.tokens)


@dataclass(frozen=True, kw_only=True, eq=False)  # arrays: compare fields explicitly
class MultipartyPlan:
    """The outcome at L: its own final rows, and for every data holder the positions to send it, in final order."""

    label_rows: np.ndarray
    positions: tuple[np.ndarray, ...]

    def __len__(self) -> int:
        return len(self.label_rows)


@dataclass(frozen=True, kw_only=True, eq=False)  # arrays: compare fields explicitly
class RowsChunk:
    """L to one D (``PSI_ROWS``): positions into D's pairwise order, ``uint32 [k]``, in the final order."""

    chunk: int
    last: bool
    positions: np.ndarray


def _validate_result(i: int, r: PairwiseResult) -> np.ndarray:
    rows = np.asarray(r.rows)
    if rows.ndim != 1 or rows.dtype.kind not in "iu":
        raise PsiLocalError(f"result {i}: rows must be a 1-D integer array")
    tok = None if r.tokens is None else np.asarray(r.tokens)
    if tok is not None and tok.shape != (len(rows), TOKEN_SIZE):
        raise PsiLocalError(f"result {i}: tokens must have shape [{len(rows)}, {TOKEN_SIZE}]")
    rows = rows.astype(np.int64, copy=False)
    if has_repeats(rows):
        raise PsiLocalError(f"result {i}: rows repeat")
    return rows


def combine(results: Sequence[PairwiseResult], *, allow_empty: bool = True) -> MultipartyPlan:
    """Intersect L's pairwise results (one per data holder, in a fixed order: the first one fixes the final order).

    Returns L's final rows and, per data holder, the positions into its pairwise order, both in the final order.
    Raises :class:`EmptyIntersectionError` when the final intersection is empty and not ``allow_empty``.
    """
    if not results:
        raise PsiLocalError("combine() needs at least one pairwise result")
    rows_list = [_validate_result(i, r) for i, r in enumerate(results)]
    final = rows_list[0]  # in the first data holder's token order
    for rows in rows_list[1:]:
        final = final[np.isin(final, rows, assume_unique=True)]
    if len(final) == 0 and not allow_empty:
        raise EmptyIntersectionError("the intersection across all data holders is empty")
    positions = []
    for rows in rows_list:
        order = np.argsort(rows, kind="stable")
        where = order[np.searchsorted(rows, final, sorter=order)]
        positions.append(where.astype(np.uint32))
    return MultipartyPlan(label_rows=final, positions=tuple(positions))


def rows_chunks(positions: np.ndarray, chunk_size: int = DEFAULT_CHUNK_SIZE) -> list[RowsChunk]:
    """Split one data holder's positions into :class:`RowsChunk` messages (one empty chunk if there are none)."""
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk_size must be in [1, {MAX_CHUNK_SIZE}]")
    pos = np.ascontiguousarray(positions, dtype=np.uint32)
    total = max(1, -(-len(pos) // chunk_size))
    return [
        RowsChunk(chunk=c, last=c == total - 1, positions=pos[c * chunk_size : (c + 1) * chunk_size])
        for c in range(total)
    ]


def apply_positions(pairwise_rows: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """D's final rows: ``pairwise_rows[positions]`` after checking positions are in range and distinct."""
    pos = np.asarray(positions)
    n = len(pairwise_rows)
    if pos.ndim != 1 or pos.dtype.kind not in "iu":
        raise MalformedMessageError("positions must be a 1-D integer array")
    if len(pos) > n:
        raise LimitExceededError(f"{len(pos)} positions for a pairwise intersection of {n} rows")
    if len(pos) and (int(pos.max()) >= n or int(pos.min()) < 0):
        raise InvalidResultError(f"a position is outside the pairwise intersection of {n} rows")
    if has_repeats(pos):
        raise InvalidResultError("positions repeat")
    return np.asarray(pairwise_rows)[pos.astype(np.int64)]


class FinalRowsReceiver:
    """D's side of ``PSI_ROWS``: validates the chunk stream and maps positions to its own rows.

    ``pairwise_rows`` is the finished :attr:`~vfl.psi.exchange.PsiSender.rows` of D's exchange with L.
    """

    def __init__(self, pairwise_rows: np.ndarray, *, max_chunk: int = MAX_CHUNK_SIZE) -> None:
        self._pairwise = np.asarray(pairwise_rows, dtype=np.int64)
        self._max_chunk = int(max_chunk)
        self._next = 0
        self._seen = np.zeros(len(self._pairwise), dtype=bool)
        self._parts: list[np.ndarray] = []
        self._count = 0
        self._rows: np.ndarray | None = None

    @property
    def done(self) -> bool:
        return self._rows is not None

    @property
    def rows(self) -> np.ndarray:
        """D's final rows (indices into its original input), in the final order shared by every party."""
        if self._rows is None:
            raise PsiStateError("the final rows have not all arrived")
        return self._rows

    def receive(self, msg: RowsChunk) -> None:
        if not isinstance(msg, RowsChunk):
            raise MalformedMessageError(f"expected RowsChunk, got {type(msg).__name__}")
        if self._rows is not None:
            raise ChunkOrderError("RowsChunk after the last one")
        i = _check_int("RowsChunk.chunk", msg.chunk, 0, 1 << 32)
        last = _check_bool("RowsChunk.last", msg.last)
        if i != self._next:
            raise ChunkOrderError(f"expected rows chunk {self._next}, got {i}")
        pos = msg.positions
        if not isinstance(pos, np.ndarray) or pos.dtype != np.uint32 or pos.ndim != 1:
            raise MalformedMessageError(f"RowsChunk {i}: positions must be a 1-D uint32 array")
        if len(pos) > self._max_chunk:
            raise LimitExceededError(f"RowsChunk {i}: {len(pos)} positions exceed the chunk limit {self._max_chunk}")
        n = len(self._pairwise)
        if self._count + len(pos) > n:
            raise LimitExceededError(f"more final rows than the {n} rows of the pairwise intersection")
        if len(pos):
            p64 = pos.astype(np.int64)
            if int(p64.max()) >= n:
                raise InvalidResultError(f"RowsChunk {i}: position {int(p64.max())} >= {n}")
            if self._seen[p64].any() or has_repeats(p64):
                raise InvalidResultError(f"RowsChunk {i}: a position repeats")
            self._seen[p64] = True
            self._parts.append(p64)
        self._count += len(pos)
        self._next = i + 1
        if last:
            allpos = np.concatenate(self._parts) if self._parts else np.empty(0, np.int64)
            self._rows = self._pairwise[allpos]
            # the pairwise rows and the seen-mask are not needed again (a chunk after the last is refused above):
            # 9 bytes per pairwise row that a 10M-row data holder would otherwise hold through its training (new
            # empty arrays, not views: a view keeps its base)
            self._parts, self._pairwise, self._seen = [], np.empty(0, np.int64), np.empty(0, bool)
