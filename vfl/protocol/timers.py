"""Pure timers: nothing here reads a clock. The node passes ``now`` (seconds, monotonic) in, as aioquic does."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenBucket:
    """At most ``capacity`` events at once, refilled at ``rate`` per second (PROTOCOL.md [R2])."""

    capacity: float
    rate: float
    tokens: float = field(default=-1.0)
    stamp: float = 0.0

    def allow(self, now: float, cost: float = 1.0) -> bool:
        """Take ``cost`` tokens if there are that many (events count 1; a byte budget counts bytes)."""
        if self.tokens < 0:  # first use: full
            self.tokens, self.stamp = self.capacity, now
        self.tokens = min(self.capacity, self.tokens + max(0.0, now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= cost:
            self.tokens -= cost
            return True
        return False


@dataclass
class PeerClock:
    """When we last heard from and last sent to one peer; answers the two liveness questions of [L1] and [L2]."""

    last_received: float
    last_sent: float

    def heartbeat_due(self, interval: float) -> float:
        return self.last_sent + interval

    def lost_at(self, timeout: float) -> float:
        return self.last_received + timeout


class Reminder:
    """When a node that waits should say again that it still does: every ``every_s`` seconds from ``since``."""

    def __init__(self, since: float, every_s: float = 10.0):
        self.since, self.every_s, self.at = since, every_s, since + every_s

    def due(self, now: float) -> float | None:
        """The seconds waited so far if a reminder is due now (the next is then ``every_s`` later), else None."""
        if now < self.at:
            return None
        self.at = now + self.every_s
        return now - self.since
