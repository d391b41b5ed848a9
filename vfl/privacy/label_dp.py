"""Label differential privacy by k-ary randomized response (Warner 1965; as label DP in Ghazi et al. 2021, "Deep
Learning with Label Differential Privacy", arXiv 2102.06062): the label holder replaces its training labels ONCE per
run, before training, so every gradient it ever sends is computed from randomised labels.

Each label is kept with probability ``e^eps / (e^eps + k - 1)`` and otherwise replaced by one of the other ``k - 1``
classes uniformly at random. For any two true labels ``y, y'`` and any output ``o``,
``P(o | y) / P(o | y') <= e^eps``: the labels the training sees (and so everything computed from them, the data
holders' gradients included) are ``eps``-label-DP. Nothing protects the true labels more than that, and the model
learns from the randomised ones (a cost in accuracy that grows as ``eps`` falls). RR-with-prior (Ghazi et al.'s
refinement) is not implemented.
"""

from __future__ import annotations

import math

import numpy as np

from ._arrays import as_labels

__all__ = ["flip_probability", "randomize_labels"]


def _check(n_classes: int, epsilon: float) -> None:
    if isinstance(n_classes, bool) or not isinstance(n_classes, (int, np.integer)) or n_classes < 2:
        raise ValueError(f"randomized response needs n_classes >= 2, got {n_classes!r}")
    if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"randomized response needs a finite epsilon > 0, got {epsilon!r}")


def flip_probability(n_classes: int, epsilon: float) -> float:
    """The probability that a label is changed: ``1 - e^eps / (e^eps + k - 1) = (k - 1) / (e^eps + k - 1)``,
    computed as ``(k - 1) e^-eps / (1 + (k - 1) e^-eps)`` so a large epsilon does not overflow."""
    _check(n_classes, epsilon)
    t = (n_classes - 1) * math.exp(-epsilon)
    return t / (1.0 + t)


def randomize_labels(labels, n_classes: int, epsilon: float, rng: np.random.Generator) -> np.ndarray:
    """``labels`` (class indices in ``[0, n_classes)``, int or the 0/1 floats of a binary task) with each one, with
    probability :func:`flip_probability`, replaced by a uniformly drawn *other* class. Same shape and dtype. Draws
    one uniform and one integer array of ``len(labels)`` from ``rng``, so a seeded generator repeats the result."""
    q = flip_probability(n_classes, epsilon)
    original = np.asarray(labels)
    y = as_labels(original, original.size, n_classes)
    flip = rng.random(y.shape[0]) < q
    shift = rng.integers(1, n_classes, size=y.shape[0])  # 1..k-1: never the class itself
    out = np.where(flip, (y + shift) % n_classes, y)
    return out.reshape(original.shape).astype(original.dtype)
