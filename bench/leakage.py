"""Label leakage through the gradients, and what each defence buys at what cost, measured on real node processes.

    PYTHONPATH=. .venv/bin/python bench/leakage.py            # about 8-10 minutes on the shared 2-core box
    PYTHONPATH=. .venv/bin/python bench/leakage.py --quick    # about 1.5 minutes: 8 epochs, 1 run a cell
    PYTHONPATH=. .venv/bin/python bench/leakage.py --keep runs/leakage   # keep every run's folder

Three tasks, each written as party CSVs with the demo's own machinery (``vfl.launch.demo``: scikit-learn's bundled
data, string IDs in each party's own random order, 3 % of the rows missing at each party, so the PSI decides which
rows train) into a temporary folder:

- ``breast``: the breast demo split exactly as ``vfl demo breast`` writes it (label holder: the label and 10
  features; dh1: the other 20; binary, 63 % of the rows labelled 1, benign), except that the bench keeps the last
  epoch (``[train].keep`` left at "last"), as in every other cell;
- ``digits0``: the imbalanced binary task, digits "0 vs rest" (10 % positives): dh1 has image columns 0-3, dh2
  columns 4-7 (32 pixels each), the label holder only the label;
- ``digits10``: the same split with the 10 digit classes (multiclass).

Every cell is one session of a label holder and its data holders started as ``vfl node`` processes by the local
launcher (``vfl.launch.local.launch``, as ``vfl demo`` does) on a free port of 127.0.0.1, CurveZMQ on, window 2 (the
demo's). Within a task every cell has the same run id, seeds and batches; only the ``[privacy]`` table (the same in
every party's config) differs. Cells: no defence, ``max_norm``, ``marvell`` (binary tasks only) at several
``sumkl``, ``label_dp`` at several ``epsilon``, ``gradient_noise`` at several ``sigma`` with ``clip`` = the median
L2 norm of the gradient rows the data holders received in the first epoch of that task's no-defence run (the
"typical row norm": later rows are orders of magnitude smaller once the model fits).

Every cell runs ``--repeats`` times (default 2, ``--quick`` 1), in rounds (every cell once, then again), so a slow
spell of the shared machine falls on every cell alike. Figures, all from each run's own record: ``val`` = the label
holder's last-epoch validation AUC (binary) or accuracy (multiclass) in ``model/metrics.jsonl`` (the same
validation rows in every cell of a task); ``leak_auc_norm`` and ``leak_auc_direction`` (binary) or
``leak_attack_accuracy`` (multiclass) = the label holder's per-epoch audit in ``metrics.jsonl``, taken as the max
over data holders and then the MEAN over epochs (``*_mean``; the table also shows the worst epoch, ``*_max``);
``samples_per_s`` = ``train_samples / train_seconds`` of the run's ``summary.json`` (the label holder's own measure
of its training phase); a cell's figures are the mean over its runs, its samples/s the median, and ``cost`` = that
/ the no-defence cell's. ``completion`` = model completion (Fu et al. 2022): a data holder that knows the labels of
an auxiliary 10 % of the rows fits a logistic regression on its own trained segment's activations and labels the
others (AUC for binary, accuracy for multiclass; the max over data holders).

The no-defence run of each task is first run once more with a recorder (a ``sitecustomize`` on the nodes'
PYTHONPATH that wraps ``TorchBottom.forward``/``backward`` in the data holders and writes every gradient row they
received, with its file row, before the process exits): the bench runs the attacks of ``vfl.privacy.audit`` itself
on those rows, per epoch (``attacker_check``: equal to the audit if the audit scores exactly what was sent), takes
the clip of ``gradient_noise`` from them, and measures feature inversion. That run is shown in the table but is not
the cost baseline.

Feature inversion (measure only): the label holder trains a decoder (an MLP, cut activations -> a data holder's
standardised features) on an auxiliary 10 % of the aligned rows whose features it is assumed to know, and is scored
on the other 90 %: MSE, and ``r2`` = 1 - MSE / MSE of predicting the auxiliary sample's mean (and a ridge
regression's, for reference). The activations are the ones the label holder received in the last epoch's
validation pass and would receive at ``vfl predict``: the bench runs every party on this machine, so it loads the
data holder's trained segment (``model/dhN-segment.pt``, checked against its digest) and applies it to that party's
standardised features.

Output: a table, then as the LAST line one JSON object: ``tasks`` (every cell of every task), ``inversion``,
``attacker_check``, ``goal`` (for ``digits0``: ``no_defence_leak_auc``, ``best_defence``, ``best_defence_leak_auc``,
``best_defence_val_auc_drop_pp``, ``best_within_2pp``, ``reached``; the same judged on the worst epoch:
``best_defence_leak_auc_worst_epoch``, ``reached_in_every_epoch``), ``quick``, ``repeats``, ``wall_s``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import signal
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from vfl.launch.demo import DROP_FRACTION, _load, _write_party, prepare_demo  # noqa: E402
from vfl.launch.local import launch  # noqa: E402
from vfl.launch.prepare import LABEL_HOLDER, prepare_session  # noqa: E402

BATCH = 32
WINDOW = 2  # the demo's
GOAL_LEAK = 0.60
GOAL_DROP_PP = 2.0
AUX_FRACTION = 0.10

# strengths per defence (the parameter each takes); marvell only on binary tasks
STRENGTHS = {
    "max_norm": [None],
    "marvell": ("sumkl", [4.0, 1.0, 0.25]),
    "label_dp": ("epsilon", [4.0, 2.0, 1.0]),
    "gradient_noise": ("sigma", [0.5, 1.0, 2.0]),
}
QUICK_STRENGTHS = {
    "max_norm": [None],
    "marvell": ("sumkl", [1.0, 0.25]),
    "label_dp": ("epsilon", [1.0]),
    "gradient_noise": ("sigma", [1.0]),
}

# The recorder: put on the nodes' PYTHONPATH for the recorded run only. The data holder's node exits with
# os._exit (no atexit), so the rows are written just before that.
RECORDER = '''
import os, sys
_out = os.environ.get("VFL_LEAKAGE_RECORD")
if _out and "node" in sys.argv:
    import numpy as _np
    from vfl.train import segments as _seg
    _rows, _grads, _pending = [], [], {}
    _forward, _backward = _seg.TorchBottom.forward, _seg.TorchBottom.backward

    def forward(self, step, rows, train):
        if train:
            r = _np.asarray(rows, dtype=_np.int64)
            _pending[step] = r if self.rows is None else self.rows.numpy()[r]
        return _forward(self, step, rows, train)

    def backward(self, step, gradient):
        _rows.append(_pending.pop(step))
        _grads.append(_np.array(gradient, dtype=_np.float32))
        return _backward(self, step, gradient)

    _seg.TorchBottom.forward, _seg.TorchBottom.backward = forward, backward
    _exit = os._exit

    def _save_and_exit(code):
        if _grads:
            party = os.path.splitext(os.path.basename(sys.argv[sys.argv.index("--config") + 1]))[0]
            _np.savez(os.path.join(_out, party + ".npz"), rows=_np.concatenate(_rows), grads=_np.concatenate(_grads),
                      sizes=_np.array([len(r) for r in _rows]))
        _exit(code)

    os._exit = _save_and_exit
'''


def _stop(signum, frame):  # SIGTERM unwinds like Ctrl-C; the launcher stops the nodes of the current run
    raise KeyboardInterrupt(signal.Signals(signum).name)


# ------------------------------------------------------------------------------------------------------ the tasks


@dataclass
class Task:
    """One data set split across parties: the CSVs (written once), the config tables, and what the bench knows."""

    name: str
    kind: str  # binary | multiclass
    holders: list[str]
    data: dict[str, dict]  # party -> [data] table (absolute paths)
    tables: dict[str, dict]  # party -> {"model": ..., "train": ...}
    widths: dict[str, int]
    x: np.ndarray
    y: np.ndarray  # the label as the label holder's file has it
    ids: list[str]
    columns: dict[str, np.ndarray]  # data holder -> its feature columns of x
    bottoms: dict[str, dict] = field(default_factory=dict)  # data holder -> its [model].bottom

    @property
    def positives(self) -> float:
        return float(np.mean(self.y == 1)) if self.kind == "binary" else float("nan")


def _file_ids(path: Path) -> list[str]:
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        next(reader)
        return [row[0] for row in reader]


def breast_task(folder: Path, epochs: int) -> Task:
    """The breast demo split: ``prepare_demo`` writes it; its configs give the tables, with ``epochs``."""
    demo = prepare_demo("breast", folder / "demo")
    x, y = _load("breast")
    data, tables = {}, {}
    for party, path in demo.configs.items():
        cfg = tomllib.loads(path.read_text(encoding="utf-8"))
        data[party] = {**cfg["data"], "path": str((path.parent / cfg["data"]["path"]).resolve())}
        tables[party] = {k: cfg[k] for k in ("model", "train") if k in cfg}
        widths = dict(cfg["session"]["cut_widths"])
    tables[LABEL_HOLDER]["train"]["epochs"] = epochs
    # the demo keeps its best epoch ([train].keep = "best"); the bench scores the last one in every cell (the epoch
    # picked on the validation rows would flatter the validation figure) and uses the segments of that epoch
    tables[LABEL_HOLDER]["train"].pop("keep", None)
    return Task("breast", "binary", ["dh1"], data, tables, widths, x, y, [f"patient-{i:05d}" for i in range(len(y))],
                {"dh1": np.arange(10, 30)}, {"dh1": tables["dh1"]["model"]["bottom"]})


def digits_task(folder: Path, epochs: int, *, zero_vs_rest: bool, seed: int = 0) -> Task:
    """Digits across two data holders (image columns 0-3 and 4-7), the label holder with the label only, written
    like ``vfl demo digits --data-holders 2``; ``zero_vs_rest``: the label is "the digit is 0" (10 % positives)."""
    x, digit = _load("digits")
    y = (digit == 0).astype(np.int64) if zero_vs_rest else digit
    n = len(y)
    rng = np.random.default_rng(seed)
    ids = [f"image-{i:05d}" for i in range(n)]
    holders = ["dh1", "dh2"]
    label = "zero" if zero_vs_rest else "digit"

    def keep() -> np.ndarray:
        return np.sort(rng.choice(n, size=n - int(n * DROP_FRACTION), replace=False))

    data_dir = folder / "data"
    _write_party(data_dir / "bank.csv", ids, keep(), {label: y}, rng)
    data = {LABEL_HOLDER: {"path": str(data_dir / "bank.csv"), "id_column": "id", "label_column": label,
                           "features": []}}
    opt = {"kind": "adam", "lr": 0.003}
    bottom = {"widths": [32, 16]}
    tables: dict[str, dict] = {}
    columns = {}
    for h, c in zip(holders, np.array_split(np.arange(8), len(holders))):
        features = [r * 8 + cc for r in range(8) for cc in c]
        _write_party(data_dir / f"{h}.csv", ids, keep(), {f"px{j}": x[:, j] for j in features}, rng)
        data[h] = {"path": str(data_dir / f"{h}.csv"), "id_column": "id", "standardize": True}
        tables[h] = {"model": {"bottom": bottom, "seed": int(h[2:])}, "train": {"optimizer": opt}}
        columns[h] = np.array(features)
    top = {"widths": [32, 1]} if zero_vs_rest else {"widths": [32, 10], "dropout": 0.2}
    tables[LABEL_HOLDER] = {
        "model": {"top": top, "seed": 0},
        "train": {"task": "binary" if zero_vs_rest else "multiclass", "epochs": epochs, "validation_fraction": 0.25,
                  "seed": seed, "optimizer": opt},
    }
    return Task("digits0" if zero_vs_rest else "digits10", "binary" if zero_vs_rest else "multiclass", holders, data,
                tables, {h: 16 for h in holders}, x, y, ids, columns, {h: bottom for h in holders})


# ------------------------------------------------------------------------------------------------------ one cell


@dataclass(frozen=True)
class Cell:
    defence: str  # "none" or a defence name
    params: tuple[tuple[str, float], ...] = ()
    recorded: bool = False  # the no-defence run with the recorder

    @property
    def label(self) -> str:
        text = self.defence + "".join(f" {k}={v:g}" for k, v in self.params if k != "clip")
        return text + (" (recorded)" if self.recorded else "")


def privacy_table(cell: Cell, *, label_holder: bool) -> dict | None:
    """The ``[privacy]`` table of one party's config (``None``: none written, the default "none")."""
    if cell.defence == "none":
        return None
    return {"defence": cell.defence, **dict(cell.params)}


def run_cell(task: Task, cell: Cell, folder: Path, *, record_dir: Path | None = None, timeout_s: float = 600) -> dict:
    """One session of the task's parties with this cell's ``[privacy]`` table; returns its figures."""
    tables = {}
    for party, t in task.tables.items():
        t = {k: dict(v) for k, v in t.items()}
        t["train"]["output"] = "model"
        p = privacy_table(cell, label_holder=party == LABEL_HOLDER)
        if p is not None:
            t["privacy"] = p
        tables[party] = t
    configs = prepare_session(
        folder,
        data_holders=task.holders,
        run=f"leakage-{task.name}",  # the same run id, hence the same canonical order and batches, in every cell
        cut_widths=task.widths,
        batch_size=BATCH,
        window=WINDOW,
        model=f"leakage-{task.name}",
        link_check={"rounds": 0},
        data=task.data,
        psi={"workers": 1},
        tables=tables,
    )
    saved = os.environ.get("PYTHONPATH"), os.environ.get("VFL_LEAKAGE_RECORD")
    if record_dir is not None:  # the launcher passes its environment on to every node
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(record_dir), saved[0]) if p)
        os.environ["VFL_LEAKAGE_RECORD"] = str(record_dir)
    try:
        with open(folder / "launcher.log", "w", encoding="utf-8") as out:
            result = launch(list(configs.items()), out=out, colour=False, timeout_s=timeout_s)
    finally:
        for key, value in zip(("PYTHONPATH", "VFL_LEAKAGE_RECORD"), saved):
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    if result.failed:
        tail = "".join(result.logs.get(result.failed[0], [])[-15:])
        raise RuntimeError(f"{task.name} {cell.label}: {', '.join(result.failed)} failed; "
                           f"logs in {folder}/logs\n{tail}")
    return figures(task, folder, result.summary or {})


def figures(task: Task, folder: Path, summary: dict) -> dict:
    from vfl.launch.plot import load_metrics

    epochs = load_metrics(folder / "model" / "metrics.jsonl")
    val_key = "val_auc" if task.kind == "binary" else "val_accuracy"
    row = {
        "val": epochs[-1][val_key],
        "val_metric": val_key,
        "epochs": len(epochs),
        "train_samples": summary.get("train_samples"),
        "train_seconds": summary.get("train_seconds"),
        "samples_per_s": (summary["train_samples"] / summary["train_seconds"]
                          if summary.get("train_samples") and summary.get("train_seconds") else None),
        "wall_s": summary.get("launch_seconds"),
    }
    keys = ("leak_auc_norm", "leak_auc_direction") if task.kind == "binary" else ("leak_attack_accuracy",)
    for key in keys:
        per_epoch = [max(e[key].values()) for e in epochs if isinstance(e.get(key), dict) and e[key]]
        row[key + "_mean"] = float(np.mean(per_epoch)) if per_epoch else None
        row[key + "_max"] = float(np.max(per_epoch)) if per_epoch else None
        row[key + "_last"] = per_epoch[-1] if per_epoch else None
        row[key + "_per_epoch"] = [round(v, 4) for v in per_epoch]
        row[key + "_by_party"] = ({p: float(np.mean([e[key][p] for e in epochs if key in e])) for p in epochs[-1][key]}
                                  if per_epoch else {})
    return row


# --------------------------------------------------------------------------------------- recorder, attacks, inversion


def recorded_gradients(task: Task, record_dir: Path) -> dict[str, dict]:
    """Per data holder: the gradient rows it received in the order received, each row's true label, and the rows
    per step."""
    out = {}
    index = {k: i for i, k in enumerate(task.ids)}
    for h in task.holders:
        rec = np.load(record_dir / f"{h}.npz")
        file_ids = _file_ids(Path(task.data[h]["path"]))
        labels = task.y[[index[file_ids[r]] for r in rec["rows"]]]
        out[h] = {"grads": rec["grads"], "labels": labels, "sizes": rec["sizes"]}
    return out


def epochs_of(sizes: np.ndarray, train_rows: int) -> np.ndarray:
    """The epoch (0-based) of every received row: each epoch trains every training row once."""
    n = int(sizes.sum())
    return np.arange(n) // train_rows


def attacker_check(task: Task, recorded: dict[str, dict], audit_row: dict, train_rows: int) -> dict:
    """The attacks a data holder runs on what it received, computed by the bench from the recorded rows with the
    functions of ``vfl.privacy.audit`` (batch = one step), per epoch, max over data holders, against the label
    holder's audit of the same run: equal up to rounding if the audit scores exactly what was sent."""
    from vfl.privacy.audit import cluster_attack_accuracy, direction_leak_auc, norm_leak_auc

    keys = ("leak_auc_norm", "leak_auc_direction") if task.kind == "binary" else ("leak_attack_accuracy",)
    own: dict[str, list[list[float]]] = {k: [] for k in keys}
    for rec in recorded.values():
        epoch = epochs_of(rec["sizes"], train_rows)
        batch = np.repeat(np.arange(len(rec["sizes"])), rec["sizes"])
        per = {k: [] for k in keys}
        for e in range(int(epoch.max()) + 1):
            m = epoch == e
            g, y, b = rec["grads"][m], rec["labels"][m], batch[m]
            if task.kind == "binary":
                per["leak_auc_norm"].append(norm_leak_auc(g, y))
                per["leak_auc_direction"].append(direction_leak_auc(g, y, b))
            else:
                per["leak_attack_accuracy"].append(cluster_attack_accuracy(g, y, b, int(task.y.max()) + 1))
        for k in keys:
            own[k].append(per[k])
    check = {}
    for k in keys:
        mine = np.max(np.array(own[k]), axis=0)  # max over data holders, per epoch
        check[f"bench_{k}_per_epoch"] = [round(float(v), 4) for v in mine]
        check[f"bench_{k}_mean"] = round(float(np.mean(mine)), 4)
        audit = audit_row.get(f"{k}_per_epoch") or []
        if audit:
            n = min(len(audit), len(mine))
            check[f"{k}_max_abs_diff_vs_audit"] = round(float(np.max(np.abs(np.array(audit[:n]) - mine[:n]))), 4)
    return check


def typical_row_norm(recorded: dict[str, dict], train_rows: int) -> float:
    """The median L2 norm of the gradient rows the data holders received in the first epoch (pooled): the rows get
    smaller by orders of magnitude as the model fits (digits0: 1.6e-3 in epoch 1, 5e-10 by epoch 20), so a median
    over all epochs would clip every row of the epochs where the leak is largest down to noise level."""
    return float(np.median(np.concatenate([np.linalg.norm(r["grads"][:train_rows], axis=1)
                                           for r in recorded.values()])))


def shared_rows(task: Task) -> np.ndarray:
    """Data set rows every party holds (what the PSI aligns), in data set order."""
    shared = set(_file_ids(Path(task.data[LABEL_HOLDER]["path"])))
    for h in task.holders:
        shared &= set(_file_ids(Path(task.data[h]["path"])))
    index = {k: i for i, k in enumerate(task.ids)}
    return np.array(sorted(index[k] for k in shared))


def segment_activations(task: Task, folder: Path, h: str, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Data holder ``h``'s standardised features of data set ``rows`` and its trained segment's activations on them
    (evaluation mode: what the label holder received in the last validation pass, and at ``vfl predict``)."""
    import torch

    from vfl.node.training import read_segment
    from vfl.train.data import Standardizer
    from vfl.train.models import build_model, load_weights

    torch.set_num_threads(1)
    state = read_segment(folder / "model" / f"{h}-segment.pt")  # checked against the digest it carries
    features = task.x[np.ix_(rows, task.columns[h])].astype(np.float32)
    if "scaler" in state:
        features = Standardizer.from_dict(state["scaler"]).transform(features).astype(np.float32)
    model = build_model(features.shape[1], task.bottoms[h], out_features=task.widths[h])
    load_weights(model, state, "segment", "model")
    model.eval()
    with torch.no_grad():
        return features, model(torch.from_numpy(features)).numpy()


def aux_mask(n: int, seed: int = 0) -> np.ndarray:
    aux = np.zeros(n, bool)
    aux[np.random.default_rng(seed).choice(n, size=max(2, int(round(AUX_FRACTION * n))), replace=False)] = True
    return aux


def inversion(task: Task, folder: Path, seed: int = 0) -> dict[str, dict]:
    """Per data holder: how well the label holder reconstructs its standardised features from its activations."""
    rows = shared_rows(task)
    aux = aux_mask(len(rows), seed)
    out = {}
    for h in task.holders:
        features, acts = segment_activations(task, folder, h, rows)
        out[h] = _decode(acts, features, aux, seed)
        out[h].update(aux_rows=int(aux.sum()), scored_rows=int((~aux).sum()), cut_width=int(acts.shape[1]),
                      features=int(features.shape[1]))
    return out


def completion(task: Task, folder: Path, seed: int = 0) -> float:
    """Model completion (Fu et al. 2022): a data holder that knows the labels of an auxiliary 10 % of the rows fits
    a logistic regression on its own trained segment's activations and labels the other rows. Returns the max over
    data holders of the AUC (binary) or accuracy (multiclass) on those rows."""
    from sklearn.linear_model import LogisticRegression

    from vfl.train.metrics import roc_auc

    rows = shared_rows(task)
    aux = aux_mask(len(rows), seed + 1)
    y = task.y[rows]
    best = 0.0
    for h in task.holders:
        _, acts = segment_activations(task, folder, h, rows)
        mu, sd = acts[aux].mean(0), acts[aux].std(0) + 1e-6
        clf = LogisticRegression(max_iter=2000).fit((acts[aux] - mu) / sd, y[aux])
        z = (acts[~aux] - mu) / sd
        score = (roc_auc(y[~aux], clf.decision_function(z)) if task.kind == "binary"
                 else float(np.mean(clf.predict(z) == y[~aux])))
        best = max(best, float(score))
    return best


def _decode(acts: np.ndarray, features: np.ndarray, aux: np.ndarray, seed: int) -> dict:
    """Train an MLP decoder (and, as a reference, a ridge regression) on the auxiliary rows; score the others."""
    import torch

    torch.manual_seed(seed)
    a_mu, a_sd = acts[aux].mean(0), acts[aux].std(0) + 1e-6  # the decoder sees activations normalised on aux
    a = torch.from_numpy(((acts - a_mu) / a_sd).astype(np.float32))
    f = torch.from_numpy(features)
    tr, te = torch.from_numpy(aux), torch.from_numpy(~aux)
    decoder = torch.nn.Sequential(torch.nn.Linear(a.shape[1], 64), torch.nn.ReLU(), torch.nn.Linear(64, f.shape[1]))
    opt = torch.optim.Adam(decoder.parameters(), lr=0.01, weight_decay=1e-3)
    for _ in range(500):  # full-batch on the auxiliary rows
        opt.zero_grad()
        loss = torch.mean((decoder(a[tr]) - f[tr]) ** 2)
        loss.backward()
        opt.step()
    with torch.no_grad():
        mse = float(torch.mean((decoder(a[te]) - f[te]) ** 2))
    baseline = float(np.mean((features[~aux] - features[aux].mean(0)) ** 2))
    x1 = np.hstack([acts[aux], np.ones((aux.sum(), 1))])
    w = np.linalg.solve(x1.T @ x1 + 1.0 * np.eye(x1.shape[1]), x1.T @ features[aux])
    ridge = float(np.mean((np.hstack([acts[~aux], np.ones(((~aux).sum(), 1))]) @ w - features[~aux]) ** 2))
    return {"mse": round(mse, 4), "mean_baseline_mse": round(baseline, 4), "r2": round(1 - mse / baseline, 4),
            "ridge_mse": round(ridge, 4), "ridge_r2": round(1 - ridge / baseline, 4)}


# ------------------------------------------------------------------------------------------------------ the sweep


def cells_for(task: Task, strengths: dict, clip: float | None) -> list[Cell]:
    cells = []
    for defence, spec in strengths.items():
        if defence == "marvell" and task.kind != "binary":
            continue
        if defence == "max_norm":
            cells.append(Cell("max_norm"))
            continue
        key, values = spec
        for v in values:
            params = ((key, float(v)),)
            if defence == "gradient_noise":
                params = (("clip", float(clip)), *params)
            cells.append(Cell(defence, params))
    return cells


def leak_of(row: dict) -> float | None:
    """The larger of the two binary attack AUCs (epoch means)."""
    vals = [row.get("leak_auc_norm_mean"), row.get("leak_auc_direction_mean")]
    vals = [v for v in vals if v is not None]
    return max(vals) if vals else None


def worst_of(row: dict) -> float:
    """The larger of the two binary attack AUCs in the worst epoch."""
    return max(row.get("leak_auc_norm_max") or 0.0, row.get("leak_auc_direction_max") or 0.0)


def choose_best(rows: list[dict]) -> dict:
    """Among the defences, the lowest leak whose val AUC drop is <= 2 points; else the lowest leak (flagged)."""
    base = next(r for r in rows if r["defence"] == "none")
    candidates = [r for r in rows if r["defence"] != "none" and leak_of(r) is not None]
    if not candidates:
        return {}
    within = [r for r in candidates if r["val_drop_pp"] <= GOAL_DROP_PP]
    pool = within or candidates
    best = min(pool, key=lambda r: (leak_of(r), r["val_drop_pp"]))
    leak = leak_of(best)
    return {
        "no_defence_leak_auc": round(leak_of(base), 4),
        "best_defence": best["cell"],
        "best_defence_leak_auc": round(leak, 4),
        "best_defence_leak_auc_norm": round(best["leak_auc_norm_mean"], 4),
        "best_defence_leak_auc_direction": round(best["leak_auc_direction_mean"], 4),
        "best_defence_val_auc_drop_pp": round(best["val_drop_pp"], 2),
        "best_within_2pp": bool(within),
        "reached": bool(within) and leak <= GOAL_LEAK,
        "leak_measure": "max over data holders of the per-epoch audit AUC, mean over epochs",
        "best_defence_leak_auc_worst_epoch": round(worst_of(best), 4),
        "reached_in_every_epoch": bool(within) and worst_of(best) <= GOAL_LEAK,
    }


def sweep(folder: Path, *, quick: bool, defences: list[str], repeats: int, log) -> dict:
    epochs = {"breast": 8, "digits": 8} if quick else {"breast": 25, "digits": 20}
    strengths = {k: v for k, v in (QUICK_STRENGTHS if quick else STRENGTHS).items() if k in defences}
    tasks = [
        breast_task(folder / "breast", epochs["breast"]),
        digits_task(folder / "digits0", epochs["digits"], zero_vs_rest=True),
        digits_task(folder / "digits10", epochs["digits"], zero_vs_rest=False),
    ]
    recorder = folder / "recorder"
    recorder.mkdir()
    (recorder / "sitecustomize.py").write_text(RECORDER, encoding="utf-8")
    result = {"tasks": {}, "inversion": {}, "attacker_check": {}}
    for task in tasks:
        log(f"--- {task.name} ({task.kind}, {len(task.y)} rows"
            + (f", {100 * task.positives:.1f} % positives" if task.kind == "binary" else "") + ")")
        def one(cell: Cell, n: int) -> dict:
            t0 = time.monotonic()
            run_folder = folder / task.name / f"run{n:02d}"
            row = run_cell(task, cell, run_folder, record_dir=recorder if cell.recorded else None)
            row.update(defence=cell.defence, params=dict(cell.params), cell=cell.label, folder=str(run_folder),
                       completion=completion(task, run_folder))
            log(f"{cell.label:<34} {row['val_metric']} {row['val']:.4f}  " + "  ".join(
                f"{k[:-5]} {row[k]:.3f}" for k in ("leak_auc_norm_mean", "leak_auc_direction_mean",
                                                   "leak_attack_accuracy_mean") if row.get(k) is not None)
                + f"  completion {row['completion']:.3f}"
                + f"  {row['samples_per_s'] or float('nan'):,.0f} samples/s  ({time.monotonic() - t0:.1f} s)")
            return row

        first = one(Cell("none", recorded=True), 0)
        recorded = recorded_gradients(task, recorder)
        train_rows = int(recorded[task.holders[0]]["sizes"].sum()) // first["epochs"]
        clip = typical_row_norm(recorded, train_rows)
        result["attacker_check"][task.name] = attacker_check(task, recorded, first, train_rows)
        result["inversion"][task.name] = inversion(task, Path(first["folder"]))
        for h in task.holders:
            (recorder / f"{h}.npz").unlink()
        cells = [Cell("none"), *cells_for(task, strengths, clip)]
        runs: dict[Cell, list[dict]] = {c: [] for c in cells}
        n = 0
        for _ in range(repeats):  # rounds of every cell, so a slow spell of the shared box hits every cell alike
            for cell in cells:
                n += 1
                runs[cell].append(one(cell, n))
        table = [aggregate(c, runs[c]) for c in cells]
        base = table[0]
        first["runs"] = 1
        table.insert(1, first)
        for r in table:
            r["cost"] = (r["samples_per_s"] / base["samples_per_s"]
                         if r["samples_per_s"] and base["samples_per_s"] else None)
            r["val_drop_pp"] = 100 * (base["val"] - r["val"])
        result["tasks"][task.name] = {"kind": task.kind, "rows": len(task.y), "positives": task.positives,
                                      "epochs": first["epochs"], "clip": clip, "repeats": repeats, "cells": table}
    return result


MEANS = ("val", "completion", *(f"{k}_{m}" for k in ("leak_auc_norm", "leak_auc_direction", "leak_attack_accuracy")
                                 for m in ("mean", "max", "last")))


def aggregate(cell: Cell, runs: list[dict]) -> dict:
    """One cell over its repeats: the mean of every figure, the MEDIAN samples/s, and each run's own figures."""
    row = {k: v for k, v in runs[0].items() if k not in ("folder",)}
    for k in MEANS:
        vals = [r[k] for r in runs if r.get(k) is not None]
        row[k] = float(np.mean(vals)) if vals else None
    sps = [r["samples_per_s"] for r in runs if r["samples_per_s"]]
    row["samples_per_s"] = float(np.median(sps)) if sps else None
    row["runs"] = len(runs)
    row["per_run"] = [{k: r.get(k) for k in ("val", "completion", "samples_per_s", "leak_auc_norm_mean",
                                              "leak_auc_direction_mean", "leak_attack_accuracy_mean")} for r in runs]
    row["folder"] = runs[0]["folder"]
    return row


def print_table(result: dict) -> None:
    for name, t in result["tasks"].items():
        binary = t["kind"] == "binary"
        print()
        print(f"{name}: {t['kind']}, {t['rows']} rows, {t['epochs']} epochs"
              + (f", {100 * t['positives']:.1f} % positives" if binary else "")
              + f"; gradient_noise clip = {t['clip']:.3g} (median row norm received in epoch 1 without defence)")
        head = (f"{'cell':<30} {'val AUC' if binary else 'val acc':>8} {'drop pp':>7} "
                + (f"{'norm mean':>9} {'norm max':>8} {'dir mean':>8} {'dir max':>8}" if binary
                   else f"{'attack acc mean':>15} {'max':>6}")
                + f" {'complete':>8} {'samples/s':>9} {'cost':>5}")
        print(head)
        for r in t["cells"]:
            leak = (f"{_f(r.get('leak_auc_norm_mean')):>9} {_f(r.get('leak_auc_norm_max')):>8} "
                    f"{_f(r.get('leak_auc_direction_mean')):>8} {_f(r.get('leak_auc_direction_max')):>8}" if binary
                    else f"{_f(r.get('leak_attack_accuracy_mean')):>15} {_f(r.get('leak_attack_accuracy_max')):>6}")
            sps = f"{r['samples_per_s']:,.0f}" if r["samples_per_s"] else "-"
            print(f"{r['cell']:<30} {r['val']:>8.4f} {r['val_drop_pp']:>7.2f} {leak} {_f(r['completion']):>8} {sps:>9} "
                  f"{_f(r['cost'], 2):>5}")
    print()
    for name, check in result["attacker_check"].items():
        parts = [f"{k[6:-5]} {v:.3f}" for k, v in check.items() if k.startswith("bench_") and k.endswith("_mean")]
        diffs = [f"{k.split('_max_abs')[0]} {v:.4f}" for k, v in check.items() if "_max_abs_diff" in k]
        print(f"attacker check {name}: the attacks on the gradients dh recorded without defence, epoch mean: "
              + ", ".join(parts) + ("; max |bench - audit| per epoch: " + ", ".join(diffs) if diffs else
                                    "; (no audit figures in metrics.jsonl to compare)"))
    for name, inv in result["inversion"].items():
        for h, v in inv.items():
            print(f"feature inversion {name}/{h}: {v['features']} features from {v['cut_width']} activations, decoder "
                  f"on {v['aux_rows']} aux rows, scored on {v['scored_rows']}: MSE {v['mse']:.3f} vs "
                  f"{v['mean_baseline_mse']:.3f} "
                  f"for the mean (R2 {v['r2']:.3f}; ridge R2 {v['ridge_r2']:.3f})")


def _f(v, digits: int = 3) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="8 epochs, 1 run per cell, fewer strengths (about 1.5 minutes)")
    ap.add_argument("--keep", metavar="DIR", help="write every run's folder (configs, CSVs, logs, model) here")
    ap.add_argument("--repeats", type=int, default=None, help="runs of every cell (default 2; --quick: 1)")
    ap.add_argument("--defences", nargs="*", choices=list(STRENGTHS), default=list(STRENGTHS),
                    help="the defences to run (default: all; none given: the no-defence runs only)")
    args = ap.parse_args()
    repeats = args.repeats or (1 if args.quick else 2)
    if repeats < 1:
        ap.error("--repeats must be >= 1")
    signal.signal(signal.SIGTERM, _stop)
    started = time.monotonic()

    def log(line: str) -> None:
        print(line, flush=True)

    if args.keep:
        folder = Path(args.keep)
        if folder.exists() and any(folder.iterdir()):
            ap.error(f"--keep {folder}: the folder is not empty")
        folder.mkdir(parents=True, exist_ok=True)
        result = sweep(folder.resolve(), quick=args.quick, defences=args.defences, repeats=repeats, log=log)
    else:
        with tempfile.TemporaryDirectory(prefix="vfl-leakage-") as tmp:
            result = sweep(Path(tmp), quick=args.quick, defences=args.defences, repeats=repeats, log=log)
    print_table(result)
    goal = choose_best([{**r} for r in result["tasks"]["digits0"]["cells"] if not r["cell"].endswith("(recorded)")])
    if goal:
        print(f"\ndigits0 (imbalanced): no defence leaks {goal['no_defence_leak_auc']:.3f}; best defence "
              f"{goal['best_defence']}: leak {goal['best_defence_leak_auc']:.3f} (norm "
              f"{goal['best_defence_leak_auc_norm']:.3f}, direction {goal['best_defence_leak_auc_direction']:.3f}), "
              f"val AUC drop {goal['best_defence_val_auc_drop_pp']:.2f} pp"
              + ("" if goal["best_within_2pp"] else " (NO defence stays within 2 pp: lowest leak overall)")
              + f"; goal (both <= {GOAL_LEAK}, drop <= {GOAL_DROP_PP} pp) "
              + ("REACHED" if goal["reached"] else "NOT reached")
              + f" (worst epoch: leak {goal['best_defence_leak_auc_worst_epoch']:.3f}, "
              + ("also within" if goal["reached_in_every_epoch"] else "NOT within") + " the goal)")
    else:
        print("\ndigits0: the runs report no leak figures (no audit in metrics.jsonl): no defence comparison")
    for r in (c for t in result["tasks"].values() for c in t["cells"]):
        r.pop("folder", None)
    wall = round(time.monotonic() - started, 1)
    summary = {**result, "goal": goal, "quick": args.quick, "repeats": repeats, "wall_s": wall}
    print(json.dumps(summary, sort_keys=True, default=_json_default))
    return 0


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(type(value).__name__)


if __name__ == "__main__":
    sys.exit(main())
