"""The README's shell commands work when pasted in order into a fresh shell after `make demo`.

Every ```sh block after the set-up block is run, in README order, by one bash in a fresh folder whose `.venv` is the
venv running these tests (so `. .venv/bin/activate` works as written). Lines whose comment says "terminal N" are
meant for separate terminals: they run at the same time and must all exit 0.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
TIMEOUT_S = 900.0  # four demo-sized runs on a busy 2-core box


def shell_blocks(text: str) -> list[list[str]]:
    """The commands of every ```sh block after the one with `make demo`; a trailing backslash joins lines."""
    blocks = re.findall(r"^```sh\n(.*?)^```", text, re.M | re.S)
    setup = next(i for i, b in enumerate(blocks) if re.search(r"^make demo\b", b, re.M))
    out = []
    for block in blocks[setup + 1:]:
        lines = block.replace("\\\n", " ").splitlines()
        out.append([line for line in lines if line.strip()])
    return out


def script(blocks: list[list[str]]) -> str:
    """One bash script: each command in order, stopping at the first failure; "terminal N" lines run together."""
    lines = ["set -euo pipefail"]
    group: list[str] = []

    def flush() -> None:
        if group:
            lines.append("pids=()")
            lines.extend(f"{cmd} & pids+=($!)" for cmd in group)
            lines.append('for p in "${pids[@]}"; do wait "$p"; done')
            group.clear()

    for block in blocks:
        for line in block:
            command, _, comment = line.partition("#")
            if re.search(r"\bterminal \d", comment):
                group.append(command.strip())
            else:
                flush()
                lines.append(f"echo '+ {command.strip()}' >&2")
                lines.append(command.strip())
        flush()
    return "\n".join(lines) + "\n"


def test_the_readme_shows_activate_before_its_first_vfl_command():
    commands = [c for block in shell_blocks(README.read_text()) for c in block]
    first_vfl = next(i for i, c in enumerate(commands) if c.startswith("vfl "))
    assert any(c.strip() == ". .venv/bin/activate" for c in commands[:first_vfl]), commands[: first_vfl + 1]


@pytest.mark.slow
def test_readme_commands_work_pasted_in_order_after_make_demo(tmp_path):
    pytest.importorskip("sklearn", reason="the README's demos need scikit-learn's data sets")
    blocks = shell_blocks(README.read_text())
    assert any("vfl init" in c for b in blocks for c in b) and any("vfl launch" in c for b in blocks for c in b)
    (tmp_path / ".venv").symlink_to(Path(sys.prefix))  # what `make demo` leaves behind
    text = script(blocks)
    (tmp_path / "readme.sh").write_text(text)
    done = subprocess.run(["bash", "readme.sh"], cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT_S,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert done.returncode == 0, f"{text}\n--- stderr:\n{done.stderr[-6000:]}"
    for run in ("demo-digits", "mine", "d", "l"):
        assert list((tmp_path / "runs" / run / "model").glob("*-segment.pt")), run
    assert (tmp_path / "runs" / "mine" / "model" / "metrics.jsonl").is_file()
