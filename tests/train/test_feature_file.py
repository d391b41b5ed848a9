"""The on-disk feature matrix (vfl.train.feature_file) and the readers that stream into it.

A table loaded with ``load_table(spec, features_to=PATH)`` has exactly the values of the in-RAM load; CSV and Parquet
reach the file in several blocks of rows (never the whole table in one piece); a segment reading its batches from the
file (and standardising them as they are read) trains to bit-identical weights as one over the matrix in RAM, and
``Standardizer.fit`` over blocks gives the whole-array numbers bit for bit.
"""

from __future__ import annotations

import os
import stat

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from vfl.train import readers
from vfl.train.data import DataError, Standardizer, TableSpec, load_table
from vfl.train.feature_file import FeatureFile, write_feature_file
from vfl.train.models import build_model
from vfl.train.central import OptimizerSpec
from vfl.train.segments import TorchBottom


def table_columns(n: int, d: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"x{j}": (rng.normal(size=n) * 10 ** (j % 4) + 100 * j).astype(np.float32) for j in range(d)}


def write_csv(path, cols: dict[str, np.ndarray]) -> None:
    n = len(next(iter(cols.values())))
    lines = ["id," + ",".join(cols)] + [
        f"u{i}," + ",".join(repr(float(c[i])) for c in cols.values()) for i in range(n)]
    path.write_text("\n".join(lines) + "\n")


def write_parquet(path, cols: dict[str, np.ndarray], row_group_size: int) -> None:
    n = len(next(iter(cols.values())))
    pq.write_table(pa.table({"id": [f"u{i}" for i in range(n)], **cols}), path, row_group_size=row_group_size)


def test_a_feature_file_is_a_private_npy_that_numpy_reads_and_take_copies_rows(tmp_path):
    x = np.arange(60, dtype=np.float32).reshape(12, 5)
    path = tmp_path / "f.npy"

    def fill(matrix, done):
        for lo in range(0, 12, 5):
            matrix[lo:lo + 5] = x[lo:lo + 5]
            done(min(12, lo + 5))

    write_feature_file(path, 12, 5, fill)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    np.testing.assert_array_equal(np.load(path), x)
    for f in (FeatureFile(path), FeatureFile(path, resident_bytes=0)):  # mapped (small file), read with pread
        for rows in ([11, 0, 3], [2, 3, 4, 6, 7], [5], []):  # any order; sorted and dense: one read
            got = f.take(np.array(rows, dtype=np.int64))
            np.testing.assert_array_equal(got, x[rows].reshape(len(rows), 5))
            assert got.flags.writeable and got.flags.c_contiguous and got.dtype == np.float32
        np.testing.assert_array_equal(f[2:7], x[2:7])
        with pytest.raises(IndexError):
            f.take(np.array([12]))
        f.close()


def test_a_fill_that_fails_leaves_no_file_and_a_truncated_file_is_refused(tmp_path):
    path = tmp_path / "f.npy"

    def fail(matrix, done):
        matrix[:2] = 1
        raise DataError("bad value")

    with pytest.raises(DataError):
        write_feature_file(path, 4, 3, fail)
    assert list(tmp_path.iterdir()) == []
    write_feature_file(path, 4, 3, lambda m, done: m.fill(2))
    data = path.read_bytes()
    path.write_bytes(data[:-4])
    with pytest.raises(ValueError, match="not a complete"):
        FeatureFile(path)


@pytest.mark.parametrize("fmt", ["csv", "parquet", "npz"])
def test_load_table_into_a_feature_file_gives_the_values_of_the_load_into_ram(tmp_path, fmt):
    cols = table_columns(300, 6)
    path = tmp_path / f"t.{fmt}"
    if fmt == "csv":
        write_csv(path, cols)
    elif fmt == "parquet":
        write_parquet(path, cols, row_group_size=70)
    else:
        np.savez(path, id=np.arange(300), **cols)
    ram = load_table(TableSpec(path, "id"))
    disk = load_table(TableSpec(path, "id"), features_to=tmp_path / "features.npy")
    assert isinstance(disk.features, FeatureFile) and disk.features.shape == ram.features.shape
    np.testing.assert_array_equal(np.load(tmp_path / "features.npy"), ram.features)
    assert disk.ids == ram.ids and disk.feature_names == ram.feature_names


def blocks_of(path, names, n) -> list[int]:
    """The ``done(hi)`` calls of one fill: where each block of rows ended."""
    columns = readers.open_columns(path, "id")
    columns.load(["id", *names], names)
    seen: list[int] = []
    out = np.empty((n, len(names)), np.float32)
    columns.fill_features(names, out, seen.append)
    columns.close()
    return seen


def test_a_csv_is_streamed_into_the_matrix_in_several_blocks_of_rows(tmp_path, monkeypatch):
    cols = table_columns(2000, 4)
    path = tmp_path / "t.csv"
    write_csv(path, cols)
    monkeypatch.setattr(readers._CsvColumns, "_BLOCK_BYTES", 4096)
    seen = blocks_of(path, list(cols), 2000)
    assert len(seen) > 5 and seen == sorted(seen) and seen[-1] == 2000 and seen[0] < 2000


def test_a_parquet_file_is_streamed_in_blocks_of_rows_even_within_one_row_group(tmp_path, monkeypatch):
    cols = table_columns(1000, 4)
    path = tmp_path / "t.parquet"
    write_parquet(path, cols, row_group_size=1000)  # one row group: still read a block of rows at a time
    monkeypatch.setattr(readers._ParquetColumns, "_ROW_BLOCK", 64)
    seen = blocks_of(path, list(cols), 1000)
    assert seen == list(range(64, 1000, 64)) + [1000]


def test_a_bad_value_in_a_late_parquet_block_is_named_and_leaves_no_feature_file(tmp_path, monkeypatch):
    monkeypatch.setattr(readers._ParquetColumns, "_ROW_BLOCK", 50)
    cols = table_columns(400, 3)
    cols["x1"][333] = np.nan
    path = tmp_path / "t.parquet"
    write_parquet(path, cols, row_group_size=100)
    with pytest.raises(DataError, match=r"column 'x1', row 334: NaN value"):
        load_table(TableSpec(path, "id"), features_to=tmp_path / "features.npy")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.parquet"]


def old_fit(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What Standardizer.fit computed before it read blocks: numpy over the whole float64 array."""
    x = np.asarray(x, dtype=np.float64)
    std = x.std(axis=0)
    return x.mean(axis=0), np.where((x.max(axis=0) == x.min(axis=0)) | ~(std > 0), 1.0, std)


def test_standardizer_fit_over_blocks_of_a_feature_file_equals_the_whole_array_fit_bit_for_bit(tmp_path, monkeypatch):
    import vfl.train.data as data

    rng = np.random.default_rng(3)
    x = (rng.normal(size=(5003, 9)) * 1e4 + 5e4).astype(np.float32)
    x[:, 4] = 7.0  # a constant column gets std 1
    path = tmp_path / "f.npy"
    write_feature_file(path, *x.shape, lambda m, done: m.__setitem__(slice(None), x))
    rows = np.sort(rng.choice(len(x), 4000, replace=False))
    mean, std = old_fit(x[rows])
    for block in (1, 97, 8192):
        monkeypatch.setattr(data, "_FIT_ROWS", block)
        for source in (x, FeatureFile(path)):
            s = Standardizer.fit(source, rows)
            assert np.array_equal(s.mean, mean) and np.array_equal(s.std, std)
    assert np.array_equal(Standardizer.fit(x).mean, old_fit(x)[0])


def bottom_over(features, rows, scaler):
    model = build_model(features.shape[1], {"widths": [8, 4]}, out_features=4, seed=5)
    bottom = TorchBottom(model, OptimizerSpec.from_dict({"kind": "adam", "lr": 0.01}).build(model.parameters()),
                         features, dropout_seed=11, rows=rows)
    bottom.scaler = scaler
    return bottom


def test_training_from_the_feature_file_gives_bit_identical_weights_to_training_from_ram(tmp_path, one_thread):
    rng = np.random.default_rng(4)
    x = (rng.normal(size=(700, 6)) * 300 + 40).astype(np.float32)
    path = tmp_path / "f.npy"
    write_feature_file(path, *x.shape, lambda m, done: m.__setitem__(slice(None), x))
    aligned = rng.permutation(700)[:500]  # the PSI's order: aligned row i is file row aligned[i]
    scaler = Standardizer.fit(x, np.sort(aligned[:400]))
    ram, disk = bottom_over(x, aligned, scaler), bottom_over(FeatureFile(path, resident_bytes=4096), aligned, scaler)
    for step in range(30):
        batch = rng.choice(500, 32, replace=False)
        grad = rng.normal(size=(32, 4)).astype(np.float32)
        outs = [b.forward(step, batch, True) for b in (ram, disk)]
        assert np.array_equal(outs[0], outs[1])
        for b in (ram, disk):
            b.backward(step, grad)
    for (name, a), (_, b) in zip(ram.model.state_dict().items(), disk.model.state_dict().items()):
        assert torch.equal(a, b), name
    batch = np.arange(500)
    assert np.array_equal(ram.forward(99, batch, False), disk.forward(99, batch, False))  # prediction: same outputs


def test_a_bottom_reads_through_the_callers_aligned_rows_without_a_copy():
    """The aligned rows (8 bytes a row, 80 MB at 10M) are held once: the bottom indexes through the PSI's own array
    when it is int64 and contiguous, and copies anything else."""
    x = np.arange(40, dtype=np.float32).reshape(10, 4)
    aligned = np.array([3, 1, 7, 0], dtype=np.int64)
    shared = bottom_over(x, aligned, None)
    assert np.shares_memory(shared.rows.numpy(), aligned)
    assert np.array_equal(shared.inputs(np.array([0, 2])).numpy(), x[[3, 7]])
    copied = bottom_over(x, aligned.astype(np.int32), None)
    assert copied.rows.dtype == torch.int64 and np.array_equal(copied.rows.numpy(), aligned)
