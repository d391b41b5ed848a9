"""Real node processes on loopback: CurveZMQ handshake, allow-list, config mismatch, liveness, config errors."""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from vfl.launch import prepare_session
from vfl.node.keys import generate_keypair

from .procs import Nodes

FAST = {"heartbeat": 0.3, "peer": 3.0, "handshake": 15.0, "join": 60.0}


def session(tmp_path: Path, *, hold: float = 0.0, data_holders=("dh1",), timeouts=FAST, **kw) -> dict[str, Path]:
    link = {"rounds": 2, "shape": [64, 32], "dtype": "float32", "hold": hold}
    return prepare_session(tmp_path, data_holders=list(data_holders), run="t1", timeouts=timeouts, link_check=link, **kw)


def test_two_processes_complete_the_handshake_over_curve(tmp_path):
    cfg = session(tmp_path)
    with Nodes(tmp_path) as nodes:
        lh = nodes.start(cfg["bank"])
        lh.wait_for("listening on")
        dh = nodes.start(cfg["dh1"])
        assert dh.wait() == 0, dh.output
        assert lh.wait() == 0, lh.output
    assert "[CurveZMQ]" in lh.output and "data holder 'dh1' joined" in lh.output
    assert "joined label holder 'bank'" in dh.output and "link check: 2 round trips" in dh.output
    assert "INSECURE" not in lh.output + dh.output


def test_S3_a_key_not_on_the_allow_list_gets_nothing_delivered(tmp_path):
    cfg = session(tmp_path, data_holders=("dh1", "dh2"))
    # dh2 runs with a fresh key the label holder has never seen
    generate_keypair(tmp_path / "rogue", "dh2")
    text = cfg["dh2"].read_text().replace("keys/dh2.key_secret", "rogue/dh2.key_secret")
    cfg["dh2"].write_text(text)
    with Nodes(tmp_path) as nodes:
        lh = nodes.start(cfg["bank"], "-v")
        lh.wait_for("listening on")
        rogue = nodes.start(cfg["dh2"])
        assert rogue.wait() == 1, rogue.output
        assert "refused this node's key" in rogue.output
        assert "refused a CURVE client with a key not on the allow-list" in lh.output
        # nothing reached the session layer: no join, no error answer, not even a log line about a message
        assert "dh2" not in lh.output
        # and the label holder still serves a partner with a good key
        good = nodes.start(cfg["dh1"])
        assert good.wait() == 0, good.output
        lh.wait_for("data holder 'dh1' left")
        assert lh.proc.poll() is None  # dh2 never joined, so the session is not over


def test_S3_raw_client_with_unknown_key_gets_no_answer(tmp_path):
    cfg = session(tmp_path)
    with Nodes(tmp_path) as nodes:
        lh = nodes.start(cfg["bank"], "-v")
        lh.wait_for("listening on")
        endpoint = re.search(r"listening on (tcp://\S+)", lh.output).group(1)
        import zmq.auth

        server_public, _ = zmq.auth.load_certificate(tmp_path / "keys" / "bank.key")
        ctx = zmq.Context()
        try:
            sock = ctx.socket(zmq.DEALER)
            sock.linger = 0
            sock.routing_id = b"dh1"  # claims to be dh1, but has the wrong key
            sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
            sock.curve_serverkey = server_public
            sock.connect(endpoint)
            sock.send_multipart([b"VFL/1", b"\x80"])
            assert sock.poll(1500) == 0  # no ERROR, no anything
        finally:
            ctx.destroy(linger=0)
        assert "dh1" not in lh.output


def test_H4_config_mismatch_is_refused_with_a_readable_diff(tmp_path):
    cfg = session(tmp_path)
    text = cfg["dh1"].read_text().replace("batch_size = 64", "batch_size = 128").replace('run = "t1"', 'run = "t2"')
    cfg["dh1"].write_text(text)
    with Nodes(tmp_path) as nodes:
        lh = nodes.start(cfg["bank"])
        lh.wait_for("listening on")
        dh = nodes.start(cfg["dh1"])
        assert dh.wait() == 1
        assert "CONFIG_MISMATCH" in dh.output
        assert "batch_size: label holder has 64, data holder has 128" in dh.output
        assert "run: label holder has 't1', data holder has 't2'" in dh.output
        assert lh.proc.poll() is None  # the label holder keeps waiting for a correctly configured dh1


def test_L2_a_stopped_data_holder_is_detected_and_named(tmp_path):
    cfg = session(tmp_path, hold=60.0)
    with Nodes(tmp_path) as nodes:
        lh = nodes.start(cfg["bank"])
        lh.wait_for("listening on")
        dh = nodes.start(cfg["dh1"])
        dh.wait_for("link check:")
        os.kill(dh.proc.pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        assert lh.wait(timeout=FAST["peer"] + 10) == 3
        detected_in = time.monotonic() - stopped_at
        assert "data holder 'dh1' has sent nothing for" in lh.output
        assert detected_in < FAST["peer"] + 5, detected_in


def test_L2_a_stopped_label_holder_is_detected_and_named(tmp_path):
    cfg = session(tmp_path, hold=60.0)
    with Nodes(tmp_path) as nodes:
        lh = nodes.start(cfg["bank"])
        lh.wait_for("listening on")
        dh = nodes.start(cfg["dh1"])
        dh.wait_for("link check:")
        os.kill(lh.proc.pid, signal.SIGSTOP)
        assert dh.wait(timeout=FAST["peer"] + 10) == 3
        assert "label holder 'bank' has sent nothing for" in dh.output


def test_L3_label_holder_names_data_holders_that_never_join(tmp_path):
    cfg = session(tmp_path, data_holders=("dh1", "dh2"), timeouts={**FAST, "join": 1.5})
    with Nodes(tmp_path) as nodes:
        lh = nodes.start(cfg["bank"])
        assert lh.wait(timeout=15) == 4
        assert "dh1, dh2 did not join" in lh.output


def test_L3_data_holder_without_a_label_holder_gives_up(tmp_path):
    cfg = session(tmp_path, timeouts={**FAST, "handshake": 1.0})
    with Nodes(tmp_path) as nodes:
        dh = nodes.start(cfg["dh1"])
        assert dh.wait(timeout=15) == 4
        assert "no WELCOME" in dh.output


def test_sigterm_stops_the_label_holder_and_its_peers_are_told(tmp_path):
    cfg = session(tmp_path, hold=60.0)
    with Nodes(tmp_path) as nodes:
        lh = nodes.start(cfg["bank"])
        lh.wait_for("listening on")
        dh = nodes.start(cfg["dh1"])
        dh.wait_for("link check:")
        lh.proc.send_signal(signal.SIGTERM)
        assert lh.wait(timeout=10) == 0
        assert dh.wait(timeout=10) == 1
        assert "ended the session: stopped by SIGTERM" in dh.output


def test_insecure_mode_works_and_warns_loudly(tmp_path):
    cfg = session(tmp_path)
    for path in cfg.values():
        path.write_text(path.read_text().replace("[keys]\n", "[keys]\ninsecure = true\n"))
    with Nodes(tmp_path) as nodes:
        lh = nodes.start(cfg["bank"])
        lh.wait_for("listening on")
        dh = nodes.start(cfg["dh1"])
        assert dh.wait() == 0 and lh.wait() == 0
    assert "INSECURE MODE" in lh.output and "INSECURE MODE" in dh.output


# ------------------------------------------------------------------------------------------------ config errors


def run_vfl(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vfl", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda t: "colour = 1\n" + t, "unknown key colour"),
        (lambda t: t.replace("batch_size = 64", 'batch_size = "64"'), "[session].batch_size must be an integer"),
        (lambda t: t.replace("keys/bank.key_secret", "keys/nope.key_secret"), "[keys].secret = 'keys/nope.key_secret': no such file"),
        (lambda t: t.replace("[timeouts]", "[timeouts]\nretries = 3"), "unknown key [timeouts].retries"),
        (lambda t: t.replace('role = "label_holder"', 'role = "boss"'), "role must be one of"),
        (lambda t: t.replace("dh1 = 16", "dh1 = 0"), "cut_widths.dh1 must be an integer"),
        (lambda t: "role = [", "not valid TOML"),
    ],
)
def test_bad_config_is_one_line_naming_file_and_key_with_exit_2(tmp_path, edit, expected):
    cfg = session(tmp_path)["bank"]
    cfg.write_text(edit(cfg.read_text()))
    result = run_vfl("node", "--config", str(cfg))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(cfg) in lines[0] and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_missing_config_file_is_exit_2(tmp_path):
    result = run_vfl("node", "--config", str(tmp_path / "none.toml"))
    assert result.returncode == 2 and "no such config file" in result.stderr


def test_keys_generate_writes_a_private_secret_and_refuses_to_overwrite(tmp_path):
    result = run_vfl("keys", "generate", "--out", str(tmp_path), "alice")
    assert result.returncode == 0, result.stderr
    secret = tmp_path / "alice.key_secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    public, sec = zmq.auth.load_certificate(secret)
    assert len(public) == 40 and len(sec) == 40
    assert zmq.auth.load_certificate(tmp_path / "alice.key")[1] is None
    again = run_vfl("keys", "generate", "--out", str(tmp_path), "alice")
    assert again.returncode == 2 and "--overwrite" in again.stderr
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left behind
