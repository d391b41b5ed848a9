"""Checks over large integer arrays (row positions) that stay fast at 10-100 million rows.

``np.unique`` hashes its input in the numpy these machines carry (2.4): 10 s for 10M int64 rows, against 0.7 s to
sort them. The row checks a node runs on a peer's message or its own schedule must not be the slow part of a 10M-row
session (a node that computes for longer than a peer timeout sends no heartbeats)."""

from __future__ import annotations

import numpy as np


def has_repeats(values: np.ndarray) -> bool:
    """Does any value occur twice in the 1-D array ``values``?"""
    if len(values) < 2:
        return False
    s = np.sort(values, kind="stable")
    return bool((s[1:] == s[:-1]).any())
