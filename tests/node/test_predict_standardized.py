"""``vfl predict`` applies the standardisation each party fitted on its own training rows (saved with its segment).

Every party standardises (``[data].standardize = true``), on columns with large offsets and scales, so a prediction
that skipped or refitted the standardisation would be far off. The expected predictions are computed centrally: each
party's scaler is refitted here on that party's training rows (the schedule the label holder drew, reconstructed from
its canonical order), checked against the scaler saved in the segment, applied to the new rows, and the composed
model (both bottoms, concat, top) is run on them.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from vfl.launch import prepare_session
from vfl.node.training import canonical_order
from vfl.train.central import make_schedule
from vfl.train.data import Standardizer
from vfl.train.models import MlpSpec, build_mlp

from .procs import Nodes
from .test_training_nodes import FAST, run_nodes, write_table

RUN = "predict-std"
OFFSET = np.array([1e4, -3e3, 250.0, 5e4, 0.0, -7e3])
SCALE = np.array([1e3, 0.01, 40.0, 5e3, 1e-3, 300.0])
LH_COLS, DH_COLS = [0, 1], [2, 3, 4, 5]  # the label holder's own features, the data holder's
BOTTOM = {"widths": [8, 4]}
TOP = {"widths": [8, 1]}
SEED = 7  # [train].seed


def data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 6))
    y = (z @ np.array([1.0, -1.0, 0.5, 1.0, -0.5, 0.8]) > 0).astype(np.int64)
    return (z * SCALE + OFFSET).astype(np.float32), y  # the nodes read feature columns as float32


def test_predict_applies_each_partys_saved_standardisation(tmp_path):
    x, y = data(240, 0)
    ids = [f"cust-{i:04d}" for i in range(len(y))]
    rng = np.random.default_rng(1)
    keep = {p: rng.permutation(rng.choice(len(ids), size=len(ids) - 15, replace=False)) for p in ("bank", "dh1")}
    write_table(tmp_path / "bank.csv", [ids[i] for i in keep["bank"]],
                {"label": y[keep["bank"]], **{f"c{j}": x[keep["bank"], c] for j, c in enumerate(LH_COLS)}})
    write_table(tmp_path / "dh1.csv", [ids[i] for i in keep["dh1"]],
                {f"a{j}": x[keep["dh1"], c] for j, c in enumerate(DH_COLS)})
    out = str(tmp_path / "model")
    opt = {"kind": "adam", "lr": 0.01}
    tables = {
        "bank": {"model": {"bottom": BOTTOM, "top": TOP, "seed": 3},
                 "train": {"task": "binary", "epochs": 4, "validation_fraction": 0.25, "seed": SEED,
                           "optimizer": opt, "output": out}},
        "dh1": {"model": {"bottom": BOTTOM, "seed": 1}, "train": {"optimizer": opt, "output": out}},
    }
    data_tables = {
        "bank": {"path": "bank.csv", "id_column": "id", "label_column": "label", "features": ["c0", "c1"],
                 "standardize": True},
        "dh1": {"path": "dh1.csv", "id_column": "id", "standardize": True},
    }
    configs = prepare_session(tmp_path, data_holders=["dh1"], run=RUN, timeouts=FAST, link_check={"rounds": 0},
                              data=data_tables, psi={"workers": 1}, tables=tables, cut_width=4, batch_size=16,
                              window=2)
    run_nodes(tmp_path, configs)
    saved = {p: torch.load(tmp_path / "model" / f"{p}-segment.pt", weights_only=True) for p in configs}

    # each party's training rows, as the label holder drew them, and the scalers fitted on them
    with open(tmp_path / "bank-aligned.csv") as fh:
        aligned = [row[1] for row in list(csv.reader(fh))[1:]]
    canonical = [aligned[i] for i in canonical_order(aligned, SEED, RUN)]
    schedule = make_schedule(len(canonical), 16, 4, SEED, 0.25)
    index = {k: i for i, k in enumerate(ids)}
    train_rows = np.array([index[canonical[c]] for c in schedule.train])
    scalers = {"bank": Standardizer.fit(x[train_rows][:, LH_COLS]), "dh1": Standardizer.fit(x[train_rows][:, DH_COLS])}
    for party, key in (("bank", "own_scaler"), ("dh1", "scaler")):
        got = Standardizer.from_dict(saved[party][key])
        np.testing.assert_allclose(got.mean, scalers[party].mean, rtol=1e-10)
        np.testing.assert_allclose(got.std, scalers[party].std, rtol=1e-10)

    # new rows: 30 known people (new feature values) and 8 strangers; each party in its own order, with a label
    # column in the label holder's file (ignored); the data holder lacks 4 of them
    new_x, new_y = data(38, 2)
    new_ids = [ids[i] for i in np.random.default_rng(3).choice(len(ids), size=30, replace=False)]
    new_ids += [f"new-{i}" for i in range(8)]
    bank_order, dh_order = np.random.default_rng(4).permutation(38), np.random.default_rng(5).permutation(38)[4:]
    write_table(tmp_path / "bank-new.csv", [new_ids[i] for i in bank_order],
                {"label": new_y[bank_order], **{f"c{j}": new_x[bank_order, c] for j, c in enumerate(LH_COLS)}})
    write_table(tmp_path / "dh1-new.csv", [new_ids[i] for i in dh_order],
                {f"a{j}": new_x[dh_order, c] for j, c in enumerate(DH_COLS)})
    with Nodes(tmp_path) as nodes:
        procs = {p: nodes.start_command(["predict", "--config", str(configs[p]), "--data",
                                         str(tmp_path / f"{p}-new.csv")], f"{p}-predict") for p in configs}
        codes = {p: proc.wait(timeout=120) for p, proc in procs.items()}
        assert codes == {"bank": 0, "dh1": 0}, {p: proc.output for p, proc in procs.items()}
    with open(tmp_path / "model" / "predictions.csv") as fh:
        got = list(csv.DictReader(fh))
    assert sorted(r["id"] for r in got) == sorted(new_ids[i] for i in dh_order)

    # the composed model, centrally, on the same rows standardised with the scalers fitted above
    own, b1, top = build_mlp(2, MlpSpec(widths=(8, 4))), build_mlp(4, MlpSpec(widths=(8, 4))), build_mlp(8, TOP)
    own.load_state_dict(saved["bank"]["own"]["model"])
    b1.load_state_dict(saved["dh1"]["model"])
    top.load_state_dict(saved["bank"]["top"])
    where = {k: i for i, k in enumerate(new_ids)}
    rows = np.array([where[r["id"]] for r in got])

    def composed(lh_x: np.ndarray, dh_x: np.ndarray) -> np.ndarray:
        with torch.no_grad():  # concat in party-id order: bank, dh1
            cut = torch.cat([own(torch.from_numpy(lh_x)), b1(torch.from_numpy(dh_x))], 1)
            return torch.sigmoid(top(cut))[:, 0].numpy()

    want = composed(scalers["bank"].transform(new_x[rows][:, LH_COLS]),
                    scalers["dh1"].transform(new_x[rows][:, DH_COLS]))
    probability = np.array([float(r["probability"]) for r in got])
    np.testing.assert_allclose(probability, want, atol=1e-6)
    assert [int(r["prediction"]) for r in got] == (want >= 0.5).astype(int).tolist()
    # and the standardisation matters here: the raw columns would give other predictions
    raw = composed(new_x[rows][:, LH_COLS], new_x[rows][:, DH_COLS])
    assert np.max(np.abs(raw - want)) > 0.1
