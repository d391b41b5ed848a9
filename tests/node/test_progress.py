"""The label holder's progress display: honest rates, a tqdm bar on a terminal, a few plain log lines otherwise."""

import io
import logging
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vfl.node.progress import MIN_RATE_S, PLAIN_EVERY_S, QUARTER_STEPS, Progress, Throughput, Totals
from vfl.protocol.training_phase import LabelHolderTraining, TrainingProgress, TrainPlan


def snapshot(step, steps=40, epochs=4, samples=None, done=False) -> TrainingProgress:
    per = steps // epochs
    return TrainingProgress(epoch=min(step // per, epochs - 1), epochs=epochs, epoch_step=step % per,
                            epoch_steps=per, step=step, steps=steps,
                            samples=32 * step if samples is None else samples, done=done)


class Records(logging.Handler):
    """The log records a logger emitted (a real handler on a real logger)."""

    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def logger(name: str) -> tuple[logging.Logger, Records]:
    log = logging.getLogger(f"vfl.test.progress.{name}")
    log.handlers[:] = []
    log.propagate = False
    log.setLevel(logging.INFO)
    records = Records()
    log.addHandler(records)
    return log, records


# ------------------------------------------------------------------------------------------------- the figures


def test_no_rate_over_less_than_the_minimum_time_however_many_samples():
    """The old display divided by 1e-9 s when it first saw an epoch after some steps: 192,000,000,000 samples/s."""
    assert Totals(192, 1e-9).rate is None
    assert Totals(10_000, MIN_RATE_S * 0.99).rate is None
    assert Totals(0, 10.0).rate is None
    assert Totals(3000, 2.0).rate == 1500


def test_the_count_starts_at_the_first_reading_not_at_zero():
    """Steps finished before the meter's first reading are neither counted nor timed."""
    m = Throughput()
    m.observe(samples=6 * 32, now=100.0)  # the loop first looked after six steps
    m.observe(samples=6 * 32 + 1000, now=102.0)
    assert m.totals == Totals(1000, 2.0) and m.totals.rate == 500


def test_a_rolled_back_pipeline_opens_a_new_segment_and_the_wait_between_is_not_counted():
    m = Throughput()
    m.observe(0, 10.0)
    m.observe(3000, 13.0)  # 1000 samples/s
    m.observe(0, 73.0)  # a data holder rejoined after a minute: a new pipeline counts from 0
    m.observe(2000, 75.0)
    assert m.totals == Totals(5000, 5.0)
    assert m.recent == Totals(2000, 2.0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0.001, 0.5), st.integers(0, 64)), min_size=1, max_size=200))
def test_the_recent_rate_is_the_samples_over_the_time_of_the_readings_it_spans(steps):
    """Whatever the pacing: recent covers at most the window plus one reading, and totals add up exactly."""
    m = Throughput(window_s=5.0)
    now, samples = 1000.0, 0
    m.observe(samples, now)
    for dt, n in steps:
        now, samples = now + dt, samples + n
        m.observe(samples, now)
    assert m.totals.samples == samples and abs(m.totals.seconds - (now - 1000.0)) < 1e-6
    recent = m.recent
    assert 0 <= recent.samples <= samples and recent.seconds <= 5.0 + 0.5 + 1e-9
    if recent.rate is not None:
        assert recent.seconds >= MIN_RATE_S and recent.rate <= 64 / 0.001 + 1


def fake_top():
    class Top:
        def train_step(self, step, rows, activations):
            return {"dh1": np.zeros((len(rows), 2), np.float32)}

        def eval_batch(self, epoch, rows, activations):
            pass

        def end_epoch(self, epoch):
            return {"train_loss": 0.5}

        def checkpoint(self, step, epoch):
            return "0" * 64

        def commit(self, step, epoch, digests):
            pass

        def restore(self, step):
            pass

    return Top()


def test_the_pipeline_counts_each_step_at_its_true_size_the_short_last_batch_too():
    """100 training rows in batches of 32: steps of 32, 32, 32 and 4, so 100 samples an epoch, not 128."""
    from vfl.protocol.messages import Forward, Tensor

    plan = TrainPlan(validation=np.empty(0, np.int64), epoch_orders=[np.arange(100), np.arange(100)],
                     checkpoints=False)
    t = LabelHolderTraining(fake_top(), plan, parties=["dh1"], widths={"dh1": 2}, batch_size=32, window=1,
                            n_rows=100)
    t.start()
    assert t.progress == TrainingProgress(epoch=0, epochs=2, epoch_step=0, epoch_steps=4, step=0, steps=8,
                                          samples=0, done=False)
    for step, size in enumerate([32, 32, 32, 4, 32, 32, 32, 4]):
        t.on_forward("dh1", Forward(step=step, tensors=(Tensor("activations", np.zeros((size, 2), np.float32)),)))
        if t.unsettled:  # as the node does once the step's BACKWARDs are out: the epoch it ended closes
            t.settle()
        if step == 3:
            assert t.progress.samples == 100 and t.progress.epoch == 1 and t.progress.epoch_step == 0
    assert t.progress.samples == 200 and t.progress.done and t.progress.step == 8


# ------------------------------------------------------------------------------------------------- plain lines


def test_plain_log_lines_at_most_every_few_seconds_and_none_for_a_short_run():
    log, records = logger("plain")
    p = Progress(log, stream=io.StringIO(), tty=False)
    for step in range(40):  # a whole run in 0.4 s: no progress line, only the final figure
        p.update(snapshot(step), 0.5, now=100.0 + step * 0.01)
    p.update(snapshot(40, done=True), 0.5, now=100.4)
    assert records.lines == ["training throughput: 1280 samples in 0.400 s of training (under 1 s: too short for a "
                             "rate)"]

    log, records = logger("plain-slow")
    p = Progress(log, stream=io.StringIO(), tty=False)
    for step in range(40):  # 2 s a step: 80 s
        p.update(snapshot(step), 0.25, now=step * 2.0)
    lines = [line for line in records.lines if line.startswith("epoch")]
    assert len(lines) == int(78 // PLAIN_EVERY_S), records.lines
    assert lines[0] == "epoch 1: 5/10 steps, loss 0.2500, 16 samples/s over the last 6 s"
    p.update(snapshot(40, done=True), 0.25, now=80.0)
    assert records.lines[-1] == "training throughput: 1280 samples in 80.000 s of training: 16 samples/s"
    p.update(snapshot(40, done=True), 0.25, now=81.0)
    assert len([line for line in records.lines if line.startswith("training throughput")]) == 1


def test_plain_lines_at_each_quarter_of_a_long_epoch_without_the_last_which_the_epoch_line_says():
    log, records = logger("quarters")
    p = Progress(log, stream=io.StringIO(), tty=False)
    steps = 2 * QUARTER_STEPS
    for step in range(2 * steps):  # 1 ms a step: quick, but long in steps
        p.update(snapshot(step, steps=2 * steps, epochs=2), None, now=step * 0.001)
    assert [line.split(",")[0] for line in records.lines] == [
        f"epoch {e}: {q * steps // 4}/{steps} steps" for e in (1, 2) for q in (1, 2, 3)]


# ------------------------------------------------------------------------------------------------- the bar


class Terminal(io.StringIO):
    def isatty(self):
        return True


def screen(text: str) -> list[str]:
    """What a terminal shows: each carriage return rewinds the line; erased bars and blank lines dropped."""
    shown = []
    for line in text.split("\n"):
        visible = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", line).split("\r")[-1].rstrip()
        shown.append(visible)
    return [line for line in shown if line]


def test_log_lines_print_above_the_bar_never_glued_onto_it_and_the_bar_is_erased_at_the_end():
    term = Terminal()
    log = logging.getLogger("vfl.test.progress.tty")
    log.propagate = False
    handler = logging.StreamHandler(term)
    handler.setFormatter(logging.Formatter("vfl[bank] %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    p = Progress(log, stream=term)
    assert p.tty
    for step in range(40):
        p.update(snapshot(step), 0.5, now=step * 0.5)
        if step % 10 == 9:
            log.info("epoch %d of 4 done", step // 10 + 1)
    assert "epoch 4/4" in term.getvalue() and "steps" in term.getvalue()
    assert "samples/s" in term.getvalue()  # over more than a second: a rate is shown
    p.update(snapshot(40, done=True), 0.5, now=20.0)
    log.info("saved this party's segment")
    assert log.handlers == [handler]  # the node's own handler is back
    assert screen(term.getvalue()) == [
        "vfl[bank] epoch 1 of 4 done", "vfl[bank] epoch 2 of 4 done", "vfl[bank] epoch 3 of 4 done",
        "vfl[bank] epoch 4 of 4 done", "vfl[bank] training throughput: 1280 samples in 20.000 s of training: "
        "64 samples/s", "vfl[bank] saved this party's segment",
    ]


def test_an_interrupted_run_erases_its_bar_when_logging_shuts_down():
    term = Terminal()
    log = logging.getLogger("vfl.test.progress.interrupted")
    log.propagate = False
    handler = logging.StreamHandler(term)
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    p = Progress(log, stream=term)
    p.update(snapshot(3), None, now=1.0)
    log.warning("stopped by SIGINT")
    for h in list(log.handlers):  # what logging.shutdown() does at exit
        h.flush()
        h.close()
    assert screen(term.getvalue()) == ["stopped by SIGINT"]
    assert term.getvalue().endswith("\r") or "\x1b[A" in term.getvalue() or term.getvalue().endswith("\n")


def test_step_seconds_cover_the_steps_alone_not_the_validation_between_epochs():
    """The machine times each epoch from its EPOCH to its last step on the node's clock: 4 steps of 0.5 s an epoch,
    then 10 s of validation that are not counted."""
    from vfl.protocol.messages import EvalForward, Forward, Tensor

    plan = TrainPlan(validation=np.arange(100, 132), epoch_orders=[np.arange(100), np.arange(100)],
                     checkpoints=False)
    t = LabelHolderTraining(fake_top(), plan, parties=["dh1"], widths={"dh1": 2}, batch_size=32, window=1,
                            n_rows=132)
    now = 50.0
    t.start(now)
    step = 0
    for epoch in range(2):
        for size in (32, 32, 32, 4):
            now += 0.5
            t.on_forward("dh1", Forward(step=step, tensors=(Tensor("activations", np.zeros((size, 2), np.float32)),)),
                         now)
            step += 1
        now += 10.0  # validation
        t.on_eval("dh1", EvalForward(epoch=epoch, batch=0, tensors=(Tensor("activations", np.zeros((32, 2),
                                                                                                    np.float32)),)), now)
    assert t.done and t.progress.step_seconds == pytest.approx(4.0)
    m = Throughput()
    m.observe(0, 50.0, 0.0)
    m.observe(t.progress.samples, now, t.progress.step_seconds)
    assert m.totals == Totals(200, now - 50.0, pytest.approx(4.0)) and m.totals.step_rate == pytest.approx(50.0)


def test_the_final_line_names_both_figures_and_what_each_covers():
    log, records = logger("both")
    p = Progress(log, stream=io.StringIO(), tty=False)
    p.update(snapshot(0), None, 10.0)
    done = TrainingProgress(epoch=1, epochs=2, epoch_step=4, epoch_steps=4, step=8, steps=8, samples=3000, done=True,
                            step_seconds=1.5)
    p.update(done, None, 13.0)
    assert records.lines[-1] == ("training throughput: 3000 samples in 3.000 s of training: 1,000 samples/s; steps "
                                 "alone (no validation or checkpoints) 1.500 s: 2,000 samples/s")
