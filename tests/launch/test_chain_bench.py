"""bench/chain.py (issue 17): its two-tier variant is the chain demo with the segment merged into the label
holder's top, and nothing else changed; the whole bench (slow) measures all three variants on the same rows."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from vfl.node import load_config

pytest.importorskip("sklearn", reason="the demo data sets come from scikit-learn")

BENCH = Path(__file__).resolve().parents[2] / "bench" / "chain.py"


def _bench():
    sys.path.insert(0, str(BENCH.parent))  # chain.py imports bench/_children.py as the benches do
    try:
        spec = importlib.util.spec_from_file_location("bench_chain", BENCH)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH.parent))
    return module


def test_the_split_variant_is_the_chain_demo_with_the_segment_merged_into_the_top(tmp_path):
    bench = _bench()
    chain = {p: load_config(path) for p, path in bench.prepare_chain(tmp_path / "chain", 3).items()}
    split = {p: load_config(path) for p, path in bench.prepare_split(tmp_path / "split", 3).items()}
    assert sorted(split) == ["bank", "dh1"] and sorted(chain) == ["bank", "dh1", "seg1"]
    assert not (tmp_path / "split" / "seg1.toml").exists()
    assert split["bank"].train.top == {"widths": [*chain["seg1"].train.segment["widths"],
                                                  *chain["bank"].train.top["widths"]]}
    assert split["dh1"].train.bottom == chain["dh1"].train.bottom
    for party in ("bank", "dh1"):
        a, b = chain[party], split[party]
        assert (a.run, a.session.batch_size, a.session.window) == (b.run, b.session.batch_size, b.session.window)
        assert a.train.optimizer == b.train.optimizer and a.train.seed == b.train.seed
        assert (a.train.epochs, a.train.validation_fraction) == (b.train.epochs, b.train.validation_fraction)
    assert split["bank"].session.segments == {} and split["bank"].session.cut_widths == {"dh1": 128}
    for name in ("bank.csv", "dh1.csv"):  # the same data (the demo's seed)
        assert (tmp_path / "chain" / "data" / name).read_bytes() == (tmp_path / "split" / "data" / name).read_bytes()


@pytest.mark.slow
def test_the_quick_bench_measures_the_three_variants_on_the_same_rows(tmp_path):
    out = subprocess.run([sys.executable, str(BENCH), "--quick", "--keep", str(tmp_path)], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    runs = result["runs"]
    assert runs["chain"][0]["parties"] == {"bank": "label_holder", "dh1": "data_holder", "seg1": "segment_holder"}
    assert runs["split"][0]["parties"] == {"bank": "label_holder", "dh1": "data_holder"}
    assert len({r[0]["train_samples"] for r in runs.values()}) == 1
    assert runs["central"][0]["threads"] == 1
    for key in ("chain_vs_split_ratio", "chain_vs_central_ratio", "chain_vs_split_cpu_ratio"):
        assert result[key] > 0
