"""The node's side of training: build this party's segment over its aligned rows, and save what training produced.

Called by the runner when the PSI phase hands over the aligned rows. Everything that can be checked without the
peers (the table, the model spec against the data) is checked at start-up by ``check_segment``, before any network
activity, so a wrong column or width is one line and exit 2, not a failure an hour into a run.

Reproducibility: the PSI's agreed row order is sorted by tokens of fresh keys, so it is a new permutation in every
run. The label holder therefore draws its schedule (``make_plan``) over a *canonical* order of the aligned rows, the
order of a keyed hash of its own IDs (``canonical_order``), and maps it back to aligned row positions before anything
is sent: the same IDs, seed and run id give the same split and batches in every run. The hash never
leaves the node; the wire carries row positions, as before. Standardisation is fitted on the training rows in file
order, and dropout is reseeded every step from ``[model].seed`` (``dropout_seed``), so a rerun gives the same model.
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import hmac
import json
import logging
from pathlib import Path

import numpy as np
import torch

from ..files import PRIVATE, atomic_write, atomic_write_bytes
from ..psi import encode_ids
from ..protocol.events import Finished, Output
from ..protocol.training_phase import BestEpoch, CheckpointError, TrainPlan
from ..train.central import OptimizerSpec, make_schedule
from ..train.data import DataError, LabelEncoding, PartyTable, Standardizer, encode_labels
from ..train.models import Combiner, ModelError, build_model, load_weights
from .checkpoints import Checkpointer, StateFileError, dump_state, load_state, remove_stale_temps
from .lifecycle import METRICS, StartMode, data_holder_check, label_holder_start, run_files, set_aside, trim_metrics
from .alignment import PartyIds
from .background import TICK_S, Abandoned, in_background
from .config import NodeConfig, TrainingSetupError
from ..train.segments import TorchBottom, TorchTop, label_dp_targets


def checkpointer(cfg: NodeConfig) -> Checkpointer:
    return Checkpointer(cfg.train.checkpoint_dir, cfg.party, cfg.run, cfg.session.model)


def _output_width(task: str, n_classes: int) -> int:
    return n_classes if task == "multiclass" else 1


def _standardizer(features, train_rows: np.ndarray, enabled: bool) -> Standardizer | None:
    """Fitted on this party's own training rows (rows of its file); None when standardisation is off.

    The rows are taken in file order, so the fit (a float sum) does not depend on the run's aligned order; read a
    block at a time (``Standardizer.fit``), so a table on disk stays there."""
    if not enabled or features.shape[1] == 0:
        return None
    return Standardizer.fit(features, np.sort(np.asarray(train_rows)))


class PreparedBottom(TorchBottom):
    """A bottom whose features are standardised on its own training rows once the schedule names them (the scaler
    is applied to each batch as it is read: ``TorchBottom.scaler``)."""

    def __init__(self, model, optimizer, features, *args, standardize: bool, **kwargs):
        super().__init__(model, optimizer, features, *args, **kwargs)
        self.source = features  # the raw rows (RAM or the feature file) the scaler is fitted on
        self.standardize = standardize
        self.frozen = False  # prediction: the trained segment's scaler applies, nothing is fitted again
        #: called with the SCHEDULE's ``first_step`` before anything is restored (``SessionTraining`` checks it
        #: against ``--fresh``/``--resume``); may raise ``CheckpointError``
        self.begin = None

    @property
    def wants_train_rows(self) -> bool:
        """Does :meth:`prepare` fit anything? If not, the pipeline does not build the n-row array of training rows."""
        return self.standardize and not self.frozen

    def prepare(self, train_rows: np.ndarray) -> None:
        if self.wants_train_rows:
            file_rows = np.asarray(train_rows) if self.rows is None else self.rows.numpy()[train_rows]
            self.scaler = _standardizer(self.source, file_rows, True)

    def use_scaler(self, scaler: Standardizer | None) -> None:
        """Prediction: standardise with the scaler the segment was trained with."""
        self.frozen, self.scaler = True, scaler

    def state(self) -> dict:
        out = super().state()
        if self.scaler is not None:
            out["scaler"] = self.scaler.to_dict()  # needed to use the segment on new rows
        return out


def release_heap() -> None:
    """Hand the memory the PSI freed back to the system before training starts.

    glibc's malloc keeps freed memory in its arenas unless asked: after a 1M-row PSI that is about 100 MiB of this
    process's anonymous memory that training never uses (bench/train.py, ``rss_above_import_floor_mb``). Only where
    there is a glibc (``malloc_trim``); elsewhere a garbage collection only."""
    gc.collect()
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


def dropout_seed(cfg: NodeConfig) -> int:
    """The base of this party's per-step dropout seeds: from ``[model].seed`` and the party id (parties differ)."""
    digest = hashlib.sha256(b"vfl dropout\0%d\0" % cfg.train.seed + cfg.party.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def build_bottom(cfg: NodeConfig, table: PartyTable, rows: np.ndarray) -> PreparedBottom:
    t = cfg.train
    width = cfg.session.cut_widths[cfg.party]
    features = table.features  # the whole table (in RAM or the feature file), not a copy: read through ``rows``
    try:
        model = build_model(features.shape[1], t.bottom.get("factory", t.bottom), out_features=width, seed=t.seed)
    except ModelError as exc:
        raise TrainingSetupError(f"[model].bottom: {exc}") from None
    optimizer = OptimizerSpec.from_dict(t.optimizer).build(model.parameters())
    return PreparedBottom(
        model,
        optimizer,
        features,
        checkpointer(cfg),
        dropout_seed=dropout_seed(cfg),
        standardize=cfg.data.standardize,
        rows=rows,
    )


def check_segment(cfg: NodeConfig, table: PartyTable) -> None:
    """Build the segment once on the whole table to catch spec/data mismatches before connecting."""
    rows = np.arange(min(table.n_rows, 2))
    if cfg.is_label_holder:
        encoding = trained_encoding(cfg) if cfg.session.predict else None
        segment = build_top(cfg, table, rows, TrainPlan(np.empty(0, np.int64), []), encoding)
    else:
        if table.n_features == 0:
            raise TrainingSetupError(f"{table.path}: no feature columns for the bottom model")
        segment = build_bottom(cfg, table, rows)
    if cfg.session.predict:
        load_trained(cfg, segment)


def build_top(
    cfg: NodeConfig, table: PartyTable, rows: np.ndarray, plan: TrainPlan, encoding: LabelEncoding | None = None
) -> TorchTop:
    """The label holder's segment; for prediction (no labels) ``encoding`` comes from the trained segment file."""
    t = cfg.train
    if encoding is None:
        try:
            targets, encoding = encode_labels(table.labels, t.task)
        except (DataError, ValueError) as exc:
            raise TrainingSetupError(f"{table.path}: label column {table.label_column!r}: {exc}") from None
    else:
        targets = np.zeros(table.n_rows, dtype=np.int64 if t.task == "multiclass" else np.float32)
    privacy = cfg.session.privacy
    trained_on = targets  # label_dp: randomised once, over the whole table in file order (the same every run)
    if not cfg.session.predict:
        trained_on = label_dp_targets(privacy, targets, encoding.n_classes, t.seed)
    widths = cfg.session.chain.input_widths(None)  # the parties that feed the label holder (v1.10: a segment holder)
    own = None
    if t.bottom is not None:
        if table.n_features == 0:
            raise TrainingSetupError(f"[model].bottom is set but {table.path} has no feature columns besides the label")
        own_width = t.bottom["widths"][-1] if "widths" in t.bottom else None
        if own_width is None:
            raise TrainingSetupError("[model].bottom of the label holder must be an MLP table (widths = [...])")
        widths[cfg.party] = own_width
        own_scaler = None
        if plan is not None:  # prediction (plan None): the trained segment's scaler is applied by load_trained
            train_rows = np.setdiff1d(np.arange(len(rows)), plan.validation)
            own_scaler = _standardizer(table.features, np.asarray(rows)[train_rows], cfg.data.standardize)
        features = table.features
        try:
            model = build_model(features.shape[1], t.bottom, out_features=own_width, seed=t.seed)
        except ModelError as exc:
            raise TrainingSetupError(f"[model].bottom: {exc}") from None
        own = TorchBottom(model, OptimizerSpec.from_dict(t.optimizer).build(model.parameters()), features,
                          dropout_seed=None, rows=rows)  # its forward runs inside the top's step, which seeds it
        own.scaler = own_scaler
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
    cls = PredictingTop if cfg.session.predict else TorchTop
    segment = cls(
        top=top,
        optimizer=OptimizerSpec.from_dict(t.optimizer).build(top.parameters()),
        combiner=combiner,
        order=order,
        task=t.task,
        targets=trained_on[rows],
        own=own,
        own_name=cfg.party if own is not None else None,
        checkpointer=checkpointer(cfg),
        dropout_seed=dropout_seed(cfg),
        privacy=privacy,
        audit=cfg.audit and not cfg.session.predict,
        true_targets=targets[rows],
        privacy_seed=t.seed,
        gradient_precision=cfg.session.gradient_precision,
        n_classes=encoding.n_classes,
    )
    segment.label_encoding = encoding
    segment.own_scaler = own_scaler if own is not None else None
    return segment


class PredictingTop(TorchTop):
    """The top of a prediction session: keeps every output by row instead of scoring it against labels."""

    predictions: dict

    def eval_batch(self, epoch: int, rows: np.ndarray, activations) -> None:
        if not hasattr(self, "predictions"):
            self.predictions = {}
        for row, out in zip(np.asarray(rows).tolist(), self.predict(rows, activations)):
            self.predictions[row] = out

    def end_epoch(self, epoch: int) -> dict[str, float]:
        return {"predicted_rows": float(len(getattr(self, "predictions", {})))}


def segment_path(cfg: NodeConfig) -> Path:
    return cfg.train.output / f"{cfg.party}-segment.pt"


def load_trained(cfg: NodeConfig, segment, path: Path | None = None) -> None:
    """Put the weights of this party's trained segment (written by its training run) into ``segment``."""
    path = path or segment_path(cfg)
    state = read_segment(path)
    if state.get("vfl_party") != cfg.party or state.get("vfl_model") != cfg.session.model:
        raise TrainingSetupError(
            f"{path} is party {state.get('vfl_party')!r}'s segment for model {state.get('vfl_model')!r}, not this node's"
        )
    what = f"the trained segment {path}"
    try:
        if isinstance(segment, TorchTop):
            load_weights(segment.top, state, what, "top")
            if segment.own is not None:
                load_weights(segment.own.model, state, what, "own", "model")
                if "own_scaler" in state:
                    segment.own.scaler = Standardizer.from_dict(state["own_scaler"])
        else:
            load_weights(segment.model, state, what, "model")
            segment.use_scaler(Standardizer.from_dict(state["scaler"]) if "scaler" in state else None)
    except ModelError as exc:
        raise TrainingSetupError(
            f"party {cfg.party!r}: {path} does not fit the model in this config: {exc}. This party's data or [model] "
            "changed since that segment was trained: put them back, or train again"
        ) from None


def trained_encoding(cfg: NodeConfig, path: Path | None = None) -> LabelEncoding:
    path = path or segment_path(cfg)
    state = read_segment(path)
    try:
        return LabelEncoding.from_dict(state["labels"])
    except (KeyError, TypeError) as exc:
        raise TrainingSetupError(f"cannot read the label encoding from {path}: {exc}") from None


def read_segment(path: Path) -> dict:
    """A trained segment file's content: loaded with ``weights_only=True`` and checked against its digest."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TrainingSetupError(f"cannot read the trained segment {path}: {exc.strerror or exc}") from None
    try:
        return load_state(data, path)
    except StateFileError as exc:
        raise TrainingSetupError(
            f"{exc}; use the {Path(path).name} this party's training run wrote (or train again)"
        ) from None


def prediction_plan(n_rows: int) -> TrainPlan:
    """One epoch without training rows whose 'validation' is every aligned row: forward passes only."""
    return TrainPlan(
        validation=np.arange(n_rows, dtype=np.int64), epoch_orders=[np.empty(0, dtype=np.int64)], checkpoints=False
    )


def write_predictions(path: Path, ids: list, aligned: np.ndarray, top: "PredictingTop") -> int:
    """``id, prediction`` (+ class probabilities / score) for every aligned row, atomically; returns the row count."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    enc, task = top.label_encoding, top.task
    rows = sorted(top.predictions)
    outs = np.stack([top.predictions[r] for r in rows]) if rows else np.empty((0, 1), np.float32)
    columns = {"id": pa.array([ids[int(aligned[r])] for r in rows])}
    if task == "multiclass":
        probs = torch.softmax(torch.from_numpy(outs), dim=1).numpy()
        columns["prediction"] = pa.array([enc.classes[int(k)] for k in probs.argmax(1)])
        for k, cls in enumerate(enc.classes):
            columns[f"p_{cls}"] = pa.array(probs[:, k])
    elif task == "binary":
        p1 = torch.sigmoid(torch.from_numpy(outs[:, 0])).numpy()
        columns["prediction"] = pa.array([enc.classes[int(v >= 0.5)] for v in p1])
        columns["probability"] = pa.array(p1)
    else:
        columns["prediction"] = pa.array(outs[:, 0])
    table = pa.table(columns)
    atomic_write(path, lambda tmp: pacsv.write_csv(table, tmp), mode=PRIVATE)  # raw IDs: owner only
    return len(rows)


def schedule_key(seed: int, run: str) -> bytes:
    """The HMAC key of the canonical order: from the label holder's ``[train].seed`` and the run id."""
    return hashlib.sha256(b"vfl schedule order\0%d\0" % seed + run.encode("utf-8")).digest()


def canonical_order(ids: list, seed: int, run: str) -> np.ndarray:
    """The aligned rows in canonical order: ``order[c]`` is the aligned position of canonical row ``c``.

    ``ids[i]`` is the ID of aligned row ``i``. Rows are sorted by HMAC-SHA256(``schedule_key(seed, run)``, the ID's
    PSI encoding), which does not depend on the PSI's keys: the same IDs give the same order in every run. The
    hashes stay in this process (about 1 s per million IDs)."""
    key = schedule_key(seed, run)
    digests = b"".join(hmac.digest(key, item, "sha256") for item in encode_ids(ids))
    words = np.frombuffer(digests, dtype=">u8").reshape(len(ids), 4)
    return np.lexsort(words.T[::-1]).astype(np.int64)  # by the 256-bit digest, most significant word first


def make_plan(cfg: NodeConfig, aligned_ids: list) -> TrainPlan:
    """The label holder's schedule of its aligned rows (``aligned_ids[i]`` is the ID of aligned row ``i``).

    ``[train].seed`` draws the split and every epoch's permutation (``make_schedule``) over canonical positions
    (``canonical_order``), which are then mapped onto aligned row positions: the same IDs give the same batches in
    every run, whatever order the PSI agreed. Validation rows stay in canonical order, so the evaluation batches are
    the same rows in every run too."""
    t = cfg.train
    order = canonical_order(aligned_ids, t.schedule_seed, cfg.run)  # canonical position -> aligned position
    schedule = make_schedule(len(aligned_ids), cfg.session.batch_size, t.epochs, t.schedule_seed,
                             t.validation_fraction)
    return TrainPlan(
        validation=order[np.asarray(schedule.validation, dtype=np.int64)],
        epoch_orders=[order[np.concatenate(e)] if e else np.empty(0, np.int64) for e in schedule.epochs],
        checkpoint_every=t.checkpoint_every,
        keep=t.keep,
        patience=t.patience,
    )


def label_encoding(cfg: NodeConfig, table: PartyTable) -> LabelEncoding:
    return encode_labels(table.labels, cfg.train.task)[1]


def save_segment(cfg: NodeConfig, state: dict, extra: dict | None = None) -> Path:
    """This party's trained segment (and nothing of anyone else's) as ``OUTPUT/PARTY-segment.pt``."""
    path = segment_path(cfg)
    payload = {**state, **(extra or {}), "vfl_party": cfg.party, "vfl_run": cfg.run, "vfl_model": cfg.session.model}
    remove_stale_temps(path.parent, path.name)  # an earlier process of this party killed while saving it
    atomic_write_bytes(path, dump_state(payload), mode=PRIVATE)  # model state: owner only; digest inside
    return path


def append_metrics(cfg: NodeConfig, metrics: dict) -> None:
    """One JSON line per epoch in ``OUTPUT/metrics.jsonl`` (label holder); an epoch trained again (a rollback to a
    checkpoint in an epoch already recorded) first drops the lines of that epoch and later ones: one line per epoch."""
    cfg.train.output.mkdir(parents=True, exist_ok=True)
    trim_metrics(cfg.train.output / METRICS, metrics["epoch"] - 1)
    with open(cfg.train.output / METRICS, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(metrics, sort_keys=True) + "\n")


#: (metrics key, short name in the log) of the audit's figures, each a map party -> value (``TorchTop.end_epoch``)
LEAK_FIGURES = (("leak_auc_norm", "norm"), ("leak_auc_direction", "dir"), ("leak_attack_accuracy", "attack"))


def leak_text(metrics: dict) -> str:
    """The audit's figures of one epoch, compactly: ``leak dh1 norm 0.97 dir 0.99, dh2 norm 0.71 dir 0.80``."""
    parties = sorted({p for key, _ in LEAK_FIGURES if isinstance(metrics.get(key), dict) for p in metrics[key]})
    shown = [" ".join([p] + [f"{name} {metrics[key][p]:.2f}" for key, name in LEAK_FIGURES
                             if isinstance(metrics.get(key), dict) and p in metrics[key]]) for p in parties]
    return "leak " + ", ".join(shown) if shown else ""


def privacy_line(cfg: NodeConfig) -> str:
    """Which defence this training runs with, as every node logs it at the start: it is in the session config (so
    in its digest, which every party's HELLO/WELCOME carries), hence the same at every node."""
    spec = cfg.session.privacy
    audit = ""
    if cfg.is_label_holder:
        audit = "; label-leakage audit " + ("on" if cfg.audit else "off ([privacy].audit = false)")
    return (f"privacy: {spec.describe()} — from the session config (digest {cfg.session.digest[:16]}){audit}")


#: exit code of a training (or prediction) session stopped before it finished, e.g. by SIGINT/SIGTERM
INTERRUPTED = 5


class SessionTraining:
    """This party's training (or prediction) in one session: the glue between the node loop and the torch segment.

    The runner hands it the aligned rows (``start``), each epoch's metrics (``epoch_done``) and the machine's final
    ``Finished`` (``finish``); it builds the segment, starts the machine's training phase, resumes from the latest
    checkpoint, and saves what a successful session produced (the trained segment, or the predictions).
    """

    def __init__(self, cfg: NodeConfig, ids: PartyIds, log: logging.Logger, start: StartMode = StartMode.AUTO):
        """``start``: the command line's ``--fresh``/``--resume`` (``lifecycle``); a prediction always starts afresh."""
        self.cfg = cfg
        self.ids = ids
        self.log = log
        self.start_mode = StartMode(start)
        self.manifest: dict | None = None  # label holder: the checkpoint to resume from (``check``), or None
        self._scheduled = False  # data holder: the first SCHEDULE has been checked against ``start_mode``
        self.segment: TorchBottom | TorchTop | None = None  # built over the aligned rows by ``start``
        self.aligned: np.ndarray | None = None  # the label holder's aligned rows, for the predictions file
        self.machine = None  # the role machine whose training this is (``start``)
        self._clock = None  # ``start``'s clock

    def check(self) -> None:
        """Before connecting: torch's thread count, and the model spec against this party's data."""
        torch.set_num_threads(self.cfg.train.threads)
        check_segment(self.cfg, self.ids.table)
        if self.cfg.session.predict:
            return
        if self.cfg.is_label_holder:  # resume, start afresh, or refuse a finished run: decided before connecting
            self.manifest = label_holder_start(self.cfg, self.start_mode, self.log)
        else:
            data_holder_check(self.cfg, self.start_mode)

    def start(self, machine, rows: np.ndarray, now: float, clock=None, tick=None) -> list[Output]:
        """Build the segment over the aligned ``rows`` and start ``machine``'s training phase with it.

        A model that cannot be built or a checkpoint that cannot be resumed ends the session (exit 1) naming why.
        ``clock`` (the runner's ``time.monotonic``): read again once the segment is built, so the training phase's
        clock (its step time) starts when training does, not before the heap release, the model build and a resume.
        ``tick`` (the runner's keep-alive): the segment is then built on a thread while ``tick()`` runs every
        ``TICK_S`` on this one (heartbeats, queued messages). At 10M rows the label holder's schedule alone takes
        about 40 s, longer than a peer would wait for a node that sends nothing. ``tick`` raising ``Abandoned`` (the
        node was stopped meanwhile) leaves the machine as it was: the caller closes it.
        """
        self.machine = machine
        self._clock = clock
        try:
            if tick is None:
                begin = self._prepare(rows)
            else:
                begin = in_background(lambda: self._prepare(rows), tick, TICK_S)
            return begin(machine, self._now(now))
        except Abandoned:
            return []
        except CheckpointError as exc:
            reason = f"cannot resume: {exc}"
        except TrainingSetupError as exc:
            reason = f"cannot build this party's model: {exc}"
        self.log.error("%s", reason)
        return machine.finish_aligned(False, reason, now)

    def _prepare(self, rows: np.ndarray):
        """Everything before the machine's training phase starts, without touching the machine (it may run on a
        thread): returns ``begin(machine, now)``, which starts it."""
        cfg, table = self.cfg, self.ids.table
        release_heap()
        if not cfg.session.predict:
            self.log.info("%s", privacy_line(cfg))
        self.log.info("cut-layer precision: %s", cfg.session.precision.describe())  # v1.6, the same at every node
        if not cfg.is_label_holder:
            segment = self.segment = build_bottom(cfg, table, rows)
            if cfg.session.predict:
                load_trained(cfg, segment)
            else:
                segment.begin = self._check_schedule
            return lambda machine, now: machine.start_training(segment, len(rows), now)
        if cfg.session.predict:
            self.aligned = rows
            segment = self.segment = build_top(cfg, table, rows, None, trained_encoding(cfg))
            load_trained(cfg, segment)
            self.log.info("predicting %d aligned rows", len(rows))
            return lambda machine, now: machine.start_training(segment, prediction_plan(len(rows)), now)
        plan = make_plan(cfg, [table.ids[r] for r in np.asarray(rows).tolist()])
        segment = self.segment = build_top(cfg, table, rows, plan)
        self.log.info(
            "training on %d aligned rows (%d for validation), %d epoch(s), window %s",
            len(rows), len(plan.validation), plan.epochs, cfg.session.window,
        )
        first_step, digests, best = 0, {}, None
        manifest = self.manifest
        if manifest is not None and manifest["step"] > 0:  # this run was interrupted: resume it
            first_step = manifest["step"]
            digests = {p: d for p, d in manifest["digests"].items() if p}
            best = BestEpoch.from_dict(manifest["best"]) if "best" in manifest else None
            segment.restore(first_step)
            self.log.warning("resuming from the checkpoint at step %d (epoch %d)", first_step, manifest["epoch"] + 1)
        if manifest is not None:  # the epoch of the checkpoint is trained again: its line (and later ones) go
            trim_metrics(cfg.train.output / METRICS, manifest["epoch"])
        if cfg.train.keep == "best" or cfg.train.patience:
            what = "the epoch with the lowest validation loss" if cfg.train.keep == "best" else "the last epoch"
            stop = f"; stopping after {cfg.train.patience} epoch(s) without a lower one" if cfg.train.patience else ""
            self.log.info("keeping %s%s", what, stop)
        return lambda machine, now: machine.start_training(segment, plan, now, first_step, digests, best)

    def _now(self, now: float) -> float:
        return self._clock() if self._clock is not None else now

    def _check_schedule(self, first_step: int) -> None:
        """Data holder: the label holder's first SCHEDULE says where the run starts; it must match ``--fresh`` /
        ``--resume``. A mismatch ends the session naming both sides, before this party's files change."""
        if self._scheduled:
            return  # a rollback within this session: the label holder's to decide
        self._scheduled = True
        how = "start every party the same way (or this one without the flag: a data holder follows the label holder)"
        if self.start_mode is StartMode.FRESH:
            if first_step > 0:
                raise CheckpointError(
                    f"this data holder was started with --fresh, but the label holder resumes run {self.cfg.run!r} "
                    f"from its checkpoint at step {first_step}: {how}"
                )
            set_aside(self.cfg, run_files(self.cfg), self.log, f"--fresh: training run {self.cfg.run!r} from epoch 1")
        elif self.start_mode is StartMode.RESUME and first_step == 0:
            raise CheckpointError(
                f"this data holder was started with --resume, but the label holder starts run {self.cfg.run!r} from "
                f"epoch 1 (it has no checkpoint to resume from, or was started with --fresh): {how}"
            )

    @property
    def last_loss(self) -> float | None:
        return getattr(self.segment, "last_loss", None)

    def epoch_done(self, metrics: dict) -> None:
        """Log the epoch; a training run also appends it to ``metrics.jsonl`` (a prediction's pass over new rows is
        not a training epoch: it stays out of that file, whose lines are the training history)."""
        shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        leak = leak_text(metrics)
        if leak:
            shown += "  " + leak
        total = self.cfg.train.epochs if not self.cfg.session.predict else 1
        self.log.info("epoch %d of %d done: %s", metrics["epoch"], total, shown)
        if not self.cfg.session.predict:
            append_metrics(self.cfg, metrics)

    def finish(self, finished: Finished, training_done: bool) -> Finished:
        """The session ended (``training_done``: every epoch was trained and evaluated here).

        A successful, complete session saves the trained segment, or (prediction) writes the predictions. A session
        that ended "successfully" before that (this node was stopped: SIGINT, SIGTERM) writes nothing that looks like
        a finished model, leaves an earlier run's segment as it is, keeps its checkpoints, and exits ``INTERRUPTED``.
        """
        if finished.exit_code != 0:
            return finished
        if not training_done:
            what = "prediction" if self.cfg.session.predict else "training"
            kept = "" if self.cfg.session.predict else (
                f"; the checkpoints in {self.cfg.train.checkpoint_dir} are kept: start the session again with the "
                "same configs to resume"
            )
            return Finished(exit_code=INTERRUPTED, reason=f"{finished.reason} before the {what} finished: nothing "
                            f"was saved as this party's result{kept}")
        if not self.cfg.session.predict:
            failed = self._save_segment()
            if failed is not None:  # the model this node trained is not on disk: that is no success
                return Finished(exit_code=1, reason=f"training finished, but {failed}; nothing was saved as this "
                                f"party's result; its checkpoints in {self.cfg.train.checkpoint_dir} are kept")
            if self.cfg.is_label_holder:
                t = self.machine.training
                kept = t.kept.epoch + 1 if t.kept is not None else None
                try:  # this run is complete: starting it again by accident must not train its last epoch again
                    self.segment.checkpointer.finish(t.epoch, kept)
                except CheckpointError as exc:
                    self.log.error("%s", exc)
            return finished
        if not self.cfg.is_label_holder:
            return finished
        cfg = self.cfg
        path = cfg.train.predictions or cfg.train.output / "predictions.csv"
        try:
            n = write_predictions(path, self.ids.ids, self.aligned, self.segment)
        except OSError as exc:
            return Finished(exit_code=1, reason=f"cannot write the predictions to {path}: {exc.strerror}")
        self.log.info("wrote %d predictions to %s", n, path)
        return finished

    def _save_segment(self) -> str | None:
        """Save this party's segment; None when saved, else what went wrong (naming the file)."""
        try:
            path = save_segment(self.cfg, self.segment.state())
        except OSError as exc:
            return f"this party's segment could not be saved to {segment_path(self.cfg)}: {exc.strerror or exc}"
        self.log.info("saved this party's segment to %s", path)
        return None
