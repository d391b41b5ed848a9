"""``vfl.node.background.in_background``: the work's result or its exception comes back to the caller's thread,
``tick`` runs meanwhile, and a ``tick`` that raises stops the wait at once."""

from __future__ import annotations

import threading

import pytest

from vfl.node.background import Abandoned, in_background


def test_the_result_comes_back_and_tick_ran_while_the_work_ran():
    started, release = threading.Event(), threading.Event()
    ticks = []

    def work():
        started.set()
        release.wait(10)
        return 42

    def tick():
        ticks.append(threading.current_thread())
        if len(ticks) == 3:
            release.set()

    assert in_background(work, tick, every_s=0.01) == 42
    assert started.is_set() and len(ticks) >= 3
    assert all(t is threading.main_thread() for t in ticks)  # the caller's thread: the only one touching sockets


def test_the_works_exception_is_raised_in_the_callers_thread():
    def work():
        raise ValueError("no such column")

    with pytest.raises(ValueError, match="no such column"):
        in_background(work, lambda: None, every_s=0.01)


def test_a_tick_that_raises_abandons_the_work_at_once():
    release = threading.Event()

    def tick():
        raise Abandoned("SIGTERM")

    try:
        with pytest.raises(Abandoned):
            in_background(lambda: release.wait(10), tick, every_s=0.01)
    finally:
        release.set()  # the daemon thread ends too
