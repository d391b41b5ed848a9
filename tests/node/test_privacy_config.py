"""A node's ``[privacy]`` table: the defence goes into the session config (so into its digest), ``audit`` stays with
the label holder, and every problem is one line naming the key and what the defence takes."""

from __future__ import annotations

from pathlib import Path

import pytest

from vfl.launch import prepare_session
from vfl.node import ConfigError, load_config
from vfl.privacy.spec import PrivacySpec

from .test_config_problems import OPT, training_configs


def configs(tmp_path: Path, privacy: dict | None = None, audit: bool | None = None, task: str = "binary"):
    (tmp_path / "bank.csv").write_text("id,y,a\n1,0,0.5\n")
    (tmp_path / "dh1.csv").write_text("id,b\n1,0.5\n")
    tables = {
        "bank": {"model": {"top": {"widths": [1]}}, "train": {"task": task, "epochs": 2, "optimizer": OPT}},
        "dh1": {"model": {"bottom": {"widths": [4]}}, "train": {"optimizer": OPT}},
    }
    data = {"bank": {"path": "bank.csv", "id_column": "id", "label_column": "y", "features": []},
            "dh1": {"path": "dh1.csv", "id_column": "id"}}
    return prepare_session(tmp_path, data_holders=["dh1"], data=data, tables=tables, cut_width=4, privacy=privacy,
                           audit=audit)


def problem(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return str(info.value)


def test_no_privacy_table_means_no_defence_audited_and_the_digest_of_before(tmp_path):
    for path in training_configs(tmp_path).values():
        cfg = load_config(path)
        assert cfg.session.privacy == PrivacySpec() and cfg.audit is True
        assert "privacy" not in cfg.session.to_wire()


def test_the_defence_is_in_every_nodes_session_config_and_digest(tmp_path):
    paths = configs(tmp_path, {"defence": "marvell", "sumkl": 2.0})
    loaded = {name: load_config(path) for name, path in paths.items()}
    assert {c.session.privacy.describe() for c in loaded.values()} == {"marvell (sumkl 2)"}
    assert len({c.session.digest for c in loaded.values()}) == 1
    assert loaded["bank"].session.to_wire()["privacy"] == {"defence": "marvell", "sumkl": 2.0}
    assert "[privacy]\ndefence = \"marvell\"\nsumkl = 2.0\n" in paths["dh1"].read_text()


def test_a_defence_takes_its_defaults(tmp_path):
    cfg = load_config(configs(tmp_path, {"defence": "gradient_noise"})["bank"])
    assert dict(cfg.session.privacy.params) == {"clip": 1.0, "sigma": 1.0}


def test_audit_false_at_the_label_holder_stays_local(tmp_path):
    paths = configs(tmp_path, {"defence": "max_norm"}, audit=False)
    bank, dh1 = load_config(paths["bank"]), load_config(paths["dh1"])
    assert bank.audit is False and "audit" not in paths["dh1"].read_text()
    assert bank.session.digest == dh1.session.digest  # audit is not part of the session config


def test_audit_alone_is_a_table_with_no_defence(tmp_path):
    cfg = load_config(configs(tmp_path, audit=False)["bank"])
    assert cfg.audit is False and cfg.session.privacy == PrivacySpec()


@pytest.mark.parametrize("table, words", [
    ({"defence": "rot13"}, ["defence", "rot13", "max_norm", "marvell"]),
    ({"defence": "marvell", "epsilon": 1.0}, ["epsilon", "marvell", "sumkl"]),
    ({"defence": "marvell", "sumkl": -1.0}, ["sumkl", "-1"]),
    ({"defence": "max_norm", "sumkl": 4.0}, ["sumkl", "no parameters"]),
])
def test_a_wrong_privacy_table_is_one_line_naming_the_key(tmp_path, table, words):
    text = problem(configs(tmp_path, table)["dh1"])
    assert "\n" not in text and "[privacy]" in text
    for word in words:
        assert word in text, text


def test_audit_is_the_label_holders_and_a_boolean(tmp_path):
    paths = configs(tmp_path, {"defence": "max_norm"})
    dh1 = paths["dh1"]
    dh1.write_text(dh1.read_text().replace('defence = "max_norm"\n', 'defence = "max_norm"\naudit = false\n'))
    assert "[privacy].audit is the label holder's to set" in problem(dh1)
    bank = paths["bank"]
    bank.write_text(bank.read_text().replace('defence = "max_norm"\n', 'defence = "max_norm"\naudit = "yes"\n'))
    assert "[privacy].audit must be true or false" in problem(bank)


def test_marvell_needs_a_binary_task(tmp_path):
    text = problem(configs(tmp_path, {"defence": "marvell"}, task="regression")["bank"])
    assert "marvell" in text and "binary" in text and "regression" in text


def test_a_defence_without_training_is_refused(tmp_path):
    paths = configs(tmp_path, {"defence": "max_norm"})
    dh1 = paths["dh1"]
    text = dh1.read_text().replace("train = true\n", "")
    text = text[: text.index("[model]")] + text[text.index("[privacy]"):]  # no [model]/[train] either
    dh1.write_text(text)
    assert "[privacy].defence = 'max_norm' protects training, but [session].train is not true" in problem(dh1)
