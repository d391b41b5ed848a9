"""Bucketed PSI (PROTOCOL.md 1.8, [P12]-[P17]) between real `vfl psi` processes on loopback."""

from __future__ import annotations

import random
from pathlib import Path

from .test_psi_nodes import psi_session, read_aligned, run_psi


def _sets(seed: int) -> dict[str, list[str]]:
    rng = random.Random(seed)
    universe = [f"cust-{i:05d}" for i in range(900)] + ["Zoë", "李雷", "x" * 300]
    sets = {
        "bank": rng.sample(universe, 600) + ["Zoë", "x" * 300],
        "dh1": rng.sample(universe, 650) + ["Zoë", "李雷", "x" * 300],
        "dh2": rng.sample(universe, 700) + ["Zoë", "x" * 300],
    }
    return {k: list(dict.fromkeys(v)) for k, v in sets.items()}


def _aligned(tmp_path: Path, sets: dict) -> dict[str, list[str]]:
    aligned = {name: read_aligned(tmp_path / f"{name}-aligned.csv") for name in sets}
    for name, rows in aligned.items():  # row numbers point at the party's own file rows
        assert all(sets[name][r] == i for r, i in rows)
    return {name: [i for _, i in rows] for name, rows in aligned.items()}


def test_P13_seven_buckets_align_the_same_ids_as_one_in_the_same_order_everywhere(tmp_path):
    sets = _sets(3)
    expected = set(sets["bank"]) & set(sets["dh1"]) & set(sets["dh2"])
    plain_dir, bucket_dir = tmp_path / "k1", tmp_path / "k7"
    plain_dir.mkdir()
    bucket_dir.mkdir()

    plain = run_psi(plain_dir, psi_session(plain_dir, sets))  # no bucket keys: the 1.1 wire
    assert plain["codes"] == {"bank": 0, "dh1": 0, "dh2": 0}, plain["output"]
    bucketed = run_psi(bucket_dir, psi_session(bucket_dir, sets, psi={"buckets": 7}))
    assert bucketed["codes"] == {"bank": 0, "dh1": 0, "dh2": 0}, bucketed["output"]

    k1, k7 = _aligned(plain_dir, sets), _aligned(bucket_dir, sets)
    assert k7["bank"] == k7["dh1"] == k7["dh2"]
    assert set(k7["bank"]) == set(k1["bank"]) == expected and len(k7["bank"]) == len(expected)
    assert "PSI with data holder 'dh1': 7 buckets" in bucketed["output"]["bank"]
    assert "PSI_BUCKET" not in plain["output"]["bank"] + plain["output"]["dh1"]  # "sent by type": the 1.1 messages
    assert '"PSI_BUCKET":' in bucketed["output"]["dh1"]
    assert not (bucket_dir / "psi-buckets").exists()  # the spilled IDs are gone when the nodes exit


def test_P12_a_memory_budget_picks_the_buckets_and_both_parties_agree(tmp_path):
    # 1 MiB holds 4096 items per bucket: 3000 + 3300 items need more than one bucket
    sets = {"bank": [f"u{i}" for i in range(3000)], "dh1": [f"u{i}" for i in range(1500, 4800)]}
    result = run_psi(tmp_path, psi_session(tmp_path, sets, psi={"memory_mb": 1, "chunk_size": 512}), timeout=180)
    assert result["codes"] == {"bank": 0, "dh1": 0}, result["output"]
    orders = _aligned(tmp_path, sets)
    assert orders["bank"] == orders["dh1"] and set(orders["bank"]) == {f"u{i}" for i in range(1500, 3000)}
    assert "PSI with data holder 'dh1': 2 buckets" in result["output"]["bank"]
