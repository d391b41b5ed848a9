"""A data holder behind a segment holder (PROTOCOL.md section 13, v1.10), sans-I/O.

Its session with the label holder is the one of sections 6–12, unchanged: the same ``DataHolderMachine``. What
changes is the wire: its one connection goes to its segment holder, its training tensors (FORWARD, EVAL_FORWARD) are
for that segment holder, and every other message of its session travels as RELAY, authenticated end to end with the
label holder ([C3]). From the segment holder it accepts only BACKWARD and ERROR in the clear; anything else must be a
RELAY that the label holder's key authenticates, so the segment holder in between can drop messages but not forge,
alter, replay or reorder them.
"""

from __future__ import annotations

from typing import Any, Sequence

from .codec import DEFAULT_LIMITS, Limits, decode, peek_type
from .errors import ErrorCode, RemoteProtocolError
from .events import Log, Output, Send
from .messages import Backward, Error, EvalForward, Forward, Relay
from .relay import RelayChannel
from .text import peer_text

#: what a party sends its hop in the clear, and what it accepts from it: the cut layer and its gradient ([C1])
HOP_UP = (Forward, EvalForward)
HOP_DOWN = (Backward.TYPE, Error.TYPE)


class RelayedParty:
    """Wraps a data holder's machine: unwraps what comes down, wraps what goes up. Everything else is the
    machine's (``__getattr__``)."""

    def __init__(self, machine: Any, *, key: bytes, limits: Limits = DEFAULT_LIMITS, hop: str = "its segment holder"):
        self.machine = machine
        machine.link = hop  # a dropped connection is the one to the hop, not to the label holder
        self.key = key
        self.limits = limits
        self.hop = hop
        self._channel: RelayChannel | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.machine, name)

    def connected(self, routing_id: bytes) -> None:
        """A new connection to the hop: its relayed messages are numbered from 0 in each direction ([C3])."""
        self._channel = RelayChannel(self.key, run=self.machine.run, party=self.machine.party,
                                     conn=routing_id.decode(), sends="up", limits=self.limits)

    def receive(self, *args: Any) -> list[Output]:
        frames, now = args[-2:]
        mtype = peek_type(frames)
        if mtype in HOP_DOWN:
            return self.machine.receive(frames, now)
        if mtype != Relay.TYPE:
            return [Log(level="WARNING", text=f"dropped a {peer_text(str(mtype), 40)} from {self.hop}: only "
                        "BACKWARD and ERROR come from it in the clear, the label holder's messages as RELAY")]
        try:
            msg = decode(frames, self.limits)
            if self._channel is None:
                raise RemoteProtocolError(ErrorCode.UNEXPECTED_MESSAGE, "a RELAY before our connection opened")
            inner = self._channel.unwrap(msg)
        except RemoteProtocolError as exc:
            return [Log(level="WARNING", text=f"dropped a RELAY from {self.hop}: {peer_text(str(exc), 300)}")]
        return self.machine.receive(inner, now)

    def outgoing(self, out: Output) -> Output | None:
        return up_as_relay(out, self._channel)


def up_as_relay(out: Output, channel: RelayChannel | None) -> Output | None:
    """What a party behind a segment holder sends for ``out``: a message of its session with the label holder goes
    up as RELAY on ``channel`` (its current connection's; None before one is open: nothing goes), while the cut
    layer and the RELAYs a segment holder forwards go to the hop as they are ([C1], [C3])."""
    if not isinstance(out, Send) or out.to is not None or isinstance(out.message, (*HOP_UP, Relay)):
        return out
    if channel is None:
        return None
    return Send(to=None, message=channel.wrap(out.message))
