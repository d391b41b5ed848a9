"""[X14] exactness against real `vfl node` processes on 127.0.0.1: with window 1 a 1.7 session (epochs sent ahead)
must train exactly what a 1.6 session (one epoch at a time) trains: the same metrics and bit-identical segments.

The 1.6 session's data holder is a real node process whose data holder machine announces [1, 6]: a
``sitecustomize`` on its PYTHONPATH sets ``vfl.protocol.data_holder.PROTOCOL_VERSION`` before `python -m vfl` runs,
as a node of the previous release would say. Every process is stopped by ``Nodes`` on the way out, each wait bounded."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from .procs import Nodes
from .test_reproducibility import run_once, session, tensors

import json
import csv

SHIM = """import vfl.protocol.data_holder as _dh
_dh.PROTOCOL_VERSION = (1, 6)
import sys as _sys
print("attack shim: this data holder says HELLO at", _dh.PROTOCOL_VERSION, file=_sys.stderr, flush=True)
"""


def run_with_minor(folder: Path, minor: int, monkeypatch) -> dict:
    if minor == 7:
        return run_once(folder, 0.0)
    configs = session(folder, 0.0)
    shim = folder / "shim16"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(SHIM)
    old = os.environ.get("PYTHONPATH", "")
    with Nodes(folder) as nodes:
        procs = {"bank": nodes.start(configs["bank"])}
        monkeypatch.setenv("PYTHONPATH", f"{shim}{os.pathsep}{old}" if old else str(shim))
        procs["dh1"] = nodes.start(configs["dh1"])
        monkeypatch.setenv("PYTHONPATH", old)
        codes = {name: p.wait(timeout=180) for name, p in procs.items()}
        assert codes == {name: 0 for name in configs}, {name: p.output[-3000:] for name, p in procs.items()}
        outputs = {name: p.output for name, p in procs.items()}
    with open(folder / "bank-aligned.csv") as fh:
        aligned = [row[1] for row in list(csv.reader(fh))[1:]]
    return {
        "aligned": aligned,
        "outputs": outputs,
        "metrics": [json.loads(line) for line in (folder / "model" / "metrics.jsonl").read_text().splitlines()],
        "segments": {p: torch.load(folder / "model" / f"{p}-segment.pt", weights_only=True) for p in configs},
    }


def test_attack3_window_1_a_1_7_session_trains_bit_for_bit_what_a_1_6_session_trains(tmp_path, monkeypatch):
    old = run_with_minor(tmp_path / "v16", 6, monkeypatch)
    new = run_with_minor(tmp_path / "v17", 7, monkeypatch)
    assert [m["epoch"] for m in new["metrics"]] == [1, 2, 3]
    assert new["metrics"] == old["metrics"]
    for party in ("bank", "dh1"):
        a, b = dict(tensors(old["segments"][party])), dict(tensors(new["segments"][party]))
        assert a.keys() == b.keys() and a
        different = [k for k in a if not torch.equal(a[k], b[k])]
        assert not different, (party, different)
    assert "attack shim: this data holder says HELLO at (1, 6)" in old["outputs"]["dh1"]  # the 1.6 run means something
    assert "attack shim" not in new["outputs"]["dh1"] if "outputs" in new else True



def test_attack1_a_duplicate_training_done_confirmation_is_refused_and_the_run_still_finishes(tmp_path):
    """A real 1.7 session (`vfl node` label holder and honest data holder, the attacker's real machine in this
    process): the attacker confirms TRAINING_DONE twice. The second is answered UNEXPECTED_MESSAGE (not fatal), and
    the label holder still finishes only once both parties confirmed, exit 0."""
    from vfl.protocol import Error, ErrorCode

    from .fuzz_support import ATTACKER, HONEST, Driver
    from .test_fuzz_live import live_session

    with live_session(tmp_path, train=True, epochs=3) as (configs, ctx, nodes, lh, drivers):
        honest = nodes.start(configs[HONEST])
        lh.wait_for("listening on", timeout=60)
        d = Driver(ctx, configs[ATTACKER], hold=("TRAINING_DONE",))
        drivers.append(d)
        d.start()
        deadline = time.monotonic() + 120
        sent_twice = False
        while lh.proc.poll() is None and time.monotonic() < deadline:
            d.pump(0.05)
            if not sent_twice and d.holding("TRAINING_DONE"):
                (frames,) = [f for t, f in d.held if t == "TRAINING_DONE"]
                d.held = [(t, f) for t, f in d.held if t != "TRAINING_DONE"]
                d.send(frames)
                d.send(frames)
                sent_twice = True
        assert sent_twice
        assert lh.wait(timeout=60) == 0, lh.output[-3000:]
        assert honest.wait(timeout=60) == 0, honest.output[-3000:]
        assert "training finished after 3 epoch(s)" in lh.output
        d.pump(0.5)  # whatever the label holder answered before its BYE
        refusals = [a for a in d.answers if isinstance(a, Error)]
        # the honest party confirmed first: the attacker's first confirmation finished the run and the duplicate
        # went unread (a finished machine answers nothing); otherwise the duplicate is UNEXPECTED_MESSAGE
        assert [ErrorCode(a.code) for a in refusals] in ([], [ErrorCode.UNEXPECTED_MESSAGE]), refusals
        assert all(a.ref == "TRAINING_DONE" for a in refusals)
        assert "internal error" not in lh.output
