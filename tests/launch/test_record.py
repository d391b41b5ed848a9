"""`vfl launch FOLDER` records the run like `vfl demo` does: ``logs/NAME.log`` per node and ``summary.json``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .test_launcher import launchers  # noqa: F401 - a fixture

pytest.importorskip("sklearn", reason="the demo data sets come from scikit-learn")

RUN_TIMEOUT_S = 300.0
#: every summary.json has these; `vfl demo` adds "demo" and "rows"
RECORD_KEYS = {"ok", "exit_codes", "wall_seconds", "launch_seconds", "psi_seconds", "aligned_rows", "train_rows",
               "epochs", "final", "train_samples", "train_seconds", "train_samples_per_second", "traffic", "logs",
               "defence", "leak", "kept_epoch", "train_step_seconds", "train_step_samples_per_second",
               "window", "parties"}


def test_vfl_launch_writes_summary_json_and_logs_with_true_sample_counts(tmp_path, launchers):  # noqa: F811
    """Bug 9: `vfl launch` wrote neither, though the README says it does. Bug 10: the training figure counts each
    step at its true size, so it is exactly train rows x epochs (the short last batch counted as short)."""
    run = tmp_path / "breast"
    done = subprocess.run([sys.executable, "-m", "vfl", "demo", "breast", "--prepare-only", "--out", str(run)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    launcher = launchers(run)
    code = launcher.wait(timeout=RUN_TIMEOUT_S)
    assert code == 0, launcher.output
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary) == RECORD_KEYS, set(summary) ^ RECORD_KEYS
    assert summary["ok"] is True and summary["exit_codes"] == {"bank": 0, "dh1": 0}
    assert summary["epochs"] == 25 and summary["final"]["val_auc"] >= 0.97, summary
    assert summary["train_rows"] == summary["aligned_rows"] - round(summary["aligned_rows"] * 0.25)
    assert summary["train_samples"] == summary["train_rows"] * 25  # 402 rows: 12 steps of 32 and one of 18
    assert summary["train_rows"] % 32 != 0  # the test means something: each epoch ends on a short batch
    assert 0 < summary["psi_seconds"] < summary["launch_seconds"] <= summary["wall_seconds"]
    assert 0 < summary["train_seconds"] < summary["launch_seconds"]
    rate = summary["train_samples_per_second"]
    assert rate is None or rate == round(summary["train_samples"] / summary["train_seconds"], 1)
    # the steps alone: part of the training phase (no validation, no checkpoints), the same samples
    assert 0 < summary["train_step_seconds"] <= summary["train_seconds"]
    step_rate = summary["train_step_samples_per_second"]
    assert step_rate is None or step_rate == round(summary["train_samples"] / summary["train_step_seconds"], 1)
    # the demo keeps its best epoch: final holds that epoch's metrics, as metrics.jsonl has them
    lines = [json.loads(x) for x in (run / "model" / "metrics.jsonl").read_text().splitlines()]
    best = min(lines, key=lambda m: m["val_loss"])
    assert summary["kept_epoch"] == best["epoch"] and summary["final"]["val_loss"] == best["val_loss"]
    for name in ("bank", "dh1"):
        log = (run / summary["logs"][name]).read_text()
        assert f"vfl[{name}]" in log and "(exit 0; sent" in log
        assert summary["traffic"][name]["sent_bytes"] > 0
    assert summary["traffic"]["bank"]["sent_bytes"] == summary["traffic"]["dh1"]["received_bytes"]
