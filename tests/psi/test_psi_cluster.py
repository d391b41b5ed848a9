"""``[psi].cluster``: the engine's tasks on a real Dask cluster (a ``dask scheduler`` and two ``dask worker``
processes on loopback) give exactly what the local pool gives; failures are clear errors, never a hang."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("distributed", reason="the cluster tests need the dask extra (pip install 'vfl[dask]')")

from vfl.errors import ExitCode, SetupError  # noqa: E402
from vfl.launch.prepare import free_port  # noqa: E402
from vfl.psi import _worker  # noqa: E402
from vfl.psi.cipher import PsiKey  # noqa: E402
from vfl.psi.cluster import ClusterFailedError, ClusterUnavailableError, _Secret, check_cluster_address  # noqa: E402
from vfl.psi.curve import hash_domain  # noqa: E402
from vfl.psi.engine import PsiEngine, encode_ids  # noqa: E402
from vfl.psi.errors import InvalidPointError, PsiLocalError  # noqa: E402
from vfl.psi.exchange import PsiReceiver, PsiSender, run_in_memory  # noqa: E402

from .conftest import on_main_curve  # noqa: E402
from .dask_cluster import DaskCluster, tls_client_env  # noqa: E402

DOM = hash_domain("run", b"n")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with DaskCluster(tmp_path_factory.mktemp("dask"), workers=2) as c:
        yield c


def _keys_held(dask_worker) -> tuple[int, int, int]:
    """On a worker: (scattered PSI keys it holds, how many of them it has built, keys in the module cache)."""
    secrets = [v for v in dask_worker.data.values() if isinstance(v, _Secret)]
    return len(secrets), sum(s._built is not None for s in secrets), len(_worker._KEYS)


def _wait_for_workers(address: str, done, timeout: float = 60.0) -> bool:
    """Poll every worker's ``_keys_held`` from a client of our own until ``done(results)`` (bounded)."""
    from distributed import Client

    with Client(address, timeout=timeout, set_as_default=False) as client:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if done(client.run(_keys_held)):
                return True
            time.sleep(0.1)
    return False


def psi(engine, xs, ys, k_sender, k_receiver):
    s = PsiSender(encode_ids(xs), engine=engine, run_id="r", nonce=b"x", chunk_size=70, key=k_sender)
    r = PsiReceiver(encode_ids(ys), engine=engine, run_id="r", nonce=b"x", chunk_size=64, key=k_receiver)
    run_in_memory(s, r)
    return s, r


def test_a_psi_on_the_cluster_gives_the_local_pools_tokens_and_rows(cluster):
    xs = [f"user{i}" for i in range(0, 600)]
    ys = [f"user{i}" for i in range(250, 900)]
    kd, kl = PsiKey.generate(), PsiKey.generate()
    with PsiEngine(workers=2, task_items=32) as local:
        s_local, r_local = psi(local, xs, ys, kd, kl)
    with PsiEngine(cluster=cluster.address, task_items=32, max_inflight=6, cluster_timeout=20) as eng:
        s, r = psi(eng, xs, ys, kd, kl)
        assert eng.cluster_threads == 2
        # each key went to every worker once (scattered, not with each task); each worker built each key once and
        # keeps it with the scattered bytes, not in the module cache of the long-lived worker process
        held = eng._pool.client.run(_keys_held)
        assert len(held) == 2 and all(v == (2, 2, 0) for v in held.values()), held
    # the node is done: the keys are gone from the workers
    assert _wait_for_workers(cluster.address, lambda held: all(v[0] == 0 for v in held.values()))
    assert np.array_equal(s.tokens, s_local.tokens) and np.array_equal(r.tokens, r_local.tokens)
    assert np.array_equal(s.rows, s_local.rows) and np.array_equal(r.rows, r_local.rows)
    shared = [xs[i] for i in s.rows.tolist()]
    assert shared == [ys[i] for i in r.rows.tolist()]
    assert set(shared) == set(xs) & set(ys)


@settings(max_examples=8, deadline=None)
@given(xs=st.sets(st.integers(0, 400), max_size=120), ys=st.sets(st.integers(0, 400), max_size=120),
       task_items=st.integers(1, 40), window=st.integers(1, 6))
def test_property_any_sets_any_task_size_and_window_give_the_local_result(cluster, xs, ys, task_items, window):
    xs, ys = sorted(xs), sorted(ys)
    kd, kl = PsiKey.generate(), PsiKey.generate()
    s_local, r_local = psi(PsiEngine(workers=1), xs, ys, kd, kl)
    with PsiEngine(cluster=cluster.address, task_items=task_items, max_inflight=window, cluster_timeout=20) as eng:
        s, r = psi(eng, xs, ys, kd, kl)
    assert np.array_equal(s.tokens, s_local.tokens) and np.array_equal(r.rows, r_local.rows)
    assert np.array_equal(s.rows, s_local.rows)
    assert {xs[i] for i in s.rows.tolist()} == set(xs) & set(ys)


def test_chunks_come_back_in_order_with_a_window_of_two_tasks(cluster):
    key = PsiKey.generate()
    items = encode_ids(range(301))
    with PsiEngine(workers=1) as local:
        want = local.hash_encrypt(items, key, DOM)
    with PsiEngine(cluster=cluster.address, task_items=7, max_inflight=2, cluster_timeout=20) as eng:
        assert eng.max_inflight == 2
        chunks = list(eng.iter_hash_encrypt(items, key, DOM, chunk_size=64))
        assert [len(c) for c in chunks] == [64, 64, 64, 64, 45]
        assert np.array_equal(np.concatenate(chunks), want)
        parts = list(eng.iter_encrypt([want[:5], want[5:5], want[5:]], key))
        assert [len(p) for p in parts] == [5, 0, 296]
        assert eng.hash_encrypt([], key, DOM).shape == (0, 32)


def test_a_bad_peer_point_is_the_same_error_and_the_key_never_reaches_a_log(cluster):
    key = PsiKey.generate()
    good = PsiEngine(workers=1).hash_encrypt(encode_ids(range(40)), key, DOM)
    twist = 2
    while on_main_curve(twist):
        twist += 1
    bad = good.copy()
    bad[33] = np.frombuffer(twist.to_bytes(32, "little"), np.uint8)
    with PsiEngine(cluster=cluster.address, task_items=8, cluster_timeout=20) as eng:
        with pytest.raises(InvalidPointError, match="index 33"):
            eng.encrypt(bad, key)
        assert len(eng.encrypt(good, key)) == 40  # the cluster carries on after a peer's bad point
    logs = cluster.logs()
    for form in (key.raw.hex(), repr(key.raw), key.raw.hex().upper()):
        assert form not in logs


def test_a_worker_result_of_the_wrong_size_is_an_error_not_a_misaligned_stream(cluster):
    """What a worker with another vfl version might return: checked against the task's item count."""
    with PsiEngine(cluster=cluster.address, cluster_timeout=20) as eng:
        pool = eng.start()._pool
        short = pool.submit(lambda key, n: b"\x01" * n, PsiKey.generate().raw, 31)
        with pytest.raises(ClusterFailedError, match="returned 31 bytes where 32 bytes were due"):
            pool.result(short, 32)
        wrong = pool.submit(lambda key, n: [n], PsiKey.generate().raw, 32)
        with pytest.raises(ClusterFailedError, match="returned a list where 32 bytes were due"):
            pool.result(wrong, 32)


def test_an_unreachable_scheduler_is_a_setup_error_naming_it_and_the_way_out():
    address = f"tcp://127.0.0.1:{free_port()}"  # nobody listens there
    eng = PsiEngine(cluster=address, cluster_timeout=1.5)
    with pytest.raises(ClusterUnavailableError) as info:
        eng.start()
    eng.close()
    msg = str(info.value)
    assert address in msg and "remove [psi].cluster" in msg and "\n" not in msg
    assert isinstance(info.value, SetupError) and isinstance(info.value, PsiLocalError)
    assert info.value.exit_code == ExitCode.SETUP


def test_without_distributed_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # what Python does when the package is not installed
    with pytest.raises(ClusterUnavailableError, match=r"pip install 'vfl\[dask\]'"):
        PsiEngine(cluster="tcp://127.0.0.1:8786").start()


def test_the_default_local_pool_never_imports_distributed():
    code = ("import sys\n"
            "from vfl.psi.engine import PsiEngine, encode_ids\nfrom vfl.psi.cipher import PsiKey\n"
            "from vfl.psi.curve import hash_domain\nimport vfl.node.runner, vfl.node.config\n"
            "if __name__ == '__main__':\n"
            "    with PsiEngine(workers=1) as e:\n"
            "        assert len(e.hash_encrypt(encode_ids(range(20)), PsiKey.generate(), hash_domain('r', b''))) == 20\n"
            "    assert 'distributed' not in sys.modules and 'dask' not in sys.modules, 'imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_a_killed_worker_is_replaced_by_the_other_and_losing_all_is_a_clear_error(tmp_path):
    """kill -9 of one worker mid-stream: the same result; of both: ClusterFailedError, then "no workers" at start."""
    key = PsiKey.generate()
    items = encode_ids(range(3000))
    want = PsiEngine(workers=1).hash_encrypt(items, key, DOM)
    with DaskCluster(tmp_path, workers=2) as c:
        with PsiEngine(cluster=c.address, task_items=25, max_inflight=8, cluster_timeout=2) as eng:
            stream = eng.iter_hash_encrypt(items, key, DOM, chunk_size=500)
            first = next(stream)  # tasks of later chunks are queued on both workers now
            c.workers[0].kill()  # kill -9, mid-stream: Dask runs its tasks again on the other worker
            got = np.concatenate([first, *stream])
            assert np.array_equal(got, want)
            c.workers[1].kill()
            with pytest.raises(ClusterFailedError, match=c.address):  # no worker left: bounded, never a hang
                eng.encrypt(want[:100], key)
        # a node starting now finds a scheduler without workers: a setup error before its session
        late = PsiEngine(cluster=c.address, cluster_timeout=1.0)
        with pytest.raises(ClusterUnavailableError, match="has no workers after 1 s") as info:
            late.start()
        late.close()
        assert c.address in str(info.value) and "dask worker" in str(info.value)


@pytest.mark.parametrize("value, ok", [
    ("tcp://10.0.0.5:8786", True),
    ("tls://scheduler.bank.internal:8786", True),
    ("tcp://[::1]:8786", True),
    ("tcp://10.0.0.5", False),
    ("http://10.0.0.5:8786", False),
    ("10.0.0.5:8786", False),
    ("tcp://:8786", False),
    ("tcp://10.0.0.5:0", False),
    ("tcp://10.0.0.5:70000", False),
    ("tcp://10.0.0.5:8786/x", False),
    ("tcp://user@10.0.0.5:8786", False),
    (8786, False),
])
def test_cluster_address_must_be_tcp_or_tls_host_and_port(value, ok):
    problem = check_cluster_address(value)
    assert (problem is None) == ok, problem
    if not ok:
        assert "tcp://HOST:PORT or tls://HOST:PORT" in problem and repr(value) in problem


def test_a_node_that_dies_mid_psi_leaves_no_key_on_the_workers(cluster, tmp_path):
    """kill -9 of the process holding the engine: the scheduler sees its client gone and releases the key."""
    script = tmp_path / "holder.py"
    script.write_text(
        "import sys, time\n"
        "from vfl.psi.engine import PsiEngine, encode_ids\nfrom vfl.psi.cipher import PsiKey\n"
        "from vfl.psi.curve import hash_domain\n"
        "eng = PsiEngine(cluster=sys.argv[1], task_items=50, cluster_timeout=20)\n"
        "eng.hash_encrypt(encode_ids(range(500)), PsiKey.generate(), hash_domain('r', b''))\n"
        "print('scattered', flush=True)\n"
        "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, str(script), cluster.address], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "scattered"
        assert _wait_for_workers(cluster.address, lambda held: sum(v[0] for v in held.values()) >= 1)
        proc.kill()
        proc.wait(timeout=10)
        assert _wait_for_workers(cluster.address, lambda held: all(v[0] == 0 for v in held.values()))
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_over_tls_with_dasks_own_tls_settings_in_the_environment(tmp_path):
    """The README's way: tls:// in [psi].cluster, the party's CA, certificate and key in Dask's config variables."""
    key = PsiKey.generate()
    items = encode_ids(range(400))
    want = PsiEngine(workers=1).hash_encrypt(items, key, DOM)
    with DaskCluster(tmp_path, workers=2, tls=True) as c:
        code = ("import sys\nfrom vfl.psi.engine import PsiEngine, encode_ids\nfrom vfl.psi.cipher import PsiKey\n"
                "from vfl.psi.curve import hash_domain\n"
                "key = PsiKey.from_bytes(bytes.fromhex(sys.stdin.read()))\n"
                "with PsiEngine(cluster=sys.argv[1], task_items=50, cluster_timeout=20) as eng:\n"
                "    out = eng.hash_encrypt(encode_ids(range(400)), key, hash_domain('run', b'n'))\n"
                "    print(eng.cluster_threads, out.tobytes().hex())\n")
        env = {**os.environ, **tls_client_env(c.tls)}
        done = subprocess.run([sys.executable, "-c", code, c.address], input=key.raw.hex(), env=env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr + c.logs()
        threads, hexed = done.stdout.split()
        assert threads == "2" and bytes.fromhex(hexed) == want.tobytes()
        # without TLS settings (as in this test process) the node says what to set before trying to connect
        with pytest.raises(ClusterUnavailableError, match="DASK_DISTRIBUTED__COMM__TLS__CA_FILE"):
            PsiEngine(cluster=c.address, cluster_timeout=5).start()
