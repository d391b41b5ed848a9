"""The reference: the composed split network trained centrally, plus the building blocks the nodes share with it.

``train_central`` runs every bottom, the combiner and the top in one process on an explicit batch schedule, with one
optimizer per segment. The distributed run with ``W = 1`` must reproduce it (to 1e-5), so it is deliberately plain:
float32, one ``loss.backward()`` through the whole graph per batch, then every optimizer steps. (Equality holds for
models without randomness in training mode: dropout draws from each process's own RNG, so with dropout > 0 the
distributed run matches only in distribution.)

``split_step`` is the same step written the way the nodes run it: activations cross the cut as detached tensors, the
label holder backpropagates to the combined cut-layer input, splits that gradient per holder with
``Combiner.split``, and each holder backpropagates that gradient (``pullback(activations, grad).backward()``).

``make_schedule`` fixes the train/validation split and every epoch's batches as plain int64 arrays of row positions
in the agreed (post-PSI) row order. The label holder makes it and sends the arrays; nobody else uses the RNG.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from numpy.random import PCG64, Generator
from torch import nn

from ..errors import VflError
from .data import TASKS
from .metrics import evaluate
from .models import Combiner
from .optim import Optimizer
from .specs import OptimizerSpec

__all__ = [
    "CentralResult",
    "ComposedModel",
    "OptimizerSpec",
    "Schedule",
    "ScheduleError",
    "StepResult",
    "as_targets",
    "make_schedule",
    "predict",
    "pullback",
    "split_step",
    "task_loss",
    "train_central",
]


# ---------------------------------------------------------------------------------------------------------- schedule


class ScheduleError(VflError, ValueError):
    """A schedule is malformed (rows out of range, overlapping split, repeated rows in an epoch, ...)."""


def _rows(a, what: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise ScheduleError(f"{what} must be a 1-D integer array, got dtype {arr.dtype} shape {arr.shape}")
    return np.ascontiguousarray(arr.astype(np.int64, copy=False))


@dataclass(frozen=True, eq=False)
class Schedule:
    """Explicit training schedule over rows ``0 .. n_rows-1`` of the agreed order.

    ``train`` and ``validation`` are disjoint sorted row sets; ``epochs[e][b]`` are the rows of batch ``b`` of epoch
    ``e``, drawn from ``train`` with no row twice in an epoch. Constructing one validates it, so a data holder can
    build it straight from the arrays the label holder sent.
    """

    n_rows: int
    train: np.ndarray
    validation: np.ndarray
    epochs: tuple[tuple[np.ndarray, ...], ...] = field(repr=False)

    def __post_init__(self):
        n = int(self.n_rows)
        if n < 0:
            raise ScheduleError(f"n_rows must be >= 0, got {self.n_rows}")
        object.__setattr__(self, "n_rows", n)
        train = np.sort(_rows(self.train, "train rows"))  # sorted, so duplicates sit side by side (np.unique
        val = np.sort(_rows(self.validation, "validation rows"))  # hashes: 4.5 s per call at 10M rows)
        for name, rows in (("train", train), ("validation", val)):
            if rows.size and (rows[0] < 0 or rows[-1] >= n):
                raise ScheduleError(f"{name} rows out of range [0, {n})")
            if (rows[1:] == rows[:-1]).any():  # sorted: a repeat sits next to itself
                raise ScheduleError(f"{name} rows contain duplicates")
        in_train = np.zeros(n, dtype=bool)
        in_train[train] = True
        if in_train[val].any():
            raise ScheduleError("train and validation rows overlap")
        epochs = [self._check_epoch(e, batches, n, in_train) for e, batches in enumerate(self.epochs)]
        object.__setattr__(self, "train", train)
        object.__setattr__(self, "validation", val)
        object.__setattr__(self, "epochs", tuple(epochs))

    @staticmethod
    def _check_epoch(e: int, batches, n: int, in_train: np.ndarray) -> tuple[np.ndarray, ...]:
        """One epoch's batches, checked over the whole epoch at once (a 10M-row epoch has 78,125 batches of 128: a
        check per batch took 25 s). An error names the first batch that breaks a rule, as a check per batch would."""
        checked = tuple(_rows(batch, f"epoch {e} batch {b}") for b, batch in enumerate(batches))
        if not checked:
            return checked
        sizes = np.fromiter((r.size for r in checked), dtype=np.int64, count=len(checked))
        if not sizes.all():
            raise ScheduleError(f"epoch {e} batch {int(np.argmin(sizes))} is empty")
        ends = np.cumsum(sizes)  # batch b holds positions ends[b-1] .. ends[b]-1 of the epoch's rows
        rows = np.concatenate(checked)
        bad = (rows < 0) | (rows >= n)
        bad[~bad] = ~in_train[rows[~bad]]
        if bad.any():
            b = int(np.searchsorted(ends, int(np.argmax(bad)), side="right"))
            raise ScheduleError(f"epoch {e} batch {b} holds rows that are not training rows")
        if np.bincount(rows, minlength=n).max() > 1:  # then find the first position that repeats an earlier one
            by_row = np.argsort(rows, kind="stable")  # equal rows side by side, in epoch order
            same = rows[by_row[1:]] == rows[by_row[:-1]]
            b = int(np.searchsorted(ends, int(by_row[1:][same].min()), side="right"))
            raise ScheduleError(f"epoch {e} batch {b} repeats a row already used in that epoch")
        return checked

    @property
    def n_steps(self) -> int:
        """Total number of batches (optimizer steps) over all epochs."""
        return sum(len(batches) for batches in self.epochs)

    def steps(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """``(step, epoch, rows)`` for every batch in order; ``step`` counts from 0 across epochs."""
        step = 0
        for e, batches in enumerate(self.epochs):
            for rows in batches:
                yield step, e, rows
                step += 1


def make_schedule(n_rows: int, batch_size: int, epochs: int, seed: int, validation_fraction: float = 0.0,
                  *, drop_last: bool = False) -> Schedule:
    """Split rows into train/validation and draw one permutation of the train rows per epoch, cut into batches of
    ``batch_size`` (the last one smaller unless ``drop_last``). Uses ``numpy.random.Generator(PCG64(seed))``: first
    one permutation of all rows (its first ``round(n_rows * validation_fraction)`` rows are the validation set), then
    one permutation of the train rows per epoch."""
    if n_rows < 1:
        raise ScheduleError(f"n_rows must be >= 1, got {n_rows}")
    if batch_size < 1:
        raise ScheduleError(f"batch_size must be >= 1, got {batch_size}")
    if epochs < 0:
        raise ScheduleError(f"epochs must be >= 0, got {epochs}")
    if not 0.0 <= validation_fraction < 1.0:
        raise ScheduleError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    rng = Generator(PCG64(seed))
    n_val = int(round(n_rows * validation_fraction))
    if n_val >= n_rows:
        raise ScheduleError(f"validation_fraction {validation_fraction} leaves no training rows of {n_rows}")
    perm = rng.permutation(n_rows).astype(np.int64)
    validation = np.sort(perm[:n_val])
    train = np.sort(perm[n_val:])
    if drop_last and train.size < batch_size:
        raise ScheduleError(f"drop_last with batch_size {batch_size} leaves no batch of {train.size} train rows")
    all_epochs = []
    for _ in range(epochs):
        order = train[rng.permutation(train.size)]
        stop = (order.size // batch_size) * batch_size if drop_last else order.size
        all_epochs.append(tuple(order[i:i + batch_size].copy() for i in range(0, stop, batch_size)))
    return Schedule(n_rows=n_rows, train=train, validation=validation, epochs=tuple(all_epochs))


# ------------------------------------------------------------------------------------------------------ loss, targets


def task_loss(task: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The training loss (batch mean): cross-entropy on logits (multiclass), BCE with logits on the single output
    column (binary), MSE on the single output column (regression)."""
    if task == "multiclass":
        return lambda out, y: F.cross_entropy(out, y)
    if task == "binary":
        return lambda out, y: F.binary_cross_entropy_with_logits(_single(out), y)
    if task == "regression":
        return lambda out, y: F.mse_loss(_single(out), y)
    raise ValueError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")


def _single(out: torch.Tensor) -> torch.Tensor:
    if out.dim() == 2 and out.shape[1] == 1:
        return out[:, 0]
    if out.dim() == 1:
        return out
    raise ValueError(f"binary/regression top models must output shape (batch, 1), got {tuple(out.shape)}")


def as_targets(task: str, labels: np.ndarray) -> torch.Tensor:
    """Encoded labels as the tensor ``task_loss`` expects: int64 (multiclass) or float32."""
    if task == "multiclass":
        return torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))
    return torch.from_numpy(np.ascontiguousarray(labels, dtype=np.float32))


# ------------------------------------------------------------------------------------------------------------- models


class ComposedModel(nn.Module):
    """All bottoms + combiner + top as one module: ``forward([x_0, x_1, ...]) -> top outputs``."""

    def __init__(self, bottoms: Sequence[nn.Module], top: nn.Module, combiner: Combiner):
        super().__init__()
        if len(bottoms) != len(combiner.widths):
            raise ValueError(f"{len(bottoms)} bottom models but the combiner has {len(combiner.widths)} inputs")
        self.bottoms = nn.ModuleList(bottoms)
        self.top = top
        self.combiner = combiner

    def forward(self, x_slices: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(x_slices) != len(self.bottoms):
            raise ValueError(f"expected {len(self.bottoms)} feature slices, got {len(x_slices)}")
        return self.top(self.combiner.combine([b(x) for b, x in zip(self.bottoms, x_slices)]))


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@torch.no_grad()
def predict(model: ComposedModel, features: Sequence[np.ndarray], rows: np.ndarray | None = None,
            batch_size: int | None = None) -> np.ndarray:
    """Top outputs (float32 numpy) for ``rows`` (default: all), in eval mode; the previous mode is restored."""
    n = features[0].shape[0]
    rows = np.arange(n, dtype=np.int64) if rows is None else _rows(rows, "rows")
    was_training = model.training
    model.eval()
    try:
        outs = []
        step = batch_size or max(rows.size, 1)
        for i in range(0, rows.size, step):
            r = rows[i:i + step]
            outs.append(model([torch.from_numpy(np.ascontiguousarray(f[r])) for f in features]).numpy())
        if not outs:
            width = model(  # shape probe on one row, to return a correctly shaped empty array
                [torch.from_numpy(np.ascontiguousarray(f[:1])) for f in features]).shape[1:]
            return np.zeros((0, *width), dtype=np.float32)
        return np.concatenate(outs)
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------------------------------------- one step


def pullback(activations: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """A scalar whose gradient w.r.t. ``activations`` is exactly ``grad``: ``pullback(a, g).backward()`` gives every
    parameter behind ``a`` bit for bit the gradient ``a.backward(g)`` gives (the factor reaching ``a`` is ``1.0 * g``).

    Use it, not ``a.backward(g)`` or ``torch.autograd.grad(a, ..., grad_outputs=g)``: those check ``g``'s shape through
    ``torch.fx``'s symbolic shapes, whose first use imports sympy (half a second per process). The shape is checked
    here instead (``*`` would broadcast)."""
    if grad.shape != activations.shape:
        raise ValueError(f"gradient of shape {tuple(grad.shape)} for activations of shape {tuple(activations.shape)}")
    return (activations * grad).sum()


@dataclass(frozen=True, eq=False)
class StepResult:
    loss: float  # the batch-mean loss before the update
    outputs: torch.Tensor  # top outputs, detached
    cut_grads: list[torch.Tensor]  # what the label holder sends each holder: d(loss)/d(that holder's activations)


def split_step(bottoms: Sequence[nn.Module], top: nn.Module, combiner: Combiner,
               x_slices: Sequence[torch.Tensor], y: torch.Tensor,
               loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *,
               optimizers: Sequence[Optimizer] | None = None) -> StepResult:
    """One training step as the nodes do it. With ``optimizers`` (one per bottom, then the top's), gradients are
    zeroed first and every segment steps after its backward; without, gradients are only accumulated."""
    if len(bottoms) != len(x_slices):
        raise ValueError(f"{len(bottoms)} bottom models but {len(x_slices)} feature slices")
    if optimizers is not None and len(optimizers) != len(bottoms) + 1:
        raise ValueError(f"expected {len(bottoms) + 1} optimizers (bottoms, then top), got {len(optimizers)}")
    if optimizers is not None:
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
    # data holders: forward, keep the graph, send the activations (FORWARD)
    activations = [bottom(x) for bottom, x in zip(bottoms, x_slices)]
    received = [a.detach() for a in activations]
    # label holder: combine, top, loss, backward to the cut, split the gradient (BACKWARD), step
    combined = combiner.combine(received).requires_grad_(True)
    outputs = top(combined)
    loss = loss_fn(outputs, y)
    loss.backward()
    cut_grads = combiner.split(combined.grad)
    if optimizers is not None:
        optimizers[-1].step()
    # data holders: backward from the received gradient, step
    for i, (a, g) in enumerate(zip(activations, cut_grads)):
        pullback(a, g).backward()
        if optimizers is not None:
            optimizers[i].step()
    return StepResult(loss=float(loss.detach()), outputs=outputs.detach(), cut_grads=cut_grads)


# ---------------------------------------------------------------------------------------------------- central training


@dataclass(frozen=True, eq=False)
class CentralResult:
    bottom_states: list[dict[str, torch.Tensor]]  # final state_dict of each bottom, in combiner order
    top_state: dict[str, torch.Tensor]
    history: list[dict[str, float]]  # one entry per epoch (see train_central)
    step_losses: list[float]  # batch-mean loss of every step, before its update
    model: ComposedModel  # the trained copy


def train_central(features: Sequence[np.ndarray], labels: np.ndarray, bottoms: Sequence[nn.Module],
                  top: nn.Module, *, combiner: Combiner, task: str, schedule: Schedule | Sequence,
                  bottom_optimizers: OptimizerSpec | Sequence[OptimizerSpec] = OptimizerSpec(),
                  top_optimizer: OptimizerSpec = OptimizerSpec(),
                  validation: np.ndarray | None = None, copy_models: bool = True) -> CentralResult:
    """Train bottoms + combiner + top in one process on the batches of ``schedule``.

    ``features[i]`` is party ``i``'s float32 ``[n, d_i]`` matrix in the agreed row order (same order as
    ``bottoms`` and the combiner's widths); ``labels`` are encoded targets for ``task``. ``schedule`` is a
    :class:`Schedule` or a plain list of epochs of row-index arrays (then ``validation`` may name validation rows).
    The modules are deep-copied unless ``copy_models=False``.

    A segment chain in which every data holder feeds the first segment (issue 17) is ``top =
    nn.Sequential(segment_1, ..., top)``: one optimizer over all its parameters, which for SGD (momentum, weight
    decay) and Adam is the same as one per segment, their state being per parameter (tests/train/test_middle.py).

    ``history[e]`` has ``epoch`` (0-based), ``steps``, ``train_*`` metrics of the pre-update batch outputs of that
    epoch (what a label holder sees while training), and ``val_*`` metrics on the validation rows after the epoch.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    if len(features) != len(bottoms):
        raise ValueError(f"{len(features)} feature arrays but {len(bottoms)} bottom models")
    n = int(np.asarray(labels).shape[0])
    for i, f in enumerate(features):
        if f.ndim != 2 or f.shape[0] != n or f.dtype != np.float32:
            raise ValueError(f"features[{i}] must be float32 [{n}, d], got {f.dtype} {f.shape}")
    if isinstance(schedule, Schedule):
        epochs, val_rows = schedule.epochs, schedule.validation
    else:
        epochs = tuple(tuple(_rows(b, "batch") for b in batches) for batches in schedule)
        val_rows = _rows(validation if validation is not None else [], "validation rows")
    if isinstance(bottom_optimizers, OptimizerSpec):
        bottom_optimizers = [bottom_optimizers] * len(bottoms)
    if len(bottom_optimizers) != len(bottoms):
        raise ValueError(f"{len(bottom_optimizers)} bottom optimizer specs for {len(bottoms)} bottoms")

    if copy_models:
        bottoms = [copy.deepcopy(b) for b in bottoms]
        top = copy.deepcopy(top)
    model = ComposedModel(bottoms, top, combiner)
    model.train()
    optimizers = [spec.build(b.parameters()) for spec, b in zip(bottom_optimizers, bottoms)]
    optimizers.append(top_optimizer.build(top.parameters()))
    loss_fn = task_loss(task)
    targets = as_targets(task, labels)

    history, step_losses = [], []
    for e, batches in enumerate(epochs):
        outs, ys = [], []
        for rows in batches:
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            x = [torch.from_numpy(np.ascontiguousarray(f[rows])) for f in features]
            y = targets[torch.from_numpy(rows)]
            out = model(x)
            loss = loss_fn(out, y)
            loss.backward()
            for opt in optimizers:
                opt.step()
            step_losses.append(float(loss.detach()))
            outs.append(out.detach().numpy())
            ys.append(y.numpy())
        record: dict[str, float] = {"epoch": e, "steps": len(batches)}
        if outs:
            record.update({f"train_{k}": v for k, v in
                           evaluate(task, np.concatenate(outs), np.concatenate(ys)).items()})
        if val_rows.size:
            val_out = predict(model, features, val_rows)
            record.update({f"val_{k}": v for k, v in evaluate(task, val_out, np.asarray(labels)[val_rows]).items()})
        history.append(record)
    return CentralResult(bottom_states=[_state(b) for b in bottoms], top_state=_state(top), history=history,
                         step_losses=step_losses, model=model)
