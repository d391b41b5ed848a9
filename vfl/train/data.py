"""Loading one party's table: IDs, a float32 feature matrix and (label holder only) labels.

Three formats, picked by the file name: CSV (``.csv``, also ``.csv.gz``/``.csv.bz2``/...) and Parquet (``.parquet``,
``.pq``) through pyarrow, and ``.npz`` (one 1-D array per column, named by the column; loaded with
``allow_pickle=False``). Reading each format is :mod:`vfl.train.readers`' job; this module picks the columns, checks
them, and owns what a table becomes (label encoding, standardisation).

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
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from .feature_file import FeatureFile, write_feature_file
from .readers import DataError, _Columns, open_columns, short_repr

__all__ = [
    "TASKS",
    "DataError",
    "LabelEncoding",
    "PartyTable",
    "Standardizer",
    "TableSpec",
    "encode_labels",
    "load_id_column",
    "load_table",
]

TASKS = ("multiclass", "binary", "regression")

_MAX_SHOWN = 8
_FIT_ROWS = 8192  # rows per block of Standardizer.fit


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
    features: np.ndarray | FeatureFile  # float32 [n, d], C-contiguous in RAM, or on disk (``load_table(features_to)``)
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


def load_table(spec: TableSpec, features_to: Path | None = None,
               id_items: Callable[[pa.Array, str], Sequence] | None = None) -> PartyTable:
    """Read the table described by ``spec``; raise :class:`DataError` on any problem.

    Memory: the float32 feature matrix is allocated once and filled in place, in blocks of rows (CSV and Parquet
    stream blocks of rows) or a few columns at a time (.npz one array per column, and any file whose feature columns
    hold something unusual), so the peak is about the matrix plus a block of source data and the IDs, not the whole
    table twice.

    ``features_to``: the matrix goes to this ``.npy`` file instead of RAM (:mod:`vfl.train.feature_file`: written
    atomically, mode 0600, its pages let go as the blocks are written), and ``features`` is a
    :class:`~vfl.train.feature_file.FeatureFile` over it. A complete file of the right shape already there is used as
    it is, without reading the feature columns again: the caller names the file after what it holds
    (``vfl.node.aligned``). A table without feature columns gets no file.

    ``id_items``: the table's ``ids`` are ``id_items(array, kind)`` of the ID column as one Arrow array (as
    :func:`load_id_column` gives it) where the format allows, instead of a list of Python objects (about 70 bytes an
    ID: 1.3 GB of a 10M-row data holder's start-up peak); formats read whole (.npz) still give the list.
    """
    return _with_columns(spec, lambda columns: _load(spec, columns, features_to, id_items))


def _with_columns(spec: TableSpec, use: Callable[[_Columns], Any]) -> Any:
    """``use`` the table's reader; the file is let go of afterwards, whatever happens."""
    path = spec.path
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file")
    columns = open_columns(path, spec.id_column)
    try:
        return use(columns)
    finally:
        columns.close()
        # what Arrow freed stays in its pool (jemalloc/mimalloc) unless handed back: hundreds of MB for a big table
        pa.default_memory_pool().release_unused()


def load_id_column(spec: TableSpec) -> tuple[pa.Array, str] | list:
    """The ID column alone, checked exactly as :func:`load_table` checks it (same errors), for a session that only
    aligns IDs: ``(array, kind)``, a pyarrow array of the IDs (text, or integers, or for CSV the canonical integer
    text) and ``"int"`` or ``"str"``; or, for a format read whole anyway (.npz), the list ``load_table`` gives.

    Why: ``load_table``'s IDs are a list of Python objects (about 70 bytes an ID); an aligning node holds the IDs for
    its whole run, so it keeps them as Arrow/numpy buffers instead (:mod:`vfl.psi.items`)."""
    def use(columns: _Columns) -> tuple[pa.Array, str] | list:
        _prepare(spec, columns)
        id_array = getattr(columns, "id_array", None)
        return columns.ids(spec.id_column) if id_array is None else id_array(spec.id_column)

    return _with_columns(spec, use)


def _prepare(spec: TableSpec, columns: _Columns) -> list[str]:
    """Check the wanted columns are there once each, load them (``columns.load``); returns the feature names."""
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
    if columns.n_rows == 0:
        raise DataError(f"{path}: the table has no data rows")
    return feature_names


def _load(spec: TableSpec, columns: _Columns, features_to: Path | None = None,
          id_items: Callable[[pa.Array, str], Sequence] | None = None) -> PartyTable:
    path = spec.path
    feature_names = _prepare(spec, columns)
    n = columns.n_rows
    id_array = getattr(columns, "id_array", None) if id_items is not None else None
    ids = columns.ids(spec.id_column) if id_array is None else id_items(*id_array(spec.id_column))
    if features_to is None or not feature_names:
        features = np.empty((n, len(feature_names)), dtype=np.float32)
        columns.fill_features(feature_names, features)
    else:
        features = _feature_file(features_to, n, feature_names, columns)
    labels = columns.labels(spec.label_column) if spec.label_column is not None else None
    return PartyTable(path=path, id_column=spec.id_column, ids=ids, features=features,
                      feature_names=tuple(feature_names), labels=labels, label_column=spec.label_column)


def _feature_file(path: Path, n: int, names: list[str], columns: _Columns) -> FeatureFile:
    """The complete feature file at ``path`` if it has the table's shape; else written anew from ``columns``."""
    if path.is_file():
        try:
            existing = FeatureFile(path)
            if existing.shape == (n, len(names)):
                return existing
            existing.close()
        except (OSError, ValueError):
            pass  # not one of ours, or not complete: written again below
    try:
        write_feature_file(path, n, len(names), lambda matrix, done: columns.fill_features(names, matrix, done))
    except OSError as exc:
        raise DataError(f"{columns.path}: cannot write the feature file {path}: {exc.strerror or exc}") from None
    return FeatureFile(path)


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
                                + (f" (first value {short_repr(labels.flat[0])})" if labels.size else ""))
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
                raise DataError(f"label row {i + 1}: value {short_repr(v)} is not one of the classes "
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
    def fit(cls, features: np.ndarray | FeatureFile, rows: np.ndarray | None = None) -> Standardizer:
        """Fitted on ``features[rows]`` (default: every row), read ``_FIT_ROWS`` rows at a time, two passes.

        The numbers are those of ``x.mean(axis=0)`` / ``x.std(axis=0)`` over the whole float64 array, bit for bit:
        numpy sums along axis 0 row after row, so each block is summed onto the running sum (prepended as the
        block's first row) in the same order. Memory: a block, not the rows (a 1M-row table stays on disk)."""
        shape = tuple(features.shape)
        if len(shape) != 2:
            raise DataError(f"Standardizer.fit expects a 2-D [rows, features] array, got shape {shape}")
        n = shape[0] if rows is None else len(rows)
        if n == 0:
            raise DataError("Standardizer.fit needs at least one row")
        d = shape[1]
        buf = np.empty((min(n, _FIT_ROWS) + 1, d), dtype=np.float64)

        def blocks():
            for lo in range(0, n, _FIT_ROWS):
                part = features[lo:lo + _FIT_ROWS] if rows is None else features[np.asarray(rows[lo:lo + _FIT_ROWS])]
                k = len(part)
                buf[1:k + 1] = part
                yield k

        total = np.zeros(d)
        lo_val, hi_val = np.full(d, np.inf), np.full(d, -np.inf)
        for k in blocks():
            x = buf[1:k + 1]
            np.minimum(lo_val, x.min(axis=0), out=lo_val)
            np.maximum(hi_val, x.max(axis=0), out=hi_val)
            buf[0] = total
            total = buf[:k + 1].sum(axis=0)
        mean = total / n
        squares = np.zeros(d)
        for k in blocks():
            dev = buf[1:k + 1]
            dev -= mean
            dev *= dev
            buf[0] = squares
            squares = buf[:k + 1].sum(axis=0)
        std = np.sqrt(squares / n)
        constant = hi_val == lo_val
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
