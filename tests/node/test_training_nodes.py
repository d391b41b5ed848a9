"""Split training between real node processes on loopback: exactness at W = 1, learning at W > 1."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vfl.launch import prepare_session
from vfl.node.training import canonical_order
from vfl.train.central import OptimizerSpec, make_schedule, train_central
from vfl.train.models import Combiner, MlpSpec, build_mlp

from .procs import Nodes

FAST = {"heartbeat": 0.5, "peer": 20.0, "handshake": 30.0, "join": 60.0, "progress": 60.0}
OPT = {"kind": "sgd", "lr": 0.1, "momentum": 0.9}


def write_table(path: Path, ids: list[str], columns: dict[str, np.ndarray]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", *columns])
        for i, key in enumerate(ids):
            w.writerow([key, *(repr(float(c[i])) if c.dtype.kind == "f" else int(c[i]) for c in columns.values())])


def synthetic(n=300, seed=0):
    rng = np.random.default_rng(seed)
    x1 = rng.normal(size=(n, 5)).astype(np.float32)
    x2 = rng.normal(size=(n, 7)).astype(np.float32)
    y = np.argmax(np.concatenate([x1, x2], 1) @ rng.normal(size=(12, 3)), axis=1)
    return x1, x2, y


def training_session(tmp_path: Path, window: int, epochs: int = 3, opt: dict = OPT):
    x1, x2, y = synthetic()
    ids = [f"person-{i:04d}" for i in range(len(y))]
    rng = np.random.default_rng(1)
    keep = {p: np.sort(rng.choice(len(ids), size=len(ids) - 20, replace=False)) for p in ("bank", "dh1", "dh2")}
    write_table(tmp_path / "bank.csv", [ids[i] for i in keep["bank"]], {"label": y[keep["bank"]]})
    write_table(tmp_path / "dh1.csv", [ids[i] for i in keep["dh1"]],
                {f"a{j}": x1[keep["dh1"], j] for j in range(5)})
    write_table(tmp_path / "dh2.csv", [ids[i] for i in keep["dh2"]],
                {f"b{j}": x2[keep["dh2"], j] for j in range(7)})
    configs = session_configs(tmp_path, run="train-test", epochs=epochs, opt=opt, timeouts=FAST, batch_size=32,
                              window=window)
    return configs, (x1, x2, y, ids)


def session_configs(tmp_path: Path, *, run: str, epochs: int, opt: dict, timeouts: dict, batch_size: int, window: int,
                    checkpoint_every: int | None = None, task: str = "multiclass", outputs: int = 3,
                    privacy: dict | None = None) -> dict[str, Path]:
    """The configs of the three parties over bank.csv (labels only), dh1.csv (a0..a4) and dh2.csv (b0..b6); the top
    has ``outputs`` outputs for ``task``; ``privacy``: the [privacy] table of every node."""
    out = str(tmp_path / "model")
    top_train = {"task": task, "epochs": epochs, "validation_fraction": 0.25, "seed": 5, "optimizer": opt,
                 "output": out}
    if checkpoint_every is not None:
        top_train["checkpoint_every"] = checkpoint_every
    tables = {
        "bank": {"model": {"top": {"widths": [16, outputs]}, "seed": 3}, "train": top_train},
        "dh1": {"model": {"bottom": {"widths": [6, 4]}, "seed": 1}, "train": {"optimizer": opt, "output": out}},
        "dh2": {"model": {"bottom": {"widths": [6, 4]}, "seed": 2}, "train": {"optimizer": opt, "output": out}},
    }
    data = {
        "bank": {"path": "bank.csv", "id_column": "id", "label_column": "label", "features": []},
        "dh1": {"path": "dh1.csv", "id_column": "id"},
        "dh2": {"path": "dh2.csv", "id_column": "id"},
    }
    return prepare_session(tmp_path, data_holders=["dh1", "dh2"], run=run, timeouts=timeouts,
                           link_check={"rounds": 0}, data=data, psi={"workers": 1}, tables=tables,
                           cut_width=4, batch_size=batch_size, window=window, privacy=privacy)


def run_nodes(tmp_path: Path, configs: dict[str, Path], timeout: float = 180) -> dict[str, str]:
    with Nodes(tmp_path) as nodes:
        procs = {name: nodes.start(path) for name, path in configs.items()}
        codes = {name: p.wait(timeout=timeout) for name, p in procs.items()}
        outputs = {name: p.output for name, p in procs.items()}
    assert codes == {name: 0 for name in configs}, outputs
    return outputs


def aligned_ids(path: Path) -> list[str]:
    with open(path) as fh:
        return [row[1] for row in list(csv.reader(fh))[1:]]


def test_X3_X10_window_1_between_processes_equals_central_training(tmp_path):
    configs, (x1, x2, y, ids) = training_session(tmp_path, window=1)
    outputs = run_nodes(tmp_path, configs)
    order = aligned_ids(tmp_path / "bank-aligned.csv")
    assert order == aligned_ids(tmp_path / "dh1-aligned.csv") == aligned_ids(tmp_path / "dh2-aligned.csv")
    index = {key: i for i, key in enumerate(ids)}
    # the label holder draws the schedule over the canonical order of its aligned IDs, then maps it back
    rows = np.array([index[k] for k in order])[canonical_order(order, 5, "train-test")]
    schedule = make_schedule(len(rows), 32, 3, 5, 0.25)
    torch.set_num_threads(1)
    opt = OptimizerSpec.from_dict(OPT)
    central = train_central(
        [x1[rows], x2[rows]], y[rows],
        [build_mlp(5, MlpSpec(widths=(6, 4)), seed=1), build_mlp(7, MlpSpec(widths=(6, 4)), seed=2)],
        build_mlp(8, MlpSpec(widths=(16, 3)), seed=4),
        combiner=Combiner([4, 4]), task="multiclass", schedule=schedule, bottom_optimizers=opt, top_optimizer=opt,
    )
    saved = {p: torch.load(tmp_path / "model" / f"{p}-segment.pt", weights_only=True) for p in configs}
    worst = 0.0
    for got, want in [(saved["dh1"]["model"], central.bottom_states[0]), (saved["dh2"]["model"], central.bottom_states[1]),
                      (saved["bank"]["top"], central.top_state)]:
        for k in want:
            worst = max(worst, torch.max(torch.abs(got[k] - want[k])).item())
    assert worst <= 1e-5, worst
    metrics = [json.loads(line) for line in (tmp_path / "model" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    assert "training finished after 3 epoch(s)" in outputs["bank"]


@pytest.mark.parametrize("window", [4])
def test_X4_a_pipelined_run_between_processes_learns(tmp_path, window):
    configs, _ = training_session(tmp_path, window=window, epochs=20, opt={"kind": "adam", "lr": 0.01})
    run_nodes(tmp_path, configs)
    metrics = [json.loads(line) for line in (tmp_path / "model" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 20 and metrics[-1]["train_loss"] < 0.7 * metrics[0]["train_loss"], metrics[-1]
    assert max(m["val_accuracy"] for m in metrics[-3:]) > 0.6, metrics[-1]


def test_X4_a_pipelined_run_trains_the_same_weights_on_every_run(tmp_path):
    """Window 3: each data holder computes a FORWARD as soon as the BACKWARD that lets it into the window is applied,
    before it reads another message, so every FORWARD uses the weights after exactly the steps before its window.
    Two runs of the same session (different processes, different timing) end with bit-identical segments."""
    results = []
    for run in ("a", "b"):
        folder = tmp_path / run
        folder.mkdir()
        configs, _ = training_session(folder, window=3, epochs=3)
        run_nodes(folder, configs)
        results.append({p: torch.load(folder / "model" / f"{p}-segment.pt", weights_only=True) for p in configs})
    for party in results[0]:
        state_a, state_b = results[0][party], results[1][party]
        key = "top" if party == "bank" else "model"
        for name, tensor in state_a[key].items():
            assert torch.equal(tensor, state_b[key][name]), (party, name)


#: timeouts of the sessions whose nodes are killed and restarted: a lost peer is noticed within seconds
RESUMABLE = {**FAST, "peer": 3.0, "heartbeat": 0.3, "rejoin": 60.0}


def shared_tables(folder: Path, n: int, labels=None) -> None:
    """bank.csv, dh1.csv and dh2.csv over the same ``n`` people (``synthetic``); ``labels(y)``: other labels."""
    x1, x2, y = synthetic(n=n)
    ids = [f"person-{i:04d}" for i in range(len(y))]
    write_table(folder / "bank.csv", ids, {"label": y if labels is None else labels(y)})
    write_table(folder / "dh1.csv", ids, {f"a{j}": x1[:, j] for j in range(5)})
    write_table(folder / "dh2.csv", ids, {f"b{j}": x2[:, j] for j in range(7)})


def resumable_session(tmp_path: Path, epochs: int = 4):
    """Enough steps per epoch (batch 8) to kill a node in the middle of one; checkpoints every 5 steps."""
    shared_tables(tmp_path, 900)
    return session_configs(tmp_path, run="resume-test", epochs=epochs, opt={"kind": "sgd", "lr": 0.05, "momentum": 0.5},
                           timeouts=RESUMABLE, batch_size=8, window=1, checkpoint_every=5)


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_X8_a_data_holder_killed_mid_epoch_2_and_restarted_resumes_and_the_run_completes(tmp_path):
    """kill -9 a data holder in the second epoch and start it again with the same command: every party rolls back
    to the last checkpoint and the run completes. At W = 1 the resumed run must end exactly where an uninterrupted
    run on the same aligned rows ends, and an uninterrupted run is, step for step, central training (the exactness
    test above): so the central reference on this run's aligned order is the uninterrupted run, to 1e-5."""
    import os
    import signal

    configs = resumable_session(tmp_path)
    with Nodes(tmp_path) as nodes:
        lh = nodes.start(configs["bank"])
        dh2 = nodes.start(configs["dh2"])
        dh1 = nodes.start(configs["dh1"])
        lh.wait_for("epoch 1 of 4 done", timeout=120)
        lh.wait_for("epoch 2: ", timeout=120)  # the progress line at a quarter of the second epoch (85 steps)
        os.kill(dh1.proc.pid, signal.SIGKILL)
        dh1.wait(timeout=10)
        assert "epoch 2 of 4 done" not in lh.output, "the kill came too late to be mid-epoch 2"
        restarted = nodes.start(configs["dh1"])  # the same command
        codes = {"bank": lh.wait(timeout=180), "dh2": dh2.wait(timeout=60), "dh1": restarted.wait(timeout=60)}
        assert codes == {"bank": 0, "dh1": 0, "dh2": 0}, (lh.output, restarted.output, dh2.output)
        assert "resuming every party from the checkpoint at step" in lh.output
        assert "rolling back to the checkpoint" in dh2.output
    got = read_metrics(tmp_path / "model" / "metrics.jsonl")
    assert [m["epoch"] for m in got] == [1, 2, 3, 4]

    assert_matches_central(tmp_path, configs, epochs=4)


def assert_matches_central(tmp_path: Path, configs: dict, epochs: int) -> None:
    """The saved segments and the last validation accuracy of a ``resumable_session`` run equal central training on
    its aligned rows (to 1e-5 and 0.5 pp): what an uninterrupted run gives, whatever restarts happened."""
    got = read_metrics(tmp_path / "model" / "metrics.jsonl")
    assert [m["epoch"] for m in got][-2:] == [epochs - 1, epochs], got  # 1-based, as in the log
    x1, x2, y = synthetic(n=900)
    aligned = aligned_ids(tmp_path / "bank-aligned.csv")
    order = [int(k.split("-")[1]) for k in aligned]
    assert order == [int(k.split("-")[1]) for k in aligned_ids(tmp_path / "dh1-aligned.csv")]
    rows = np.array(order)[canonical_order(aligned, 5, "resume-test")]
    torch.set_num_threads(1)
    opt = OptimizerSpec.from_dict({"kind": "sgd", "lr": 0.05, "momentum": 0.5})
    schedule = make_schedule(len(rows), 8, epochs, 5, 0.25)
    central = train_central(
        [x1[rows], x2[rows]], y[rows],
        [build_mlp(5, MlpSpec(widths=(6, 4)), seed=1), build_mlp(7, MlpSpec(widths=(6, 4)), seed=2)],
        build_mlp(8, MlpSpec(widths=(16, 3)), seed=4),
        combiner=Combiner([4, 4]), task="multiclass", schedule=schedule, bottom_optimizers=opt, top_optimizer=opt,
        validation=schedule.validation,
    )
    saved = {p: torch.load(tmp_path / "model" / f"{p}-segment.pt", weights_only=True) for p in configs}
    pairs = [(saved["dh1"]["model"], central.bottom_states[0]), (saved["dh2"]["model"], central.bottom_states[1]),
             (saved["bank"]["top"], central.top_state)]
    worst = max(torch.max(torch.abs(state[k] - want[k])).item() for state, want in pairs for k in want)
    assert worst <= 1e-5, worst
    assert abs(got[-1]["val_accuracy"] - central.history[-1]["val_accuracy"]) <= 0.005, (got[-1], central.history[-1])


def killed_after_epoch_1(nodes: Nodes, configs: dict, epochs: int):
    """The three nodes started; dh1 killed (SIGKILL) once the label holder has finished epoch 1."""
    import os
    import signal

    lh = nodes.start(configs["bank"])
    dh2 = nodes.start(configs["dh2"])
    dh1 = nodes.start(configs["dh1"])
    lh.wait_for(f"epoch 1 of {epochs} done", timeout=120)
    os.kill(dh1.proc.pid, signal.SIGKILL)
    return lh, dh1, dh2


def test_X8_rejoins_beyond_max_rejoins_end_the_session_naming_the_party(tmp_path):
    """[train].max_rejoins bounds rejoin storms: with 0, the first rejoin after training started is refused and every
    party stops, the label holder's log naming the party and the setting."""
    configs = resumable_session(tmp_path, epochs=6)
    text = configs["bank"].read_text()
    assert "\n[train]\n" in text
    configs["bank"].write_text(text.replace("\n[train]\n", "\n[train]\nmax_rejoins = 0\n", 1))
    with Nodes(tmp_path) as nodes:
        lh, dh1, dh2 = killed_after_epoch_1(nodes, configs, epochs=6)
        dh1.wait(timeout=10)
        restarted = nodes.start(configs["dh1"])
        assert lh.wait(timeout=60) == 1, lh.output
        assert restarted.wait(timeout=30) == 1, restarted.output
        assert dh2.wait(timeout=30) != 0
    assert "data holder 'dh1' rejoined 1 times, more than [train].max_rejoins = 0" in lh.output
    assert "max_rejoins" in restarted.output and "max_rejoins" in dh2.output


def test_X9_a_data_holder_killed_and_not_restarted_makes_the_others_exit_non_zero_naming_it(tmp_path):
    import time

    configs = resumable_session(tmp_path, epochs=6)
    text = configs["bank"].read_text().replace("rejoin = 60.0", "rejoin = 4.0")
    configs["bank"].write_text(text)
    with Nodes(tmp_path) as nodes:
        lh, dh1, dh2 = killed_after_epoch_1(nodes, configs, epochs=6)
        killed_at = time.monotonic()
        assert lh.wait(timeout=30) == 3
        assert dh2.wait(timeout=30) != 0
        assert time.monotonic() - killed_at < 3.0 + 4.0 + 10
    assert "data holder 'dh1' stopped answering and did not come back within 4 s" in lh.output
    assert "vfl node --config" in lh.output and "to resume from the checkpoint at step" in lh.output
    assert "data holder 'dh1' stopped answering" in dh2.output


def test_predict_gives_the_label_holder_predictions_for_rows_present_at_every_party(tmp_path):
    configs, (x1, x2, y, ids) = training_session(tmp_path, window=1)
    run_nodes(tmp_path, configs)
    # new rows: 40 known people and 10 unknown ones, at each party in its own order; one party lacks 5 of them
    rng = np.random.default_rng(9)
    pick = rng.choice(len(ids), size=40, replace=False)
    new_ids = [ids[i] for i in pick] + [f"stranger-{i}" for i in range(10)]
    feats1 = np.concatenate([x1[pick], rng.normal(size=(10, 5)).astype(np.float32)])
    feats2 = np.concatenate([x2[pick], rng.normal(size=(10, 7)).astype(np.float32)])
    write_table(tmp_path / "bank-new.csv", new_ids[5:], {})
    write_table(tmp_path / "dh1-new.csv", new_ids[::-1], {f"a{j}": feats1[::-1, j] for j in range(5)})
    write_table(tmp_path / "dh2-new.csv", new_ids, {f"b{j}": feats2[:, j] for j in range(7)})
    with Nodes(tmp_path) as nodes:
        procs = {p: nodes.start_command(["predict", "--config", str(configs[p]), "--data", str(tmp_path / f"{p}-new.csv")], p)
                 for p in configs}
        codes = {p: proc.wait(timeout=120) for p, proc in procs.items()}
        assert codes == {"bank": 0, "dh1": 0, "dh2": 0}, {p: proc.output for p, proc in procs.items()}
    with open(tmp_path / "model" / "predictions.csv") as fh:
        got = list(csv.DictReader(fh))
    expected_ids = set(new_ids[5:])  # the strangers are at every party too: 45 rows
    assert {r["id"] for r in got} == expected_ids
    # the same composed model, centrally, on the same features
    saved = {p: torch.load(tmp_path / "model" / f"{p}-segment.pt", weights_only=True) for p in configs}
    b1, b2 = build_mlp(5, MlpSpec(widths=(6, 4))), build_mlp(7, MlpSpec(widths=(6, 4)))
    top = build_mlp(8, MlpSpec(widths=(16, 3)))
    b1.load_state_dict(saved["dh1"]["model"]), b2.load_state_dict(saved["dh2"]["model"])
    top.load_state_dict(saved["bank"]["top"])
    where = {k: i for i, k in enumerate(new_ids)}
    for r in got:
        i = where[r["id"]]
        with torch.no_grad():
            logits = top(torch.cat([b1(torch.from_numpy(feats1[i:i + 1])), b2(torch.from_numpy(feats2[i:i + 1]))], 1))
        probs = torch.softmax(logits, 1)[0].numpy()
        assert int(r["prediction"]) == int(probs.argmax())
        assert abs(float(r["p_0"]) - probs[0]) < 1e-5
