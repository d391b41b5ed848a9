"""Checks over large integer arrays (row positions) that stay fast at 10-100 million rows.

``np.unique`` hashes its input in the numpy these machines carry (2.4): 10 s for 10M int64 rows, against 0.7 s to
sort them. The row checks a node runs on a peer's message or its own schedule must not be the slow part of a 10M-row
session (a node that computes for longer than a peer timeout sends no heartbeats)."""

from __future__ import annotations

import numpy as np


def has_repeats(values: np.ndarray, bound: int | None = None) -> bool:
    """Does any value occur twice in the 1-D array ``values``?

    ``bound``: every value is known to be in ``[0, bound)`` (checked by the caller). Then one byte per possible value
    is marked instead of sorting a copy: 10 MB instead of 80 MB for a 10M-row epoch order, which a training data
    holder would otherwise need on top of everything it holds when each EPOCH comes."""
    if len(values) < 2:
        return False
    if bound is not None and bound <= 8 * len(values):
        marks = np.zeros(bound, dtype=bool)
        marks[values] = True
        return int(np.count_nonzero(marks)) != len(values)
    s = np.sort(values, kind="stable")
    return bool((s[1:] == s[:-1]).any())


def positions_except(n: int, excluded: np.ndarray) -> np.ndarray:
    """``0 .. n-1`` without the values of ``excluded`` (all in ``[0, n)``), ascending: ``np.setdiff1d(np.arange(n),
    excluded)`` without its sorts of two n-sized copies (a few hundred MB at 10M rows, all at once)."""
    keep = np.ones(n, dtype=bool)
    keep[np.asarray(excluded, dtype=np.int64)] = False
    return np.flatnonzero(keep)
