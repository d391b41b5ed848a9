"""Hash-to-curve onto the main Curve25519 and validation of received u-coordinates.

Curve25519 (Montgomery form): ``v^2 = u^3 + A u^2 + u`` over GF(p), ``p = 2^255 - 19``, ``A = 486662``.
X25519 works on u-coordinates only and happily computes on the quadratic *twist* as well. For PSI that is a leak:
whether ``u^3 + A u^2 + u`` is a square is preserved by scalar multiplication, so a raw hash used as a u-coordinate
tells the peer one bit per item (curve or twist) that survives our exponentiation. We therefore hash **onto the main
curve** with try-and-increment, and never as ``h(x)*G`` (that would make every discrete log known).

Exact construction (``vfl/psi/h2c/curve25519-ti/v1``)::

    DST      = b"vfl/psi/h2c/curve25519-ti/v1" || u16be(len(run_id)) || run_id || u16be(len(nonce)) || nonce
    for ctr = 0, 1, 2, ... (< 256):
        d    = SHA-512(DST || item || u8(ctr))             # 64 bytes; DST has fixed length per session and the
                                                           # counter a fixed width, so (item, ctr) is unambiguous
        u    = int.from_bytes(d, "little") mod p           # 512 bits mod p: statistically uniform (bias < 2^-256)
        accept u when  legendre(u^3 + A u^2 + u) == +1  and u is not of small order
    output  u.to_bytes(32, "little")                       # canonical: u < p, so the top bit is clear

About half of all u pass, so the expected number of tries is 2 and 256 failures in a row (probability 2^-256) raise.
The accepted u is uniform over the u-coordinates of the main curve. The number of tries depends on the item, so
hashing is not constant time; it runs on the hashing party only and is never observable by the peer through the
protocol (the peer sees only the exponentiated points).

Legendre symbol: ``pow(v, (p-1)//2, p)`` costs ~135 us in CPython here, a pure-Python binary Jacobi ~16 us; the Jacobi
is used. When ``gmpy2`` is importable, ``gmpy2.jacobi`` (~3 us, same result) is used instead; set
``VFL_PSI_PURE_PYTHON=1`` to force the pure-Python path.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence

from .errors import InvalidPointError, LowOrderPointError

__all__ = [
    "P",
    "A",
    "POINT_SIZE",
    "H2C_SUITE",
    "MAX_TRIES",
    "LOW_ORDER_U",
    "LEGENDRE_BACKEND",
    "hash_domain",
    "legendre",
    "jacobi_pure",
    "curve_rhs",
    "is_on_curve",
    "first_off_curve",
    "BATCH_ROUNDS",
    "is_canonical",
    "hash_to_curve",
    "hash_to_curve_many",
    "validate_point",
]

P = 2**255 - 19
A = 486662
POINT_SIZE = 32
H2C_SUITE = b"vfl/psi/h2c/curve25519-ti/v1"
MAX_TRIES = 256
# Rounds of the randomised batch on-curve test: a batch holding a twist point passes with probability 2^-32. The
# check is hygiene, not what keeps keys safe: X25519 is twist-secure and clamping clears the cofactor, so a twist point
# exponentiated by us reveals nothing about our key; it can only fail to match.
BATCH_ROUNDS = 32

# u-coordinates of the points of order 1, 2, 4 and 8 on the curve and on its twist (canonical values only).
LOW_ORDER_U = frozenset(
    {
        0,
        1,
        P - 1,
        325606250916557431795983626356110631294008115727848805560023387167927233504,
        39382357235489614581723060781553021112529911719440698176882885853963445705823,
    }
)

# (2/n) is -1 exactly when n = 3 or 5 (mod 8): index by n & 7, value is the sign bit to flip.
_TWO_SIGN = (0, 0, 0, 1, 0, 1, 0, 0)


def jacobi_pure(a: int, n: int = P) -> int:
    """Jacobi symbol ``(a/n)`` for odd ``n > 0`` (equals the Legendre symbol for prime ``n``), pure Python."""
    a %= n
    s = 0
    tbl = _TWO_SIGN
    while a:
        if not a & 1:
            z = (a & -a).bit_length() - 1
            a >>= z
            if z & 1:
                s ^= tbl[n & 7]
        if a & n & 2:  # both = 3 (mod 4): quadratic reciprocity flips the sign
            s ^= 1
        a, n = n % a, a
    if n != 1:
        return 0
    return -1 if s else 1


def _pick_legendre():
    if os.environ.get("VFL_PSI_PURE_PYTHON"):
        return jacobi_pure, "pure-python-jacobi"
    try:
        import gmpy2  # type: ignore[import-not-found]
    except ImportError:
        return jacobi_pure, "pure-python-jacobi"
    _jac = gmpy2.jacobi

    def legendre_gmpy2(a: int, n: int = P) -> int:
        return int(_jac(a % n, n))

    return legendre_gmpy2, "gmpy2"


#: Legendre symbol ``(a/p)``: 1 for a nonzero square, -1 for a non-square, 0 for 0 (mod p).
legendre, LEGENDRE_BACKEND = _pick_legendre()


def curve_rhs(u: int) -> int:
    """``u^3 + A u^2 + u mod p``: a nonzero square exactly when ``u`` is on the main curve (and not 0)."""
    return ((u + A) * u + 1) * u % P


def is_on_curve(u: int) -> bool:
    """True when ``u`` is the u-coordinate of a point of the main curve other than (0, 0)."""
    return legendre(curve_rhs(u)) == 1


def first_off_curve(us: Sequence[int], *, rounds: int = BATCH_ROUNDS) -> int | None:
    """Index of the first ``u`` in ``us`` that is not on the main curve (twist, or 0), or None if all are.

    With the pure-Python Legendre symbol this is a randomised batch test: in each of ``rounds`` rounds, multiply
    ``curve_rhs(u)`` over a uniformly random subset (fresh OS randomness, drawn after the points are fixed) and take
    one Legendre symbol of the product. If any ``u`` is off the curve, each round sees a non-square (or zero)
    product with probability exactly 1/2, so a bad batch passes with probability ``2^-rounds`` (2^-32 by default);
    only then is every point checked one by one to name the first bad index. Cost: ~``rounds / 4 + 3`` modular
    multiplications per point (subset products from 16-entry tables per block of 4 points; ~0.6 us each) instead of
    one ~20-25 us Legendre symbol per point. With gmpy2 (or fewer than 8 points) every point is checked exactly.
    """
    n = len(us)
    if n == 0:
        return None
    leg = legendre
    if LEGENDRE_BACKEND == "gmpy2" or n < 8:
        for i, u in enumerate(us):
            if leg(((u + A) * u + 1) * u % P) != 1:
                return i
        return None
    p = P
    rhs = [((u + A) * u + 1) * u % p for u in us]
    rhs += [1] * (-n % 4)
    tables = []
    append = tables.append
    for k in range(0, len(rhs), 4):
        a0, a1, a2, a3 = rhs[k : k + 4]
        a01 = a0 * a1 % p
        a23 = a2 * a3 % p
        lo = (1, a0, a1, a01)
        hi = (1, a2, a3, a23)
        append([x * y % p for y in hi for x in lo])
    nb = len(tables)
    rnd = os.urandom(rounds * nb)
    for r in range(rounds):
        acc = 1
        for tab, b in zip(tables, rnd[r * nb : (r + 1) * nb]):
            acc = acc * tab[b & 15] % p
        if leg(acc) != 1:
            for i, u in enumerate(us):
                if leg(((u + A) * u + 1) * u % p) != 1:
                    return i
            return None  # unreachable: some factor must be a non-square or zero
    return None


def is_canonical(b: bytes) -> bool:
    """32 bytes, little-endian, top bit clear and value < p."""
    return len(b) == POINT_SIZE and not b[31] & 0x80 and int.from_bytes(b, "little") < P


def hash_domain(run_id: bytes | str, nonce: bytes = b"") -> bytes:
    """The domain-separation tag for one PSI session: suite name, run id and the session nonce, length-prefixed."""
    if isinstance(run_id, str):
        run_id = run_id.encode("utf-8")
    if not isinstance(run_id, (bytes, bytearray)) or not isinstance(nonce, (bytes, bytearray)):
        raise TypeError("run_id must be str or bytes and nonce bytes")
    if len(run_id) > 0xFFFF or len(nonce) > 0xFFFF:
        raise ValueError("run_id and nonce must be shorter than 65536 bytes")
    return b"".join(
        (H2C_SUITE, len(run_id).to_bytes(2, "big"), bytes(run_id), len(nonce).to_bytes(2, "big"), bytes(nonce))
    )


_CTR = tuple(bytes((i,)) for i in range(MAX_TRIES))


def _hash_to_u(base, item: bytes) -> int:
    """``base`` is a SHA-512 object already fed with the DST. Returns the accepted u as an int."""
    h = base.copy()
    h.update(item)
    leg = legendre
    low = LOW_ORDER_U
    for ctr in _CTR:
        hc = h.copy()
        hc.update(ctr)
        u = int.from_bytes(hc.digest(), "little") % P
        if leg(((u + A) * u + 1) * u % P) == 1 and u not in low:
            return u
    raise RuntimeError("hash-to-curve failed 256 times in a row (probability 2^-256): the hash is broken")


def hash_to_curve(item: bytes, domain: bytes) -> bytes:
    """Hash ``item`` onto the main curve; returns the canonical 32-byte little-endian u-coordinate."""
    base = hashlib.sha512(domain)
    return _hash_to_u(base, bytes(item)).to_bytes(32, "little")


def hash_to_curve_many(items: Iterable[bytes], domain: bytes) -> bytes:
    """Hash every item; returns the joined ``n * 32`` bytes in input order."""
    base = hashlib.sha512(domain)
    h2u = _hash_to_u
    return b"".join([h2u(base, it).to_bytes(32, "little") for it in items])


def validate_point(b: bytes, *, check_curve: bool = True) -> int:
    """Check a received u-coordinate; returns it as an int or raises :class:`InvalidPointError`.

    Rejects: length != 32, top bit set, u >= p (non-canonical), u of small order (0, 1, p-1 and the order-8 points)
    and, with ``check_curve`` (the default), u on the twist rather than the main curve.
    """
    if not isinstance(b, (bytes, bytearray, memoryview)):
        raise InvalidPointError(f"point must be bytes, not {type(b).__name__}")
    b = bytes(b)
    if len(b) != POINT_SIZE:
        raise InvalidPointError(f"point must be {POINT_SIZE} bytes, got {len(b)}")
    if b[31] & 0x80:
        raise InvalidPointError("point has the top bit set (non-canonical u-coordinate)")
    u = int.from_bytes(b, "little")
    if u >= P:
        raise InvalidPointError("point u-coordinate is not reduced (u >= 2^255 - 19)")
    if u in LOW_ORDER_U:
        raise LowOrderPointError("point has small order (0, 1, p-1 or an order-8 point)")
    if check_curve and not is_on_curve(u):
        raise InvalidPointError("point is on the twist, not on the main curve")
    return u
