"""Peer timers after the node itself was busy: read what the peers sent meanwhile before judging their silence.

Why: the node loop is single-threaded. A step that takes longer than a heartbeat interval (the label holder
writing 10M aligned rows and building its model took 106 s in ``bench/scale.py``) leaves every message the peers
sent meanwhile unread in the socket; libzmq's I/O thread has received them. Looking at the peer timers first makes
a peer that heartbeat all along look silent: the label holder declared a live data holder lost, and the session
ran its 10M PSI again. So after such a step the timers wait while that backlog is read, for at most ``limit_s``
(a peer that floods the socket cannot hold the timers off for longer). Pure: the caller passes every time.
"""

from __future__ import annotations


class CatchUp:
    """``busy(looked_at, now)`` after each step; ``defer_timers(now, backlog)`` before the timers."""

    def __init__(self, busy_s: float, limit_s: float) -> None:
        if busy_s <= 0 or limit_s <= 0:
            raise ValueError("busy_s and limit_s must be > 0")
        self.busy_s = float(busy_s)
        self.limit_s = float(limit_s)
        self.since: float | None = None  # when the current catch-up started (None: not catching up)

    def busy(self, looked_at: float, now: float) -> None:
        """The socket was last looked at ``looked_at``; if that is more than ``busy_s`` ago, catch up first."""
        if self.since is None and now - looked_at > self.busy_s:
            self.since = now

    def defer_timers(self, now: float, backlog: bool) -> bool:
        """Whether the timers wait for now: a catch-up is on, messages are still waiting, and ``limit_s`` has not
        passed since it started."""
        if self.since is None:
            return False
        if not backlog or now - self.since > self.limit_s:
            self.since = None
            return False
        return True
