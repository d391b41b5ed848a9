"""`vfl launch FOLDER` with real node processes on 127.0.0.1: Ctrl-C stops every node, a failing node is named.

The launcher starts each node in its own session (so a terminal's Ctrl-C reaches only the launcher), which also
means killing the launcher's process group does not reach the nodes. :class:`Launcher` therefore records every
descendant of the launcher while it runs (from ``/proc``) and kills whatever is left of them when a test ends.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc to find the node processes")

START_TIMEOUT_S = 120.0  # three processes importing torch on a busy 2-core box
CTRL_C_LIMIT_S = 5.0  # the launcher and every node must be gone this long after Ctrl-C


def _stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, state, start time in clock ticks) of a live process, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            text = fh.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = text.rsplit(")", 1)[1].split()  # the command name in (...) may hold spaces
    return int(fields[1]), fields[0], int(fields[19])


def descendants(root: int) -> dict[int, int]:
    """{pid: start time} of every live descendant of ``root``."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None:
                children.setdefault(st[0], []).append(int(entry))
                starts[int(entry)] = st[2]
    found, todo = {}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found[child] = starts[child]
            todo.append(child)
    return found


def alive(pid: int, start: int) -> bool:
    """The process that had this pid and start time still runs (a zombie has finished)."""
    st = _stat(pid)
    return st is not None and st[2] == start and st[1] != "Z"


class Launcher:
    """``python -m vfl launch FOLDER`` (or another ``vfl`` command that launches nodes, e.g. ``demo``) in its own
    process group; output in a file; every node it started is cleaned up by :meth:`close`."""

    def __init__(self, folder: Path | None, log: Path, args: list[str] | None = None):
        self.log_path = log
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vfl", *(args if args is not None else ["launch", str(folder)])],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )
        self.seen: dict[int, int] = {}  # every descendant ever observed: {pid: start time}
        self.interrupted = False

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def refresh(self) -> dict[int, int]:
        if self.proc.poll() is None:
            self.seen.update(descendants(self.proc.pid))
        return self.seen

    def node_pids(self) -> dict[int, int]:
        """The launcher's `vfl node` children (not their own helpers, e.g. PSI workers)."""
        out = {}
        for pid, start in descendants(self.proc.pid).items():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"node" in cmdline and b"--config" in cmdline:
                out[pid] = start
        return out

    def wait_for(self, pattern: str, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.refresh()
            if re.search(pattern, self.output):
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"launcher exited {self.proc.returncode} before {pattern!r}:\n{self.output}")
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} within {timeout} s:\n{self.output}")

    def wait(self, timeout: float) -> int | None:
        """The launcher's exit code, or None if it still runs after ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.refresh()
            if self.proc.poll() is not None:
                return self.proc.returncode
            time.sleep(0.02)
        return None

    def interrupt(self) -> None:
        """Ctrl-C, as a terminal would send it to the launcher alone (the nodes run in their own sessions)."""
        self.refresh()
        self.interrupted = True
        self.proc.send_signal(signal.SIGINT)

    def close(self) -> None:
        self.refresh()
        if self.proc.poll() is None:
            if not self.interrupted:
                self.interrupt()  # the launcher's own way of stopping every node
            if self.wait(15) is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        for pid, start in self.seen.items():
            if alive(pid, start):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self._log.close()


@pytest.fixture
def launchers(tmp_path):
    started: list[Launcher] = []

    def start(folder: Path | None, args: list[str] | None = None) -> Launcher:
        launcher = Launcher(folder, tmp_path / f"launch-{len(started)}.log", args)
        started.append(launcher)
        return launcher

    yield start
    for launcher in started:
        launcher.close()


def prepare_digits(out: Path, *, epochs: int | None = None, seed: int = 0) -> dict[str, Path]:
    """`vfl demo digits --data-holders 2 --prepare-only --out OUT`, in-process; optionally more epochs."""
    pytest.importorskip("sklearn", reason="the demo data sets come from scikit-learn")
    from vfl.launch.demo import prepare_demo

    configs = prepare_demo("digits", out, data_holders=2, seed=seed).configs
    if epochs is not None:  # [train].epochs is the label holder's alone; it is not part of the session agreement
        text = configs["bank"].read_text()
        assert re.search(r"(?m)^epochs = \d+$", text)
        configs["bank"].write_text(re.sub(r"(?m)^epochs = \d+$", f"epochs = {epochs}", text))
    return configs


def test_ctrl_c_stops_every_node_within_5_s(tmp_path, launchers):
    """SIGINT to the launcher mid-training: it exits within 5 s and none of its `vfl node` children is left.

    The exit code is not checked: a data holder that hears the label holder's BYE before its own SIGTERM exits 1.
    """
    prepare_digits(tmp_path / "run", epochs=500)  # far longer than the test: training is surely still running
    launcher = launchers(tmp_path / "run")
    launcher.wait_for(r"bank +\| .*training on \d+ aligned rows")
    launcher.wait_for(r"dh2 +\| .*training: ", timeout=30)
    metrics = tmp_path / "run" / "model" / "metrics.jsonl"
    deadline = time.monotonic() + 60
    while not metrics.exists() and time.monotonic() < deadline:  # the first epoch is done: mid-training for sure
        time.sleep(0.05)
    nodes = launcher.node_pids()
    assert len(nodes) == 3, f"expected the launcher's 3 node processes, found {nodes}:\n{launcher.output}"

    sent = time.monotonic()
    launcher.interrupt()
    nodes_gone_s: float | None = None
    launcher_gone_s: float | None = None
    while time.monotonic() - sent < CTRL_C_LIMIT_S and launcher_gone_s is None:
        launcher.refresh()
        if nodes_gone_s is None and not any(alive(pid, start) for pid, start in nodes.items()):
            nodes_gone_s = time.monotonic() - sent
        if launcher.proc.poll() is not None:
            launcher_gone_s = time.monotonic() - sent
        time.sleep(0.02)
    left = [pid for pid, start in nodes.items() if alive(pid, start)]
    timing = f"nodes gone after {nodes_gone_s} s, launcher after {launcher_gone_s} s"
    late = f"still running {CTRL_C_LIMIT_S:g} s after SIGINT ({timing}):\n{launcher.output}"
    assert not left, f"node processes {left} {late}"
    assert launcher_gone_s is not None, f"launcher {late}"
    assert not [pid for pid, start in launcher.seen.items() if alive(pid, start)], "a node's helper process is left"
    assert "Traceback" not in launcher.output, launcher.output
    print(f"\nCtrl-C: {timing}")
    assert metrics.exists()  # it really was training


def _break_secret_key(config: Path) -> None:
    """[keys].secret names the public half: the file exists, so config checks pass, and the node exits 2 at once."""
    text = config.read_text()
    assert 'secret = "keys/dh2.key_secret"' in text
    config.write_text(text.replace('secret = "keys/dh2.key_secret"', 'secret = "keys/dh2.key"'))


def test_a_failing_node_makes_the_launcher_exit_non_zero_naming_it(tmp_path, launchers):
    configs = prepare_digits(tmp_path / "run")
    _break_secret_key(configs["dh2"])
    # the label holder gives up on the missing dh2 after 10 s (default 600 s: see the fail-fast test below)
    configs["bank"].write_text(configs["bank"].read_text() + "\n[timeouts]\njoin = 10.0\n")
    launcher = launchers(tmp_path / "run")
    code = launcher.wait(timeout=START_TIMEOUT_S)
    out = launcher.output
    assert code is not None, f"launcher still running after {START_TIMEOUT_S} s:\n{out}"
    assert code != 0, out
    assert re.search(r"(?m)^dh2 +\| vfl node: .*dh2\.key: holds no secret key", out), out  # the node's own line
    assert re.search(r"vfl launch: failed: .*\bdh2 \(exit 2\)", out), out  # and the launcher's verdict names it


def test_a_failing_node_stops_the_others_promptly(tmp_path, launchers):
    """Nobody restarts a node the launcher started: once one fails, the launcher should stop the rest and exit."""
    configs = prepare_digits(tmp_path / "run")
    _break_secret_key(configs["dh2"])
    launcher = launchers(tmp_path / "run")
    launcher.wait_for(r"dh2 +\| vfl node: .*holds no secret key")
    code = launcher.wait(timeout=15.0)
    assert code is not None, f"launcher still running 15 s after dh2 failed:\n{launcher.output}"
    assert code != 0 and re.search(r"failed: .*\bdh2 \(exit 2\)", launcher.output), launcher.output


def test_a_missing_key_file_is_reported_before_any_node_starts(tmp_path):
    configs = prepare_digits(tmp_path / "run")
    text = configs["dh1"].read_text()
    configs["dh1"].write_text(text.replace('secret = "keys/dh1.key_secret"', 'secret = "keys/nobody.key_secret"'))
    done = subprocess.run([sys.executable, "-m", "vfl", "launch", str(tmp_path / "run")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    assert "dh1.toml" in done.stderr and "[keys].secret" in done.stderr and "nobody.key_secret" in done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert not (tmp_path / "run" / "model").exists()  # no node ran
