"""The commutative X25519 cipher."""

from __future__ import annotations

import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vfl.psi.cipher import PsiKey, encrypt_joined
from vfl.psi.curve import P, hash_domain, hash_to_curve
from vfl.psi.errors import InvalidPointError, LowOrderPointError

from .conftest import on_main_curve

DOM = hash_domain("run", b"n")


@settings(max_examples=40, deadline=None)
@given(st.binary(max_size=64))
def test_commutes_on_u(item):
    a, b = PsiKey.generate(), PsiKey.generate()
    h = hash_to_curve(item, DOM)
    ab = b.encrypt(a.encrypt(h))
    ba = a.encrypt(b.encrypt(h))
    assert ab == ba
    for out in (a.encrypt(h), ab):
        u = int.from_bytes(out, "little")
        assert u < P and on_main_curve(u)  # main curve stays main curve


def test_key_roundtrip_and_secrecy():
    k = PsiKey.generate()
    h = hash_to_curve(b"x", DOM)
    assert PsiKey.from_bytes(k.raw).encrypt(h) == k.encrypt(h)
    assert PsiKey.generate().encrypt(h) != k.encrypt(h)  # fresh keys differ
    assert "secret" in repr(k) and k.raw.hex() not in repr(k)
    with pytest.raises(TypeError):
        pickle.dumps(k)


@pytest.mark.parametrize("u", [0, 1, P - 1])
def test_low_order_points_are_rejected(u):
    k = PsiKey.generate()
    with pytest.raises(LowOrderPointError, match="low-order"):
        k.encrypt(u.to_bytes(32, "little"))
    with pytest.raises(LowOrderPointError):
        encrypt_joined(k._key, hash_to_curve(b"ok", DOM) + u.to_bytes(32, "little"), check_curve=False)


def test_encrypt_joined_matches_single_and_checks_curve():
    k = PsiKey.generate()
    pts = [hash_to_curve(bytes([i]), DOM) for i in range(10)]
    joined = b"".join(pts)
    assert k.encrypt_joined(joined, check_curve=True) == b"".join(k.encrypt(p) for p in pts)
    twist = 2
    while on_main_curve(twist):
        twist += 1
    bad = joined + twist.to_bytes(32, "little")
    with pytest.raises(InvalidPointError, match="index 10 is on the twist"):
        encrypt_joined(k._key, bad, check_curve=True)
    encrypt_joined(k._key, bad, check_curve=False)  # X25519 itself computes on the twist
    with pytest.raises(InvalidPointError, match="multiple of 32"):
        encrypt_joined(k._key, joined[:-1])
    with pytest.raises(InvalidPointError):
        k.encrypt(b"\x09" * 31)
