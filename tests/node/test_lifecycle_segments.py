"""A run's results across its lifecycle, between real node processes: a trained segment is only ever replaced by
another finished one, a resume that cannot fit the model says so before anything is written, an interrupted node
exits non-zero keeping its checkpoints, and prediction leaves the training history alone (issue 13, bugs 4, 6, 8)."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

from .procs import Nodes
from .test_training_nodes import FAST, run_nodes, training_session


def digests(folder: Path, pattern: str) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob(pattern))}


def add_feature_column(path: Path) -> None:
    """The data holder's table gains a column: its bottom model's first layer no longer fits what was trained."""
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows([rows[0] + ["extra"]] + [r + ["0.5"] for r in rows[1:]])


def run_all(tmp_path: Path, configs: dict[str, Path], timeout: float) -> tuple[dict[str, int], dict[str, str]]:
    with Nodes(tmp_path) as nodes:
        procs = {name: nodes.start(path) for name, path in configs.items()}
        codes = {name: p.wait(timeout=timeout) for name, p in procs.items()}
        return codes, {name: p.output for name, p in procs.items()}


def test_bug4_a_checkpoint_that_does_not_fit_the_model_is_a_clear_error_and_the_segments_stay(tmp_path):
    """A finished 2-epoch run, then dh1's table gains a column and the same folder is run again: the label holder
    resumes from its manifest (the start of epoch 2), and dh1's checkpoint has a first layer of 5 inputs where the
    model now has 6. dh1 ends the session at once naming itself, the layer and both shapes; every party exits
    non-zero in seconds (not after the progress timeout), and no segment or checkpoint file changes."""
    configs, _ = training_session(tmp_path, window=1, epochs=2)
    run_nodes(tmp_path, configs)
    model = tmp_path / "model"
    segments, checkpoints = digests(model, "*-segment.pt"), digests(model / "checkpoints", "*")
    assert set(segments) == {"bank-segment.pt", "dh1-segment.pt", "dh2-segment.pt"}

    add_feature_column(tmp_path / "dh1.csv")
    codes, out = run_all(tmp_path, configs, timeout=FAST["progress"] / 2)  # a hang would run into the timeout

    assert codes["dh1"] == 1 and codes["bank"] == 1 and codes["dh2"] == 1, out
    expected = "party 'dh1' cannot resume from step 6: layer '0.weight' is [6, 5] in the checkpoint"
    assert expected in out["dh1"], out["dh1"]
    assert "but [6, 6] in the model this config builds" in out["dh1"]
    assert "data holder 'dh1' left during the session: checkpoint: party 'dh1' cannot resume" in out["bank"]
    for name, text in out.items():
        assert "saved this party's segment" not in text, (name, text)
        assert "Traceback" not in text and "size mismatch" not in text, (name, text)
    assert digests(model, "*-segment.pt") == segments
    assert digests(model / "checkpoints", "*") == checkpoints


def test_bug4_a_trained_segment_that_does_not_fit_is_refused_before_predicting(tmp_path):
    """``vfl predict`` with a table of another width: exit 2 before any network activity, naming the party, the file,
    the layer and both shapes; the segment is untouched."""
    configs, _ = training_session(tmp_path, window=1, epochs=1)
    run_nodes(tmp_path, configs)
    segment = tmp_path / "model" / "dh1-segment.pt"
    before = segment.read_bytes()
    add_feature_column(tmp_path / "dh1.csv")
    with Nodes(tmp_path) as nodes:
        proc = nodes.start_command(["predict", "--config", str(configs["dh1"]), "--data", str(tmp_path / "dh1.csv")], "dh1")
        assert proc.wait(timeout=60) == 2, proc.output
    assert f"party 'dh1': {segment} does not fit the model in this config: layer '0.weight' is [6, 5]" in proc.output
    assert "[6, 6] in the model this config builds" in proc.output and "Traceback" not in proc.output
    assert segment.read_bytes() == before
