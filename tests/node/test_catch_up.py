"""After a step longer than a heartbeat, the node reads what its peers sent meanwhile before it looks at the peer
timers (vfl/node/catch_up.py): in bench/scale.py the label holder spent 106 s writing 10M aligned rows and building
its model, then declared a data holder that had heartbeat all along lost, and the 10M PSI ran again."""

from __future__ import annotations

import pytest

from vfl.node.catch_up import CatchUp


def test_a_short_step_never_defers_the_timers():
    c = CatchUp(busy_s=1.0, limit_s=5.0)
    c.busy(looked_at=10.0, now=10.9)
    assert not c.defer_timers(10.9, backlog=True)


def test_after_a_long_step_the_timers_wait_until_the_backlog_is_read():
    c = CatchUp(busy_s=1.0, limit_s=5.0)
    c.busy(looked_at=10.0, now=116.0)  # 106 s without reading the socket
    assert c.defer_timers(116.0, backlog=True)
    c.busy(looked_at=116.0, now=116.1)  # reading it is quick: no new catch-up
    assert c.defer_timers(116.2, backlog=True)
    assert not c.defer_timers(116.3, backlog=False)  # all read: the timers run, on the peers' fresh clocks
    assert not c.defer_timers(116.4, backlog=True)  # and the next backlog is ordinary traffic


def test_a_peer_that_floods_the_socket_holds_the_timers_off_for_at_most_the_limit():
    c = CatchUp(busy_s=1.0, limit_s=5.0)
    c.busy(looked_at=0.0, now=20.0)
    assert c.defer_timers(24.9, backlog=True)
    assert not c.defer_timers(25.1, backlog=True)
    assert not c.defer_timers(26.0, backlog=True)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        CatchUp(busy_s=0, limit_s=1)
