"""Routing ids ([S1], [S4], [S5] of PROTOCOL.md section 2).

A data holder's routing id is ``<party>/<16 lowercase hex>``, drawn fresh for every socket it creates. The party part
is what [S4] checks against the party the CURVE key proves; the random part makes every connection distinct, so a
restarted data holder is a *new* connection that the label holder switches to when its HELLO is accepted ([S5]),
never one that libzmq hands an existing routing id over to.
"""

from __future__ import annotations

import secrets


def new_routing_id(party: str) -> bytes:
    """A fresh routing id for one socket of ``party``.

    >>> rid = new_routing_id("dh1"); rid[:4], len(rid)
    (b'dh1/', 20)
    """
    return f"{party}/{secrets.token_hex(8)}".encode()


def party_of(routing_id: bytes) -> str:
    """The party a routing id claims: the part before the first ``/`` (the whole id if there is none).

    >>> party_of(b"dh1/0123456789abcdef"), party_of(b"dh1")
    ('dh1', 'dh1')
    """
    return routing_id.split(b"/", 1)[0].decode("utf-8", "replace")
