"""[L1] while a node works locally: a label holder (or data holder) whose training segment takes longer to build
than its peers' peer timeout keeps sending heartbeats and its queued messages meanwhile, so the session trains to
the end; stopped during that build, it pauses at once ([J2], exit 5) instead of finishing the build first.

At 10M rows the label holder's schedule takes about 40 s to draw (bench/scale.py); here a ``sitecustomize`` on the
node's PYTHONPATH makes the build that slow on 300 rows: it sleeps in ``vfl.node.training.make_plan`` (label holder)
or ``build_bottom`` (data holder) before calling the real one. Everything else is the real node."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from .procs import Nodes
from .test_training_nodes import session_configs, synthetic, write_table

SLOW = {"heartbeat": 0.25, "peer": 2.0, "handshake": 30.0, "join": 60.0, "progress": 60.0, "rejoin": 2.0}

SHIM = """import time as _time, sys as _sys
import vfl.node.training as _t
_real = _t.{name}
def _slow(*args, **kwargs):
    print("slow shim: building for {seconds} s", file=_sys.stderr, flush=True)
    _time.sleep({seconds})
    return _real(*args, **kwargs)
_t.{name} = _slow
"""


def two_party_session(folder: Path) -> dict[str, Path]:
    x1, x2, y = synthetic()
    ids = [f"person-{i:04d}" for i in range(len(y))]
    write_table(folder / "bank.csv", ids, {"label": y})
    write_table(folder / "dh1.csv", ids, {f"a{j}": x1[:, j] for j in range(5)})
    write_table(folder / "dh2.csv", ids, {f"b{j}": x2[:, j] for j in range(7)})
    return session_configs(folder, run="slow-build", epochs=2, opt={"kind": "sgd", "lr": 0.1}, timeouts=SLOW,
                           batch_size=32, window=2)


def shim(folder: Path, name: str, seconds: float) -> str:
    """A PYTHONPATH entry whose sitecustomize slows ``vfl.node.training.NAME`` by ``seconds``."""
    path = folder / f"shim-{name}"
    path.mkdir()
    (path / "sitecustomize.py").write_text(SHIM.format(name=name, seconds=seconds))
    old = os.environ.get("PYTHONPATH", "")
    return f"{path}{os.pathsep}{old}" if old else str(path)


@pytest.mark.parametrize("slow_party, name", [("bank", "make_plan"), ("dh1", "build_bottom")])
def test_L1_a_node_building_its_segment_for_longer_than_the_peer_timeout_keeps_the_session_alive(
        tmp_path, monkeypatch, slow_party, name):
    configs = two_party_session(tmp_path)
    seconds = 3 * SLOW["peer"]  # three peer timeouts without a heartbeat would end the session three times over
    slow_path = shim(tmp_path, name, seconds)
    old = os.environ.get("PYTHONPATH", "")
    with Nodes(tmp_path) as nodes:
        procs = {}
        for party in ("bank", "dh1", "dh2"):
            monkeypatch.setenv("PYTHONPATH", slow_path if party == slow_party else old)
            procs[party] = nodes.start(configs[party])
        monkeypatch.setenv("PYTHONPATH", old)
        codes = {party: p.wait(timeout=120) for party, p in procs.items()}
        outputs = {party: p.output for party, p in procs.items()}
    assert codes == {"bank": 0, "dh1": 0, "dh2": 0}, outputs
    assert f"slow shim: building for {seconds} s" in outputs[slow_party]
    assert all("has sent nothing" not in text for text in outputs.values()), outputs
    metrics = (tmp_path / "model" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 2  # both epochs trained
    for party in configs:
        assert (tmp_path / "model" / f"{party}-segment.pt").exists()


def test_J2_a_label_holder_stopped_while_it_builds_its_segment_pauses_without_finishing_the_build(
        tmp_path, monkeypatch):
    configs = two_party_session(tmp_path)
    slow_path = shim(tmp_path, "make_plan", 600)  # a build that would outlast every wait in this test
    old = os.environ.get("PYTHONPATH", "")
    with Nodes(tmp_path) as nodes:
        monkeypatch.setenv("PYTHONPATH", slow_path)
        bank = nodes.start(configs["bank"])
        monkeypatch.setenv("PYTHONPATH", old)
        dhs = {party: nodes.start(configs[party]) for party in ("dh1", "dh2")}
        bank.wait_for("slow shim: building", timeout=60)
        bank.proc.send_signal(signal.SIGTERM)
        assert bank.wait(timeout=30) == 5, bank.output  # paused at once, not after the 600 s build
        codes = {party: p.wait(timeout=30) for party, p in dhs.items()}
        outputs = {party: p.output for party, p in dhs.items()}
    assert "stopped by SIGTERM" in bank.output, bank.output
    # the data holders heard the pause: they wait for the label holder to come back, then give up ([J2], rejoin 2 s)
    assert all(code != 0 for code in codes.values()), outputs
    assert not (tmp_path / "model" / "bank-segment.pt").exists()
