"""`vfl psi` between real node processes on loopback: exact intersections, one order, clear errors."""

from __future__ import annotations

import csv
import random
import subprocess
import sys
from pathlib import Path

import pytest

from vfl.launch import prepare_session

from .procs import Nodes

FAST = {"heartbeat": 0.3, "peer": 5.0, "handshake": 20.0, "join": 60.0, "progress": 30.0}


def write_ids(path: Path, column: str, ids: list, extra: bool = True) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([column, "x"] if extra else [column])
        for i in ids:
            w.writerow([i, 1.5] if extra else [i])


def read_aligned(path: Path) -> list[tuple[int, str]]:
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    return [(int(r[0]), r[1]) for r in rows[1:]]


def psi_session(tmp_path: Path, sets: dict[str, list], *, psi: dict | None = None) -> dict[str, Path]:
    data = {}
    for party, ids in sets.items():
        write_ids(tmp_path / f"{party}.csv", "customer_id", ids)
        data[party] = {"path": f"{party}.csv", "id_column": "customer_id"}
    return prepare_session(
        tmp_path,
        data_holders=[p for p in sets if p != "bank"],
        run="psi-test",
        timeouts=FAST,
        link_check={"rounds": 0},
        data=data,
        psi={"workers": 1, "chunk_size": 64, **(psi or {})},
    )


def run_psi(tmp_path: Path, configs: dict[str, Path], timeout: float = 90) -> dict[str, object]:
    with Nodes(tmp_path) as nodes:
        procs = {name: nodes.start_command(["psi", "--config", str(path)], name) for name, path in configs.items()}
        codes = {name: p.wait(timeout=timeout) for name, p in procs.items()}
        return {"codes": codes, "output": {name: p.output for name, p in procs.items()}}


def test_P7_P8_three_parties_learn_the_same_intersection_in_the_same_order(tmp_path):
    rng = random.Random(7)
    universe = [f"cust-{i:05d}" for i in range(600)] + ["Zoë", "李雷", "x" * 300]
    sets = {
        "bank": rng.sample(universe, 400) + ["Zoë", "x" * 300],
        "dh1": rng.sample(universe, 450) + ["Zoë", "李雷", "x" * 300],
        "dh2": rng.sample(universe, 500) + ["Zoë", "x" * 300],
    }
    sets = {k: list(dict.fromkeys(v)) for k, v in sets.items()}
    configs = psi_session(tmp_path, sets)
    result = run_psi(tmp_path, configs)
    assert result["codes"] == {"bank": 0, "dh1": 0, "dh2": 0}, result["output"]
    expected = set(sets["bank"]) & set(sets["dh1"]) & set(sets["dh2"])
    aligned = {name: read_aligned(tmp_path / f"{name}-aligned.csv") for name in sets}
    orders = {name: [i for _, i in rows] for name, rows in aligned.items()}
    assert orders["bank"] == orders["dh1"] == orders["dh2"]
    assert set(orders["bank"]) == expected and len(orders["bank"]) == len(expected)
    for name, rows in aligned.items():  # row numbers point at the party's own file rows
        assert all(sets[name][r] == i for r, i in rows)
    assert orders["bank"] != sorted(orders["bank"])  # the order is the joint-token order, not the IDs'
    assert "rows aligned:" in result["output"]["bank"]


def test_integer_ids_and_a_single_data_holder(tmp_path):
    sets = {"bank": list(range(0, 300, 2)), "dh1": list(range(0, 300, 3))}
    configs = psi_session(tmp_path, sets)
    result = run_psi(tmp_path, configs)
    assert result["codes"] == {"bank": 0, "dh1": 0}, result["output"]
    bank = [int(i) for _, i in read_aligned(tmp_path / "bank-aligned.csv")]
    dh1 = [int(i) for _, i in read_aligned(tmp_path / "dh1-aligned.csv")]
    assert bank == dh1 and set(bank) == set(range(0, 300, 6))


def test_duplicate_ids_are_a_clear_error_before_any_network_activity(tmp_path):
    sets = {"bank": ["a", "b", "c"], "dh1": ["a", "b", "a", "c", "b"]}
    configs = psi_session(tmp_path, sets)
    result = subprocess.run(
        [sys.executable, "-m", "vfl", "psi", "--config", str(configs["dh1"])], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "2 duplicate ID(s), e.g. 'a'" in result.stderr and "[psi].dedupe = true" in result.stderr
    assert "connecting" not in result.stderr


def test_dedupe_keeps_the_first_row_of_each_id(tmp_path):
    sets = {"bank": ["a", "b", "c"], "dh1": ["a", "b", "a", "c", "b"]}
    configs = psi_session(tmp_path, sets, psi={"dedupe": True})
    result = run_psi(tmp_path, configs)
    assert result["codes"] == {"bank": 0, "dh1": 0}, result["output"]
    assert sorted(read_aligned(tmp_path / "dh1-aligned.csv")) == [(0, "a"), (1, "b"), (3, "c")]


def test_P7_an_empty_intersection_is_a_clear_error_at_every_party(tmp_path):
    sets = {"bank": ["a", "b"], "dh1": ["c", "d"]}
    configs = psi_session(tmp_path, sets)
    result = run_psi(tmp_path, configs)
    assert result["codes"] == {"bank": 1, "dh1": 1}, result["output"]
    assert "the intersection across all parties has 0 rows" in result["output"]["bank"]
    assert "the intersection across all parties has 0 rows" in result["output"]["dh1"]
    assert not (tmp_path / "bank-aligned.csv").exists()


def test_P7_fewer_rows_than_min_rows_ends_the_session(tmp_path):
    sets = {"bank": [f"u{i}" for i in range(30)], "dh1": [f"u{i}" for i in range(25, 60)]}
    configs = psi_session(tmp_path, sets, psi={"min_rows": 10})
    result = run_psi(tmp_path, configs)
    assert result["codes"] == {"bank": 1, "dh1": 1}, result["output"]
    assert "has 5 rows, fewer than the 10 this session needs" in result["output"]["bank"]
