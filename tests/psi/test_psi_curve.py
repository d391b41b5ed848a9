"""Hash-to-curve onto the main Curve25519 and point validation."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from hypothesis import given, settings
from hypothesis import strategies as st

from vfl.psi import curve
from vfl.psi.curve import LOW_ORDER_U, P, hash_domain, hash_to_curve, hash_to_curve_many, validate_point
from vfl.psi.errors import InvalidPointError, LowOrderPointError, PsiRemoteError

from .conftest import on_main_curve

DOM = hash_domain("run-1", b"nonce-1")


def _twist_u() -> int:
    u = 9
    while on_main_curve(u):
        u += 1
    return u


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=P - 1))
def test_jacobi_matches_euler(a):
    e = pow(a, (P - 1) // 2, P)
    want = 0 if a == 0 else (1 if e == 1 else -1)
    assert curve.jacobi_pure(a) == want
    assert curve.legendre(a) == want


def test_jacobi_small_moduli():
    # against the definition for small odd primes (Euler) and composite odd n (product of prime symbols)
    for n in (3, 5, 7, 11, 13, 97):
        for a in range(-5, 3 * n):
            e = pow(a % n, (n - 1) // 2, n)
            assert curve.jacobi_pure(a, n) == (0 if a % n == 0 else (1 if e == 1 else -1))
    for a in range(60):
        assert curve.jacobi_pure(a, 15) == curve.jacobi_pure(a, 3) * curve.jacobi_pure(a, 5)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300))
def test_hash_to_curve_lands_on_main_curve(item):
    out = hash_to_curve(item, DOM)
    assert len(out) == 32 and not out[31] & 0x80
    u = int.from_bytes(out, "little")
    assert u < P and on_main_curve(u) and u not in LOW_ORDER_U
    assert validate_point(out) == u
    assert hash_to_curve(item, DOM) == out  # deterministic


def test_hash_to_curve_exact_construction():
    # the documented construction, re-derived here
    import hashlib

    item = b"s:alice"
    dst = b"vfl/psi/h2c/curve25519-ti/v1" + (5).to_bytes(2, "big") + b"run-1" + (7).to_bytes(2, "big") + b"nonce-1"
    assert DOM == dst
    for ctr in range(256):
        u = int.from_bytes(hashlib.sha512(dst + item + bytes((ctr,))).digest(), "little") % P
        if on_main_curve(u):
            break
    assert hash_to_curve(item, DOM) == u.to_bytes(32, "little")


def test_domain_separation():
    a = hash_to_curve(b"x", hash_domain("run-1", b"n"))
    assert a != hash_to_curve(b"x", hash_domain("run-2", b"n"))
    assert a != hash_to_curve(b"x", hash_domain("run-1", b"m"))
    # length prefixes: moving a byte between run id and nonce changes the domain
    assert hash_domain("ab", b"c") != hash_domain("a", b"bc")
    assert hash_domain("r", b"") == hash_domain(b"r")


def test_hash_to_curve_many_matches_single():
    items = [b"", b"a", "é".encode(), os.urandom(1000)]
    joined = hash_to_curve_many(items, DOM)
    assert joined == b"".join(hash_to_curve(i, DOM) for i in items)


def test_raw_hash_would_hit_the_twist_half_the_time():
    # why hash-to-curve exists: random u are on the twist about half the time
    on = sum(on_main_curve(int.from_bytes(os.urandom(32), "little") % P) for _ in range(400))
    assert 120 < on < 280


def test_low_order_list_is_what_x25519_rejects():
    key = X25519PrivateKey.generate()
    for u in LOW_ORDER_U:
        with pytest.raises(ValueError):
            key.exchange(X25519PublicKey.from_public_bytes(u.to_bytes(32, "little")))


@pytest.mark.parametrize(
    "raw, exc, words",
    [
        (P.to_bytes(32, "little"), InvalidPointError, "not reduced"),
        ((P + 1).to_bytes(32, "little"), InvalidPointError, "not reduced"),
        ((2**255 - 1).to_bytes(32, "little"), InvalidPointError, "not reduced"),
        ((9 + 2**255).to_bytes(32, "little"), InvalidPointError, "top bit"),
        (b"\x09" + b"\x00" * 30, InvalidPointError, "32 bytes"),
        (b"\x09" + b"\x00" * 32, InvalidPointError, "32 bytes"),
        ((0).to_bytes(32, "little"), LowOrderPointError, "small order"),
        ((1).to_bytes(32, "little"), LowOrderPointError, "small order"),
        ((P - 1).to_bytes(32, "little"), LowOrderPointError, "small order"),
        (_twist_u().to_bytes(32, "little"), InvalidPointError, "twist"),
    ],
)
def test_validate_point_rejects(raw, exc, words):
    with pytest.raises(exc, match=words) as info:
        validate_point(raw)
    assert isinstance(info.value, PsiRemoteError)
    assert info.value.code.startswith("PSI_")


def test_validate_point_twist_check_can_be_skipped():
    u = _twist_u()
    assert validate_point(u.to_bytes(32, "little"), check_curve=False) == u
    assert validate_point((9).to_bytes(32, "little")) == 9  # the X25519 base point is on the curve


def test_validate_point_type():
    with pytest.raises(InvalidPointError):
        validate_point("not bytes")  # type: ignore[arg-type]


def test_hash_domain_types():
    with pytest.raises(TypeError):
        hash_domain(5)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        hash_domain("r", b"x" * 70000)


@pytest.mark.parametrize("n", [1, 7, 8, 9, 64, 301])
def test_first_off_curve_batch(n):
    good = [int.from_bytes(hash_to_curve(b"%d" % i, DOM), "little") for i in range(n)]
    assert curve.first_off_curve(good) is None
    twist = _twist_u()
    for pos in {0, n // 2, n - 1}:
        bad = list(good)
        bad[pos] = twist
        assert curve.first_off_curve(bad) == pos
        bad[pos] = 0
        assert curve.first_off_curve(bad) == pos
    if n > 2:
        bad = list(good)
        bad[1] = bad[n - 1] = twist  # two bad points: their product is a square, the subsets still catch them
        assert curve.first_off_curve(bad) == 1
