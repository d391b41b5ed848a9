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


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def best_checkpoint_committed(folder: Path, step: int, timeout: float = 60.0) -> None:
    """Wait until the manifest records the best epoch at ``step`` with every party's digest."""
    manifest = folder / "model" / "checkpoints" / "manifest.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            best = json.loads(manifest.read_text()).get("best", {})
        except (OSError, ValueError):
            best = {}
        if best.get("step") == step and len(best.get("digests", {})) == 3:
            return
        time.sleep(0.02)
    raise AssertionError(f"the best epoch's checkpoint at step {step} was not committed within {timeout} s")


def edited_before_training_done(folder: Path, reference: dict, party: str) -> tuple[dict, dict, Path]:
    """The session, with a byte of ``party``'s kept checkpoint flipped once the manifest committed it (the party
    stopped meanwhile, so it cannot reach TRAINING_DONE while the file changes): (exit codes, outputs, the file)."""
    configs = keep_best_session(folder)
    step = reference["manifest"]["best"]["step"]
    kept = folder / "model" / "checkpoints" / f"{party}-step-{step}.pt"
    with Nodes(folder) as nodes:
        procs = start_all(nodes, configs)
        best_checkpoint_committed(folder, step)
        os.kill(procs[party].proc.pid, signal.SIGSTOP)
        try:
            flip_a_byte(kept)
        finally:
            os.kill(procs[party].proc.pid, signal.SIGCONT)
        codes = {name: p.wait(timeout=120) for name, p in procs.items()}
        outputs = {name: p.output for name, p in procs.items()}
    return codes, outputs, kept


@pytest.mark.parametrize("party", ["dh1", "bank"])
def test_c_a_kept_checkpoint_edited_before_training_done_is_a_clear_error_and_no_segment_of_that_party(
        tmp_path, reference, party):
    """A byte of a party's kept checkpoint flipped after it was committed, before TRAINING_DONE loads it: that party
    exits 1 naming the file and writes no segment. The label holder's own: nobody writes one, the run is not
    finished (restore the file and start again: it resumes)."""
    codes, outputs, kept = edited_before_training_done(tmp_path, reference, party)
    assert codes[party] == 1, (codes, outputs[party])
    assert f"{kept} does not match the digest recorded for step" in outputs[party], outputs[party]
    assert not (tmp_path / "model" / f"{party}-segment.pt").exists()
    if party == "bank":
        assert codes["dh1"] != 0 and codes["dh2"] != 0, codes
        assert not list((tmp_path / "model").glob("*-segment.pt"))
        manifest = json.loads((tmp_path / "model" / "checkpoints" / "manifest.json").read_text())
        assert "finished" not in manifest


def test_c_a_data_holder_that_cannot_load_its_kept_checkpoint_leaves_the_run_unfinished(tmp_path, reference):
    """[X10]: the label holder finishes only once every data holder has confirmed TRAINING_DONE, i.e. loaded its
    kept weights; one that cannot ends the session for everyone, and nothing claims the run finished."""
    codes, outputs, _ = edited_before_training_done(tmp_path, reference, "dh1")
    manifest = json.loads((tmp_path / "model" / "checkpoints" / "manifest.json").read_text())
    assert codes["bank"] != 0 and "finished" not in manifest, (codes, manifest)
    assert not list((tmp_path / "model").glob("*-segment.pt")), outputs["bank"]


def test_b_a_finished_early_stopped_folder_started_with_fresh_trains_from_epoch_1_to_the_same_result(
        tmp_path, reference):
    """`vfl launch FOLDER --fresh` on the early-stopped folder: every party's earlier results, its PARTY-kept.json
    included, are moved aside byte for byte (the feature files, copies of the tables and no result, stay where they
    are, unchanged); the run trains again from epoch 1 and ends as the first did."""
    from .test_lifecycle_resume import launch, tree

    configs = keep_best_session(tmp_path)
    run_nodes(tmp_path, configs)
    model = tmp_path / "model"
    before = tree(model)
    kept_files = {f"checkpoints/{p}-kept.json" for p in PARTS}
    assert kept_files <= set(before), sorted(before)
    done = launch(tmp_path, "--fresh", timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    moved = {}
    for folder in sorted(model.glob("previous-*")):
        moved.update(tree(folder))
    features = {k: v for k, v in before.items() if "-features-" in k}
    assert features and {k: tree(model).get(k) for k in features} == features and not features.keys() & moved.keys()
    results = {k: v for k, v in before.items() if k not in features}
    assert {k: moved.get(k) for k in results} == results, (sorted(before), sorted(moved))
    assert "epoch 1 of" in done.stdout + done.stderr and "resuming" not in done.stdout + done.stderr
    for name in kept_files:  # the new run's own kept checkpoint, of the same best epoch
        assert json.loads((model / name).read_text())["step"] == reference["manifest"]["best"]["step"]
    assert_same_result(tmp_path, reference)
