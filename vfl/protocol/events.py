"""What the sans-I/O machines hand back to the node loop: messages to send and things that happened.

The node does the sending and the logging; the machines only decide.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .messages import Message


@dataclass(frozen=True, kw_only=True)
class Send:
    """Send ``message`` to ``to`` (a label holder's routing id; ``None`` on a data holder, whose one peer is implied)."""

    message: Message
    to: bytes | None = None


@dataclass(frozen=True, kw_only=True)
class Disconnect:
    """Close the connection behind routing id ``to`` at the transport (best effort; PROTOCOL.md [B2]).

    For a peer that was dropped for not reading: the label holder sends it nothing more, and without this the
    bytes it keeps sending would still cost the label holder their decryption, at the expense of the honest peers.
    ``refuse_key_s`` > 0: also refuse new connections with that connection's key for that long ([B5]), because a
    dropped connection that keeps coming back costs, each time, the decryption of what libzmq reads before the node
    sees its first message.
    """

    to: bytes
    refuse_key_s: float = 0.0


@dataclass(frozen=True, kw_only=True)
class Reconnect:
    """Data holder: close the socket and open a fresh one with a new routing id before the next ``Send`` ([J1]).

    A new routing id, not the old socket reconnecting: libzmq's ROUTER ignores a second connection that claims a
    routing id it still holds (a half-open connection the label holder has not noticed yet), and a restarted label
    holder must see a HELLO on a connection it has never heard of, not the tail of the old session's pipe.
    """


@dataclass(frozen=True, kw_only=True)
class Log:
    """Something a person running the node should see. ``level`` is a ``logging`` level name."""

    level: str
    text: str


@dataclass(frozen=True, kw_only=True)
class PeerReady:
    party: str
    restart: bool = False


@dataclass(frozen=True, kw_only=True)
class PeerLeft:
    party: str
    ok: bool
    reason: str


@dataclass(frozen=True, kw_only=True)
class LinkChecked:
    """A data holder's link check finished: round trips, bytes each way per round, and round-trip times."""

    rounds: int
    bytes_per_round: int
    rtts: tuple[float, ...]


@dataclass(frozen=True, kw_only=True, eq=False)
class Aligned:
    """The PSI phase is over: ``rows`` are this party's row indices (into its own ID list) in the agreed order."""

    rows: np.ndarray


@dataclass(frozen=True, kw_only=True)
class EpochDone:
    """The label holder finished an epoch: its training and validation metrics."""

    metrics: dict


@dataclass(frozen=True, kw_only=True)
class Finished:
    """The session is over. ``exit_code``: 0 ok, 1 protocol/peer failure, 3 peer lost, 4 join/handshake timeout,
    5 paused (stopped by a signal; the session waits for this node to be started again, [J2])."""

    exit_code: int
    reason: str


#: ``Finished.exit_code`` of a node that paused ([J2]): not a finished model, not a failure; start it again
EXIT_PAUSED = 5


Output = Send | Disconnect | Reconnect | Log | PeerReady | PeerLeft | LinkChecked | Aligned | EpochDone | Finished
