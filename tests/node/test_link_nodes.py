"""Training through the shaped link (`vfl link-proxy`): CurveZMQ end to end through the relay, the same model.

At W = 1 the result cannot depend on the link: a session whose data holders connect through 20 ms and 100 Mbit/s
ends with exactly the metrics and segments of the same session on plain loopback."""

from __future__ import annotations

import re

import pytest

from vfl.launch.link import LinkProxy

from .test_lifecycle_keep_best import same_tensors, segment
from .test_training_nodes import read_metrics, run_nodes, training_session


@pytest.mark.parametrize("rtt_ms, mbit", [(20.0, 100.0)])
def test_a_session_through_a_shaped_link_trains_exactly_as_on_loopback(tmp_path, rtt_ms, mbit):
    direct, shaped = tmp_path / "direct", tmp_path / "shaped"
    direct.mkdir(), shaped.mkdir()
    run_nodes(direct, training_session(direct, window=1, epochs=2)[0])
    configs, _ = training_session(shaped, window=1, epochs=2)
    text = configs["bank"].read_text()
    host, port = re.search(r'endpoint = "tcp://([\d.]+):(\d+)"', text).groups()
    with LinkProxy(("127.0.0.1", 0), (host, int(port)), rtt_ms=rtt_ms, mbit=mbit) as proxy:
        for dh in ("dh1", "dh2"):  # the data holders dial the relay; the label holder binds as before
            path = configs[dh]
            path.write_text(path.read_text().replace(f"tcp://{host}:{port}", f"tcp://127.0.0.1:{proxy.port}"))
        run_nodes(shaped, configs)
        assert proxy.connections >= 2 and proxy.bytes > 0
    assert read_metrics(shaped / "model" / "metrics.jsonl") == read_metrics(direct / "model" / "metrics.jsonl")
    for party, part in (("bank", "top"), ("dh1", "model"), ("dh2", "model")):
        assert same_tensors(segment(shaped / "model" / f"{party}-segment.pt")[part],
                            segment(direct / "model" / f"{party}-segment.pt")[part]), party
