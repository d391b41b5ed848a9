"""The training phase end to end in memory: both machines, torch segments, messages through the real codec.

W = 1 must give exactly the weights of central training of the composed model on the same batches; W > 1 must
finish and learn.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vfl.node.checkpoints import Checkpointer
from vfl.train.segments import TorchBottom, TorchTop
from vfl.protocol import (
    Aligned,
    DataHolderMachine,
    EpochDone,
    Finished,
    LabelHolderMachine,
    Send,
    SessionConfig,
    decode,
    encode,
)
from vfl.protocol.psi_phase import PsiPlan
from vfl.protocol.training_phase import TrainPlan
from vfl.psi import PsiEngine, encode_ids
from vfl.train.central import OptimizerSpec, make_schedule, train_central
from vfl.train.models import Combiner, MlpSpec, build_mlp


pytestmark = pytest.mark.usefixtures("one_thread")


def wire(msg):
    return decode([bytes(memoryview(f).cast("B")) for f in encode(msg)])


def make_data(n=240, d1=5, d2=7, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x1 = rng.normal(size=(n, d1)).astype(np.float32)
    x2 = rng.normal(size=(n, d2)).astype(np.float32)
    w = rng.normal(size=(d1 + d2, classes))
    y = np.argmax(np.concatenate([x1, x2], 1) @ w, axis=1).astype(np.int64)
    return x1, x2, y


def run_split(window: int, epochs: int = 3, seed: int = 0, tmp=None):
    import tempfile
    from pathlib import Path

    tmp = Path(tempfile.mkdtemp(prefix="vfl-pipeline-"))
    x1, x2, y = make_data()
    n = len(y)
    ids = [f"p{i}" for i in range(n)]
    cfg = SessionConfig(cut_widths={"dh1": 4, "dh2": 4}, batch_size=32, window=window, model="m", psi=True, train=True)
    engine = PsiEngine(workers=1)
    plan = lambda: PsiPlan(encode_ids(ids), engine, chunk_size=128)  # noqa: E731 - every party knows every ID here
    lh = LabelHolderMachine(party="bank", run="r", config=cfg, now=0.0, psi=plan())
    dhs = {p: DataHolderMachine(party=p, run="r", config=cfg, now=0.0, psi=plan()) for p in ("dh1", "dh2")}
    features = {"dh1": x1, "dh2": x2}
    opt = OptimizerSpec(kind="sgd", lr=0.1, momentum=0.9)
    schedule = make_schedule(n, 32, epochs, seed=seed, validation_fraction=0.25)
    bottoms, top_holder, history = {}, {}, []
    # queue of (who produced it, output); "bank" or a data holder's party id
    queue = [(p, o) for p, d in dhs.items() for o in d.start(0.0)]

    def deliver(origin, out):
        if isinstance(out, Send):
            if origin == "bank":
                dest = out.to.decode()
                return [(dest, o) for o in dhs[dest].receive(encode(out.message), 0.0)]
            return [("bank", o) for o in lh.receive(origin.encode(), origin, encode(out.message), 0.0)]
        if isinstance(out, EpochDone):
            history.append(out.metrics)
        if not isinstance(out, Aligned):
            return []
        if origin == "bank":  # the label holder's aligned rows: build the top and start training
            rows = out.rows
            top = build_mlp(8, MlpSpec(widths=(16, 3)), seed=3)
            seg = TorchTop(top=top, optimizer=opt.build(top.parameters()), combiner=Combiner([4, 4]),
                           order=["dh1", "dh2"], task="multiclass", targets=y[rows],
                           checkpointer=Checkpointer(tmp, "bank", "r", "m"))
            top_holder["top"], top_holder["rows"] = top, rows
            tp = TrainPlan(validation=schedule.validation, epoch_orders=[np.concatenate(e) for e in schedule.epochs])
            return [("bank", o) for o in lh.start_training(seg, tp, 0.0)]
        model = build_mlp(features[origin].shape[1], MlpSpec(widths=(6, 4)), seed=1 if origin == "dh1" else 2)
        bottoms[origin] = (model, out.rows)
        bottom = TorchBottom(model, opt.build(model.parameters()), features[origin][out.rows],
                             Checkpointer(tmp, origin, "r", "m"))
        return [(origin, o) for o in dhs[origin].start_training(bottom, len(out.rows), 0.0)]

    for _ in range(200_000):
        if not queue:
            queue = [(p, o) for p, d in dhs.items() if d.has_work for o in d.work(0.0)]
            queue += [("bank", o) for o in lh.work(0.0)] if lh.has_work else []
            if not queue:
                break
            continue
        origin, out = queue.pop(0)
        queue += deliver(origin, out)
    engine.close()
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    assert lh.finished is not None and lh.finished.exit_code == 0, lh.finished
    assert all(d.finished is not None and d.finished.exit_code == 0 for d in dhs.values())
    return bottoms, top_holder, history, (x1, x2, y, schedule, opt)


def test_window_1_equals_central_training_exactly():
    bottoms, top_holder, history, (x1, x2, y, schedule, opt) = run_split(window=1)
    rows = top_holder["rows"]
    assert np.array_equal(bottoms["dh1"][1], rows) and np.array_equal(bottoms["dh2"][1], rows)
    ref_bottoms = [build_mlp(5, MlpSpec(widths=(6, 4)), seed=1), build_mlp(7, MlpSpec(widths=(6, 4)), seed=2)]
    ref_top = build_mlp(8, MlpSpec(widths=(16, 3)), seed=3)
    central = train_central([x1[rows], x2[rows]], y[rows], ref_bottoms, ref_top, combiner=Combiner([4, 4]),
                            task="multiclass", schedule=schedule, bottom_optimizers=opt, top_optimizer=opt)
    for got, want in [(bottoms["dh1"][0].state_dict(), central.bottom_states[0]),
                      (bottoms["dh2"][0].state_dict(), central.bottom_states[1]),
                      (top_holder["top"].state_dict(), central.top_state)]:
        for k in want:
            assert torch.max(torch.abs(got[k] - want[k])).item() <= 1e-5, k
    assert len(history) == 3 and set(history[0]) >= {"train_loss", "train_accuracy", "val_loss", "val_accuracy"}


@pytest.mark.parametrize("window", [1, 2, 4])
def test_every_window_finishes_and_learns(window):
    _, _, history, _ = run_split(window=window, epochs=25)
    # the PSI's fresh keys make the row order, hence the 60 validation rows, differ per run: over many runs the best
    # of the last 3 epochs lies in 0.70-0.93 (chance is ~0.35), so 0.6 says "learned" without being flaky
    assert len(history) == 25 and max(h["val_accuracy"] for h in history[-3:]) > 0.6, history[-1]
