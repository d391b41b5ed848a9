"""The label holder's progress display and its throughput figures.

On a terminal: one tqdm bar over the whole training, redrawn at most every ``REDRAW_S``, with the node's log lines
printed above it (never glued onto it); the bar is erased when training ends or the process exits, so what stays on
screen is the log. Elsewhere (a log file, CI, a `vfl launch` child): plain log lines, at 25, 50 and 75 % of
an epoch of ``QUARTER_STEPS`` steps or more, and after ``PLAIN_EVERY_S`` without one; a short epoch gets none, the
runner's "epoch k of N done" line says enough.

Rates are honest: samples are counted per whole training step at the step's true size (the short last batch as
short as it is, see :class:`vfl.protocol.training_phase.TrainingProgress`), timed with the monotonic clock the
caller passes in as ``now``, and a rate over less than ``MIN_RATE_S`` of training is never shown. Two figures, each
labelled for what it covers: the training phase (its steps, and the validation and checkpoints between epochs), and
the steps alone (``TrainingProgress.step_seconds``, timed by the label holder's machine on the same clock).
"""

from __future__ import annotations

import logging
import sys
from collections import deque
from dataclasses import dataclass
from typing import TextIO

from ..protocol.training_phase import TrainingProgress

REDRAW_S = 0.2  # the bar is redrawn at most this often
PLAIN_EVERY_S = 10.0  # without a terminal: a progress line after this long without one
QUARTER_STEPS = 50  # ... and at a quarter, half and three quarters of an epoch of at least this many steps
MIN_RATE_S = 1.0  # no rate is shown over less training time than this: the loop samples the step count every ~10 ms
WINDOW_S = 5.0  # the rate on the bar and in the plain lines covers about the last this many seconds


@dataclass(frozen=True)
class Totals:
    """The whole training so far: samples of whole steps, the training time they took, and of that the time of
    the steps alone (``TrainingProgress.step_seconds``: no validation, no checkpoints between epochs)."""

    samples: int
    seconds: float
    step_seconds: float = 0.0

    @property
    def rate(self) -> float | None:
        """Samples per second, or None over less than ``MIN_RATE_S`` (too short to mean anything)."""
        return self.samples / self.seconds if self.seconds >= MIN_RATE_S and self.samples else None

    @property
    def step_rate(self) -> float | None:
        """Samples per second of step time alone, or None over less than ``MIN_RATE_S`` of it."""
        return self.samples / self.step_seconds if self.step_seconds >= MIN_RATE_S and self.samples else None


class Throughput:
    """Training throughput from (samples done, ``now``) readings; pure: the caller reads the clock.

    The time counted runs from the first reading of a pipeline to its last, so it covers the training steps and
    what the training phase does between them (validation, checkpoints), not process start or PSI. A pipeline that
    is rolled back (a party rejoined) starts its count again from 0: the meter then opens a new segment, and the
    wait for the rejoin between the two is not counted.
    """

    def __init__(self, window_s: float = WINDOW_S):
        self.window_s = window_s
        self._done = Totals(0, 0.0)  # closed segments
        self._first: tuple[float, int, float] | None = None  # (now, samples, step_seconds) of the first reading
        self._readings: deque[tuple[float, int]] = deque()  # this segment's recent readings, oldest first
        self._step_seconds = 0.0  # the pipeline's step_seconds at the latest reading

    def observe(self, samples: int, now: float, step_seconds: float = 0.0) -> None:
        last = self._readings[-1] if self._readings else None
        if last is not None and (samples < last[1] or now < last[0]):  # a new pipeline: close this segment
            self._done = self._segment_totals(self._done)
            self._first, last = None, None
            self._readings.clear()
        if self._first is None:
            self._first = (now, samples, step_seconds)
        self._step_seconds = step_seconds
        self._readings.append((now, samples))
        while len(self._readings) > 2 and self._readings[1][0] <= now - self.window_s:
            self._readings.popleft()  # keep one reading at or before the window's start

    def _segment_totals(self, base: Totals) -> Totals:
        if self._first is None or not self._readings:
            return base
        (t0, s0, d0), (t1, s1) = self._first, self._readings[-1]
        return Totals(base.samples + s1 - s0, base.seconds + t1 - t0, base.step_seconds + self._step_seconds - d0)

    @property
    def totals(self) -> Totals:
        return self._segment_totals(self._done)

    @property
    def recent(self) -> Totals:
        """About the last ``window_s`` of this segment."""
        if len(self._readings) < 2:
            return Totals(0, 0.0)
        (t0, s0), (t1, s1) = self._readings[0], self._readings[-1]
        return Totals(s1 - s0, t1 - t0)


def rate_text(t: Totals) -> str:
    rate = t.rate
    return "" if rate is None else f"{rate:,.0f} samples/s"


class Progress:
    """Fed a :class:`TrainingProgress` and ``now`` by the node loop; shows it and logs the final throughput."""

    def __init__(self, log: logging.Logger, *, stream: TextIO | None = None, tty: bool | None = None):
        self.log = log
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.meter = Throughput()
        self.finished = False
        self._bar = None
        self._swapped: list[tuple[logging.Logger, logging.Handler, logging.Handler]] = []
        self._drawn: float | None = None
        self._plain_at: float | None = None
        self._epoch: int | None = None
        self._quarter = 0

    def update(self, p: TrainingProgress, loss: float | None, now: float) -> None:
        if self.finished:
            return
        self.meter.observe(p.samples, now, p.step_seconds)
        if p.done:
            self.finish()
            return
        if self.tty:
            self._draw(p, loss, now)
            return
        if self._plain_at is None:
            self._plain_at = now + PLAIN_EVERY_S
        if p.epoch != self._epoch:
            self._epoch, self._quarter = p.epoch, 0
        quarter = 4 * p.epoch_step // p.epoch_steps if p.epoch_steps >= QUARTER_STEPS else 0
        if 0 < quarter < 4 and quarter > self._quarter or now >= self._plain_at:
            self._quarter = max(self._quarter, quarter)
            self._plain_at = now + PLAIN_EVERY_S
            self.log.info("%s", plain_line(p, loss, self.meter.recent))

    def finish(self) -> None:
        """Training is over: erase the bar, log what the training phase achieved (once)."""
        if self.finished:
            return
        self.finished = True
        self.close()
        t = self.meter.totals
        rate = rate_text(t)
        how = f": {rate}" if rate else f" (under {MIN_RATE_S:g} s: too short for a rate)"
        steps = t.step_rate
        if steps is not None:
            how += f"; steps alone (no validation or checkpoints) {t.step_seconds:.3f} s: {steps:,.0f} samples/s"
        elif t.step_seconds > 0:
            how += f"; steps alone {t.step_seconds:.3f} s (too short for a rate)"
        self.log.info("training throughput: %d samples in %.3f s of training%s", t.samples, t.seconds, how)

    def close(self) -> None:
        """Erase the bar and give the log its own handlers back; safe to call more than once."""
        for logger, original, ours in reversed(self._swapped):
            logger.removeHandler(ours)
            logger.addHandler(original)
        self._swapped.clear()
        if self._bar is not None:
            bar, self._bar = self._bar, None
            bar.close()

    # ------------------------------------------------------------------------------------------- terminal

    def _draw(self, p: TrainingProgress, loss: float | None, now: float) -> None:
        if self._drawn is not None and now - self._drawn < REDRAW_S:
            return
        self._drawn = now
        if self._bar is None:
            self._open_bar(p)
        bar = self._bar
        bar.n = p.step
        bar.set_description_str(f"epoch {p.epoch + 1}/{p.epochs}", refresh=False)
        extras = [f"loss {loss:.4f}"] if loss is not None else []
        rate = rate_text(self.meter.recent)
        bar.set_postfix_str(", ".join(extras + ([rate] if rate else [])), refresh=False)
        bar.refresh()

    def _open_bar(self, p: TrainingProgress) -> None:
        from tqdm import tqdm

        self._bar = tqdm(
            total=p.steps, initial=p.step, file=self.stream, leave=False, dynamic_ncols=True, unit="step",
            desc=f"epoch {p.epoch + 1}/{p.epochs}",
            bar_format="{desc} {bar} {n_fmt}/{total_fmt} steps [{elapsed}<{remaining}{postfix}]",
            mininterval=REDRAW_S,
        )
        # tqdm's logging integration: every handler that writes to our terminal goes through tqdm.write, which
        # clears the bar, prints the line and redraws the bar below it
        logger: logging.Logger | None = self.log
        while logger is not None:
            for h in list(logger.handlers):
                if isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) is self.stream:
                    ours = _AboveTheBar(self, h)
                    logger.removeHandler(h)
                    logger.addHandler(ours)
                    self._swapped.append((logger, h, ours))
            logger = logger.parent if logger.propagate else None


class _AboveTheBar(logging.Handler):
    """Prints a record above the bar (tqdm.write); closing it (``logging.shutdown`` at exit) erases the bar."""

    def __init__(self, progress: Progress, original: logging.StreamHandler):
        super().__init__(original.level)
        self.progress = progress
        self.original = original
        self.setFormatter(original.formatter)

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.original.stream)
        except Exception:  # noqa: BLE001 - logging's own rule: a failing handler never raises
            self.handleError(record)

    def close(self) -> None:
        self.progress.close()
        super().close()


def plain_line(p: TrainingProgress, loss: float | None, recent: Totals) -> str:
    parts = [f"epoch {p.epoch + 1}: {p.epoch_step}/{p.epoch_steps} steps"]
    if loss is not None:
        parts.append(f"loss {loss:.4f}")
    rate = rate_text(recent)
    if rate:
        parts.append(f"{rate} over the last {recent.seconds:.0f} s")
    return ", ".join(parts)
