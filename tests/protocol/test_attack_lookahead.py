"""Attacks on [X14] (1.7, epochs sent ahead) in memory: a malicious data holder against the label holder, a malicious
label holder against the data holder, and the deferred closing of an epoch (``settle``) against a rejoin.

Each test pins the correct behaviour (the attack is refused or harmless). Four of them found failures, fixed since:
an EVAL_FORWARD after TRAINING_DONE or with no validation rows (an IndexError, answered INTERNAL), a resume EPOCH
that ended before the checkpoint (accepted: steps trained twice), and a rejoin while an epoch waited to close (the
old pipeline's CHECKPOINT/EPOCH sent to the rejoining party)."""

from __future__ import annotations

import numpy as np
import pytest

from vfl.protocol import (
    Checkpoint, CheckpointDone, Epoch, ErrorCode, EvalForward, Finished, Forward, LabelHolderMachine,
    PartyState, RemoteProtocolError, Schedule, SessionConfig, Tensor, TrainingDone,
)
from vfl.protocol.events import EpochDone
from vfl.protocol.psi_phase import PsiPlan
from vfl.protocol.training_phase import DataHolderTraining, LabelHolderTraining, TrainPlan

from .test_epoch_lookahead import dh, drain, epoch_0_trained, grad, lh, order, run, started, types
from .test_machines import RUN, error_codes, feed, hello, sends
from .test_training_phase import B, WIDTH, FakeBottom, FakeTop, deliver, fwd, to_data_holder

# plan(): 10 training rows in batches of 4: 3 steps an epoch (0-2, 3-5, 6-8, ...); 5 validation rows (2 batches)


class RisingLoss(FakeTop):
    """Epoch 0 is the best; patience 1 stops after epoch 1 (0-based), with epoch 2 sent ahead."""

    def end_epoch(self, epoch):
        return {"val_loss": 1.0 + epoch}


def val(epoch, batch, rows, width=WIDTH):
    return EvalForward(epoch=epoch, batch=batch, tensors=(Tensor("activations", np.zeros((rows, width), np.float32)),))


def stopped_lh(window=4, keep="last"):
    """A label holder (one party dh1) whose patience stopped it after epochs 0 and 1; EPOCH 2 went out ahead."""
    t = LabelHolderTraining(RisingLoss(), TrainPlan(validation=np.arange(10, 15), epoch_orders=[np.arange(10)] * 4,
                                                    patience=1, keep=keep), parties=["dh1"], widths={"dh1": WIDTH},
                            batch_size=B, window=window, n_rows=20, lookahead=True)
    t.start()
    for e in range(2):
        for s in range(3 * e, 3 * e + 3):
            t.on_forward("dh1", fwd(s, rows=B if s % 3 < 2 else 2))
        t.on_eval("dh1", val(e, 0, B))
        out, _ = t.on_eval("dh1", val(e, 1, 1))
        if e == 0:
            for m in out["dh1"]:
                if isinstance(m, Checkpoint):
                    t.on_checkpoint_done("dh1", CheckpointDone(step=m.step, digest=f"digest-{m.step}"))
    assert t.done and types(out["dh1"]) == ["TRAINING_DONE"]
    return t


# ------------------------------------------------------------------------------ 1. a malicious data holder (LH side)


def test_attack1_forwards_of_the_epoch_sent_ahead_beyond_the_window_during_validation_are_refused():
    t = lh(window=2, epochs=3)
    t.start()
    for s in range(3):
        t.on_forward("dh1", fwd(s, rows=B if s < 2 else 2))
    t.on_forward("dh1", fwd(3))  # epoch 1's first step: within the window (step 3 < 3 + 2)
    t.on_forward("dh1", fwd(4))
    with pytest.raises(RemoteProtocolError, match="exceeds the window") as info:
        t.on_forward("dh1", fwd(5))
    assert info.value.code is ErrorCode.UNEXPECTED_MESSAGE and t.top.steps == [0, 1, 2]


def test_attack1_forwards_of_the_epoch_sent_ahead_out_of_order_are_refused():
    t = lh(window=4, epochs=3)
    t.start()
    for s in range(3):
        t.on_forward("dh1", fwd(s, rows=B if s < 2 else 2))
    with pytest.raises(RemoteProtocolError, match="expected step 3") as info:
        t.on_forward("dh1", fwd(4))
    assert info.value.code is ErrorCode.UNEXPECTED_MESSAGE
    t.on_forward("dh1", fwd(3))
    with pytest.raises(RemoteProtocolError, match="expected step 4"):
        t.on_forward("dh1", fwd(3))  # the same step again


def test_attack1_a_forward_two_epochs_ahead_is_refused():
    """Epoch 2 was never announced (only 0 and 1 are): its steps are no steps the label holder awaits."""
    t = lh(window=8, epochs=3)
    t.start()
    for s in range(6):
        t.on_forward("dh1", fwd(s, rows=B if s % 3 < 2 else 2))
    with pytest.raises(RemoteProtocolError) as info:
        t.on_forward("dh1", fwd(6))
    assert info.value.code is ErrorCode.UNEXPECTED_MESSAGE


def test_attack1_forwards_after_training_done_are_ignored_within_the_window_and_memory_stays_bounded():
    t = stopped_lh(window=4)
    for s in range(6, 10):  # the whole window of epoch 2's steps (and one of epoch 3's)
        if s == 9:
            break
        out, metrics = t.on_forward("dh1", fwd(s, rows=B if s % 3 < 2 else 2))
        assert out == {"dh1": []} and metrics == []
    assert len(t._inbox["dh1"].forwards) <= t.window and t.top.steps == list(range(6))
    for s in (9, 10, 11):  # epoch 3 was never announced; and past the window anyway
        with pytest.raises(RemoteProtocolError) as info:
            t.on_forward("dh1", fwd(s))
        assert info.value.code is ErrorCode.UNEXPECTED_MESSAGE
    assert len(t._inbox["dh1"].forwards) <= t.window and not t.unsettled


def test_attack1_an_eval_forward_for_the_epoch_sent_ahead_is_refused():
    t = lh(window=4, epochs=3)
    t.start()
    for s in range(3):
        t.on_forward("dh1", fwd(s, rows=B if s < 2 else 2))
    with pytest.raises(RemoteProtocolError) as info:
        t.on_eval("dh1", val(1, 0, B))
    assert info.value.code is ErrorCode.UNEXPECTED_MESSAGE


def test_attack1_an_eval_forward_after_training_done_is_UNEXPECTED_MESSAGE():
    t = stopped_lh()
    with pytest.raises(RemoteProtocolError) as info:
        t.on_eval("dh1", val(t.epoch, len(t.validation), 1))
    assert info.value.code is ErrorCode.UNEXPECTED_MESSAGE


def test_attack1_an_eval_forward_after_training_done_for_a_real_batch_is_refused():
    t = stopped_lh()
    for e in (1, 2):
        with pytest.raises(RemoteProtocolError) as info:
            t.on_eval("dh1", val(e, 0, B))
        assert info.value.code is ErrorCode.UNEXPECTED_MESSAGE


def test_attack1_an_eval_forward_when_there_is_no_validation_is_UNEXPECTED_MESSAGE():
    t = lh(window=4, epochs=3, n_val=0)
    t.start()
    for s in range(3):
        t.on_forward("dh1", fwd(s, rows=B if s < 2 else 2))
    assert t.unsettled  # epoch 0 ready to close, not closed
    with pytest.raises(RemoteProtocolError) as info:
        t.on_eval("dh1", val(0, 0, 1))
    assert info.value.code is ErrorCode.UNEXPECTED_MESSAGE


def test_attack1_a_checkpoint_done_for_a_step_of_the_epoch_sent_ahead_is_refused():
    t = lh(window=4, epochs=3)
    t.start()
    t.on_checkpoint_done("dh1", CheckpointDone(step=0, digest="d0"))
    for s in range(3):
        t.on_forward("dh1", fwd(s, rows=B if s < 2 else 2))
    for step in (3, 4):  # epoch 1's start (not asked for yet: its validation is not in) and a step inside it
        with pytest.raises(RemoteProtocolError, match="not asked for") as info:
            t.on_checkpoint_done("dh1", CheckpointDone(step=step, digest="x"))
        assert info.value.code is ErrorCode.UNEXPECTED_MESSAGE
    assert t.latest_checkpoint == 0


# ----------------------------------------------------------- the same on the machine, with two parties (alice, bob)

CFG2 = SessionConfig(cut_widths={"alice": 8, "bob": 16}, batch_size=B, window=3, model="m1", psi=True, train=True)
WIDTHS = {"alice": 8, "bob": 16}


def training_machine(versions=((1, 7), (1, 7)), epochs=4, patience=1, n_val=5, top=None):
    """A LabelHolderMachine past its PSI (the alignment stubbed: 20 rows), training a RisingLoss plan."""
    m = LabelHolderMachine(party="bank", run=RUN, config=CFG2, now=0.0, heartbeat_s=1.0, peer_timeout_s=50.0,
                           join_timeout_s=60.0, psi=PsiPlan(items=[], engine=None))
    for p, v in zip(("alice", "bob"), versions):
        feed(m, hello(p, cfg=CFG2, version=v), p)
        m.parties[p].state = PartyState.ALIGNED
    m.final_rows = np.arange(20)
    plan = TrainPlan(validation=np.arange(10, 10 + n_val), epoch_orders=[np.arange(10)] * epochs, patience=patience)
    out = m.start_training(top or RisingLoss(), plan, 0.0)
    return m, out


def to(outputs, party):
    return [o.message for o in outputs if getattr(o, "to", None) == party.encode()]


def mfwd(party, step, rows=None):
    rows = rows if rows is not None else (B if step % 3 < 2 else 2)
    return Forward(step=step, tensors=(Tensor("activations", np.zeros((rows, WIDTHS[party]), np.float32)),))


def both_epoch(m, e, n_val=5):
    """Both parties train and validate epoch ``e``, answering every CHECKPOINT; returns the last outputs."""
    outs = []
    for s in range(3 * e, 3 * e + 3):
        for p in ("alice", "bob"):
            outs += feed(m, mfwd(p, s), p)
    outs += m.work(0.0) if m.has_work else []
    nb = -(-n_val // B)
    for b in range(nb):
        for p in ("alice", "bob"):
            outs += feed(m, val(e, b, B if b < nb - 1 else n_val - B * (nb - 1), WIDTHS[p]), p)
    for p in ("alice", "bob"):
        for msg in to(outs, p):
            if isinstance(msg, Checkpoint):
                feed(m, CheckpointDone(step=msg.step, digest=f"{p}-{msg.step}"), p)
    return outs


def test_attack1_on_the_machine_forwards_after_training_done_are_ignored_and_the_run_waits_for_both_confirmations():
    m, _ = training_machine()
    both_epoch(m, 0)
    outs = both_epoch(m, 1)
    assert m.training.done and m.finished is None
    done = {p: [x for x in to(outs, p) if isinstance(x, TrainingDone)][0] for p in ("alice", "bob")}
    for s in range(6, 9):  # alice's window of epoch 2, in flight when TRAINING_DONE went out
        out = feed(m, mfwd("alice", s), "alice")
        assert sends(out) == [] and m.finished is None
    assert len(m.training._inbox["alice"].forwards) <= m.training.window
    out = feed(m, done["alice"], "alice")
    assert m.finished is None and sends(out) == []
    out = feed(m, done["alice"], "alice")  # a duplicate confirmation: refused, the run still waits for bob
    assert error_codes(out) == [ErrorCode.UNEXPECTED_MESSAGE] and m.finished is None
    out = feed(m, mfwd("bob", 6), "bob")  # bob's own FORWARD in flight: ignored, nothing finishes early
    assert sends(out) == [] and m.finished is None
    out = feed(m, done["bob"], "bob")
    fin = [o for o in out if isinstance(o, Finished)]
    assert fin and fin[0].exit_code == 0


def test_attack1_on_the_machine_a_forward_past_the_window_after_training_done_ends_the_session_with_exit_1():
    """[X2] holds after TRAINING_DONE too: a data holder that keeps sending is refused and the run is not finished."""
    m, _ = training_machine()
    both_epoch(m, 0)
    both_epoch(m, 1)
    for s in range(6, 9):
        feed(m, mfwd("alice", s), "alice")
    out = feed(m, mfwd("alice", 9, rows=B), "alice")
    assert error_codes(out) == [ErrorCode.UNEXPECTED_MESSAGE]
    fin = [o for o in out if isinstance(o, Finished)]
    assert fin and fin[0].exit_code == 1 and not any(isinstance(o, EpochDone) for o in out)
    # and a flood after that is not even looked at
    for s in range(10, 200):
        assert feed(m, mfwd("alice", s, rows=B), "alice") == []


def test_attack1_on_the_machine_a_confirmation_that_differs_is_refused_and_the_run_waits():
    m, _ = training_machine()
    both_epoch(m, 0)
    outs = both_epoch(m, 1)
    sent = [x for x in to(outs, "alice") if isinstance(x, TrainingDone)][0]
    forged = TrainingDone(epochs=sent.epochs + 1, keep_step=sent.keep_step + 3, keep_epoch=sent.keep_epoch)
    out = feed(m, forged, "alice")
    assert error_codes(out) == [ErrorCode.UNEXPECTED_MESSAGE] and m.finished is None


# ------------------------------------------------------------------------------ 5. a 1.6 data holder in the session


@pytest.mark.parametrize("versions", [((1, 6), (1, 7)), ((1, 7), (1, 6))])
def test_attack5_with_one_data_holder_at_1_6_nobody_gets_an_epoch_ahead(versions):
    m, out = training_machine(versions=versions, patience=0, epochs=3)
    assert not m.training.lookahead
    for p in ("alice", "bob"):
        assert [x.epoch for x in to(out, p) if isinstance(x, Epoch)] == [0]
    outs = both_epoch(m, 0)
    for p in ("alice", "bob"):
        assert [x.epoch for x in to(outs, p) if isinstance(x, Epoch)] == [1]
    # the 1.7 party must not run into epoch 1 before it is announced: step 3 is no awaited step yet
    fast = "alice" if versions[0] == (1, 7) else "bob"
    m2, _ = training_machine(versions=versions, patience=0, epochs=3)
    for s in range(3):
        for p in ("alice", "bob"):
            feed(m2, mfwd(p, s), p)
    out = feed(m2, mfwd(fast, 3), fast)
    assert error_codes(out) == [ErrorCode.UNEXPECTED_MESSAGE]


def test_attack5_both_at_1_7_every_party_gets_the_epoch_ahead():
    m, out = training_machine(patience=0, epochs=3)
    assert m.training.lookahead
    for p in ("alice", "bob"):
        assert [x.epoch for x in to(out, p) if isinstance(x, Epoch)] == [0, 1]


# ------------------------------------------------------------------------------ 2. a malicious label holder (DH side)


def test_attack2_an_epoch_ahead_whose_first_step_is_not_the_end_of_the_current_one_is_BAD_FIELD():
    t, d = lh(epochs=3, lookahead=False), dh()
    for m in t.start()["dh1"]:
        deliver(t, d, m)
    for first in (2, 4, 0, 100):
        with pytest.raises(RemoteProtocolError) as info:
            d.on_epoch(Epoch(epoch=1, first_step=first, tensors=order()))
        assert info.value.code is ErrorCode.BAD_FIELD
    with pytest.raises(RemoteProtocolError) as info:  # skipping an epoch
        d.on_epoch(Epoch(epoch=2, first_step=3, tensors=order()))
    assert info.value.code is ErrorCode.BAD_FIELD
    d.on_epoch(Epoch(epoch=1, first_step=3, tensors=order()))  # the right one is still accepted


def test_attack2_an_epoch_beyond_the_schedule_sent_ahead_is_BAD_FIELD():
    t, d = lh(epochs=1, lookahead=True), dh()
    started(t, d)
    with pytest.raises(RemoteProtocolError) as info:
        d.on_epoch(Epoch(epoch=1, first_step=3, tensors=order()))
    assert info.value.code is ErrorCode.BAD_FIELD


def test_attack2_a_checkpoint_for_a_step_of_the_epoch_ahead_before_validation_is_refused():
    d = epoch_0_trained()  # applied 3 steps, step 3 forwarded, validation queued
    for step in (4, 5, 6):
        with pytest.raises(RemoteProtocolError) as info:
            d.on_checkpoint(Checkpoint(step=step, epoch=1))
        assert info.value.code is ErrorCode.UNEXPECTED_MESSAGE


def test_attack2_a_backward_for_the_epoch_ahead_after_some_validation_but_not_all_is_refused():
    d = epoch_0_trained()
    (first,) = d.work()
    assert isinstance(first, EvalForward) and first.batch == 0
    with pytest.raises(RemoteProtocolError, match="before this data holder sent its validation") as info:
        d.on_backward(grad(3))
    assert info.value.code is ErrorCode.UNEXPECTED_MESSAGE
    assert d.bottom.calls.count(("backward", 3)) == 0


def test_attack2_training_done_while_the_epoch_ahead_has_an_applied_step_is_UNEXPECTED_MESSAGE():
    d = epoch_0_trained()
    drain(d)  # validation of epoch 0, then FORWARDs 4, 5
    d.on_backward(grad(3))
    assert d.applied == 4
    with pytest.raises(RemoteProtocolError, match="in progress") as info:
        d.on_training_done(TrainingDone(epochs=1, keep_step=3, keep_epoch=0, keep_digest="digest-3"))
    assert info.value.code is ErrorCode.UNEXPECTED_MESSAGE and d.done is None


def test_attack2_training_done_before_the_validation_is_sent_is_UNEXPECTED_MESSAGE():
    d = epoch_0_trained()
    for e in (0, 1):
        with pytest.raises(RemoteProtocolError) as info:
            d.on_training_done(TrainingDone(epochs=e, keep_step=3, keep_epoch=0))
        assert info.value.code is ErrorCode.UNEXPECTED_MESSAGE
    d.work()  # one batch sent, one queued
    with pytest.raises(RemoteProtocolError) as info:
        d.on_training_done(TrainingDone(epochs=1, keep_step=3, keep_epoch=0))
    assert info.value.code is ErrorCode.UNEXPECTED_MESSAGE and d.done is None


def test_attack2_training_done_counting_the_epoch_ahead_as_trained_is_BAD_FIELD():
    d = epoch_0_trained()
    sent = drain(d)
    assert d.finished_epochs == 1 and [m.TYPE for m in sent][:2] == ["EVAL_FORWARD"] * 2
    with pytest.raises(RemoteProtocolError) as info:
        d.on_training_done(TrainingDone(epochs=2, keep_step=3, keep_epoch=1))
    assert info.value.code is ErrorCode.BAD_FIELD
    with pytest.raises(RemoteProtocolError) as info:  # keep a step of the epoch ahead: never applied
        d.on_training_done(TrainingDone(epochs=1, keep_step=4, keep_epoch=0))
    assert info.value.code is ErrorCode.BAD_FIELD
    d.on_training_done(TrainingDone(epochs=1, keep_step=3, keep_epoch=0))
    assert d.applied == 3 and not d.has_work and d.work() == []
    with pytest.raises(RemoteProtocolError):  # a second one
        d.on_training_done(TrainingDone(epochs=1, keep_step=3, keep_epoch=0))
    with pytest.raises(RemoteProtocolError):  # a BACKWARD for a FORWARD dropped with the epoch ahead
        d.on_backward(grad(4))


def test_attack2_training_done_keeping_the_best_while_ahead_restores_it_and_drops_every_step_in_flight():
    d = epoch_0_trained()
    drain(d)
    d.on_training_done(TrainingDone(epochs=1, keep_step=0, keep_epoch=0, keep_digest="digest-0"))
    assert ("restore", 0, "digest-0") in d.bottom.calls and d.applied == 0 and not d.has_work


def test_attack2_after_rollback_a_fresh_pipeline_takes_the_resume_and_the_epoch_ahead():
    """DataHolderMachine answers ROLLBACK with a new pipeline (data_holder.py); SCHEDULE from the checkpoint at step 3
    (epoch 1's start), EPOCH 1 and EPOCH 2 ahead: the window runs from step 3, and nothing of before is forwarded."""
    d = DataHolderTraining(FakeBottom(), n_rows=20, batch_size=B, window=4, width=WIDTH, lookahead=True)
    d.on_schedule(Schedule(epochs=3, first_epoch=1, first_step=3, resume_digest="digest-3",
                           tensors=(Tensor("validation", np.arange(10, 15)),)))
    d.on_epoch(Epoch(epoch=1, first_step=3, tensors=order()))
    d.on_epoch(Epoch(epoch=2, first_step=6, tensors=order()))
    assert [m.step for m in drain(d)] == [3, 4, 5, 6]
    assert d.bottom.calls[0] == ("restore", 3, "digest-3")


def test_attack2_after_a_mid_epoch_resume_the_epoch_ahead_must_start_at_the_current_ones_end():
    d = DataHolderTraining(FakeBottom(), n_rows=20, batch_size=B, window=4, width=WIDTH, lookahead=True)
    d.on_schedule(Schedule(epochs=3, first_epoch=0, first_step=2, resume_digest="d",
                           tensors=(Tensor("validation", np.arange(10, 15)),)))
    d.on_epoch(Epoch(epoch=0, first_step=0, tensors=order()))  # resumed mid-epoch: steps 2.. only
    with pytest.raises(RemoteProtocolError) as info:
        d.on_epoch(Epoch(epoch=1, first_step=2, tensors=order()))
    assert info.value.code is ErrorCode.BAD_FIELD
    d.on_epoch(Epoch(epoch=1, first_step=3, tensors=order()))
    assert [m.step for m in drain(d)] == [2, 3, 4, 5]


def test_attack2_a_resume_epoch_that_ends_before_the_checkpoint_is_BAD_FIELD():
    d = DataHolderTraining(FakeBottom(), n_rows=20, batch_size=B, window=4, width=WIDTH, lookahead=True)
    d.on_schedule(Schedule(epochs=3, first_epoch=0, first_step=6, resume_digest="d",
                           tensors=(Tensor("validation", np.arange(10, 15)),)))
    refused = []
    for e, first in ((0, 0), (1, 3)):
        try:
            d.on_epoch(Epoch(epoch=e, first_step=first, tensors=order()))
        except RemoteProtocolError as exc:
            refused.append(exc.code)
    sent = drain(d)
    assert refused and refused[0] is ErrorCode.BAD_FIELD, [m.step for m in sent]
    assert all(m.step >= 6 for m in sent if isinstance(m, Forward))


def test_attack2_window_change_across_the_boundary_applies_to_the_epoch_ahead_and_a_second_one_is_refused():
    from vfl.protocol import Window

    d = DataHolderTraining(FakeBottom(), n_rows=20, batch_size=B, window=1, width=WIDTH, lookahead=True, max_window=4)
    t = LabelHolderTraining(FakeTop(), TrainPlan(validation=np.arange(10, 15), epoch_orders=[np.arange(10)] * 3),
                            parties=["dh1"], widths={"dh1": WIDTH}, batch_size=B, window=1, n_rows=20,
                            lookahead=True, max_window=4)
    started(t, d)
    assert [m.step for m in drain(d)] == [0]
    d.on_window(Window(window=4))
    assert [m.step for m in drain(d)] == [1, 2, 3]  # step 3 is epoch 1's
    with pytest.raises(RemoteProtocolError) as info:
        d.on_window(Window(window=2))
    assert info.value.code is ErrorCode.UNEXPECTED_MESSAGE
    with pytest.raises(RemoteProtocolError) as info:
        DataHolderTraining(FakeBottom(), n_rows=20, batch_size=B, window=1, width=WIDTH, lookahead=True,
                           max_window=4).on_window(Window(window=2))  # before SCHEDULE
    assert info.value.code is ErrorCode.UNEXPECTED_MESSAGE


# ------------------------------------------------------------------------------ 3. exactness and keep = "best"


def test_attack3_early_stop_with_the_epoch_ahead_keeps_the_best_everywhere():
    """keep = "best", patience 1: epoch 0 best, epoch 1 worse, stop after it with epoch 2 sent ahead and forwarded
    into (window 4). Every party ends on the checkpoint after epoch 0 (step 3), with the digest it reported."""
    top = RisingLoss()
    t = LabelHolderTraining(top, TrainPlan(validation=np.arange(10, 15), epoch_orders=[np.arange(10)] * 4,
                                           patience=1, keep="best"), parties=["dh1"], widths={"dh1": WIDTH},
                            batch_size=B, window=4, n_rows=20, lookahead=True)
    d = dh(window=4)
    sent = run(t, d)
    assert t.done and t.stopped_early and t.kept is not None and t.kept.step == 3 and t.kept.epoch == 0
    assert top.restored == (3, "top-3")
    assert d.done.keep_step == 3 and d.done.keep_digest == "digest-3" and d.applied == 3
    assert d.bottom.calls[-1] == ("restore", 3, "digest-3")
    assert getattr(d.bottom, "kept", None) == 3  # the CHECKPOINT at epoch 1's start said keep
    assert max(m.step for m in sent if isinstance(m, Forward)) >= 6 and top.steps == list(range(6))


@pytest.mark.parametrize("window", [1, 2, 5])
def test_attack3_every_party_processes_the_same_steps_and_validation_with_and_without_lookahead(window):
    results = {}
    for ahead in (False, True):
        top = RisingLoss()
        t = LabelHolderTraining(top, TrainPlan(validation=np.arange(10, 15), epoch_orders=[np.arange(10)] * 4,
                                               patience=2, keep="best"), parties=["dh1"], widths={"dh1": WIDTH},
                                batch_size=B, window=window, n_rows=20, lookahead=ahead)
        d = dh(window=window, lookahead=ahead)
        run(t, d)
        applied = [c for c in d.bottom.calls if c[0] in ("backward", "restore")]
        results[ahead] = (top.steps, top.evals, [c[0] for c in top.commits], applied, d.done, t.kept)
    assert results[True] == results[False]


# ------------------------------------------------------------------------------ 4. the deferred settle vs a rejoin


def test_attack4_settle_with_no_validation_closes_the_epoch_once():
    t = lh(window=4, epochs=3, n_val=0)
    t.start()
    for s in range(3):
        t.on_forward("dh1", fwd(s, rows=B if s < 2 else 2))
    assert t.unsettled
    _, metrics = t.settle(0.0)
    _, again = t.settle(0.0)
    assert [m["epoch"] for m in metrics] == [1] and again == [] and not t.unsettled


def test_attack4_a_rejoin_while_an_epoch_is_unsettled_sends_nothing_of_the_old_pipeline_to_the_rejoining_party():
    m, _ = training_machine(n_val=0, patience=0, epochs=3)
    for s in range(3):
        for p in ("alice", "bob"):
            feed(m, mfwd(p, s), p)
    assert m.training.unsettled and m.has_work
    rid = b"alice/0000000000000002"
    out = m.receive(rid, "alice", __import__("tests.protocol.test_machines", fromlist=["wire"]).wire(
        hello("alice", cfg=CFG2, version=(1, 7))), 1.0)
    assert m.parties["alice"].state is PartyState.READY
    out = m.work(1.0) if m.has_work else []
    to_new = [o.message.TYPE for o in out if getattr(o, "to", None) == rid]
    assert to_new == [], to_new


def test_attack1_on_the_machine_an_eval_forward_after_training_done_is_UNEXPECTED_MESSAGE_and_ends_the_session():
    """The wire view: the machine answers ERROR UNEXPECTED_MESSAGE and ends the session (exit 1), as for any
    training message out of place; it never raises (this used to be an IndexError answered INTERNAL)."""
    m, _ = training_machine()
    both_epoch(m, 0)
    both_epoch(m, 1)
    out = feed(m, val(m.training.epoch, len(m.training.validation), 1, 8), "alice")
    assert error_codes(out) == [ErrorCode.UNEXPECTED_MESSAGE]
    assert m.finished is not None and m.finished.exit_code == 1


def test_attack4_a_pause_while_an_epoch_is_unsettled_writes_no_metrics_and_commits_nothing_new():
    """SIGTERM ([J2]) while epoch 0 is ready to close: the label holder pauses without closing it; the committed
    checkpoint stays the one at step 0, so the resumed run trains epoch 0 again and writes its line once then."""
    m, _ = training_machine(n_val=0, patience=0, epochs=3)
    for p in ("alice", "bob"):
        feed(m, CheckpointDone(step=0, digest=f"{p}-0"), p)
    for s in range(3):
        for p in ("alice", "bob"):
            feed(m, mfwd(p, s), p)
    assert m.training.unsettled
    out = m.close("signal", 1.0, pause=True)
    assert not any(isinstance(o, EpochDone) for o in out)
    assert [o.exit_code for o in out if isinstance(o, Finished)] == [5]
    assert m.training.latest_checkpoint == 0 and not m.has_work and m.work(1.0) == []


# ---------------------------------------------------- 4. interleavings (hypothesis): two data holders, random order

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


class Bottom(FakeBottom):
    def __init__(self):
        super().__init__()
        self.applied_steps = []

    def backward(self, step, gradient):
        super().backward(step, gradient)
        self.applied_steps.append(step)


class Tops(RisingLoss):
    def __init__(self, losses):
        super().__init__()
        self.losses = losses

    def eval_batch(self, epoch, rows, activations):
        super().eval_batch(epoch, rows, activations)
        self.validated = True

    def end_epoch(self, epoch):
        """As TorchTop: no validation rows, no val_loss (so keep = "best" has nothing to keep). A fake that reported
        one anyway makes _training_done raise CheckpointError: with no EVAL_FORWARD after it, nothing orders a data
        holder's CHECKPOINT_DONE at the epoch ahead's start before the FORWARDs of that epoch it sent ahead."""
        seen, self.validated = getattr(self, "validated", False), False
        return {"val_loss": self.losses[epoch]} if seen else {}


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), window=st.integers(1, 4), n_val=st.sampled_from([0, 5]), epochs=st.integers(1, 4),
       patience=st.integers(0, 2), keep=st.sampled_from(["last", "best"]),
       losses=st.lists(st.sampled_from([1.0, 2.0, 0.5, 3.0]), min_size=4, max_size=4))
def test_attack4_any_interleaving_of_two_data_holders_and_settle_trains_each_step_once_and_closes_each_epoch_once(
        data, window, n_val, epochs, patience, keep, losses):
    parties = ("dh1", "dh2")
    top = Tops(losses)
    t = LabelHolderTraining(top, TrainPlan(validation=np.arange(10, 10 + n_val), epoch_orders=[np.arange(10)] * epochs,
                                           patience=patience, keep=keep, checkpoint_every=2),
                            parties=parties, widths={p: WIDTH for p in parties}, batch_size=B, window=window,
                            n_rows=20, lookahead=True)
    ds = {p: DataHolderTraining(Bottom(), n_rows=20, batch_size=B, window=window, width=WIDTH, lookahead=True)
          for p in parties}
    down = {p: list(msgs) for p, msgs in t.start().items()}  # LH -> DH, per socket in order
    up = {p: [] for p in parties}  # DH -> LH
    metrics = []

    def take(per_party, got):
        metrics.extend(got)
        for p, msgs in per_party.items():
            down[p].extend(msgs)

    for _ in range(3000):
        choices = [("down", p) for p in parties if down[p]] + [("up", p) for p in parties if up[p]]
        choices += [("work", p) for p in parties if ds[p].has_work]
        if t.unsettled:
            choices.append(("settle", None))
        if not choices:
            break
        kind, p = data.draw(st.sampled_from(choices))
        if kind == "settle":
            take(*t.settle(0.0))
        elif kind == "work":
            up[p].extend(ds[p].work())
        elif kind == "down":
            answer = to_data_holder(ds[p], down[p].pop(0))
            if answer is not None:  # CHECKPOINT_DONE travels up like any message
                up[p].append(answer)
        else:
            msg = up[p].pop(0)
            if isinstance(msg, CheckpointDone):
                t.on_checkpoint_done(p, msg)
            elif isinstance(msg, EvalForward):
                take(*t.on_eval(p, msg))
            else:
                take(*t.on_forward(p, msg))
    assert t.done, "deadlock: nothing to do and training not done"
    n = t.epoch
    assert [m["epoch"] for m in metrics] == list(range(1, n + 1))  # each epoch's line once, in order
    assert top.steps == list(range(3 * n))  # each step once, in order, none of the epoch ahead
    for p in parties:
        d = ds[p]
        assert d.done is not None and d.finished_epochs == n
        assert d.bottom.applied_steps == list(range(3 * n))
        keep_step = d.done.keep_step
        assert d.applied == keep_step
        if keep == "best" and t.kept is not None:
            assert keep_step == t.kept.step and d.bottom.calls[-1][:2] == ("restore", keep_step)
        else:
            assert keep_step == 3 * n
    commits = [c[0] for c in top.commits]
    assert commits == sorted(set(commits))


# ------------------------------------------------------------------ a resume ([X8]) with an epoch sent ahead, end to end


@pytest.mark.parametrize("first_step, epoch", [(3, 1), (4, 1), (6, 2)])
def test_attack2_a_resumed_pipeline_sends_the_current_epoch_and_the_next_and_trains_every_later_step_once(
        first_step, epoch):
    """The pipeline a rollback builds (label_holder.py _begin at the last committed checkpoint): SCHEDULE, the EPOCH of
    the checkpoint's epoch (no CHECKPOINT: it resumes from there) and the one after it; a fresh data holder pipeline
    (what DataHolderMachine makes on ROLLBACK) takes both and trains from the checkpoint on, each step once."""
    def resumed(top):
        return LabelHolderTraining(top, TrainPlan(validation=np.arange(10, 15), epoch_orders=[np.arange(10)] * 3,
                                                  checkpoint_every=2), parties=["dh1"], widths={"dh1": WIDTH},
                                   batch_size=B, window=3, n_rows=20, lookahead=True, first_step=first_step,
                                   resume_digests={"dh1": f"digest-{first_step}"})

    first = resumed(FakeTop()).start()["dh1"]
    top = FakeTop()
    t = resumed(top)
    want = ["SCHEDULE", "EPOCH"] + (["EPOCH"] if epoch + 1 < 3 else [])
    assert types(first) == want and [m.epoch for m in first[1:]] == list(range(epoch, min(epoch + 2, 3)))
    d = DataHolderTraining(Bottom(), n_rows=20, batch_size=B, window=3, width=WIDTH, lookahead=True)
    run(t, d)
    assert t.done and top.steps == list(range(first_step, 9)) and d.bottom.applied_steps == list(range(first_step, 9))
    assert d.bottom.calls[0] == ("restore", first_step, f"digest-{first_step}") and d.finished_epochs == 3
