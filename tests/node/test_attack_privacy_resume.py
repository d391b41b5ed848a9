"""Attacks on the `[privacy]` defences with real node processes (issue 14): a run with each defence, killed
(``kill -9``) mid-training and resumed, ends as an uninterrupted run of it does (W = 1 is deterministic, and every
defence draws from a generator seeded by ``[model].seed``, the step and the party, label_dp's randomised labels from
``[model].seed`` over the label holder's file order): one metrics.jsonl line per epoch, every metric of every epoch
(the training figures and the leak audit's included) and every saved segment equal to 1e-6.

- a data holder killed mid-epoch 2 and started again with the same command (every party rolls back);
- with label_dp, also the label holder killed and started again: it randomises the labels again, to the same ones.
"""

from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from vfl.node.checkpoints import load_state

from .procs import Nodes
from .test_training_nodes import RESUMABLE, read_metrics, run_nodes, session_configs, shared_tables

EPOCHS = 4
SCENARIO_S = 240.0
PARTS = {"bank": "top", "dh1": "model", "dh2": "model"}
DEFENCES = {
    "max_norm": {"defence": "max_norm"},
    "marvell": {"defence": "marvell", "sumkl": 1.0},
    "label_dp": {"defence": "label_dp", "epsilon": 1.0},
    "gradient_noise": {"defence": "gradient_noise", "clip": 0.05, "sigma": 1.0},
}
LEAK = ("leak_auc_norm", "leak_auc_direction")


def private_session(folder: Path, privacy: dict) -> dict[str, Path]:
    """A binary task (about a third positive) over 900 people at every party, batch 8 (85 steps an epoch), a
    checkpoint every 5 steps, W = 1, the defence ``privacy`` in every node's config."""
    folder.mkdir(parents=True, exist_ok=True)
    shared_tables(folder, 900, labels=lambda y: (y == 0).astype(np.int64))
    return session_configs(folder, run="privacy-attack", epochs=EPOCHS, opt={"kind": "sgd", "lr": 0.1, "momentum": 0.5},
                           timeouts=RESUMABLE, batch_size=8, window=1, checkpoint_every=5, task="binary", outputs=1,
                           privacy=privacy)


def outcome(folder: Path) -> tuple[list[dict], dict]:
    model = folder / "model"
    segments = {}
    for party, part in PARTS.items():
        path = model / f"{party}-segment.pt"
        segments[party] = load_state(path.read_bytes(), path)[part]
    return read_metrics(model / "metrics.jsonl"), segments


def same_number(a, b) -> bool:
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-6


def assert_same_run(got: tuple[list[dict], dict], want: tuple[list[dict], dict]) -> None:
    (metrics, segments), (ref_metrics, ref_segments) = got, want
    assert [m["epoch"] for m in metrics] == list(range(1, EPOCHS + 1))
    for mine, theirs in zip(metrics, ref_metrics):
        for key in LEAK:  # the audit's figures of every epoch, for every data holder
            assert set(mine[key]) == {"dh1", "dh2"}, (key, mine)
        for key, value in theirs.items():
            if key.startswith(("train_", "val_")):
                assert same_number(mine[key], value), (mine["epoch"], key, mine[key], value)
            elif key in LEAK:
                assert all(same_number(mine[key][p], value[p]) for p in value), (mine["epoch"], key, mine[key], value)
    for party in PARTS:
        a, b = segments[party], ref_segments[party]
        assert a.keys() == b.keys()
        worst = max(torch.max(torch.abs(a[k].float() - b[k].float())).item() for k in a)
        assert worst <= 1e-6, (party, worst)


def killed_and_restarted(folder: Path, configs: dict, who: str) -> None:
    """The three parties; ``who`` killed (SIGKILL) mid-epoch 2 and started again with the same command."""
    began = time.monotonic()
    with Nodes(folder) as nodes:
        procs = {"bank": nodes.start(configs["bank"]), "dh2": nodes.start(configs["dh2"]),
                 "dh1": nodes.start(configs["dh1"])}
        procs["bank"].wait_for(f"epoch 1 of {EPOCHS} done", timeout=120)
        procs["bank"].wait_for("epoch 2: ", timeout=60)  # the progress line a quarter into epoch 2
        os.kill(procs[who].proc.pid, signal.SIGKILL)
        assert procs[who].wait(timeout=10) == -signal.SIGKILL
        assert f"epoch 2 of {EPOCHS} done" not in procs["bank"].output, "the kill came too late to be mid-epoch 2"
        procs[who] = nodes.start(configs[who])
        codes = {name: p.wait(timeout=120) for name, p in procs.items()}
        assert codes == {name: 0 for name in procs}, {name: p.output for name, p in procs.items()}
    assert time.monotonic() - began < SCENARIO_S
    resumed = "resuming from the checkpoint at step" if who == "bank" else "resuming every party from the checkpoint"
    assert resumed in procs["bank"].output


def scenario(tmp_path: Path, defence: str, who: str) -> None:
    reference = tmp_path / "reference"
    run_nodes(reference, private_session(reference, DEFENCES[defence]))
    attacked = tmp_path / "attacked"
    killed_and_restarted(attacked, private_session(attacked, DEFENCES[defence]), who)
    assert_same_run(outcome(attacked), outcome(reference))


@pytest.mark.slow
@pytest.mark.parametrize("defence", ["max_norm", "marvell", "gradient_noise"])
def test_d_a_data_holder_killed_mid_training_with_each_defence_resumes_to_the_uninterrupted_run(tmp_path, defence):
    scenario(tmp_path, defence, "dh1")


@pytest.mark.parametrize("who", [pytest.param("dh1", marks=pytest.mark.slow), "bank"])
def test_d_label_dp_killed_mid_training_and_resumed_trains_on_the_same_randomised_labels(tmp_path, who):
    scenario(tmp_path, "label_dp", who)
