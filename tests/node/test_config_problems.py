"""A config with several problems reports all of them at once, each naming its table and key and what to write.

Issue 13: "it took 4 restarts to get a 2-party wine run going": each start named one missing key. Now one start
names every problem across every table, and a config with exactly one problem still reads as one line.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from vfl.launch import prepare_session
from vfl.node import ConfigError, load_config
from vfl.protocol.session import MAX_CUT_WIDTH

OPT = {"kind": "adam", "lr": 0.01}


def training_configs(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "bank.csv").write_text("id,y,a\n1,0,0.5\n")
    (tmp_path / "dh1.csv").write_text("id,b\n1,0.5\n")
    tables = {
        "bank": {"model": {"bottom": {"widths": [4]}, "top": {"widths": [1]}},
                 "train": {"task": "binary", "epochs": 2, "optimizer": OPT}},
        "dh1": {"model": {"bottom": {"widths": [4]}}, "train": {"optimizer": OPT}},
    }
    data = {"bank": {"path": "bank.csv", "id_column": "id", "label_column": "y"},
            "dh1": {"path": "dh1.csv", "id_column": "id"}}
    return prepare_session(tmp_path, data_holders=["dh1"], data=data, tables=tables, cut_width=4)


def without(path: Path, *lines: str) -> Path:
    text = path.read_text()
    for line in lines:
        assert re.search(f"^{re.escape(line)}.*\n", text, re.M), (line, text)
        text = re.sub(f"^{re.escape(line)}.*\n", "", text, count=1, flags=re.M)
    path.write_text(text)
    return path


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    lines = str(info.value).splitlines()
    assert lines[0].startswith(f"{path}: "), lines
    return lines


def test_the_configs_as_written_load(tmp_path):
    for path in training_configs(tmp_path).values():
        load_config(path)


def test_four_missing_keys_in_three_tables_are_reported_together(tmp_path):
    bank = without(training_configs(tmp_path)["bank"], "run =", "batch_size =", "window =", "id_column =")
    lines = problems_of(bank)
    assert lines[0] == f"{bank}: 4 problems (fix them all, then start again):"
    assert lines[1:] == [
        '  - missing key run: add run = "NAME", the same at every node of the run',
        "  - missing key [session].batch_size: add batch_size = 64 (rows per micro-batch), the same at every node",
        "  - missing key [session].window: add window = 1 (synchronous SGD; more pipelines), the same at every node",
        '  - missing key [data].id_column: add id_column = "COLUMN", the column holding the IDs the parties share',
    ]


def test_problems_of_different_kinds_across_tables_are_all_listed(tmp_path):
    dh1 = training_configs(tmp_path)["dh1"]
    text = dh1.read_text()
    text = text.replace('path = "dh1.csv"', 'path = "nope.csv"').replace("[psi]\n", "[psi]\nchunk_size = 0\n")
    text = text.replace("[train]\n", "[train]\nthreads = 0\n").replace("[keys]\n", "[keys]\ncolour = 1\n")
    text = text.replace('lr = 0.01', 'lr = 0.01, momentun = 0.9')
    dh1.write_text(text)
    lines = problems_of(dh1)
    assert lines[0] == f"{dh1}: 5 problems (fix them all, then start again):"
    body = "\n".join(lines[1:])
    for expected in ("unknown key [keys].colour", "[data].path = 'nope.csv': no such file",
                     "[psi].chunk_size must be in 1..1048576", "[train].threads must be >= 1",
                     "[train].optimizer: unknown key(s) momentun ("):
        assert expected in body, body


def test_a_table_with_a_problem_does_not_also_fail_the_checks_that_need_it(tmp_path):
    """A wrong [session] is one problem, not also 'no cut width for dh1' and a bottom-width mismatch."""
    dh1 = training_configs(tmp_path)["dh1"]
    dh1.write_text(dh1.read_text().replace("dh1 = 4\n", "dh1 = 0\n"))
    assert problems_of(dh1) == [f"{dh1}: [session] cut_widths.dh1 must be an integer in 1..{MAX_CUT_WIDTH}"]


def test_one_problem_is_still_one_line(tmp_path):
    bank = without(training_configs(tmp_path)["bank"], "window =")
    assert problems_of(bank) == [
        f"{bank}: missing key [session].window: add window = 1 (synchronous SGD; more pipelines), the same at every "
        "node"
    ]


def test_vfl_node_prints_every_problem_and_exits_2(tmp_path):
    bank = without(training_configs(tmp_path)["bank"], "role =", "endpoint =", "task =")
    done = subprocess.run([sys.executable, "-m", "vfl", "node", "--config", str(bank)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert f"{bank}: 2 problems" in done.stderr, done.stderr
    assert "missing key role: add role = " in done.stderr and "missing key endpoint: add endpoint = " in done.stderr
    # [train].task is checked once the role is known: fixing the role brings it up, it is not guessed at before
    bank.write_text('role = "label_holder"\nendpoint = "tcp://127.0.0.1:5555"\n' + bank.read_text())
    again = subprocess.run([sys.executable, "-m", "vfl", "node", "--config", str(bank)], capture_output=True,
                           text=True, timeout=60)
    assert again.returncode == 2 and "[train].task must be one of multiclass, binary, regression" in again.stderr


def test_keep_and_patience_are_checked_and_belong_to_the_label_holder(tmp_path):
    configs = training_configs(tmp_path)
    bank, dh1 = configs["bank"], configs["dh1"]
    text = bank.read_text()
    bank.write_text(text.replace("[train]\n", '[train]\nkeep = "lowest"\npatience = -1\n'))
    body = "\n".join(problems_of(bank))
    assert "[train].keep must be one of 'last', 'best', got 'lowest'" in body
    assert "[train].patience must be >= 0 (0: train every epoch), got -1" in body
    bank.write_text(text.replace("[train]\n", '[train]\nkeep = "best"\nvalidation_fraction = 0\n'))
    assert "set [train].validation_fraction > 0" in "\n".join(problems_of(bank))
    bank.write_text(text.replace("[train]\n", '[train]\nkeep = "best"\npatience = 3\n'))
    cfg = load_config(bank)
    assert (cfg.train.keep, cfg.train.patience) == ("best", 3)
    assert (load_config(dh1).train.keep, load_config(dh1).train.patience) == ("last", 0)
    dh1.write_text(dh1.read_text().replace("[train]\n", '[train]\nkeep = "best"\n'))
    assert "[train].keep is the label holder's to set" in "\n".join(problems_of(dh1))
