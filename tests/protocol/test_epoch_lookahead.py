"""[X14] (1.7) in memory: the next epoch's EPOCH goes out with the current one, a data holder's window runs on across
the boundary, validation still comes first, and TRAINING_DONE drops the epoch sent ahead."""

from __future__ import annotations

import numpy as np
import pytest

from vfl.protocol import Backward, Checkpoint, Epoch, ErrorCode, EvalForward, RemoteProtocolError, Tensor
from vfl.protocol.training_phase import DataHolderTraining, LabelHolderTraining, TrainPlan

from .test_training_phase import B, WIDTH, FakeBottom, FakeTop, deliver, fwd, plan

# plan(): 10 training rows in batches of 4, so 3 steps an epoch (steps 0-2, 3-5, 6-8), and 5 validation rows (2 batches)


def lh(window=1, lookahead=True, top=None, **kw):
    return LabelHolderTraining(top or FakeTop(), plan(**kw), parties=["dh1"], widths={"dh1": WIDTH}, batch_size=B,
                               window=window, n_rows=20, lookahead=lookahead)


def dh(window=1, lookahead=True):
    return DataHolderTraining(FakeBottom(), n_rows=20, batch_size=B, window=window, width=WIDTH, lookahead=lookahead)


def types(msgs):
    return [m.TYPE for m in msgs]


def started(t, d):
    for m in t.start()["dh1"]:
        deliver(t, d, m)


def drain(d):
    sent = []
    for _ in range(100):
        if not d.has_work:
            break
        sent += d.work()
    return sent


def run(t, d, limit=500):
    """Both sides to the end, in rounds as across a slow link: the data holder sends all its window allows, the label
    holder answers all of it, the data holder reads every answer. Returns the data holder's messages as sent."""
    inbox, sent = list(t.start()["dh1"]), []
    for _ in range(limit):
        while inbox:
            deliver(t, d, inbox.pop(0))
        burst = drain(d)
        if not burst:
            break
        sent += burst
        for m in burst:
            out, _ = t.on_eval("dh1", m) if isinstance(m, EvalForward) else t.on_forward("dh1", m)
            inbox += out["dh1"]
    return sent


def grad(step, rows=B):
    return Backward(step=step, tensors=(Tensor("gradient", np.ones((rows, WIDTH), np.float32)),))


def epoch_0_trained():
    """A data holder (window 4, lookahead) that forwarded steps 0-3 and applied the BACKWARDs of epoch 0 (0-2)."""
    t, d = lh(window=4, epochs=3), dh(window=4)
    started(t, d)
    drain(d)
    for s in range(3):
        d.on_backward(grad(s, B if s < 2 else 2))
    return d


def test_X14_the_label_holder_sends_the_next_epochs_EPOCH_right_after_the_current_one():
    msgs = lh(epochs=3).start()["dh1"]
    assert types(msgs) == ["SCHEDULE", "CHECKPOINT", "EPOCH", "EPOCH"]
    assert (msgs[2].epoch, msgs[2].first_step) == (0, 0) and (msgs[3].epoch, msgs[3].first_step) == (1, 3)
    assert len(msgs[3].tensor_list[0].array) == 10


def test_X14_in_a_1_6_session_the_label_holder_sends_one_epoch_at_a_time():
    assert types(lh(lookahead=False, epochs=3).start()["dh1"]) == ["SCHEDULE", "CHECKPOINT", "EPOCH"]


def test_X14_the_label_holder_never_sends_an_epoch_beyond_the_schedule():
    assert types(lh(epochs=1).start()["dh1"]) == ["SCHEDULE", "CHECKPOINT", "EPOCH"]


def test_X14_a_data_holders_window_runs_on_into_the_epoch_sent_ahead():
    t, d = lh(window=4, epochs=3), dh(window=4)
    started(t, d)
    assert [m.step for m in drain(d)] == [0, 1, 2, 3]  # step 3 is epoch 1's first; the window counts both epochs


def test_X14_a_data_holder_sends_its_validation_before_any_further_forward():
    d = epoch_0_trained()
    sent = drain(d)
    # then the rest of epoch 1 (epoch 2's EPOCH comes once epoch 0's validation is complete)
    assert types(sent) == ["EVAL_FORWARD", "EVAL_FORWARD", "FORWARD", "FORWARD"]
    assert [(m.epoch, m.batch) for m in sent[:2]] == [(0, 0), (0, 1)] and [m.step for m in sent[2:]] == [4, 5]
    calls = d.bottom.calls
    evals = [i for i, c in enumerate(calls) if c[0] == "forward" and c[2] is False]
    assert min(evals) > calls.index(("backward", 2))  # validated on the weights after epoch 0's last step


def test_X14_the_label_holder_processes_no_step_of_the_next_epoch_before_the_validation_is_complete():
    t = lh(window=4, epochs=3)
    t.start()
    for s in range(3):
        out, _ = t.on_forward("dh1", fwd(s, rows=B if s < 2 else 2))
        assert types(out["dh1"]) == ["BACKWARD"]
    out, _ = t.on_forward("dh1", fwd(3))  # epoch 1's first step, sent ahead: kept until epoch 0 is validated
    assert out["dh1"] == [] and t.top.steps == [0, 1, 2]
    val = lambda b, rows: EvalForward(epoch=0, batch=b, tensors=(Tensor("activations", np.zeros((rows, WIDTH), np.float32)),))
    out, _ = t.on_eval("dh1", val(0, B))
    assert out["dh1"] == [] and t.top.steps == [0, 1, 2]
    out, metrics = t.on_eval("dh1", val(1, 1))
    assert [m["epoch"] for m in metrics] == [1] and t.top.steps == [0, 1, 2, 3]
    # the checkpoint at epoch 1's start, then the EPOCH of epoch 2 (one ahead), then the BACKWARD of step 3
    assert types(out["dh1"]) == ["CHECKPOINT", "EPOCH", "BACKWARD"]
    assert out["dh1"][0].step == 3 and out["dh1"][1].epoch == 2 and out["dh1"][2].step == 3


def test_X14_a_backward_while_the_validation_is_unsent_is_UNEXPECTED_MESSAGE():
    d = epoch_0_trained()
    with pytest.raises(RemoteProtocolError, match="before this data holder sent its validation") as info:
        d.on_backward(grad(3))
    assert info.value.code is ErrorCode.UNEXPECTED_MESSAGE


def order(n=10):
    return (Tensor("order", np.arange(n, dtype=np.int64)),)


def test_X14_an_epoch_two_ahead_of_the_one_in_progress_is_UNEXPECTED_MESSAGE():
    t, d = lh(epochs=3), dh()
    started(t, d)  # epochs 0 and 1 are open
    with pytest.raises(RemoteProtocolError, match="two epochs ahead") as info:
        d.on_epoch(Epoch(epoch=2, first_step=6, tensors=order()))
    assert info.value.code is ErrorCode.UNEXPECTED_MESSAGE


def test_X14_in_a_1_6_session_a_data_holder_refuses_an_epoch_sent_ahead():
    t, d = lh(lookahead=False, epochs=3), dh(lookahead=False)
    started(t, d)
    with pytest.raises(RemoteProtocolError, match="before the previous one ended") as info:
        d.on_epoch(Epoch(epoch=1, first_step=3, tensors=order()))
    assert info.value.code is ErrorCode.UNEXPECTED_MESSAGE


class RisingLoss(FakeTop):
    """Every epoch's validation loss is worse than the first one's: patience 1 stops after epoch 2."""

    def end_epoch(self, epoch):
        return {"val_loss": 1.0 + epoch}


def test_X14_training_done_drops_the_epoch_sent_ahead_and_its_forwards_in_flight():
    top = RisingLoss()
    t = LabelHolderTraining(top, TrainPlan(validation=np.arange(10, 15), epoch_orders=[np.arange(10)] * 4,
                                           patience=1), parties=["dh1"], widths={"dh1": WIDTH}, batch_size=B,
                            window=4, n_rows=20, lookahead=True)
    d = dh(window=4)
    sent = run(t, d)
    assert t.done and t.epoch == 2 and t.stopped_early
    assert d.done is not None and d.done.epochs == 2 and d.finished_epochs == 2 and not d.has_work
    # the data holder forwarded into epoch 2 (steps 6..) before TRAINING_DONE; none of those steps was applied
    assert max(m.step for m in sent if m.TYPE == "FORWARD") >= 6 and d.applied == 6
    assert top.steps == list(range(6))
    with pytest.raises(RemoteProtocolError, match="after TRAINING_DONE"):
        d.on_epoch(Epoch(epoch=2, first_step=6, tensors=order()))


def test_X14_a_forward_of_the_epoch_sent_ahead_after_training_done_is_ignored_by_the_label_holder():
    t = LabelHolderTraining(RisingLoss(), TrainPlan(validation=np.arange(10, 15), epoch_orders=[np.arange(10)] * 4,
                                                    patience=1), parties=["dh1"], widths={"dh1": WIDTH},
                            batch_size=B, window=4, n_rows=20, lookahead=True)
    t.start()
    val = lambda e, b, rows: EvalForward(epoch=e, batch=b, tensors=(Tensor("activations", np.zeros((rows, WIDTH), np.float32)),))
    for e in range(2):
        for s in range(3 * e, 3 * e + 3):
            t.on_forward("dh1", fwd(s, rows=B if s % 3 < 2 else 2))
        t.on_eval("dh1", val(e, 0, B))
        out, _ = t.on_eval("dh1", val(e, 1, 1))
    assert t.done and types(out["dh1"]) == ["TRAINING_DONE"]
    out, metrics = t.on_forward("dh1", fwd(6))  # in flight when TRAINING_DONE went out
    assert out == {"dh1": []} and metrics == [] and t.top.steps == list(range(6))


@pytest.mark.parametrize("window", [1, 3])
def test_X14_the_data_holder_computes_what_it_would_in_1_6_at_window_1_and_trains_the_same_steps(window):
    """W = 1: the order of every forward, backward and validation pass is that of 1.6 ([X3] stays exact). Any window:
    the same steps, validation batches and checkpoints, only overlapped."""
    runs = {}
    for ahead in (False, True):
        t, d = lh(window=window, lookahead=ahead, epochs=3, every=2), dh(window=window, lookahead=ahead)
        sent = run(t, d)
        assert t.done and d.finished_epochs == 3
        runs[ahead] = (d.bottom.calls, t.top.steps, t.top.evals, [c[0] for c in t.top.commits], sent)
    old, new = runs[False], runs[True]
    assert new[1:4] == old[1:4]
    if window == 1:
        assert new[0] == old[0] and [(m.TYPE, getattr(m, "step", None)) for m in new[4]] == [
            (m.TYPE, getattr(m, "step", None)) for m in old[4]]
    else:
        assert sorted(map(str, new[0])) == sorted(map(str, old[0]))


def test_X14_checkpoints_still_follow_every_earlier_backward():
    """The CHECKPOINT at an epoch's start comes after the previous epoch's last BACKWARD and before the first BACKWARD
    of the epoch (whose FORWARD may already be in flight): the data holder has applied exactly that many steps."""
    t, d = lh(window=4, epochs=3), dh(window=4)
    inbox, seen = list(t.start()["dh1"]), []
    for _ in range(500):
        while inbox:
            m = inbox.pop(0)
            if isinstance(m, Checkpoint):
                seen.append((m.step, d.applied))
            deliver(t, d, m)
        if not d.has_work:
            break
        for m in d.work():
            out, _ = t.on_eval("dh1", m) if isinstance(m, EvalForward) else t.on_forward("dh1", m)
            inbox += out["dh1"]
    assert seen == [(0, 0), (3, 3), (6, 6)] and d.finished_epochs == 3


def test_the_last_steps_backward_goes_out_before_the_epoch_is_closed_and_settle_closes_it():
    """Closing an epoch (its metrics, the next epoch's checkpoint, about 10 ms of a real label holder's) waits until
    the BACKWARDs of its last step are sent: ``settle``, which the node calls when no message waits, or the next
    message, whichever comes first. Either way the wire order is BACKWARD(k-1), CHECKPOINT(k), EPOCH, BACKWARD(k)."""
    t = lh(window=4, epochs=3, n_val=0)
    t.start()
    for s in range(3):
        out, metrics = t.on_forward("dh1", fwd(s, rows=B if s < 2 else 2))
    assert types(out["dh1"]) == ["BACKWARD"] and metrics == [] and t.unsettled
    out, metrics = t.settle(0.0)
    assert types(out["dh1"]) == ["CHECKPOINT", "EPOCH"] and [m["epoch"] for m in metrics] == [1] and not t.unsettled
    t2 = lh(window=4, epochs=3, n_val=0)
    t2.start()
    for s in range(4):  # step 3 (epoch 1's first) arrives before settle: it closes epoch 0 first
        out, metrics = t2.on_forward("dh1", fwd(s, rows=B if s != 2 else 2))
    assert types(out["dh1"]) == ["CHECKPOINT", "EPOCH", "BACKWARD"] and out["dh1"][2].step == 3
