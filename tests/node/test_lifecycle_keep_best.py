"""`[train].keep = "best"` and `patience` between real node processes (issue 13; PROTOCOL.md [X7], [X10], v1.5).

The label holder judges every epoch by its validation loss. With `keep = "best"` every party's saved segment is its
weights after the epoch with the lowest validation loss (each party's checkpoint at that step, kept by the
CHECKPOINT's `keep` flag and loaded on TRAINING_DONE); with `patience = N` the run stops once N epochs in a row did
not lower it, and counts as finished (exit 0, a finished manifest, one metrics line per trained epoch)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from vfl.node.checkpoints import load_state

from .procs import Nodes
from .test_training_nodes import read_metrics, run_nodes, training_session

#: a learning rate high enough that this small synthetic set overfits within a few epochs: the validation loss
#: turns up early, so patience stops the run (W = 1 is deterministic, so it does in every run)
EAGER = {"kind": "adam", "lr": 0.05}
EPOCHS, PATIENCE = 14, 2


def with_train_keys(config: Path, **keys) -> None:
    """Add keys to the config's [train] table (the label holder's)."""
    text = config.read_text()
    lines = "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items())
    config.write_text(text.replace("[train]\n", "[train]\n" + lines, 1))


def segment(path: Path) -> dict:
    return load_state(path.read_bytes(), path)


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def best_run(tmp_path: Path, keep: str = "best", patience: int = PATIENCE):
    configs, _ = training_session(tmp_path, window=1, epochs=EPOCHS, opt=EAGER)
    with_train_keys(configs["bank"], keep=keep, patience=patience)
    outputs = run_nodes(tmp_path, configs)
    return configs, outputs, read_metrics(tmp_path / "model" / "metrics.jsonl")


def test_keep_best_with_patience_stops_early_and_every_party_saves_its_best_epochs_weights(tmp_path):
    _, outputs, metrics = best_run(tmp_path)
    losses = [m["val_loss"] for m in metrics]
    best = min(range(len(losses)), key=losses.__getitem__)  # 0-based position of the lowest validation loss
    # patience: stopped exactly PATIENCE epochs after the best, before the schedule's end
    assert len(metrics) == best + 1 + PATIENCE < EPOCHS, losses
    assert [m["epoch"] for m in metrics] == list(range(1, len(metrics) + 1))
    kept_epoch = best + 1  # 1-based, as in metrics.jsonl and the log
    model = tmp_path / "model"
    manifest = json.loads((model / "checkpoints" / "manifest.json").read_text())
    assert manifest["finished"] is True and manifest["epochs"] == len(metrics)
    assert manifest["kept_epoch"] == kept_epoch and manifest["best"]["epoch"] == best
    step = manifest["best"]["step"]
    assert step == metrics[best]["step"]  # the first step after the kept epoch: its weights
    for party, part in (("bank", "top"), ("dh1", "model"), ("dh2", "model")):
        saved = segment(model / f"{party}-segment.pt")
        kept = segment(model / "checkpoints" / f"{party}-step-{step}.pt")
        last = segment(model / "checkpoints" / f"{party}-step-{manifest['step']}.pt")
        assert same_tensors(saved[part], kept[part]), party
        assert not same_tensors(saved[part], last[part]), party  # not merely the last epoch's weights
    assert f"kept the weights after epoch {kept_epoch}, the best validation loss" in outputs["bank"]
    assert re.search(rf"early stop: validation loss not improved for {PATIENCE} epoch", outputs["bank"])
    for dh in ("dh1", "dh2"):
        assert (f"training done after {len(metrics)} epoch(s) (the label holder stopped early); this segment keeps "
                f"the weights after epoch {kept_epoch}") in outputs[dh]
        assert f"saved this party's segment" in outputs[dh]


def test_keep_best_without_patience_trains_every_epoch_and_keeps_the_best(tmp_path):
    _, _, metrics = best_run(tmp_path, patience=0)
    assert len(metrics) == EPOCHS
    losses = [m["val_loss"] for m in metrics]
    best = min(range(EPOCHS), key=losses.__getitem__)
    manifest = json.loads((tmp_path / "model" / "checkpoints" / "manifest.json").read_text())
    if best == EPOCHS - 1:
        assert "kept_epoch" not in manifest  # the last epoch was the best: nothing to load
    else:
        assert manifest["kept_epoch"] == best + 1
        step = manifest["best"]["step"]
        for party, part in (("bank", "top"), ("dh1", "model")):
            assert same_tensors(segment(tmp_path / "model" / f"{party}-segment.pt")[part],
                                segment(tmp_path / "model" / "checkpoints" / f"{party}-step-{step}.pt")[part])


def test_patience_with_keep_last_stops_early_and_keeps_the_last_epoch(tmp_path):
    _, outputs, metrics = best_run(tmp_path, keep="last")
    assert len(metrics) < EPOCHS
    manifest = json.loads((tmp_path / "model" / "checkpoints" / "manifest.json").read_text())
    assert manifest["finished"] is True and "kept_epoch" not in manifest
    assert f"this segment keeps the weights after epoch {len(metrics)}" in outputs["dh1"]
    assert not math.isnan(metrics[-1]["val_loss"])


def test_a_finished_early_stopped_run_is_not_trained_again(tmp_path):
    """An early-stopped run is a finished run ([bug 7]): starting it again is refused before anything changes."""
    configs, _, metrics = best_run(tmp_path)
    with Nodes(tmp_path) as nodes:
        again = nodes.start(configs["bank"])
        assert again.wait(timeout=60) == 2, again.output
    assert f"already finished ({len(metrics)} epochs" in again.output
