"""Issue 12 with real node processes: one party's connections replace each other cleanly ([S1], [S5]).

Before issue 12 the label holder's ROUTER handed a routing id over to whichever connection claimed it last, and two
connections racing for one routing id ended the label holder in ``Assertion failed: !_io_error``: 3 of 3 tries with
the same data holder started twice. Now every socket has its own routing id and the session layer switches a party
to its newest connection, telling the old one ``ERROR REPLACED``.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from .procs import Nodes
from .test_sessions import FAST, session

LIBZMQ_ABORT = "Assertion failed"


def label_holder_and_dh1(nodes: Nodes, cfg: dict):
    """The label holder listening and dh1 past its link check, in READY."""
    lh = nodes.start(cfg["bank"])
    lh.wait_for("listening on")
    dh1 = nodes.start(cfg["dh1"])
    dh1.wait_for("link check:")
    return lh, dh1


@pytest.mark.parametrize("attempt", range(3))
def test_S5_the_same_data_holder_started_twice_replaces_the_first(tmp_path, attempt):
    cfg = session(tmp_path, hold=60.0)
    with Nodes(tmp_path) as nodes:
        lh, first = label_holder_and_dh1(nodes, cfg)
        second = nodes.start(cfg["dh1"])  # started by mistake with the same config and key
        assert first.wait(timeout=20) == 1, first.output
        assert "replaced" in first.output, first.output
        second.wait_for("link check:")
        assert lh.proc.poll() is None, lh.output
        lh.proc.send_signal(signal.SIGTERM)
        assert lh.wait(timeout=10) == 0, lh.output
        assert second.wait(timeout=10) == 1
        assert "ended the session: stopped by SIGTERM" in second.output
    assert LIBZMQ_ABORT not in lh.output
    assert "data holder 'dh1' joined" in lh.output and "data holder 'dh1' rejoined" in lh.output
    assert "a new connection with its key replaced the old one" in lh.output


def test_S5_a_data_holder_killed_and_restarted_at_once_takes_its_place(tmp_path):
    cfg = session(tmp_path, hold=60.0)
    with Nodes(tmp_path) as nodes:
        lh, first = label_holder_and_dh1(nodes, cfg)
        os.kill(first.proc.pid, signal.SIGKILL)
        second = nodes.start(cfg["dh1"])
        second.wait_for("link check:")
        time.sleep(FAST["peer"] + 1)  # past the peer timeout: the label holder still serves the new connection
        assert lh.proc.poll() is None, lh.output
        assert second.proc.poll() is None, second.output
        lh.proc.send_signal(signal.SIGTERM)
        assert lh.wait(timeout=10) == 0, lh.output
    assert LIBZMQ_ABORT not in lh.output
