"""Messages libzmq could not take yet, queued per peer, with a byte budget (PROTOCOL.md section 7).

libzmq queues up to the high-water mark for each peer; past it a send fails with ``EAGAIN`` and the node keeps the
message here instead of blocking. One queue per peer, so a peer that does not read holds up only its own messages,
never another party's. A queue that stays over ``limit_bytes``, or makes no progress for ``stall_s``, belongs to a
peer that is not reading: the node drops the queue and tells the session machine, which treats the peer as gone.

Pure bookkeeping: no sockets, no clock (callers pass ``now``).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Iterator

MAX_DROPPED = 1024  # routing ids remembered as dropped (fresh per socket, so old ones only ever matter briefly)


@dataclass
class _Queue:
    items: deque = field(default_factory=deque)  # (frames, message type, bytes)
    nbytes: int = 0
    progress_at: float = 0.0  # last time libzmq took one of this peer's messages (or the queue started)


def frames_bytes(frames: list[Any]) -> int:
    return sum(f.nbytes if hasattr(f, "nbytes") else len(f) for f in frames)


class Outbox:
    """Per-peer FIFO queues keyed by routing id (``None``: a data holder's one peer)."""

    def __init__(self, limit_bytes: int, stall_s: float):
        self.limit_bytes = limit_bytes
        self.stall_s = stall_s
        self._queues: dict[bytes | None, _Queue] = {}
        # a dropped peer keeps at most the one message queued right after the drop (its ERROR); the rest is discarded
        self._dropped: OrderedDict[bytes | None, None] = OrderedDict()

    def __bool__(self) -> bool:
        return bool(self._queues)

    def __contains__(self, to: bytes | None) -> bool:
        return to in self._queues

    def push(self, to: bytes | None, frames: list[Any], mtype: str, now: float) -> bool:
        """Queue one message behind this peer's others; False if the peer was dropped and the message discarded."""
        q = self._queues.get(to)
        if to in self._dropped and q is not None:
            return False
        if q is None:
            q = self._queues[to] = _Queue(progress_at=now)
        n = frames_bytes(frames)
        q.items.append((frames, mtype, n))
        q.nbytes += n
        return True

    def peers(self) -> list[bytes | None]:
        return list(self._queues)

    def head(self, to: bytes | None) -> tuple[list[Any], str]:
        frames, mtype, _ = self._queues[to].items[0]
        return frames, mtype

    def pop(self, to: bytes | None, now: float) -> int:
        """The head of ``to``'s queue went out (or can never go): forget it. Returns its size."""
        q = self._queues[to]
        _, _, n = q.items.popleft()
        q.nbytes -= n
        q.progress_at = now
        if not q.items:
            del self._queues[to]
        return n

    def over_budget(self, now: float) -> Iterator[tuple[bytes, str]]:
        """Peers (label holder side: routing ids) that are not reading, with the reason, not yet dropped."""
        for to, q in list(self._queues.items()):
            if to is None or to in self._dropped:
                continue
            if q.nbytes > self.limit_bytes:
                yield to, f"{q.nbytes} bytes are waiting to be sent to it, over the budget of {self.limit_bytes}"
            elif now - q.progress_at > self.stall_s:
                yield to, f"it has read nothing for {now - q.progress_at:.0f} s while {q.nbytes} bytes wait for it"

    def drop(self, to: bytes | None) -> int:
        """Discard everything queued for ``to`` and refuse its further messages but one. Returns the bytes freed."""
        q = self._queues.pop(to, None)
        self._dropped[to] = None
        while len(self._dropped) > MAX_DROPPED:
            self._dropped.popitem(last=False)
        return q.nbytes if q is not None else 0
