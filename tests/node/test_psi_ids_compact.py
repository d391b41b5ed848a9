"""An aligning node keeps its IDs compact: read alone from the ID column, encoded in bulk, written back by row index.
Every result (items, errors, the aligned file) is byte for byte that of the whole-table path it replaces."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vfl.node.alignment import PartyIds, write_aligned
from vfl.psi.engine import encode_ids
from vfl.psi.items import ItemStore, encode_id_array
from vfl.train.data import DataError, TableSpec, load_id_column, load_table

CELLS = st.lists(st.one_of(st.from_regex(r"-?(0|[1-9][0-9]{0,20})", fullmatch=True),
                           st.from_regex(r"[A-Za-z0-9 _é-]{1,8}", fullmatch=True), st.just("007"), st.just("-0")),
                 min_size=1, max_size=25)


def _compact(spec: TableSpec) -> ItemStore:
    column = load_id_column(spec)
    return ItemStore.from_items(encode_ids(column)) if isinstance(column, list) else encode_id_array(*column)


def _write_csv(path: Path, cells: list[str]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as fh:
        fh.write("id,x\n")
        fh.writelines(f'"{c}",1\n' for c in cells)


def _old_write_aligned(path: Path, column: str, ids: list, rows: np.ndarray) -> None:
    """write_aligned as it was: a Python list of the native IDs."""
    table = pa.table({"row": pa.array(rows, type=pa.int64()), column: pa.array([ids[r] for r in rows.tolist()])})
    pacsv.write_csv(table, path)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(CELLS, st.data())
def test_csv_ids_read_alone_are_the_tables_ids_and_write_back_identically(tmp_path, cells, data):
    path = tmp_path / "t.csv"
    _write_csv(path, cells)
    spec = TableSpec(path=path, id_column="id", feature_columns=())
    ids = load_table(spec).ids
    store = _compact(spec)
    assert store == encode_ids(ids)
    rows = np.array(data.draw(st.lists(st.integers(0, len(cells) - 1), max_size=len(cells))), dtype=np.int64)
    party = PartyIds(path=path, column="id", items=store)
    try:
        want = None
        _old_write_aligned(tmp_path / "old.csv", "id", ids, rows)
        want = (tmp_path / "old.csv").read_bytes()
    except (OverflowError, pa.ArrowException) as exc:  # integers Arrow cannot hold fail as they did
        with pytest.raises(type(exc)):
            write_aligned(tmp_path / "new.csv", party, rows)
    if want is not None:
        write_aligned(tmp_path / "new.csv", party, rows)
        assert (tmp_path / "new.csv").read_bytes() == want
    assert party.ids == ids


@pytest.mark.parametrize("values", [[5, -3, 0, 2**62], ["a", "Zoë", "0", "x" * 100]])
@pytest.mark.parametrize("fmt", ["parquet", "npz"])
def test_parquet_and_npz_ids_read_alone_are_the_tables_ids(tmp_path, values, fmt):
    path = tmp_path / f"t.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.table({"id": values, "x": [1.0] * len(values)}), path, row_group_size=2)
    else:
        np.savez(path, id=np.array(values), x=np.ones(len(values)))
    spec = TableSpec(path=path, id_column="id", feature_columns=())
    ids = load_table(spec).ids
    assert _compact(spec) == encode_ids(ids)
    rows = np.array([3, 0, 2], dtype=np.int64)
    _old_write_aligned(tmp_path / "old.csv", "id", ids, rows)
    write_aligned(tmp_path / "new.csv", PartyIds(path=path, column="id", items=_compact(spec)), rows)
    assert (tmp_path / "new.csv").read_bytes() == (tmp_path / "old.csv").read_bytes()


@pytest.mark.parametrize("cells, table", [
    (['"a"', '""', '"c"'], None),  # an empty ID
    (["1", "2", ""], None),
    (None, pa.table({"id": pa.array([1, None, 3]), "x": [1.0, 2.0, 3.0]})),  # a null ID
    (None, pa.table({"id": pa.array([1.5, 2.0, 3.0]), "x": [1.0, 2.0, 3.0]})),  # an ID column of floats
    (None, pa.table({"id": pa.array(["a", "", "c"]), "x": [1.0, 2.0, 3.0]})),
])
def test_a_bad_id_column_is_refused_with_the_tables_error(tmp_path, cells, table):
    if cells is not None:
        path = tmp_path / "t.csv"
        path.write_text("id,x\n" + "".join(f"{c},1\n" for c in cells), encoding="utf-8")
    else:
        path = tmp_path / "t.parquet"
        pq.write_table(table, path)
    spec = TableSpec(path=path, id_column="id", feature_columns=())
    with pytest.raises(DataError) as want:
        load_table(spec)
    with pytest.raises(DataError) as got:
        load_id_column(spec)
    assert str(got.value) == str(want.value)


def test_an_empty_intersection_writes_the_header_only(tmp_path):
    path = tmp_path / "t.csv"
    _write_csv(path, ["a", "b"])
    spec = TableSpec(path=path, id_column="id", feature_columns=())
    rows = np.empty(0, dtype=np.int64)
    _old_write_aligned(tmp_path / "old.csv", "id", load_table(spec).ids, rows)
    write_aligned(tmp_path / "new.csv", PartyIds(path=path, column="id", items=_compact(spec)), rows)
    assert (tmp_path / "new.csv").read_bytes() == (tmp_path / "old.csv").read_bytes()
