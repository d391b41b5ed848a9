"""`vfl demo`: vertically partitioned data from datasets that scikit-learn ships, keys, configs, and a run.

breast: scikit-learn's breast cancer set split as FATE's standard hetero demo — the label holder has the label and
the first 10 features, one data holder the other 20. digits: the 8x8 digit images split into column slices across N
data holders; the label holder has only the label. chain: the digits through a three-tier segment chain (issue 17):
one data holder with all 64 pixels and the bottom (64 -> 128), a segment holder with no data and no labels (128 ->
640), the label holder with only the label and the top (640 -> 10). IDs are shuffled independently at each party and a few rows are
missing at each, so the private set intersection has real work to do.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import SetupError
from .local import LaunchResult, summarize_run, write_summary
from .prepare import LABEL_HOLDER, model_name, prepare_session

DATASETS = ("breast", "digits", "chain")
DROP_FRACTION = 0.03  # rows missing at each party


class DemoError(SetupError):
    pass


@dataclass(frozen=True)
class Demo:
    name: str
    configs: dict[str, Path]
    out: Path
    rows: int


# the files scikit-learn ships as package data (what its load_breast_cancer / load_digits read)
_FILES = {"breast": "breast_cancer.csv", "digits": "digits.csv.gz", "chain": "digits.csv.gz"}


def _load(name: str) -> tuple[np.ndarray, np.ndarray]:
    """float32 features and int64 labels of a data set scikit-learn ships, read from its package data: importing
    scikit-learn itself takes seconds, which a demo that only needs two small CSV files should not pay."""
    if name not in _FILES:
        raise DemoError(f"unknown demo {name!r}; choose one of {', '.join(DATASETS)}")
    path = _sklearn_data() / _FILES[name]
    try:
        if _FILES[name] == "breast_cancer.csv":  # a "n_samples,n_features,class names" line, then features and the class per row
            with open(path, encoding="utf-8") as fh:
                n, d = (int(v) for v in fh.readline().split(",")[:2])
                table = np.loadtxt(fh, delimiter=",", dtype=np.float64, ndmin=2)
        else:  # 64 pixels and the digit per row
            with gzip.open(path, "rt", encoding="utf-8") as fh:
                table = np.loadtxt(fh, delimiter=",", dtype=np.float64, ndmin=2)
            n, d = len(table), table.shape[1] - 1
    except (OSError, ValueError, EOFError) as exc:
        raise DemoError(f"cannot read scikit-learn's {_FILES[name]} ({path}): {exc}") from None
    if table.shape != (n, d + 1):
        raise DemoError(f"scikit-learn's {_FILES[name]} ({path}) has shape {table.shape}, expected ({n}, {d + 1})")
    return table[:, :-1].astype(np.float32), table[:, -1].astype(np.int64)


def _sklearn_data() -> Path:
    """scikit-learn's ``datasets/data`` folder, found without importing scikit-learn."""
    missing = DemoError("the demo data sets come from scikit-learn: pip install 'vfl[demo]'")
    try:
        spec = importlib.util.find_spec("sklearn")
    except (ImportError, ValueError):
        raise missing from None
    if spec is None or not spec.submodule_search_locations:
        raise missing
    for root in spec.submodule_search_locations:
        folder = Path(root) / "datasets" / "data"
        if folder.is_dir():
            return folder
    raise missing


def _write_party(path: Path, ids: list[str], keep: np.ndarray, columns: dict[str, np.ndarray], rng) -> None:
    order = rng.permutation(keep)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", *columns])
        for i in order:
            w.writerow([ids[i], *(_cell(c[i]) for c in columns.values())])


def _cell(v) -> str:
    return str(int(v)) if isinstance(v, (np.integer, int)) else repr(float(v))


def privacy_table(defence: str, params: tuple[str, ...] | list[str] = ()) -> dict | None:
    """``vfl demo --defence NAME --defence-param KEY=VALUE ...`` as the ``[privacy]`` table every node gets; None for
    no defence (the configs then have no [privacy] table, and the session config its digest without one).

    Checked here, as a node would check it, so a wrong name or value stops the demo before anything is written."""
    from ..privacy.spec import PrivacyError, PrivacySpec

    table: dict = {"defence": defence}
    for item in params:
        key, sep, value = item.partition("=")
        try:
            table[key.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not key.strip():
            raise DemoError(f"--defence-param {item!r} must be KEY=NUMBER, e.g. --defence-param sumkl=4")
    try:
        spec = PrivacySpec.from_table(table)
    except PrivacyError as exc:
        raise DemoError(f"--defence {defence}: {exc}") from None
    if spec.defence == "none":
        return None
    return {"defence": spec.defence, **dict(spec.params)}


def _check_task(privacy: dict, task: str) -> None:
    from ..privacy.spec import PrivacyError, PrivacySpec

    try:
        PrivacySpec.from_table(privacy).check_task(task)
    except PrivacyError as exc:
        raise DemoError(f"--defence {privacy.get('defence')}: {exc}") from None


def prepare_demo(name: str, out: Path, *, data_holders: int = 1, seed: int = 0, window: int | str = 2,
                 privacy: dict | None = None, epochs: int | None = None) -> Demo:
    """The demo's data, keys and configs in ``out``. ``privacy``: a ``[privacy]`` table (``defence`` and its
    parameters) for every node (``vfl demo --defence``); left out, the run has no defence (and is audited).
    ``epochs``: instead of the demo's own count (``vfl demo --epochs``, for a quick look)."""
    x, y = _load(name)
    n = len(y)
    rng = np.random.default_rng(seed)
    ids = [f"patient-{i:05d}" if name == "breast" else f"image-{i:05d}" for i in range(n)]
    data_dir = out / "data"
    out_model = "model"
    holders = [f"dh{i + 1}" for i in range(data_holders)]

    def keep() -> np.ndarray:
        return np.sort(rng.choice(n, size=n - int(n * DROP_FRACTION), replace=False))

    data: dict[str, dict] = {}
    tables: dict[str, dict] = {}
    widths: dict[str, int] = {}
    segments: dict[str, dict] = {}
    adam = {"kind": "adam", "lr": 0.01}
    if name == "breast":
        if data_holders != 1:
            raise DemoError("the breast demo has one data holder (FATE's split); use --data-holders with digits")
        _write_party(data_dir / "bank.csv", ids, keep(), {"diagnosis": y, **{f"x{j}": x[:, j] for j in range(10)}}, rng)
        _write_party(data_dir / "dh1.csv", ids, keep(), {f"x{j}": x[:, j] for j in range(10, 30)}, rng)
        data[LABEL_HOLDER] = {"path": "data/bank.csv", "id_column": "id", "label_column": "diagnosis",
                              "standardize": True}
        data["dh1"] = {"path": "data/dh1.csv", "id_column": "id", "standardize": True}
        bottom = {"widths": [16], "final_activation": True}
        tables[LABEL_HOLDER] = {
            "model": {"bottom": bottom, "top": {"widths": [1]}, "seed": 0},
            "train": {"task": "binary", "epochs": 25, "validation_fraction": 0.25, "seed": seed, "optimizer": adam,
                      "output": out_model, "keep": "best"},  # it overfits after a few epochs: keep the best one
        }
        tables["dh1"] = {"model": {"bottom": bottom, "seed": 1}, "train": {"optimizer": adam, "output": out_model}}
        widths["dh1"] = 16
        batch = 32
    elif name == "chain":
        if data_holders != 1:
            raise DemoError("the chain demo has one data holder (all 64 pixels) feeding one segment holder; "
                            "--data-holders is for the digits demo")
        _write_party(data_dir / "bank.csv", ids, keep(), {"digit": y}, rng)
        _write_party(data_dir / "dh1.csv", ids, keep(), {f"px{j}": x[:, j] for j in range(x.shape[1])}, rng)
        data[LABEL_HOLDER] = {"path": "data/bank.csv", "id_column": "id", "label_column": "digit", "features": []}
        data["dh1"] = {"path": "data/dh1.csv", "id_column": "id", "standardize": True}
        # the SplitNN: 64 -> 128 (ReLU) at dh1, 128 -> 640 (ReLU) at seg1, 640 -> 10 at the label holder,
        # plain SGD at lr 0.03 everywhere; multiclass is cross-entropy on the logits, i.e. NLL on log-softmax
        sgd = {"kind": "sgd", "lr": 0.03}
        segments["seg1"] = {"inputs": ["dh1"], "width": 640, "combine": "concat"}
        tables["dh1"] = {"model": {"bottom": {"widths": [128], "final_activation": True}, "seed": 1},
                         "train": {"optimizer": sgd, "output": out_model}}
        tables["seg1"] = {"model": {"segment": {"widths": [640], "final_activation": True}, "seed": 2},
                          "train": {"optimizer": sgd, "output": out_model}}
        tables[LABEL_HOLDER] = {
            "model": {"top": {"widths": [10]}, "seed": 0},
            "train": {"task": "multiclass", "epochs": 30, "validation_fraction": 0.25, "seed": seed,
                      "optimizer": sgd, "output": out_model, "keep": "best"},
        }
        widths["dh1"] = 128
        batch = 32
    else:
        if not 1 <= data_holders <= 8:
            raise DemoError("the digits demo takes 1 to 8 data holders")
        cols = np.array_split(np.arange(8), data_holders)  # image columns per data holder
        _write_party(data_dir / "bank.csv", ids, keep(), {"digit": y}, rng)
        data[LABEL_HOLDER] = {"path": "data/bank.csv", "id_column": "id", "label_column": "digit", "features": []}
        opt = {"kind": "adam", "lr": 0.003}
        for h, c in zip(holders, cols):
            features = [r * 8 + cc for r in range(8) for cc in c]  # pixel (row, column) of these image columns
            _write_party(data_dir / f"{h}.csv", ids, keep(), {f"px{j}": x[:, j] for j in features}, rng)
            data[h] = {"path": f"data/{h}.csv", "id_column": "id", "standardize": True}
            tables[h] = {"model": {"bottom": {"widths": [32, 16]}, "seed": int(h[2:])},
                         "train": {"optimizer": opt, "output": out_model}}
            widths[h] = 16
        tables[LABEL_HOLDER] = {
            "model": {"top": {"widths": [32, 10], "dropout": 0.2}, "seed": 0},
            "train": {"task": "multiclass", "epochs": 20, "validation_fraction": 0.25, "seed": seed,
                      "optimizer": opt, "output": out_model, "keep": "best"},
        }
        batch = 32
    if epochs is not None:
        if not (isinstance(epochs, int) and epochs >= 1):
            raise DemoError(f"--epochs must be an integer >= 1, got {epochs!r}")
        tables[LABEL_HOLDER]["train"]["epochs"] = epochs
    if privacy:
        _check_task(privacy, tables[LABEL_HOLDER]["train"]["task"])
    model = model_name(f"demo-{name}", tables, widths, segments)
    configs = prepare_session(
        out,
        data_holders=holders,
        run=f"demo-{name}",
        cut_widths=widths,
        batch_size=batch,
        window=window,
        model=model,
        link_check={"rounds": 0},
        data=data,
        psi={"workers": 1},
        tables=tables,
        privacy=privacy,
        segments=segments or None,
    )
    return Demo(name=name, configs=configs, out=out, rows=n)


def summarize(demo: Demo, launch_s: float, logs: dict[str, list[str]], exit_codes: dict[str, int], *,
              started: float | None = None) -> dict:
    """summary.json of a demo run: the launcher's record of it (:func:`vfl.launch.local.summarize_run`, written by
    ``launch``) plus the demo's name and data set size, with ``wall_seconds`` from ``started`` (the command's
    start) to now; written atomically into the run folder."""
    try:
        summary = json.loads((demo.out / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):  # the launcher recorded elsewhere: summarize from what the caller has
        summary = summarize_run(LaunchResult(exit_codes, launch_s, logs), demo.configs[LABEL_HOLDER])
    summary.update(demo=demo.name, rows=demo.rows)
    if started is not None:
        summary["wall_seconds"] = round(time.monotonic() - started, 2)
    write_summary(demo.out, summary)
    return summary


def parties_line(summary: dict) -> str | None:
    """The demo's line naming each party's role, for a chain (None for the two-tier demos, whose roles are plain):
    the data holders first, then the segment holders, then the label holder, as the tensors flow."""
    roles = summary.get("parties") or {}
    if "segment_holder" not in roles.values():
        return None
    order = ("data_holder", "segment_holder", "label_holder")
    ranked = sorted(roles, key=lambda p: (order.index(roles[p]) if roles[p] in order else len(order), p))
    return "parties: " + ", ".join(f"{p} ({str(roles[p]).replace('_', ' ')})" for p in ranked)


_LEAK_NAMES = (("leak_auc_norm", "norm AUC"), ("leak_auc_direction", "direction AUC"),
               ("leak_attack_accuracy", "attack accuracy"))


def leak_line(summary: dict) -> str | None:
    """The demo's closing line on label leakage, from the last epoch's audit in ``summary`` (None: not audited).

    With no defence it says how to get one: the number is there to be reduced, not only read."""
    leak = summary.get("leak") or {}
    parties = [f"{party} " + ", ".join(f"{name} {figures[key]:.2f}" for key, name in _LEAK_NAMES if key in figures)
               for party, figures in leak.items()]
    if not parties:
        return None
    defence = summary.get("defence") or "none"
    roles = summary.get("parties") or {}
    # in a chain the label holder's gradients go to the parties feeding it, segment holders among them
    who = "party feeding the label holder" if any(roles.get(p) == "segment_holder" for p in leak) else "data holder"
    head = f"label leakage (what each {who} could infer from its gradients"
    if defence == "none":
        return f"{head}): {'; '.join(parties)} — see PRIVACY.md; set [privacy].defence to reduce it"
    return f"{head}, defence {defence}): {'; '.join(parties)} — see PRIVACY.md"
