"""Errors a user meets at the command line: one root, one exit code per family, one line naming the way out.

Every test here starts real ``vfl`` processes: what is checked is what a user sees (stderr and the exit status).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import pkgutil
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import vfl
from vfl.errors import ExitCode, SetupError, VflError, exit_code_of

from .node.procs import Nodes
from .node.test_training_nodes import run_nodes, training_session


def run_vfl(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vfl", *args], capture_output=True, text=True, timeout=timeout)


def endpoint_port(config: Path) -> int:
    return int(re.search(r'endpoint = "tcp://127\.0\.0\.1:(\d+)"', config.read_text()).group(1))


# ------------------------------------------------------------------------------------------------ one root


def vfl_error_classes() -> list[type[BaseException]]:
    """Every exception class defined in a vfl module (importing each module of the package)."""
    found = {}
    for info in pkgutil.walk_packages(vfl.__path__, "vfl."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__ == module.__name__:
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return [found[k] for k in sorted(found)]


def test_every_error_vfl_defines_derives_from_the_one_root():
    classes = vfl_error_classes()
    names = {c.__name__ for c in classes}
    assert {"ConfigError", "TrainingSetupError", "AlignmentError", "StateFileError", "KeyFileError", "PsiError",
            "ScheduleError", "DataError", "ModelError", "PlotError", "DemoError", "CheckpointError",
            "EndpointError", "ProtocolError", "SessionFailed"} <= names
    internal = {"_HeaderProblem"}  # the codec's private signal, always turned into a ProtocolError before it leaves
    strays = [f"{c.__module__}.{c.__qualname__}" for c in classes if c.__name__ not in internal and not issubclass(c, VflError)]
    assert strays == []


def test_local_problems_exit_2_and_session_failures_exit_1():
    from vfl.launch.demo import DemoError
    from vfl.launch.plot import PlotError
    from vfl.node.alignment import AlignmentError
    from vfl.node.checkpoints import StateFileError
    from vfl.node.config import ConfigError, TrainingSetupError
    from vfl.node.keys import KeyFileError
    from vfl.node.transport import EndpointError
    from vfl.protocol.errors import ErrorCode, RemoteProtocolError, SessionFailed, VflError as ProtocolVflError
    from vfl.protocol.training_phase import CheckpointError
    from vfl.psi import PsiError
    from vfl.train.data import DataError
    from vfl.train.models import ModelError

    assert ProtocolVflError is VflError  # the protocol layer re-exports the root, it does not define another
    for local in (ConfigError, TrainingSetupError, AlignmentError, StateFileError, KeyFileError, DataError,
                  ModelError, PlotError, DemoError, EndpointError):
        assert issubclass(local, SetupError) and exit_code_of(local("x")) == ExitCode.SETUP == 2, local
    for session in (CheckpointError, PsiError):
        assert exit_code_of(session("x")) == ExitCode.FAILED == 1, session
    assert exit_code_of(RemoteProtocolError(ErrorCode.UNEXPECTED_MESSAGE, "x")) == 1
    assert exit_code_of(SessionFailed("lost", exit_code=3)) == 3
    assert exit_code_of(OSError("disk full")) == 1  # unexpected: a failure, never "your config is wrong"
    assert issubclass(ModelError, ValueError)  # callers that catch ValueError keep working


# ------------------------------------------------------------------------------------------------ raw errors left


def test_an_endpoint_another_process_listens_on_is_exit_2_naming_it_and_the_key_to_change(tmp_path):
    configs, _ = training_session(tmp_path, window=1)
    port = endpoint_port(configs["bank"])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        done = run_vfl("node", "--config", str(configs["bank"]), timeout=60)
    assert done.returncode == 2, done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert f"cannot listen on tcp://127.0.0.1:{port}" in line and "another process" in line, done.stderr
    assert f"`endpoint` in {configs['bank']}" in line, done.stderr
    assert "ZMQError" not in done.stderr and "Traceback" not in done.stderr and "peer" not in line


def test_an_optimizer_key_typo_is_one_line_listing_the_keys_the_optimizer_takes(tmp_path):
    configs, _ = training_session(tmp_path, window=1, opt={"kind": "adam", "learning_rate": 0.01})
    done = run_vfl("node", "--config", str(configs["bank"]), timeout=60)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert str(configs["bank"]) in lines[0] and "[train].optimizer" in lines[0] and "learning_rate" in lines[0]
    assert "'adam' takes kind, lr, betas, eps, weight_decay" in lines[0]
    assert "__init__" not in done.stderr


def test_an_optimizer_key_of_the_other_kind_is_refused_not_ignored(tmp_path):
    configs, _ = training_session(tmp_path, window=1, opt={"kind": "adam", "lr": 0.01, "momentum": 0.9})
    done = run_vfl("node", "--config", str(configs["dh1"]), timeout=60)
    assert done.returncode == 2, done.stderr
    assert "momentum is not a key of 'adam'" in done.stderr and done.stderr.count("\n") == 1, done.stderr


# ------------------------------------------------------------------------------------------------ bug 3: vfl psi


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``folder``: its SHA-256 and modification time (ns)."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_vfl_psi_on_a_trained_folder_with_checkpoints_runs_only_the_psi_and_leaves_the_model_alone(tmp_path):
    configs, _ = training_session(tmp_path, window=1, epochs=2)
    run_nodes(tmp_path, configs)
    model = tmp_path / "model"
    before = snapshot(model)
    assert any(name.startswith("checkpoints/") for name in before) and "dh1-segment.pt" in before, sorted(before)
    for party in configs:
        (tmp_path / f"{party}-aligned.csv").unlink()
    with Nodes(tmp_path) as nodes:
        procs = {p: nodes.start_command(["psi", "--config", str(path)], f"psi-{p}") for p, path in configs.items()}
        codes = {p: proc.wait(timeout=120) for p, proc in procs.items()}
        outputs = {p: proc.output for p, proc in procs.items()}
    assert codes == {p: 0 for p in configs}, outputs
    assert snapshot(model) == before  # no segment, checkpoint or metrics line written, not even rewritten
    for party, out in outputs.items():
        assert (tmp_path / f"{party}-aligned.csv").exists()
        assert "running the PSI only" in out, out
        assert not re.search(r"training on|resuming|saved this party|epoch \d", out), out


def test_a_vfl_psi_label_holder_refuses_a_data_holder_that_would_train_and_nothing_is_trained(tmp_path):
    configs, _ = training_session(tmp_path, window=1, epochs=2)
    with Nodes(tmp_path) as nodes:
        lh = nodes.start_command(["psi", "--config", str(configs["bank"])], "psi-bank")
        dh1 = nodes.start(configs["dh1"])  # `vfl node`: this one would train
        assert dh1.wait(timeout=60) == 1, dh1.output
        lh.stop()
    assert "CONFIG_MISMATCH" in dh1.output and "train" in dh1.output, dh1.output
    assert not (tmp_path / "model").exists() or not any((tmp_path / "model").rglob("*.pt"))


def test_a_node_that_does_not_train_never_imports_torch():
    """torch costs about a second and a half of every node start: a PSI-only node (``vfl psi``, a conformance
    target, a session with ``train = false``) loads the node, its alignment and its feature-file code without it."""
    code = ("import sys, vfl.cli, vfl.node.runner, vfl.node.alignment, vfl.node.aligned, vfl.psi; "
            "print('torch' in sys.modules)")
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert got.returncode == 0, got.stderr
    assert got.stdout.strip() == "False", "a module on the PSI-only path imports torch"
