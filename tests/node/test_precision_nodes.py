"""The cut layer's wire precision between real node processes (PROTOCOL.md §11, version 1.6).

The synthetic session of test_training_nodes (three parties over loopback, PSI, then training), with a wider cut
layer so the cut-layer tensors dominate what a data holder sends: float32, then int8 activations with bfloat16
gradients, then the reverse. Each run trains to completion, every node logs its precision once, the validation
accuracy stays near float32's, and the bytes each node sends (logged at exit) drop by about what the encodings save.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from vfl.launch import prepare_session
from vfl.protocol.precision import wire_bytes

from .procs import Nodes
from .test_training_nodes import FAST, run_nodes, synthetic, write_table

CUT = 32
BATCH = 32
EPOCHS = 8
OPT = {"kind": "adam", "lr": 0.01}


def precision_session(tmp_path: Path, activations: str, gradients: str, dh1_scale: float = 1.0) -> dict[str, Path]:
    """The parties of test_training_nodes.training_session (bank: labels; dh1: 5 features; dh2: 7), cut width 32,
    with the two precision keys in every party's [session] table (float32: the keys left out, the default).
    ``dh1_scale`` multiplies dh1's features (not standardised), to push its activations out of a precision's range."""
    x1, x2, y = synthetic()
    x1 = x1 * np.float32(dh1_scale)
    ids = [f"person-{i:04d}" for i in range(len(y))]
    write_table(tmp_path / "bank.csv", ids, {"label": y})
    write_table(tmp_path / "dh1.csv", ids, {f"a{j}": x1[:, j] for j in range(5)})
    write_table(tmp_path / "dh2.csv", ids, {f"b{j}": x2[:, j] for j in range(7)})
    out = str(tmp_path / "model")
    tables = {
        "bank": {"model": {"top": {"widths": [16, 3]}, "seed": 3},
                 "train": {"task": "multiclass", "epochs": EPOCHS, "validation_fraction": 0.25, "seed": 5,
                           "optimizer": OPT, "output": out}},
        "dh1": {"model": {"bottom": {"widths": [16, CUT]}, "seed": 1}, "train": {"optimizer": OPT, "output": out}},
        "dh2": {"model": {"bottom": {"widths": [16, CUT]}, "seed": 2}, "train": {"optimizer": OPT, "output": out}},
    }
    data = {
        "bank": {"path": "bank.csv", "id_column": "id", "label_column": "label", "features": []},
        "dh1": {"path": "dh1.csv", "id_column": "id"},
        "dh2": {"path": "dh2.csv", "id_column": "id"},
    }
    configs = prepare_session(tmp_path, data_holders=["dh1", "dh2"], run="precision-test", timeouts=FAST,
                              link_check={"rounds": 0}, data=data, psi={"workers": 1}, tables=tables,
                              cut_width=CUT, batch_size=BATCH, window=2)
    keys = "".join(f'{k}_precision = "{v}"\n' for k, v in (("activation", activations), ("gradient", gradients))
                   if v != "float32")
    for path in configs.values():
        text = path.read_text()
        assert text.count("[session]\n") == 1
        path.write_text(text.replace("[session]\n", "[session]\n" + keys))
    return configs


def sent_bytes(output: str) -> int:
    (n,) = re.findall(r"sent (\d+) bytes, received \d+ bytes", output)
    return int(n)


def run(tmp_path: Path, activations: str, gradients: str) -> dict:
    configs = precision_session(tmp_path, activations, gradients)
    outputs = run_nodes(tmp_path, configs, timeout=300)
    line = f"cut-layer precision: activations {activations}, gradients {gradients}"
    for name, text in outputs.items():
        assert text.count(line) == 1, (name, text)
    metrics = [json.loads(x) for x in (tmp_path / "model" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == list(range(1, EPOCHS + 1))
    return {
        "val_accuracy": metrics[-1]["val_accuracy"],
        "steps": metrics[-1]["step"],
        "sent": {name: sent_bytes(text) for name, text in outputs.items()},
    }


def test_X6_int8_and_bfloat16_train_to_completion_near_float32_and_send_fewer_bytes(tmp_path):
    runs = {}
    for acts, grads in [("float32", "float32"), ("int8", "bfloat16"), ("bfloat16", "int8")]:
        where = tmp_path / f"{acts}-{grads}"
        where.mkdir()
        runs[acts, grads] = run(where, acts, grads)
    base = runs["float32", "float32"]
    steps = base["steps"]
    n_val = 75  # validation_fraction 0.25 of 300 rows
    evals = EPOCHS * -(-n_val // BATCH)
    rows_fwd = steps * BATCH + EPOCHS * n_val  # upper bound on the rows of every FORWARD and EVAL_FORWARD
    report = {}
    for (acts, grads), r in runs.items():
        # accuracy: 75 validation rows, so one row is 1.3 points; the binomial standard error at ~0.8 is ~0.05:
        # within 3 of them (0.15) of float32's is "near", far below the gap to chance (0.33)
        assert abs(r["val_accuracy"] - base["val_accuracy"]) <= 0.15, (acts, grads, r, base)
        assert r["steps"] == steps
        report[f"{acts}/{grads}"] = {
            "val_accuracy": r["val_accuracy"],
            "dh_bytes_per_step": (r["sent"]["dh1"] + r["sent"]["dh2"]) / 2 / steps,
            "lh_bytes_per_step": r["sent"]["bank"] / steps,
        }
        if (acts, grads) == ("float32", "float32"):
            continue
        # what the encodings save, per data holder: at most (all rows at full size) and at least (only the full
        # batches, less the 64 bytes a second tensor descriptor may add to each header)
        for who, saved_rows, precision, messages in (
            ("dh1", rows_fwd, acts, steps + evals), ("bank", 2 * steps * BATCH, grads, 2 * steps)
        ):
            per_row = (wire_bytes("float32", 1, CUT) - wire_bytes(precision, 1, CUT))
            saved = base["sent"][who] - r["sent"][who]
            full_rows = (steps - EPOCHS) * BATCH * (2 if who == "bank" else 1)
            assert saved <= saved_rows * per_row + 4096, (who, precision, saved, report)
            assert saved >= full_rows * per_row - 64 * messages - 4096, (who, precision, saved, report)
    print(json.dumps(report, indent=1))  # the figures the closing note quotes


def test_X12_a_data_holder_whose_activations_exceed_float16_ends_the_session_and_sends_nothing(tmp_path):
    """dh1's features are ~1e7 (not standardised), so its first activations are far beyond float16's 65504: it
    must not send them (they would decode to infinity) but end the session naming the step, itself and the way out;
    the label holder and dh2 then end with that reason."""
    configs = precision_session(tmp_path, "float16", "float32", dh1_scale=1e7)
    with Nodes(tmp_path) as nodes:
        procs = {name: nodes.start(path) for name, path in configs.items()}
        codes = {name: p.wait(timeout=120) for name, p in procs.items()}
        outputs = {name: p.output for name, p in procs.items()}
    assert codes["dh1"] == 1 and codes["bank"] != 0 and codes["dh2"] != 0, (codes, outputs)
    reason = "data holder dh1: FORWARD step 0 of dh1: the activations exceed float16's range"
    assert reason in outputs["dh1"], outputs["dh1"]
    assert "Use bfloat16 or float32 for [session].activation_precision at every party" in outputs["dh1"]
    assert "FORWARD step 0 of dh1" in outputs["bank"], outputs["bank"]  # the BYE's reason
    assert "BAD_TENSOR" not in outputs["bank"]  # nothing undecodable arrived


def test_the_session_keys_are_read_from_every_partys_config_and_checked(tmp_path):
    from vfl.node.config import ConfigError, load_config

    configs = precision_session(tmp_path, "int8", "bfloat16")
    for path in configs.values():
        assert load_config(path).session.precision.describe() == "activations int8, gradients bfloat16"
    path = configs["dh1"]
    path.write_text(path.read_text().replace('activation_precision = "int8"', 'activation_precision = "int4"'))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "[session] activation_precision must be one of float32, float16, bfloat16, int8, got 'int4'" in str(info.value)
