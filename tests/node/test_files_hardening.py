"""Issue 12, "Files": what a node writes and reads from disk cannot be turned against it or leak to other users.

- checkpoints and trained segments load with ``weights_only=True``: a file holding a pickled object whose
  ``__reduce__`` would run code is refused, and the code does not run;
- both carry a content digest checked on load: a changed file is refused, naming the file and the way out;
- outputs holding raw IDs, features or model state (aligned IDs, predictions, feature files, checkpoints, segments)
  are created 0600;
- a secret key file that group or others may read is refused, saying ``chmod 600 FILE``;
- config: ``[psi].max_items``, ``[train].max_rejoins``, duplicate partner keys, insecure mode only on loopback
  unless ``vfl node --insecure``.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vfl.files import PRIVATE, atomic_write_bytes, atomic_write_text
from vfl.launch import prepare_session
from vfl.node import ConfigError, KeyFileError, load_config
from vfl.node.alignment import load_ids
from vfl.node.checkpoints import Checkpointer, StateFileError, dump_state, load_state, plain_state, state_digest
from vfl.node.config import is_loopback
from vfl.node.keys import generate_keypair, load_secret_key
from vfl.node.training import build_bottom, load_trained, read_segment, save_segment, segment_path, trained_encoding
from vfl.node.config import TrainingSetupError
from vfl.protocol.label_holder import DEFAULT_MAX_REJOINS
from vfl.protocol.psi_phase import DEFAULT_MAX_PSI_ITEMS
from vfl.protocol.training_phase import CheckpointError
from vfl.train.data import LabelEncoding, Standardizer
from vfl.train.optim import Adam

from .procs import Nodes
from .test_training_nodes import run_nodes, training_session, write_table


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


class RunsCode:
    """Unpickling this creates ``marker``: what a tampered or handed-over file could do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def evil_file(path: Path, marker: Path, extra: dict | None = None) -> bytes:
    buf = io.BytesIO()
    torch.save({"model": {"w": torch.ones(2)}, "payload": RunsCode(marker), **(extra or {})}, buf)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def trained_state() -> dict:
    """A real segment state after one optimizer step, with the extras a segment carries."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    opt = Adam(model.parameters(), lr=0.01)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scaler": Standardizer(mean=np.array([1.0, 2.0, 3.0]), std=np.array([0.5, 1.0, 2.0])).to_dict(),
        "labels": LabelEncoding(task="multiclass", classes=(np.int64(0), np.int64(1), np.int64(7))).to_dict(),
        "array": np.arange(6, dtype=np.float64).reshape(2, 3),
        "names": np.array(["a", "b"]),
        "count": np.int32(3),
    }


# ------------------------------------------------------------------------------------------ weights_only loading


def test_a_checkpoint_holding_a_pickled_object_is_refused_and_its_code_does_not_run(tmp_path):
    c = Checkpointer(tmp_path / "ck", "dh1", "run-1", "m1")
    marker = tmp_path / "code-ran"
    data = evil_file(c.path(10), marker, {"vfl_run": "run-1", "vfl_model": "m1"})
    for digest in (None, hashlib.sha256(data).hexdigest()):  # even with the digest the manifest would record
        with pytest.raises(CheckpointError) as info:
            c.load(10, digest)
        assert str(c.path(10)) in str(info.value) and "could run code" in str(info.value)
        assert "new run id" in str(info.value)  # the way out
        assert not marker.exists()


def test_a_segment_holding_a_pickled_object_is_refused_and_its_code_does_not_run(tmp_path):
    path = tmp_path / "dh1-segment.pt"
    marker = tmp_path / "code-ran"
    evil_file(path, marker, {"vfl_party": "dh1", "vfl_model": "m1", "labels": {"task": "binary", "classes": [0, 1]}})
    for load in (read_segment, lambda p: trained_encoding(None, p)):
        with pytest.raises(TrainingSetupError) as info:
            load(path)
        assert str(path) in str(info.value) and "could run code" in str(info.value)
        assert "train again" in str(info.value)
        assert not marker.exists()


def test_a_saved_state_round_trips_and_loads_with_plain_torch_weights_only(tmp_path):
    state = trained_state()
    c = Checkpointer(tmp_path, "dh1", "run-1", "m1")
    digest = c.save(state, step=4, epoch=1)
    plain = torch.load(c.path(4), weights_only=True)  # anyone's torch can read it safely, too
    assert plain["vfl_step"] == 4 and isinstance(plain["vfl_digest"], str)
    loaded = c.load(4, digest)
    for key, value in state["model"].items():
        assert torch.equal(loaded["model"][key], value)
    assert loaded["model"]._metadata == state["model"]._metadata  # torch's state_dict versions survive
    assert torch.equal(loaded["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])
    assert loaded["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    assert Standardizer.from_dict(loaded["scaler"]).mean.tolist() == [1.0, 2.0, 3.0]
    assert LabelEncoding.from_dict(loaded["labels"]).classes == (0, 1, 7)
    assert torch.equal(loaded["array"], torch.arange(6, dtype=torch.float64).reshape(2, 3))
    assert loaded["names"] == ["a", "b"] and loaded["count"] == 3 and type(loaded["count"]) is int
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    model.load_state_dict(loaded["model"])
    Adam(model.parameters(), lr=0.01).load_state_dict(loaded["optimizer"])


def test_a_state_that_weights_only_could_not_load_is_never_written(tmp_path):
    with pytest.raises(TypeError, match=r"state\['extra'\]\['when'\]: a RunsCode cannot be saved"):
        plain_state({"model": {}, "extra": {"when": RunsCode(tmp_path / "x")}})
    c = Checkpointer(tmp_path, "dh1", "run-1", "m1")
    with pytest.raises(TypeError):
        c.save({"model": {"obj": object()}}, step=1, epoch=0)
    assert not c.path(1).exists()


# ------------------------------------------------------------------------------------------------------ digests


def rewritten_with(data: bytes, change) -> bytes:
    """The state file ``data`` with ``change(state)`` applied and its old digest kept: an edit by hand."""
    state = torch.load(io.BytesIO(data), weights_only=True)
    change(state)
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def test_every_state_file_carries_a_digest_that_its_content_must_match(tmp_path):
    data = dump_state({"model": {"w": torch.ones(3)}, "vfl_party": "dh1"})
    assert load_state(data, "f.pt")["model"]["w"].tolist() == [1.0, 1.0, 1.0]
    edits = [
        (lambda s: s["model"]["w"].mul_(2), "does not match its own vfl_digest"),
        (lambda s: s.update(vfl_party="dh2"), "does not match its own vfl_digest"),
        (lambda s: s["model"].update(b=torch.zeros(1)), "does not match its own vfl_digest"),
        (lambda s: s.pop("vfl_digest"), "carries no vfl_digest"),
    ]
    for change, message in edits:
        with pytest.raises(StateFileError, match=message):
            load_state(rewritten_with(data, change), "f.pt")


def test_the_digest_tells_apart_what_a_changed_file_could_swap():
    base = {"w": torch.tensor([1.0, 2.0])}
    variants = [
        base,
        {"w": torch.tensor([2.0, 1.0])},
        {"w": torch.tensor([1.0, 2.0]).reshape(2, 1)},
        {"w": torch.tensor([1.0, 2.0], dtype=torch.float64)},
        {"w": [1.0, 2.0]},
        {"w": (1.0, 2.0)},
        {"v": torch.tensor([1.0, 2.0])},
        {"w": torch.tensor([1.0, 2.0]), "x": None},
        {"1": 1},
        {1: 1},
        {1: True},
        {1: "1"},
    ]
    digests = [load_digest(v) for v in variants]
    assert len(set(digests)) == len(variants)
    assert load_digest(collections.OrderedDict(reversed(list({"a": 1, "b": 2}.items())))) == load_digest({"a": 1, "b": 2})


def load_digest(value) -> str:
    return state_digest(plain_state(value))


def test_a_tampered_checkpoint_names_the_file_and_the_way_out(tmp_path):
    c = Checkpointer(tmp_path, "dh1", "run-1", "m1")
    c.save({"model": {"w": torch.ones(3)}}, step=2, epoch=0)
    c.path(2).write_bytes(rewritten_with(c.path(2).read_bytes(), lambda s: s["model"]["w"].zero_()))
    with pytest.raises(CheckpointError) as info:
        c.load(2, None)  # no manifest digest to compare (the label holder's own, before a commit): its own digest
    assert str(c.path(2)) in str(info.value) and "vfl_digest" in str(info.value) and "new run id" in str(info.value)


# ------------------------------------------------------------------------------- a real data holder's segment


def data_holder_config(tmp_path: Path):
    """A real data holder config of a training session (features a0..a2), loaded and checked."""
    write_table(tmp_path / "dh1.csv", [f"id-{i}" for i in range(20)],
                {f"a{j}": np.linspace(0, 1, 20, dtype=np.float32) + j for j in range(3)})
    write_table(tmp_path / "bank.csv", [f"id-{i}" for i in range(20)], {"label": np.arange(20) % 2})
    out = str(tmp_path / "model")
    tables = {"bank": {"model": {"top": {"widths": [4, 1]}}, "train": {"task": "binary", "output": out}},
              "dh1": {"model": {"bottom": {"widths": [4, 4]}}, "train": {"output": out}}}
    data = {"bank": {"path": "bank.csv", "id_column": "id", "label_column": "label", "features": []},
            "dh1": {"path": "dh1.csv", "id_column": "id", "standardize": True}}
    configs = prepare_session(tmp_path, data_holders=["dh1"], data=data, tables=tables, cut_width=4)
    return configs, load_config(configs["dh1"])


def test_a_trained_segment_is_0600_round_trips_and_a_tampered_one_is_refused_naming_file_and_way_out(tmp_path):
    _, cfg = data_holder_config(tmp_path)
    table = load_ids(cfg).table
    trained = build_bottom(cfg, table, np.arange(table.n_rows))
    trained.prepare(np.arange(10))  # fits a scaler, which goes into the segment
    path = save_segment(cfg, trained.state())
    assert path == segment_path(cfg) and mode_of(path) == 0o600
    predict_cfg = dataclasses.replace(cfg, session=dataclasses.replace(cfg.session, predict=True))
    fresh = build_bottom(predict_cfg, table, np.arange(table.n_rows))
    load_trained(predict_cfg, fresh)
    for key, value in trained.model.state_dict().items():
        assert torch.equal(fresh.model.state_dict()[key], value)
    assert np.allclose(fresh.scaler.mean, trained.scaler.mean)

    path.write_bytes(rewritten_with(path.read_bytes(), lambda s: next(iter(s["model"].values())).add_(1)))
    with pytest.raises(TrainingSetupError) as info:
        load_trained(predict_cfg, build_bottom(predict_cfg, table, np.arange(table.n_rows)))
    assert str(path) in str(info.value) and "vfl_digest" in str(info.value) and "train again" in str(info.value)


# ------------------------------------------------------------------------------------------------ permissions


def test_atomic_write_with_private_mode_creates_0600_even_over_a_wider_file(tmp_path):
    target = tmp_path / "out.csv"
    atomic_write_text(target, "x\n")
    assert mode_of(target) == 0o666 & ~current_umask()  # a normal output keeps the usual mode
    atomic_write_bytes(target, b"id\n1\n", mode=PRIVATE)
    assert mode_of(target) == 0o600 and target.read_bytes() == b"id\n1\n"


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_outputs_holding_raw_ids_or_model_state_are_0600_after_a_real_training_and_prediction(tmp_path):
    """Aligned IDs, feature files, checkpoints, trained segments and predictions, written by real node processes."""
    configs, (x1, x2, y, ids) = training_session(tmp_path, window=1, epochs=1)
    run_nodes(tmp_path, configs)
    write_table(tmp_path / "bank-new.csv", ids[:30], {})
    write_table(tmp_path / "dh1-new.csv", ids[:30], {f"a{j}": x1[:30, j] for j in range(5)})
    write_table(tmp_path / "dh2-new.csv", ids[:30], {f"b{j}": x2[:30, j] for j in range(7)})
    with Nodes(tmp_path) as nodes:
        procs = {p: nodes.start_command(["predict", "--config", str(configs[p]), "--data",
                                         str(tmp_path / f"{p}-new.csv")], p) for p in configs}
        codes = {p: proc.wait(timeout=120) for p, proc in procs.items()}
        assert codes == {p: 0 for p in configs}, {p: proc.output for p, proc in procs.items()}
    model = tmp_path / "model"
    written = {
        "aligned IDs": [tmp_path / f"{p}-aligned.csv" for p in configs],
        "segments": [model / f"{p}-segment.pt" for p in configs],
        "checkpoints": sorted((model / "checkpoints").glob("*-step-*.pt")),
        "predictions": [model / "predictions.csv"],
        "feature files": sorted(model.glob("*-features-*.npy")),  # the prediction's, which replaced the training's
    }
    assert len(written["checkpoints"]) >= 3, written  # one per party at least
    assert {p.name.split("-features-")[0] for p in written["feature files"]} == {"dh1", "dh2"}, written
    modes = {str(p): oct(mode_of(p)) for paths in written.values() for p in paths}
    assert set(modes.values()) == {"0o600"}, modes
    for path in written["segments"] + written["checkpoints"]:
        torch.load(path, weights_only=True)  # what was saved loads the safe way


def test_a_secret_key_readable_by_group_or_others_is_refused_saying_chmod_600(tmp_path):
    _, secret = generate_keypair(tmp_path, "bank")
    assert mode_of(secret) == 0o600
    load_secret_key(secret)
    os.chmod(secret, 0o400)
    load_secret_key(secret)  # read-only for the owner is fine, as with ssh
    for mode in (0o640, 0o604, 0o660, 0o644):
        os.chmod(secret, mode)
        with pytest.raises(KeyFileError) as info:
            load_secret_key(secret)
        assert str(secret) in str(info.value) and f"chmod 600 {secret}" in str(info.value)


def test_a_node_with_a_world_readable_secret_key_exits_2_naming_the_file_and_chmod_600(tmp_path):
    configs = prepare_session(tmp_path, data_holders=["dh1"])
    secret = (tmp_path / "keys" / "bank.key_secret").resolve()
    os.chmod(secret, 0o644)
    done = subprocess.run([sys.executable, "-m", "vfl", "node", "--config", str(configs["bank"])],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert f"chmod 600 {secret}" in done.stderr and "Traceback" not in done.stderr


def test_the_keys_and_configs_prepare_writes_load_as_they_are(tmp_path):
    configs = prepare_session(tmp_path, data_holders=["dh1", "dh2"])
    for path in configs.values():
        cfg = load_config(path)
        load_secret_key(cfg.secret_key)
        assert mode_of(cfg.secret_key) == 0o600


# -------------------------------------------------------------------------------------------------------- config


def edited(path: Path, old: str, new: str) -> Path:
    text = path.read_text()
    assert old in text, text
    path.write_text(text.replace(old, new, 1))
    return path


def test_psi_max_items_and_train_max_rejoins_are_parsed_with_their_defaults(tmp_path):
    configs, cfg = data_holder_config(tmp_path)
    bank = load_config(configs["bank"])
    assert bank.psi.max_items == DEFAULT_MAX_PSI_ITEMS and cfg.psi.max_items == DEFAULT_MAX_PSI_ITEMS
    assert bank.train.max_rejoins == DEFAULT_MAX_REJOINS
    edited(configs["bank"], "[psi]\n", "[psi]\nmax_items = 5000\n")
    edited(configs["bank"], 'task = "binary"', 'task = "binary"\nmax_rejoins = 0')
    bank = load_config(configs["bank"])
    assert bank.psi.max_items == 5000 and bank.train.max_rejoins == 0


@pytest.mark.parametrize(
    ("section", "line", "message"),
    [
        ("[psi]\n", "max_items = 0\n", "[psi].max_items must be >= 1, got 0"),
        ("[psi]\n", "max_items = -3\n", "[psi].max_items must be >= 1"),
        ("[psi]\n", 'max_items = "many"\n', "[psi].max_items must be an integer"),
        ("[psi]\n", "max_items = true\n", "[psi].max_items must be an integer"),
        ('task = "binary"\n', "max_rejoins = -1\n", "[train].max_rejoins must be >= 0, got -1"),
        ('task = "binary"\n', "max_rejoins = 1.5\n", "[train].max_rejoins must be an integer"),
    ],
)
def test_bad_max_items_or_max_rejoins_is_a_config_error_naming_the_key(tmp_path, section, line, message):
    configs, _ = data_holder_config(tmp_path)
    edited(configs["bank"], section, section + line)
    with pytest.raises(ConfigError) as info:
        load_config(configs["bank"])
    assert message in str(info.value) and str(configs["bank"]) in str(info.value)


def test_max_rejoins_is_the_label_holders_to_set(tmp_path):
    configs, _ = data_holder_config(tmp_path)
    edited(configs["dh1"], "[train]\n", "[train]\nmax_rejoins = 2\n")
    with pytest.raises(ConfigError, match=r"\[train\].max_rejoins is the label holder's to set"):
        load_config(configs["dh1"])


def test_two_partner_names_with_one_key_file_are_a_config_error_naming_both(tmp_path):
    configs = prepare_session(tmp_path, data_holders=["dh1", "dh2"])
    edited(configs["bank"], 'dh2 = "keys/dh2.key"', 'dh2 = "keys/dh1.key"')
    with pytest.raises(ConfigError) as info:
        load_config(configs["bank"])
    message = str(info.value)
    assert "[keys.partners].dh1 and .dh2" in message and "same key file" in message and "vfl keys generate" in message


def test_two_partner_names_with_the_same_key_in_two_files_are_a_config_error_naming_both(tmp_path):
    configs = prepare_session(tmp_path, data_holders=["dh1", "dh2"])
    shutil.copy(tmp_path / "keys" / "dh1.key", tmp_path / "keys" / "copy-of-dh1.key")
    edited(configs["bank"], 'dh2 = "keys/dh2.key"', 'dh2 = "keys/copy-of-dh1.key"')
    with pytest.raises(ConfigError) as info:
        load_config(configs["bank"])
    message = str(info.value)
    assert "[keys.partners].dh1 and .dh2 hold the same public key" in message and "copy-of-dh1.key" in message


def test_an_unreadable_partner_key_is_a_config_error(tmp_path):
    configs = prepare_session(tmp_path, data_holders=["dh1"])
    (tmp_path / "keys" / "dh1.key").write_text("not a key\n")
    with pytest.raises(ConfigError, match=r"\[keys.partners\].dh1: .*dh1.key: "):
        load_config(configs["bank"])


@pytest.mark.parametrize(
    ("endpoint", "loopback"),
    [
        ("tcp://127.0.0.1:5555", True),
        ("tcp://127.8.9.10:5555", True),
        ("tcp://[::1]:5555", True),
        ("tcp://[::ffff:127.0.0.1]:5555", True),
        ("tcp://localhost:5555", True),
        ("tcp://LocalHost:5555", True),
        ("tcp://0.0.0.0:5555", False),
        ("tcp://10.0.0.7:5555", False),
        ("tcp://[::]:5555", False),
        ("tcp://128.0.0.1:5555", False),
        ("tcp://localhost.example.com:5555", False),
        ("tcp://bank.internal:5555", False),
    ],
)
def test_loopback_endpoints(endpoint, loopback):
    assert is_loopback(endpoint) is loopback


def insecure_configs(tmp_path: Path, host: str) -> dict[str, Path]:
    configs = prepare_session(tmp_path, data_holders=["dh1"], insecure=True)
    for path in configs.values():
        edited(path, "tcp://127.0.0.1:", f"tcp://{host}:")
    return configs


def test_insecure_mode_on_a_non_loopback_endpoint_is_refused_unless_allowed(tmp_path):
    configs = insecure_configs(tmp_path, "10.1.2.3")
    for path in configs.values():
        with pytest.raises(ConfigError) as info:
            load_config(path)
        message = str(info.value)
        assert "[keys].insecure = true" in message and "loopback" in message and "tcp://10.1.2.3:" in message
        assert "vfl node --insecure" in message
        assert load_config(path, allow_insecure_remote=True).insecure
    secure = prepare_session(tmp_path / "secure", data_holders=["dh1"])
    edited(secure["dh1"], "tcp://127.0.0.1:", "tcp://10.1.2.3:")
    assert not load_config(secure["dh1"]).insecure  # CurveZMQ on any interface, as before


def test_insecure_mode_on_loopback_needs_no_flag(tmp_path):
    for host in ("127.0.0.1", "localhost", "[::1]"):
        configs = insecure_configs(tmp_path / host.strip("[]").replace(":", "_"), host)
        assert all(load_config(p).insecure for p in configs.values())


def test_vfl_node_insecure_flag_lets_a_remote_insecure_node_start(tmp_path):
    # a data holder connecting to TEST-NET-1 (192.0.2.0/24, never routed): it starts, nothing answers
    configs = insecure_configs(tmp_path, "192.0.2.1")
    refused = subprocess.run([sys.executable, "-m", "vfl", "node", "--config", str(configs["dh1"])],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "vfl node --insecure" in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    with Nodes(tmp_path) as nodes:
        node = nodes.start(configs["dh1"], "--insecure")
        node.wait_for("connecting to tcp://192.0.2.1:", timeout=30)
        assert "INSECURE MODE" in node.output
