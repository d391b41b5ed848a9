"""Task functions run inside the engine's worker processes (and inline when ``workers == 1``).

Each task gets one contiguous batch -- a list of item ``bytes`` or one joined ``n * 32`` bytes string -- and returns
one joined ``n * 32`` bytes string, so the per-item cost in the parent is zero and the IPC is a few large buffers.

The key travels as its 32 raw bytes with every task and is rebuilt once per worker and kept in a small cache (not in
the pool initializer), so one pool serves several PSI sessions at once (the label holder runs one per data holder,
each with its own fresh key). The raw bytes only ever go to our own child processes over a local pipe -- or, with
``[psi].cluster``, to the workers of the party's own Dask cluster, scattered once per key (:mod:`vfl.psi.cluster`).
There these functions get the key object itself, built once per worker and kept with the scattered key rather than
in this module's cache, so that it leaves the long-lived worker process when Dask releases the key.
"""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from . import curve
from .cipher import encrypt_joined
from .errors import LowOrderPointError

_KEYS: dict[bytes, X25519PrivateKey] = {}
_MAX_KEYS = 32


def init_worker() -> None:
    """Pool initializer: start with an empty key cache."""
    _KEYS.clear()


def _key(raw: bytes | X25519PrivateKey) -> X25519PrivateKey:
    """The key object for ``raw``, built once per process; a key object (a cluster worker's, built once per scattered
    key, see :mod:`vfl.psi.cluster`) is used as it is, and never cached here."""
    if isinstance(raw, X25519PrivateKey):
        return raw
    k = _KEYS.get(raw)
    if k is None:
        if len(_KEYS) >= _MAX_KEYS:
            _KEYS.clear()
        k = _KEYS[raw] = X25519PrivateKey.from_private_bytes(raw)
    return k


def hash_encrypt_task(key_raw: bytes | X25519PrivateKey, domain: bytes, items: list[bytes]) -> bytes:
    """``H(x)^k`` for every item, joined, in input order."""
    key = _key(key_raw)
    exchange = key.exchange
    frompub = X25519PublicKey.from_public_bytes
    base = hashlib.sha512(domain)
    h2u = curve._hash_to_u
    out = []
    append = out.append
    try:
        for it in items:
            append(exchange(frompub(h2u(base, it).to_bytes(32, "little"))))
    except ValueError:  # cannot happen: hash_to_curve never returns a small-order u
        raise LowOrderPointError("hash-to-curve produced a low-order point") from None
    return b"".join(out)


def encrypt_task(key_raw: bytes | X25519PrivateKey, joined: bytes, check_curve: bool, base_index: int) -> bytes:
    """``P^k`` for ``n`` joined points, joined, in input order."""
    return encrypt_joined(_key(key_raw), joined, check_curve=check_curve, base_index=base_index)
