"""The commutative cipher: X25519 scalar multiplication on u-coordinates, via ``cryptography``.

``E_k(P) = X25519(k, u(P))``. X25519 clamps the scalar to ``k' = 2^254 + 8 m``; clamped scalars are plain integers,
so ``E_a(E_b(P)) = u([a'][b']P) = u([b'][a']P) = E_b(E_a(P))`` -- the cipher commutes on the u-coordinate (tested).
The factor 8 in every clamped scalar also clears the cofactor, so every output lies in the prime-order subgroup.

``exchange`` raises ``ValueError`` when the result is the all-zero value, i.e. the input has small order; that is
the peer's fault and becomes :class:`~vfl.psi.errors.LowOrderPointError`. Use a fresh key for every PSI session.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from .curve import POINT_SIZE, first_off_curve
from .errors import InvalidPointError, LowOrderPointError

__all__ = ["PsiKey", "encrypt_joined"]

_P = 2**255 - 19
_A = 486662


class PsiKey:
    """One party's secret exponent for one PSI session."""

    __slots__ = ("_key", "_raw")

    def __init__(self, key: X25519PrivateKey) -> None:
        self._key = key
        self._raw = key.private_bytes_raw()

    @classmethod
    def generate(cls) -> PsiKey:
        """A fresh random key (from the OS CSPRNG)."""
        return cls(X25519PrivateKey.generate())

    @classmethod
    def from_bytes(cls, raw: bytes) -> PsiKey:
        """Rebuild a key from its 32 raw private bytes (used by pool workers)."""
        return cls(X25519PrivateKey.from_private_bytes(bytes(raw)))

    @property
    def raw(self) -> bytes:
        """The 32 raw private bytes. Secret: only to hand the key to our own worker processes."""
        return self._raw

    def __repr__(self) -> str:  # never print the secret
        return "PsiKey(<secret>)"

    def __reduce__(self):
        raise TypeError("PsiKey is not picklable; pass .raw to trusted workers explicitly")

    def encrypt(self, u: bytes) -> bytes:
        """``E_k(u)`` for one canonical 32-byte u-coordinate (no on-curve check; see :func:`encrypt_joined`)."""
        try:
            return self._key.exchange(X25519PublicKey.from_public_bytes(bytes(u)))
        except ValueError as exc:
            if len(u) != POINT_SIZE:
                raise InvalidPointError(f"point must be {POINT_SIZE} bytes, got {len(u)}") from None
            raise LowOrderPointError("peer sent a low-order point") from exc

    def encrypt_joined(self, joined: bytes, *, check_curve: bool = False) -> bytes:
        """Encrypt ``n`` points given as one ``n * 32``-byte string; returns ``n * 32`` bytes in the same order."""
        return encrypt_joined(self._key, joined, check_curve=check_curve)


def encrypt_joined(key: X25519PrivateKey, joined: bytes, *, check_curve: bool = False, base_index: int = 0) -> bytes:
    """The hot loop: ``E_k`` over ``n`` joined 32-byte points.

    With ``check_curve`` the inputs are first tested to lie on the main curve
    (:func:`~vfl.psi.curve.first_off_curve`; a twist point raises :class:`InvalidPointError`). Canonical form (top bit
    clear, u < p) is checked by the caller on the whole batch. Errors name the index (``base_index`` + position).
    """
    n, rem = divmod(len(joined), POINT_SIZE)
    if rem:
        raise InvalidPointError(f"joined points length {len(joined)} is not a multiple of {POINT_SIZE}")
    mv = bytes(joined)  # from_public_bytes wants bytes; slicing bytes is as fast as a memoryview here
    frompub = X25519PublicKey.from_public_bytes
    exchange = key.exchange
    out = []
    append = out.append
    if check_curve and n:
        frombytes = int.from_bytes
        us = [frombytes(mv[i * 32 : i * 32 + 32], "little") for i in range(n)]
        bad = first_off_curve(us)
        if bad is not None:
            if us[bad] % _P == 0:
                raise LowOrderPointError(f"peer sent a low-order point (u = 0) at index {base_index + bad}")
            raise InvalidPointError(f"point at index {base_index + bad} is on the twist, not on the main curve")
    for i in range(n):
        try:
            append(exchange(frompub(mv[i * 32 : i * 32 + 32])))
        except ValueError:
            raise LowOrderPointError(f"peer sent a low-order point at index {base_index + i}") from None
    return b"".join(out)
