"""A training node's feature file (vfl.node.aligned): written once at start-up, 0600, reused only while current.

- ``load_ids`` of a training session puts the features in ``OUTPUT/PARTY-features-KEY.npy`` (mode 0600) and the
  table's ``features`` read from it; the same table at the next start is not read again (its feature columns are not
  touched), a changed table gets a new file and the old one goes;
- a node killed (SIGKILL) after writing the file but before its rename leaves only a hidden temporary, which is never
  used: the next start removes it and writes the file again;
- the bottom built over the file (standardised as its batches are read) trains to bit-identical weights as one over
  the same table in RAM.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch

from vfl.node.alignment import load_ids
from vfl.node.training import build_bottom
from vfl.train import readers
from vfl.train.data import TableSpec, load_table
from vfl.train.feature_file import FeatureFile

from .test_files_hardening import data_holder_config
from .test_training_nodes import write_table

ROOT = Path(__file__).resolve().parents[2]


def data_holder(tmp_path: Path):
    """A real data holder config of a training session (20 rows, features a0..a2, standardised)."""
    return data_holder_config(tmp_path)[1]


def feature_files(cfg) -> list[Path]:
    return sorted(cfg.train.output.glob("dh1-features-*.npy"))


def test_the_features_go_to_a_private_file_reused_while_the_table_is_unchanged(tmp_path, monkeypatch):
    cfg = data_holder(tmp_path)
    table = load_ids(cfg).table
    [path] = feature_files(cfg)
    assert isinstance(table.features, FeatureFile) and table.features.path == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    np.testing.assert_array_equal(np.load(path), load_table(TableSpec(cfg.data.path, "id")).features)
    inode = path.stat().st_ino

    def no_reading(*args, **kwargs):
        raise AssertionError("the feature columns were read again")

    with monkeypatch.context() as m:
        m.setattr(readers._CsvColumns, "fill_features", no_reading)
        again = load_ids(cfg).table
    assert feature_files(cfg) == [path] and path.stat().st_ino == inode and again.features.shape == (20, 3)

    write_table(cfg.data.path, [f"id-{i}" for i in range(20)],  # a changed table is another file: written anew,
                {f"a{j}": np.arange(20, dtype=np.float32) * (j + 2) for j in range(3)})  # the old one goes
    changed = load_ids(cfg).table
    [new] = feature_files(cfg)
    assert new != path and not path.exists()
    np.testing.assert_array_equal(np.asarray(changed.features), load_table(TableSpec(cfg.data.path, "id")).features)


KILLED = textwrap.dedent("""
    import os, signal, sys
    import vfl.files
    from vfl.node import load_config
    from vfl.node.alignment import load_ids

    def replace(src, dst):  # the file is complete and synced: the process dies before it gets its name
        os.kill(os.getpid(), signal.SIGKILL)

    vfl.files.os.replace = replace
    load_ids(load_config(sys.argv[1]))
""")


def test_a_node_killed_between_writing_and_renaming_the_file_leaves_nothing_that_is_used(tmp_path):
    cfg = data_holder(tmp_path)
    proc = subprocess.run([sys.executable, "-c", KILLED, str(cfg.path)], cwd=ROOT, capture_output=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert feature_files(cfg) == []
    [temp] = cfg.train.output.glob(".dh1-features-*.npy.*.tmp")
    table = load_ids(cfg).table  # the next start: the temporary goes, the file is written and used
    assert not temp.exists() and len(feature_files(cfg)) == 1
    np.testing.assert_array_equal(np.asarray(table.features), load_table(TableSpec(cfg.data.path, "id")).features)


def test_a_bottom_over_the_feature_file_trains_bit_identically_to_one_over_the_table_in_ram(tmp_path):
    cfg = data_holder(tmp_path)
    on_disk = load_ids(cfg).table
    in_ram = load_table(TableSpec(cfg.data.path, "id"))
    assert isinstance(in_ram.features, np.ndarray)
    rng = np.random.default_rng(5)
    aligned = rng.permutation(20)[:16]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        bottoms = [build_bottom(cfg, t, aligned) for t in (in_ram, on_disk)]
        for b in bottoms:
            b.prepare(np.arange(12))  # standardised on the training rows, as the SCHEDULE names them
        assert np.array_equal(bottoms[0].scaler.mean, bottoms[1].scaler.mean)
        for step in range(12):
            batch = rng.choice(16, 8, replace=False)
            grad = rng.normal(size=(8, 4)).astype(np.float32)
            outs = [b.forward(step, batch, True) for b in bottoms]
            assert np.array_equal(outs[0], outs[1])
            for b in bottoms:
                b.backward(step, grad)
    finally:
        torch.set_num_threads(before)
    for (name, a), (_, b) in zip(*(b.model.state_dict().items() for b in bottoms)):
        assert torch.equal(a, b), name


NO_ROOM = textwrap.dedent("""
    import resource, signal, sys
    from vfl.node import load_config
    from vfl.node.alignment import AlignmentError, load_ids

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit is then EFBIG, as a full disk is ENOSPC
    resource.setrlimit(resource.RLIMIT_FSIZE, (200, 200))  # room for the .npy header, not for the 20 x 3 floats
    try:
        load_ids(load_config(sys.argv[1]))
    except AlignmentError as exc:
        print(exc)
""")


def test_no_room_for_the_feature_file_is_one_line_naming_it_and_leaves_no_file(tmp_path):
    cfg = data_holder(tmp_path)
    proc = subprocess.run([sys.executable, "-c", NO_ROOM, str(cfg.path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    [line] = proc.stdout.splitlines()
    assert "cannot write the feature file" in line and str(cfg.train.output) in line, line
    assert feature_files(cfg) == [] and not list(cfg.train.output.glob(".dh1-features-*"))


def test_a_training_data_holder_holds_its_ids_as_items_not_as_python_objects(tmp_path):
    """During training a data holder needs only its row count: its IDs stay in the compact item store (10M string
    IDs as a Python list were about 670 MiB for the whole training), and decode on demand to the same values."""
    from vfl.node.alignment import StoredIds

    cfg = data_holder(tmp_path)
    ids = load_ids(cfg)
    expected = load_table(TableSpec(cfg.data.path, "id")).ids
    assert isinstance(ids.table.ids, StoredIds) and ids.table.ids.items is ids.items
    assert len(ids.table.ids) == ids.table.n_rows == len(expected)
    assert list(ids.table.ids) == expected and ids.table.ids[3] == expected[3] and ids.table.ids[2:5] == expected[2:5]


def _mapped_from_unlinked_file(array: np.ndarray) -> bool:
    """Is ``array`` backed by a file mapping (a ``numpy.memmap`` whose file no longer has a name)?"""
    base = array
    while not isinstance(base, np.memmap) and isinstance(getattr(base, "base", None), np.ndarray):
        base = base.base
    if not isinstance(base, np.memmap):
        return False
    maps = Path("/proc/self/maps").read_text().splitlines()
    return any(line.endswith("(deleted)") and ".dh1-ids." in line for line in maps)


def test_a_training_data_holder_keeps_its_id_index_as_page_cache_not_anonymous_memory(tmp_path):
    """Issue 16: the ID encodings and the distinct-row index (about 29 bytes a row) are memory-mapped from an
    unlinked 0600 file in [train].output, so training a 10M-row data holder does not carry them as anonymous memory;
    nothing is left on disk, and a hidden temporary of a killed earlier start is removed."""
    cfg = data_holder(tmp_path)
    cfg.train.output.mkdir(parents=True, exist_ok=True)
    stale = cfg.train.output / ".dh1-ids.killed.tmp"
    stale.write_bytes(b"half")
    ids = load_ids(cfg)
    expected = load_table(TableSpec(cfg.data.path, "id")).ids
    assert list(ids.table.ids) == expected
    assert ids.unique_rows.tolist() == list(range(len(expected)))
    for array in (ids.items.blob, ids.items.offsets, ids.unique_rows):
        assert _mapped_from_unlinked_file(array)
    assert not stale.exists()
    assert not list(cfg.train.output.glob(".dh1-ids*")) and not list(cfg.train.output.glob("dh1-ids*"))


def test_no_room_for_the_id_index_is_one_line_naming_the_folder(tmp_path, monkeypatch):
    from vfl.node.alignment import AlignmentError, ids_on_disk
    from vfl.psi.items import ItemStore

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "save", full)
    folder = tmp_path / "out"
    try:
        ids_on_disk(ItemStore.from_items([b"i:1", b"i:2"]), np.arange(2), folder, "dh1")
    except AlignmentError as exc:
        text = str(exc)
    else:
        raise AssertionError("no error")
    assert "No space left on device" in text and str(folder) in text and "[train].output" in text
    assert list(folder.iterdir()) == []


def test_a_data_holders_ids_become_items_straight_from_arrow_with_the_encoding_of_the_list(tmp_path):
    """A training data holder's table is read with ``id_items``: CSV and Parquet ID columns go to the item store as
    one Arrow array (no Python object per ID: they were most of a 10M-row data holder's start-up peak), encoded
    exactly as the list of native IDs is (the label holder, and .npz tables, still read the list)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vfl.psi import encode_ids
    from vfl.psi.items import encode_id_array

    columns = {
        "csv-int": ("1\n-0\n22\n", "csv"),
        "csv-text": ("007\n-0\nx y\n", "csv"),
        "parquet-int": (pa.array([5, -3, 0], pa.int64()), "parquet"),
        "parquet-text": (pa.array(["007", "é", "-0"]), "parquet"),
    }
    for name, (values, kind) in columns.items():
        path = tmp_path / f"{name}.{kind}"
        if kind == "csv":
            path.write_text("id,f\n" + "".join(f"{v},{i}\n" for i, v in enumerate(values.splitlines())))
        else:
            pq.write_table(pa.table({"id": values, "f": pa.array([0.5, 1.5, 2.5])}), path)
        spec = TableSpec(path, "id")
        seen = []
        table = load_table(spec, id_items=lambda array, k: seen.append(k) or encode_id_array(array, k))
        assert len(seen) == 1, name
        assert list(table.ids) == encode_ids(load_table(spec).ids), name
        assert table.n_rows == 3 and table.features.shape == (3, 1), name
