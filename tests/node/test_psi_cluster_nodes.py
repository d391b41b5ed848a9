"""``[psi].cluster`` between real node processes: a party whose PSI runs on its own Dask cluster (a real scheduler
and two worker processes on loopback) aligns exactly the rows it aligns with its local pool; an unreachable cluster
stops the node before any network activity, naming the address."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("distributed", reason="the cluster tests need the dask extra (pip install 'vfl[dask]')")

from vfl.launch.prepare import free_port  # noqa: E402
from vfl.node import ConfigError, load_config  # noqa: E402

from ..psi.dask_cluster import DaskCluster  # noqa: E402
from .procs import Nodes  # noqa: E402
from .test_psi_nodes import psi_session, read_aligned  # noqa: E402


def with_cluster(config: Path, address: str) -> None:
    """Add ``cluster = ADDRESS`` to the config's [psi] table (one party's own setting, not the session's)."""
    text = config.read_text()
    assert "\n[psi]\n" in text
    config.write_text(text.replace("\n[psi]\n", f'\n[psi]\ncluster = "{address}"\n', 1))


def test_a_party_on_its_own_dask_cluster_aligns_the_same_ids_as_without(tmp_path):
    rng = random.Random(16)
    universe = [f"cust-{i:05d}" for i in range(900)]
    sets = {"bank": rng.sample(universe, 500) + ["Zoë"], "dh1": rng.sample(universe, 450) + ["Zoë"]}
    runs = {}
    # the cluster first: its processes listen on ports the OS picks, so the sessions' ports are chosen after them
    with DaskCluster(tmp_path / "dask", workers=2) as cluster, Nodes(tmp_path) as nodes:
        for run in ("local", "cluster"):
            (tmp_path / run).mkdir()
            runs[run] = psi_session(tmp_path / run, sets, psi={"chunk_size": 100})
        with_cluster(runs["cluster"]["bank"], cluster.address)  # the label holder's PSI on its cluster
        procs = {(run, name): nodes.start(path) for run, configs in runs.items() for name, path in configs.items()}
        codes = {key: p.wait(timeout=90) for key, p in procs.items()}  # both sessions at once: they share nothing
        assert set(codes.values()) == {0}, {key: p.output for key, p in procs.items()}
    bank_log = procs["cluster", "bank"].output
    assert f"PSI on the Dask cluster at {cluster.address} (2 worker threads)" in bank_log
    assert "Dask cluster" not in procs["local", "bank"].output
    aligned = {run: {name: read_aligned(tmp_path / run / f"{name}-aligned.csv") for name in sets} for run in runs}
    expected = set(sets["bank"]) & set(sets["dh1"])
    for result in aligned.values():
        ids = {name: [i for _, i in result[name]] for name in sets}
        assert ids["bank"] == ids["dh1"]  # one order at both parties
        assert set(ids["bank"]) == expected and len(ids["bank"]) == len(expected)
        for name in sets:  # row numbers point at the party's own rows
            assert all(sets[name][r] == i for r, i in result[name])
    for name in sets:  # the same rows aligned (the order differs: fresh keys every run)
        assert sorted(aligned["local"][name]) == sorted(aligned["cluster"][name])


def test_a_cluster_that_loses_its_workers_mid_session_ends_it_with_a_clear_error_at_both_parties(tmp_path):
    sets = {"bank": [f"c{i}" for i in range(3000)], "dh1": [f"c{i}" for i in range(1000, 4000)]}
    with DaskCluster(tmp_path / "dask", workers=2) as cluster, Nodes(tmp_path) as nodes:
        configs = psi_session(tmp_path, sets, psi={"chunk_size": 500})  # ports chosen after the cluster's
        with_cluster(configs["dh1"], cluster.address)
        text = configs["dh1"].read_text()  # dh1's peer timeout 3 s: it waits 1.5 s on its cluster
        configs["dh1"].write_text(text.replace("peer = 5.0\n", "peer = 3.0\n", 1))
        dh1 = nodes.start(configs["dh1"])
        dh1.wait_for("PSI on the Dask cluster", timeout=30)
        for worker in cluster.workers:  # kill -9 every worker once dh1 is connected
            worker.kill()
        bank = nodes.start(configs["bank"])
        assert dh1.wait(timeout=60) == 1 and bank.wait(timeout=60) == 1, dh1.output + bank.output
    # half its peer timeout: dh1 gives up on its cluster in time to tell the label holder why
    line = dh1.output.strip().splitlines()[-1]
    assert line.startswith(f"vfl node: {configs['dh1']}: the Dask cluster at {cluster.address} ([psi].cluster) "
                           "failed during the PSI"), dh1.output
    assert "internal error at 'dh1': ClusterFailedError" in bank.output, bank.output


def test_an_unreachable_cluster_stops_the_node_before_any_network_activity(tmp_path):
    configs = psi_session(tmp_path, {"bank": ["a", "b"], "dh1": ["b", "c"]})
    address = f"tcp://127.0.0.1:{free_port()}"  # nobody listens there
    with_cluster(configs["dh1"], address)
    text = configs["dh1"].read_text()  # the cluster gets half the peer timeout: make that short here
    configs["dh1"].write_text(text.replace("peer = 5.0\n", "peer = 3.0\n", 1))
    done = subprocess.run([sys.executable, "-m", "vfl", "node", "--config", str(configs["dh1"])],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if "Dask scheduler" in line]
    assert len(errors) == 1 and address in errors[0] and "remove [psi].cluster" in errors[0], done.stderr
    assert "within 1.5 s" in errors[0] and "connecting to" not in done.stderr


@pytest.mark.parametrize("value, why", [
    ('"dask.bank.internal:8786"', "no scheme"),
    ('"http://10.0.0.5:8786"', "scheme 'http'"),
    ('"tcp://10.0.0.5"', "no port"),
    ('"tcp://10.0.0.5:99999"', "the port must be 1..65535"),
])
def test_a_wrong_cluster_address_is_one_config_line_naming_the_key(tmp_path, value, why):
    dh1 = psi_session(tmp_path, {"bank": ["a"], "dh1": ["a"]})["dh1"]
    dh1.write_text(dh1.read_text().replace("\n[psi]\n", f"\n[psi]\ncluster = {value}\n", 1))
    with pytest.raises(ConfigError) as info:
        load_config(dh1)
    msg = str(info.value)
    assert msg.startswith(f"{dh1}: [psi].cluster must be tcp://HOST:PORT or tls://HOST:PORT") and "\n" not in msg
    assert why in msg


def test_a_cluster_address_loads_and_the_default_is_the_local_pool(tmp_path):
    configs = psi_session(tmp_path, {"bank": ["a"], "dh1": ["a"]})
    with_cluster(configs["dh1"], "tls://dask.bank.internal:8786")
    assert load_config(configs["dh1"]).psi.cluster == "tls://dask.bank.internal:8786"
    assert load_config(configs["bank"]).psi.cluster is None
