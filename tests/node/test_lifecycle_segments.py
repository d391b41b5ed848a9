"""A run's results across its lifecycle, between real node processes: a trained segment is only ever replaced by
another finished one, a resume that cannot fit the model says so before anything is written, an interrupted node
exits non-zero keeping its checkpoints, and prediction leaves the training history alone (issue 13, bugs 4, 6, 8)."""

from __future__ import annotations

import csv
import hashlib
import json
import signal
from pathlib import Path

import pytest

from vfl.node.training import INTERRUPTED

from .procs import Nodes
from .test_training_nodes import FAST, resumable_session, run_nodes, session_configs, training_session


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
    """A 2-epoch run whose manifest points at the start of epoch 2, as an interrupted run leaves it (a finished run
    is refused instead: test_lifecycle_resume), then dh1's table gains a column and the same folder is run again: the
    label holder resumes from its manifest, and dh1's checkpoint has a first layer of 5 inputs where the model now has
    6. dh1 ends the session at once naming itself, the layer and both shapes; every party exits non-zero in seconds
    (not after the progress timeout), and no segment or checkpoint file changes."""
    configs, _ = training_session(tmp_path, window=1, epochs=2)
    run_nodes(tmp_path, configs)
    model = tmp_path / "model"
    manifest = json.loads((model / "checkpoints" / "manifest.json").read_text())
    unfinished = {k: v for k, v in manifest.items() if k not in ("finished", "epochs")}
    (model / "checkpoints" / "manifest.json").write_text(json.dumps(unfinished))
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


def finished_then_interrupted(tmp_path: Path, stop: str):
    """A finished 1-epoch run (its segments), then a new run in the same folder, 8 epochs, and ``stop`` (a party)
    sent SIGTERM (started with ``--end-session``) once the label holder has finished epoch 1. Returns (codes, outputs,
    segments before)."""
    configs = resumable_session(tmp_path, epochs=1)
    run_nodes(tmp_path, configs)
    segments = digests(tmp_path / "model", "*-segment.pt")
    assert len(segments) == 3
    timeouts = {**FAST, "peer": 3.0, "heartbeat": 0.3, "rejoin": 60.0}
    configs = session_configs(tmp_path, run="second", epochs=8, opt={"kind": "sgd", "lr": 0.05, "momentum": 0.5},
                              timeouts=timeouts, batch_size=8, window=1, checkpoint_every=5)
    with Nodes(tmp_path) as nodes:
        # --end-session: the signal ends the session for everyone ([J2]; without it the stopped party pauses)
        procs = {name: nodes.start(path, *(["--end-session"] if name == stop else [])) for name, path in configs.items()}
        procs["bank"].wait_for("epoch 1 of 8 done", timeout=120)
        procs[stop].proc.send_signal(signal.SIGTERM)
        codes = {name: p.wait(timeout=30) for name, p in procs.items()}
        outputs = {name: p.output for name, p in procs.items()}
    assert "epoch 8 of 8 done" not in outputs["bank"], "the run finished before the signal"
    return codes, outputs, segments


@pytest.mark.parametrize("stop", ["dh1", "bank"])
def test_bug6_an_interrupted_node_exits_non_zero_keeps_its_checkpoints_and_saves_no_segment(tmp_path, stop):
    """SIGTERM mid-training, to a data holder or to the label holder: the stopped node exits INTERRUPTED (5) saying
    its checkpoints are kept, the others exit 1, and the segments of the earlier finished run are byte-identical:
    nobody wrote a half-trained "final" segment. The new run's checkpoints are on disk to resume from."""
    codes, out, segments = finished_then_interrupted(tmp_path, stop)
    others = {name: code for name, code in codes.items() if name != stop}
    assert codes[stop] == INTERRUPTED and others == {name: 1 for name in others}, out
    assert "stopped by SIGTERM before the training finished: nothing was saved as this party's result" in out[stop]
    assert "are kept: start the session again with the same configs to resume" in out[stop]
    for name, text in out.items():
        assert "saved this party's segment" not in text, (name, text)
    model = tmp_path / "model"
    assert digests(model, "*-segment.pt") == segments
    manifest = (model / "checkpoints" / "manifest.json").read_text()
    assert '"run": "second"' in manifest
    assert {p.name.split("-")[0] for p in (model / "checkpoints").glob("*-step-*.pt")} == {"bank", "dh1", "dh2"}


def test_bug8_predict_leaves_the_training_metrics_alone(tmp_path):
    """``vfl predict`` after training: ``metrics.jsonl`` keeps exactly the training epochs (it is the training
    history that ``vfl plot`` reads); the predictions are written as before."""
    configs, _ = training_session(tmp_path, window=1, epochs=2)
    run_nodes(tmp_path, configs)
    metrics = tmp_path / "model" / "metrics.jsonl"
    before = metrics.read_bytes()
    assert before.count(b"\n") == 2
    with Nodes(tmp_path) as nodes:
        procs = {p: nodes.start_command(["predict", "--config", str(configs[p]), "--data", str(tmp_path / f"{p}.csv")], p)
                 for p in configs}
        codes = {p: proc.wait(timeout=120) for p, proc in procs.items()}
        assert codes == {"bank": 0, "dh1": 0, "dh2": 0}, {p: proc.output for p, proc in procs.items()}
    assert metrics.read_bytes() == before
    with open(tmp_path / "model" / "predictions.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 241  # the rows every party has, as in training


def test_a_segment_that_cannot_be_saved_is_a_failure_not_a_finished_run(tmp_path):
    """dh1's segment path is taken by a folder, so saving its trained segment fails at the end of a good session:
    dh1 exits 1 naming the file, the label holder and dh2 finish and save theirs, and nothing is written where
    dh1's segment belongs."""
    configs, _ = training_session(tmp_path, window=1, epochs=1)
    blocker = tmp_path / "model" / "dh1-segment.pt"
    (blocker / "not-a-segment").mkdir(parents=True)

    codes, out = run_all(tmp_path, configs, timeout=FAST["progress"] * 2)

    assert codes == {"bank": 0, "dh1": 1, "dh2": 0}, out
    assert f"this party's segment could not be saved to {blocker}" in out["dh1"], out["dh1"]
    assert "nothing was saved as this party's result" in out["dh1"], out["dh1"]
    assert blocker.is_dir() and [p.name for p in blocker.iterdir()] == ["not-a-segment"]
    assert not list((tmp_path / "model").glob(".dh1-segment.pt.*")), "a temporary file was left behind"
    assert (tmp_path / "model" / "bank-segment.pt").is_file() and (tmp_path / "model" / "dh2-segment.pt").is_file()
