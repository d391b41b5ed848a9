"""A segment holder's middle segment (``TorchMiddle``, segment chains): data holders' bottoms -> a middle segment ->
the label holder's top.

With one step in flight (W = 1) the split chain is synchronous SGD of the composed network, i.e. ``train_central``
with the top ``nn.Sequential(middle, top)``; with two in flight each step's gradient is taken through the weights its
forward used (weight stashing). The input gradients it returns are torch autograd's of the composed function;
checkpoints round-trip model and optimizer; inputs that do not fit are refused with ``ValueError``.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from vfl.node.checkpoints import Checkpointer
from vfl.protocol.training_phase import CheckpointError
from vfl.train.central import OptimizerSpec, task_loss, train_central
from vfl.train.models import Combiner, ModelError, build_model
from vfl.train.segments import TorchBottom, TorchMiddle, TorchTop, middle_in_features

N, D = 96, {"dh1": 5, "dh2": 3}
CUT = {"concat": {"dh1": 6, "dh2": 4}, "sum": {"dh1": 6, "dh2": 6}}
CLASSES = 3
SGD = {"kind": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.01}
RNG = np.random.default_rng(7)
X = {p: RNG.normal(size=(N, d)).astype(np.float32) for p, d in D.items()}
Y = RNG.integers(0, CLASSES, size=N).astype(np.int64)
BATCHES = [RNG.choice(N, 16, replace=False) for _ in range(8)]


def spec(optimizer=SGD) -> OptimizerSpec:
    return OptimizerSpec.from_dict(optimizer)


def modules(combine: str, middle_spec=None, seed: int = 3):
    """Fresh bottoms, middle and top (the same weights for the same arguments)."""
    cut = CUT[combine]
    bottoms = {p: build_model(D[p], {"widths": [8, cut[p]]}, seed=seed + i) for i, p in enumerate(D)}
    middle = build_model(middle_in_features(cut, combine), middle_spec or {"widths": [12, 7], "activation": "tanh"},
                         out_features=7, seed=seed + 10)
    top = build_model(7, {"widths": [CLASSES]}, seed=seed + 20)
    return bottoms, middle, top


class Chain:
    """The split chain as the nodes run it: TorchBottom per data holder -> TorchMiddle -> TorchTop."""

    def __init__(self, combine: str = "concat", optimizer=SGD, middle_spec=None, checkpointer=None, dropout_seed=None):
        bottoms, middle, top = modules(combine, middle_spec)
        self.bottoms = {p: TorchBottom(m, spec(optimizer).build(m.parameters()), X[p]) for p, m in bottoms.items()}
        self.middle = TorchMiddle(middle, spec(optimizer).build(middle.parameters()), CUT[combine], combine,
                                  checkpointer=checkpointer, dropout_seed=dropout_seed)
        self.top = TorchTop(top=top, optimizer=spec(optimizer).build(top.parameters()), combiner=Combiner([7]),
                            order=["seg1"], task="multiclass", targets=Y)

    def up(self, s: int) -> None:
        """Step ``s`` forward through the bottoms and the middle, and the top's step (its gradient kept)."""
        rows = BATCHES[s % len(BATCHES)]
        acts = {p: b.forward(s, rows, True) for p, b in self.bottoms.items()}
        out = self.middle.forward(s, acts, True)
        self.grad_of = getattr(self, "grad_of", {})
        self.grad_of[s] = self.top.train_step(s, rows, {"seg1": out})["seg1"]

    def down(self, s: int) -> None:
        """Step ``s``'s gradient back through the middle and the bottoms."""
        for p, g in self.middle.backward(s, self.grad_of.pop(s)).items():
            self.bottoms[p].backward(s, g)

    def run(self, steps: int, window: int) -> Chain:
        """``window`` steps in flight: the forward of step s + W - 1 comes before the backward of step s."""
        for s in range(steps + window - 1):
            if s < steps:
                self.up(s)
            if s - window + 1 >= 0:
                self.down(s - window + 1)
        self.top.settle()
        return self

    def weights(self) -> dict[str, torch.Tensor]:
        out = {f"{p}.{k}": v for p, b in self.bottoms.items() for k, v in b.model.state_dict().items()}
        out.update({f"middle.{k}": v for k, v in self.middle.model.state_dict().items()})
        out.update({f"top.{k}": v for k, v in self.top.top.state_dict().items()})
        return out


def central(combine: str, steps: int, optimizer=SGD) -> dict[str, torch.Tensor]:
    """``train_central`` of the chain: the middle and the top as one ``nn.Sequential`` top, one optimizer over both."""
    bottoms, middle, top = modules(combine)
    cut = CUT[combine]
    result = train_central([X[p] for p in D], Y, list(bottoms.values()), nn.Sequential(middle, top),
                           combiner=Combiner([cut[p] for p in D], combine), task="multiclass",
                           schedule=[BATCHES[:steps]], bottom_optimizers=spec(optimizer), top_optimizer=spec(optimizer))
    out = {f"{p}.{k}": v for p, state in zip(D, result.bottom_states) for k, v in state.items()}
    for k, v in result.top_state.items():
        part, name = k.split(".", 1)
        out[("middle." if part == "0" else "top.") + name] = v
    return out


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=tol, rtol=0), (k, (a[k] - b[k]).abs().max())


@pytest.mark.parametrize("combine", ["concat", "sum"])
@pytest.mark.parametrize("optimizer", [SGD, {"kind": "adam", "lr": 0.01, "weight_decay": 0.001}])
def test_one_step_in_flight_equals_central_training_of_the_composed_chain(combine, optimizer, one_thread):
    """W = 1: every parameter of bottoms, middle and top after 8 steps equals train_central with top =
    Sequential(middle, top), whose single optimizer over middle + top equals the split chain's two (per-parameter
    state: momentum, weight decay, Adam's moments)."""
    chain = Chain(combine, optimizer).run(8, window=1)
    untrained = Chain(combine, optimizer).weights()
    assert all(not torch.equal(chain.weights()[k], untrained[k]) for k in untrained)  # everything trained
    assert_close(chain.weights(), central(combine, 8, optimizer))


class StashReference:
    """Weight stashing written independently: at each forward a deep copy of the middle module is taken and run with
    plain autograd; its backward takes the gradient on that copy and applies it to the live module's optimizer."""

    def __init__(self, middle: TorchMiddle, stash: bool = True):
        self.stash = stash  # False: the gradient is taken at the live weights of the backward (no weight stashing)
        self.model = copy.deepcopy(middle.model)
        self.optimizer = spec().build(self.model.parameters())
        self.order, self.combiner = middle.order, middle.combiner
        self.copies: dict[int, tuple[nn.Module, torch.Tensor, torch.Tensor]] = {}

    def forward(self, s: int, acts: dict[str, np.ndarray]) -> np.ndarray:
        snapshot = copy.deepcopy(self.model)
        x = self.combiner.combine([torch.from_numpy(acts[p].copy()) for p in self.order]).requires_grad_(True)
        out = snapshot(x)
        self.copies[s] = (snapshot, x, out)
        return out.detach().numpy()

    def backward(self, s: int, grad: np.ndarray) -> dict[str, np.ndarray]:
        snapshot, x, out = self.copies.pop(s)
        if not self.stash:
            snapshot = copy.deepcopy(self.model)
            x = x.detach().requires_grad_(True)
            out = snapshot(x)
        out.backward(torch.from_numpy(grad))
        self.optimizer.zero_grad()
        for live, used in zip(self.model.parameters(), snapshot.parameters()):
            live.grad = used.grad
        self.optimizer.step()
        return dict(zip(self.order, (g.numpy() for g in self.combiner.split(x.grad))))


def test_two_steps_in_flight_take_each_gradient_through_the_weights_its_forward_used(one_thread):
    """W = 2 (forward s + 1 before backward s): the middle's outputs, input gradients and weights are those of the
    reference that keeps a copy of the weights per step; the chain trains (finite) and differs from W = 1."""
    rng = np.random.default_rng(1)
    _, model, _ = modules("concat")
    middle = TorchMiddle(model, spec().build(model.parameters()), CUT["concat"])
    ref = StashReference(middle)
    acts = [{p: rng.normal(size=(16, w)).astype(np.float32) for p, w in CUT["concat"].items()} for _ in range(6)]
    grads = [rng.normal(size=(16, 7)).astype(np.float32) for _ in range(6)]
    outs: dict[int, np.ndarray] = {}
    for s in range(7):
        if s < 6:
            outs[s] = middle.forward(s, acts[s], True)
            assert np.allclose(outs[s], ref.forward(s, acts[s]), atol=1e-6)
        if s >= 1:
            got, want = middle.backward(s - 1, grads[s - 1]), ref.backward(s - 1, grads[s - 1])
            for p in want:
                assert np.allclose(got[p], want[p], atol=1e-6), (s, p)
    for a, b in zip(middle.model.parameters(), ref.model.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    # without the stash (the gradient of step s at the weights live at its backward) the result is another one
    unstashed = StashReference(TorchMiddle(modules("concat")[1], spec().build(model.parameters()), CUT["concat"]),
                               stash=False)
    for s in range(7):
        if s < 6:
            unstashed.forward(s, acts[s])
        if s >= 1:
            unstashed.backward(s - 1, grads[s - 1])
    assert any(not torch.allclose(a, b, atol=1e-4) for a, b in zip(middle.model.parameters(),
                                                                   unstashed.model.parameters()))

    w1, w2 = Chain().run(8, window=1).weights(), Chain().run(8, window=2).weights()
    assert all(torch.isfinite(v).all() for v in w2.values())
    assert any(not torch.allclose(w1[k], w2[k], atol=1e-6) for k in w1)


@pytest.mark.parametrize("combine", ["concat", "sum"])
def test_the_input_gradients_are_autograd_of_the_composed_function(combine):
    """What each input is sent is d loss / d its activations of loss(top(middle(combine(a_1, a_2)))), at the weights
    of the forward; C-contiguous float32 of the input's shape."""
    rng = np.random.default_rng(2)
    _, model, top = modules(combine)
    before = copy.deepcopy(model)
    middle = TorchMiddle(model, spec().build(model.parameters()), CUT[combine], combine)
    acts = {p: rng.normal(size=(10, w)).astype(np.float32) for p, w in CUT[combine].items()}
    for a in acts.values():
        a.flags.writeable = False  # as received from the wire
    y = torch.from_numpy(rng.integers(0, CLASSES, size=10))
    out = torch.from_numpy(middle.forward(0, acts, True)).requires_grad_(True)
    task_loss("multiclass")(top(out), y).backward()
    got = middle.backward(0, out.grad.numpy())

    leaves = {p: torch.from_numpy(a.copy()).requires_grad_(True) for p, a in acts.items()}
    combined = Combiner(list(CUT[combine].values()), combine).combine([leaves[p] for p in CUT[combine]])
    want = torch.autograd.grad(task_loss("multiclass")(top(before(combined)), y), list(leaves.values()))
    assert list(got) == list(CUT[combine])
    for (p, g), w in zip(got.items(), want):
        assert g.dtype == np.float32 and g.flags.c_contiguous and g.shape == acts[p].shape
        assert np.allclose(g, w.numpy(), atol=1e-6), p


def test_eval_forward_keeps_nothing_and_changes_nothing():
    _, model, _ = modules("concat", {"widths": [12, 7], "dropout": 0.5})
    middle = TorchMiddle(model, spec().build(model.parameters()), CUT["concat"])
    acts = {p: np.ones((4, w), np.float32) for p, w in CUT["concat"].items()}
    a, b = middle.forward(0, acts, False), middle.forward(0, acts, False)
    assert np.array_equal(a, b) and a.shape == (4, 7) and a.dtype == np.float32  # eval mode: no dropout
    assert not middle._stash


def test_dropout_is_seeded_per_step_whatever_came_before(one_thread):
    """A step's dropout mask depends on the dropout seed and the step only: not on the steps in flight before it or
    on the global RNG; so a rerun with the same seed trains the same chain, another seed another one."""
    dropout = {"widths": [12, 7], "activation": "relu", "dropout": 0.5}
    acts = {p: np.ones((8, w), np.float32) for p, w in CUT["concat"].items()}

    def middle():
        model = modules("concat", dropout)[1]
        return TorchMiddle(model, spec().build(model.parameters()), CUT["concat"], dropout_seed=5)

    busy, fresh = middle(), middle()
    for s in range(3):
        busy.forward(s, acts, True)
    torch.rand(5)
    assert np.array_equal(busy.forward(3, acts, True), fresh.forward(3, acts, True))
    assert not np.array_equal(fresh.forward(3, acts, True), fresh.forward(4, acts, True))
    w1 = Chain(middle_spec=dropout, dropout_seed=5).run(6, window=1)
    again = Chain(middle_spec=dropout, dropout_seed=5).run(6, window=1)
    assert_close(w1.weights(), again.weights(), tol=0)
    other = Chain(middle_spec=dropout, dropout_seed=6).run(6, window=1)
    assert any(not torch.equal(w1.weights()[k], other.weights()[k]) for k in w1.weights())


def test_a_factory_segment_builds_on_the_combined_width():
    """A ``[model].segment`` factory is built like a bottom's: on the combined width, to the segment's width."""
    model = build_model(middle_in_features(CUT["concat"], "concat"), "torch.nn:Linear", out_features=7, seed=1)
    middle = TorchMiddle(model, spec().build(model.parameters()), CUT["concat"])
    assert middle.in_features == 10 and middle_in_features(CUT["sum"], "sum") == 6
    out = middle.forward(0, {p: np.ones((3, w), np.float32) for p, w in CUT["concat"].items()}, True)
    assert out.shape == (3, 7)
    assert set(middle.backward(0, np.ones((3, 7), np.float32))) == {"dh1", "dh2"}


def test_checkpoint_and_restore_round_trip_model_and_optimizer(tmp_path, one_thread):
    """A checkpoint at step 4 restored after 4 more steps gives back the weights and the optimizer's momentum: the
    steps after it repeat exactly; the file is the segment holder's own ``PARTY-step-STEP.pt``."""
    chain = Chain(checkpointer=Checkpointer(tmp_path, "seg1", "run-1", "m1"))
    chain.run(4, window=1)
    digest = chain.middle.checkpoint(4, 0)
    assert (tmp_path / "seg1-step-4.pt").is_file()
    saved = {k: v.clone() for k, v in chain.middle.model.state_dict().items()}
    momentum = [chain.middle.optimizer.state[p]["momentum_buffer"].clone() for p in chain.middle.model.parameters()]
    acts = {p: np.full((16, w), 0.5, np.float32) for p, w in CUT["concat"].items()}
    grad = np.full((16, 7), 0.1, np.float32)
    chain.middle.forward(4, acts, True)
    chain.middle.backward(4, grad)
    after = chain.middle.model.state_dict()
    chain.middle.forward(5, acts, True)  # in flight at the rollback: dropped
    chain.middle.restore(4, digest)
    assert not chain.middle._stash
    assert_close(chain.middle.model.state_dict(), saved, tol=0)
    for p, m in zip(chain.middle.model.parameters(), momentum):
        assert torch.equal(chain.middle.optimizer.state[p]["momentum_buffer"], m)
    chain.middle.forward(4, acts, True)
    chain.middle.backward(4, grad)
    assert_close(chain.middle.model.state_dict(), after, tol=0)


def test_a_checkpoint_of_another_shape_is_refused(tmp_path):
    ck = Checkpointer(tmp_path, "seg1", "run-1", "m1")
    _, model, _ = modules("concat")
    digest = TorchMiddle(model, spec().build(model.parameters()), CUT["concat"], checkpointer=ck).checkpoint(0, 0)
    other = build_model(middle_in_features(CUT["sum"], "sum"), {"widths": [12, 7]}, seed=1)
    wrong = TorchMiddle(other, spec().build(other.parameters()), CUT["sum"], "sum", checkpointer=ck)
    with pytest.raises(CheckpointError, match=r"'seg1' cannot resume from step 0: layer '0.weight' is \[12, 10\]"):
        wrong.restore(0, digest)


GOOD = {"dh1": np.zeros((4, 6), np.float32), "dh2": np.zeros((4, 4), np.float32)}


@pytest.mark.parametrize("activations, message", [
    ({"dh1": GOOD["dh1"]}, r"combines the activations of \['dh1', 'dh2'\], got \['dh1'\]"),
    ({**GOOD, "dh3": GOOD["dh2"]}, r"got \['dh1', 'dh2', 'dh3'\]"),
    ({**GOOD, "dh2": np.zeros((4, 5), np.float32)}, r"'dh2' must be float32 \[n, 4\], got float32 \[4, 5\]"),
    ({**GOOD, "dh2": np.zeros((4, 4), np.float64)}, r"'dh2' must be float32 \[n, 4\], got float64 \[4, 4\]"),
    ({**GOOD, "dh2": np.zeros(4, np.float32)}, r"'dh2' must be float32 \[n, 4\], got float32 \[4\]"),
    ({**GOOD, "dh2": [[0.0] * 4] * 4}, r"'dh2' must be float32 \[n, 4\], got a list"),
    ({**GOOD, "dh2": np.zeros((3, 4), np.float32)}, r"'dh2' have 3 rows, those of 'dh1' 4"),
    ([GOOD["dh1"], GOOD["dh2"]], r"got list"),
])
def test_inputs_that_do_not_fit_are_refused(activations, message):
    _, model, _ = modules("concat")
    middle = TorchMiddle(model, spec().build(model.parameters()), CUT["concat"])
    for train in (True, False):
        with pytest.raises(ValueError, match=message):
            middle.forward(0, activations, train)
    assert not middle._stash


def test_a_gradient_of_the_wrong_shape_is_refused_and_the_step_stays_in_flight():
    _, model, _ = modules("concat")
    middle = TorchMiddle(model, spec().build(model.parameters()), CUT["concat"])
    middle.forward(0, GOOD, True)
    with pytest.raises(ValueError, match=r"gradient of shape \(4, 6\) for activations of shape \(4, 7\)"):
        middle.backward(0, np.zeros((4, 6), np.float32))
    assert set(middle.backward(0, np.zeros((4, 7), np.float32))) == {"dh1", "dh2"}


@pytest.mark.parametrize("inputs, combine, message", [
    ({}, "concat", "at least one input"),
    ({"dh1": 0}, "concat", "positive widths"),
    ({"dh1": 4, "dh2": 5}, "sum", "equal cut widths"),
    ({"dh1": 4}, "max", "unknown combine mode"),
])
def test_a_segment_that_cannot_be_built_says_why(inputs, combine, message):
    model = nn.Linear(4, 2)
    with pytest.raises(ModelError, match=message):
        TorchMiddle(model, spec().build(model.parameters()), inputs, combine)
