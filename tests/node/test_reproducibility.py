"""The same session run twice gives the same model, although each run's PSI agrees on a new row order.

The PSI's final order sorts rows by tokens of fresh keys, so it is a new permutation in every run. The label holder
draws its train/validation split and every epoch's batches over a canonical order of its own IDs (a keyed hash) and
maps them back to aligned row positions, so the same seeds give the same rows in the same batches; standardisation
is fitted in file order and dropout is reseeded every step from ``[model].seed``. With ``window = 1`` (synchronous,
no timing-dependent staleness) two runs must therefore agree bit for bit.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vfl.launch import prepare_session
from vfl.node import load_config
from vfl.node.training import canonical_order, make_plan, schedule_key

from .procs import Nodes
from .test_training_nodes import FAST, write_table

RUN = "repro-test"


def two_party_data(folder: Path, lh_features: bool) -> None:
    """300 people; each party misses 20 of them and lists the rest in its own order. Features with offsets."""
    rng = np.random.default_rng(4)
    n = 300
    x = rng.normal(size=(n, 6)) * [1, 2, 5, 1, 3, 1] + [10, -4, 100, 0, 7, 2]
    y = np.argmax((x - x.mean(0)) / x.std(0) @ rng.normal(size=(6, 3)), axis=1)
    ids = [f"person-{i:04d}" for i in range(n)]
    keep = {p: rng.permutation(rng.choice(n, size=n - 20, replace=False)) for p in ("bank", "dh1")}
    lh_cols = {"label": y[keep["bank"]]}
    if lh_features:
        lh_cols |= {f"c{j}": x[keep["bank"], 4 + j] for j in range(2)}
    write_table(folder / "bank.csv", [ids[i] for i in keep["bank"]], lh_cols)
    write_table(folder / "dh1.csv", [ids[i] for i in keep["dh1"]], {f"a{j}": x[keep["dh1"], j] for j in range(4)})


def session(folder: Path, dropout: float) -> dict[str, Path]:
    lh_features = dropout > 0  # the dropout case also gives the label holder its own bottom, with dropout
    folder.mkdir(parents=True)
    two_party_data(folder, lh_features)
    out = str(folder / "model")
    opt = {"kind": "adam", "lr": 0.01}
    bank_model = {"top": {"widths": [16, 3], "dropout": dropout}, "seed": 3}
    if lh_features:
        bank_model["bottom"] = {"widths": [8, 4], "dropout": dropout}
    tables = {
        "bank": {"model": bank_model,
                 "train": {"task": "multiclass", "epochs": 3, "validation_fraction": 0.25, "seed": 5,
                           "optimizer": opt, "output": out, "checkpoint_every": 4}},
        "dh1": {"model": {"bottom": {"widths": [8, 4], "dropout": dropout}, "seed": 1},
                "train": {"optimizer": opt, "output": out}},
    }
    data = {
        "bank": {"path": "bank.csv", "id_column": "id", "label_column": "label",
                 "features": ["c0", "c1"] if lh_features else [], "standardize": True},
        "dh1": {"path": "dh1.csv", "id_column": "id", "standardize": True},
    }
    return prepare_session(folder, data_holders=["dh1"], run=RUN, timeouts=FAST, link_check={"rounds": 0},
                           data=data, psi={"workers": 1}, tables=tables, cut_width=4, batch_size=16, window=1)


def run_once(folder: Path, dropout: float) -> dict:
    configs = session(folder, dropout)
    with Nodes(folder) as nodes:
        procs = {name: nodes.start(path) for name, path in configs.items()}
        codes = {name: p.wait(timeout=180) for name, p in procs.items()}
        assert codes == {name: 0 for name in configs}, {name: p.output for name, p in procs.items()}
    with open(folder / "bank-aligned.csv") as fh:
        aligned = [row[1] for row in list(csv.reader(fh))[1:]]
    return {
        "aligned": aligned,
        "metrics": [json.loads(line) for line in (folder / "model" / "metrics.jsonl").read_text().splitlines()],
        "segments": {p: torch.load(folder / "model" / f"{p}-segment.pt", weights_only=True) for p in configs},
    }


def tensors(state, prefix=""):
    """Every tensor of a saved segment (weights, optimizer moments), by a path of keys."""
    if isinstance(state, torch.Tensor):
        yield prefix, state
    elif isinstance(state, dict):
        for k, v in state.items():
            yield from tensors(v, f"{prefix}/{k}")
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            yield from tensors(v, f"{prefix}/{i}")


@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["plain", "dropout"])
def test_the_same_session_run_twice_gives_identical_metrics_and_segments(tmp_path, dropout):
    first = run_once(tmp_path / "first", dropout)
    second = run_once(tmp_path / "second", dropout)
    # the test means something: the PSI agreed on different row orders, over the same rows
    assert first["aligned"] != second["aligned"]
    assert sorted(first["aligned"]) == sorted(second["aligned"])
    assert [m["epoch"] for m in first["metrics"]] == [1, 2, 3]
    assert first["metrics"] == second["metrics"]  # every training and validation metric, exactly
    for party in ("bank", "dh1"):
        a, b = dict(tensors(first["segments"][party])), dict(tensors(second["segments"][party]))
        assert a.keys() == b.keys() and a
        different = [k for k in a if not torch.equal(a[k], b[k])]
        assert not different, (party, different)
        for key in ("scaler", "own_scaler"):
            assert first["segments"][party].get(key) == second["segments"][party].get(key)
    if dropout:
        assert "own_scaler" in first["segments"]["bank"] and "scaler" in first["segments"]["dh1"]


def test_canonical_order_depends_on_the_ids_seed_and_run_not_on_their_order():
    ids = [f"id-{i}" for i in range(200)]
    order = canonical_order(ids, 5, RUN)
    assert sorted(order.tolist()) == list(range(200))
    shuffled = list(np.random.default_rng(0).permutation(ids))
    assert [shuffled[i] for i in canonical_order(shuffled, 5, RUN)] == [ids[i] for i in order]
    assert not np.array_equal(canonical_order(ids, 6, RUN), order)
    assert not np.array_equal(canonical_order(ids, 5, "another-run"), order)
    assert schedule_key(5, RUN) != schedule_key(5, "another-run")
    ints = list(range(50))  # integer IDs have their own encoding (as in the PSI)
    assert sorted(canonical_order(ints, 5, RUN).tolist()) == ints


def test_the_plan_puts_the_same_ids_in_the_same_batches_whatever_the_aligned_order(tmp_path):
    configs = session(tmp_path / "s", dropout=0.0)
    cfg = load_config(configs["bank"])
    ids = [f"id-{i}" for i in range(60)]
    shuffled = list(np.random.default_rng(0).permutation(ids))
    a, b = make_plan(cfg, ids), make_plan(cfg, shuffled)
    assert [ids[i] for i in a.validation] == [shuffled[i] for i in b.validation]
    for ea, eb in zip(a.epoch_orders, b.epoch_orders, strict=True):
        assert [ids[i] for i in ea] == [shuffled[i] for i in eb]
    assert sorted([*a.validation.tolist(), *a.epoch_orders[0].tolist()]) == list(range(60))
