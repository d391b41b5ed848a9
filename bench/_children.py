"""What the benchmarks share about their child processes: dying with the bench, reading /proc, and a main that
turns Ctrl-C and SIGTERM into a clean stop.

Every bench starts real node processes. They must never outlive the bench (``die_with_parent`` as their
``preexec_fn``, each in its own session so the bench can stop a whole process group), and the memory and CPU figures
come from /proc, read the same way everywhere.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
STOP_GRACE_S = 5.0  # after SIGTERM, how long a child's process group gets before SIGKILL
_BLAS_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGKILL if the bench dies without running its finally blocks (Linux)."""
    if _libc is not None:
        _libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def read_text(path: str) -> str | None:
    """A /proc file's text, or None once the process is gone."""
    try:
        with open(path) as fh:
            return fh.read()
    except OSError:
        return None


def proc_children(pid: int) -> list[int]:
    """The direct children of every thread of ``pid``."""
    kids: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return kids
    for tid in tasks:
        text = read_text(f"/proc/{pid}/task/{tid}/children")
        if text:
            kids += [int(x) for x in text.split()]
    return kids


def proc_sample(pid: int) -> tuple[int, float, int, int] | None:
    """(start time, CPU seconds, VmHWM kB, VmRSS kB) of one process, or None if it is gone."""
    stat = read_text(f"/proc/{pid}/stat")
    status = read_text(f"/proc/{pid}/status")
    if stat is None or status is None:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
    hwm = rss = 0
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1])
        elif line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return int(fields[19]), cpu, hwm, rss


def bench_main(name: str, run: Callable[[], dict[str, Any]], report: Callable[[dict[str, Any]], None] | None,
               error: type[Exception], interrupted: str = "child processes stopped") -> int:
    """Run a bench: SIGTERM and SIGINT stop it cleanly (exit 130), its own errors exit 1 with one line, and the
    last line of stdout is the result as one JSON object."""

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored (a `cmd &` job)
    try:
        result = run()
    except KeyboardInterrupt:
        print(f"interrupted; {interrupted}", file=sys.stderr)
        return 130
    except error as exc:
        print(f"{name} bench failed: {exc}", file=sys.stderr)
        return 1
    if report is not None:
        report(result)
    print(json.dumps(result, separators=(",", ":")))
    return 0


def sample_tree(root: int, procs: dict[tuple[int, int], dict[str, Any]]) -> list[tuple[int, bool, int]]:
    """Walk ``root``'s process tree once, updating ``procs`` ((pid, start time) -> record with ``main``, ``cpu``,
    ``hwm_kb`` and ``cmd``) with each process's latest CPU time and VmHWM. Returns (pid, is root, VmRSS kB) of every
    process still alive. Records are keyed by start time too, so a reused pid is a new process."""
    seen: list[tuple[int, bool]] = [(root, True)]
    stack = [root]
    for _ in range(1000):  # bounded walk
        if not stack:
            break
        for kid in proc_children(stack.pop()):
            seen.append((kid, False))
            stack.append(kid)
    alive = []
    for pid, is_main in seen:
        s = proc_sample(pid)
        if s is None:
            continue
        start, cpu, hwm, rss = s
        rec = procs.get((pid, start))
        if rec is None:
            cmd = (read_text(f"/proc/{pid}/cmdline") or "").replace("\0", " ").strip()
            rec = procs[(pid, start)] = {"main": is_main, "cpu": 0.0, "hwm_kb": 0, "cmd": cmd[:120]}
        rec["cpu"] = max(rec["cpu"], cpu)
        rec["hwm_kb"] = max(rec["hwm_kb"], hwm)
        alive.append((pid, is_main, rss))
    return alive


def process_kind(cmd: str) -> str:
    """What a node's child process is, from its command line: multiprocessing's helpers by name, else its last word."""
    for key in ("forkserver", "resource_tracker", "spawn_main"):
        if key in cmd:
            return key
    return cmd.split(" ")[-1][:40] or "?"


# ---------------------------------------------------------------------------------------------------- node processes


def read_appended(path: Path, pos: int) -> bytes:
    """What a growing file holds from byte ``pos`` on (b"" if it cannot be read yet)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(pos)
            return fh.read()
    except OSError:
        return b""


def single_threaded_blas() -> dict[str, str | None]:
    """Call before importing numpy: no BLAS thread pool in the bench process, which forks children with a
    ``preexec_fn`` and must stay single-threaded. Returns the caller's settings, which ``child_env`` gives back."""
    caller = {k: os.environ.get(k) for k in _BLAS_VARS}
    for k in _BLAS_VARS:
        os.environ[k] = "1"
    return caller


def child_env(caller: dict[str, str | None], src: str) -> dict[str, str]:
    """A node process's environment: the caller's BLAS settings back, unbuffered output, ``src`` first on the path."""
    env = dict(os.environ)
    for k, v in caller.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
    return env


class GroupChild:
    """A child process in its own process group (so the bench can stop it and everything it forked), dying with the
    bench, its output going to a log file that ``read_lines`` follows as it grows."""

    def __init__(self, name: str, argv: list[str], log: Path, cwd: Path, t0: float, env: dict[str, str]):
        self.name = name
        self.t0 = t0
        self.log_path = log
        self._log = open(log, "wb")
        self._pos = 0
        self._partial = b""
        self.procs: dict[tuple[int, int], dict[str, Any]] = {}  # (pid, start time) -> {main, cpu, hwm_kb, cmd}
        self.exit_time: float | None = None
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
            start_new_session=True,  # own process group: Ctrl-C reaches the bench only; stop ends the whole group
            preexec_fn=die_with_parent,
        )
        self.pgid = self.proc.pid

    def read_lines(self) -> list[str]:
        """The complete lines written to the log since the last call."""
        data = read_appended(self.log_path, self._pos)
        if not data:
            return []
        self._pos += len(data)
        *complete, self._partial = (self._partial + data).split(b"\n")
        return [raw.decode("utf-8", "replace") for raw in complete]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def end_group(self, reap_wait_s: float) -> bool:
        """SIGTERM, then SIGKILL, to the group until the child exits; then SIGKILL whatever is left in the group
        (forkserver, workers, resource tracker) after ``reap_wait_s``. True if that had to kill something."""
        p = self.proc
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if p.poll() is not None:
                break
            try:
                os.killpg(self.pgid, sig)
            except ProcessLookupError:
                break
            try:
                p.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                continue
        killed = self._reap_group(reap_wait_s)
        self._log.close()
        return killed

    def _reap_group(self, wait_s: float) -> bool:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                os.killpg(self.pgid, 0)
            except (ProcessLookupError, PermissionError):
                return False
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        try:
            os.killpg(self.pgid, signal.SIGKILL)
        except ProcessLookupError:
            return False
        return True
