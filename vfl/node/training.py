"""The node's side of training: build this party's segment over its aligned rows, and save what training produced.

Called by the runner when the PSI phase hands over the aligned rows. Everything that can be checked without the
peers (the table, the model spec against the data) is checked at start-up by ``check_segment``, before any network
activity, so a wrong column or width is one line and exit 2, not a failure an hour into a run.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..protocol.training_phase import TrainPlan
from ..train.central import OptimizerSpec, make_schedule
from ..train.data import DataError, LabelEncoding, PartyTable, Standardizer, encode_labels
from ..train.models import Combiner, ModelError, build_model
from .checkpoints import Checkpointer
from .config import NodeConfig
from .segments import TorchBottom, TorchTop


def checkpointer(cfg: NodeConfig) -> Checkpointer:
    return Checkpointer(cfg.train.checkpoint_dir, cfg.party, cfg.run, cfg.session.model)


class TrainingSetupError(Exception):
    """This party's data and model settings do not fit together. One line for the user."""


def _output_width(task: str, n_classes: int) -> int:
    return n_classes if task == "multiclass" else 1


def _standardized(features: np.ndarray, train_rows: np.ndarray | None, enabled: bool) -> np.ndarray:
    if not enabled or features.shape[1] == 0:
        return features
    fit_on = features if train_rows is None else features[train_rows]
    return Standardizer.fit(fit_on).transform(features)


class PreparedBottom(TorchBottom):
    """A bottom whose features are standardised on its own training rows once the schedule names them."""

    def __init__(self, *args, standardize: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.standardize = standardize

    def prepare(self, train_rows: np.ndarray) -> None:
        if self.standardize:
            if not hasattr(self, "_raw"):
                self._raw = self.features.numpy()
            self.features = torch.from_numpy(_standardized(self._raw, train_rows, True))


def build_bottom(cfg: NodeConfig, table: PartyTable, rows: np.ndarray) -> PreparedBottom:
    t = cfg.train
    width = cfg.session.cut_widths[cfg.party]
    features = table.features[rows]
    try:
        model = build_model(features.shape[1], t.bottom.get("factory", t.bottom), out_features=width, seed=t.seed)
    except ModelError as exc:
        raise TrainingSetupError(f"[model].bottom: {exc}") from None
    optimizer = OptimizerSpec.from_dict(t.optimizer).build(model.parameters())
    return PreparedBottom(model, optimizer, features, checkpointer(cfg), standardize=cfg.data.standardize)


def check_segment(cfg: NodeConfig, table: PartyTable) -> None:
    """Build the segment once on the whole table to catch spec/data mismatches before connecting."""
    if cfg.is_label_holder:
        build_top(cfg, table, np.arange(min(table.n_rows, 2)), TrainPlan(np.empty(0, np.int64), []))
    else:
        if table.n_features == 0:
            raise TrainingSetupError(f"{table.path}: no feature columns for the bottom model")
        build_bottom(cfg, table, np.arange(min(table.n_rows, 2)))


def build_top(cfg: NodeConfig, table: PartyTable, rows: np.ndarray, plan: TrainPlan) -> TorchTop:
    t = cfg.train
    try:
        targets, encoding = encode_labels(table.labels, t.task)
    except (DataError, ValueError) as exc:
        raise TrainingSetupError(f"{table.path}: label column {table.label_column!r}: {exc}") from None
    widths = dict(cfg.session.cut_widths)
    own = None
    if t.bottom is not None:
        if table.n_features == 0:
            raise TrainingSetupError(f"[model].bottom is set but {table.path} has no feature columns besides the label")
        own_width = t.bottom["widths"][-1] if "widths" in t.bottom else None
        if own_width is None:
            raise TrainingSetupError("[model].bottom of the label holder must be an MLP table (widths = [...])")
        widths[cfg.party] = own_width
        train_rows = None if plan is None else np.setdiff1d(np.arange(len(rows)), plan.validation)
        features = _standardized(table.features[rows], train_rows, cfg.data.standardize)
        try:
            model = build_model(features.shape[1], t.bottom, out_features=own_width, seed=t.seed)
        except ModelError as exc:
            raise TrainingSetupError(f"[model].bottom: {exc}") from None
        own = TorchBottom(model, OptimizerSpec.from_dict(t.optimizer).build(model.parameters()), features)
    order = sorted(widths)
    try:
        combiner = Combiner([widths[p] for p in order], t.combine)
    except ValueError as exc:
        raise TrainingSetupError(f"[model].combine: {exc}") from None
    out_width = _output_width(t.task, encoding.n_classes)
    try:
        top = build_model(combiner.out_features, t.top.get("factory", t.top), out_features=out_width, seed=t.seed + 1)
    except ModelError as exc:
        raise TrainingSetupError(f"[model].top: {exc} (the {t.task} task needs {out_width} output(s))") from None
    return TorchTop(
        top=top,
        optimizer=OptimizerSpec.from_dict(t.optimizer).build(top.parameters()),
        combiner=combiner,
        order=order,
        task=t.task,
        targets=targets[rows],
        own=own,
        own_name=cfg.party if own is not None else None,
        checkpointer=checkpointer(cfg),
    )


def make_plan(cfg: NodeConfig, n_rows: int) -> TrainPlan:
    t = cfg.train
    schedule = make_schedule(n_rows, cfg.session.batch_size, t.epochs, t.schedule_seed, t.validation_fraction)
    return TrainPlan(
        validation=schedule.validation,
        epoch_orders=[np.concatenate(e) for e in schedule.epochs],
        checkpoint_every=t.checkpoint_every,
    )


def label_encoding(cfg: NodeConfig, table: PartyTable) -> LabelEncoding:
    return encode_labels(table.labels, cfg.train.task)[1]


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_segment(cfg: NodeConfig, state: dict, extra: dict | None = None) -> Path | None:
    """This party's trained segment (and nothing of anyone else's) as ``OUTPUT/PARTY-segment.pt``."""
    if cfg.train.output is None:
        return None
    path = cfg.train.output / f"{cfg.party}-segment.pt"
    payload = {"party": cfg.party, "run": cfg.run, "model": cfg.session.model, **state, **(extra or {})}
    _atomic_write(path, lambda tmp: torch.save(payload, tmp))
    return path


def append_metrics(cfg: NodeConfig, metrics: dict) -> None:
    """One JSON line per epoch in ``OUTPUT/metrics.jsonl`` (label holder)."""
    if cfg.train.output is None:
        return
    cfg.train.output.mkdir(parents=True, exist_ok=True)
    with open(cfg.train.output / "metrics.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps(metrics, sort_keys=True) + "\n")
