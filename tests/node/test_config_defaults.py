"""Config defaults that decide where results go: leaving out ``[train].output`` keeps the model in ``model/``.

Issue 13 bug 2: without ``[train].output`` a run trained, exited 0 and wrote no segment and no ``metrics.jsonl``, so
``vfl predict`` then failed. The README promises ``model/`` next to the config; these tests hold the code to that.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from vfl.launch import prepare_session
from vfl.node import load_config

from .procs import Nodes
from .test_training_nodes import FAST, run_nodes, write_table


def no_output_session(tmp_path: Path) -> dict[str, Path]:
    """A 2-party binary run whose configs have a [train] table but no [train].output."""
    rng = np.random.default_rng(0)
    n = 120
    x = rng.normal(size=(n, 4)).astype(np.float32)
    y = (x[:, 0] - x[:, 2] > 0).astype(np.int64)
    ids = [f"p{i:03d}" for i in range(n)]
    write_table(tmp_path / "bank.csv", ids, {"label": y, "c0": x[:, 0], "c1": x[:, 1]})
    write_table(tmp_path / "dh1.csv", ids[::-1], {"a0": x[::-1, 2], "a1": x[::-1, 3]})
    opt = {"kind": "adam", "lr": 0.01}
    tables = {
        "bank": {"model": {"bottom": {"widths": [4]}, "top": {"widths": [1]}},
                 "train": {"task": "binary", "epochs": 2, "optimizer": opt}},
        "dh1": {"model": {"bottom": {"widths": [4]}}, "train": {"optimizer": opt}},
    }
    data = {"bank": {"path": "bank.csv", "id_column": "id", "label_column": "label"},
            "dh1": {"path": "dh1.csv", "id_column": "id"}}
    configs = prepare_session(tmp_path, data_holders=["dh1"], run="no-output", timeouts=FAST,
                              link_check={"rounds": 0}, data=data, psi={"workers": 1}, tables=tables, cut_width=4,
                              batch_size=16, window=1)
    for path in configs.values():
        assert "output = \"model" not in path.read_text()
    return configs


def test_train_output_defaults_to_model_next_to_the_config(tmp_path):
    configs = no_output_session(tmp_path)
    for path in configs.values():
        cfg = load_config(path)
        assert cfg.train.output == (tmp_path / "model").resolve()
        assert cfg.train.checkpoint_dir == (tmp_path / "model" / "checkpoints").resolve()


def test_a_run_without_train_output_keeps_its_model_and_predict_uses_it(tmp_path):
    configs = no_output_session(tmp_path)
    run_nodes(tmp_path, configs)
    model = tmp_path / "model"
    assert (model / "bank-segment.pt").is_file() and (model / "dh1-segment.pt").is_file()
    epochs = [json.loads(line)["epoch"] for line in (model / "metrics.jsonl").read_text().splitlines()]
    assert len(set(epochs)) == 2, epochs
    with Nodes(tmp_path) as nodes:
        procs = {p: nodes.start_command(["predict", "--config", str(configs[p]), "--data", str(tmp_path / f"{p}.csv")],
                                        f"{p}-predict") for p in configs}
        codes = {p: proc.wait(timeout=120) for p, proc in procs.items()}
        assert codes == {"bank": 0, "dh1": 0}, {p: proc.output for p, proc in procs.items()}
    with open(model / "predictions.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 120
