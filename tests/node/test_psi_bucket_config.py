"""[psi].buckets and [psi].memory_mb: what they put in the session config, and the one-line problems."""

from __future__ import annotations

from pathlib import Path

import pytest

from vfl.launch import prepare_session
from vfl.node import ConfigError, load_config
from vfl.node.config import DEFAULT_PSI_MEMORY_MB
from vfl.psi.buckets import capacity_for


def config(tmp_path: Path, **psi) -> Path:
    (tmp_path / "bank.csv").write_text("id\n1\n")
    (tmp_path / "dh1.csv").write_text("id\n1\n")
    data = {p: {"path": f"{p}.csv", "id_column": "id"} for p in ("bank", "dh1")}
    return prepare_session(tmp_path, data_holders=["dh1"], data=data, psi=psi)["dh1"]


@pytest.mark.parametrize(
    "psi, buckets, memory_mb",
    [
        ({}, 1, 0),
        ({"buckets": 1, "memory_mb": 64}, 1, 64),  # buckets = 1 turns bucketing off
        ({"buckets": 8}, 8, 0),
        ({"memory_mb": 256}, "auto", 256),  # a budget alone asks for buckets chosen from it
        ({"buckets": "auto"}, "auto", DEFAULT_PSI_MEMORY_MB),
    ],
)
def test_bucket_keys_give_the_session_config_its_psi_buckets(tmp_path, psi, buckets, memory_mb):
    cfg = load_config(config(tmp_path, **psi))
    assert cfg.session.psi_buckets == cfg.psi.buckets == buckets
    assert ("psi_buckets" in cfg.session.to_wire()) == (buckets != 1)
    assert cfg.psi.memory_mb == memory_mb
    assert cfg.psi.capacity == (capacity_for(memory_mb) if memory_mb else None)
    assert cfg.psi.spill_dir == tmp_path.resolve() / "psi-buckets"


@pytest.mark.parametrize(
    "psi, problem",
    [
        ({"buckets": 0}, '[psi].buckets must be "auto" or an integer in 1..65536, got 0'),
        ({"buckets": "many"}, "[psi].buckets must be \"auto\" or an integer in 1..65536, got 'many'"),
        ({"memory_mb": -1}, "[psi].memory_mb must be >= 0 (0: no budget), got -1"),
    ],
)
def test_bad_bucket_keys_are_one_line_each(tmp_path, psi, problem):
    with pytest.raises(ConfigError) as info:
        load_config(config(tmp_path, **psi))
    assert problem in str(info.value)
