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
