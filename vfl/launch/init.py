"""`vfl init`: a working, commented set of node configs and keys for a local run from the user's own tables.

A first run from one's own CSVs should not need `vfl keys generate` and two hand-written TOMLs. This reads every
party's table the way its node will (so a wrong column name or a text cell in a feature column is found now, naming
the file, the column and the columns the file has), picks the task from the labels unless told, sizes the models,
and writes OUT/PARTY.toml for each party plus OUT/keys/, with the data paths relative to the configs. Then
`vfl launch OUT` runs PSI and training, and each party's trained segment lands in OUT/model/.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..node.config import ConfigError
from ..protocol.chain import Segment, chain_problem
from ..protocol.messages import is_party_id
from ..protocol.session import MAX_CUT_WIDTH
from ..psi.engine import encode_ids
from ..psi.errors import InvalidIdError
from ..train.data import DataError, TableSpec, encode_labels, load_table
from .prepare import model_name, prepare_session

TASKS = ("binary", "multiclass", "regression")
CUT_WIDTH = 16  # each party's cut-layer width
HIDDEN = 32  # the hidden width of every bottom and of the top
MAX_CLASSES = 20  # integer labels with more distinct values than this are taken as a regression target


class InitError(ConfigError):
    """The tables or options given to `vfl init` cannot make a working run. One line for the user (exit 2)."""


@dataclass(frozen=True)
class Party:
    name: str
    path: Path  # absolute
    id_column: str


@dataclass(frozen=True)
class InitResult:
    out: Path
    configs: dict[str, Path]  # label holder first
    task: str
    why: str  # how the task was chosen
    shared: int  # IDs present in every table
    rows: dict[str, int]
    features: dict[str, int]
    segments: dict[str, tuple[str, ...]] = field(default_factory=dict)  # segment holder -> its inputs

    def report(self) -> str:
        """What was written and the command that runs it."""
        lines = [f"task: {self.task} ({self.why})"]
        for name, path in self.configs.items():
            if name in self.segments:
                lines.append(f"{name}: segment holder, no data, fed by {', '.join(self.segments[name])} -> {path}")
            else:
                lines.append(f"{name}: {self.rows[name]} rows, {self.features[name]} feature columns -> {path}")
        lines.append(f"{self.shared} IDs are in every party's table; training uses only those rows")
        lines.append(f"keys: {self.out / 'keys'} (each party's secret key must stay with that party)")
        lines.append("")
        lines.append("start the run (every node on this machine, logs prefixed):")
        lines.append(f"  vfl launch {self.out}")
        lines.append("or each node in its own terminal:")
        lines.extend(f"  vfl node --config {path}" for path in self.configs.values())
        lines.append(f"results: {self.out / 'model'} (PARTY-segment.pt, metrics.jsonl)")
        return "\n".join(lines)


def parse_assignment(text: str, option: str) -> tuple[str, str]:
    """``NAME=VALUE`` of a command-line option, NAME a valid party id."""
    name, sep, value = text.partition("=")
    if not sep or not value:
        raise InitError(f"{option} {text!r}: write NAME=VALUE, e.g. {option} bank=data/bank.csv")
    if not is_party_id(name):
        raise InitError(f"{option} {text!r}: {name!r} is not a valid party id (1-64 of A-Z a-z 0-9 _ . -, starting "
                        "with a letter or digit)")
    return name, value


def init_run(
    out: str | Path,
    *,
    label_holder: str,
    data_holders: list[str] | tuple[str, ...],
    label_column: str,
    id_column: str = "id",
    id_columns: list[str] | tuple[str, ...] = (),
    task: str | None = None,
    epochs: int = 20,
    batch_size: int = 32,
    window: int = 1,
    lr: float = 0.01,
    overwrite: bool = False,
    segment_holders: list[str] | tuple[str, ...] = (),
) -> InitResult:
    """Check the tables and write the configs and keys. ``label_holder`` and each of ``data_holders`` is
    ``NAME=CSV``; ``id_columns`` ``NAME=COLUMN`` for a party whose ID column is not ``id_column``;
    ``segment_holders`` ``NAME=INPUT,INPUT...`` for a segment chain (a node with a model segment and no table, fed
    by those data holders or segment holders)."""
    out = Path(out)
    parties = _parties(label_holder, data_holders, id_column, id_columns)
    lh, dhs = parties[0], parties[1:]
    segments = _segments(segment_holders, [p.name for p in parties])
    existing = sorted(p.name for p in out.glob("*.toml")) if out.is_dir() else []
    if existing and not overwrite:
        raise InitError(f"{out} already holds node configs ({', '.join(existing)}): choose another folder, or pass "
                        "--overwrite to replace them (keys are kept)")

    lh_table = _load(lh, label_column)
    if task is None:
        task, why = infer_task(lh_table.labels)
    else:
        why = "--task"
    try:
        _, encoding = encode_labels(lh_table.labels, task)
    except DataError as exc:
        raise InitError(f"{lh.path}: label column {label_column!r}: {exc} (choose another --task?)") from None
    tables = {lh.name: lh_table, **{p.name: _load(p, None) for p in dhs}}
    for p in dhs:
        if tables[p.name].n_features == 0:
            raise InitError(f"{p.path}: no feature columns besides the ID column {p.id_column!r}: a data holder "
                            "brings features")
    shared = _shared_ids(parties, tables)

    outputs = len(encoding.classes) if task == "multiclass" else 1
    opt = {"kind": "adam", "lr": lr}
    bottom = {"widths": [HIDDEN, CUT_WIDTH]}
    lh_model: dict = {"top": {"widths": [HIDDEN, outputs]}, "seed": 0}
    lh_data: dict = {"path": _relative(lh.path, out), "id_column": lh.id_column, "label_column": label_column}
    if lh_table.n_features:
        lh_model = {"bottom": bottom, **lh_model}
        lh_data["standardize"] = True
    else:
        lh_data["features"] = []
    sections = {
        lh.name: {"model": lh_model,
                  "train": {"task": task, "epochs": epochs, "validation_fraction": 0.2, "seed": 0, "optimizer": opt,
                            "output": "model"}},
        **{p.name: {"model": {"bottom": bottom, "seed": i + 1}, "train": {"optimizer": opt, "output": "model"}}
           for i, p in enumerate(dhs)},
        **{name: {"model": {"segment": {"widths": [HIDDEN, CUT_WIDTH]}, "seed": len(dhs) + i + 1},
                  "train": {"optimizer": opt, "output": "model"}} for i, name in enumerate(segments)},
    }
    data = {lh.name: lh_data,
            **{p.name: {"path": _relative(p.path, out), "id_column": p.id_column, "standardize": True} for p in dhs}}
    widths = {p.name: CUT_WIDTH for p in dhs}
    model = model_name("init", sections, widths, segments)
    configs = prepare_session(
        out, data_holders=[p.name for p in dhs], label_holder=lh.name, run=_run_id(out), cut_widths=widths,
        batch_size=batch_size, window=window, model=model, data=data, psi={"workers": 0}, tables=sections,
        link_check={"rounds": 0}, comments=True, segments=segments or None,
    )
    return InitResult(
        out=out, configs=configs, task=task, why=why, shared=shared,
        rows={name: t.n_rows for name, t in tables.items()},
        features={name: t.n_features for name, t in tables.items()},
        segments={name: tuple(spec["inputs"]) for name, spec in segments.items()},
    )


def infer_task(labels: np.ndarray) -> tuple[str, str]:
    """The task the label column suggests, and why: two distinct values are binary; numbers with a fraction, or
    integers with more than ``MAX_CLASSES`` values, are a regression target; anything else is multiclass."""
    values = labels.tolist()
    distinct = set(values)
    if len(distinct) < 2:
        raise InitError(f"the label column has {len(distinct)} distinct value: nothing to learn")
    if len(distinct) == 2:
        return "binary", "2 distinct label values; --task to override"
    if labels.dtype.kind == "f" and any(not float(v).is_integer() for v in distinct):
        return "regression", "labels are numbers with fractions; --task to override"
    if labels.dtype.kind in "iuf" and len(distinct) > MAX_CLASSES:
        return "regression", f"{len(distinct)} distinct numeric labels (> {MAX_CLASSES}); --task to override"
    return "multiclass", f"{len(distinct)} distinct label values; --task to override"


def _parties(label_holder: str, data_holders, id_column: str, id_columns) -> list[Party]:
    """The label holder, then the data holders, each with its table's absolute path and its ID column."""
    if not data_holders:
        raise InitError("name at least one data holder: --data-holder NAME=CSV")
    pairs = [parse_assignment(label_holder, "--label-holder")]
    pairs += [parse_assignment(d, "--data-holder") for d in data_holders]
    names = [name for name, _ in pairs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InitError(f"party {repeated[0]!r} is named more than once: every party needs its own name")
    columns = dict(parse_assignment(c, "--id-column-of") for c in id_columns)
    unknown = sorted(set(columns) - set(names))
    if unknown:
        raise InitError(f"--id-column-of {unknown[0]}=...: no party {unknown[0]!r} (parties: {', '.join(names)})")
    parties = []
    for name, value in pairs:
        path = Path(value).resolve()
        if not path.is_file():
            raise InitError(f"{value}: no such file (the table of party {name!r})")
        parties.append(Party(name, path, columns.get(name, id_column)))
    return parties


def _segments(specs, parties: list[str]) -> dict[str, dict]:
    """``--segment-holder NAME=INPUT,INPUT...`` as prepare_session's segments (each of width ``CUT_WIDTH``), checked
    as every node will check the session config: known inputs, each an input of one segment at most, no cycle."""
    segments: dict[str, dict] = {}
    for text in specs:
        name, value = parse_assignment(text, "--segment-holder")
        if name in parties or name in segments:
            raise InitError(f"--segment-holder {text!r}: party {name!r} is named more than once: every party needs "
                            "its own name")
        inputs = [p.strip() for p in value.split(",")]
        if parties[0] in inputs:
            raise InitError(f"--segment-holder {text!r}: the label holder {parties[0]!r} feeds no segment holder; "
                            "list data holders or segment holders")
        segments[name] = {"inputs": inputs, "width": CUT_WIDTH, "combine": "concat"}
    problem = chain_problem(dict.fromkeys(parties[1:], CUT_WIDTH),
                            {n: Segment(tuple(s["inputs"]), s["width"], s["combine"]) for n, s in segments.items()},
                            MAX_CUT_WIDTH)
    if problem:
        raise InitError(f"--segment-holder: {problem}")
    return segments


def _load(party: Party, label_column: str | None):
    """The party's table as its node will read it; a missing column names the file, the column and what it has."""
    try:
        return load_table(TableSpec(party.path, party.id_column, label_column=label_column))
    except DataError as exc:
        hint = "--id-column / --id-column-of" if f"no column {party.id_column!r}" in str(exc) else None
        if label_column is not None and f"no column {label_column!r}" in str(exc):
            hint = "--label-column"
        raise InitError(f"party {party.name!r}: {exc}" + (f" (set {hint})" if hint else "")) from None


def _shared_ids(parties: list[Party], tables: dict) -> int:
    """How many IDs every table holds, compared as the PSI compares them (a text ID ``7`` is not the integer 7).
    A duplicated ID, or no shared ID at all, is an error now rather than after the nodes have started."""
    shared: set[bytes] | None = None
    for p in parties:
        try:
            items = encode_ids(tables[p.name].ids)
        except InvalidIdError as exc:
            raise InitError(f"{p.path}: column {p.id_column!r}: {exc}") from None
        ids = set(items)
        if len(ids) != len(items):
            twice = next(k for k, c in Counter(items).items() if c > 1)
            raise InitError(f"{p.path}: column {p.id_column!r} holds ID {twice[2:].decode('utf-8', 'replace')!r} "
                            "more than once: one row per ID (or set [psi].dedupe = true in the config afterwards)")
        shared = ids if shared is None else shared & ids
    if not shared:
        listing = ", ".join(f"{p.path.name} column {p.id_column!r}" for p in parties)
        raise InitError(f"no ID is in every party's table ({listing}): check the ID columns (a text ID '007' is "
                        "not the integer 7)")
    return len(shared)


def _relative(path: Path, out: Path) -> str:
    """``path`` relative to the config folder, so the folder can be moved together with the data."""
    return Path(os.path.relpath(path, out.resolve())).as_posix()


def _run_id(out: Path) -> str:
    """The run id: the folder's name, made a valid party id."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", out.resolve().name)[:64].lstrip("_.-")
    return name or "run"
