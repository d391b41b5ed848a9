"""The table formats: per-format column access behind :func:`open_columns`, used by :func:`vfl.train.data.load_table`.

Three formats, picked by the file name: CSV (``.csv``, also ``.csv.gz``/``.csv.bz2``/...) and Parquet (``.parquet``,
``.pq``) through pyarrow, and ``.npz`` (one 1-D array per column, named by the column; loaded with
``allow_pickle=False``). Each reader gives the column names, checks and loads the wanted columns, returns the IDs and
the labels, and fills the float32 feature matrix in place a block of rows at a time (CSV, Parquet; each block
reported as done, so a caller filling a file can let go of it) or a few columns at a time (.npz, and the general
path any unusual value falls back to). The rules
for IDs, features and labels are those of :mod:`vfl.train.data`; every problem raises :class:`DataError`, whose
``str()`` is one line naming the file.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from ..errors import SetupError

__all__ = ["DataError", "open_columns", "short_repr"]

_CSV_SUFFIXES = (".csv", ".csv.gz", ".csv.bz2", ".csv.zst", ".csv.lz4")
_PARQUET_SUFFIXES = (".parquet", ".pq")
_NPZ_SUFFIXES = (".npz",)
_CANONICAL_INT = re.compile(r"-?(0|[1-9][0-9]*)")
_CANONICAL_INT_ANCHORED = r"^-?(0|[1-9][0-9]*)$"  # the same, for Arrow's regex kernels (RE2, whole value)


class DataError(SetupError):
    """A party's table cannot be used as configured. ``str()`` is a single line that names the file."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def short_repr(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _parse_number(text: str) -> float | None:
    """Strict number parsing for text cells: what ``float()`` accepts, minus whitespace and ``_`` separators."""
    if not text or text != text.strip() or "_" in text:
        return None
    try:
        return float(text)
    except ValueError:
        return None


_SLICE = 1 << 16  # rows converted per step: bounds the float64 / mask temporaries whatever the chunk size
_GROUP_COLUMNS = 16  # feature columns read and converted together: 16 float32 are one cache line of a matrix row
_GROUP_BYTES = 32 << 20  # ... unless 16 columns of source data would be more than this (then fewer)
_TILE_ROWS = 8192  # rows per tile when interleaving a group's columns into the row-major matrix


class _Columns:
    """Per-format column access. ``names`` is known after construction, ``load`` checks/prepares the wanted columns
    (and sets ``n_rows``), ``fill_features`` fills the float32 matrix in place; ``close`` lets go of the file."""

    path: Path
    names: list[str]
    n_rows: int

    def load(self, wanted: list[str], features: list[str]) -> None: ...

    def close(self) -> None:
        pass

    # -- shared checks, over numpy arrays (npz) or arrow arrays (CSV, Parquet)

    def _fail(self, column: str, row0: int, what: str) -> DataError:
        return DataError(f"{self.path}: column {column!r}, row {row0 + 1}: {what}")

    # -- filling the matrix

    def fill(self, name: str, out: np.ndarray) -> None:
        """Column ``name`` -> ``out`` (a float32 column of the matrix), or the DataError naming its first bad value."""
        raise NotImplementedError

    def _group_parts(self, names: list[str]) -> list[list[np.ndarray]] | None:
        """The columns ``names`` as numeric numpy pieces in row order (no nulls, no text, no decimals), or None when
        one of them needs the general path of :meth:`fill`."""
        return None

    def _group_done(self, names: list[str]) -> None:
        pass

    def fill_features(self, names: list[str], features: np.ndarray, done: Callable[[int], None] | None = None) -> None:
        """Fill the float32 matrix ``features`` (rows x ``names``), a group of adjacent columns at a time.

        ``done(hi)``: called once rows ``[0, hi)`` are final (the readers that stream rows call it per block; this
        column-group path only at the end), so that a caller filling a file can let go of the pages written.

        Writing one column of a row-major matrix touches a cache line per row, so a group is interleaved in tiles of
        rows (fast). Any group with something unusual in it (nulls, text, decimals, NaN, infinities, float32
        overflow) is done again column by column through :meth:`fill`, whose checks raise the first bad value in
        column order, exactly as a column-by-column load would.
        """
        n = features.shape[0]
        k = max(1, min(_GROUP_COLUMNS, _GROUP_BYTES // max(1, n * 4)))
        for g0 in range(0, len(names), k):
            group = names[g0:g0 + k]
            block = features[:, g0:g0 + len(group)]
            parts = self._group_parts(group)
            ok = parts is not None and self._fill_tiles(parts, block)
            del parts
            if not ok:
                for j, name in enumerate(group):
                    self.fill(name, block[:, j])
            self._group_done(group)
        if done is not None:
            done(n)

    @staticmethod
    def _fill_tiles(parts: list[list[np.ndarray]], block: np.ndarray) -> bool:
        """Interleave the columns' pieces into ``block``; False when a value is NaN, infinite or overflows float32."""
        lengths = [[len(p) for p in col] for col in parts]
        if any(ls != lengths[0] for ls in lengths):  # pieces not aligned across columns: one piece per column
            parts = [[np.concatenate(col)] if len(col) > 1 else col for col in parts]
            lengths = [[len(p) for p in col] for col in parts]
        if sum(lengths[0]) != block.shape[0]:  # pragma: no cover - every reader yields exactly n_rows values
            return False
        base = 0
        with np.errstate(over="ignore", invalid="ignore"):
            for i, length in enumerate(lengths[0]):
                for lo in range(0, length, _TILE_ROWS):
                    hi = min(length, lo + _TILE_ROWS)
                    tile = block[base + lo:base + hi]
                    for j, col in enumerate(parts):
                        src = col[i][lo:hi]
                        if src.dtype.kind in "iu" and src.dtype.itemsize > 4:
                            src = src.astype(np.float64)  # as the column-by-column path: through float64
                        tile[:, j] = src
                    if not np.isfinite(tile).all():
                        return False
                base += length
        return True

    def _fill_numbers(self, column: str, parts: Iterable[np.ndarray], out: np.ndarray) -> None:
        """Numeric numpy pieces (no nulls; in row order, together ``len(out)`` values) -> ``out`` (float32, may be
        strided), rejecting NaN, infinities and float32 overflow.

        The first NaN in the column wins over any infinity (as when the whole column was checked at once); booleans,
        small integers, float16 and float32 convert straight to float32, 64-bit integers, float64 (and anything else)
        through float64 in slices of ``_SLICE`` rows.
        """
        bad: tuple[int, float] | None = None  # first non-finite value: reported once the column has no NaN
        lo = 0
        for part in parts:
            for s in range(0, len(part), _SLICE):
                src = part[s:s + _SLICE]
                dst = out[lo + s:lo + s + len(src)]
                kind, size = src.dtype.kind, src.dtype.itemsize
                if kind == "b" or (kind in "iu" and size <= 4):
                    dst[...] = src  # exact (or correctly rounded) in float32, as through float64
                    continue
                if kind != "f" or size > 4:
                    src = np.asarray(src, dtype=np.float64)
                nan = np.isnan(src)
                if nan.any():
                    raise self._fail(column, lo + s + int(nan.argmax()), "NaN value")
                with np.errstate(over="ignore", invalid="ignore"):
                    dst[...] = src
                if bad is None:
                    inf = ~np.isfinite(dst)
                    if inf.any():
                        i = int(inf.argmax())
                        bad = (lo + s + i, float(src[i]))
            lo += len(part)
        if lo != len(out):  # pragma: no cover - every reader yields exactly n_rows values
            raise DataError(f"{self.path}: column {column!r} has {lo} values, expected {len(out)}")
        if bad is not None:
            raise self._fail(column, bad[0], f"non-finite value {short_repr(bad[1])} "
                                             "(infinite or outside the float32 range)")

    def _from_text(self, column: str, values: list) -> np.ndarray:
        out = np.empty(len(values), dtype=np.float64)
        for i, v in enumerate(values):
            if v is None or v == "":
                raise self._fail(column, i, "missing (empty) value")
            x = _parse_number(v)
            if x is None:
                raise self._fail(column, i, f"non-numeric value {short_repr(v)}")
            out[i] = x
        return out

    def _ids_from_list(self, column: str, values: list) -> list:
        for i, v in enumerate(values):
            if v is None or v == "":
                raise self._fail(column, i, "missing (empty) ID")
        return values


class _ArrowColumns(_Columns):
    def _raw_column(self, name: str) -> pa.ChunkedArray:
        raise NotImplementedError

    def _column(self, name: str) -> pa.ChunkedArray:
        col = self._raw_column(name)
        if pa.types.is_dictionary(col.type):
            col = col.cast(col.type.value_type)
        return col

    def _first_null(self, col: pa.ChunkedArray) -> int | None:
        if col.null_count == 0:
            return None
        return int(np.asarray(pc.is_null(col).to_numpy(zero_copy_only=False)).argmax())

    def _peek_columns(self, names: list[str]) -> list[pa.ChunkedArray]:
        return [self._raw_column(n) for n in names]

    def _group_parts(self, names: list[str]) -> list[list[np.ndarray]] | None:
        cols = self._peek_columns(names)
        for col in cols:
            t = col.type
            if col.null_count or not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)):
                return None
        # zero-copy for numbers (no nulls); booleans are bit-packed in Arrow and unpacked here
        return [[c.to_numpy(zero_copy_only=False) for c in col.chunks] for col in cols]

    def _checked_ids(self, name: str) -> pa.ChunkedArray:
        """The ID column, of integers or text and without nulls."""
        col = self._column(name)
        t = col.type
        if not (pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t)):
            raise DataError(f"{self.path}: ID column {name!r} has type {t}; IDs must be integers or text")
        i = self._first_null(col)
        if i is not None:
            raise self._fail(name, i, "missing (empty) ID")
        return col

    def ids(self, name: str) -> list:
        return self._ids_from_list(name, self._checked_ids(name).to_pylist())

    def id_array(self, name: str) -> tuple[pa.Array, str]:
        """The ID column as one Arrow array and its kind (``"int"``, ``"str"``), checked as :meth:`ids` checks it,
        without a Python object per ID."""
        col = self._checked_ids(name)
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
        if pa.types.is_integer(col.type):
            return col, "int"
        empty = pc.equal(col, "").to_numpy(zero_copy_only=False)
        if empty.any():
            raise self._fail(name, int(empty.argmax()), "missing (empty) ID")
        return col, "str"

    def fill(self, name: str, out: np.ndarray) -> None:
        col = self._column(name)
        t = col.type
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            values = self._from_text(name, col.to_pylist())
            del col
            return self._fill_numbers(name, [values], out)
        i = self._first_null(col)
        if i is not None:
            raise self._fail(name, i, "missing (empty, null or NA) value")
        if pa.types.is_null(t):  # pragma: no cover - an all-null column has nulls, caught above
            raise self._fail(name, 0, "missing value")
        if pa.types.is_decimal(t):
            parts = (pc.cast(c, pa.float64(), safe=False).to_numpy() for c in col.chunks)
        elif pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
            # zero-copy for numbers (no nulls); booleans are bit-packed in Arrow, unpacked one chunk at a time
            parts = (c.to_numpy(zero_copy_only=False) for c in col.chunks)
        else:
            first = col[0].as_py() if len(col) else None
            raise self._fail(name, 0, f"non-numeric value {short_repr(first)} (column type {t})")
        self._fill_numbers(name, parts, out)

    def labels(self, name: str) -> np.ndarray:
        col = self._column(name)
        i = self._first_null(col)
        if i is not None:
            raise self._fail(name, i, "missing (empty, null or NA) label")
        t = col.type
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            values = col.to_pylist()
            for i, v in enumerate(values):
                if v == "":
                    raise self._fail(name, i, "missing (empty) label")
            return np.array(values, dtype=object)
        if pa.types.is_integer(t):
            return col.to_numpy().astype(np.int64)
        if pa.types.is_boolean(t):
            return col.to_numpy(zero_copy_only=False).astype(bool)
        if pa.types.is_floating(t) or pa.types.is_decimal(t):
            values = pc.cast(col, pa.float64(), safe=False).to_numpy()
            bad = ~np.isfinite(values)
            if bad.any():
                raise self._fail(name, int(bad.argmax()), f"label {short_repr(float(values[bad.argmax()]))}")
            return values
        raise DataError(f"{self.path}: label column {name!r} has type {t}; labels must be numbers or text")


class _CsvColumns(_ArrowColumns):
    """CSV is row-oriented, so it is read twice, lean: first the ID (and label) column only, which gives the row
    count, then the feature columns as a stream of blocks parsed as float64 and written into the preallocated float32
    matrix, a block at a time (the same values as before: text -> float64 -> float32).

    Anything unusual in a feature column on that typed stream (a cell that is not a number, an empty/NA cell, NaN,
    an infinity, float32 overflow, booleans) makes us read the whole file the general way (types inferred per column,
    text checked cell by cell), which accepts or names the first bad value exactly as a full read always did.
    """

    _BLOCK_BYTES = 2 << 20  # CSV text per streamed block (bigger blocks: Arrow's read-ahead holds several)

    def __init__(self, path: Path, id_column: str):
        self.path = path
        self._id_column = id_column
        try:
            reader = pacsv.open_csv(path, convert_options=self._options())  # the header (and first block) only
            self.names = list(reader.schema.names)
            reader.close()
        except (pa.ArrowInvalid, pa.ArrowTypeError, OSError, ValueError) as exc:
            raise DataError(f"{path}: cannot read as CSV: {exc}") from exc
        self.n_rows = 0
        self._cols: dict[str, pa.ChunkedArray] = {}
        self._full = False

    def _options(self, types: dict | None = None, include: list[str] | None = None) -> pacsv.ConvertOptions:
        return pacsv.ConvertOptions(column_types={self._id_column: pa.string(), **(types or {})},
                                    strings_can_be_null=False, include_columns=include)

    def _read_full(self, keep: list[str]) -> None:
        """The general read: every column, types inferred over the whole file (what ``load_table`` always did)."""
        self._cols = {}
        try:
            table = pacsv.read_csv(self.path, convert_options=self._options())
        except (pa.ArrowInvalid, pa.ArrowTypeError, OSError, ValueError) as exc:
            raise DataError(f"{self.path}: cannot read as CSV: {exc}") from exc
        self._cols = {n: table.column(n) for n in keep}
        self.n_rows = table.num_rows
        self._full = True

    def load(self, wanted: list[str], features: list[str]) -> None:
        others = [n for n in dict.fromkeys(wanted) if n not in features]  # the ID and the label column
        try:
            table = pacsv.read_csv(self.path, convert_options=self._options(include=others))
        except (pa.ArrowInvalid, pa.ArrowTypeError, OSError, ValueError):
            return self._read_full(list(dict.fromkeys(wanted)))  # names the problem as it always did
        self._cols = {n: table.column(n) for n in others}
        self.n_rows = table.num_rows

    def _raw_column(self, name: str) -> pa.ChunkedArray:
        return self._cols.pop(name)

    def _peek_columns(self, names: list[str]) -> list[pa.ChunkedArray]:
        return [self._cols[n] for n in names]

    def _group_done(self, names: list[str]) -> None:
        for n in names:  # a used column is dropped at once
            self._cols.pop(n, None)

    def _stream_features(self, names: list[str], features: np.ndarray, done: Callable[[int], None] | None) -> bool:
        """Typed stream of the feature columns into ``features``; False when the general read must decide."""
        try:
            reader = pacsv.open_csv(self.path, read_options=pacsv.ReadOptions(block_size=self._BLOCK_BYTES),
                                    convert_options=self._options({n: pa.float64() for n in names}, names))
            lo = 0
            with reader:
                for batch in reader:
                    hi = lo + batch.num_rows
                    if hi > features.shape[0]:
                        return False
                    cols = [batch.column(n) for n in names]
                    if any(c.null_count for c in cols):
                        return False
                    if not self._fill_tiles([[c.to_numpy()] for c in cols], features[lo:hi]):
                        return False
                    lo = hi
                    if done is not None:
                        done(hi)
            return lo == features.shape[0]
        except (pa.ArrowInvalid, pa.ArrowTypeError, OSError, ValueError, KeyError):
            return False

    def fill_features(self, names: list[str], features: np.ndarray, done: Callable[[int], None] | None = None) -> None:
        if not names:
            return
        if not self._full and self._stream_features(names, features, done):
            return
        pa.default_memory_pool().release_unused()
        if not self._full:
            self._read_full([*self._cols, *names])
        super().fill_features(names, features, done)

    def close(self) -> None:
        self._cols = {}

    def ids(self, name: str) -> list:
        values = super().ids(name)
        if name == self._id_column and values and all(_CANONICAL_INT.fullmatch(v) for v in values):
            return [int(v) for v in values]
        return values

    def id_array(self, name: str) -> tuple[pa.Array, str]:
        """As :meth:`ids`: a column of canonical integers only is integers (kind ``"int"``, its text normalised as
        ``int()`` would: ``-0`` is ``0``)."""
        col, kind = super().id_array(name)
        if name == self._id_column and len(col) and pc.all(pc.match_substring_regex(col, _CANONICAL_INT_ANCHORED)).as_py():
            return pc.replace_substring_regex(col, "^-0$", "0"), "int"
        return col, kind


class _ParquetColumns(_ArrowColumns):
    """The ID and label columns are read alone (``ParquetFile.read(columns=...)``); the feature columns are streamed
    in blocks of ``_ROW_BLOCK`` rows (``iter_batches`` over a buffered stream, one row group after the other: pyarrow
    holds a data page or so per column, about 100 MB for 392 columns, not the row group), each block written into the
    matrix before the next is read. Anything unusual in a
    block (nulls, text, decimals, NaN, infinities, float32 overflow) makes us fill the matrix again a group of whole
    columns at a time, whose checks name the first bad value in column order, as a column-by-column load would."""

    _ROW_BLOCK = 8192  # rows per streamed block (pyarrow's buffers, one page per column, outweigh the block)
    _BUFFER_BYTES = 1 << 16  # read buffer per column: pyarrow reads a column chunk in pieces, not whole

    def __init__(self, path: Path):
        self.path = path
        try:
            self._file = pq.ParquetFile(path)
            self.names = list(self._file.schema_arrow.names)
        except (pa.ArrowInvalid, OSError, ValueError) as exc:
            raise DataError(f"{path}: cannot read as Parquet: {exc}") from exc
        self.n_rows = 0

    def load(self, wanted: list[str], features: list[str]) -> None:
        self.n_rows = self._file.metadata.num_rows

    def _raw_column(self, name: str) -> pa.ChunkedArray:
        return self._peek_columns([name])[0]

    def _stream_features(self, names: list[str], features: np.ndarray, done: Callable[[int], None] | None) -> bool:
        """Row blocks of the feature columns into ``features``; False when the column-group path must decide."""
        n = features.shape[0]
        try:
            stream = pq.ParquetFile(self.path, buffer_size=self._BUFFER_BYTES, pre_buffer=False)
            lo = 0
            with stream:
                for batch in self._batches(stream, names):
                    hi = lo + batch.num_rows
                    cols = [batch.column(name) for name in names]
                    if hi > n or any(c.null_count or not (pa.types.is_integer(c.type) or pa.types.is_floating(c.type)
                                                          or pa.types.is_boolean(c.type)) for c in cols):
                        return False
                    if not self._fill_tiles([[c.to_numpy(zero_copy_only=False)] for c in cols], features[lo:hi]):
                        return False
                    del batch, cols
                    lo = hi
                    if done is not None:
                        done(hi)
            return lo == n
        except (pa.ArrowInvalid, pa.ArrowTypeError, OSError, ValueError, KeyError):
            return False

    def _batches(self, stream: pq.ParquetFile, names: list[str]):
        """One row group after the other (reading them in one go reads the next group ahead: twice the memory)."""
        for group in range(stream.num_row_groups):
            yield from stream.iter_batches(batch_size=self._ROW_BLOCK, row_groups=[group], columns=names,
                                           use_threads=False)
            pa.default_memory_pool().release_unused()

    def fill_features(self, names: list[str], features: np.ndarray, done: Callable[[int], None] | None = None) -> None:
        if not names:
            return
        if self._stream_features(names, features, done):
            return
        pa.default_memory_pool().release_unused()
        super().fill_features(names, features, done)

    def _peek_columns(self, names: list[str]) -> list[pa.ChunkedArray]:
        try:
            return self._file.read(columns=names).columns
        except (pa.ArrowInvalid, OSError, ValueError) as exc:
            raise DataError(f"{self.path}: cannot read as Parquet: {exc}") from exc

    def close(self) -> None:
        self._file.close()


class _NpzColumns(_Columns):
    """``np.load`` of a .npz reads one array per access: ``load`` checks shapes from the .npy headers and every column
    is read when it is used, so at most one column besides the matrix is in memory."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._npz = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: cannot read as .npz: {exc}") from exc
        if not hasattr(self._npz, "files"):
            if hasattr(self._npz, "close"):
                self._npz.close()
            raise DataError(f"{path}: a .npz archive of named columns was expected, found a single array")
        self.names = list(self._npz.files)
        self.n_rows = 0

    def close(self) -> None:
        self._npz.close()

    def _header(self, name: str) -> tuple[tuple[int, ...], np.dtype] | None:
        """Shape and dtype from the array's .npy header, without reading its data (None: read the array instead)."""
        member = name if name in self._npz.zip.namelist() else name + ".npy"
        try:
            with self._npz.zip.open(member) as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                elif version == (2, 0):
                    shape, _, dtype = np.lib.format.read_array_header_2_0(f)
                else:
                    return None
        except Exception:  # noqa: BLE001 - any oddity: np.load reads (and judges) the array itself
            return None
        return tuple(shape), np.dtype(dtype)

    def _array(self, name: str) -> np.ndarray:
        try:
            return self._npz[name]
        except ValueError as exc:  # object arrays need pickle, which we never allow
            raise DataError(f"{self.path}: array {name!r} cannot be loaded without pickle: {exc}") from exc

    def load(self, wanted: list[str], features: list[str]) -> None:
        lengths = {}
        for name in dict.fromkeys(wanted):
            head = self._header(name)
            if head is None or head[1].hasobject:
                shape = self._array(name).shape  # raises for object arrays; otherwise read once and dropped
            else:
                shape = head[0]
            if len(shape) != 1:
                raise DataError(f"{self.path}: array {name!r} has shape {shape}; every column must be 1-D")
            lengths[name] = shape[0]
        if len(set(lengths.values())) > 1:
            raise DataError(f"{self.path}: columns have different lengths: "
                            + ", ".join(f"{k!r}={v}" for k, v in lengths.items()))
        self.n_rows = next(iter(lengths.values()), 0)

    def ids(self, name: str) -> list:
        arr = self._array(name)
        if arr.dtype.kind in "iu":
            return arr.tolist()
        if arr.dtype.kind == "U":
            return self._ids_from_list(name, arr.tolist())
        raise DataError(f"{self.path}: ID array {name!r} has dtype {arr.dtype}; IDs must be integers or text")

    def _group_parts(self, names: list[str]) -> list[list[np.ndarray]] | None:
        arrays = []
        for name in names:
            arr = self._array(name)
            if arr.dtype.kind not in "biuf":
                return None
            arrays.append([arr])
        return arrays

    def fill(self, name: str, out: np.ndarray) -> None:
        arr = self._array(name)
        if arr.dtype.kind in "biuf":
            return self._fill_numbers(name, [arr], out)
        if arr.dtype.kind == "U":
            values = self._from_text(name, arr.tolist())
            del arr
            return self._fill_numbers(name, [values], out)
        first = arr[0] if arr.size else None
        raise self._fail(name, 0, f"non-numeric value {short_repr(first)} (dtype {arr.dtype})")

    def labels(self, name: str) -> np.ndarray:
        arr = self._array(name)
        if arr.dtype.kind == "U":
            values = arr.tolist()
            for i, v in enumerate(values):
                if v == "":
                    raise self._fail(name, i, "missing (empty) label")
            return np.array(values, dtype=object)
        if arr.dtype.kind in "iu":
            return arr.astype(np.int64)
        if arr.dtype.kind == "b":
            return arr.copy()
        if arr.dtype.kind == "f":
            values = arr.astype(np.float64)
            bad = ~np.isfinite(values)
            if bad.any():
                i = int(bad.argmax())
                raise self._fail(name, i, f"label {short_repr(float(values[i]))}")
            return values
        raise DataError(f"{self.path}: label array {name!r} has dtype {arr.dtype}; labels must be numbers or text")


def open_columns(path: Path, id_column: str) -> _Columns:
    """The reader for the table at ``path``, by its name's ending; a :class:`DataError` for an unknown one."""
    name = path.name.lower()
    if name.endswith(_CSV_SUFFIXES):
        return _CsvColumns(path, id_column)
    if name.endswith(_PARQUET_SUFFIXES):
        return _ParquetColumns(path)
    if name.endswith(_NPZ_SUFFIXES):
        return _NpzColumns(path)
    raise DataError(f"{path}: unknown table format; use one of "
                    f"{', '.join(_CSV_SUFFIXES[:1] + _PARQUET_SUFFIXES + _NPZ_SUFFIXES)}")
