"""The root of every error vfl raises on purpose, and the exit code each family of errors stands for.

This is the bottom layer: it imports nothing from the rest of vfl, so every module (the sans-I/O protocol and PSI
included) can derive its errors from here, and the ``vfl`` command can turn any of them into one line on stderr and
one exit code in one place (``vfl.cli``), instead of catching each module's class by name.

Exit codes of every ``vfl`` command (the README's table):

==  ============  =====================================================================================================
0   OK            finished (or a session without training stopped by SIGINT/SIGTERM, after telling its peers)
1   FAILED        the session failed: a peer broke the protocol or refused us (e.g. CONFIG_MISMATCH), left with an
                  error, or this node failed during the session
2   SETUP         a problem on this machine, found before or instead of a session: usage, config file, key file,
                  data table, model settings, a state file, an endpoint another process already listens on
3   PEER_LOST     a peer stopped answering (the message names it)
4   JOIN_TIMEOUT  a data holder did not join (label holder) / no WELCOME in time (data holder)
5   INTERRUPTED   a training or prediction session stopped (SIGINT/SIGTERM) before it finished: no result saved, the
                  checkpoints kept; the same command resumes it
==  ============  =====================================================================================================

Derive an error from :class:`SetupError` when the user fixes it on their own machine (the message then names the
file, the key and what to do); from :class:`VflError` when it ends or breaks a session.
"""

from __future__ import annotations

import enum

__all__ = ["ExitCode", "SetupError", "VflError", "exit_code_of"]


class ExitCode(enum.IntEnum):
    """What a ``vfl`` command's exit status means. Frozen: scripts test these numbers."""

    OK = 0
    FAILED = 1
    SETUP = 2
    PEER_LOST = 3
    JOIN_TIMEOUT = 4
    INTERRUPTED = 5


class VflError(Exception):
    """Root of every error vfl raises on purpose. ``str(exc)`` is meant for the user; ``exit_code`` is what the
    ``vfl`` command exits with when the error ends it (a class attribute; an instance may set its own)."""

    exit_code: int = ExitCode.FAILED


class SetupError(VflError):
    """This node cannot start (or a command cannot run) as set up on this machine: a config, key file, data table,
    model setting, state file or network address to fix locally. Never a peer's fault."""

    exit_code = ExitCode.SETUP


def exit_code_of(exc: BaseException) -> int:
    """The exit code a command ends with because of ``exc``: its ``exit_code`` if vfl raised it on purpose, else 1
    (an unexpected failure: an OS or libzmq error, or a bug)."""
    if isinstance(exc, VflError):
        code = getattr(exc, "exit_code", ExitCode.FAILED)
        if isinstance(code, int) and not isinstance(code, bool) and 0 < code < 256:
            return int(code)
    return int(ExitCode.FAILED)
