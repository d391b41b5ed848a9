"""Checkpoint files: atomic writes, digests, and a crash mid-write that leaves the previous checkpoint usable."""

from __future__ import annotations

import os

import pytest
import torch

from vfl.node.checkpoints import KEEP, Checkpointer
from vfl.protocol.training_phase import CheckpointError


def state(value: float) -> dict:
    return {"model": {"w": torch.full((3,), value)}, "optimizer": {"state": {}, "param_groups": []}}


def test_save_and_load_round_trip_with_digest(tmp_path):
    c = Checkpointer(tmp_path, "dh1", "run-1", "m1")
    digest = c.save(state(1.0), step=10, epoch=0)
    loaded = c.load(10, digest)
    assert torch.equal(loaded["model"]["w"], torch.full((3,), 1.0)) and loaded["vfl_step"] == 10


def test_a_changed_file_or_another_run_is_refused(tmp_path):
    c = Checkpointer(tmp_path, "dh1", "run-1", "m1")
    digest = c.save(state(1.0), step=10, epoch=0)
    with pytest.raises(CheckpointError, match="does not match the digest"):
        c.load(10, "0" * 64)
    with pytest.raises(CheckpointError, match="belongs to run"):
        Checkpointer(tmp_path, "dh1", "run-2", "m1").load(10, digest)
    with pytest.raises(CheckpointError, match="no checkpoint of party 'dh1' at step 20"):
        c.load(20, None)


def test_a_crash_while_writing_a_checkpoint_leaves_the_previous_one_usable(tmp_path, monkeypatch):
    c = Checkpointer(tmp_path, "dh1", "run-1", "m1")
    good = c.save(state(1.0), step=10, epoch=0)
    c.commit(10, 0, {"dh1": good})

    def crash(*args):  # the process dies after writing some bytes, before the rename
        raise SystemExit("killed")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(SystemExit):
        c.save(state(2.0), step=20, epoch=0)
    monkeypatch.undo()
    assert not c.path(20).exists()  # never a half-written checkpoint under the real name
    assert torch.equal(c.load(10, good)["model"]["w"], torch.full((3,), 1.0))
    assert c.latest()["step"] == 10


def test_old_checkpoints_are_pruned_but_the_newest_are_kept(tmp_path):
    c = Checkpointer(tmp_path, "dh1", "run-1", "m1")
    for step in range(0, 60, 10):
        c.save(state(float(step)), step=step, epoch=0)
    kept = sorted(int(p.name.split("-")[-1][:-3]) for p in tmp_path.glob("dh1-step-*.pt"))
    assert kept == [30, 40, 50] and len(kept) == KEEP


def steps_on_disk(folder, party="dh1") -> list[int]:
    return sorted(int(p.name.split("-")[-1][:-3]) for p in folder.glob(f"{party}-step-*.pt"))


def test_the_kept_checkpoint_of_the_best_epoch_outlives_pruning_and_a_restart(tmp_path):
    """[X7] v1.5: CHECKPOINT {keep: true} spares that file until another one is kept, also in a new process."""
    c = Checkpointer(tmp_path, "dh1", "run-1", "m1")
    for step in range(0, 60, 10):
        c.save(state(float(step)), step=step, epoch=0, keep=step == 10)
    assert steps_on_disk(tmp_path) == [10, 30, 40, 50]
    again = Checkpointer(tmp_path, "dh1", "run-1", "m1")  # a restarted data holder
    assert again.kept == 10
    again.save(state(6.0), step=60, epoch=0)
    assert steps_on_disk(tmp_path) == [10, 40, 50, 60]
    again.save(state(7.0), step=70, epoch=0, keep=True)  # a new best replaces the old one
    assert steps_on_disk(tmp_path) == [50, 60, 70]
    assert Checkpointer(tmp_path, "dh1", "run-2", "m1").kept is None  # another run's record is not ours
    again.save(state(0.5), step=5, epoch=0)  # a rollback to before the kept step: it belongs to the left pipeline
    assert again.kept is None and not (tmp_path / "dh1-kept.json").exists() and steps_on_disk(tmp_path) == [5]
