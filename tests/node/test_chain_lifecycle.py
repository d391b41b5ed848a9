"""A segment chain's run lifecycle between real node processes (PROTOCOL.md [J1]-[J3], [X7]-[X9], [C5], [C9]).

Three tiers (dh1, dh2 -> seg1 -> bank) over 900 shared people, batch 8 and a checkpoint every 5 steps, so that a
node can be killed, stopped or restarted in the middle of an epoch after a committed checkpoint. Every wait is
bounded: a hang anywhere fails the test instead of blocking it. The normal suite keeps the pause-and-resume test,
the session ended at a segment holder, and the two refused configs; the kill tests are marked slow (each 7-30 s).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from vfl.launch import prepare_session

from .procs import Node, Nodes
from .test_training_nodes import FAST, read_metrics, shared_tables

THREE = {"seg1": {"inputs": ["dh1", "dh2"], "width": 6}}
#: four tiers: dh1, dh2 -> segA -> segB -> bank
FOUR = {"segA": {"inputs": ["dh1", "dh2"], "width": 6}, "segB": {"inputs": ["segA"], "width": 5}}
OPT = {"kind": "sgd", "lr": 0.05, "momentum": 0.5}
#: a lost peer is noticed within seconds, and a lost party waited for REJOIN seconds
TIMEOUTS = {**FAST, "peer": 3.0, "heartbeat": 0.3, "rejoin": 20.0}


def chain_configs(tmp_path: Path, *, epochs: int = 2, rejoin: float = 20.0, peer: float = 3.0,
                  segments: dict = THREE, run: str = "chain-life") -> dict[str, Path]:
    shared_tables(tmp_path, 900)
    out = str(tmp_path / "model")
    tables = {
        "bank": {"model": {"top": {"widths": [16, 3]}, "seed": 3},
                 "train": {"task": "multiclass", "epochs": epochs, "validation_fraction": 0.25, "seed": 5,
                           "optimizer": OPT, "output": out, "checkpoint_every": 5}},
        "dh1": {"model": {"bottom": {"widths": [6, 4]}, "seed": 1}, "train": {"optimizer": OPT, "output": out}},
        "dh2": {"model": {"bottom": {"widths": [6, 4]}, "seed": 2}, "train": {"optimizer": OPT, "output": out}},
    }
    for name, spec in segments.items():
        tables[name] = {"model": {"segment": {"widths": [8, spec["width"]]}, "seed": 7},
                        "train": {"optimizer": OPT, "output": out}}
    data = {
        "bank": {"path": "bank.csv", "id_column": "id", "label_column": "label", "features": []},
        "dh1": {"path": "dh1.csv", "id_column": "id"},
        "dh2": {"path": "dh2.csv", "id_column": "id"},
    }
    return prepare_session(tmp_path, data_holders=["dh1", "dh2"], run=run, timeouts={**TIMEOUTS, "rejoin": rejoin, "peer": peer},
                           link_check={"rounds": 0}, data=data, psi={"workers": 1}, tables=tables, cut_width=4,
                           batch_size=8, window=1, segments=segments)


def start_all(nodes: Nodes, configs: dict[str, Path], **extra: tuple[str, ...]) -> dict[str, Node]:
    """Label holder first, then the segment holder, then the data holders (prepare_session's order)."""
    return {name: nodes.start(path, *extra.get(name, ())) for name, path in configs.items()}


def committed_step(tmp_path: Path) -> int | None:
    try:
        return json.loads((tmp_path / "model" / "checkpoints" / "manifest.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return None


def wait_for_checkpoint(tmp_path: Path, procs: dict[str, Node], at_least: int = 5, timeout: float = 60.0) -> int:
    """Until the label holder has committed a checkpoint at step >= ``at_least`` (its manifest)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        step = committed_step(tmp_path)
        if step is not None and step >= at_least:
            return step
        for name, p in procs.items():
            if p.proc.poll() is not None:
                raise AssertionError(f"{name} exited {p.proc.returncode} before a checkpoint:\n{p.output}")
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint at step >= {at_least} within {timeout} s:\n{procs['bank'].output}")


def codes_of(procs: dict[str, Node], timeout: float) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    return {name: p.wait(timeout=max(1.0, deadline - time.monotonic())) for name, p in procs.items()}


def outputs(procs: dict[str, Node]) -> str:
    return "\n".join(f"----- {name}\n{p.output}" for name, p in procs.items())


def assert_finished(tmp_path: Path, epochs: int, parties=("bank", "seg1", "dh1", "dh2")) -> None:
    assert [m["epoch"] for m in read_metrics(tmp_path / "model" / "metrics.jsonl")] == list(range(1, epochs + 1))
    for party in parties:
        assert (tmp_path / "model" / f"{party}-segment.pt").is_file(), party


def killed_and_restarted(tmp_path: Path, victim: str, **settings) -> dict[str, str]:
    """kill -9 ``victim`` after a committed checkpoint, start it again with the same command, wait for every node
    (each must exit 0). Returns each node's output."""
    configs = chain_configs(tmp_path, **settings)
    with Nodes(tmp_path) as nodes:
        procs = start_all(nodes, configs)
        wait_for_checkpoint(tmp_path, procs)
        os.kill(procs[victim].proc.pid, signal.SIGKILL)
        procs[victim].wait(timeout=10)
        assert "epoch 2 of 2 done" not in procs["bank"].output, "the kill came too late"
        procs[victim] = nodes.start(configs[victim])
        codes = codes_of(procs, timeout=120)
        assert codes == {name: 0 for name in configs}, outputs(procs)
        out = {name: p.output for name, p in procs.items()}
    assert_finished(tmp_path, 2, parties=tuple(configs))
    return out


@pytest.mark.slow
def test_X8_a_data_holder_behind_a_segment_holder_killed_and_restarted_resumes(tmp_path):
    """kill -9 dh1 (behind seg1) after a committed checkpoint; the same command again: the label holder rolls every
    party back to the last checkpoint (seg1 and dh2 included, through the chain) and the run completes."""
    out = killed_and_restarted(tmp_path, "dh1")
    assert "resuming every party from the checkpoint at step" in out["bank"]
    assert "data holder 'dh1' rejoined" in out["bank"]
    assert "rolling back to the checkpoint" in out["dh2"], out["dh2"]


@pytest.mark.slow
def test_C9_a_segment_holder_killed_and_restarted_makes_its_inputs_rejoin_and_the_run_resumes(tmp_path):
    """kill -9 seg1 mid-training, then the same command: dh1 and dh2 see their connection drop and rejoin through the
    new seg1 ([J1](c)), the label holder rolls everyone back to the last committed checkpoint, the run completes."""
    out = killed_and_restarted(tmp_path, "seg1")
    assert "resuming every party from the checkpoint at step" in out["bank"]
    assert "segment holder 'seg1' rejoined" in out["bank"], out["bank"]
    for dh in ("dh1", "dh2"):
        assert "dropped: rejoining on a new connection" in out[dh], out[dh]


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["segA", "segB"])
def test_C9_four_tiers_a_segment_holder_killed_and_restarted_the_run_resumes(tmp_path, victim):
    """Two segment holders in line: kill -9 the one behind the other (segA) or the one that feeds the label holder
    (segB), and start it again: everything behind it rejoins through it, hop by hop, and the run completes."""
    out = killed_and_restarted(tmp_path, victim, segments=FOUR)
    assert "resuming every party from the checkpoint at step" in out["bank"]
    assert f"segment holder {victim!r} rejoined" in out["bank"], out["bank"]


@pytest.mark.slow
def test_J2_a_data_holder_behind_a_segment_holder_paused_and_started_again_resumes(tmp_path):
    """SIGTERM to dh1: its BYE {pause: true} travels as RELAY through seg1, the label holder keeps its place, and dh1
    started again rejoins through seg1; every party resumes from the last checkpoint and the run completes."""
    configs = chain_configs(tmp_path)
    with Nodes(tmp_path) as nodes:
        procs = start_all(nodes, configs)
        wait_for_checkpoint(tmp_path, procs)
        procs["dh1"].proc.send_signal(signal.SIGTERM)
        assert procs["dh1"].wait(timeout=15) == 5, procs["dh1"].output
        procs["bank"].wait_for("data holder 'dh1' paused (stopped by SIGTERM)", timeout=5)
        procs["dh1"] = nodes.start(configs["dh1"])
        codes = codes_of(procs, timeout=120)
        assert codes == {"bank": 0, "seg1": 0, "dh1": 0, "dh2": 0}, outputs(procs)
        assert "resuming every party from the checkpoint at step" in procs["bank"].output
    assert_finished(tmp_path, 2)


def test_J2_a_segment_holder_stopped_by_SIGTERM_pauses_and_started_again_the_run_resumes(tmp_path):
    """SIGTERM to seg1: it pauses (exit 5, BYE {pause: true}), the others wait; seg1 started again: its inputs
    rejoin through it, every party resumes from the last checkpoint, the run completes. The peer timeout is longer
    than the restart takes, so seg1 is back while the label holder still counts dh1 and dh2 as training: it must
    still wait for their rejoins (their sessions went with seg1's connection) before it resumes."""
    configs = chain_configs(tmp_path, peer=15.0)
    with Nodes(tmp_path) as nodes:
        procs = start_all(nodes, configs)
        wait_for_checkpoint(tmp_path, procs)
        procs["seg1"].proc.send_signal(signal.SIGTERM)
        assert procs["seg1"].wait(timeout=15) == 5, procs["seg1"].output
        assert "paused" in procs["bank"].output or "segment holder 'seg1'" in procs["bank"].output
        for name in ("bank", "dh1", "dh2"):
            assert procs[name].proc.poll() is None, (name, procs[name].output)
        procs["seg1"] = nodes.start(configs["seg1"])
        codes = codes_of(procs, timeout=120)
        assert codes == {"bank": 0, "seg1": 0, "dh1": 0, "dh2": 0}, outputs(procs)
        bank = procs["bank"].output
        assert "segment holder 'seg1' came back on a new connection: the sessions of 'dh1', 'dh2' behind it" in bank
        assert "resuming every party from the checkpoint at step" in bank
    assert_finished(tmp_path, 2)


@pytest.mark.parametrize("how", [pytest.param("end-session", marks=pytest.mark.slow), "second-signal"])
def test_J2_ending_the_session_at_a_segment_holder_ends_it_for_everyone(tmp_path, how):
    """seg1 started with --end-session and sent SIGTERM, or sent two signals before it stopped: it says BYE without
    pause, and the label holder's BYEs that end the session for dh1 and dh2 pass through seg1 before it exits: every
    node exits non-zero in seconds, none waits out its rejoin timeout (60 s) for a label holder that has stopped."""
    configs = chain_configs(tmp_path, epochs=6, rejoin=60.0)
    with Nodes(tmp_path) as nodes:
        procs = start_all(nodes, configs, seg1=("--end-session",) if how == "end-session" else ())
        wait_for_checkpoint(tmp_path, procs)
        stopped_at = time.monotonic()
        if how == "second-signal":  # both delivered at once (stopped meanwhile): the second before it stopped
            pid = procs["seg1"].proc.pid
            for sig in (signal.SIGSTOP, signal.SIGTERM, signal.SIGINT, signal.SIGCONT):
                os.kill(pid, sig)
        else:
            procs["seg1"].proc.send_signal(signal.SIGTERM)
        codes = codes_of(procs, timeout=20)
        assert time.monotonic() - stopped_at < 20
        assert all(code != 0 for code in codes.values()), (codes, outputs(procs))
        assert "epoch 6 of 6 done" not in procs["bank"].output
        assert "segment holder 'seg1' left during the session: stopped by SIG" in procs["bank"].output
        for dh in ("dh1", "dh2"):
            assert "label holder 'bank' ended the session: segment holder 'seg1' left" in procs[dh].output, \
                procs[dh].output


@pytest.mark.slow
def test_X9_a_segment_holder_killed_and_not_restarted_ends_the_session_naming_it(tmp_path):
    """kill -9 seg1 and never start it again: the label holder waits [timeouts].rejoin for it and ends the session
    (exit 3) naming it; dh1 and dh2, whose only route is through seg1, exit non-zero within bounded time too."""
    configs = chain_configs(tmp_path, epochs=6, rejoin=4.0)
    with Nodes(tmp_path) as nodes:
        procs = start_all(nodes, configs)
        wait_for_checkpoint(tmp_path, procs)
        os.kill(procs["seg1"].proc.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        assert procs["bank"].wait(timeout=30) == 3, procs["bank"].output
        assert time.monotonic() - killed_at < 3.0 + 4.0 + 10
        for dh in ("dh1", "dh2"):
            assert procs[dh].wait(timeout=30) != 0, procs[dh].output
        assert time.monotonic() - killed_at < 30
        assert "segment holder 'seg1' stopped answering and did not come back within 4 s" in procs["bank"].output, \
            procs["bank"].output


@pytest.mark.slow
def test_J1_the_label_holder_killed_and_restarted_every_tier_rejoins_and_the_run_resumes(tmp_path):
    """kill -9 the label holder mid-training and start it again: seg1 sees its connection drop and rejoins, closing
    its inputs' connections so that they rejoin through it ([C9]); the new label holder resumes every party from its
    manifest's checkpoint and the run completes."""
    out = killed_and_restarted(tmp_path, "bank")
    assert "resuming from the checkpoint at step" in out["bank"], out["bank"]
    for name in ("seg1", "dh1", "dh2"):
        assert "rejoin" in out[name], (name, out[name])


def test_C2_a_data_holder_that_skips_its_segment_holder_is_refused_naming_its_route(tmp_path):
    """dh1's config lost its [session.segments] table and points at the label holder: the label holder refuses its
    HELLO ([C2]: IDENTITY_MISMATCH naming seg1) and dh1 exits non-zero saying so; the session is untouched, and dh1
    started with its right config joins through seg1 and the run completes."""
    configs = chain_configs(tmp_path, epochs=1)
    right = configs["dh1"].read_text()
    bank_endpoint = next(line for line in configs["bank"].read_text().splitlines() if line.startswith("endpoint"))
    wrong = tmp_path / "dh1-direct.toml"
    text = "\n".join(bank_endpoint if line.startswith("endpoint") else line for line in right.splitlines())
    segment_table = '[session.segments.seg1]\ninputs = ["dh1", "dh2"]\nwidth = 6\ncombine = "concat"\n'
    assert segment_table in text
    assert 'seg1 = "keys/seg1.key"\n' in text
    wrong.write_text(text.replace(segment_table, "").replace('seg1 = "keys/seg1.key"\n', ""))  # a two-tier config
    with Nodes(tmp_path) as nodes:
        procs = {name: nodes.start(configs[name]) for name in ("bank", "seg1", "dh2")}
        direct = nodes.start(wrong)
        assert direct.wait(timeout=30) != 0, direct.output
        assert "IDENTITY_MISMATCH" in direct.output and "behind segment holder 'seg1'" in direct.output, direct.output
        assert "Traceback" not in direct.output
        procs["dh1"] = nodes.start(configs["dh1"])
        codes = codes_of(procs, timeout=90)
        assert codes == {"bank": 0, "seg1": 0, "dh2": 0, "dh1": 0}, outputs(procs)
    assert "party 'dh1' is behind segment holder 'seg1' in this session" in procs["bank"].output


def test_H4_a_segment_holder_with_another_chain_is_refused_naming_segments(tmp_path):
    """seg1's config sums its inputs where everyone else's concatenates them (a config its own checks accept: the
    inputs have equal widths): its HELLO's session digest differs, and the label holder answers CONFIG_MISMATCH naming
    `segments`; seg1 exits non-zero saying so, within seconds."""
    configs = chain_configs(tmp_path, epochs=1)
    text = configs["seg1"].read_text()
    assert 'combine = "concat"\n' in text
    configs["seg1"].write_text(text.replace('combine = "concat"\n', 'combine = "sum"\n'))
    with Nodes(tmp_path) as nodes:
        bank = nodes.start(configs["bank"])
        seg1 = nodes.start(configs["seg1"])
        assert seg1.wait(timeout=30) != 0, seg1.output
        assert "CONFIG_MISMATCH" in seg1.output and "segments" in seg1.output, seg1.output
        assert "Traceback" not in seg1.output
        bank.wait_for("segments.seg1.combine: label holder has 'concat', segment holder has 'sum'", timeout=5)


@pytest.mark.slow
def test_J3_a_segment_holder_rejoining_beyond_max_rejoins_ends_the_session_for_everyone(tmp_path):
    """[train].max_rejoins = 0 at the label holder: seg1 killed and restarted is refused at its rejoin ([C9]: counted
    like a data holder's), the label holder exits 1 naming it and the setting, and every other node exits non-zero
    within bounded time (the data holders, cut off with seg1's old connection, after their rejoin timeout)."""
    configs = chain_configs(tmp_path, epochs=6, rejoin=5.0)
    text = configs["bank"].read_text()
    configs["bank"].write_text(text.replace("\n[train]\n", "\n[train]\nmax_rejoins = 0\n", 1))
    with Nodes(tmp_path) as nodes:
        procs = start_all(nodes, configs)
        wait_for_checkpoint(tmp_path, procs)
        os.kill(procs["seg1"].proc.pid, signal.SIGKILL)
        procs["seg1"].wait(timeout=10)
        killed_at = time.monotonic()
        procs["seg1"] = nodes.start(configs["seg1"])
        codes = codes_of(procs, timeout=40)
        assert time.monotonic() - killed_at < 40
        assert codes["bank"] == 1 and all(code != 0 for code in codes.values()), (codes, outputs(procs))
    assert "segment holder 'seg1' rejoined 1 times, more than [train].max_rejoins = 0" in procs["bank"].output
    assert "max_rejoins" in procs["seg1"].output, procs["seg1"].output
