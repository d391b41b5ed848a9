"""Start real ``vfl node`` processes on loopback for integration tests, and always clean them up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


class Node:
    """A node process whose combined output goes to a file, so tests can wait for lines without pipes filling up."""

    def __init__(self, args: list[str], log: Path):
        self.log_path = log
        self._log = open(log, "wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vfl", *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output:
                return
            if self.proc.poll() is not None and text not in self.output:
                raise AssertionError(f"node exited {self.proc.returncode} before logging {text!r}:\n{self.output}")
            time.sleep(0.05)
        raise AssertionError(f"no {text!r} within {timeout} s:\n{self.output}")

    def wait(self, timeout: float = 30.0) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"node still running after {timeout} s:\n{self.output}") from None

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._log.close()


class Nodes:
    """Context manager owning every node a test starts."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.nodes: list[Node] = []

    def start(self, config: Path, *extra: str) -> Node:
        """``vfl node --config CONFIG [extra...]``"""
        return self.start_command(["node", "--config", str(config), *extra], config.stem)

    def start_command(self, args: list[str], name: str) -> Node:
        """``vfl ARGS...``, its output in ``NAME-N.log``."""
        node = Node(args, self.tmp / f"{name}-{len(self.nodes)}.log")
        self.nodes.append(node)
        return node

    def __enter__(self) -> "Nodes":
        return self

    def __exit__(self, *exc) -> None:
        for node in self.nodes:
            node.stop()
