"""Training privacy with real node processes on 127.0.0.1 (issue 14), on the breast demo's split, 3 epochs.

- The defence is part of the session config: every node logs it with the session config's digest, which is the one
  the handshake compares; a data holder configured with another defence or parameter is refused with
  CONFIG_MISMATCH naming ``privacy.defence`` / ``privacy.<param>`` and exits 1 (README: exit codes).
- THE ATTACKER: the data holder is vfl's own node whose bottom also records every gradient it receives
  (``privacy_attacker``). Afterwards the test maps its aligned rows to IDs (its own ``[psi].output``) and the IDs to
  the TRUE labels (the label holder's CSV), runs ``vfl.privacy.audit``'s norm and direction attacks per epoch
  itself, and finds exactly what the label holder's audit reported in ``metrics.jsonl``, with no defence and with
  each defence; and a defence lowers what it reports.
- With a defence on, the run is still reproducible: two runs (each PSI agreeing on a new row order) give the same
  metrics and the same segment digests.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vfl.launch.demo import prepare_demo
from vfl.node import load_config
from vfl.node.checkpoints import DIGEST_KEY
from vfl.privacy.audit import direction_leak_auc, norm_leak_auc

from .procs import Node, Nodes

EPOCHS = 3
ROOT = Path(__file__).resolve().parents[2]
#: (defence table, its log text); gradient noise strong enough to blur the direction (std sigma * clip per
#: coordinate on 16 coordinates, against a gradient clipped to norm clip)
DEFENCES = {
    "max_norm": ({"defence": "max_norm"}, "max_norm"),
    "gradient_noise": ({"defence": "gradient_noise", "clip": 0.05, "sigma": 1.0}, "gradient_noise (clip 0.05, sigma 1)"),
    "marvell": ({"defence": "marvell", "sumkl": 1.0}, "marvell (sumkl 1)"),
    "label_dp": ({"defence": "label_dp", "epsilon": 1.0}, "label_dp (epsilon 1)"),
}


def breast(folder: Path, privacy: dict | None = None, window: int = 1) -> dict[str, Path]:
    """The breast demo's data, keys and configs, trained for EPOCHS epochs."""
    configs = prepare_demo("breast", folder, window=window, privacy=privacy).configs
    text = configs["bank"].read_text()
    assert "\nepochs = 25\n" in text
    configs["bank"].write_text(text.replace("\nepochs = 25\n", f"\nepochs = {EPOCHS}\n"))
    return configs


class Attacker(Node):
    """``python -m tests.node.privacy_attacker RECORD vfl node --config CONFIG``: a data holder that records."""

    def __init__(self, config: Path, record: Path, log: Path):
        self.log_path = log
        self._log = open(log, "wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.node.privacy_attacker", str(record), "node", "--config", str(config)],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
        )


def run(folder: Path, configs: dict[str, Path]) -> dict:
    """Both nodes to the end, the data holder recording; what each logged and the run's files."""
    record = folder / "dh1-received.npz"
    with Nodes(folder) as nodes:
        bank = nodes.start(configs["bank"])
        bank.wait_for("listening on")
        dh1 = Attacker(configs["dh1"], record, folder / "dh1-attacker.log")
        nodes.nodes.append(dh1)
        codes = {"bank": bank.wait(timeout=240), "dh1": dh1.wait(timeout=60)}
        logs = {"bank": bank.output, "dh1": dh1.output}
    assert codes == {"bank": 0, "dh1": 0}, logs
    metrics = [json.loads(line) for line in (folder / "model" / "metrics.jsonl").read_text().splitlines()]
    return {"logs": logs, "metrics": metrics, "record": dict(np.load(record)), "folder": folder}


def true_labels_of_aligned_rows(folder: Path) -> np.ndarray:
    """What the attacker's rows really are: aligned row -> ID (the data holder's own aligned-IDs file, in the agreed
    order) -> the label holder's label of that ID (its CSV; the test's knowledge, not the attacker's)."""
    with open(folder / "dh1-aligned.csv", newline="") as fh:
        ids = [row["id"] for row in csv.DictReader(fh)]
    with open(folder / "data" / "bank.csv", newline="") as fh:
        label = {row["id"]: int(row["diagnosis"]) for row in csv.DictReader(fh)}
    return np.array([label[i] for i in ids], dtype=np.int64)


def attack(result: dict) -> list[dict[str, float]]:
    """The norm and direction attacks on what the data holder received, per epoch. An epoch is one pass over the
    training rows, so it ends when every row seen so far has been seen once (the data holder can tell that too)."""
    rec = result["record"]
    labels = true_labels_of_aligned_rows(result["folder"])[rec["rows"]]
    n_train = len(np.unique(rec["rows"]))
    epoch = np.arange(len(rec["rows"])) // n_train
    assert len(rec["rows"]) == n_train * EPOCHS and np.all(np.diff(rec["step"]) >= 0)
    out = []
    for e in range(EPOCHS):
        mine = epoch == e
        assert len(np.unique(rec["rows"][mine])) == n_train  # each epoch saw every training row once
        g, y, steps = rec["grad"][mine], labels[mine], rec["step"][mine]
        out.append({"leak_auc_norm": norm_leak_auc(g, y), "leak_auc_direction": direction_leak_auc(g, y, steps)})
    return out


def reported(result: dict) -> list[dict[str, float]]:
    assert [m["epoch"] for m in result["metrics"]] == list(range(1, EPOCHS + 1))
    return [{k: m[k]["dh1"] for k in ("leak_auc_norm", "leak_auc_direction")} for m in result["metrics"]]


def assert_same_figures(attacked: list[dict], audited: list[dict]) -> None:
    for epoch, (a, b) in enumerate(zip(attacked, audited, strict=True), 1):
        for key in a:
            assert abs(a[key] - b[key]) <= 1e-6, (epoch, key, a[key], b[key])


@pytest.fixture(scope="module")
def undefended(tmp_path_factory):
    folder = tmp_path_factory.mktemp("none")
    return run(folder, breast(folder))


def test_the_attacker_infers_exactly_what_the_audit_reports_with_no_defence(undefended):
    attacked = attack(undefended)
    assert_same_figures(attacked, reported(undefended))
    # and it is a real leak: the direction of a binary task's gradient gives the label away (Li et al. 2021)
    assert min(a["leak_auc_direction"] for a in attacked) > 0.9, attacked
    for name in ("bank", "dh1"):
        assert "privacy: none — from the session config" in undefended["logs"][name]
    for epoch, figures in enumerate(reported(undefended), 1):
        line = next(ln for ln in undefended["logs"]["bank"].splitlines() if f"epoch {epoch} of {EPOCHS} done" in ln)
        assert (f"leak dh1 norm {figures['leak_auc_norm']:.2f} dir {figures['leak_auc_direction']:.2f}") in line


def digest_logged(log: str) -> str:
    (digest,) = set(re.findall(r"privacy: .* — from the session config \(digest ([0-9a-f]{16})\)", log))
    return digest


@pytest.mark.parametrize("name", list(DEFENCES))
def test_with_a_defence_every_node_logs_it_and_the_attacker_gets_what_the_audit_reports(tmp_path, name,
                                                                                        undefended):
    table, shown = DEFENCES[name]
    configs = breast(tmp_path, table)
    result = run(tmp_path, configs)
    digest = load_config(configs["bank"]).session.digest
    assert digest != load_config(undefended["folder"] / "bank.toml").session.digest  # the defence is in it
    for node, config in configs.items():
        log = result["logs"][node]
        assert f"privacy: {shown} — from the session config (digest {digest[:16]})" in log, log
        assert load_config(config).session.digest == digest  # the same at every node: the handshake compared it
    attacked = attack(result)
    assert_same_figures(attacked, reported(result))
    # "falls as reported": what the attacker gets with the defence is lower than without it. label_dp protects the
    # labels the model trains on, not the gradients' link to them, so only its reported figure is compared
    before, after = attack(undefended), attacked
    if name == "max_norm":  # every row of a batch arrives with the batch's largest norm: it no longer ranks rows
        rec = result["record"]
        norms = np.linalg.norm(rec["grad"].astype(np.float64), axis=1)
        for step in np.unique(rec["step"]):
            batch = norms[rec["step"] == step]
            assert np.allclose(batch[batch > 0], batch.max(), rtol=1e-5), (step, batch)
        assert np.mean([a["leak_auc_norm"] for a in after]) < np.mean([b["leak_auc_norm"] for b in before])
    elif name in ("gradient_noise", "marvell"):
        worst = lambda figures: np.mean([max(f.values()) for f in figures])  # noqa: E731
        assert worst(after) < worst(before) - 0.1, (before, after)


def without_privacy(text: str) -> str:
    return re.sub(r"\[privacy\]\n(?:[a-z_]+ = .*\n)*", "", text)


@pytest.mark.parametrize("change, diff", [
    (lambda t: t.replace("sigma = 1.0", "sigma = 2.0"), "privacy.sigma: label holder has 1.0, data holder has 2.0"),
    (lambda t: t.replace('defence = "gradient_noise"\nclip = 0.05\nsigma = 1.0\n', 'defence = "max_norm"\n'),
     "privacy.defence: label holder has 'gradient_noise', data holder has 'max_norm'"),
    (without_privacy, "privacy.defence: label holder has 'gradient_noise', data holder has 'none'"),
], ids=["parameter", "defence", "none"])
def test_a_data_holder_with_another_defence_gets_CONFIG_MISMATCH_naming_the_field(tmp_path, change, diff):
    configs = breast(tmp_path, DEFENCES["gradient_noise"][0])
    text = configs["dh1"].read_text()
    assert change(text) != text
    configs["dh1"].write_text(change(text))
    with Nodes(tmp_path) as nodes:
        bank = nodes.start(configs["bank"])
        bank.wait_for("listening on")
        dh1 = nodes.start(configs["dh1"])
        assert dh1.wait(timeout=60) == 1  # README: 1, the label holder refused the HELLO listing every difference
        assert "CONFIG_MISMATCH" in dh1.output and diff in dh1.output, dh1.output
        assert bank.proc.poll() is None  # it keeps waiting for a correctly configured dh1


def test_a_run_with_a_defence_is_reproducible(tmp_path):
    """gradient_noise draws fresh noise for every row of every step, from [model].seed, the step and the party: two
    runs (window 1) give the same metrics, leak figures included, and the same segments."""
    runs = []
    for name in ("first", "second"):
        folder = tmp_path / name
        runs.append(run(folder, breast(folder, DEFENCES["gradient_noise"][0])))
    first, second = runs
    aligned = [(r["folder"] / "dh1-aligned.csv").read_text() for r in runs]
    assert aligned[0] != aligned[1]  # each PSI agreed on a new row order: the test means something
    assert first["metrics"] == second["metrics"]
    for party in ("bank", "dh1"):
        digests = [torch.load(r["folder"] / "model" / f"{party}-segment.pt", weights_only=True)[DIGEST_KEY]
                   for r in runs]
        assert digests[0] == digests[1], party
    received = [r["record"] for r in runs]
    assert np.array_equal(received[0]["step"], received[1]["step"])
    # the same noise reached the same rows: compare by ID, since the aligned positions differ between the runs
    by_id = []
    for r in runs:
        with open(r["folder"] / "dh1-aligned.csv", newline="") as fh:
            ids = np.array([row["id"] for row in csv.DictReader(fh)])
        by_id.append(ids[r["record"]["rows"]])
    assert np.array_equal(by_id[0], by_id[1])
    assert np.array_equal(received[0]["grad"], received[1]["grad"])
