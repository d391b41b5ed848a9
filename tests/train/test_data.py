"""vfl.train.data: loading CSV / Parquet / .npz tables, error messages, label encoding, standardisation."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vfl.train.data import DataError, LabelEncoding, Standardizer, TableSpec, encode_labels, load_table


def write_csv(path, text: str):
    path.write_text(text.lstrip("\n"))
    return path


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


# ---------------------------------------------------------------------------------------------------------- round trips


def test_csv_int_ids_features_labels(tmp_path):
    p = write_csv(tmp_path / "bank.csv", """
id,age,income,label
3,31,1.5,yes
1,45,2.25,no
2,27,-0.5,yes
""")
    t = load_table(TableSpec(p, "id", label_column="label"))
    assert t.ids == [3, 1, 2] and all(type(i) is int for i in t.ids)
    assert t.feature_names == ("age", "income")
    assert t.features.dtype == np.float32 and t.features.flags.c_contiguous
    np.testing.assert_array_equal(t.features, np.array([[31, 1.5], [45, 2.25], [27, -0.5]], np.float32))
    assert list(t.labels) == ["yes", "no", "yes"]
    assert t.n_rows == 3 and t.n_features == 2


def test_csv_str_ids_keep_leading_zeros_and_are_not_deduplicated(tmp_path):
    p = write_csv(tmp_path / "dh.csv", """
cust,x
007,1
8,2
007,3
""")
    t = load_table(TableSpec(p, "cust"))
    # "007" is not a canonical integer, so the whole column stays text; the duplicate row stays visible
    assert t.ids == ["007", "8", "007"]
    assert t.labels is None
    np.testing.assert_array_equal(t.features[:, 0], [1, 2, 3])


def test_csv_text_ids(tmp_path):
    p = write_csv(tmp_path / "dh.csv", "email,b,a\nx@y.org,1,2\nz@y.org,3,4\n")
    t = load_table(TableSpec(p, "email", feature_columns=["a", "b"]))
    assert t.ids == ["x@y.org", "z@y.org"]
    assert t.feature_names == ("a", "b")  # the requested order, not the file order
    np.testing.assert_array_equal(t.features, [[2, 1], [4, 3]])


def test_feature_columns_empty_for_a_label_holder_without_features(tmp_path):
    p = write_csv(tmp_path / "lh.csv", "id,x,y\n1,5,0\n2,6,1\n")
    t = load_table(TableSpec(p, "id", feature_columns=(), label_column="y"))
    assert t.features.shape == (2, 0) and t.feature_names == ()
    assert t.labels.dtype == np.int64 and list(t.labels) == [0, 1]


def test_bool_feature_column(tmp_path):
    p = write_csv(tmp_path / "b.csv", "id,flag\n1,true\n2,false\n")
    np.testing.assert_array_equal(load_table(TableSpec(p, "id")).features[:, 0], [1, 0])


@pytest.mark.parametrize("ids", [[10, 20, 30], ["a", "b", "c"]])
def test_parquet_round_trip(tmp_path, ids):
    p = tmp_path / "t.parquet"
    pq.write_table(pa.table({"id": ids, "f1": [1.0, 2.0, 3.0], "f2": pa.array([1, 2, 3], pa.int32()),
                             "y": [0.5, 1.5, 2.5]}), p)
    t = load_table(TableSpec(p, "id", label_column="y"))
    assert t.ids == ids and all(type(i) is type(ids[0]) for i in t.ids)
    np.testing.assert_array_equal(t.features, [[1, 1], [2, 2], [3, 3]])
    assert t.labels.dtype == np.float64
    np.testing.assert_array_equal(t.labels, [0.5, 1.5, 2.5])


def test_parquet_dictionary_ids_and_labels(tmp_path):
    p = tmp_path / "t.pq"
    pq.write_table(pa.table({"id": pa.array(["u", "v"]).dictionary_encode(), "x": [1.0, 2.0],
                             "lab": pa.array(["cat", "dog"]).dictionary_encode()}), p)
    t = load_table(TableSpec(p, "id", label_column="lab"))
    assert t.ids == ["u", "v"] and list(t.labels) == ["cat", "dog"]


@pytest.mark.parametrize("ids", [np.array([5, 6, 7], np.int64), np.array(["p", "q", "r"])])
def test_npz_round_trip(tmp_path, ids):
    p = tmp_path / "t.npz"
    np.savez(p, id=ids, a=np.array([1.0, 2.0, 3.0]), b=np.array([1, 0, 1], np.uint8), y=np.array([2, 0, 1]))
    t = load_table(TableSpec(p, "id", label_column="y"))
    assert t.ids == ids.tolist() and all(type(i) is type(ids.tolist()[0]) for i in t.ids)
    assert t.feature_names == ("a", "b")
    np.testing.assert_array_equal(t.features, [[1, 1], [2, 0], [3, 1]])
    assert t.labels.dtype == np.int64


def test_take_reorders_every_field(tmp_path):
    p = write_csv(tmp_path / "t.csv", "id,x,y\n1,10,a\n2,20,b\n3,30,c\n")
    t = load_table(TableSpec(p, "id", label_column="y")).take(np.array([2, 0]))
    assert t.ids == [3, 1] and list(t.labels) == ["c", "a"]
    np.testing.assert_array_equal(t.features[:, 0], [30, 10])
    assert t.features.flags.c_contiguous
    with pytest.raises(DataError, match="out of range"):
        t.take([5])


# -------------------------------------------------------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    with pytest.raises(DataError) as e:
        load_table(TableSpec(tmp_path / "nope.csv", "id"))
    assert "nope.csv" in one_line(e) and "no such file" in str(e.value)


def test_unknown_format(tmp_path):
    p = tmp_path / "t.xlsx"
    p.write_text("x")
    with pytest.raises(DataError, match="unknown table format"):
        load_table(TableSpec(p, "id"))


@pytest.mark.parametrize("fmt", ["csv", "parquet", "npz"])
def test_missing_column_names_it_and_lists_available(tmp_path, fmt):
    p = tmp_path / f"t.{fmt}"
    cols = {"id": np.array([1, 2]), "age": np.array([1.0, 2.0]), "zip": np.array([3.0, 4.0])}
    if fmt == "csv":
        write_csv(p, "id,age,zip\n1,1,3\n2,2,4\n")
    elif fmt == "parquet":
        pq.write_table(pa.table(cols), p)
    else:
        np.savez(p, **cols)
    with pytest.raises(DataError) as e:
        load_table(TableSpec(p, "id", feature_columns=["age", "income"]))
    msg = one_line(e)
    assert str(p) in msg and "'income'" in msg and "'age'" in msg and "'zip'" in msg and "'id'" in msg
    with pytest.raises(DataError, match="no column 'ident'"):
        load_table(TableSpec(p, "ident"))
    with pytest.raises(DataError, match="no column 'label'"):
        load_table(TableSpec(p, "id", label_column="label"))


def test_csv_non_numeric_value_names_file_column_row_value(tmp_path):
    p = write_csv(tmp_path / "dh1.csv", "id,a,b\n1,1,2\n2,3,4\n3,5,abc\n4,6,7\n")
    with pytest.raises(DataError) as e:
        load_table(TableSpec(p, "id"))
    msg = one_line(e)
    assert "dh1.csv" in msg and "column 'b'" in msg and "row 3" in msg and "'abc'" in msg and "non-numeric" in msg


def test_csv_decimal_comma_is_non_numeric(tmp_path):
    p = write_csv(tmp_path / "t.csv", 'id,a\n1,1\n2,"1,5"\n')
    with pytest.raises(DataError, match=r"column 'a', row 2: non-numeric value '1,5'"):
        load_table(TableSpec(p, "id"))


@pytest.mark.parametrize("cell", ["", "NA", "NaN", "null"])
def test_csv_missing_values_name_row(tmp_path, cell):
    p = write_csv(tmp_path / "t.csv", f"id,a,b\n1,1,2\n2,{cell},4\n")
    with pytest.raises(DataError) as e:
        load_table(TableSpec(p, "id"))
    msg = one_line(e)
    assert "t.csv" in msg and "column 'a'" in msg and "row 2" in msg and "missing" in msg


def test_csv_missing_value_in_text_column(tmp_path):
    # 'x' makes the column text; the empty cell at row 2 comes first
    p = write_csv(tmp_path / "t.csv", "id,a\n1,1\n2,\n3,x\n")
    with pytest.raises(DataError, match=r"column 'a', row 2: missing"):
        load_table(TableSpec(p, "id"))


def test_parquet_nan_null_inf(tmp_path):
    p = tmp_path / "t.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3], "a": [1.0, float("nan"), 2.0]}), p)
    with pytest.raises(DataError, match=r"t.parquet: column 'a', row 2: NaN value"):
        load_table(TableSpec(p, "id"))
    pq.write_table(pa.table({"id": [1, 2, 3], "a": pa.array([1, 2, None], pa.int64())}), p)
    with pytest.raises(DataError, match=r"column 'a', row 3: missing"):
        load_table(TableSpec(p, "id"))
    pq.write_table(pa.table({"id": [1, 2, 3], "a": [1.0, 2.0, float("inf")]}), p)
    with pytest.raises(DataError, match=r"column 'a', row 3: non-finite value inf"):
        load_table(TableSpec(p, "id"))
    pq.write_table(pa.table({"id": [1, 2, 3], "a": [1.0, 1e300, 2.0]}), p)  # overflows float32
    with pytest.raises(DataError, match=r"column 'a', row 2: non-finite"):
        load_table(TableSpec(p, "id"))


def test_parquet_text_feature_column(tmp_path):
    p = tmp_path / "t.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3], "a": ["1.5", "2", "lots"]}), p)
    with pytest.raises(DataError, match=r"column 'a', row 3: non-numeric value 'lots'"):
        load_table(TableSpec(p, "id"))
    pq.write_table(pa.table({"id": [1, 2], "a": ["1.5", "2"]}), p)  # numbers stored as text are fine
    np.testing.assert_array_equal(load_table(TableSpec(p, "id")).features[:, 0], [1.5, 2.0])


def test_parquet_non_numeric_type(tmp_path):
    import datetime

    p = tmp_path / "t.parquet"
    pq.write_table(pa.table({"id": [1], "when": [datetime.date(2020, 1, 2)]}), p)
    with pytest.raises(DataError, match=r"column 'when', row 1: non-numeric value .*date32"):
        load_table(TableSpec(p, "id"))


def test_npz_errors(tmp_path):
    p = tmp_path / "t.npz"
    np.savez(p, id=np.array([1, 2]), a=np.array([1.0, np.nan]))
    with pytest.raises(DataError, match=r"t.npz: column 'a', row 2: NaN value"):
        load_table(TableSpec(p, "id"))
    np.savez(p, id=np.array([1, 2]), a=np.array(["1", "x"]))
    with pytest.raises(DataError, match=r"column 'a', row 2: non-numeric value 'x'"):
        load_table(TableSpec(p, "id"))
    np.savez(p, id=np.array([1, 2]), a=np.ones((2, 2)))
    with pytest.raises(DataError, match=r"'a' has shape \(2, 2\)"):
        load_table(TableSpec(p, "id"))
    np.savez(p, id=np.array([1, 2]), a=np.ones(3))
    with pytest.raises(DataError, match="different lengths"):
        load_table(TableSpec(p, "id"))
    np.savez(p, id=np.array([1.0, 2.0]), a=np.ones(2))
    with pytest.raises(DataError, match="IDs must be integers or text"):
        load_table(TableSpec(p, "id"))
    np.save(tmp_path / "single.npy", np.ones(3))
    (tmp_path / "single.npy").rename(tmp_path / "single.npz")
    with pytest.raises(DataError, match="single array"):
        load_table(TableSpec(tmp_path / "single.npz", "id"))


def test_id_errors(tmp_path):
    p = write_csv(tmp_path / "t.csv", "id,a\n1,1\n,2\n")
    with pytest.raises(DataError, match=r"column 'id', row 2: missing \(empty\) ID"):
        load_table(TableSpec(p, "id"))
    q = tmp_path / "t.parquet"
    pq.write_table(pa.table({"id": [1.5, 2.5], "a": [1, 2]}), q)
    with pytest.raises(DataError, match="ID column 'id' has type double"):
        load_table(TableSpec(q, "id"))


def test_label_errors(tmp_path):
    p = write_csv(tmp_path / "t.csv", "id,a,y\n1,1,0\n2,2,\n")
    with pytest.raises(DataError, match=r"column 'y', row 2: missing"):
        load_table(TableSpec(p, "id", label_column="y"))
    with pytest.raises(DataError, match="label column 'y' cannot also be a feature"):
        load_table(TableSpec(p, "id", feature_columns=["a", "y"], label_column="y"))
    with pytest.raises(DataError, match="ID column 'id' cannot also be a feature"):
        load_table(TableSpec(p, "id", feature_columns=["id"]))
    with pytest.raises(DataError, match="listed more than once"):
        load_table(TableSpec(p, "id", feature_columns=["a", "a"]))


def test_duplicate_header_and_empty_table(tmp_path):
    p = write_csv(tmp_path / "t.csv", "id,a,a\n1,1,2\n")
    with pytest.raises(DataError, match="'a' appears more than once"):
        load_table(TableSpec(p, "id"))
    q = write_csv(tmp_path / "e.csv", "id,a\n")
    with pytest.raises(DataError, match="no data rows"):
        load_table(TableSpec(q, "id"))


def test_table_spec_is_frozen_and_normalised(tmp_path):
    s = TableSpec(str(tmp_path / "x.csv"), "id", feature_columns=["a", "b"])
    assert s.feature_columns == ("a", "b") and s.path == tmp_path / "x.csv"
    hash(s)
    with pytest.raises(AttributeError):
        s.id_column = "other"
    with pytest.raises(TypeError):
        TableSpec("x.csv", "id", feature_columns="a")


# ---------------------------------------------------------------------------------------------- streaming (big tables)
# load_table fills the float32 matrix a few columns (Parquet, .npz) or a block of CSV rows at a time. These tests make
# the groups, tiles and blocks tiny so small files take every path: several row groups, several column groups, and
# the fall-back to column-by-column checks when something is wrong.


@pytest.fixture
def tiny_groups(monkeypatch):
    from vfl.train import readers

    monkeypatch.setattr(readers, "_GROUP_COLUMNS", 3)
    monkeypatch.setattr(readers, "_TILE_ROWS", 4)
    monkeypatch.setattr(readers, "_SLICE", 5)
    monkeypatch.setattr(readers._CsvColumns, "_BLOCK_BYTES", 256)


def mixed_columns(n, rng):
    """Every numeric type a feature column may have, with the float32 values loading must give (through float64)."""
    import decimal

    f64 = rng.normal(size=n) * 1e3
    big = rng.integers(-2**62, 2**62, size=n)  # needs more than float32 (and float64) precision
    cols = {
        "f32": pa.array(rng.normal(size=n).astype(np.float32)),
        "f64": pa.array(f64),
        "i64": pa.array(big),
        "u64": pa.array(rng.integers(0, 2**63, size=n).astype(np.uint64) * np.uint64(2)),
        "i8": pa.array(rng.integers(-128, 128, size=n).astype(np.int8)),
        "i32": pa.array(rng.integers(-2**31, 2**31, size=n).astype(np.int32)),
        "flag": pa.array(rng.random(n) < 0.5),
        "half": pa.array(rng.normal(size=n).astype(np.float16)),
        "dict": pa.array(np.round(f64[:n] / 7, 1)).dictionary_encode(),
        "dec": pa.array([decimal.Decimal(f"{v:.3f}") for v in f64], pa.decimal128(12, 3)),
        "text": pa.array([repr(float(v)) for v in f64]),
    }
    expect = {}
    for name, arr in cols.items():
        if pa.types.is_dictionary(arr.type):
            arr = arr.cast(arr.type.value_type)
        if pa.types.is_string(arr.type):
            expect[name] = np.array([float(v) for v in arr.to_pylist()]).astype(np.float32)
        elif pa.types.is_decimal(arr.type):
            expect[name] = np.array([float(v) for v in arr.to_pylist()]).astype(np.float32)
        else:
            expect[name] = arr.to_numpy(zero_copy_only=False).astype(np.float64).astype(np.float32)
    return cols, expect


def test_parquet_row_groups_and_column_groups_give_the_column_by_column_values(tmp_path, tiny_groups):
    rng = np.random.default_rng(3)
    n = 23
    cols, expect = mixed_columns(n, rng)
    p = tmp_path / "t.parquet"
    pq.write_table(pa.table({"id": pa.array([f"r{i}" for i in range(n)]), **cols,
                             "y": pa.array(rng.integers(0, 3, size=n))}), p, row_group_size=5)
    assert pq.ParquetFile(p).num_row_groups == 5
    t = load_table(TableSpec(p, "id", label_column="y"))
    assert t.feature_names == tuple(cols) and t.features.flags.c_contiguous and t.features.dtype == np.float32
    np.testing.assert_array_equal(t.features, np.column_stack([expect[c] for c in cols]))
    assert t.ids == [f"r{i}" for i in range(n)] and t.labels.dtype == np.int64
    # a column subset in another order
    t2 = load_table(TableSpec(p, "id", feature_columns=["text", "f32", "i64"]))
    np.testing.assert_array_equal(t2.features, np.column_stack([expect[c] for c in ("text", "f32", "i64")]))


def test_npz_column_groups_and_compressed_archive(tmp_path, tiny_groups):
    rng = np.random.default_rng(4)
    n = 11
    arrays = {"f32": rng.normal(size=n).astype(np.float32), "f64": rng.normal(size=n) * 1e40,
              "i64": rng.integers(-2**62, 2**62, size=n), "b": rng.random(n) < 0.5, "u8": np.arange(n, dtype=np.uint8),
              "s": np.array([str(v) for v in rng.normal(size=n)])}
    arrays["f64"] = np.clip(arrays["f64"], -1e38, 1e38)
    expect = np.column_stack([np.asarray(v).astype(np.float64).astype(np.float32) for v in arrays.values()])
    for save in (np.savez, np.savez_compressed):
        p = tmp_path / "t.npz"
        save(p, id=np.arange(n), **arrays)
        t = load_table(TableSpec(p, "id"))
        np.testing.assert_array_equal(t.features, expect)
        assert t.ids == list(range(n))


@pytest.mark.parametrize("fmt", ["parquet", "npz", "csv"])
def test_first_bad_value_is_named_in_column_order_whatever_the_grouping(tmp_path, tiny_groups, fmt):
    n = 30
    good = np.arange(n, dtype=np.float64) / 4
    b = good.copy()
    b[[3, 12]] = [np.inf, np.nan]  # a NaN anywhere in a column wins over an infinity before it
    c = good.copy()
    c[0] = np.nan  # a later column: not reached
    over = good.copy()
    over[17] = 1e39  # float64 fine, float32 overflows
    cases = [
        ({"a": good, "b": b, "c": c}, r"column 'b', row 13: NaN value"),
        ({"a": good, "x": good, "y": good, "z": good, "o": over, "c": c},
         r"column 'o', row 18: non-finite value 1e\+39 \(infinite or outside the float32 range\)"),
        ({"a": good, "i": np.where(np.arange(n) == 25, np.inf, good)}, r"column 'i', row 26: non-finite value inf"),
    ]
    for cols, message in cases:
        p = tmp_path / f"t.{fmt}"
        if fmt == "parquet":
            pq.write_table(pa.table({"id": np.arange(n), **cols}), p, row_group_size=7)
        elif fmt == "npz":
            np.savez(p, id=np.arange(n), **cols)
        else:
            names = list(cols)
            p.write_text("id," + ",".join(names) + "\n" + "".join(
                f"{i}," + ",".join(repr(float(cols[k][i])) for k in names) + "\n" for i in range(n)))
        if fmt == "csv":
            message = message.replace("NaN value", "missing")  # 'nan' in a CSV is a missing value (NA)
        with pytest.raises(DataError, match=rf"t\.{fmt}: {message}"):
            load_table(TableSpec(p, "id"))


def test_csv_streamed_in_blocks_gives_the_values_of_a_full_read(tmp_path, tiny_groups):
    rng = np.random.default_rng(5)
    n = 120  # many 256-byte blocks
    f = rng.normal(size=n) * 1e3
    rows = [f"{'0' if i % 2 else ''}{i},{float(f[i])!r},{i * 3},{f[i] / 3:.12g},{'yes' if i % 3 else 'no'}\n"
            for i in range(n)]
    p = write_csv(tmp_path / "t.csv", "id,a,b,c,label\n" + "".join(rows))
    t = load_table(TableSpec(p, "id", label_column="label"))
    assert t.ids == [f"{'0' if i % 2 else ''}{i}" for i in range(n)]  # "01" keeps the column text
    expect = np.column_stack([f, np.arange(n) * 3.0, [float(f"{v / 3:.12g}") for v in f]]).astype(np.float32)
    np.testing.assert_array_equal(t.features, expect)
    assert list(t.labels) == ["yes" if i % 3 else "no" for i in range(n)]
    # text as float64 first, then float32: 1 + 2**-24 is a float32 tie, which rounds to even (1.0), not up
    q = write_csv(tmp_path / "tie.csv", "id,a\n1,1.0000000596046448\n2,1.5\n")
    np.testing.assert_array_equal(load_table(TableSpec(q, "id")).features[:, 0], np.float32([1.0, 1.5]))


@pytest.mark.parametrize("cell, message", [
    ("abc", r"column 'b', row 100: non-numeric value 'abc'"),
    ("", r"column 'b', row 100: missing"),
    ("NA", r"column 'b', row 100: missing"),
    ("1e39", r"column 'b', row 100: non-finite value 1e\+39"),
    ("-inf", r"column 'b', row 100: non-finite value -inf"),
])
def test_csv_bad_cell_in_a_late_block_is_named(tmp_path, tiny_groups, cell, message):
    n = 120
    rows = [f"{i},{i},{cell if i == 99 else i / 2},1\n" for i in range(n)]
    p = write_csv(tmp_path / "t.csv", "id,a,b,c\n" + "".join(rows))
    with pytest.raises(DataError, match=message):
        load_table(TableSpec(p, "id"))


def test_csv_booleans_and_integers_through_the_general_read(tmp_path, tiny_groups):
    n = 50
    p = write_csv(tmp_path / "t.csv", "id,flag,k\n" + "".join(f"{i},{'true' if i % 2 else 'false'},{i}\n"
                                                               for i in range(n)))
    t = load_table(TableSpec(p, "id"))
    np.testing.assert_array_equal(t.features, np.column_stack([np.arange(n) % 2, np.arange(n)]).astype(np.float32))


def test_fill_tiles_with_pieces_not_aligned_across_columns():
    from vfl.train.readers import _Columns

    a = np.arange(10, dtype=np.float64)
    block = np.empty((10, 2), np.float32)
    assert _Columns._fill_tiles([[a[:3], a[3:]], [a[:6] * 2, a[6:] * 2]], block)
    np.testing.assert_array_equal(block, np.column_stack([a, a * 2]))
    assert not _Columns._fill_tiles([[a], [np.where(a == 4, np.nan, a)]], block)


# -------------------------------------------------------------------------------------------------------------- labels


def test_multiclass_string_labels_sorted_mapping():
    y, enc = encode_labels(np.array(["dog", "cat", "emu", "cat"], dtype=object), "multiclass")
    assert enc.classes == ("cat", "dog", "emu") and enc.n_classes == 3 and enc.output_width == 3
    assert y.dtype == np.int64 and y.tolist() == [1, 0, 2, 0]
    assert enc.decode(y) == ["dog", "cat", "emu", "cat"]
    assert LabelEncoding.from_dict(json.loads(json.dumps(enc.to_dict()))) == enc


def test_multiclass_int_labels_and_explicit_classes():
    y, enc = encode_labels(np.array([5, 1, 2, 5]), "multiclass")
    assert enc.classes == (1, 2, 5) and y.tolist() == [2, 0, 1, 2]
    y2, enc2 = encode_labels(np.array([1, 1]), "multiclass", classes=[0, 1, 2])
    assert y2.tolist() == [1, 1] and enc2.output_width == 3
    with pytest.raises(DataError, match=r"label row 2: value 7 is not one of the classes"):
        enc.encode([1, 7])
    with pytest.raises(DataError, match="at least 2 distinct"):
        encode_labels([3, 3], "multiclass")


@pytest.mark.parametrize("raw, expect", [([0, 1, 1], [0, 1, 1]), ([-1, 1, -1], [0, 1, 0]),
                                         (["yes", "no"], [1, 0]), ([True, False], [1, 0]),
                                         ([0.0, 1.0], [0, 1])])
def test_binary_labels(raw, expect):
    y, enc = encode_labels(np.array(raw), "binary")
    assert y.dtype == np.float32 and y.tolist() == expect and enc.output_width == 1


def test_binary_label_errors():
    with pytest.raises(DataError, match="exactly 2 distinct label values, found 3"):
        encode_labels(np.array([0, 1, 2]), "binary")
    with pytest.raises(DataError, match="found 1"):
        encode_labels(np.array([1, 1]), "binary")


def test_regression_labels():
    y, enc = encode_labels(np.array([1, 2.5, -3]), "regression")
    assert y.dtype == np.float32 and y.tolist() == [1, 2.5, -3] and enc.classes == ()
    with pytest.raises(DataError, match="regression labels must be numbers"):
        encode_labels(np.array(["a"], dtype=object), "regression")
    with pytest.raises(DataError, match="unknown task"):
        encode_labels([1], "ranking")


# -------------------------------------------------------------------------------------------------------- standardiser


def test_standardizer_fit_transform_round_trip():
    rng = np.random.default_rng(0)
    x = np.column_stack([rng.normal(5, 3, 200), np.full(200, 7.0), rng.uniform(0, 1e4, 200)]).astype(np.float32)
    train, other = x[:150], x[150:]
    s = Standardizer.fit(train)
    z = s.transform(train)
    assert z.dtype == np.float32 and z.flags.c_contiguous
    np.testing.assert_allclose(z.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(z[:, [0, 2]].std(axis=0), 1, atol=1e-5)
    assert s.std[1] == 1.0 and np.all(z[:, 1] == 0)  # constant column: std -> 1
    s2 = Standardizer.from_dict(json.loads(json.dumps(s.to_dict())))
    np.testing.assert_array_equal(s2.transform(other), s.transform(other))
    with pytest.raises(DataError, match="fitted on 3 features"):
        s.transform(x[:, :2])
    with pytest.raises(DataError, match="at least one row"):
        Standardizer.fit(np.zeros((0, 3)))
    with pytest.raises(DataError, match="std finite and > 0"):
        Standardizer.from_dict({"mean": [0.0], "std": [0.0]})
