"""Segment chains between real node processes on loopback (PROTOCOL.md section 13, issue 17).

Three tiers (two data holders feed a segment holder, which feeds the label holder) and four (two segment holders in
line): at window 1 every segment's final weights equal training the composed model centrally ([C8]); a window above
1 learns; the relayed PSI gives every party the same rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from vfl.launch import prepare_session
from vfl.node.training import canonical_order
from vfl.train.central import OptimizerSpec, make_schedule, train_central
from vfl.train.models import Combiner, MlpSpec, build_mlp

from .test_training_nodes import FAST, OPT, aligned_ids, run_nodes, synthetic, write_table

#: 3 tiers: dh1, dh2 -> seg1 -> bank. 4 tiers: dh1, dh2 -> segA -> segB -> bank
THREE = {"seg1": {"inputs": ["dh1", "dh2"], "width": 6}}
FOUR = {"segA": {"inputs": ["dh1", "dh2"], "width": 6}, "segB": {"inputs": ["segA"], "width": 5}}
SEEDS = {"dh1": 1, "dh2": 2, "seg1": 7, "segA": 7, "segB": 8}


def chain_session(tmp_path: Path, segments: dict, window: int, epochs: int = 3, run: str = "chain-test",
                  opt: dict = OPT):
    x1, x2, y = synthetic()
    ids = [f"person-{i:04d}" for i in range(len(y))]
    rng = np.random.default_rng(1)
    keep = {p: np.sort(rng.choice(len(ids), size=len(ids) - 20, replace=False)) for p in ("bank", "dh1", "dh2")}
    write_table(tmp_path / "bank.csv", [ids[i] for i in keep["bank"]], {"label": y[keep["bank"]]})
    write_table(tmp_path / "dh1.csv", [ids[i] for i in keep["dh1"]], {f"a{j}": x1[keep["dh1"], j] for j in range(5)})
    write_table(tmp_path / "dh2.csv", [ids[i] for i in keep["dh2"]], {f"b{j}": x2[keep["dh2"], j] for j in range(7)})
    out = str(tmp_path / "model")
    tables = {
        "bank": {"model": {"top": {"widths": [16, 3]}, "seed": 3},
                 "train": {"task": "multiclass", "epochs": epochs, "validation_fraction": 0.25, "seed": 5,
                           "optimizer": opt, "output": out}},
        "dh1": {"model": {"bottom": {"widths": [6, 4]}, "seed": 1}, "train": {"optimizer": opt, "output": out}},
        "dh2": {"model": {"bottom": {"widths": [6, 4]}, "seed": 2}, "train": {"optimizer": opt, "output": out}},
    }
    for name, spec in segments.items():
        tables[name] = {"model": {"segment": {"widths": [8, spec["width"]]}, "seed": SEEDS[name]},
                        "train": {"optimizer": opt, "output": out}}
    data = {
        "bank": {"path": "bank.csv", "id_column": "id", "label_column": "label", "features": []},
        "dh1": {"path": "dh1.csv", "id_column": "id"},
        "dh2": {"path": "dh2.csv", "id_column": "id"},
    }
    configs = prepare_session(tmp_path, data_holders=["dh1", "dh2"], run=run, timeouts=FAST,
                              link_check={"rounds": 0}, data=data, psi={"workers": 1}, tables=tables, cut_width=4,
                              batch_size=32, window=window, segments=segments)
    return configs, (x1, x2, y, ids)


def central_reference(tmp_path: Path, segments: dict, data, epochs: int = 3):
    """The composed model trained in one process on the batches the label holder drew: bottoms, then each segment
    holder's segment in line, then the top."""
    x1, x2, y, ids = data
    order = aligned_ids(tmp_path / "bank-aligned.csv")
    assert order == aligned_ids(tmp_path / "dh1-aligned.csv") == aligned_ids(tmp_path / "dh2-aligned.csv")
    index = {key: i for i, key in enumerate(ids)}
    rows = np.array([index[k] for k in order])[canonical_order(order, 5, "chain-test")]
    schedule = make_schedule(len(rows), 32, epochs, 5, 0.25)
    torch.set_num_threads(1)
    opt = OptimizerSpec.from_dict(OPT)
    middles, width = [], 8
    for name, spec in segments.items():  # in line: each one's input is the previous one's output
        middles.append(build_mlp(width, MlpSpec(widths=(8, spec["width"])), seed=SEEDS[name]))
        width = spec["width"]
    top = nn.Sequential(*middles, build_mlp(width, MlpSpec(widths=(16, 3)), seed=4))
    central = train_central(
        [x1[rows], x2[rows]], y[rows],
        [build_mlp(5, MlpSpec(widths=(6, 4)), seed=1), build_mlp(7, MlpSpec(widths=(6, 4)), seed=2)],
        top, combiner=Combiner([4, 4]), task="multiclass", schedule=schedule, bottom_optimizers=opt,
        top_optimizer=opt,
    )
    return central


def worst_difference(tmp_path: Path, segments: dict, central) -> float:
    saved = {p: torch.load(tmp_path / "model" / f"{p}-segment.pt", weights_only=True)
             for p in ("bank", "dh1", "dh2", *segments)}
    pairs = [(saved["dh1"]["model"], central.bottom_states[0]), (saved["dh2"]["model"], central.bottom_states[1])]
    top = central.top_state  # nn.Sequential(middle_1, ..., top): keys "0.…", "1.…", …
    for i, name in enumerate(segments):
        pairs.append((saved[name]["model"], {k[len(f"{i}."):]: v for k, v in top.items() if k.startswith(f"{i}.")}))
    n = len(segments)
    pairs.append((saved["bank"]["top"], {k[len(f"{n}."):]: v for k, v in top.items() if k.startswith(f"{n}.")}))
    worst = 0.0
    for got, want in pairs:
        assert set(got) == set(want), (sorted(got), sorted(want))
        for k in want:
            worst = max(worst, torch.max(torch.abs(got[k] - want[k])).item())
    return worst


def test_C8_window_1_through_a_segment_holder_equals_central_training(tmp_path):
    configs, data = chain_session(tmp_path, THREE, window=1)
    outputs = run_nodes(tmp_path, configs)
    central = central_reference(tmp_path, THREE, data)
    assert worst_difference(tmp_path, THREE, central) <= 1e-5
    metrics = [json.loads(line) for line in (tmp_path / "model" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    assert "training finished after 3 epoch(s)" in outputs["bank"]
    assert "RELAY" in outputs["dh1"] and "segment holder 'seg1'" in outputs["seg1"]


def test_C8_four_tiers_two_segment_holders_in_line_equal_central_training(tmp_path):
    configs, data = chain_session(tmp_path, FOUR, window=1)
    run_nodes(tmp_path, configs)
    central = central_reference(tmp_path, FOUR, data)
    assert worst_difference(tmp_path, FOUR, central) <= 1e-5


@pytest.mark.parametrize("window", [3])
def test_C8_a_pipelined_chain_learns(tmp_path, window):
    configs, _ = chain_session(tmp_path, THREE, window=window, epochs=20, opt={"kind": "adam", "lr": 0.01})
    run_nodes(tmp_path, configs)
    metrics = [json.loads(line) for line in (tmp_path / "model" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 20 and metrics[-1]["train_loss"] < 0.7 * metrics[0]["train_loss"], metrics[-1]
    assert max(m["val_accuracy"] for m in metrics[-3:]) > 0.6, metrics[-1]


def test_predict_through_a_segment_holder_gives_the_composed_model_s_outputs(tmp_path):
    """`vfl predict` in a chain: each data holder and the label holder with its new table, the segment holder with
    none (it holds no data); the label holder's predictions are the composed model's outputs."""
    import csv

    from .procs import Nodes
    from .test_training_nodes import write_table as write

    configs, (x1, x2, y, ids) = chain_session(tmp_path, THREE, window=1, epochs=2)
    run_nodes(tmp_path, configs)
    rng = np.random.default_rng(9)
    pick = rng.choice(len(ids), size=30, replace=False)
    new_ids = [ids[i] for i in pick]
    write(tmp_path / "bank-new.csv", new_ids[::-1], {})
    write(tmp_path / "dh1-new.csv", new_ids, {f"a{j}": x1[pick, j] for j in range(5)})
    write(tmp_path / "dh2-new.csv", new_ids[::-1], {f"b{j}": x2[pick[::-1], j] for j in range(7)})
    with Nodes(tmp_path) as nodes:
        procs = {}
        for p in configs:
            args = ["predict", "--config", str(configs[p])]
            if p != "seg1":
                args += ["--data", str(tmp_path / f"{p}-new.csv")]
            procs[p] = nodes.start_command(args, p)
        codes = {p: proc.wait(timeout=120) for p, proc in procs.items()}
        assert codes == {p: 0 for p in configs}, {p: proc.output for p, proc in procs.items()}
    with open(tmp_path / "model" / "predictions.csv") as fh:
        got = list(csv.DictReader(fh))
    assert {r["id"] for r in got} == set(new_ids)
    saved = {p: torch.load(tmp_path / "model" / f"{p}-segment.pt", weights_only=True) for p in configs}
    b1, b2 = build_mlp(5, MlpSpec(widths=(6, 4))), build_mlp(7, MlpSpec(widths=(6, 4)))
    mid, top = build_mlp(8, MlpSpec(widths=(8, 6))), build_mlp(6, MlpSpec(widths=(16, 3)))
    b1.load_state_dict(saved["dh1"]["model"]), b2.load_state_dict(saved["dh2"]["model"])
    mid.load_state_dict(saved["seg1"]["model"]), top.load_state_dict(saved["bank"]["top"])
    where = {k: int(i) for k, i in zip(new_ids, pick)}
    for r in got:
        i = where[r["id"]]
        with torch.no_grad():
            logits = top(mid(torch.cat([b1(torch.from_numpy(x1[i:i + 1])), b2(torch.from_numpy(x2[i:i + 1]))], 1)))
        probs = torch.softmax(logits, 1)[0].numpy()
        assert int(r["prediction"]) == int(probs.argmax())
        assert abs(float(r["p_0"]) - probs[0]) < 1e-5
