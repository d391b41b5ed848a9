"""Soak: a bucketed PSI between real `vfl psi` processes, killed with kill -9 at random moments (partitioning, mid
bucket, between buckets, after a pair is done, during the alignment), of the data holder, the label holder, one of
two data holders, or every party at once, once or twice in a row; every party that was killed (or exited because
of it) is started again with the same command. Each time: every party exits 0 with the set intersection in one
order, and no spill folder is left (PROTOCOL.md [P19]-[P22]). Slow (about 5 s a case): `pytest -m slow`.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest

from .procs import Nodes
from .test_psi_nodes import psi_session, read_aligned
from .test_psi_resume_nodes import TIMEOUTS

N, K = 12_000, 12
MODES = ["dh", "bank", "all", "dh-of-two", "bank-of-two", "all-of-two", "dh-twice", "all-twice"]


def _session(tmp_path: Path, sets: dict[str, list[str]]) -> dict[str, Path]:
    configs = psi_session(tmp_path, sets, psi={"buckets": K, "chunk_size": 256})
    for path in configs.values():
        lines = path.read_text().splitlines()
        for key, value in TIMEOUTS.items():
            lines = [f"{key} = {value}" if line.strip().startswith(f"{key} =") else line for line in lines]
        path.write_text("\n".join(lines) + "\n")
    return configs


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(16))
def test_P19_kill_9_at_a_random_moment_and_the_same_command_still_aligns(tmp_path, seed):
    rng = random.Random(seed)
    mode = MODES[seed % len(MODES)]
    sets = {"bank": [f"c{i:06d}" for i in range(N)]}
    for j in range(2 if "two" in mode else 1):
        lo = rng.randrange(N // 4, N // 2)
        sets[f"dh{j + 1}"] = [f"c{i:06d}" for i in range(lo, lo + N)]
    names = list(sets)
    configs = _session(tmp_path, sets)
    with Nodes(tmp_path) as nodes:
        procs = {n: nodes.start_command(["psi", "--config", str(configs[n])], n) for n in names}
        for _ in range(2 if "twice" in mode else 1):
            time.sleep(rng.uniform(0.2, 3.0))
            victims = ["bank"] if mode.startswith("bank") else [rng.choice(names[1:])] if mode.startswith("dh") else names
            killed = []  # a party that had already finished (exit 0) is not killed, nor started again
            for v in victims:
                if procs[v].proc.poll() is None:
                    os.kill(procs[v].proc.pid, signal.SIGKILL)
                    procs[v].proc.wait(timeout=10)
                    killed.append(v)
            time.sleep(rng.uniform(0, 0.5))
            for n in names:
                if procs[n].proc.poll() is not None and (n in killed or procs[n].proc.returncode != 0):
                    procs[n] = nodes.start_command(["psi", "--config", str(configs[n])], n)
        codes = {n: procs[n].wait(timeout=120) for n in names}
        assert codes == dict.fromkeys(names, 0), {n: procs[n].output[-3000:] for n in names}
    expected = set(sets["bank"]).intersection(*(set(sets[n]) for n in names[1:]))
    aligned = {n: read_aligned(tmp_path / f"{n}-aligned.csv") for n in names}
    orders = {n: [i for _, i in rows] for n, rows in aligned.items()}
    assert all(orders[n] == orders["bank"] for n in names)
    assert set(orders["bank"]) == expected and len(orders["bank"]) == len(expected)
    for n, rows in aligned.items():
        assert all(sets[n][r] == i for r, i in rows)
    assert not (tmp_path / "psi-buckets").exists()
