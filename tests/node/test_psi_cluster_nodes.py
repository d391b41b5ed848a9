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


def node_psi(tmp: Path, configs: dict[str, Path]) -> dict[str, list[tuple[int, str]]]:
    with Nodes(tmp) as nodes:
        procs = {name: nodes.start(path) for name, path in configs.items()}
        codes = {name: p.wait(timeout=90) for name, p in procs.items()}
        assert codes == {name: 0 for name in configs}, {n: p.output for n, p in procs.items()}
        output = {name: p.output for name, p in procs.items()}
    return {name: read_aligned(tmp / f"{name}-aligned.csv") for name in configs} | {"_log": output}  # type: ignore


def test_a_party_on_its_own_dask_cluster_aligns_the_same_ids_as_without(tmp_path):
    rng = random.Random(16)
    universe = [f"cust-{i:05d}" for i in range(900)]
    sets = {"bank": rng.sample(universe, 500) + ["Zoë"], "dh1": rng.sample(universe, 450) + ["Zoë"]}
    for sub in ("local", "cluster"):
        (tmp_path / sub).mkdir()
    local = node_psi(tmp_path / "local", psi_session(tmp_path / "local", sets, psi={"chunk_size": 100}))
    configs = psi_session(tmp_path / "cluster", sets, psi={"chunk_size": 100})
    with DaskCluster(tmp_path / "dask", workers=2) as cluster:
        with_cluster(configs["bank"], cluster.address)
        on_cluster = node_psi(tmp_path / "cluster", configs)
    assert f"PSI on the Dask cluster at {cluster.address} (2 worker threads)" in on_cluster["_log"]["bank"]
    expected = set(sets["bank"]) & set(sets["dh1"])
    for result in (local, on_cluster):
        ids = {name: [i for _, i in result[name]] for name in sets}
        assert ids["bank"] == ids["dh1"]  # one order at both parties
        assert set(ids["bank"]) == expected and len(ids["bank"]) == len(expected)
        for name in sets:  # row numbers point at the party's own rows
            assert all(sets[name][r] == i for r, i in result[name])
    for name in sets:  # the same rows aligned (the order differs: fresh keys every run)
        assert sorted(local[name]) == sorted(on_cluster[name])


def test_an_unreachable_cluster_stops_the_node_before_any_network_activity(tmp_path):
    configs = psi_session(tmp_path, {"bank": ["a", "b"], "dh1": ["b", "c"]})
    address = f"tcp://127.0.0.1:{free_port()}"  # nobody listens there
    with_cluster(configs["dh1"], address)
    text = configs["dh1"].read_text()  # the cluster gets as long as a peer would: make that short here
    configs["dh1"].write_text(text.replace("peer = 5.0\n", "peer = 1.5\n", 1))
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
