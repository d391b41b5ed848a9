"""load_table streams: its peak memory is about the float32 matrix, not the table held twice.

Measured in a fresh interpreter (peak ``VmHWM`` from /proc after the load, minus ``VmRSS`` before it; a small file
of the same format is loaded first so that the libraries' code is already paged in). Reading a whole Parquet table and
converting it column by column through float64 peaked at about 4 times the matrix; streaming peaks at about 1.7 times
(Parquet, 200 MB; the rest is the IDs and the readers' buffers, which do not grow with the table) and 1.3 times
(.npz). The bound below (2.5 times) sits far from both, and does not depend on the machine being quiet.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (Linux)")

ROWS, COLS = 500_000, 100  # 200 MB of float32: far above the interpreter's own noise and the readers' buffers

PROBE = """
import json, sys
def status():
    return {l.split()[0].rstrip(":"): int(l.split()[1]) * 1024 for l in open("/proc/self/status")
            if l.startswith(("VmHWM", "VmRSS"))}
import numpy, pyarrow, pyarrow.parquet
from vfl.train.data import TableSpec, load_table
load_table(TableSpec(sys.argv[2], "id"))  # a small file of the same format first: the libraries' code is paged in
before = status()["VmRSS"]
table = load_table(TableSpec(sys.argv[1], "id"))
after = status()
print(json.dumps({"peak": after["VmHWM"] - before, "rss": after["VmRSS"] - before, "bytes": table.features.nbytes,
                  "shape": list(table.features.shape)}))
"""


def peak_of_load(path: Path, small: Path) -> dict:
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", PROBE, str(path), str(small)], cwd=root, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONPATH": str(root)})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def columns(rng, rows: int = ROWS) -> dict[str, np.ndarray]:
    return {f"x{j}": rng.random(rows, dtype=np.float32) for j in range(COLS)}


def test_parquet_load_peak_is_about_the_matrix(tmp_path):
    rng = np.random.default_rng(0)
    p = tmp_path / "big.parquet"
    pq.write_table(pa.table({"id": np.arange(ROWS), **columns(rng)}), p, compression="NONE", row_group_size=65536)
    small = tmp_path / "small.parquet"
    pq.write_table(pa.table({"id": np.arange(100), **columns(rng, 100)}), small, compression="NONE")
    m = peak_of_load(p, small)
    assert m["shape"] == [ROWS, COLS] and m["bytes"] == ROWS * COLS * 4
    assert m["peak"] < 2.5 * m["bytes"], m


def test_npz_load_peak_is_about_the_matrix(tmp_path):
    rng = np.random.default_rng(1)
    p = tmp_path / "big.npz"
    np.savez(p, id=np.arange(ROWS), **columns(rng))
    small = tmp_path / "small.npz"
    np.savez(small, id=np.arange(100), **columns(rng, 100))
    m = peak_of_load(p, small)
    assert m["shape"] == [ROWS, COLS]
    assert m["peak"] < 2.5 * m["bytes"], m
