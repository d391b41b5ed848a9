"""Start several nodes on this machine, each as its own process, and watch them.

A convenience, not a coordinator: each node runs ``python -m vfl node --config FILE`` exactly as a user would from a
terminal. The launcher prefixes their logs, forwards Ctrl-C, waits, and exits non-zero naming any node that failed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable

STOP_GRACE_S = 3.0  # then SIGKILL: a Ctrl-C never takes the launcher more than a few seconds
COLOURS = ["\033[36m", "\033[33m", "\033[35m", "\033[32m", "\033[34m", "\033[31m"]
RESET = "\033[0m"


@dataclass
class NodeProcess:
    name: str
    config: Path
    proc: subprocess.Popen
    lines: list[str] = field(default_factory=list)
    pump: threading.Thread | None = None


def node_command(config: Path) -> list[str]:
    return [sys.executable, "-m", "vfl", "node", "--config", str(config)]


def _pump(node: NodeProcess, stream: IO[str], write: Callable[[str], None], prefix: str) -> None:
    for line in stream:
        node.lines.append(line)
        write(f"{prefix}{line}")


@dataclass
class LaunchResult:
    exit_codes: dict[str, int]
    wall_s: float
    logs: dict[str, list[str]] = field(default_factory=dict)

    @property
    def failed(self) -> list[str]:
        return [name for name, code in self.exit_codes.items() if code != 0]


def launch(
    configs: list[tuple[str, Path]],
    *,
    out: IO[str] = sys.stderr,
    colour: bool | None = None,
    timeout_s: float | None = None,
) -> LaunchResult:
    """Run every (name, config) as a node process; the first must be the label holder (it binds)."""
    colour = out.isatty() if colour is None else colour
    width = max(len(name) for name, _ in configs)
    lock = threading.Lock()

    def write(text: str) -> None:
        with lock:
            out.write(text)
            out.flush()

    nodes: list[NodeProcess] = []
    started = time.monotonic()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for i, (name, config) in enumerate(configs):
            proc = subprocess.Popen(
                node_command(config),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=env,
                start_new_session=True,  # Ctrl-C reaches only us; we forward it, so every node stops the same way
            )
            node = NodeProcess(name, config, proc)
            prefix = f"{name:<{width}} | "
            if colour:
                prefix = f"{COLOURS[i % len(COLOURS)]}{prefix}{RESET}"
            node.pump = threading.Thread(target=_pump, args=(node, proc.stdout, write, prefix), daemon=True)
            node.pump.start()
            nodes.append(node)
        while any(n.proc.poll() is None for n in nodes) and not stop.is_set():
            if timeout_s is not None and time.monotonic() - started > timeout_s:
                write(f"launcher: timeout after {timeout_s:g} s, stopping every node\n")
                break
            failed = [n for n in nodes if n.proc.poll() not in (None, 0)]
            if failed:  # the session cannot complete without it: do not leave the others waiting for their timeouts
                write(f"launcher: {failed[0].name} failed (exit {failed[0].proc.returncode}), stopping every node\n")
                break
            stop.wait(0.05)
    finally:
        stop_all(nodes, write)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    for n in nodes:
        if n.pump is not None:
            n.pump.join(timeout=2)
    return LaunchResult(
        {n.name: n.proc.returncode for n in nodes}, time.monotonic() - started, {n.name: n.lines for n in nodes}
    )


def stop_all(nodes: list[NodeProcess], write: Callable[[str], None]) -> None:
    """SIGTERM every live node, then SIGKILL what is still there after ``STOP_GRACE_S``."""
    for n in nodes:
        if n.proc.poll() is None:
            n.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for n in nodes:
        remaining = max(0.0, deadline - time.monotonic())
        try:
            n.proc.wait(timeout=remaining)
        except subprocess.TimeoutExpired:
            write(f"launcher: {n.name} did not stop within {STOP_GRACE_S:g} s, killing it\n")
            n.proc.kill()
            n.proc.wait()
