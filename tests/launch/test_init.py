"""`vfl init` + `vfl launch`: a 2-party run from the user's own CSVs, with no hand-written config and no key step.

The two tables have different ID column names and only partly the same people; the label is text. `vfl init`
reads them as the nodes will, writes commented configs and keys; `vfl launch` then runs PSI and training to the end.
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from .test_launcher import Launcher

RUN_TIMEOUT_S = 300.0  # PSI + a few epochs take seconds; generous for a busy box


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def user_tables(folder: Path, n: int = 200) -> tuple[Path, Path]:
    """bank.csv (customer, churned yes/no, balance) and shop.csv (cust_id, 3 features), 170 people in common."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 4))
    label = np.where(x[:, 0] + x[:, 1] - x[:, 2] > 0, "yes", "no")
    ids = [f"C{i:05d}" for i in range(n)]
    bank_rows, shop_rows = rng.permutation(n)[:185], rng.permutation(n)[15:]  # each misses some people
    write_csv(folder / "bank.csv", ["customer", "churned", "balance"],
              [[ids[i], label[i], x[i, 0]] for i in bank_rows])
    write_csv(folder / "shop.csv", ["cust_id", "visits", "basket", "returns"],
              [[ids[i], *x[i, 1:]] for i in shop_rows])
    return folder / "bank.csv", folder / "shop.csv"


def vfl(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vfl", *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def init(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    user_tables(tmp_path / "data")
    return vfl("init", "run", "--label-holder", "bank=data/bank.csv", "--data-holder", "shop=data/shop.csv",
               "--id-column", "customer", "--id-column-of", "shop=cust_id", "--label-column", "churned", *extra,
               cwd=tmp_path)


def launch(out: Path, log: Path) -> str:
    """`vfl launch OUT` to the end; its output (a failed run fails the test with it)."""
    launcher = Launcher(out, log)
    try:
        code = launcher.wait(timeout=RUN_TIMEOUT_S)
        assert code == 0, launcher.output
        return launcher.output
    finally:
        launcher.close()


def test_init_then_launch_trains_two_parties_from_their_own_csvs(tmp_path):
    done = init(tmp_path, "--epochs", "3")
    assert done.returncode == 0, done.stderr
    assert "task: binary (2 distinct label values" in done.stdout
    bank_ids = {r["customer"] for r in csv.DictReader(open(tmp_path / "data" / "bank.csv"))}
    shop_ids = {r["cust_id"] for r in csv.DictReader(open(tmp_path / "data" / "shop.csv"))}
    shared = len(bank_ids & shop_ids)
    assert 0 < shared < min(len(bank_ids), len(shop_ids))
    assert f"{shared} IDs are in every party's table" in done.stdout
    assert re.search(r"^  vfl launch run$", done.stdout, re.M), done.stdout
    out = tmp_path / "run"
    assert sorted(p.name for p in out.glob("*.toml")) == ["bank.toml", "shop.toml"]
    assert {p.name for p in (out / "keys").iterdir()} == {"bank.key", "bank.key_secret", "shop.key", "shop.key_secret"}

    output = launch(out, tmp_path / "launch.log")
    model = out / "model"
    assert (model / "bank-segment.pt").is_file() and (model / "shop-segment.pt").is_file()
    metrics = [json.loads(line) for line in (model / "metrics.jsonl").read_text().splitlines()]
    assert sorted({m["epoch"] for m in metrics}) == [1, 2, 3], metrics
    assert f"rows aligned: {shared}" in output


def every_key_has_a_comment(path: Path) -> None:
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if line and not line.startswith("#"):
            assert lines[i - 1].startswith("# "), f"{path}:{i + 1} {line!r} has no comment above it"


def test_every_key_of_the_written_configs_has_a_comment_and_paths_are_relative(tmp_path):
    assert init(tmp_path).returncode == 0
    for name in ("bank", "shop"):
        path = tmp_path / "run" / f"{name}.toml"
        every_key_has_a_comment(path)
        cfg = tomllib.loads(path.read_text())
        assert cfg["data"]["path"] == f"../data/{name}.csv"
        assert cfg["keys"]["secret"] == f"keys/{name}.key_secret"
    bank = tomllib.loads((tmp_path / "run" / "bank.toml").read_text())
    assert bank["data"]["id_column"] == "customer" and bank["data"]["label_column"] == "churned"
    assert bank["train"]["task"] == "binary" and bank["model"]["top"]["widths"][-1] == 1
    assert tomllib.loads((tmp_path / "run" / "shop.toml").read_text())["data"]["id_column"] == "cust_id"


def test_a_wrong_column_names_the_file_the_column_and_the_columns_it_has(tmp_path):
    done = init(tmp_path, "--id-column-of", "shop=customer_id")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "shop.csv: no column 'customer_id'; available columns: 'cust_id', 'visits', 'basket', 'returns'" \
        in done.stderr, done.stderr
    assert not (tmp_path / "run").exists() or not list((tmp_path / "run").glob("*.toml"))
    done = vfl("init", "run", "--label-holder", "bank=data/bank.csv", "--data-holder", "shop=data/shop.csv",
               "--id-column", "customer", "--id-column-of", "shop=cust_id", "--label-column", "label", cwd=tmp_path)
    assert done.returncode == 2
    assert "bank.csv: no column 'label'; available columns: 'customer', 'churned', 'balance' (set --label-column)" \
        in done.stderr, done.stderr


def test_init_does_not_overwrite_configs_unless_told(tmp_path):
    assert init(tmp_path).returncode == 0
    again = init(tmp_path)
    assert again.returncode == 2 and "already holds node configs (bank.toml, shop.toml)" in again.stderr
    assert "--overwrite" in again.stderr
    assert init(tmp_path, "--overwrite", "--epochs", "7").returncode == 0
    assert tomllib.loads((tmp_path / "run" / "bank.toml").read_text())["train"]["epochs"] == 7


def test_the_task_follows_the_labels_unless_given(tmp_path):
    from vfl.launch.init import infer_task

    assert infer_task(np.array(["a", "b", "c"], dtype=object))[0] == "multiclass"
    assert infer_task(np.array([0, 1, 1]))[0] == "binary"
    assert infer_task(np.array([0.5, 1.25, 3.0]))[0] == "regression"
    assert infer_task(np.arange(50))[0] == "regression"
    assert infer_task(np.arange(5))[0] == "multiclass"
    done = init(tmp_path, "--task", "regression")
    assert done.returncode == 2 and "churned" in done.stderr, done.stderr  # text labels are no regression target


def test_init_with_a_segment_holder_writes_a_chain_that_launches(tmp_path):
    """`--segment-holder mid=shop`: shop -> mid -> bank, mid with a model segment and no table; every key commented,
    every config loads as its node reads it, and `vfl launch` trains the three of them."""
    from vfl.node.config import load_config

    done = init(tmp_path, "--segment-holder", "mid=shop", "--epochs", "2")
    assert done.returncode == 0, done.stderr
    out = tmp_path / "run"
    assert "mid: segment holder, no data, fed by shop -> run/mid.toml" in done.stdout, done.stdout
    assert sorted(p.name for p in out.glob("*.toml")) == ["bank.toml", "mid.toml", "shop.toml"]
    cfg = {name: load_config(out / f"{name}.toml") for name in ("bank", "mid", "shop")}
    for name in cfg:
        every_key_has_a_comment(out / f"{name}.toml")
    assert cfg["mid"].role == "segment_holder" and cfg["mid"].data is None and cfg["mid"].train.segment
    assert cfg["shop"].endpoint == cfg["mid"].bind and cfg["mid"].endpoint == cfg["bank"].endpoint
    assert {s.inputs for s in cfg["bank"].session.segments.values()} == {("shop",)}
    assert len({c.session.digest for c in cfg.values()}) == 1

    output = launch(out, tmp_path / "launch.log")
    for name in cfg:
        assert (out / "model" / f"{name}-segment.pt").is_file(), name
    assert json.loads((out / "summary.json").read_text())["parties"] == {
        "bank": "label_holder", "mid": "segment_holder", "shop": "data_holder"}


@pytest.mark.parametrize("segments, problem", [
    (["mid=nobody"], "'nobody' is neither a data holder nor a segment holder"),
    (["mid=bank"], "the label holder 'bank' feeds no segment holder"),
    (["shop=shop"], "party 'shop' is named more than once"),
    (["m1=shop", "m2=shop"], "'shop' is an input of both 'm1' and 'm2'"),
    (["m1=m2", "m2=m1,shop"], "(a cycle)"),
])
def test_a_wrong_segment_holder_is_refused_naming_the_problem(tmp_path, segments, problem):
    done = init(tmp_path, *(arg for s in segments for arg in ("--segment-holder", s)))
    assert done.returncode == 2 and "Traceback" not in done.stderr and problem in done.stderr, done.stderr
    assert not list((tmp_path / "run").glob("*.toml")) if (tmp_path / "run").exists() else True
