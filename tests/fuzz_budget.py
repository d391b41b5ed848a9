"""How many examples the heaviest hypothesis fuzzers draw.

``make test`` (CI) draws a fifth of each one's full count: the codec, bounds and machine fuzzers took about 150 s of
the suite at their full counts. ``VFL_FUZZ=full make test`` draws the full counts (run it before a release, or after
touching the codec or a machine); the hypothesis database replays any failure either way."""

from __future__ import annotations

import os

FULL = os.environ.get("VFL_FUZZ", "").strip().lower() == "full"


def examples(full: int) -> int:
    """``full`` under ``VFL_FUZZ=full``, else a fifth of it (at least 50)."""
    return full if FULL else max(50, full // 5)
