"""A compact, read-only sequence of PSI items: one ``uint8`` blob and ``int64`` offsets instead of a list of ``bytes``.

Why: a list holds every item as a Python object (about 56 bytes for a 13-byte item, plus its 8-byte slot), so a party
with 10M IDs spent more than half a gigabyte on the list alone, and as much again on the native IDs beside it. An
:class:`ItemStore` holds the same items in ``len(item) + 8`` bytes each, and the whole-set operations the PSI needs
(the duplicate check, gathering a bucket's items, slicing a task's worth) are vectorised here (Arrow kernels, numpy).

It *is* a ``Sequence[bytes]``: ``store[i]`` is the item's ``bytes``, and ``store[a:b]`` a list of ``bytes`` (what the
engine hands a worker), so every consumer of a list of items takes a store as it is. Item ``i`` is
``blob[offsets[i]:offsets[i + 1]]``. Nothing here does I/O; pyarrow is imported on first use only, so the engine's
worker processes, which import :mod:`vfl.psi`, never load it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, overload

import numpy as np

__all__ = ["ItemStore", "take_items", "distinct_rows", "encode_id_array", "decode_ids", "fingerprints", "release_arrow_memory"]

_PREFIX = {"int": "i:", "str": "s:"}  # encode_ids' canonical encoding


class ItemStore(Sequence[bytes]):
    """``n`` items: ``blob`` (``uint8``) and ``offsets`` (``int64 [n + 1]``, from 0, non-decreasing)."""

    __slots__ = ("blob", "offsets")

    def __init__(self, blob: np.ndarray, offsets: np.ndarray) -> None:
        blob = np.asarray(blob, dtype=np.uint8).reshape(-1)
        offsets = np.asarray(offsets, dtype=np.int64).reshape(-1)
        if len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(blob) or np.any(np.diff(offsets) < 0):
            raise ValueError("offsets must start at 0, end at len(blob) and never decrease")
        self.blob = blob
        self.offsets = offsets

    # ------------------------------------------------------------------------------------------------ building

    @classmethod
    def from_items(cls, items: Sequence[bytes]) -> ItemStore:
        """The store of a list of ``bytes`` (or a store: returned as it is)."""
        if isinstance(items, ItemStore):
            return items
        offsets = np.zeros(len(items) + 1, dtype=np.int64)
        if len(items):
            np.cumsum(np.fromiter(map(len, items), dtype=np.int64, count=len(items)), out=offsets[1:])
        return cls(np.frombuffer(b"".join(items), dtype=np.uint8), offsets)

    @classmethod
    def from_arrow(cls, array: Any) -> ItemStore:
        """The store of a pyarrow binary/string array (chunked or not), without nulls; zero-copy where Arrow allows."""
        import pyarrow as pa

        if isinstance(array, pa.ChunkedArray):
            array = array.combine_chunks() if array.num_chunks != 1 else array.chunk(0)
        if array.null_count:
            raise ValueError("an item array has no nulls")
        if not pa.types.is_large_binary(array.type):
            array = array.cast(pa.large_binary())
        n = len(array)
        _, off_buf, data_buf = array.buffers()
        if off_buf is None:  # an empty array may come without buffers
            return cls(np.empty(0, np.uint8), np.zeros(1, np.int64))
        off = np.frombuffer(off_buf, dtype=np.int64)[array.offset : array.offset + n + 1]
        data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.empty(0, np.uint8)
        return cls(data[off[0] : off[-1]], off - off[0])

    def to_arrow(self) -> Any:
        """The items as a ``pa.large_binary()`` array over the same memory (zero-copy)."""
        import pyarrow as pa

        return pa.Array.from_buffers(pa.large_binary(), len(self),
                                     [None, pa.py_buffer(self.offsets), pa.py_buffer(self.blob)])

    # ---------------------------------------------------------------------------------------------- sequence

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @overload
    def __getitem__(self, i: int) -> bytes: ...

    @overload
    def __getitem__(self, i: slice) -> list[bytes]: ...

    def __getitem__(self, i):
        if isinstance(i, slice):
            lo, hi, step = i.indices(len(self))
            if step != 1:
                return [self[j] for j in range(lo, hi, step)]
            if hi <= lo:
                return []
            o = self.offsets
            data = self.blob[o[lo] : o[hi]].tobytes()
            cuts = (o[lo : hi + 1] - o[lo]).tolist()
            return [data[cuts[j] : cuts[j + 1]] for j in range(hi - lo)]
        n = len(self)
        j = int(i)  # numpy integers too
        if j < 0:
            j += n
        if not 0 <= j < n:
            raise IndexError("item index out of range")
        return self.blob[self.offsets[j] : self.offsets[j + 1]].tobytes()

    def __iter__(self):
        step = 1 << 16  # a slice of Python objects at a time, never the whole set
        for lo in range(0, len(self), step):
            yield from self[lo : lo + step]

    def __eq__(self, other: object) -> bool:
        """Equal to any sequence of the same ``bytes`` in the same order (a list of items, another store)."""
        if isinstance(other, ItemStore):
            return np.array_equal(self.offsets, other.offsets) and np.array_equal(self.blob, other.blob)
        if isinstance(other, (list, tuple)):
            return len(other) == len(self) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable buffers: not hashable, as a list is not

    def __repr__(self) -> str:
        return f"ItemStore({len(self)} items, {self.nbytes} bytes)"

    def take(self, rows: np.ndarray | Sequence[int]) -> ItemStore:
        """The items at ``rows`` (``int`` indices), in that order, as a new store (one Arrow gather)."""
        import pyarrow as pa

        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return ItemStore(np.empty(0, np.uint8), np.zeros(1, np.int64))
        if rows.min() < 0 or rows.max() >= len(self):
            raise IndexError("item index out of range")
        return ItemStore.from_arrow(self.to_arrow().take(pa.array(rows)))

    @property
    def nbytes(self) -> int:
        return int(self.blob.nbytes + self.offsets.nbytes)


def take_items(items: Sequence[bytes], rows: np.ndarray) -> Sequence[bytes]:
    """``[items[r] for r in rows]``, compact (an :class:`ItemStore`) when ``items`` is one."""
    if isinstance(items, ItemStore):
        return items.take(rows)
    return [items[r] for r in np.asarray(rows).tolist()]


def distinct_rows(items: ItemStore, *, fingerprint=None) -> tuple[np.ndarray, int | None]:
    """The indices of the first occurrence of every distinct item, ascending (``int64``), and the index of the first
    item that repeats an earlier one (None: no repeats).

    Exact, and lean: the items are sorted by a 64-bit fingerprint (:func:`fingerprints`; about 25 bytes an item
    while this runs, where a hash table of the items, Arrow's ``dictionary_encode``, took about 90 at 10M), and only
    the items whose fingerprint another item shares are compared byte by byte: the true repeats, and the rare
    collision, which is then no repeat. ``fingerprint``: another function of the store to uint64 (tests force
    collisions with it)."""
    n = len(items)
    if n == 0:
        return np.empty(0, np.int64), None
    fp = (fingerprint or fingerprints)(items)
    order = np.argsort(fp, kind="stable")  # equal fingerprints keep their input order
    fp = fp[order]
    same = np.flatnonzero(fp[1:] == fp[:-1])
    if len(same) == 0:
        return np.arange(n, dtype=np.int64), None
    members = np.union1d(same, same + 1)  # sorted positions of every item sharing its fingerprint
    repeated = np.zeros(n, dtype=bool)
    for group in np.split(members, np.flatnonzero(fp[members][1:] != fp[members][:-1]) + 1):
        seen: set[bytes] = set()
        for r in order[group].tolist():  # ascending input index: the first of equal items is kept
            it = items[r]
            if it in seen:
                repeated[r] = True
            else:
                seen.add(it)
    if not repeated.any():
        return np.arange(n, dtype=np.int64), None
    return np.flatnonzero(~repeated).astype(np.int64), int(np.argmax(repeated))


_FNV_OFFSET, _FNV_PRIME = np.uint64(0xCBF29CE484222325), np.uint64(0x100000001B3)
_VECTOR_BYTES = 64  # items up to this long are fingerprinted a byte column at a time; longer ones one by one
_BLOCK = 1 << 16


def fingerprints(items: ItemStore) -> np.ndarray:
    """A 64-bit fingerprint of every item (``uint64``): FNV-1a of its bytes, then its length mixed in. Not secret
    and not collision-free; :func:`distinct_rows` only uses it to find the candidates it compares exactly."""
    import hashlib

    n = len(items)
    out = np.empty(n, dtype=np.uint64)
    blob, offsets = items.blob, items.offsets
    last = max(0, len(blob) - 1)
    with np.errstate(over="ignore"):
        for lo in range(0, n, _BLOCK):
            hi = min(n, lo + _BLOCK)
            starts = offsets[lo:hi]
            lengths = offsets[lo + 1 : hi + 1] - starts
            h = np.full(hi - lo, _FNV_OFFSET, dtype=np.uint64)
            for j in range(int(min(_VECTOR_BYTES, lengths.max(initial=0)))):
                byte = blob[np.minimum(starts + j, last)].astype(np.uint64) if len(blob) else np.zeros(hi - lo, np.uint64)
                h = np.where(lengths > j, (h ^ byte) * _FNV_PRIME, h)
            h ^= lengths.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
            for i in np.flatnonzero(lengths > _VECTOR_BYTES).tolist():
                digest = hashlib.blake2b(items[lo + i], digest_size=8).digest()
                h[i] = np.frombuffer(digest, dtype="<u8")[0]
            out[lo:hi] = h
    return out


def encode_id_array(array: Any, kind: str) -> ItemStore:
    """:func:`~vfl.psi.engine.encode_ids` of a pyarrow ID array, vectorised: ``kind`` ``"str"`` (text: ``b"s:" +``
    its UTF-8) or ``"int"`` (integers, or their canonical decimal text: ``b"i:" +`` the decimal)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if kind not in _PREFIX:
        raise ValueError(f"kind must be 'int' or 'str', got {kind!r}")
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks() if array.num_chunks != 1 else array.chunk(0)
    if not (pa.types.is_string(array.type) or pa.types.is_large_string(array.type)):
        array = pc.cast(array, pa.string())  # integers: the decimal, as b"i:%d"
    prefix, empty = pa.scalar(_PREFIX[kind]), pa.scalar("")
    n = len(array)
    offsets = np.zeros(n + 1, dtype=np.int64)
    blob = np.empty(int(pc.sum(pc.binary_length(array)).as_py() or 0) + 2 * n, dtype=np.uint8)
    at = 0
    for lo in range(0, n, _BLOCK):  # a block at a time into place: the set is never held twice over (Arrow's, ours)
        part = ItemStore.from_arrow(pc.binary_join_element_wise(prefix, array.slice(lo, _BLOCK), empty))
        blob[at : at + len(part.blob)] = part.blob
        offsets[lo + 1 : lo + len(part) + 1] = part.offsets[1:] + at
        at += len(part.blob)
    return ItemStore(blob, offsets)


def decode_ids(items: ItemStore) -> Any:
    """The native IDs of items made by :func:`encode_id_array` (all of one kind) as a pyarrow array: ``int64`` for
    ``b"i:"`` items, ``string`` for ``b"s:"`` ones. Raises ValueError for a mix, another prefix, or an integer outside
    int64 (the caller decides what to do then)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    n = len(items)
    if n == 0:
        return pa.array([], type=pa.string())
    starts = items.offsets[:-1]
    lengths = items.offsets[1:] - starts
    if np.any(lengths < 2):
        raise ValueError("an item is shorter than its prefix")
    first, second = items.blob[starts], items.blob[starts + 1]
    if np.any(second != ord(":")) or np.any(first != first[0]) or first[0] not in (ord("i"), ord("s")):
        raise ValueError("the items are not all of one kind")
    text = pc.binary_slice(items.to_arrow(), 2, int(lengths.max())).cast(pa.large_string())
    if first[0] == ord("s"):
        return text.cast(pa.string())
    try:
        return pc.cast(text, pa.int64())
    except pa.ArrowInvalid as exc:
        raise ValueError(f"integer IDs outside int64: {exc}") from None


def release_arrow_memory() -> None:
    """Hand what Arrow's pool (mimalloc/jemalloc) has freed back to the OS: it keeps freed pages otherwise, and a
    whole-set kernel (the duplicate check's hash table) frees about 100 MiB per million items at once."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()
