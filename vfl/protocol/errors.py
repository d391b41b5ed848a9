"""One error hierarchy for the whole protocol, with the wire codes of PROTOCOL.md section 8.

Like h11, we split errors by *whose fault* they are: a ``RemoteProtocolError`` is something a peer sent wrong and is
answered on the wire with ``ERROR{code}``; a ``LocalProtocolError`` is our own misuse of the API (a bug, or bad local
configuration) and is never blamed on a peer.
"""

from __future__ import annotations

import enum

from ..errors import VflError

__all__ = ["ErrorCode", "LocalProtocolError", "ProtocolError", "RemoteProtocolError", "SessionFailed", "VflError"]


class ErrorCode(enum.IntEnum):
    """``ERROR.code`` values. Frozen: codes are never renumbered, only added."""

    BAD_SIGNATURE = 1
    UNSUPPORTED_VERSION = 2
    BAD_FRAMING = 3
    BAD_HEADER = 4
    UNKNOWN_TYPE = 5
    BAD_FIELD = 6
    BAD_TENSOR = 7
    TOO_LARGE = 8
    UNEXPECTED_MESSAGE = 9
    CONFIG_MISMATCH = 10
    IDENTITY_MISMATCH = 11
    UNKNOWN_PARTY = 12
    TIMEOUT = 13
    INTERNAL = 14
    PSI_FAILED = 15
    REPLACED = 16  # [S5]: a newer connection with the same key took over this party


class ProtocolError(VflError):
    """A violation of PROTOCOL.md. ``code`` is what goes on the wire; ``detail`` is for people."""

    def __init__(self, code: ErrorCode, detail: str, *, ref: str | None = None, diff: dict | None = None):
        super().__init__(f"{code.name}: {detail}")
        self.code = ErrorCode(code)
        self.detail = detail
        #: the message type the error is about, when it is known (goes to ``ERROR.ref``)
        self.ref = ref
        #: field path -> [label holder's value, data holder's value], for CONFIG_MISMATCH
        self.diff = diff


class RemoteProtocolError(ProtocolError):
    """The peer sent something PROTOCOL.md forbids. Answer with ERROR (rate-limited), keep running."""


class LocalProtocolError(ProtocolError):
    """We tried to do something PROTOCOL.md forbids (e.g. encode a malformed message). A bug on our side."""


class SessionFailed(VflError):
    """The session cannot go on (refused handshake, lost peer, deadline). The node reports it and exits non-zero.

    ``exit_code`` is one of ``vfl.errors.ExitCode``: 1 protocol/peer failure, 3 peer lost, 4 join/handshake timeout.
    """

    def __init__(self, message: str, *, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code
