"""The label holder's progress display: a bar per epoch on a terminal, a few plain lines otherwise.

Reads the training state the machine keeps (step, the epoch's bounds) and the losses the top segment records; it
draws at most a few times a second, so it costs nothing on the training path.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

BAR = 24
REDRAW_S = 0.2


class Progress:
    def __init__(self, stream: TextIO | None = None, *, tty: bool | None = None, batch_size: int = 1):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.batch_size = batch_size
        self._epoch = None
        self._epoch_start = 0.0
        self._drawn = 0.0
        self._quarter = 0

    def update(self, epoch: int, done: int, total: int, loss: float | None, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if epoch != self._epoch:
            self._epoch, self._epoch_start, self._quarter = epoch, now, 0
        elapsed = max(now - self._epoch_start, 1e-9)
        rate = done * self.batch_size / elapsed
        loss_text = "" if loss is None else f"  loss {loss:.4f}"
        if self.tty:
            if now - self._drawn < REDRAW_S and done < total:
                return
            self._drawn = now
            filled = int(BAR * done / max(total, 1))
            self.stream.write(
                f"\r  epoch {epoch + 1} [{'#' * filled}{'.' * (BAR - filled)}] {done}/{total} steps  "
                f"{rate:,.0f} samples/s{loss_text}   "
            )
            if done >= total:
                self.stream.write("\n")
            self.stream.flush()
            return
        quarter = 4 * done // max(total, 1)
        if quarter > self._quarter:  # plain lines at 25 %, 50 %, 75 % and 100 % of each epoch
            self._quarter = quarter
            self.stream.write(f"  epoch {epoch + 1}: {done}/{total} steps, {rate:,.0f} samples/s{loss_text}\n")
            self.stream.flush()
