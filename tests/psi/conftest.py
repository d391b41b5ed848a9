"""Shared fixtures for the PSI tests: an inline engine (workers=1) and a helper to check curve membership."""

from __future__ import annotations

import numpy as np
import pytest

from vfl.psi.curve import P
from vfl.psi.engine import PsiEngine


def on_main_curve(u: int) -> bool:
    """Independent check (Euler's criterion, not the code under test): u^3 + A u^2 + u is a nonzero square."""
    v = (u * u * u + 486662 * u * u + u) % P
    return v != 0 and pow(v, (P - 1) // 2, P) == 1


def all_on_main_curve(points: np.ndarray) -> bool:
    return all(on_main_curve(int.from_bytes(bytes(row), "little")) for row in points)


@pytest.fixture(scope="session")
def engine():
    with PsiEngine(workers=1) as eng:
        yield eng
