"""A curious data holder: ``python -m tests.node.privacy_attacker RECORD.npz vfl node --config dh1.toml``.

It is vfl's own data holder, unchanged on the wire, whose bottom segment also records what the label holder sends
it: for every training step the aligned rows of its batch and the gradient it received for them. As the node exits
(``os._exit``, which skips ``atexit``) it writes them to ``RECORD.npz`` (``step``, ``rows`` and ``grad``, one entry per row), for a test to attack afterwards, the way
a data holder could. Only what this process receives anyway is recorded; nothing comes from the label holder's files.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from vfl.train import segments


def main() -> None:
    record, argv = sys.argv[1], sys.argv[2:]
    steps: list[np.ndarray] = []
    rows: list[np.ndarray] = []
    grads: list[np.ndarray] = []
    batch_rows: dict[int, np.ndarray] = {}
    forward, backward = segments.TorchBottom.forward, segments.TorchBottom.backward

    def recording_forward(self, step, batch, train):
        if train:
            batch_rows[step] = np.array(batch, dtype=np.int64)
        return forward(self, step, batch, train)

    def recording_backward(self, step, gradient):
        received = np.array(gradient, dtype=np.float32)  # the wire's bytes, before the segment touches them
        steps.append(np.full(len(received), step, dtype=np.int64))
        rows.append(batch_rows.pop(step))
        grads.append(received)
        return backward(self, step, gradient)

    def save() -> None:
        width = grads[0].shape[1] if grads else 0
        np.savez(record, step=np.concatenate(steps) if steps else np.zeros(0, np.int64),
                 rows=np.concatenate(rows) if rows else np.zeros(0, np.int64),
                 grad=np.concatenate(grads) if grads else np.zeros((0, width), np.float32))

    exit_now = os._exit

    def save_then_exit(code: int) -> None:
        save()
        exit_now(code)

    segments.TorchBottom.forward, segments.TorchBottom.backward = recording_forward, recording_backward
    os._exit = save_then_exit
    sys.argv = ["vfl", *argv]
    from vfl.cli import main as vfl_main

    vfl_main()


if __name__ == "__main__":
    main()
