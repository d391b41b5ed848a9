"""A bucketed PSI killed mid-way (kill -9 of either party) and started again with the same command resumes from the
buckets both parties finished (PROTOCOL.md [P19]-[P22]), between real `vfl psi` processes on loopback.

Each test kills a party once a few of its buckets are finished (their result files exist), starts it again with
the same command, and checks: both exit 0; the aligned IDs are the set intersection, in the same order at both; the
buckets finished before the kill kept the rows and order they had then (the data holder's result files, read after
the kill, are the start of its aligned rows); both logged the resume; and the spilled IDs are gone at the end.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np

from .procs import Nodes
from .test_psi_nodes import psi_session, read_aligned

N = 16_000
K = 16
TIMEOUTS = {"heartbeat": 0.3, "peer": 20.0, "handshake": 20.0, "join": 60.0, "progress": 30.0, "rejoin": 30.0}


def _sets() -> dict[str, list[str]]:
    return {"bank": [f"c{i:06d}" for i in range(N)], "dh1": [f"c{i:06d}" for i in range(N // 2, N + N // 2)]}


def _session(tmp_path: Path) -> dict[str, Path]:
    configs = psi_session(tmp_path, _sets(), psi={"buckets": K, "chunk_size": 256})
    for path in configs.values():  # slower failure detection than the suite's FAST: a restart takes a moment
        text = path.read_text()
        for key, value in TIMEOUTS.items():
            text = "\n".join(
                f"{key} = {value}" if line.strip().startswith(f"{key} =") else line for line in text.splitlines()
            ) + "\n"
        path.write_text(text)
    return configs


def _pair_folder(tmp_path: Path, party: str) -> Path | None:
    base = tmp_path / "psi-buckets" / party
    folders = [p for p in base.iterdir() if p.is_dir()] if base.is_dir() else []
    return folders[0] if len(folders) == 1 else None


def _wait_finished(tmp_path: Path, party: str, buckets: int, node, timeout: float = 60.0) -> Path:
    """The party's pair folder once ``buckets`` of its buckets are finished (bounded wait)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        folder = _pair_folder(tmp_path, party)
        if folder is not None and (folder / f"result-{buckets - 1:05d}.npz").exists():
            return folder
        assert node.proc.poll() is None, f"{party} exited before finishing {buckets} buckets:\n{node.output}"
        time.sleep(0.005)
    raise AssertionError(f"{party} did not finish {buckets} buckets within {timeout} s:\n{node.output}")


def _finished_rows(folder: Path) -> list[np.ndarray]:
    out = []
    for b in range(K):
        path = folder / f"result-{b:05d}.npz"
        if not path.exists():
            break
        with np.load(path) as f:
            out.append(f["rows"].copy())
    return out


def _check(tmp_path: Path, kept: list[np.ndarray]) -> None:
    sets = _sets()
    aligned = {name: read_aligned(tmp_path / f"{name}-aligned.csv") for name in sets}
    orders = {name: [i for _, i in rows] for name, rows in aligned.items()}
    assert orders["bank"] == orders["dh1"]
    assert set(orders["bank"]) == set(sets["bank"]) & set(sets["dh1"]) and len(orders["bank"]) == N // 2
    for name, rows in aligned.items():
        assert all(sets[name][r] == i for r, i in rows)
    prefix = np.concatenate(kept) if kept else np.empty(0, np.int64)
    dh1_rows = np.array([r for r, _ in aligned["dh1"]], dtype=np.int64)
    # the buckets finished before the kill (at least those the label holder had finished too) keep their order
    assert len(kept) >= 1
    assert np.array_equal(dh1_rows[: len(prefix)], prefix) or _resumed_before(tmp_path, kept, dh1_rows)
    assert not (tmp_path / "psi-buckets").exists()  # the spilled IDs are gone once the rows are aligned


def _resumed_before(tmp_path: Path, kept: list[np.ndarray], rows: np.ndarray) -> bool:
    """D may have finished one bucket more than L when it was killed: that bucket is exchanged again, so only the
    buckets before it keep their rows."""
    prefix = np.concatenate(kept[:-1]) if len(kept) > 1 else np.empty(0, np.int64)
    return np.array_equal(rows[: len(prefix)], prefix)


def _start_pair(nodes: Nodes, configs: dict[str, Path]):
    return tuple(nodes.start_command(["psi", "--config", str(configs[name])], name) for name in ("bank", "dh1"))


def _kill(node) -> None:
    os.kill(node.proc.pid, signal.SIGKILL)
    node.proc.wait(timeout=10)


def _resumed_at(log: str) -> int:
    marker = "resuming at bucket "
    assert marker in log, log
    return int(log.split(marker, 1)[1].split()[0].rstrip(";"))


def test_P19_a_data_holder_killed_mid_psi_resumes_after_the_finished_buckets(tmp_path):
    configs = _session(tmp_path)
    with Nodes(tmp_path) as nodes:
        bank, dh1 = _start_pair(nodes, configs)
        folder = _wait_finished(tmp_path, "dh1", 3, dh1)
        _kill(dh1)
        kept = _finished_rows(folder)
        again = nodes.start_command(["psi", "--config", str(configs["dh1"])], "dh1")  # the same command
        assert again.wait(timeout=120) == 0, again.output
        assert bank.wait(timeout=60) == 0, bank.output
    r = _resumed_at(again.output)
    assert r >= 2 and r == _resumed_at(bank.output)
    assert r in (len(kept), len(kept) - 1)
    _check(tmp_path, kept[:r])


def test_P19_a_label_holder_killed_mid_psi_resumes_after_the_finished_buckets(tmp_path):
    configs = _session(tmp_path)
    with Nodes(tmp_path) as nodes:
        bank, dh1 = _start_pair(nodes, configs)
        _wait_finished(tmp_path, "bank", 3, bank)
        _kill(bank)
        kept = _finished_rows(_pair_folder(tmp_path, "dh1"))
        again = nodes.start_command(["psi", "--config", str(configs["bank"])], "bank")  # the same command
        assert again.wait(timeout=120) == 0, again.output
        assert dh1.wait(timeout=60) == 0, dh1.output
    r = _resumed_at(again.output)
    assert r >= 3 and r == _resumed_at(dh1.output)
    _check(tmp_path, kept[:r])


def test_P19_a_damaged_result_file_is_exchanged_again_instead_of_crashing_the_node(tmp_path):
    """A result file the restarted node cannot read (here truncated, as a full disk or an editor leaves it) ends its
    finished buckets there: the pair resumes before it, and the result is still the intersection in one order."""
    configs = _session(tmp_path)
    with Nodes(tmp_path) as nodes:
        bank, dh1 = _start_pair(nodes, configs)
        folder = _wait_finished(tmp_path, "dh1", 3, dh1)
        _kill(dh1)
        kept = _finished_rows(folder)[:1]
        damaged = folder / "result-00001.npz"
        damaged.write_bytes(damaged.read_bytes()[:40])
        again = nodes.start_command(["psi", "--config", str(configs["dh1"])], "dh1")
        assert again.wait(timeout=120) == 0, again.output
        assert bank.wait(timeout=60) == 0, bank.output
    assert _resumed_at(again.output) == 1 == _resumed_at(bank.output)
    assert "Traceback" not in again.output
    _check(tmp_path, kept)
