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
import sys
from typing import Any, Callable

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
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
