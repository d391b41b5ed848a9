"""Attacks on `[train].keep = "best"` + `patience` with real node processes (issue 13, PROTOCOL.md [X7], [X10]).

Every scenario runs the same W = 1 session (deterministic: the same IDs, seeds and run id give the same batches and
weights in every run, whatever order the PSI agreed) and compares it with one uninterrupted reference run of it:
the same metrics.jsonl epochs and validation losses, the same kept epoch, every party's saved segment equal to
1e-6. Each scenario's wall time is bounded and every wait has a timeout.

- a label holder killed (``kill -9``) after the first best epoch was recorded, and restarted with the same command;
- a label holder that dies right between a new best epoch's validation and the commit of the checkpoint keeping it
  (``crash_at_commit``: every party wrote the kept checkpoint, the manifest still names the previous best);
- a data holder killed (``kill -9``) and restarted; the label holder paused by SIGTERM (exit 5) and restarted;
- the finished early-stopped folder started again with ``--fresh``: trains from epoch 1 again, the old results
  (``PARTY-kept.json`` included) moved aside, the same result;
- a kept checkpoint edited (a byte flipped) before TRAINING_DONE, or before a resume: a clear error naming the file,
  exit 1, and no segment that looks finished.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vfl.node.checkpoints import load_state

from .procs import Node, Nodes
from .test_lifecycle_keep_best import EAGER, with_train_keys
from .test_training_nodes import RESUMABLE, read_metrics, run_nodes, session_configs, shared_tables

ROOT = Path(__file__).resolve().parents[2]
EPOCHS, PATIENCE = 14, 2
SCENARIO_S = 240.0  # one scenario, first start to last exit, on a loaded 2-core box
PARTS = {"bank": "top", "dh1": "model", "dh2": "model"}
PAUSED = 5


def keep_best_session(folder: Path) -> dict[str, Path]:
    """300 people at every party, batch 8 (29 training steps an epoch), a checkpoint every 5 steps, a learning rate
    that overfits within a few epochs: keep = "best", patience 2, at W = 1."""
    folder.mkdir(parents=True, exist_ok=True)
    shared_tables(folder, 300)
    configs = session_configs(folder, run="best-attack", epochs=EPOCHS, opt=EAGER, timeouts=RESUMABLE, batch_size=8,
                              window=1, checkpoint_every=5)
    with_train_keys(configs["bank"], keep="best", patience=PATIENCE)
    return configs


def result(folder: Path) -> dict:
    """What a finished run left: its metrics, manifest and every party's saved segment weights."""
    model = folder / "model"
    segments = {}
    for party, part in PARTS.items():
        path = model / f"{party}-segment.pt"
        segments[party] = load_state(path.read_bytes(), path)[part]
    return {"metrics": read_metrics(model / "metrics.jsonl"),
            "manifest": json.loads((model / "checkpoints" / "manifest.json").read_text()), "segments": segments}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """One uninterrupted run of the session: what every attacked run must end with."""
    folder = tmp_path_factory.mktemp("reference")
    configs = keep_best_session(folder)
    run_nodes(folder, configs)
    out = result(folder)
    metrics = out["metrics"]
    losses = [m["val_loss"] for m in metrics]
    best = min(range(len(losses)), key=losses.__getitem__)
    assert len(metrics) == best + 1 + PATIENCE < EPOCHS, losses  # stopped early by patience
    assert best >= 2, losses  # a second best epoch after the first: keep replaced a kept checkpoint at least once
    assert out["manifest"]["kept_epoch"] == best + 1
    out["best"] = best + 1  # 1-based
    return out


def assert_same_result(folder: Path, reference: dict) -> None:
    got = result(folder)
    assert [m["epoch"] for m in got["metrics"]] == [m["epoch"] for m in reference["metrics"]]
    for mine, want in zip(got["metrics"], reference["metrics"]):  # every figure, a resumed epoch's training ones too
        for key, value in want.items():
            if key.startswith(("train_", "val_")):
                assert abs(mine[key] - value) <= 1e-6, (mine["epoch"], key, mine[key], value)
    for key in ("kept_epoch", "epochs", "finished"):
        assert got["manifest"][key] == reference["manifest"][key], (key, got["manifest"], reference["manifest"])
    assert got["manifest"]["best"]["step"] == reference["manifest"]["best"]["step"]
    for party in PARTS:
        a, b = got["segments"][party], reference["segments"][party]
        assert a.keys() == b.keys()
        worst = max(torch.max(torch.abs(a[k].float() - b[k].float())).item() for k in a)
        assert worst <= 1e-6, (party, worst)


def start_all(nodes: Nodes, configs: dict, bank: Node | None = None) -> dict[str, Node]:
    bank = bank or nodes.start(configs["bank"])
    return {"bank": bank, "dh2": nodes.start(configs["dh2"]), "dh1": nodes.start(configs["dh1"])}


def all_finish(began: float, **procs: Node) -> None:
    codes = {name: p.wait(timeout=120) for name, p in procs.items()}
    assert codes == {name: 0 for name in procs}, {name: p.output for name, p in procs.items()}
    assert time.monotonic() - began < SCENARIO_S


def restart_label_holder(nodes: Nodes, configs: dict, procs: dict[str, Node], began: float) -> None:
    """The stopped label holder started again with the same command: it resumes, and every party finishes."""
    lh = nodes.start(configs["bank"])
    lh.wait_for("resuming from the checkpoint at step", timeout=60)
    all_finish(began, bank=lh, dh1=procs["dh1"], dh2=procs["dh2"])


def crashing_label_holder(nodes: Nodes, config: Path) -> Node:
    """``python -m tests.node.crash_at_commit vfl node --config CONFIG``, owned by ``nodes``."""
    node = Node.__new__(Node)
    node.log_path = nodes.tmp / f"bank-crashing-{len(nodes.nodes)}.log"
    node._log = open(node.log_path, "wb")
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    node.proc = subprocess.Popen([sys.executable, "-m", "tests.node.crash_at_commit", "node", "--config", str(config)],
                                 stdout=node._log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    nodes.nodes.append(node)
    return node


@pytest.mark.parametrize("seed", [1])
def test_a_label_holder_killed_after_the_first_best_epoch_and_restarted_ends_as_an_uninterrupted_run(
        tmp_path, reference, seed):
    configs = keep_best_session(tmp_path)
    rng = random.Random(seed)
    epoch = rng.randint(2, reference["best"] + 1)  # after epoch 1 (the first best) was recorded, before the end
    began = time.monotonic()
    with Nodes(tmp_path) as nodes:
        procs = start_all(nodes, configs)
        procs["bank"].wait_for(f"epoch {epoch - 1} of {EPOCHS} done", timeout=120)
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(procs["bank"].proc.pid, signal.SIGKILL)
        assert procs["bank"].wait(timeout=10) == -signal.SIGKILL
        assert "training finished" not in procs["bank"].output, "the kill came after the end"
        restart_label_holder(nodes, configs, procs, began)
    assert_same_result(tmp_path, reference)


def test_a_label_holder_dying_between_a_best_epochs_validation_and_its_commit_resumes_to_the_same_result(
        tmp_path, reference):
    configs = keep_best_session(tmp_path)
    began = time.monotonic()
    with Nodes(tmp_path) as nodes:
        crashing = crashing_label_holder(nodes, configs["bank"])
        procs = start_all(nodes, configs, bank=crashing)
        assert crashing.wait(timeout=120) == -signal.SIGKILL, crashing.output
        assert "crash_at_commit: SIGKILL before committing step" in crashing.output
        restart_label_holder(nodes, configs, procs, began)
    assert_same_result(tmp_path, reference)


@pytest.mark.slow
def test_a_data_holder_killed_after_the_first_best_epoch_and_restarted_ends_as_an_uninterrupted_run(
        tmp_path, reference):
    configs = keep_best_session(tmp_path)
    began = time.monotonic()
    with Nodes(tmp_path) as nodes:
        procs = start_all(nodes, configs)
        procs["bank"].wait_for(f"epoch {reference['best']} of {EPOCHS} done", timeout=120)  # the best epoch
        os.kill(procs["dh1"].proc.pid, signal.SIGKILL)
        assert procs["dh1"].wait(timeout=10) == -signal.SIGKILL
        dh1 = nodes.start(configs["dh1"])
        all_finish(began, bank=procs["bank"], dh1=dh1, dh2=procs["dh2"])
    assert "resuming every party from the checkpoint at step" in procs["bank"].output
    assert_same_result(tmp_path, reference)


@pytest.mark.slow
def test_a_label_holder_paused_by_SIGTERM_after_the_best_epoch_and_restarted_ends_as_an_uninterrupted_run(
        tmp_path, reference):
    configs = keep_best_session(tmp_path)
    began = time.monotonic()
    with Nodes(tmp_path) as nodes:
        procs = start_all(nodes, configs)
        procs["bank"].wait_for(f"epoch {reference['best']} of {EPOCHS} done", timeout=120)
        os.kill(procs["bank"].proc.pid, signal.SIGTERM)
        assert procs["bank"].wait(timeout=20) == PAUSED, procs["bank"].output
        assert not (tmp_path / "model" / "bank-segment.pt").exists()
        restart_label_holder(nodes, configs, procs, began)
    assert_same_result(tmp_path, reference)

