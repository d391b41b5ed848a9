"""`window = "auto"` between real node processes across an emulated 50 ms link (issue 15; PROTOCOL.md [X13]).

The label holder times its first steps at window 1, picks the window, and announces it: every node logs the same
value, the label holder's metrics.jsonl records it, and the run completes."""

from __future__ import annotations

import json
import re

from vfl.launch.link import LinkProxy

from .test_training_nodes import run_nodes, training_session


def test_X13_every_node_logs_the_window_the_label_holder_chose_across_a_50_ms_link(tmp_path):
    configs, _ = training_session(tmp_path, window="auto", epochs=3)
    text = configs["bank"].read_text()
    assert 'window = "auto"' in text
    host, port = re.search(r'endpoint = "tcp://([\d.]+):(\d+)"', text).groups()
    with LinkProxy(("127.0.0.1", 0), (host, int(port)), rtt_ms=50) as proxy:
        for dh in ("dh1", "dh2"):
            path = configs[dh]
            path.write_text(path.read_text().replace(f"tcp://{host}:{port}", f"tcp://127.0.0.1:{proxy.port}"))
        outputs = run_nodes(tmp_path, configs)
    chosen = re.findall(r"window auto: (\d+) \(a step took ([\d.]+) ms from one to the next at window 1",
                        outputs["bank"])
    assert len(chosen) == 1, outputs["bank"]
    window, period_ms = int(chosen[0][0]), float(chosen[0][1])
    assert period_ms >= 50.0  # the link's round trip is part of every step at window 1
    assert 1 < window <= 16  # the default max_window
    for dh in ("dh1", "dh2"):
        assert re.findall(r"window auto: (\d+), as the label holder chose", outputs[dh]) == [str(window)]
    lines = [json.loads(x) for x in (tmp_path / "model" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and lines[-1]["window"] == window


def test_the_breast_demo_through_a_50_ms_link_with_window_auto_and_int8(tmp_path):
    """Issue 15's end-to-end case: `vfl demo breast` configs, the data holder behind a 50 ms link, window "auto"
    and int8 both ways: the run completes, and every node logs the same window and the same precision."""
    import subprocess
    import sys

    run = tmp_path / "breast"
    done = subprocess.run([sys.executable, "-m", "vfl", "demo", "breast", "--prepare-only", "--window", "auto",
                           "--out", str(run)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    bank, dh1 = run / "bank.toml", run / "dh1.toml"
    host, port = re.search(r'endpoint = "tcp://([\d.]+):(\d+)"', bank.read_text()).groups()
    with LinkProxy(("127.0.0.1", 0), (host, int(port)), rtt_ms=50) as proxy:
        for path in (bank, dh1):
            text = path.read_text().replace("[session]\n", '[session]\nactivation_precision = "int8"\n'
                                                          'gradient_precision = "int8"\n', 1)
            if path == dh1:
                text = text.replace(f"tcp://{host}:{port}", f"tcp://127.0.0.1:{proxy.port}")
            path.write_text(text)
        launched = subprocess.run([sys.executable, "-m", "vfl", "launch", str(run)], capture_output=True, text=True,
                                  timeout=300)
    out = launched.stdout + launched.stderr
    assert launched.returncode == 0, out
    windows = {party: re.findall(rf"vfl\[{party}\] INFO window auto: (\d+)", out) for party in ("bank", "dh1")}
    assert len(windows["bank"]) == 1 and windows["dh1"] == windows["bank"], windows
    assert int(windows["bank"][0]) > 1
    for party in ("bank", "dh1"):
        assert len(re.findall(rf"vfl\[{party}\] INFO cut-layer precision: activations int8, gradients int8", out)) == 1
    summary = json.loads((run / "summary.json").read_text())
    assert summary["ok"] and summary["window"] == int(windows["bank"][0]) and summary["final"]["val_auc"] > 0.9
