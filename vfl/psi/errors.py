"""One exception hierarchy for the PSI phase.

Every error carries a stable string ``code`` (the lead maps codes to wire error codes) and a human message.

Two branches, as in h11 (``LocalProtocolError`` / ``RemoteProtocolError``):

* :class:`PsiLocalError` -- our own input or our own API use is wrong (duplicate IDs, an ID of an unsupported
  type, a call out of order). Fix the caller; nothing came from the peer.
* :class:`PsiRemoteError` -- the peer sent something we must not accept (an invalid or low-order point, a chunk out
  of order, a wrong shape, a stream that ended early). The node turns it into an ``ERROR`` message and aborts the
  PSI session; it never yields a wrong intersection silently.

:class:`EmptyIntersectionError` is neither: both sides behaved, the result is just unusable when the caller asked
for a non-empty one.
"""

from __future__ import annotations

from ..errors import VflError

__all__ = [
    "PsiError",
    "PsiLocalError",
    "PsiRemoteError",
    "DuplicateIdError",
    "InvalidIdError",
    "PsiStateError",
    "MalformedMessageError",
    "ChunkOrderError",
    "TruncatedStreamError",
    "LimitExceededError",
    "InvalidPointError",
    "LowOrderPointError",
    "InvalidResultError",
    "EmptyIntersectionError",
]


class PsiError(VflError):
    """Base of every PSI error. ``code`` is a stable identifier, ``str(err)`` a message for humans."""

    code: str = "PSI_ERROR"
    remote: bool = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __reduce__(self):  # keep errors picklable across the process pool whatever the subclass adds
        return (_rebuild, (type(self), self.message, dict(self.__dict__)))


def _rebuild(cls, message, state):
    err = cls.__new__(cls)
    PsiError.__init__(err, message)
    err.__dict__.update(state)
    return err


# ---------------------------------------------------------------------------------------------------------- local


class PsiLocalError(PsiError):
    """Our own input or API use is wrong."""

    code = "PSI_LOCAL"


class DuplicateIdError(PsiLocalError, ValueError):
    """The input list holds the same ID more than once (pass ``dedupe=True`` to drop repeats instead)."""

    code = "PSI_DUPLICATE_ID"

    def __init__(self, message: str, *, count: int = 0, example: object = None) -> None:
        super().__init__(message)
        self.count = count
        self.example = example


class InvalidIdError(PsiLocalError, TypeError):
    """An ID is neither ``str`` nor ``int`` (or is a ``bool``), so it has no canonical encoding."""

    code = "PSI_INVALID_ID"


class PsiStateError(PsiLocalError):
    """A method was called in a state where it is not allowed (e.g. ``rows`` before the exchange finished)."""

    code = "PSI_STATE"


# --------------------------------------------------------------------------------------------------------- remote


class PsiRemoteError(PsiError):
    """The peer sent something invalid. Abort the session; the intersection is not to be trusted."""

    code = "PSI_REMOTE"
    remote = True


class MalformedMessageError(PsiRemoteError):
    """Wrong dtype, shape, field type or a message that is not expected in the current state."""

    code = "PSI_MALFORMED"


class ChunkOrderError(MalformedMessageError):
    """A chunk arrived out of order, twice, after ``last``, or with a size other than the announced one."""

    code = "PSI_CHUNK_ORDER"


class TruncatedStreamError(PsiRemoteError):
    """A stream ended (``last``) before all announced items arrived, or was asked for its result before ``last``."""

    code = "PSI_TRUNCATED"


class LimitExceededError(PsiRemoteError):
    """The peer announced or sent more than our configured limits (items, chunk size, result count)."""

    code = "PSI_LIMIT"


class InvalidPointError(PsiRemoteError):
    """A received 32-byte value is not a canonical u-coordinate of a point on the main Curve25519."""

    code = "PSI_INVALID_POINT"


class LowOrderPointError(InvalidPointError):
    """X25519 produced the all-zero output: the peer sent a point of small order."""

    code = "PSI_LOW_ORDER_POINT"


class InvalidResultError(PsiRemoteError):
    """The intersection sent by the peer is inconsistent (unknown token, repeated row, out-of-range position)."""

    code = "PSI_INVALID_RESULT"


# ---------------------------------------------------------------------------------------------------------- other


class EmptyIntersectionError(PsiError):
    """The intersection is empty and the caller asked for a non-empty one."""

    code = "PSI_EMPTY_INTERSECTION"
