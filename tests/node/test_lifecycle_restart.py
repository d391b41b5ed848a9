"""A run's lifecycle across restarts, between real node processes (issue 13, PROTOCOL.md [J1]-[J3]).

- A label holder killed (``kill -9``) mid-training and started again with the same command: the data holders,
  still running, see its new instance, rejoin by themselves, and the run resumes from the last checkpoint and ends
  exactly where an uninterrupted run ends.
- SIGTERM pauses a party: a data holder's BYE says it pauses and the label holder keeps its place; the label
  holder's own SIGTERM leaves its checkpoints, and the data holders wait for it and rejoin.

At W = 1 an uninterrupted run equals central training on the same batches (test_training_nodes.py), so each test
compares the resumed run with central training on the run's aligned rows: weights to 1e-5, validation accuracy to
0.5 percentage points. Every scenario's wall time is bounded.
"""

from __future__ import annotations

import os
import signal
import time

from .procs import Node, Nodes
from .test_training_nodes import assert_matches_central, resumable_session

EPOCHS = 4
SCENARIO_S = 240.0  # the whole scenario, from the first start to the last exit, on a loaded 2-core box
RESUME_S = 60.0  # from the restart to "resuming from the checkpoint" (process start, join, PSI: ~20 s loaded)
PAUSED = 5  # the exit code of a paused node ([J2])


def started(nodes: Nodes, configs: dict) -> dict[str, Node]:
    """The three parties, started, once the label holder is a quarter into epoch 2 (mid-epoch, checkpoints exist)."""
    procs = {"bank": nodes.start(configs["bank"]), "dh2": nodes.start(configs["dh2"]), "dh1": nodes.start(configs["dh1"])}
    procs["bank"].wait_for(f"epoch 1 of {EPOCHS} done", timeout=120)
    procs["bank"].wait_for("epoch 2: ", timeout=60)  # the progress line at a quarter of the second epoch
    return procs


def all_finish(began: float, **procs: Node) -> None:
    """Every party exits 0, and the whole scenario stayed within ``SCENARIO_S``."""
    codes = {name: p.wait(timeout=180 if name == "bank" else 60) for name, p in procs.items()}
    assert codes == {name: 0 for name in procs}, {name: p.output for name, p in procs.items()}
    assert time.monotonic() - began < SCENARIO_S

def test_J1_a_label_holder_killed_mid_training_and_restarted_resumes_and_matches_an_uninterrupted_run(tmp_path):
    """Bug 1 of issue 13: this used to flood UNEXPECTED_MESSAGE for 600 s and end with every node failing."""
    configs = resumable_session(tmp_path, epochs=EPOCHS)
    began = time.monotonic()
    with Nodes(tmp_path) as nodes:
        procs = started(nodes, configs)
        os.kill(procs["bank"].proc.pid, signal.SIGKILL)
        procs["bank"].wait(timeout=10)
        assert f"epoch 2 of {EPOCHS} done" not in procs["bank"].output, "the kill came too late to be mid-epoch 2"
        time.sleep(2.0)  # the data holders keep running meanwhile
        restarted_at = time.monotonic()
        lh = nodes.start(configs["bank"])  # the same command
        lh.wait_for("resuming from the checkpoint at step", timeout=RESUME_S)
        print(f"restart -> resumed training: {time.monotonic() - restarted_at:.1f} s")
        all_finish(began, bank=lh, dh1=procs["dh1"], dh2=procs["dh2"])
    for dh in ("dh1", "dh2"):
        assert "rejoining on a new connection" in procs[dh].output, procs[dh].output
        assert "rejoined the restarted label holder" in procs[dh].output, procs[dh].output
    assert lh.output.count("UNEXPECTED_MESSAGE") <= 4, lh.output  # at most an answer or two per data holder
    assert_matches_central(tmp_path, configs, EPOCHS)


def test_J2_a_data_holder_stopped_by_SIGTERM_pauses_and_started_again_resumes(tmp_path):
    """Bug 5 of issue 13: SIGTERM used to end the session for everyone."""
    configs = resumable_session(tmp_path, epochs=EPOCHS)
    began = time.monotonic()
    with Nodes(tmp_path) as nodes:
        procs = started(nodes, configs)
        os.kill(procs["dh1"].proc.pid, signal.SIGTERM)
        assert procs["dh1"].wait(timeout=20) == PAUSED, procs["dh1"].output
        assert "paused" in procs["dh1"].output
        procs["bank"].wait_for("data holder 'dh1' paused", timeout=10)
        time.sleep(1.0)
        assert procs["bank"].proc.poll() is None and procs["dh2"].proc.poll() is None, procs["bank"].output
        dh1 = nodes.start(configs["dh1"])  # the same command
        all_finish(began, bank=procs["bank"], dh1=dh1, dh2=procs["dh2"])
    assert "resuming every party from the checkpoint at step" in procs["bank"].output
    assert_matches_central(tmp_path, configs, EPOCHS)


def test_J2_the_label_holder_stopped_by_SIGTERM_pauses_and_started_again_resumes(tmp_path):
    """The label holder's own SIGTERM keeps its checkpoints; the data holders wait for it, then rejoin."""
    configs = resumable_session(tmp_path, epochs=EPOCHS)
    began = time.monotonic()
    with Nodes(tmp_path) as nodes:
        procs = started(nodes, configs)
        os.kill(procs["bank"].proc.pid, signal.SIGTERM)
        assert procs["bank"].wait(timeout=20) == PAUSED, procs["bank"].output
        for dh in ("dh1", "dh2"):
            procs[dh].wait_for("paused", timeout=10)
        assert not (tmp_path / "model" / "bank-segment.pt").exists(), "a paused label holder saved a 'final' segment"
        time.sleep(1.0)
        assert procs["dh1"].proc.poll() is None and procs["dh2"].proc.poll() is None, procs["dh1"].output
        lh = nodes.start(configs["bank"])
        lh.wait_for("resuming from the checkpoint at step", timeout=RESUME_S)
        all_finish(began, bank=lh, dh1=procs["dh1"], dh2=procs["dh2"])
    assert_matches_central(tmp_path, configs, EPOCHS)
