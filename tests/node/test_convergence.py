"""Convergence of split training between real node processes on loopback, on small public data sets.

Each test splits a scikit-learn toy data set (bundled with scikit-learn: nothing is downloaded) by columns between a
label holder ("bank") and one or two data holders, writes one CSV per party with string IDs, shuffled independently
per party and with a few rows dropped at each party (so the PSI decides which rows train), runs ``vfl node`` for
every party, and reads ``model/metrics.jsonl`` written by the label holder:

- breast cancer (binary, split as FATE's hetero demo: the label holder has the label and 10 features with its own
  bottom model, one data holder has the other 20): validation AUC >= 0.97;
- digits (multiclass, two data holders with 32 pixel columns each, the label holder only the label): validation
  accuracy >= 0.95;
- diabetes (regression, two data holders): validation RMSE <= 0.9 x the standard deviation of the validation
  targets (the RMSE of the best constant prediction on those rows; predicting the training mean is worse);
- the window W in {1, 2, 4, 8} on the digits split (slow): every W completes and the default window keeps the
  validation accuracy within 0.5 percentage points of W = 1. ``bench/window.py`` runs the same sweep as a table.
"""

from __future__ import annotations

import csv
import inspect
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from vfl.launch import prepare_session
from vfl.train.central import make_schedule

from .procs import Nodes

sklearn_datasets = pytest.importorskip("sklearn.datasets")

LABEL_HOLDER = "bank"
FAST = {"heartbeat": 0.5, "peer": 20.0, "handshake": 30.0, "join": 60.0, "progress": 60.0}
DEFAULT_WINDOW: int = inspect.signature(prepare_session).parameters["window"].default


# ------------------------------------------------------------------------------------------------ data and sessions


@dataclass
class Party:
    """One party's share of the columns. ``columns`` index the data set's feature matrix."""

    name: str
    columns: list[int]
    bottom: dict | None = None  # MLP table for [model].bottom; required at a data holder
    seed: int = 0


@dataclass
class Run:
    metrics: list[dict]
    validation_targets: np.ndarray  # the label holder's targets of the validation rows, as given in its CSV
    training_targets: np.ndarray
    n_aligned: int
    wall_s: float
    outputs: dict[str, str]

    def series(self, key: str) -> list[float]:
        return [m[key] for m in self.metrics]


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def _cell(value) -> str | int:
    return int(value) if isinstance(value, (int, np.integer)) else repr(float(value))


def write_vertical_split(
    folder: Path,
    x: np.ndarray,
    y: np.ndarray,
    names: list[str],
    parties: list[Party],
    *,
    drop: int = 8,
    seed: int = 0,
    id_format: str = "patient-{:04d}",
) -> tuple[list[str], dict[str, set[int]]]:
    """One CSV per party (``NAME.csv``; the label holder's also has ``label``), each in its own random row order and
    missing ``drop`` random rows of its own. Returns the IDs (``ids[i]`` is row ``i`` of ``x``) and the rows each
    party kept."""
    rng = np.random.default_rng(seed)
    ids = [id_format.format(i + 1) for i in range(len(x))]
    kept: dict[str, set[int]] = {}
    for party in parties:
        order = rng.permutation(len(x))[: len(x) - drop]  # shuffled, and the last `drop` of the permutation dropped
        kept[party.name] = set(order.tolist())
        header = ["id", *(["label"] if party.name == LABEL_HOLDER else []), *(names[c] for c in party.columns)]
        rows = [
            [ids[i], *([_cell(y[i])] if party.name == LABEL_HOLDER else []), *(_cell(x[i, c]) for c in party.columns)]
            for i in order
        ]
        write_csv(folder / f"{party.name}.csv", header, rows)
    return ids, kept


def read_aligned_ids(path: Path) -> list[str]:
    """The IDs of ``[psi].output`` in the agreed row order (second column)."""
    with open(path, newline="") as fh:
        return [row[1] for row in list(csv.reader(fh))[1:]]


def run_split(
    tmp_path: Path,
    x: np.ndarray,
    y: np.ndarray,
    names: list[str],
    parties: list[Party],
    *,
    task: str,
    top: dict,
    epochs: int,
    optimizer: dict,
    batch_size: int = 32,
    window: int = DEFAULT_WINDOW,
    validation_fraction: float = 0.25,
    schedule_seed: int = 5,
    standardize: bool = True,
    drop: int = 8,
    split_seed: int = 0,
    timeout: float = 240.0,
) -> Run:
    """Write the parties' CSVs and configs into ``tmp_path``, run every node to completion, return the metrics."""
    holders = [p for p in parties if p.name != LABEL_HOLDER]
    (lh,) = [p for p in parties if p.name == LABEL_HOLDER]
    ids, _ = write_vertical_split(tmp_path, x, y, names, parties, drop=drop, seed=split_seed)
    out = str(tmp_path / "model")
    tables: dict[str, dict] = {
        LABEL_HOLDER: {
            "model": {"top": top, "seed": lh.seed, **({"bottom": lh.bottom} if lh.bottom else {})},
            "train": {"task": task, "epochs": epochs, "validation_fraction": validation_fraction,
                      "seed": schedule_seed, "optimizer": optimizer, "output": out},
        }
    }
    data = {LABEL_HOLDER: {"path": f"{LABEL_HOLDER}.csv", "id_column": "id", "label_column": "label",
                           "features": [names[c] for c in lh.columns], "standardize": standardize}}
    for p in holders:
        tables[p.name] = {"model": {"bottom": p.bottom, "seed": p.seed}, "train": {"optimizer": optimizer, "output": out}}
        data[p.name] = {"path": f"{p.name}.csv", "id_column": "id", "standardize": standardize}
    configs = prepare_session(
        tmp_path, data_holders=[p.name for p in holders], run="convergence", timeouts=FAST, link_check={"rounds": 0},
        data=data, psi={"workers": 1}, tables=tables, cut_widths={p.name: p.bottom["widths"][-1] for p in holders},
        batch_size=batch_size, window=window,
    )
    started = time.monotonic()
    with Nodes(tmp_path) as nodes:
        procs = {name: nodes.start(path) for name, path in configs.items()}
        codes = {name: p.wait(timeout=timeout) for name, p in procs.items()}
        outputs = {name: p.output for name, p in procs.items()}
    wall = time.monotonic() - started
    assert codes == {name: 0 for name in configs}, outputs
    metrics = [json.loads(line) for line in (tmp_path / "model" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == list(range(epochs)), metrics

    # The rows that trained: the IDs every party holds, in the order the PSI agreed on.
    order = read_aligned_ids(tmp_path / f"{LABEL_HOLDER}-aligned.csv")
    for p in holders:
        assert read_aligned_ids(tmp_path / f"{p.name}-aligned.csv") == order
    index = {key: i for i, key in enumerate(ids)}
    rows = np.array([index[k] for k in order])
    schedule = make_schedule(len(rows), batch_size, epochs, schedule_seed, validation_fraction)
    validation = np.asarray(schedule.validation)
    training = np.setdiff1d(np.arange(len(rows)), validation)
    return Run(metrics=metrics, validation_targets=y[rows[validation]], training_targets=y[rows[training]],
               n_aligned=len(rows), wall_s=wall, outputs=outputs)


def summary(run: Run, key: str, best=max) -> str:
    values = run.series(key)
    return (f"{key}: final {values[-1]:.4f}, best {best(values):.4f} (epoch {values.index(best(values))}), "
            f"{run.n_aligned} aligned rows, {len(run.validation_targets)} for validation, {run.wall_s:.1f} s")


# --------------------------------------------------------------------------------------------------- the data sets


def breast_cancer() -> tuple[np.ndarray, np.ndarray, list[str]]:
    d = sklearn_datasets.load_breast_cancer()
    return d.data, d.target, [n.replace(" ", "_") for n in d.feature_names]


def digits() -> tuple[np.ndarray, np.ndarray, list[str]]:
    d = sklearn_datasets.load_digits()
    return d.data, d.target, [f"pixel_{r}_{c}" for r in range(8) for c in range(8)]


def digits_parties() -> list[Party]:
    """Image columns 0-3 at dh1, 4-7 at dh2 (32 pixels each); the label holder has only the label."""
    left = [r * 8 + c for r in range(8) for c in range(4)]
    right = [r * 8 + c for r in range(8) for c in range(4, 8)]
    bottom = {"widths": [32, 16]}
    return [Party(LABEL_HOLDER, [], seed=3), Party("dh1", left, bottom, seed=1), Party("dh2", right, bottom, seed=2)]


DIGITS = {"task": "multiclass", "top": {"widths": [32, 10]}, "epochs": 20, "optimizer": {"kind": "adam", "lr": 0.01},
          "batch_size": 32}


def run_digits(tmp_path: Path, **overrides) -> Run:
    x, y, names = digits()
    return run_split(tmp_path, x, y, names, digits_parties(), **{**DIGITS, **overrides})


# ------------------------------------------------------------------------------------------------------------ tests


def test_breast_cancer_split_as_fates_hetero_demo_reaches_auc_0_97(tmp_path):
    x, y, names = breast_cancer()
    bottom = {"widths": [16], "final_activation": True}
    parties = [Party(LABEL_HOLDER, list(range(10)), bottom, seed=3), Party("dh1", list(range(10, 30)), bottom, seed=1)]
    run = run_split(tmp_path, x, y, names, parties, task="binary", top={"widths": [1]}, epochs=25,
                    optimizer={"kind": "adam", "lr": 0.01}, batch_size=32)
    print(summary(run, "val_auc"))
    print(summary(run, "val_accuracy"))
    assert 569 - 2 * 8 <= run.n_aligned < 569
    assert run.metrics[-1]["val_auc"] >= 0.97, run.metrics[-1]


def test_digits_between_two_data_holders_reaches_accuracy_0_95(tmp_path):
    run = run_digits(tmp_path)
    print(summary(run, "val_accuracy"))
    assert run.metrics[-1]["val_accuracy"] >= 0.95, run.metrics[-1]


def test_diabetes_regression_beats_the_constant_prediction(tmp_path):
    d = sklearn_datasets.load_diabetes()
    x, names = d.data, list(d.feature_names)
    y = d.target  # raw disease progression, 25..346
    parties = [Party(LABEL_HOLDER, [], seed=3),
               Party("dh1", [0, 1, 2, 3, 4], {"widths": [16, 8]}, seed=1),
               Party("dh2", [5, 6, 7, 8, 9], {"widths": [16, 8]}, seed=2)]
    run = run_split(tmp_path, x, y, names, parties, task="regression", top={"widths": [16, 1]}, epochs=30,
                    optimizer={"kind": "adam", "lr": 0.01}, batch_size=32)
    val_std = float(np.std(run.validation_targets))
    train_mean_rmse = float(np.sqrt(np.mean((run.validation_targets - run.training_targets.mean()) ** 2)))
    print(summary(run, "val_rmse", best=min), f"std of validation targets {val_std:.4f}",
          f"RMSE of the training mean {train_mean_rmse:.4f}")
    assert run.metrics[-1]["val_rmse"] <= 0.9 * val_std, (run.metrics[-1], val_std)
