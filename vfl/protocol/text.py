"""Text a peer sent (ERROR detail, BYE reason, a party id it claims), made safe to print.

A partner chooses these strings, so they may hold terminal escapes, newlines that forge log lines, or megabytes.
Logs show them escaped like ``repr`` (without the quotes) and cut to a length that keeps one line readable.
"""

from __future__ import annotations

PEER_TEXT_LIMIT = 200


def peer_text(value: object, limit: int = PEER_TEXT_LIMIT) -> str:
    """``value`` as one printable line: non-printable characters escaped, at most ``limit`` characters of it shown.

    >>> peer_text("ok\\x1b[2J\\nforged line")
    'ok\\\\x1b[2J\\\\nforged line'
    >>> peer_text("x" * 300, limit=5)
    'xxxxx…(300 chars)'
    """
    if isinstance(value, bytes):
        value = value.decode("utf-8", "backslashreplace")
    text = value if isinstance(value, str) else str(value)
    cut = len(text) > limit
    shown = text[:limit] if cut else text
    escaped = "".join(c if c.isprintable() else repr(c)[1:-1] for c in shown)
    return f"{escaped}…({len(text)} chars)" if cut else escaped
