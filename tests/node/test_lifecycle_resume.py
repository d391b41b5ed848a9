"""Starting a run folder again, between real node processes (issue 13, bug 7): a finished run is never silently
trained again, ``--fresh`` trains from epoch 1 and moves the old results aside, ``--resume`` needs a checkpoint,
every party agrees on where the run starts, and ``metrics.jsonl`` never holds two lines for one epoch."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

from .procs import Nodes
from .test_training_nodes import read_metrics, run_nodes, training_session


def tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path -> SHA-256): "nothing changed" is this dict staying equal."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def finished_run(tmp_path: Path, epochs: int = 2) -> dict[str, Path]:
    configs, _ = training_session(tmp_path, window=1, epochs=epochs)
    run_nodes(tmp_path, configs)
    assert [m["epoch"] for m in read_metrics(tmp_path / "model" / "metrics.jsonl")] == list(range(1, epochs + 1))
    return configs


def launch(folder: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vfl", "launch", str(folder), *args], capture_output=True, text=True,
                          timeout=timeout)


def test_bug7_a_finished_run_started_again_is_refused_saying_how_to_start_fresh_and_nothing_changes(tmp_path):
    """The same `vfl node` command on a finished folder: exit 2 before any network activity, naming the run, its
    epochs, where its model is and the `--fresh` command; `--resume` is refused too (nothing to resume). And `vfl
    launch FOLDER` stops there as well. No file of the folder changes."""
    configs = finished_run(tmp_path)
    model = tmp_path / "model"
    before = tree(model)
    with Nodes(tmp_path) as nodes:
        again = nodes.start(configs["bank"])
        assert again.wait(timeout=60) == 2, again.output
        resumed = nodes.start(configs["bank"], "--resume")
        assert resumed.wait(timeout=60) == 2, resumed.output
    assert f"run 'train-test' already finished (2 epochs; its model and metrics are in {model})" in again.output
    assert f"`vfl node --fresh --config {configs['bank']}`" in again.output
    assert f"moved to {model}/previous-TIME/, not deleted" in again.output
    assert "nothing to resume" in resumed.output and "listening on" not in again.output + resumed.output
    done = launch(tmp_path, timeout=120)
    assert done.returncode != 0 and "already finished" in done.stdout + done.stderr, done.stdout + done.stderr
    assert tree(model) == before


def test_bug7_fresh_trains_again_from_epoch_1_and_moves_the_old_results_aside(tmp_path):
    """`vfl launch FOLDER --fresh` on a finished folder: every node gets --fresh, the run trains again with exactly
    one metrics line per epoch, and every party's earlier segment (and the label holder's metrics and manifest)
    is in model/previous-TIME/, byte for byte. The data holders' feature files (their tables' features, not results)
    stay where they are and serve the new run."""
    finished_run(tmp_path, epochs=2)
    model = tmp_path / "model"
    before = tree(model)
    done = launch(tmp_path, "--fresh")
    assert done.returncode == 0, done.stdout + done.stderr
    assert [m["epoch"] for m in read_metrics(model / "metrics.jsonl")] == [1, 2]
    previous = sorted(model.glob("previous-*"))
    assert previous, sorted(tree(model))
    moved = {}
    for folder in previous:
        moved.update(tree(folder))
    features = {k for k in before if "-features-" in k}  # a copy of the table, not a result: it stays for the new run
    assert features and features <= set(tree(model)) and not features & set(moved)
    kept = {k for k in before if (not k.startswith("checkpoints/") or k.endswith("manifest.json")) and k not in features}
    assert {k: before[k] for k in kept} == {k: moved[k] for k in kept}, (sorted(before), sorted(moved))
    assert "moved this party's earlier results" in done.stdout + done.stderr
    manifest = json.loads((model / "checkpoints" / "manifest.json").read_text())
    assert manifest["finished"] is True and manifest["epochs"] == 2


def test_bug7_a_data_holder_that_disagrees_with_the_label_holder_ends_the_session_naming_both(tmp_path):
    """The label holder starts afresh (--fresh), a data holder was told --resume: the data holder ends the session at
    the SCHEDULE, saying that the label holder starts from epoch 1; its own files stay as they were."""
    configs = finished_run(tmp_path)
    model = tmp_path / "model"
    dh1_before = {k: v for k, v in tree(model).items() if "dh1-" in k}
    with Nodes(tmp_path) as nodes:
        bank = nodes.start(configs["bank"], "--fresh")
        dh1 = nodes.start(configs["dh1"], "--resume")
        dh2 = nodes.start(configs["dh2"])
        codes = {"bank": bank.wait(timeout=90), "dh1": dh1.wait(timeout=90), "dh2": dh2.wait(timeout=90)}
    assert codes["dh1"] == 1 and codes["bank"] != 0, (codes, bank.output, dh1.output)
    assert ("this data holder was started with --resume, but the label holder starts run 'train-test' from epoch 1"
            in dh1.output), dh1.output
    assert {k: v for k, v in tree(model).items() if k.startswith("dh1-")} == {
        k: v for k, v in dh1_before.items() if k.startswith("dh1-")}


def test_bug7_a_resumed_last_epoch_leaves_one_metrics_line_per_epoch(tmp_path):
    """A folder whose run stopped in its last epoch after that epoch's line was written (the manifest points at the
    start of the last epoch; this is also how a finished run looked before runs were marked finished): resuming it
    trains the last epoch again, and metrics.jsonl still has exactly one line per epoch (it had two for the last)."""
    configs = finished_run(tmp_path, epochs=3)
    manifest_path = tmp_path / "model" / "checkpoints" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["epoch"] == 2  # the checkpoint at the start of the third epoch (0-based on disk)
    manifest_path.write_text(json.dumps({k: v for k, v in manifest.items() if k not in ("finished", "epochs")}))
    outputs = run_nodes(tmp_path, configs)
    assert "resuming from the checkpoint at step" in outputs["bank"] and "(epoch 3)" in outputs["bank"]
    assert [m["epoch"] for m in read_metrics(tmp_path / "model" / "metrics.jsonl")] == [1, 2, 3]


def test_a_new_run_in_a_folder_of_an_older_one_keeps_its_own_checkpoints(tmp_path):
    """An earlier run's checkpoints at higher steps no longer outrank a new run's: saving step s drops this party's
    files past s (they can never be resumed from again), so the new run's newest checkpoints are the ones kept."""
    import torch

    from vfl.node.checkpoints import Checkpointer

    old = Checkpointer(tmp_path, "dh1", "first", "m")
    for step in (40, 50, 60):
        old.save({"w": torch.zeros(2)}, step=step, epoch=3)
    new = Checkpointer(tmp_path, "dh1", "second", "m")
    new.save({"w": torch.ones(2)}, step=0, epoch=0)
    assert sorted(p.name for p in tmp_path.glob("dh1-step-*.pt")) == ["dh1-step-0.pt"]
    assert new.load(0, None)["vfl_run"] == "second"


def test_trim_metrics_keeps_the_completed_epochs_and_other_lines(tmp_path):
    from vfl.node.lifecycle import trim_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 1}\n{"epoch": 2}\nnot a record\n{"epoch": 3}\n{"epoch": 3}\n')
    assert trim_metrics(path, 2) == 2
    assert path.read_text() == '{"epoch": 1}\n{"epoch": 2}\nnot a record\n'
    assert trim_metrics(path, 2) == 0 and trim_metrics(tmp_path / "absent.jsonl", 0) == 0
