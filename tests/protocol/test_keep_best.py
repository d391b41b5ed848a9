"""PROTOCOL.md [X7]/[X10] in version 1.5, in memory: CHECKPOINT.keep, TRAINING_DONE, keep = "best", patience."""

from __future__ import annotations

import numpy as np
import pytest

from vfl.protocol import Backward, Checkpoint, Epoch, ErrorCode, EvalForward, RemoteProtocolError, Schedule
from vfl.protocol import TrainingDone
from vfl.protocol.training_phase import BestEpoch, CheckpointError, DataHolderTraining, LabelHolderTraining, TrainPlan

from .test_training_phase import WIDTH, B, FakeBottom, FakeTop, deliver


class LossTop(FakeTop):
    """A top whose epochs report the validation losses it is given, in order."""

    def __init__(self, losses):
        super().__init__()
        self.losses = list(losses)

    def end_epoch(self, epoch):
        return {"val_loss": float(self.losses[epoch])}


def make(losses, keep="best", patience=0, first_step=0, best=None, n_train=8):
    rng = np.random.default_rng(0)
    plan = TrainPlan(validation=np.arange(n_train, n_train + 4),
                     epoch_orders=[rng.permutation(n_train) for _ in losses], keep=keep, patience=patience)
    t = LabelHolderTraining(LossTop(losses), plan, parties=["dh1"], widths={"dh1": WIDTH}, batch_size=B, window=1,
                            n_rows=20, first_step=first_step, best=best)
    d = DataHolderTraining(FakeBottom(), n_rows=20, batch_size=B, window=1, width=WIDTH)
    return t, d


def drive(t, d, held=lambda m: False):
    """Run the label holder and one data holder against each other until training is done (bounded); the messages
    ``held`` picks are not delivered (nor returned)."""
    inbox = list(t.start()["dh1"])
    sent = []
    for _ in range(500):
        while inbox:
            m = inbox.pop(0)
            if not held(m):
                sent.append(m)
                deliver(t, d, m)
        if t.done or not d.has_work:
            break
        for m in d.work():
            out, _ = t.on_eval("dh1", m) if isinstance(m, EvalForward) else t.on_forward("dh1", m)
            inbox += out["dh1"]
    assert t.done
    return sent


def test_X10_training_done_names_the_last_step_when_every_epoch_trained_and_keep_is_last():
    t, d = make([0.5, 0.4, 0.3], keep="last")
    sent = drive(t, d)
    (done,) = [m for m in sent if isinstance(m, TrainingDone)]
    assert done == TrainingDone(epochs=3, keep_step=6, keep_epoch=2)  # 8 rows in batches of 4: 2 steps per epoch
    assert d.done == done and d.applied == 6 and not any(c[0] == "restore" for c in d.bottom.calls)
    assert not any(getattr(m, "keep", None) for m in sent if isinstance(m, Checkpoint))


def test_X7_keep_best_flags_the_checkpoint_after_each_new_best_and_training_done_loads_it_everywhere():
    t, d = make([0.5, 0.2, 0.3, 0.4])
    sent = drive(t, d)
    flagged = [m.step for m in sent if isinstance(m, Checkpoint) and m.keep]
    assert flagged == [2, 4]  # after epoch 0 (the first best) and after epoch 1 (the better one)
    (done,) = [m for m in sent if isinstance(m, TrainingDone)]
    assert (done.epochs, done.keep_step, done.keep_epoch, done.keep_digest) == (4, 4, 1, "digest-4")
    assert done.early_stop is None
    assert ("restore", 4, "digest-4") in d.bottom.calls and d.applied == 4  # the data holder loads its own
    assert t.top.restored == (4, "top-4")  # and the label holder its own, each checked against its digest
    assert t.kept.epoch == 1 and t.kept.step == 4


def test_the_last_epoch_being_the_best_keeps_the_weights_in_memory():
    t, d = make([0.5, 0.4, 0.3])
    sent = drive(t, d)
    (done,) = [m for m in sent if isinstance(m, TrainingDone)]
    assert (done.keep_step, done.keep_digest) == (6, None) and t.kept is None
    assert not hasattr(t.top, "restored")


def test_patience_stops_after_that_many_epochs_without_a_lower_validation_loss():
    t, d = make([0.5, 0.2, 0.3, 0.25, 0.1, 0.05], patience=2)
    sent = drive(t, d)
    (done,) = [m for m in sent if isinstance(m, TrainingDone)]
    assert (done.epochs, done.keep_epoch, done.early_stop) == (4, 1, True)  # epochs 3 and 4 did not beat 0.2
    assert t.stopped_early and len(t.history) == 4 and d.done is not None
    assert not any(isinstance(m, Epoch) and m.epoch >= 4 for m in sent)


def test_a_nan_validation_loss_is_never_the_best():
    t, d = make([float("nan"), 0.4, float("nan"), float("nan")], patience=2)
    sent = drive(t, d)
    (done,) = [m for m in sent if isinstance(m, TrainingDone)]
    assert (done.epochs, done.keep_epoch) == (4, 1)


def test_a_resumed_run_counts_patience_and_keeps_the_best_from_its_manifest():
    """Resuming at step 4 (epoch 2) with the best recorded at epoch 0: one more epoch without a lower loss ends it."""
    best = BestEpoch(epoch=0, step=2, val_loss=0.1, digests={"": "top-2", "dh1": "digest-2"})
    t, d = make([9.0, 9.0, 0.5, 0.4], patience=2, first_step=4, best=best)
    sent = drive(t, d)
    (done,) = [m for m in sent if isinstance(m, TrainingDone)]
    assert (done.epochs, done.keep_step, done.keep_epoch, done.keep_digest) == (3, 2, 0, "digest-2")
    assert done.early_stop is True and t.top.restored == (2, "top-2")


def test_the_best_epoch_is_committed_with_each_checkpoint_and_a_rollback_keeps_only_the_committed_one():
    t, d = make([0.5, 0.2, 0.3])
    drive(t, d)
    assert t.top.best == {"epoch": 1, "step": 4, "val_loss": 0.2, "digests": {"dh1": "digest-4", "": "top-4"}}
    assert t.committed_best == t.best
    # the checkpoint after a new best not yet confirmed by everyone: a rollback now goes back to the older best
    t, d = make([0.5, 0.2, 0.3])
    with pytest.raises(CheckpointError, match="never confirmed"):  # ... and it cannot be the result either
        drive(t, d, held=lambda m: isinstance(m, Checkpoint) and m.step == 4)
    assert (t.best.step, t.best.digests) == (4, None)
    assert t.committed_best.step == 2 and t.committed_best.digests == {"dh1": "digest-2", "": "top-2"}


def test_a_best_epoch_whose_checkpoint_was_never_confirmed_cannot_be_the_result():
    best = BestEpoch(epoch=0, step=2, val_loss=0.1)  # no digests: its checkpoint never committed
    t, d = make([9.0, 9.0, 9.0], first_step=2, best=best)
    with pytest.raises(CheckpointError, match="never confirmed"):
        drive(t, d)


@pytest.mark.parametrize(
    "bad, match",
    [
        (TrainingDone(epochs=1, keep_step=4, keep_epoch=0), "finished 2 epoch"),
        (TrainingDone(epochs=2, keep_step=9, keep_epoch=1), "applied 4 steps"),
        (TrainingDone(epochs=2, keep_step=2, keep_epoch=5), "keeping epoch 5"),
        (TrainingDone(epochs=2, keep_step=-1, keep_epoch=0), "at step -1"),
    ],
)
def test_X10_a_data_holder_refuses_a_training_done_that_does_not_fit_what_it_trained(bad, match):
    t, d = make([0.5, 0.4], keep="last")
    real = []
    drive(t, d, held=lambda m: isinstance(m, TrainingDone) and not real.append(m))  # held back: tried below
    with pytest.raises(RemoteProtocolError, match=match) as info:
        d.on_training_done(bad)
    assert info.value.code is ErrorCode.BAD_FIELD and d.done is None
    with pytest.raises(RemoteProtocolError, match="keep_digest is missing"):
        d.on_training_done(TrainingDone(epochs=2, keep_step=2, keep_epoch=0))
    d.on_training_done(real[0])
    with pytest.raises(RemoteProtocolError, match="or twice") as info:
        d.on_training_done(real[0])
    assert info.value.code is ErrorCode.UNEXPECTED_MESSAGE


def test_X10_training_done_during_an_epoch_is_unexpected():
    t, d = make([0.5, 0.4])
    msgs = t.start()["dh1"]
    d.on_schedule(msgs[0])
    d.on_epoch(msgs[2])
    with pytest.raises(RemoteProtocolError, match="in progress") as info:
        d.on_training_done(TrainingDone(epochs=0, keep_step=0, keep_epoch=0))
    assert info.value.code is ErrorCode.UNEXPECTED_MESSAGE


def test_best_epoch_records_survive_a_manifest_round_trip_and_garbage_is_ignored():
    best = BestEpoch(epoch=3, step=40, val_loss=0.25, digests={"": "a", "dh1": "b"})
    assert BestEpoch.from_dict(best.to_dict()) == best
    for junk in (None, 3, [], {"epoch": 1}, {"epoch": "x", "step": 1, "val_loss": 0.1}, {"epoch": 1, "step": 2,
                                                                                          "val_loss": 0.1, "digests": 5}):
        assert BestEpoch.from_dict(junk) is None


def test_v15_training_messages_round_trip_through_the_codec():
    from vfl.protocol import decode, encode

    for msg in (TrainingDone(epochs=3, keep_step=40, keep_epoch=1, keep_digest="ab" * 32, early_stop=True),
                TrainingDone(epochs=1, keep_step=0, keep_epoch=0), Checkpoint(step=4, epoch=1, keep=True)):
        assert decode([bytes(memoryview(f).cast("B")) for f in encode(msg)]) == msg


def test_X10_a_label_holder_that_keeps_the_best_epoch_refuses_a_data_holder_older_than_1_5():
    """It would not understand TRAINING_DONE and would save its last weights beside everyone's best ones."""
    from .test_machines import error_codes, feed, hello, label_holder, sends

    lh = label_holder(min_minor=5)
    out = feed(lh, hello(version=(1, 4)))
    assert error_codes(out) == [ErrorCode.UNSUPPORTED_VERSION]
    assert "[train].keep / patience" in sends(out)[0].message and "1.5" in sends(out)[0].message
    (welcome,) = sends(feed(label_holder(min_minor=5), hello(version=(1, 5))))
    assert welcome.version == (1, 5)
    (welcome,) = sends(feed(label_holder(), hello(version=(1, 4))))  # without keep/patience 1.4 is fine
    assert welcome.version == (1, 4)
