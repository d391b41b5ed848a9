"""Section 11 in memory with numpy fakes for the segments: order, window, validation, tensors, checkpoints."""

from __future__ import annotations

import numpy as np
import pytest

from vfl.protocol import Backward, Checkpoint, CheckpointDone, Epoch, ErrorCode, EvalForward, Forward, Schedule
from vfl.protocol import RemoteProtocolError, Tensor, TrainingDone
from vfl.protocol.training_phase import DataHolderTraining, LabelHolderTraining, TrainPlan

B, WIDTH = 4, 3


class FakeBottom:
    def __init__(self):
        self.calls, self.saved = [], {}

    def forward(self, step, rows, train):
        self.calls.append(("forward", step, train))
        return np.full((len(rows), WIDTH), float(step), dtype=np.float32)

    def backward(self, step, gradient):
        self.calls.append(("backward", step))

    def checkpoint(self, step, epoch, keep=False):
        self.saved[step] = epoch
        if keep:
            self.kept = step
        return f"digest-{step}"

    def restore(self, step, digest):
        self.calls.append(("restore", step, digest))


class FakeTop:
    def __init__(self):
        self.steps, self.evals, self.commits = [], [], []

    def train_step(self, step, rows, activations):
        self.steps.append(step)
        return {p: np.ones_like(a) for p, a in activations.items()}

    def eval_batch(self, epoch, rows, activations):
        self.evals.append((epoch, len(rows)))

    def end_epoch(self, epoch):
        return {"val_accuracy": 1.0}

    def checkpoint(self, step, epoch, keep=False):
        return f"top-{step}"

    def commit(self, step, epoch, digests, best=None):
        self.commits.append((step, dict(digests)))
        self.best = best

    def restore(self, step, digest=None):
        self.restored = (step, digest)


def to_data_holder(d: DataHolderTraining, m) -> CheckpointDone | None:
    """Hand one label-holder message to ``d``; a CHECKPOINT's answer is returned."""
    if isinstance(m, Schedule):
        d.on_schedule(m)
    elif isinstance(m, Epoch):
        d.on_epoch(m)
    elif isinstance(m, Backward):
        d.on_backward(m)
    elif isinstance(m, Checkpoint):
        return d.on_checkpoint(m)
    elif isinstance(m, TrainingDone):
        d.on_training_done(m)
    return None


def deliver(t: LabelHolderTraining, d: DataHolderTraining, m) -> None:
    """One message from the label holder ``t`` to the data holder ``d`` (a CHECKPOINT's answer goes straight back)."""
    answer = to_data_holder(d, m)
    if answer is not None:
        t.on_checkpoint_done("dh1", answer)


def plan(n_train=10, n_val=5, epochs=2, every=0):
    rng = np.random.default_rng(0)
    return TrainPlan(validation=np.arange(n_train, n_train + n_val),
                     epoch_orders=[rng.permutation(n_train) for _ in range(epochs)], checkpoint_every=every)


def lh(window=1, **kw):
    return LabelHolderTraining(FakeTop(), plan(**kw), parties=["dh1"], widths={"dh1": WIDTH}, batch_size=B,
                               window=window, n_rows=20)


def fwd(step, rows=B, value=0.0, dtype=np.float32):
    return Forward(step=step, tensors=(Tensor("activations", np.full((rows, WIDTH), value, dtype=dtype)),))


def test_X1_schedule_then_epoch_with_explicit_rows():
    t = lh()
    msgs = t.start()["dh1"]
    assert [m.TYPE for m in msgs] == ["SCHEDULE", "CHECKPOINT", "EPOCH"]
    sched, epoch = msgs[0], msgs[2]
    assert sched.first_step == 0 and list(sched.tensor_list[0].array) == list(range(10, 15))
    assert epoch.epoch == 0 and epoch.first_step == 0 and len(epoch.tensor_list[0].array) == 10


def test_X2_a_forward_beyond_the_window_or_out_of_order_is_refused():
    t = lh(window=2)
    t.start()
    t.on_forward("dh1", fwd(0))
    t2 = lh(window=2)
    t2.start()
    with pytest.raises(RemoteProtocolError) as info:
        t2.on_forward("dh1", fwd(1))  # step 0 skipped
    assert info.value.code is ErrorCode.UNEXPECTED_MESSAGE
    t3 = lh(window=1)
    t3.start()
    t3._inbox["dh1"].forwards[0] = np.zeros((B, WIDTH), np.float32)  # pretend step 0 is waiting on another party
    t3._inbox["dh1"].next_forward = 1
    with pytest.raises(RemoteProtocolError, match="exceeds the window"):
        t3.on_forward("dh1", fwd(1))


def test_X2_a_data_holder_never_has_more_than_window_forwards_in_flight():
    d = DataHolderTraining(FakeBottom(), n_rows=20, batch_size=B, window=2, width=WIDTH)
    t = lh(window=2)
    for m in t.start()["dh1"]:
        if isinstance(m, Schedule):
            d.on_schedule(m)
        elif isinstance(m, Epoch):
            d.on_epoch(m)
    sent = []
    while d.has_work:
        sent += d.work()
    assert [m.step for m in sent] == [0, 1]  # the window is full: nothing more until a BACKWARD


def test_X3_steps_are_processed_in_order_once_every_party_has_sent():
    t = LabelHolderTraining(FakeTop(), plan(), parties=["dh1", "dh2"], widths={"dh1": WIDTH, "dh2": WIDTH},
                            batch_size=B, window=2, n_rows=20)
    t.start()
    out, _ = t.on_forward("dh1", fwd(0))
    assert out == {"dh1": [], "dh2": []} and t.top.steps == []
    out, _ = t.on_forward("dh2", fwd(0))
    assert t.top.steps == [0] and [m.TYPE for m in out["dh1"]] == ["BACKWARD"] == [m.TYPE for m in out["dh2"]]


def test_X5_validation_follows_the_last_backward_of_the_epoch_then_the_next_epoch_opens():
    d = DataHolderTraining(FakeBottom(), n_rows=20, batch_size=B, window=1, width=WIDTH)
    t = lh(window=1)
    inbox = list(t.start()["dh1"])
    metrics = []
    for _ in range(200):
        while inbox:
            deliver(t, d, inbox.pop(0))
        if not d.has_work:
            break
        for m in d.work():
            out, done = t.on_eval("dh1", m) if isinstance(m, EvalForward) else t.on_forward("dh1", m)
            inbox += out["dh1"]
            metrics += done
    assert t.done and len(metrics) == 2
    assert t.top.evals == [(0, 4), (0, 1), (1, 4), (1, 1)]  # 5 validation rows in batches of 4
    calls = d.bottom.calls
    last_train_backward = max(i for i, c in enumerate(calls) if c[0] == "backward" and c[1] == 2)
    first_eval = min(i for i, c in enumerate(calls) if c[0] == "forward" and c[2] is False)
    assert first_eval > last_train_backward  # validated on the weights after the epoch's last step


@pytest.mark.parametrize(
    "bad",
    [fwd(0, dtype=np.float64), fwd(0, rows=B - 1), fwd(0, value=np.nan),
     Forward(step=0, tensors=(Tensor("other", np.zeros((B, WIDTH), np.float32)),))],
)
def test_X6_activations_of_the_wrong_dtype_shape_or_value_are_BAD_TENSOR(bad):
    t = lh()
    t.start()
    with pytest.raises(RemoteProtocolError) as info:
        t.on_forward("dh1", bad)
    assert info.value.code is ErrorCode.BAD_TENSOR


def test_X7_a_checkpoint_is_saved_after_every_earlier_step_and_committed_when_all_answered():
    d = DataHolderTraining(FakeBottom(), n_rows=20, batch_size=B, window=2, width=WIDTH)
    t = lh(window=2, every=2, n_train=12, n_val=4)
    msgs = t.start()["dh1"]
    d.on_schedule(msgs[0])
    done = d.on_checkpoint(msgs[1])
    assert done == CheckpointDone(step=0, digest="digest-0")
    t.on_checkpoint_done("dh1", done)
    assert t.top.commits == [(0, {"dh1": "digest-0", "": "top-0"})] and t.latest_checkpoint == 0
    d.on_epoch(msgs[2])
    with pytest.raises(RemoteProtocolError, match="has applied 0 steps"):
        d.on_checkpoint(Checkpoint(step=2, epoch=0))  # steps 0 and 1 not applied yet
