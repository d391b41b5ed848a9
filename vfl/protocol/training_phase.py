"""The training phase of a session (PROTOCOL.md section 11), sans-I/O and free of torch.

The machines own the rules — schedule, step order, the credit window, epoch boundaries, validation — and call a
*segment* for the arithmetic: the node passes in objects that run the bottom model (data holder) or the top model and
loss (label holder); tests pass in numpy fakes. So the pipeline logic is tested in memory and the node stays a thin
loop.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from ..arrays import has_repeats, positions_except
from .errors import ErrorCode, RemoteProtocolError, VflError
from .messages import (
    Backward, Checkpoint, CheckpointDone, Epoch, EvalForward, Forward, Message, Schedule, Tensor, TrainingDone, Window,
)
from .precision import CutPrecision
from .precision import decode as decode_cut
from .precision import encode as encode_cut

#: ``window = "auto"``: the steps timed at window 1 before the label holder picks the window
PROBE_STEPS = 8


def auto_window(periods: Sequence[float], step_seconds: Sequence[float], max_window: int) -> int:
    """The window that keeps the label holder busy: a step's whole period at window 1 (its own compute, the round
    trip, the data holders' backward and next forward) over its own compute, rounded up, within 1..``max_window``.

    Medians, so one slow step (a page fault, another process) does not decide it."""
    period, own = float(np.median(periods)), float(np.median(step_seconds))
    if not (math.isfinite(period) and math.isfinite(own)) or own <= 0:
        return max_window
    return int(min(max(math.ceil(period / own - 1e-9), 1), max_window))


class CheckpointError(VflError):
    """This party cannot save or load a checkpoint (missing file, wrong digest, disk full). Ends the session."""


class BottomSegment(Protocol):
    """A data holder's bottom model over its feature rows in the aligned order."""

    def forward(self, step: int, rows: np.ndarray, train: bool) -> np.ndarray:
        """Cut-layer activations float32 [len(rows), width]. ``train``: keep what ``backward(step)`` needs."""

    def backward(self, step: int, gradient: np.ndarray) -> None:
        """Apply the gradient of step ``step`` (to the weights its forward used) and step the optimizer."""

    def checkpoint(self, step: int, epoch: int, keep: bool = False) -> str:
        """Save the segment after ``step`` steps (atomically); returns the SHA-256 of what was written.

        ``keep``: the best epoch's weights so far; the file outlives the usual pruning until another ``keep``."""

    def restore(self, step: int, digest: str | None) -> None:
        """Load the checkpoint at ``step`` (checking ``digest`` when given); drop every step in flight."""


class TopSegment(Protocol):
    """The label holder's top model, loss and metrics (and its own bottom, if it holds features)."""

    def train_step(self, step: int, rows: np.ndarray, activations: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One step on every party's activations; returns each data holder's gradient; records training metrics."""

    def eval_batch(self, epoch: int, rows: np.ndarray, activations: Mapping[str, np.ndarray]) -> None:
        """Record the validation outputs of one batch."""

    def end_epoch(self, epoch: int) -> dict[str, float]:
        """The epoch's training and validation metrics; resets the accumulators."""

    def checkpoint(self, step: int, epoch: int, keep: bool = False) -> str:
        """Save the top (and own bottom) after ``step`` steps; returns the SHA-256 of what was written."""

    def commit(self, step: int, epoch: int, digests: Mapping[str, str], best: dict | None = None) -> None:
        """Every party saved step ``step``: record it as the checkpoint to resume from (atomically), with the best
        epoch so far (``BestEpoch.to_dict``), which a resumed run needs for ``keep = "best"`` and ``patience``."""

    def restore(self, step: int, digest: str | None = None) -> None:
        """Load this party's checkpoint at ``step``."""


@dataclass(frozen=True, eq=False)
class TrainPlan:
    """The whole schedule: validation positions and every epoch's order of training positions."""

    validation: np.ndarray
    epoch_orders: Sequence[np.ndarray]
    checkpoint_every: int = 0  # steps between checkpoints inside an epoch (0: only at each epoch's start)
    checkpoints: bool = True  # False: a prediction session, which saves nothing
    keep: str = "last"  # "best": the result is the weights after the epoch with the lowest validation loss
    patience: int = 0  # > 0: stop once the validation loss has not improved for this many epochs

    @property
    def epochs(self) -> int:
        return len(self.epoch_orders)

    def steps_in(self, epoch: int, batch_size: int) -> int:
        return -(-len(self.epoch_orders[epoch]) // batch_size)

    def epoch_of(self, step: int, batch_size: int) -> tuple[int, int]:
        """(epoch, the epoch's first step) of global step ``step``."""
        first = 0
        for e in range(self.epochs):
            n = self.steps_in(e, batch_size)
            if step < first + n or (n == 0 and step == first):  # an epoch without training steps starts here too
                return e, first
            first += n
        return self.epochs, first


@dataclass(frozen=True)
class BestEpoch:
    """The epoch with the lowest validation loss so far: what ``keep = "best"`` keeps and ``patience`` counts from.

    Its weights are every party's checkpoint at ``step`` (the first step after it); ``digests`` are those
    checkpoints' digests by party (``""``: the label holder's own) once every party has confirmed them."""

    epoch: int  # 0-based, as on the wire
    step: int
    val_loss: float
    digests: Mapping[str, str] | None = None

    def to_dict(self) -> dict:
        out = {"epoch": self.epoch, "step": self.step, "val_loss": self.val_loss}
        if self.digests is not None:
            out["digests"] = dict(self.digests)
        return out

    @classmethod
    def from_dict(cls, value) -> "BestEpoch | None":
        """From a manifest; None for anything that is not a well-formed record (the manifest is the label holder's
        own file, but a hand-edited one must not crash the resume)."""
        try:
            digests = value.get("digests")
            return cls(
                epoch=int(value["epoch"]),
                step=int(value["step"]),
                val_loss=float(value["val_loss"]),
                digests=None if digests is None else {str(k): str(v) for k, v in digests.items()},
            )
        except (AttributeError, KeyError, TypeError, ValueError):
            return None


@dataclass(frozen=True)
class TrainingProgress:
    """Where the label holder's training stands, for a progress display and throughput figures.

    ``samples`` counts the rows of every training step this pipeline has processed, each step at its true size (the
    short last batch of an epoch as short as it is); a rolled-back pipeline starts a new count. Epochs here are 0-based,
    as on the wire (metrics.jsonl and the log count from 1).
    """

    epoch: int
    epochs: int
    epoch_step: int  # training steps done in this epoch
    epoch_steps: int
    step: int  # global steps done
    steps: int  # global steps of the whole plan
    samples: int
    done: bool
    #: seconds of whole training steps: from each epoch's EPOCH to its last step processed here, on the clock the
    #: node passes in as ``now`` (validation, checkpoints between epochs and the waits of a rollback not counted)
    step_seconds: float = 0.0


def _int_positions(msg: Message, name: str, n_rows: int) -> np.ndarray:
    tensors = {t.name: t.array for t in msg.tensor_list}
    arr = tensors.get(name)
    if arr is None or arr.dtype != np.int64 or arr.ndim != 1:
        raise RemoteProtocolError(ErrorCode.BAD_TENSOR, f"{msg.TYPE} needs tensor {name!r}: int64 [n]", ref=msg.TYPE)
    if len(arr) and (int(arr.min()) < 0 or int(arr.max()) >= n_rows):
        raise RemoteProtocolError(
            ErrorCode.BAD_TENSOR, f"{msg.TYPE}.{name} has a position outside the {n_rows} aligned rows", ref=msg.TYPE
        )
    if has_repeats(arr, bound=n_rows):
        raise RemoteProtocolError(ErrorCode.BAD_TENSOR, f"{msg.TYPE}.{name} repeats a row", ref=msg.TYPE)
    return arr


def batches(order: np.ndarray, batch_size: int) -> list[np.ndarray]:
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


# ------------------------------------------------------------------------------------------------- data holder


class DataHolderTraining:
    """A data holder's pipeline: up to ``window`` FORWARDs ahead of their BACKWARDs, validation after each epoch."""

    def __init__(
        self, bottom: BottomSegment, *, n_rows: int | None, batch_size: int, window: int, width: int,
        max_window: int | None = None, precision: CutPrecision = CutPrecision(), party: str = "this data holder",
        lookahead: bool = False,
    ):
        """``max_window``: the session's window is "auto" (v1.6): ``window`` is where it starts, and one WINDOW of
        at most this may raise it. ``precision``: the wire precision of the activations it sends and the gradients
        it receives (v1.6). ``lookahead``: the session is at 1.7 or later, so the next epoch's EPOCH may come while
        this one is still training ([X14]) and the window runs on across the boundary. ``n_rows`` None: a segment
        holder (v1.10), which ran no PSI: SCHEDULE says how many rows are aligned.

        A bottom may say when it can compute: ``ready(kind, key)`` (kind "train" with the step, or "eval" with
        (epoch, batch)) is False while a segment holder still waits for its inputs' activations, and
        ``forward_eval(epoch, batch, rows)`` computes a validation batch knowing which one it is."""
        self.bottom = bottom
        self.precision = precision
        self.party = party
        self.n_rows = n_rows
        self.batch_size = batch_size
        self.window = window
        self.max_window = max_window
        self.chosen_window: int | None = None
        self.width = width
        self.lookahead = lookahead
        self.epochs: int | None = None
        self.validation: list[np.ndarray] = []
        self.epoch: int | None = None  # the epoch being trained or validated (the oldest open one), else the last
        self._steps: deque[tuple[int, np.ndarray]] = deque()  # (step, rows) not yet forwarded
        self._in_flight: deque[tuple[int, int]] = deque()  # (step, batch rows) forwarded, awaiting BACKWARD
        self._eval: deque[int] = deque()  # validation batches still to send for self.epoch
        #: epochs whose EPOCH came and that are not closed: (epoch, first step, end step), oldest first; at most two
        #: (the one training or validating, and with ``lookahead`` the next one, [X14])
        self._open: deque[tuple[int, int, int]] = deque()
        self._validating = False  # the oldest open epoch's steps are all applied: its validation is queued or sent
        self._ahead: int | None = None  # the epoch whose EPOCH came while another one was open ([X14])
        self.next_epoch = 0  # the epoch the next EPOCH must name
        self.finished_epochs = 0
        self.applied = 0  # steps whose BACKWARD has been applied: the segment is "after `applied` steps"
        self._resuming = False
        self.done: TrainingDone | None = None  # v1.5: the label holder said training is over, and what to keep

    def on_schedule(self, msg: Schedule) -> None:
        if self.epochs is not None:
            raise RemoteProtocolError(ErrorCode.UNEXPECTED_MESSAGE, "a second SCHEDULE", ref=msg.TYPE)
        begin = getattr(self.bottom, "begin", None)
        if begin is not None:  # e.g. the node checks where the run starts against its --fresh / --resume
            begin(msg.first_step)
        if msg.first_step > 0:  # resume: every party goes back to its checkpoint at first_step
            self.bottom.restore(msg.first_step, msg.resume_digest)
        if self.n_rows is None:  # a segment holder: the label holder says how many rows are aligned (v1.10)
            if msg.rows is None:
                raise RemoteProtocolError(
                    ErrorCode.BAD_FIELD, "SCHEDULE.rows is missing: a segment holder needs the aligned row count",
                    ref=msg.TYPE,
                )
            self.n_rows = msg.rows
        self.applied = msg.first_step
        self._resuming = msg.first_step > 0
        self.epochs = msg.epochs
        validation = _int_positions(msg, "validation", self.n_rows)
        self.validation = batches(validation, self.batch_size)
        prepare = getattr(self.bottom, "prepare", None)
        # e.g. standardisation fitted on this party's own training rows only; a bottom that says it fits nothing
        # (``wants_train_rows`` false) is not handed the n-row array
        if prepare is not None and getattr(self.bottom, "wants_train_rows", True):
            prepare(positions_except(self.n_rows, validation))
        self.finished_epochs = self.next_epoch = msg.first_epoch
        self.next_step = msg.first_step

    @property
    def _epoch_done(self) -> bool:
        """No epoch is open: the last one's validation was sent (or none has begun)."""
        return not self._open

    def on_epoch(self, msg: Epoch) -> None:
        if self.epochs is None:
            raise RemoteProtocolError(ErrorCode.UNEXPECTED_MESSAGE, "EPOCH before SCHEDULE", ref=msg.TYPE)
        if self.done is not None:
            raise RemoteProtocolError(ErrorCode.UNEXPECTED_MESSAGE, "EPOCH after TRAINING_DONE", ref=msg.TYPE)
        if self._open and (not self.lookahead or len(self._open) > 1):
            why = "two epochs ahead of the one in progress ([X14])" if self.lookahead else "before the previous one ended"
            raise RemoteProtocolError(ErrorCode.UNEXPECTED_MESSAGE, f"EPOCH {why}", ref=msg.TYPE)
        order = _int_positions(msg, "order", self.n_rows)
        steps = batches(order, self.batch_size)
        # a resume ([X8]) goes on inside the epoch that holds the checkpoint's step: that epoch's EPOCH, never one
        # that ended before it (its steps were applied already) nor one after it
        resumed_mid_epoch = self._resuming and msg.first_step <= self.next_step < msg.first_step + len(steps)
        if msg.epoch != self.next_epoch or msg.epoch >= self.epochs or (
            msg.first_step != self.next_step and not resumed_mid_epoch
        ):
            raise RemoteProtocolError(
                ErrorCode.BAD_FIELD,
                f"EPOCH {msg.epoch} from step {msg.first_step} ({len(steps)} steps): expected epoch {self.next_epoch} "
                f"from step {self.next_step}" + (" or an epoch holding that step (a resume)" if self._resuming else ""),
                ref=msg.TYPE,
            )
        self._resuming = False
        first = max(msg.first_step, self.next_step) if resumed_mid_epoch else msg.first_step
        for i, rows in enumerate(steps):
            if msg.first_step + i >= first:  # on a resume, steps before the checkpoint are done
                self._steps.append((msg.first_step + i, rows))
        self.next_step = msg.first_step + len(steps)
        self.next_epoch = msg.epoch + 1
        self._open.append((msg.epoch, first, self.next_step))
        if len(self._open) > 1:
            self._ahead = msg.epoch
        else:
            self.epoch = msg.epoch
            self._maybe_validate()

    def _maybe_validate(self) -> None:
        """Once every step of the oldest open epoch is applied: queue its validation batches ([X5]), or close it."""
        if not self._open or self._validating or self.applied != self._open[0][2]:
            return
        self._validating = True
        self._eval.extend(range(len(self.validation)))  # validate on the weights after the epoch's last step
        if not self._eval:
            self._close_epoch()

    def _ready(self, kind: str, key) -> bool:
        ready = getattr(self.bottom, "ready", None)
        return ready is None or ready(kind, key)

    @property
    def _train_due(self) -> bool:
        return bool(self._steps and len(self._in_flight) < self.window) and self._ready("train", self._steps[0][0])

    @property
    def has_work(self) -> bool:
        if self.done is not None:
            return False
        if self._eval:
            return self._ready("eval", (self.epoch, self._eval[0]))
        return self._train_due

    @property
    def forward_due(self) -> bool:
        """The next work is a training FORWARD the window allows (not a validation batch): at most ``window`` of
        them in a row, so a node may compute them before it reads anything else."""
        return self.done is None and not self._eval and self._train_due

    def work(self) -> list[Message]:
        """The next validation batch once the epoch's steps are all applied (the label holder waits for them before
        its next step), else the next FORWARD if the window allows: with [X14] that may be the next epoch's."""
        if self.done is not None or not self.has_work:
            return []
        if not self._eval:
            step, rows = self._steps.popleft()
            acts = self.bottom.forward(step, rows, True)
            self._in_flight.append((step, len(rows)))
            tensors = encode_cut("activations", acts, self.precision.activations, f"FORWARD step {step} of {self.party}")
            return [Forward(step=step, tensors=tensors)]
        if self._eval:
            batch = self._eval.popleft()
            evaluate = getattr(self.bottom, "forward_eval", None)
            acts = (evaluate(self.epoch, batch, self.validation[batch]) if evaluate is not None
                    else self.bottom.forward(-1, self.validation[batch], False))
            tensors = encode_cut(
                "activations", acts, self.precision.activations,
                f"EVAL_FORWARD epoch {self.epoch} batch {batch} of {self.party}",
            )
            out: list[Message] = [EvalForward(epoch=self.epoch, batch=batch, tensors=tensors)]
            if not self._eval:
                self._close_epoch()
            return out
        return []

    def on_backward(self, msg: Backward) -> None:
        if not self._in_flight or msg.step != self._in_flight[0][0]:
            expected = self._in_flight[0][0] if self._in_flight else "none"
            raise RemoteProtocolError(
                ErrorCode.UNEXPECTED_MESSAGE, f"BACKWARD for step {msg.step}; the oldest step in flight is {expected}",
                ref=msg.TYPE,
            )
        if self._validating:  # [X14]: the next epoch's steps wait for this epoch's validation, which is on our weights
            raise RemoteProtocolError(
                ErrorCode.UNEXPECTED_MESSAGE,
                f"BACKWARD for step {msg.step} before this data holder sent its validation of epoch {self.epoch}",
                ref=msg.TYPE,
            )
        step, rows = self._in_flight[0]
        grad = decode_cut(msg, "gradient", rows, self.width, self.precision.gradients)
        self.bottom.backward(step, grad)
        self._in_flight.popleft()
        self.applied = step + 1
        self._maybe_validate()

    def _close_epoch(self) -> None:
        self._open.popleft()
        self._validating = False
        self.finished_epochs += 1
        if self._open:  # the next epoch (sent ahead, [X14]) is now the one in progress
            self.epoch = self._open[0][0]
            self._maybe_validate()

    def on_checkpoint(self, msg: Checkpoint) -> CheckpointDone:
        """Save after ``msg.step`` steps: every BACKWARD before it has arrived (they come first on the socket)."""
        if msg.step != self.applied:
            raise RemoteProtocolError(
                ErrorCode.UNEXPECTED_MESSAGE,
                f"CHECKPOINT at step {msg.step}, but this data holder has applied {self.applied} steps",
                ref=msg.TYPE,
            )
        return CheckpointDone(step=msg.step, digest=self.bottom.checkpoint(msg.step, msg.epoch, keep=bool(msg.keep)))

    def on_window(self, msg: Window) -> None:
        """[X13]: the label holder chose this pipeline's window ("auto"); it applies to every FORWARD from now on."""
        if self.max_window is None or self.chosen_window is not None or self.epochs is None:
            why = ("in a session with a fixed window" if self.max_window is None else
                   "before SCHEDULE" if self.epochs is None else "a second time in one pipeline")
            raise RemoteProtocolError(ErrorCode.UNEXPECTED_MESSAGE, f"WINDOW {why}", ref=msg.TYPE)
        if not 1 <= msg.window <= self.max_window:
            raise RemoteProtocolError(
                ErrorCode.BAD_FIELD, f"WINDOW.window {msg.window} is outside 1..{self.max_window} (max_window)",
                ref=msg.TYPE,
            )
        self.window = self.chosen_window = msg.window

    def on_training_done(self, msg: TrainingDone) -> None:
        """[X10]: training is over; the result is this segment after ``keep_step`` steps (an earlier, kept
        checkpoint when ``keep = "best"`` chose an earlier epoch: loaded here, its digest checked)."""
        # an epoch sent ahead ([X14]) of which no step was applied is not in progress: training ends before it
        ahead = (len(self._open) == 1 and self._open[0][0] == self._ahead and not self._validating
                 and self.applied == self._open[0][1])
        if self.epochs is None or not (self._epoch_done or ahead) or self.done is not None:
            raise RemoteProtocolError(
                ErrorCode.UNEXPECTED_MESSAGE, "TRAINING_DONE while an epoch is in progress (or twice)", ref=msg.TYPE
            )
        if msg.epochs != self.finished_epochs or not 0 <= msg.keep_epoch < msg.epochs or not (
            0 <= msg.keep_step <= self.applied
        ):
            raise RemoteProtocolError(
                ErrorCode.BAD_FIELD,
                f"TRAINING_DONE after {msg.epochs} epoch(s) keeping epoch {msg.keep_epoch} at step {msg.keep_step}: "
                f"this data holder finished {self.finished_epochs} epoch(s) and applied {self.applied} steps",
                ref=msg.TYPE,
            )
        if msg.keep_step < self.applied:
            if msg.keep_digest is None:
                raise RemoteProtocolError(
                    ErrorCode.BAD_FIELD, "TRAINING_DONE.keep_digest is missing for an earlier step", ref=msg.TYPE
                )
            self.bottom.restore(msg.keep_step, msg.keep_digest)
            self.applied = msg.keep_step
        self._steps.clear()  # the epoch sent ahead, if any: its FORWARDs in flight are never answered
        self._in_flight.clear()
        self._open.clear()
        self.done = msg


# ------------------------------------------------------------------------------------------------- label holder


class Rounds(dict):
    """Messages per party (``dict`` of lists, as callers read it) that also remembers the order they were made in
    across parties (``events``): a segment holder forwards what passes it in the order it arrives, so the label
    holder must send a step's BACKWARD, then the CHECKPOINT that follows it for everyone, then the next step's
    BACKWARD, not each party's messages in one block ([C6])."""

    def __init__(self, parties: Sequence[str]):
        super().__init__({p: [] for p in parties})
        self.events: list[tuple[str, Message]] = []

    def add(self, party: str, *msgs: Message) -> None:
        self[party].extend(msgs)
        self.events.extend((party, m) for m in msgs)


@dataclass
class _Inbox:
    forwards: dict[int, np.ndarray] = field(default_factory=dict)
    next_forward: int = 0
    evals: dict[int, np.ndarray] = field(default_factory=dict)
    next_eval: int = 0


class LabelHolderTraining:
    """The label holder's pipeline: steps strictly in order, each once every data holder's activations are in."""

    def __init__(
        self,
        top: TopSegment,
        plan: TrainPlan,
        *,
        parties: Sequence[str],
        widths: Mapping[str, int],
        batch_size: int,
        window: int,
        n_rows: int,
        first_step: int = 0,
        resume_digests: Mapping[str, str] | None = None,
        best: BestEpoch | None = None,
        max_window: int | None = None,
        precision: CutPrecision = CutPrecision(),
        lookahead: bool = False,
        inputs: Sequence[str] | None = None,
        announce_rows: bool = False,
    ):
        """``parties``: every party with a session (they get SCHEDULE, EPOCH, CHECKPOINT, WINDOW, TRAINING_DONE, in
        this order of parties: a segment holder before the parties behind it, v1.10); ``inputs``: the ones whose
        FORWARDs the top takes and who get BACKWARDs (default: every party), ``widths`` keyed by them.
        ``announce_rows``: SCHEDULE carries the aligned row count (a session with segment holders).

        ``best``: when resuming, the best epoch recorded with the checkpoint at ``first_step`` (``keep``,
        ``patience``). ``max_window``: the window is "auto": ``window`` (1) until ``PROBE_STEPS`` steps are timed,
        then the one ``auto_window`` picks, announced by WINDOW. ``precision``: the wire precision of the activations
        received and gradients sent (v1.6). ``lookahead``: every data holder speaks 1.7, so each epoch's EPOCH goes
        out with the previous one's ([X14]) and the pipeline runs on across epoch boundaries."""
        self.top = top
        self.lookahead = lookahead
        self._announced = -1  # the last epoch whose EPOCH this pipeline sent
        self.precision = precision
        self.plan = plan
        self.resume_digests = dict(resume_digests or {})
        self.parties = tuple(parties)
        self.inputs = tuple(parties if inputs is None else inputs)
        self.announce_rows = announce_rows
        self.widths = dict(widths)
        self.batch_size = batch_size
        self.window = window
        self.n_rows = n_rows
        self.validation = batches(np.asarray(plan.validation, dtype=np.int64), batch_size)
        self.first_step = first_step
        self.epoch, self._epoch_first_step = plan.epoch_of(first_step, batch_size)
        self.step = first_step  # the next step to process
        self._inbox = {p: _Inbox(next_forward=first_step) for p in self.inputs}
        self._steps: dict[int, np.ndarray] = {}
        self._epoch_end_step = first_step
        self._evaluating = False
        self._eval_next = 0
        self.done = False
        self.history: list[dict[str, float]] = []
        self._pending: dict[int, dict[str, str]] = {}  # checkpoint step -> digests received so far
        self.latest_checkpoint: int | None = None
        self.latest_digests: dict[str, str] = {}
        self.samples = 0  # rows of the training steps processed here, each step at its true size
        self.best = best if best is not None and best.step <= first_step else None
        self.committed_best = self.best  # the best epoch as of the latest committed checkpoint (what a rollback keeps)
        #: once ``done``: the epoch whose weights are the result (None: the last one), and whether patience stopped it
        self.kept: BestEpoch | None = None
        self.stopped_early = False
        self.step_seconds = 0.0  # see TrainingProgress.step_seconds
        self.max_window = max_window
        self.chosen_window: int | None = None
        self.probe: dict[str, float] = {}  # what chose the window: the medians it used (for the log)
        self._periods: list[float] = []  # "auto": seconds from one step to the next within an epoch, at window 1
        self._own: list[float] = []  # "auto": the top segment's compute per step
        self._last_step_at: float | None = None
        self._step_mark: float | None = None  # ``now`` of the epoch's EPOCH, then of its latest step
        self._plan_steps = sum(plan.steps_in(e, batch_size) for e in range(plan.epochs))

    def start(self, now: float | None = None) -> dict[str, list[Message]]:
        """Per data holder: SCHEDULE (with its resume digest when resuming), then the first EPOCH."""
        validation = Tensor("validation", np.asarray(self.plan.validation, dtype=np.int64))
        opening = self._open_epoch(first=True, now=now)
        return {
            p: [
                Schedule(
                    epochs=self.plan.epochs,
                    first_epoch=self.epoch,
                    first_step=self.step,
                    tensors=(validation,),
                    resume_digest=self.resume_digests.get(p) if self.step > 0 else None,
                    rows=self.n_rows if self.announce_rows else None,
                )
            ]
            + opening
            for p in self.parties
        }

    def _open_epoch(self, first: bool = False, now: float | None = None) -> list[Message]:
        """Checkpoint at the epoch's start (not when resuming from exactly there), then its EPOCH unless it went out
        ahead, then with ``lookahead`` the next epoch's EPOCH ([X14]): the data holders' windows run on into it while
        this epoch ends, so an epoch boundary no longer drains the pipeline for a round trip."""
        self._step_mark = now
        out: list[Message] = []
        if self.plan.checkpoints and not (first and self.step > 0):
            keep = self.plan.keep == "best" and self.best is not None and self.best.step == self.step
            out += self._checkpoint(self.step, keep)
        if self._announced < self.epoch:
            out.append(self._announce(self.epoch, self._epoch_first_step))
        self._epoch_end_step = self._epoch_first_step + self.plan.steps_in(self.epoch, self.batch_size)
        self._evaluating = self.step == self._epoch_end_step  # an epoch without training rows (prediction)
        self._eval_next = 0
        for box in self._inbox.values():
            box.next_eval = 0
        if self.lookahead and self.epoch + 1 < self.plan.epochs:
            out.append(self._announce(self.epoch + 1, self._epoch_end_step))
        return out

    def _announce(self, epoch: int, start: int) -> Epoch:
        """EPOCH ``epoch`` from step ``start``; its steps (from ``self.step`` on, after a resume) await FORWARDs."""
        order = np.asarray(self.plan.epoch_orders[epoch], dtype=np.int64)
        for i, rows in enumerate(batches(order, self.batch_size)):
            if start + i >= self.step:
                self._steps[start + i] = rows
        self._announced = epoch
        return Epoch(epoch=epoch, first_step=start, tensors=(Tensor("order", order),))

    @property
    def progress(self) -> TrainingProgress:
        return TrainingProgress(
            epoch=min(self.epoch, self.plan.epochs - 1) if self.plan.epochs else 0,
            epochs=self.plan.epochs,
            epoch_step=self.step - self._epoch_first_step,
            epoch_steps=self._epoch_end_step - self._epoch_first_step,
            step=self.step,
            steps=self._plan_steps,
            samples=self.samples,
            done=self.done,
            step_seconds=self.step_seconds,
        )

    def _checkpoint(self, step: int, keep: bool = False) -> list[Message]:
        self._pending[step] = {"": self.top.checkpoint(step, self.epoch, keep=keep)}
        return [Checkpoint(step=step, epoch=self.epoch, keep=True if keep else None)]

    def on_checkpoint_done(self, party: str, msg: CheckpointDone) -> None:
        digests = self._pending.get(msg.step)
        if digests is None or party in digests:
            raise RemoteProtocolError(
                ErrorCode.UNEXPECTED_MESSAGE, f"CHECKPOINT_DONE for step {msg.step} that was not asked for", ref=msg.TYPE
            )
        digests[party] = msg.digest
        if len(digests) == len(self.parties) + 1:
            own = digests.pop("")
            epoch, _ = self.plan.epoch_of(msg.step, self.batch_size)
            if self.best is not None and self.best.step == msg.step and self.best.digests is None:
                self.best = replace(self.best, digests={**digests, "": own})
            if self.best is not None and self.best.step <= msg.step:
                self.committed_best = self.best
            best = self.committed_best.to_dict() if self.committed_best is not None else None
            self.top.commit(msg.step, epoch, {**digests, "": own}, best=best)
            self.latest_checkpoint = msg.step
            self.latest_digests = dict(digests)
            del self._pending[msg.step]

    def on_forward(
        self, party: str, msg: Forward, now: float | None = None
    ) -> tuple[dict[str, list[Message]], list[dict]]:
        """Returns (messages per party, finished-epoch metrics). ``now``: the node's monotonic clock, for
        ``step_seconds`` (without it no time is counted)."""
        box = self._input_box(party, msg)
        if msg.step != box.next_forward or msg.step not in self._steps:
            raise RemoteProtocolError(
                ErrorCode.UNEXPECTED_MESSAGE, f"FORWARD for step {msg.step}; expected step {box.next_forward}",
                ref=msg.TYPE,
            )
        if msg.step >= self.step + self.window:
            raise RemoteProtocolError(
                ErrorCode.UNEXPECTED_MESSAGE,
                f"FORWARD for step {msg.step} exceeds the window {self.window} (step {self.step} is unanswered)",
                ref=msg.TYPE,
            )
        box.forwards[msg.step] = decode_cut(
            msg, "activations", len(self._steps[msg.step]), self.widths[party], self.precision.activations
        )
        box.next_forward += 1
        return self._advance(now)

    def on_eval(
        self, party: str, msg: EvalForward, now: float | None = None
    ) -> tuple[dict[str, list[Message]], list[dict]]:
        box = self._input_box(party, msg)
        if (self.done or not self._evaluating or msg.epoch != self.epoch or msg.batch != box.next_eval
                or msg.batch >= len(self.validation)):
            raise RemoteProtocolError(
                ErrorCode.UNEXPECTED_MESSAGE,
                f"EVAL_FORWARD epoch {msg.epoch} batch {msg.batch}; expected "
                + (f"epoch {self.epoch} batch {box.next_eval}" if self._evaluating and not self.done
                   and box.next_eval < len(self.validation) else "no validation now"),
                ref=msg.TYPE,
            )
        box.evals[msg.batch] = decode_cut(
            msg, "activations", len(self.validation[msg.batch]), self.widths[party], self.precision.activations
        )
        box.next_eval += 1
        return self._advance(now)

    def _input_box(self, party: str, msg: Message) -> _Inbox:
        box = self._inbox.get(party)
        if box is None:  # v1.10: a party behind a segment holder sends its cut layer there, never here
            raise RemoteProtocolError(
                ErrorCode.UNEXPECTED_MESSAGE,
                f"{msg.TYPE} from {party!r}, which does not feed the label holder (its cut layer goes to its segment "
                "holder)",
                ref=msg.TYPE,
            )
        return box

    def _advance(self, now: float | None = None) -> tuple[dict[str, list[Message]], list[dict]]:
        out = Rounds(self.parties)
        metrics: list[dict] = []
        while not self.done:
            if not self._evaluating:
                if not all(self.step in self._inbox[p].forwards for p in self.inputs):
                    break
                acts = {p: self._inbox[p].forwards.pop(self.step) for p in self.inputs}
                rows = self._steps.pop(self.step)
                grads = self.top.train_step(self.step, rows, acts)
                self.samples += len(rows)
                choose = self._time_step(now)
                if now is not None and self._step_mark is not None:
                    self.step_seconds += max(now - self._step_mark, 0.0)
                self._step_mark = now
                for p in self.parties:  # a segment holder's BACKWARD before what goes through it to its inputs
                    if p in self._inbox:
                        tensors = encode_cut("gradient", grads[p], self.precision.gradients,
                                             f"BACKWARD step {self.step} to {p}")
                        out.add(p, Backward(step=self.step, tensors=tensors))
                    if choose:
                        out.add(p, Window(window=self.window))
                self.step += 1
                every = self.plan.checkpoint_every
                if self.plan.checkpoints and every and self.step % every == 0 and self.step < self._epoch_end_step:
                    ask = self._checkpoint(self.step)  # after BACKWARD(step - 1) on every socket
                    for p in self.parties:
                        out.add(p, *ask)
                if self.step == self._epoch_end_step:
                    self._step_mark = self._last_step_at = None  # validation is not a training step
                    self._evaluating, self._eval_next = True, 0
                    for p in self.inputs:
                        self._inbox[p].next_eval = 0
                    break  # this step's BACKWARDs first: closing the epoch waits for the validation, or ``settle``
                continue
            while self._eval_next < len(self.validation) and all(
                self._eval_next in self._inbox[p].evals for p in self.inputs
            ):
                b = self._eval_next
                self.top.eval_batch(self.epoch, self.validation[b], {p: self._inbox[p].evals.pop(b) for p in self.inputs})
                self._eval_next += 1
            if self._eval_next < len(self.validation):
                break
            # what users see (metrics.jsonl, the log) counts epochs from 1; the wire and self.epoch from 0
            result = {"epoch": self.epoch + 1, "step": self.step, **self.top.end_epoch(self.epoch)}
            if self.max_window is not None:  # "auto": the window this epoch ended with
                result["window"] = self.window
            self.history.append(result)
            metrics.append(result)
            self._track_best(result)
            self.epoch += 1
            self._epoch_first_step = self.step
            if self.epoch >= self.plan.epochs or self._out_of_patience():
                self.stopped_early = self.epoch < self.plan.epochs
                for p, msgs in self._training_done().items():
                    out.add(p, *msgs)
                self.done = True
                break
            opening = self._open_epoch(now=now)
            for p in self.parties:
                out.add(p, *opening)
        return out, metrics

    @property
    def _closable(self) -> bool:
        """The epoch's steps are done and its validation is in (or it has none): it can be closed now."""
        return self._evaluating and not self.done and self._eval_next >= len(self.validation)

    @property
    def unsettled(self) -> bool:
        """Work that waits until the last step's BACKWARDs are sent (``settle``): the rest of the top's step, or the
        epoch that step ended (its metrics, the next epoch's checkpoint: about 10 ms of the label holder's)."""
        return self._closable or bool(getattr(self.top, "unsettled", False))

    def settle(self, now: float | None = None) -> tuple[dict[str, list[Message]], list[dict]]:
        """Do what ``unsettled`` says, as ``on_forward`` would have: the node calls this after the last step's
        BACKWARDs went out, so the data holders do not wait for it. Anything that arrives first does it itself."""
        settle = getattr(self.top, "settle", None)
        if settle is not None:
            settle()
        if self._closable:
            return self._advance(now)
        return {p: [] for p in self.parties}, []

    def _time_step(self, now: float | None) -> bool:
        """"auto": time steps at window 1 (``now`` of each step, the top's own compute); True once, when the window is
        chosen (``self.window`` is then raised before its WINDOW goes out, so no FORWARD it allows is refused)."""
        if self.max_window is None or self.chosen_window is not None or now is None:
            return False
        own = getattr(self.top, "last_step_seconds", None)
        if self._last_step_at is not None:
            self._periods.append(now - self._last_step_at)
            if isinstance(own, float):
                self._own.append(own)
        self._last_step_at = now
        if len(self._periods) < PROBE_STEPS or not self._own:
            return False
        self.window = self.chosen_window = auto_window(self._periods, self._own, self.max_window)
        self.probe = {"period_ms": 1000 * float(np.median(self._periods)),
                      "step_ms": 1000 * float(np.median(self._own))}
        return True

    def _track_best(self, result: Mapping) -> None:
        loss = result.get("val_loss")
        if isinstance(loss, float) and math.isfinite(loss) and (self.best is None or loss < self.best.val_loss):
            self.best = BestEpoch(epoch=self.epoch, step=self.step, val_loss=loss)

    def _out_of_patience(self) -> bool:
        """``patience`` epochs in a row (counted after ``self.epoch`` advanced) without a new best validation loss."""
        if self.plan.patience <= 0:
            return False
        since = self.epoch - (self.best.epoch + 1 if self.best is not None else 0)
        return since >= self.plan.patience

    def _training_done(self) -> dict[str, list[Message]]:
        """[X10]: the result is every party's segment after the kept epoch: the best one (``keep = "best"``), whose
        checkpoint every party holds, or the last one. The label holder loads its own kept checkpoint here."""
        kept = self.best if self.plan.keep == "best" and self.best is not None else None
        if kept is not None and kept.step == self.step:
            kept = None  # the last epoch was the best: the weights in memory are the result
        if kept is not None:
            if kept.digests is None:
                raise CheckpointError(
                    f"the checkpoint of the best epoch ({kept.epoch + 1}, step {kept.step}) was never confirmed by "
                    "every party, so it cannot be the result"
                )
            self.top.restore(kept.step, kept.digests.get(""))
        self.kept = kept
        keep_step = kept.step if kept is not None else self.step
        keep_epoch = kept.epoch if kept is not None else self.epoch - 1
        return {
            p: [
                TrainingDone(
                    epochs=self.epoch,
                    keep_step=keep_step,
                    keep_epoch=max(keep_epoch, 0),
                    keep_digest=kept.digests.get(p) if kept is not None else None,
                    early_stop=True if self.stopped_early else None,
                )
            ]
            for p in self.parties
        }
