"""A label holder that dies (``kill -9`` on itself) right between the best epoch's validation and the commit of the
checkpoint that keeps it: ``python -m tests.node.crash_at_commit vfl node --config bank.toml``.

It is vfl's own node, unchanged, except that ``Checkpointer.commit`` sends this process SIGKILL when it is about to
commit the checkpoint of a new best epoch other than the first one ([train].keep = "best"). By then every party has
written that checkpoint with ``keep`` (and its ``PARTY-kept.json``), but the manifest still names the previous
checkpoint and the previous best epoch: the window a crash can hit between "epoch N done" and the next commit.
"""

from __future__ import annotations

import os
import signal
import sys

from vfl.node import checkpoints


def main() -> None:
    argv = sys.argv[1:]
    commit = checkpoints.Checkpointer.commit

    def crashing_commit(self, step, epoch, digests, best=None):
        if best is not None and best["step"] == step and best["epoch"] >= 1:
            print(f"crash_at_commit: SIGKILL before committing step {step}, the best epoch {best['epoch'] + 1}",
                  flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return commit(self, step, epoch, digests, best)

    checkpoints.Checkpointer.commit = crashing_commit
    sys.argv = ["vfl", *argv]
    from vfl.cli import main as vfl_main

    vfl_main()


if __name__ == "__main__":
    main()
