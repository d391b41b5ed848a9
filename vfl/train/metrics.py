"""Evaluation metrics in plain numpy (float64 inside): losses, accuracy, ROC AUC, RMSE.

``outputs`` are what the top model produces: logits ``[n, k]`` for multiclass, one logit ``[n, 1]`` (or ``[n]``) for
binary, one value ``[n, 1]`` (or ``[n]``) for regression. ``targets`` are the encoded labels (int class indices,
0/1, or values; see :func:`vfl.train.data.encode_labels`).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "accuracy",
    "binary_cross_entropy_with_logits",
    "cross_entropy",
    "evaluate",
    "mean_squared_error",
    "rmse",
    "roc_auc",
]


def _column(outputs, n_name: str = "outputs") -> np.ndarray:
    x = np.asarray(outputs, dtype=np.float64)
    if x.ndim == 2 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 1:
        raise ValueError(f"{n_name} must have shape [n] or [n, 1], got {x.shape}")
    return x


def _same_length(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"outputs have {a.shape[0]} rows but targets have {b.shape[0]}")


def cross_entropy(logits, targets) -> float:
    """Mean softmax cross-entropy of ``[n, k]`` logits against int class indices (log-sum-exp, stable)."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(targets).astype(np.int64)
    if z.ndim != 2:
        raise ValueError(f"multiclass logits must have shape [n, k], got {z.shape}")
    _same_length(z, y)
    if y.size and (y.min() < 0 or y.max() >= z.shape[1]):
        raise ValueError(f"class index out of range [0, {z.shape[1]})")
    if z.shape[0] == 0:
        return math.nan
    m = z.max(axis=1, keepdims=True)
    lse = (m[:, 0] + np.log(np.exp(z - m).sum(axis=1)))
    return float(np.mean(lse - z[np.arange(z.shape[0]), y]))


def binary_cross_entropy_with_logits(logits, targets) -> float:
    """Mean ``-[y log s(z) + (1-y) log(1-s(z))]`` computed stably from logits ``z``."""
    z = _column(logits, "binary logits")
    y = np.asarray(targets, dtype=np.float64).reshape(-1)
    _same_length(z, y)
    if z.shape[0] == 0:
        return math.nan
    # log(1 + exp(-|z|)) + max(z, 0) - z*y  ==  softplus(z) - z*y
    return float(np.mean(np.maximum(z, 0.0) - z * y + np.log1p(np.exp(-np.abs(z)))))


def mean_squared_error(predictions, targets) -> float:
    p = _column(predictions, "predictions")
    y = np.asarray(targets, dtype=np.float64).reshape(-1)
    _same_length(p, y)
    if p.shape[0] == 0:
        return math.nan
    return float(np.mean((p - y) ** 2))


def rmse(predictions, targets) -> float:
    """Root mean squared error."""
    return math.sqrt(mean_squared_error(predictions, targets)) if len(np.asarray(targets).reshape(-1)) else math.nan


def accuracy(outputs, targets, task: str) -> float:
    """Fraction correct: argmax of logits (multiclass), or logit > 0 i.e. probability > 0.5 (binary)."""
    y = np.asarray(targets)
    if task == "multiclass":
        z = np.asarray(outputs, dtype=np.float64)
        if z.ndim != 2:
            raise ValueError(f"multiclass logits must have shape [n, k], got {z.shape}")
        pred = z.argmax(axis=1)
        y = y.astype(np.int64)
    elif task == "binary":
        z = _column(outputs, "binary logits")
        pred = (z > 0).astype(np.int64)
        y = np.asarray(y, dtype=np.float64).reshape(-1).astype(np.int64)
    else:
        raise ValueError(f"accuracy is defined for multiclass and binary tasks, not {task!r}")
    _same_length(pred, y)
    return float(np.mean(pred == y)) if y.shape[0] else math.nan


def roc_auc(targets, scores) -> float:
    """Exact ROC AUC for binary targets (0/1 or bool) and real scores; ties count one half.

    Mann-Whitney U from average ranks: ``(R+ - n+(n+ + 1)/2) / (n+ n-)``, where ``R+`` is the rank sum of the
    positives. Returns NaN when only one class is present (AUC undefined).
    """
    y = np.asarray(targets).reshape(-1)
    s = np.asarray(scores, dtype=np.float64)
    s = _column(s, "scores")
    _same_length(s, y)
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    if y.dtype.kind == "f" and not np.all((y == 0) | (y == 1)):
        raise ValueError("binary targets must be 0 or 1")
    pos = y.astype(bool)
    n_pos = int(pos.sum())
    n_neg = int(pos.shape[0] - n_pos)
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    n = s.shape[0]
    new_group = np.empty(n, dtype=bool)
    new_group[0] = True
    new_group[1:] = sorted_s[1:] != sorted_s[:-1]
    starts = np.flatnonzero(new_group)
    ends = np.append(starts[1:], n)
    avg_rank = (starts + 1 + ends) / 2.0  # mean of the 1-based ranks starts+1 .. ends
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = avg_rank[np.cumsum(new_group) - 1]
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def evaluate(task: str, outputs, targets) -> dict[str, float]:
    """All metrics of a task: multiclass ``loss, accuracy``; binary ``loss, accuracy, auc``; regression
    ``loss`` (MSE, the training loss) and ``rmse``."""
    if task == "multiclass":
        return {"loss": cross_entropy(outputs, targets), "accuracy": accuracy(outputs, targets, task)}
    if task == "binary":
        return {"loss": binary_cross_entropy_with_logits(outputs, targets),
                "accuracy": accuracy(outputs, targets, task),
                "auc": roc_auc(targets, outputs) if np.asarray(targets).size else math.nan}
    if task == "regression":
        mse = mean_squared_error(outputs, targets)
        return {"loss": mse, "rmse": math.sqrt(mse) if not math.isnan(mse) else math.nan}
    raise ValueError(f"unknown task {task!r}")
