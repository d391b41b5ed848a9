"""The bytes a node sent, per message type, logged at exit next to the total (issue 15: bytes per step).

One short training session of test_training_nodes (three parties over loopback, PSI, one epoch): every node logs
``sent by type: {...}`` (compact JSON, sorted keys) just before its exit line, the types add up to the total of
``sent N bytes``, the data holders' step messages are FORWARDs and the label holder's BACKWARDs.
"""

from __future__ import annotations

import json
import re

from .test_training_nodes import run_nodes, training_session

BY_TYPE = re.compile(r"sent by type: (\{.*\})$")
TOTAL = re.compile(r"\(exit (-?\d+); sent (\d+) bytes, received (\d+) bytes\)$")


def test_every_node_logs_its_sent_bytes_per_message_type_and_they_add_up_to_the_total(tmp_path):
    configs, _ = training_session(tmp_path, window=2, epochs=1)
    outputs = run_nodes(tmp_path, configs, timeout=120)
    steps = json.loads((tmp_path / "model" / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert steps > 0
    for name, text in outputs.items():
        lines = [line for line in text.splitlines() if line.strip()]
        found = [(i, BY_TYPE.search(line)) for i, line in enumerate(lines) if BY_TYPE.search(line)]
        assert len(found) == 1, (name, text)
        i, m = found[0]
        total = TOTAL.search(lines[i + 1])  # the exit line comes right after, unchanged
        assert total is not None and total.group(1) == "0", (name, lines[i:])
        raw = m.group(1)
        by_type = json.loads(raw)
        assert raw == json.dumps(by_type, sort_keys=True, separators=(",", ":")), raw
        assert all(isinstance(v, int) and v > 0 for v in by_type.values()), by_type
        assert sum(by_type.values()) == int(total.group(2)), (name, by_type, total.group(0))
        if name == "bank":
            assert by_type.get("BACKWARD", 0) > 0 and "FORWARD" not in by_type, by_type
            assert by_type.get("EPOCH", 0) > 0, by_type
        else:
            assert by_type.get("FORWARD", 0) > 0 and "BACKWARD" not in by_type, by_type
            # one FORWARD per training step, each at least its 4-wide float32 activations for one row
            assert by_type["FORWARD"] >= steps * 4 * 4, (by_type, steps)
