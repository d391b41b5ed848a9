"""Long local work that must not silence a node: the work runs on a thread while the node loop's thread ticks.

A node that computes for longer than its peers' ``[timeouts].peer`` without a heartbeat is declared lost by them,
and its queued messages (the end of its PSI_ROWS, say) wait with it. At 10M rows the label holder's schedule takes
about 40 s to draw, so building the training segment happens here: ``tick`` sends the heartbeats that fall due and
hands queued messages to libzmq, and reads nothing, so the machine sees every message after the work, in order (the
node loop's catch-up reads that backlog before its timers: ``catch_up``).
"""

from __future__ import annotations

import threading
from typing import Callable, TypeVar

from ..errors import ExitCode, VflError

T = TypeVar("T")

#: seconds between two ticks while the work runs (well under any heartbeat interval)
TICK_S = 0.05


class Abandoned(VflError):
    """Raised by a ``tick`` to stop waiting for the work (the node was stopped meanwhile). The thread is a daemon:
    what it computes is dropped, and the process may exit without waiting for it. The node loop closes the session
    itself (a pause, [J2]): this never reaches the command line."""

    exit_code = ExitCode.INTERRUPTED


def in_background(work: Callable[[], T], tick: Callable[[], None], every_s: float = TICK_S) -> T:
    """``work()`` on a daemon thread, ``tick()`` on this one every ``every_s`` until it is done; its result, or its
    exception re-raised here (with its traceback). An exception from ``tick`` (``Abandoned``) is raised at once."""
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["result"] = work()
        except BaseException as exc:  # handed to the caller's thread, which decides
            box["error"] = exc

    thread = threading.Thread(target=run, name="vfl-prepare", daemon=True)
    thread.start()
    while True:
        thread.join(every_s)
        if not thread.is_alive():
            break
        tick()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["result"]  # type: ignore[return-value]
