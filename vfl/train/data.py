"""Loading one party's table: IDs, a float32 feature matrix and (label holder only) labels.

Three formats, picked by the file name: CSV (``.csv``, also ``.csv.gz``/``.csv.bz2``/...) and Parquet (``.parquet``,
``.pq``) through pyarrow, and ``.npz`` (one 1-D array per column, named by the column; loaded with
``allow_pickle=False``).

Rules, the same for every format:

- The ID column keeps its native type: integer IDs come back as Python ``int``, text IDs as ``str``. A CSV ID column is
  read as text first and becomes ``int`` only when *every* value is a canonical integer (``-?(0|[1-9][0-9]*)``), so
  ``"007"`` stays the string ``"007"`` instead of silently becoming ``7``. Missing/empty IDs are an error; duplicate IDs
  are not checked here (PSI does that) and nothing here merges or drops rows, so they stay visible.
- Feature columns must hold numbers (integers, floats, booleans; text that parses as a number is accepted). Missing,
  NaN and infinite values are errors. The first bad value is named: file, column, row (1-based data row, the header
  not counted) and the value.
- ``feature_columns=None`` means every column except the ID and the label column, in file order. A label holder
  without features of its own passes ``feature_columns=()``.

Every problem raises :class:`DataError`, whose ``str()`` is one line naming the file.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from ..errors import SetupError

__all__ = [
    "TASKS",
    "DataError",
    "LabelEncoding",
    "PartyTable",
    "Standardizer",
    "TableSpec",
    "encode_labels",
    "load_table",
]

TASKS = ("multiclass", "binary", "regression")

_CSV_SUFFIXES = (".csv", ".csv.gz", ".csv.bz2", ".csv.zst", ".csv.lz4")
_PARQUET_SUFFIXES = (".parquet", ".pq")
_NPZ_SUFFIXES = (".npz",)
_CANONICAL_INT = re.compile(r"-?(0|[1-9][0-9]*)")
_MAX_SHOWN = 8


class DataError(SetupError):
    """A party's table cannot be used as configured. ``str()`` is a single line that names the file."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


# --------------------------------------------------------------------------------------------------------- spec/table


@dataclass(frozen=True)
class TableSpec:
    """Where a party's table is and which columns to use.

    ``feature_columns=None`` takes every column except ``id_column`` and ``label_column``; ``()`` takes none.
    ``label_column`` is set only at the label holder.
    """

    path: Path
    id_column: str
    feature_columns: tuple[str, ...] | None = None
    label_column: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "path", Path(os.fspath(self.path)))
        if isinstance(self.feature_columns, str):
            raise TypeError("feature_columns must be a sequence of column names, not a single string")
        if self.feature_columns is not None:
            object.__setattr__(self, "feature_columns", tuple(self.feature_columns))


@dataclass(frozen=True, eq=False)
class PartyTable:
    """One party's rows: ``ids[i]``, ``features[i]`` and ``labels[i]`` describe the same row ``i`` (file order)."""

    path: Path
    id_column: str
    ids: list  # list[int] or list[str], native type kept
    features: np.ndarray  # float32 [n, d], C-contiguous
    feature_names: tuple[str, ...]
    labels: np.ndarray | None = None  # int64, float64, bool or object (str) -- the column's own type
    label_column: str | None = None

    @property
    def n_rows(self) -> int:
        return len(self.ids)

    @property
    def n_features(self) -> int:
        return int(self.features.shape[1])

    def take(self, rows: Sequence[int] | np.ndarray) -> PartyTable:
        """The table restricted to ``rows`` (int indices into this table), in that order: the PSI's agreed order."""
        rows = np.asarray(rows)
        if rows.ndim != 1 or (rows.size and rows.dtype.kind not in "iu"):
            raise DataError(f"{self.path}: row index must be a 1-D integer array, got dtype {rows.dtype} "
                            f"shape {rows.shape}")
        rows = rows.astype(np.int64, copy=False)
        if rows.size and (rows.min() < 0 or rows.max() >= self.n_rows):
            raise DataError(f"{self.path}: row index out of range [0, {self.n_rows}): "
                            f"min {int(rows.min())}, max {int(rows.max())}")
        return PartyTable(
            path=self.path,
            id_column=self.id_column,
            ids=[self.ids[i] for i in rows.tolist()],
            features=np.ascontiguousarray(self.features[rows]),
            feature_names=self.feature_names,
            labels=None if self.labels is None else self.labels[rows],
            label_column=self.label_column,
        )


# ------------------------------------------------------------------------------------------------------------ loading


def load_table(spec: TableSpec) -> PartyTable:
    """Read the table described by ``spec``; raise :class:`DataError` on any problem.

    Memory: the float32 feature matrix is allocated once and filled in place, a few columns at a time (Parquet reads a
    group of columns per call, .npz one array per column, CSV streams blocks of rows), so the peak is about the matrix
    plus a few columns of source data (bounded by ``_GROUP_BYTES``) and the IDs, not the whole table twice.
    """
    path = spec.path
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file")
    name = path.name.lower()
    if name.endswith(_CSV_SUFFIXES):
        columns = _CsvColumns(path, spec.id_column)
    elif name.endswith(_PARQUET_SUFFIXES):
        columns = _ParquetColumns(path)
    elif name.endswith(_NPZ_SUFFIXES):
        columns = _NpzColumns(path)
    else:
        raise DataError(f"{path}: unknown table format; use one of "
                        f"{', '.join(_CSV_SUFFIXES[:1] + _PARQUET_SUFFIXES + _NPZ_SUFFIXES)}")
    try:
        return _load(spec, columns)
    finally:
        columns.close()
        # what Arrow freed stays in its pool (jemalloc/mimalloc) unless handed back: hundreds of MB for a big table
        pa.default_memory_pool().release_unused()


def _load(spec: TableSpec, columns: _Columns) -> PartyTable:
    path = spec.path
    available = columns.names
    dups = sorted(n for n, c in Counter(available).items() if c > 1)
    feature_names = _select_features(spec, available, path)
    wanted = [spec.id_column, *feature_names] + ([spec.label_column] if spec.label_column is not None else [])
    for col in wanted:
        if col not in available:
            raise DataError(f"{path}: no column {col!r}; available columns: {_show(available)}")
        if col in dups:
            raise DataError(f"{path}: column name {col!r} appears more than once in the file")
    columns.load(wanted, feature_names)

    n = columns.n_rows
    if n == 0:
        raise DataError(f"{path}: the table has no data rows")
    ids = columns.ids(spec.id_column)
    features = np.empty((n, len(feature_names)), dtype=np.float32)
    columns.fill_features(feature_names, features)
    labels = columns.labels(spec.label_column) if spec.label_column is not None else None
    return PartyTable(path=path, id_column=spec.id_column, ids=ids, features=features,
                      feature_names=tuple(feature_names), labels=labels, label_column=spec.label_column)


def _select_features(spec: TableSpec, available: list[str], path: Path) -> list[str]:
    special = {spec.id_column} | ({spec.label_column} if spec.label_column is not None else set())
    if spec.feature_columns is None:
        return [c for c in available if c not in special]
    names = list(spec.feature_columns)
    for c in names:
        if not isinstance(c, str):
            raise DataError(f"{path}: feature column names must be strings, got {c!r}")
    repeated = sorted(c for c, k in Counter(names).items() if k > 1)
    if repeated:
        raise DataError(f"{path}: feature column {repeated[0]!r} is listed more than once")
    if spec.id_column in names:
        raise DataError(f"{path}: the ID column {spec.id_column!r} cannot also be a feature column")
    if spec.label_column is not None and spec.label_column in names:
        raise DataError(f"{path}: the label column {spec.label_column!r} cannot also be a feature column")
    return names


def _show(names: Iterable[Any]) -> str:
    names = list(names)
    shown = ", ".join(repr(n) for n in names[:40])
    return shown + (f", ... ({len(names)} in all)" if len(names) > 40 else "") if names else "(none)"


def _value(v: Any) -> str:
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

    def fill_features(self, names: list[str], features: np.ndarray) -> None:
        """Fill the float32 matrix ``features`` (rows x ``names``), a group of adjacent columns at a time.

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
            raise self._fail(column, bad[0], f"non-finite value {_value(bad[1])} "
                                             "(infinite or outside the float32 range)")

    def _from_text(self, column: str, values: list) -> np.ndarray:
        out = np.empty(len(values), dtype=np.float64)
        for i, v in enumerate(values):
            if v is None or v == "":
                raise self._fail(column, i, "missing (empty) value")
            x = _parse_number(v)
            if x is None:
                raise self._fail(column, i, f"non-numeric value {_value(v)}")
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

    def ids(self, name: str) -> list:
        col = self._column(name)
        t = col.type
        if not (pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t)):
            raise DataError(f"{self.path}: ID column {name!r} has type {t}; IDs must be integers or text")
        i = self._first_null(col)
        if i is not None:
            raise self._fail(name, i, "missing (empty) ID")
        return self._ids_from_list(name, col.to_pylist())

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
            raise self._fail(name, 0, f"non-numeric value {_value(first)} (column type {t})")
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
                raise self._fail(name, int(bad.argmax()), f"label {_value(float(values[bad.argmax()]))}")
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

    def _stream_features(self, names: list[str], features: np.ndarray) -> bool:
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
            return lo == features.shape[0]
        except (pa.ArrowInvalid, pa.ArrowTypeError, OSError, ValueError, KeyError):
            return False

    def fill_features(self, names: list[str], features: np.ndarray) -> None:
        if not names:
            return
        if not self._full and self._stream_features(names, features):
            return
        pa.default_memory_pool().release_unused()
        if not self._full:
            self._read_full([*self._cols, *names])
        super().fill_features(names, features)

    def close(self) -> None:
        self._cols = {}

    def ids(self, name: str) -> list:
        values = super().ids(name)
        if name == self._id_column and values and all(_CANONICAL_INT.fullmatch(v) for v in values):
            return [int(v) for v in values]
        return values


class _ParquetColumns(_ArrowColumns):
    """Reads a group of columns at a time (``ParquetFile.read(columns=...)``): never the whole table in Arrow memory."""

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
        raise self._fail(name, 0, f"non-numeric value {_value(first)} (dtype {arr.dtype})")

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
                raise self._fail(name, i, f"label {_value(float(values[i]))}")
            return values
        raise DataError(f"{self.path}: label array {name!r} has dtype {arr.dtype}; labels must be numbers or text")


# ------------------------------------------------------------------------------------------------------------- labels


@dataclass(frozen=True)
class LabelEncoding:
    """How raw labels map to training targets.

    multiclass: ``classes[k]`` is the raw label of class index ``k`` (sorted raw values); targets are int64.
    binary: ``classes == (negative, positive)``; targets are float32 0/1.
    regression: ``classes == ()``; targets are the values as float32.
    """

    task: str
    classes: tuple = ()

    def __post_init__(self):
        if self.task not in TASKS:
            raise DataError(f"unknown task {self.task!r}; use one of {', '.join(TASKS)}")
        object.__setattr__(self, "classes", tuple(_py(c) for c in self.classes))
        if self.task == "binary" and len(self.classes) != 2:
            raise DataError(f"a binary task needs exactly 2 classes, got {len(self.classes)}: "
                            f"{_show(self.classes)}")
        if self.task == "regression" and self.classes:
            raise DataError("a regression task has no classes")
        if len(set(self.classes)) != len(self.classes):
            raise DataError(f"classes are not distinct: {_show(self.classes)}")

    @property
    def n_classes(self) -> int:
        """Number of classes (0 for regression)."""
        return len(self.classes)

    @property
    def output_width(self) -> int:
        """Width of the top model's output for this task: one logit per class, or 1."""
        return len(self.classes) if self.task == "multiclass" else 1

    def encode(self, labels: Sequence | np.ndarray) -> np.ndarray:
        """Raw labels -> targets (int64 indices, float32 0/1, or float32 values)."""
        labels = np.asarray(labels)
        if self.task == "regression":
            if labels.dtype.kind not in "biuf":
                raise DataError(f"regression labels must be numbers, got dtype {labels.dtype}"
                                + (f" (first value {_value(labels.flat[0])})" if labels.size else ""))
            values = labels.astype(np.float64)
            bad = ~np.isfinite(values)
            if bad.any():
                i = int(bad.argmax())
                raise DataError(f"label row {i + 1}: non-finite value {values[i]!r}")
            return values.astype(np.float32)
        index = {c: k for k, c in enumerate(self.classes)}
        out = np.empty(labels.shape[0], dtype=np.int64)
        for i, v in enumerate(labels.tolist()):
            k = index.get(v)
            if k is None:
                raise DataError(f"label row {i + 1}: value {_value(v)} is not one of the classes "
                                f"{_show(self.classes)}")
            out[i] = k
        return out.astype(np.float32) if self.task == "binary" else out

    def decode(self, targets: Sequence | np.ndarray) -> list:
        """Class indices (or 0/1) back to raw labels; regression values pass through."""
        targets = np.asarray(targets)
        if self.task == "regression":
            return targets.astype(np.float64).tolist()
        return [self.classes[int(k)] for k in targets.tolist()]

    def to_dict(self) -> dict:
        return {"task": self.task, "classes": list(self.classes)}

    @classmethod
    def from_dict(cls, data: Mapping) -> LabelEncoding:
        return cls(task=data["task"], classes=tuple(data.get("classes", ())))


def _py(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


def encode_labels(labels: Sequence | np.ndarray, task: str,
                  classes: Sequence | None = None) -> tuple[np.ndarray, LabelEncoding]:
    """Encode raw labels for ``task``; returns ``(targets, encoding)``.

    Without ``classes``, the classes are the sorted distinct label values (multiclass), or the two distinct values in
    sorted order, the larger being the positive class (binary: ``{0, 1}``, ``{-1, 1}``, ``{"no", "yes"}``, ...).
    Pass ``classes`` to fix them (e.g. from a checkpoint, or to include classes absent from these rows).
    """
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    if task == "regression":
        enc = LabelEncoding(task)
        return enc.encode(labels), enc
    if classes is None:
        values = np.asarray(labels).tolist()
        try:
            distinct = sorted(set(values))
        except TypeError as exc:
            raise DataError(f"labels mix types that cannot be ordered: {exc}") from exc
        for v in distinct:
            if isinstance(v, float) and math.isnan(v):
                raise DataError("labels contain NaN")
        if task == "binary" and len(distinct) != 2:
            raise DataError(f"a binary task needs exactly 2 distinct label values, found {len(distinct)}: "
                            f"{_show(distinct[:_MAX_SHOWN])}")
        if task == "multiclass" and len(distinct) < 2:
            raise DataError(f"a multiclass task needs at least 2 distinct label values, found {len(distinct)}")
        classes = distinct
    enc = LabelEncoding(task, tuple(classes))
    return enc.encode(labels), enc


# ------------------------------------------------------------------------------------------------------ standardising


@dataclass(frozen=True, eq=False)
class Standardizer:
    """Per-column ``(x - mean) / std``, fitted on training rows. Constant columns get ``std = 1``."""

    mean: np.ndarray = field(repr=False)  # float64 [d]
    std: np.ndarray = field(repr=False)  # float64 [d], > 0

    @classmethod
    def fit(cls, features: np.ndarray) -> Standardizer:
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2:
            raise DataError(f"Standardizer.fit expects a 2-D [rows, features] array, got shape {x.shape}")
        if x.shape[0] == 0:
            raise DataError("Standardizer.fit needs at least one row")
        mean = x.mean(axis=0)
        std = x.std(axis=0)
        constant = x.max(axis=0) == x.min(axis=0)
        std = np.where(constant | ~(std > 0), 1.0, std)
        return cls(mean=mean, std=std)

    def transform(self, features: np.ndarray) -> np.ndarray:
        """Standardised copy as float32 [n, d], C-contiguous."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.mean.shape[0]:
            raise DataError(f"Standardizer was fitted on {self.mean.shape[0]} features, got shape {x.shape}")
        return np.ascontiguousarray(((x - self.mean) / self.std).astype(np.float32))

    def to_dict(self) -> dict:
        return {"mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std]}

    @classmethod
    def from_dict(cls, data: Mapping) -> Standardizer:
        mean = np.asarray(data["mean"], dtype=np.float64)
        std = np.asarray(data["std"], dtype=np.float64)
        if mean.ndim != 1 or mean.shape != std.shape:
            raise DataError(f"bad standardiser: mean shape {mean.shape}, std shape {std.shape}")
        if not (np.all(np.isfinite(mean)) and np.all(std > 0) and np.all(np.isfinite(std))):
            raise DataError("bad standardiser: mean must be finite and std finite and > 0")
        return cls(mean=mean, std=std)
