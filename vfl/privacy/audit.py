"""The label-leakage audit: the best known attacks a data holder can run on the gradients it receives, run by the
label holder on exactly what it sent (it knows the true labels, so it can score them).

Attacks (Li et al. 2021, "Label Leakage and Protection in Two-party Split Learning", arXiv 2102.08504):

- **norm attack** (binary): score each row by its gradient's L2 norm. With imbalanced classes the rare class has
  the larger loss gradient, so the norm separates the labels. Reported as the ROC AUC of that score against the
  true labels, folded to ``max(AUC, 1 - AUC)`` (an attacker who finds the score anti-correlated flips it; 0.5 means
  no leak, 1 a perfect one).
- **direction attack** (binary): in a binary split network a row's gradient is ``(sigmoid(z) - y)`` times one
  vector per step, so gradients of the same label point the same way. Li et al.'s attacker knows the label of one
  example per batch; here that reference is, deterministically, **the first row of each batch** (in the order the
  rows were sent). Every other row of the batch is scored by its cosine similarity to the reference, negated when
  the reference's label is 0 (so a high score always means "positive"); a zero gradient has cosine 0. Reported as
  the folded AUC of those scores over all non-reference rows of the epoch.
- **cluster attack** (multiclass, the direction attack's equivalent): per batch, the attacker knows one labelled
  row per class present, **the first row of each class in the batch**; every other row is given the class of the
  reference it is most cosine-similar to (ties: the smallest class index). Reported as the accuracy over the
  non-reference rows (compare with the majority-class rate, what guessing achieves).

A data holder running these same functions on the gradients it received, with ``batch_ids`` its step numbers, gets
the same figures as the label holder's audit: the scores of a row depend only on its batch, computed the same way.
The cost is one float64 copy of one batch at a time, ``O(rows * width)`` per epoch, and one sort for the AUC.
"""

from __future__ import annotations

import math

import numpy as np

from vfl.train.metrics import roc_auc

from ._arrays import as_grads, as_labels
from .spec import PrivacyError

__all__ = ["LeakAudit", "cluster_attack_accuracy", "direction_leak_auc", "norm_leak_auc"]

_TASKS = ("multiclass", "binary", "regression")


def _folded_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """``max(AUC, 1 - AUC)`` of ``scores`` for binary ``labels``; NaN when a class is missing (AUC undefined)."""
    if labels.size == 0:
        return math.nan
    auc = roc_auc(labels, scores)
    return auc if math.isnan(auc) else max(auc, 1.0 - auc)


def _dots(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise dot products, summed along each row alone (no BLAS): a row's value does not depend on where the row
    sits in memory or how many rows come with it, so the audit and an attacker computing on the same batch agree to
    the last bit."""
    return (a * b).sum(axis=1)


def _norms(g: np.ndarray) -> np.ndarray:
    return np.sqrt(_dots(g, g))


def _unit_rows(g: np.ndarray) -> np.ndarray:
    """Each row divided by its norm; zero rows stay zero (their cosine to anything is 0)."""
    n = _norms(g)
    return np.divide(g, n[:, None], out=np.zeros_like(g), where=n[:, None] > 0)


def _direction_scores(g: np.ndarray, y: np.ndarray) -> np.ndarray:
    """One batch: the oriented cosine of rows 1.. to row 0, the reference (see the module docstring)."""
    unit = _unit_rows(g)
    sign = 1.0 if y[0] == 1 else -1.0
    return sign * _dots(unit[1:], unit[:1])


def _cluster_hits(g: np.ndarray, y: np.ndarray) -> tuple[int, int]:
    """One batch: (correct, attacked) of the cluster attack on the rows that are not references."""
    classes, first = np.unique(y, return_index=True)
    attacked = np.ones(y.shape[0], dtype=bool)
    attacked[first] = False
    if not attacked.any():
        return 0, 0
    unit = _unit_rows(g)
    rows = unit[attacked]
    similarity = np.stack([_dots(rows, unit[i:i + 1]) for i in first], axis=1)
    guess = classes[np.argmax(similarity, axis=1)]
    return int(np.count_nonzero(guess == y[attacked])), int(np.count_nonzero(attacked))


def _batches(batch_ids, rows: int):
    """Index arrays of the rows of each batch, each in the given row order (stable), batches by ascending id."""
    ids = np.asarray(batch_ids).reshape(-1)
    if ids.shape[0] != rows:
        raise PrivacyError(f"{ids.shape[0]} batch ids for {rows} gradient rows")
    order = np.argsort(ids, kind="stable")
    cuts = np.flatnonzero(ids[order][1:] != ids[order][:-1]) + 1
    return np.split(order, cuts) if rows else []


def _binary(grads, labels) -> tuple[np.ndarray, np.ndarray]:
    g = np.asarray(grads)
    if g.ndim != 2:
        raise PrivacyError(f"gradients must have shape [rows, width], got {g.shape}")
    return g, as_labels(labels, g.shape[0], 2)


def norm_leak_auc(grads, labels) -> float:
    """The norm attack's folded AUC (score = row L2 norm) for binary ``labels`` {0, 1}; NaN if a class is absent."""
    g, y = _binary(grads, labels)
    return _folded_auc(y, _norms(as_grads(g)))


def direction_leak_auc(grads, labels, batch_ids) -> float:
    """The direction attack's folded AUC: per batch (rows with equal ``batch_ids``), the oriented cosine of each row
    to the batch's first row (see the module docstring). NaN if the scored rows lack a class."""
    g, y = _binary(grads, labels)
    scores, truth = [], []
    for rows in _batches(batch_ids, g.shape[0]):
        scores.append(_direction_scores(as_grads(g[rows]), y[rows]))
        truth.append(y[rows[1:]])
    if not scores:
        return math.nan
    return _folded_auc(np.concatenate(truth), np.concatenate(scores))


def cluster_attack_accuracy(grads, labels, batch_ids, n_classes: int) -> float:
    """The cluster attack's accuracy over the rows that are not references (see the module docstring); NaN when no
    row is attacked (every batch holds at most one row per class)."""
    g = np.asarray(grads)
    if g.ndim != 2:
        raise PrivacyError(f"gradients must have shape [rows, width], got {g.shape}")
    y = as_labels(labels, g.shape[0], n_classes)
    correct = attacked = 0
    for rows in _batches(batch_ids, g.shape[0]):
        c, a = _cluster_hits(as_grads(g[rows]), y[rows])
        correct, attacked = correct + c, attacked + a
    return correct / attacked if attacked else math.nan


class LeakAudit:
    """One epoch's audit at the label holder, per data holder: ``add`` each step's gradient exactly as sent to that
    party with the TRUE labels of its rows (with label_dp the training labels differ; the audit measures what the
    attacker learns about the truth), then ``result`` once per epoch.

    Each ``add`` is one batch (batch id = the party's step number within the epoch) and is scored at once, so the
    audit keeps only a few numbers per row, not the gradients. ``result`` gives, per party, ``leak_auc_norm`` and
    ``leak_auc_direction`` (binary) or ``leak_attack_accuracy`` (multiclass); for regression it is ``{}`` (label
    leakage through these attacks is defined for class labels) and ``add`` does nothing. A figure is NaN when it is
    undefined (an epoch whose rows are all of one class) or unknown (a step sent NaN or infinite gradients: the
    audit never stops a run). ``result`` then resets for the next epoch.
    """

    def __init__(self, task: str, n_classes: int):
        if task not in _TASKS:
            raise PrivacyError(f"unknown task {task!r}; use one of {', '.join(_TASKS)}")
        if task == "multiclass" and (not isinstance(n_classes, int) or n_classes < 2):
            raise PrivacyError(f"a multiclass audit needs n_classes >= 2, got {n_classes!r}")
        self.task = task
        self.n_classes = 2 if task == "binary" else n_classes
        self._parties: dict[str, dict[str, list]] = {}

    def add(self, party: str, grads: np.ndarray, labels: np.ndarray) -> None:
        """Score one step's gradient ``[b, w]`` as sent to ``party``, with the true labels ``[b]``."""
        if self.task == "regression":
            return
        g = as_grads(grads, finite=False)
        y = as_labels(labels, g.shape[0], self.n_classes)
        acc = self._parties.setdefault(party, {"norm": [], "label": [], "direction": [], "dir_label": [],
                                               "hits": [0, 0], "finite": True})
        if not np.isfinite(g).all():  # a diverged step: no figure this epoch, but the run goes on
            acc["finite"] = False
        if g.shape[0] == 0 or not acc["finite"]:
            return
        if self.task == "binary":
            acc["norm"].append(_norms(g))
            acc["label"].append(y)
            acc["direction"].append(_direction_scores(g, y))
            acc["dir_label"].append(y[1:])
        else:
            c, a = _cluster_hits(g, y)
            acc["hits"][0] += c
            acc["hits"][1] += a

    def result(self) -> dict[str, dict[str, float]]:
        """The epoch's figures per party (see the class docstring), then an empty audit for the next epoch."""
        out: dict[str, dict[str, float]] = {}
        for party, acc in self._parties.items():
            if not acc["finite"]:
                keys = ("leak_auc_norm", "leak_auc_direction") if self.task == "binary" else ("leak_attack_accuracy",)
                out[party] = dict.fromkeys(keys, math.nan)
            elif self.task == "binary":
                out[party] = {
                    "leak_auc_norm": _folded_auc(_cat(acc["label"]), _cat(acc["norm"])),
                    "leak_auc_direction": _folded_auc(_cat(acc["dir_label"]), _cat(acc["direction"])),
                }
            else:
                c, a = acc["hits"]
                out[party] = {"leak_attack_accuracy": c / a if a else math.nan}
        self._parties = {}
        return out

    def state(self) -> dict:
        """The epoch so far, as plain numbers and arrays: the label holder's checkpoint carries it, so a run resumed
        mid-epoch reports the figures of the whole epoch, as an uninterrupted run does (``load_state``)."""
        return {
            party: {"norm": _cat(acc["norm"]), "label": _cat(acc["label"], np.int64),
                    "direction": _cat(acc["direction"]), "dir_label": _cat(acc["dir_label"], np.int64),
                    "hits": [int(acc["hits"][0]), int(acc["hits"][1])], "finite": bool(acc["finite"])}
            for party, acc in self._parties.items()
        }

    def load_state(self, state) -> None:
        """Go on from ``state`` (a ``state()``, its arrays possibly as tensors or lists): the epoch so far."""
        self._parties = {}
        for party, acc in dict(state or {}).items():
            self._parties[str(party)] = {
                "norm": [np.asarray(acc["norm"], dtype=np.float64)],
                "label": [np.asarray(acc["label"], dtype=np.int64)],
                "direction": [np.asarray(acc["direction"], dtype=np.float64)],
                "dir_label": [np.asarray(acc["dir_label"], dtype=np.int64)],
                "hits": [int(acc["hits"][0]), int(acc["hits"][1])],
                "finite": bool(acc["finite"]),
            }


def _cat(parts: list[np.ndarray], dtype=np.float64) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
