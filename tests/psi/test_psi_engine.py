"""The batch engine and the canonical ID encoding."""

from __future__ import annotations

import numpy as np
import pytest

from vfl.psi.cipher import PsiKey
from vfl.psi.curve import P, hash_domain, hash_to_curve
from vfl.psi.engine import PsiEngine, check_points, encode_ids
from vfl.psi.errors import InvalidIdError, InvalidPointError, LowOrderPointError, MalformedMessageError

from .conftest import all_on_main_curve, on_main_curve

DOM = hash_domain("run", b"n")


def test_encode_ids_canonical():
    want = [b"s:1", b"i:1", "s:é".encode(), b"i:-5", b"i:1" + b"0" * 30]
    assert encode_ids(["1", 1, "é", -5, 10**30]) == want
    assert encode_ids(np.array([3, 4], dtype=np.int64)) == [b"i:3", b"i:4"]
    assert encode_ids(np.array([3], dtype=np.uint8)) == [b"i:3"]
    assert encode_ids(np.array(["a", "b"])) == [b"s:a", b"s:b"]
    assert encode_ids(np.array(["a", 7], dtype=object)) == [b"s:a", b"i:7"]
    assert encode_ids([np.int32(7), np.str_("x")]) == [b"i:7", b"s:x"]
    assert encode_ids([]) == []


@pytest.mark.parametrize("bad", [True, np.bool_(False), 1.0, b"bytes", None, ("t",), "\ud800"])
def test_encode_ids_rejects(bad):
    with pytest.raises(InvalidIdError):
        encode_ids(["ok", bad])
    assert issubclass(InvalidIdError, TypeError)


def test_encode_ids_rejects_float_arrays():
    with pytest.raises(InvalidIdError):
        encode_ids(np.array([1.0, 2.0]))


def _reference(items, key):
    return np.frombuffer(b"".join(key.encrypt(hash_to_curve(i, DOM)) for i in items), np.uint8).reshape(-1, 32)


@pytest.mark.parametrize("workers", [1, 2])
def test_engine_order_and_chunks(workers):
    key = PsiKey.generate()
    items = encode_ids(range(257))
    want = _reference(items, key)
    with PsiEngine(workers=workers, task_items=10, max_inflight=3) as eng:
        chunks = list(eng.iter_hash_encrypt(items, key, DOM, chunk_size=64))
        assert [len(c) for c in chunks] == [64, 64, 64, 64, 1]
        got = np.concatenate(chunks)
        assert np.array_equal(got, want)
        assert np.array_equal(eng.hash_encrypt(items, key, DOM), want)
        assert all_on_main_curve(got)
        # encrypt with a second key == hash-encrypt with the second key then the first (commutativity)
        key2 = PsiKey.generate()
        twice = eng.encrypt(got, key2)
        assert np.array_equal(twice, eng.encrypt(eng.hash_encrypt(items, key2, DOM), key))
        parts = list(eng.iter_encrypt([got[:5], got[5:5], got[5:]], key2))
        assert [len(p) for p in parts] == [5, 0, 252]
        assert np.array_equal(np.concatenate(parts), twice)
        assert eng.hash_encrypt([], key, DOM).shape == (0, 32)
        assert eng.encrypt(np.empty((0, 32), np.uint8), key).shape == (0, 32)


@pytest.mark.parametrize("workers", [1, 2])
def test_engine_reports_bad_points_with_index(workers):
    key = PsiKey.generate()
    good = np.frombuffer(b"".join(hash_to_curve(bytes([i]), DOM) for i in range(30)), np.uint8).reshape(-1, 32)
    twist = 2
    while on_main_curve(twist):
        twist += 1
    bad = good.copy()
    bad[17] = np.frombuffer(twist.to_bytes(32, "little"), np.uint8)
    low = good.copy()
    low[3] = 0
    with PsiEngine(workers=workers, task_items=8) as eng:
        with pytest.raises(InvalidPointError, match="index 17"):
            eng.encrypt(bad, key)
        eng.encrypt(bad, key, check_curve=False)
        with pytest.raises(LowOrderPointError, match="index 3"):
            eng.encrypt(low, key, check_curve=False)
        with pytest.raises(LowOrderPointError, match="index 3"):
            eng.encrypt(low, key)
        assert len(eng.encrypt(good, key)) == 30  # the pool survives errors


def test_check_points():
    ok = np.zeros((2, 32), np.uint8)
    ok[:, 0] = 9
    assert check_points(ok) is not None
    for bad, msg in [
        (ok.astype(np.int16), "dtype"),
        (ok[:, :16], "shape"),
        (ok.reshape(-1), "shape"),
        ([[9] * 32], "numpy array"),
    ]:
        with pytest.raises(MalformedMessageError, match=msg):
            check_points(bad)
    top = ok.copy()
    top[1, 31] = 0x80
    with pytest.raises(InvalidPointError, match="index 1 has the top bit"):
        check_points(top)
    for v in (P, P + 5, 2**255 - 1):
        big = ok.copy()
        big[1] = np.frombuffer(v.to_bytes(32, "little"), np.uint8)
        with pytest.raises(InvalidPointError, match="index 1 is not reduced"):
            check_points(big)
    edge = ok.copy()
    edge[0] = np.frombuffer((P - 1).to_bytes(32, "little"), np.uint8)
    check_points(edge)  # canonical (small order, but that is the cipher's job)


def test_engine_lifecycle():
    eng = PsiEngine(workers=1)
    eng.close()
    with pytest.raises(ValueError):
        PsiEngine(workers=0)
    with pytest.raises(ValueError):
        PsiEngine(task_items=0)
    assert PsiEngine().workers >= 1


def test_the_forkserver_started_before_the_ids_are_read_is_the_one_the_pool_uses():
    """start_forkserver: the node starts it while small; the pool's workers then come from it, not a second one."""
    from multiprocessing import forkserver

    from vfl.psi.engine import start_forkserver

    start_forkserver(2)
    pid = forkserver._forkserver._forkserver_pid
    assert pid is not None
    key = PsiKey.generate()
    with PsiEngine(workers=2) as engine:
        got = engine.hash_encrypt(encode_ids(range(50)), key, b"d")
    with PsiEngine(workers=1) as inline:
        assert np.array_equal(got, inline.hash_encrypt(encode_ids(range(50)), key, b"d"))
    assert forkserver._forkserver._forkserver_pid == pid


def test_a_worker_process_imports_the_cipher_only():
    """The engine's workers import vfl.psi._worker (and so vfl.psi): not numpy, not pyarrow, about 18 MiB less each."""
    import subprocess
    import sys

    probe = ("import sys, vfl.psi._worker; "
             "bad = [m for m in ('numpy', 'pyarrow', 'vfl.psi.engine', 'vfl.psi.exchange') if m in sys.modules]; "
             "sys.exit(f'imported {bad}' if bad else 0)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    import vfl.psi as psi

    assert all(hasattr(psi, name) for name in psi.__all__)  # every exported name is still there, on first use
