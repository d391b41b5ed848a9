"""vfl.train.optim: SGD and Adam bit-identical to torch.optim's single-tensor versions, with torch's state dicts;
and the torch-free vfl.train.specs (config checks and the demo must not import torch)."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

from vfl.train.models import build_mlp
from vfl.train.optim import SGD, Adam
from vfl.train.specs import OptimizerSpec

SPECS = {
    "sgd": OptimizerSpec("sgd", lr=0.1),
    "sgd-wd": OptimizerSpec("sgd", lr=0.05, weight_decay=1e-3),
    "sgd-momentum": OptimizerSpec("sgd", lr=0.05, momentum=0.9, weight_decay=1e-3),
    "sgd-nesterov": OptimizerSpec("sgd", lr=0.05, momentum=0.5, nesterov=True),
    "adam": OptimizerSpec("adam", lr=0.01),
    "adam-wd": OptimizerSpec("adam", lr=0.003, weight_decay=1e-4, betas=(0.8, 0.99), eps=1e-6),
}


def _torch_optimizer(spec: OptimizerSpec, params) -> torch.optim.Optimizer:
    if spec.kind == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay,
                               nesterov=spec.nesterov, foreach=False)
    return torch.optim.Adam(params, lr=spec.lr, betas=spec.betas, eps=spec.eps, weight_decay=spec.weight_decay,
                            foreach=False)


def _loss(model: torch.nn.Module, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(16, 5, generator=gen)
    y = torch.randn(16, 3, generator=gen)
    return ((model(x) - y) ** 2).mean()


def _train(model, optimizer, steps: range) -> list[float]:
    losses = []
    for step in steps:
        optimizer.zero_grad(set_to_none=True)
        loss = _loss(model, step)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def _assert_same_params(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name


@pytest.mark.parametrize("name", sorted(SPECS))
def test_bit_identical_to_torch_optim(name):
    spec = SPECS[name]
    ours_model = build_mlp(5, {"widths": [8, 3]}, seed=3)
    ref_model = copy.deepcopy(ours_model)
    ours = spec.build(ours_model.parameters())
    assert isinstance(ours, SGD if spec.kind == "sgd" else Adam)
    ref = _torch_optimizer(spec, ref_model.parameters())
    for step in range(40):  # bitwise equal after every single step, not only at the end
        assert _train(ours_model, ours, range(step, step + 1)) == _train(ref_model, ref, range(step, step + 1))
        _assert_same_params(ours_model, ref_model)


@pytest.mark.parametrize("name", ["sgd-momentum", "adam-wd"])
def test_state_dict_round_trips_with_torch(name):
    spec = SPECS[name]
    model = build_mlp(5, {"widths": [8, 3]}, seed=4)
    ours = spec.build(model.parameters())
    _train(model, ours, range(5))
    saved, saved_model = copy.deepcopy(ours.state_dict()), copy.deepcopy(model.state_dict())

    # our state dict continues in torch.optim, and torch's continues here: both give the same weights
    torch_model = build_mlp(5, {"widths": [8, 3]}, seed=0)
    torch_model.load_state_dict(saved_model)
    ref = _torch_optimizer(spec, torch_model.parameters())
    ref.load_state_dict(copy.deepcopy(saved))
    assert ref.state_dict()["param_groups"] == saved["param_groups"]
    _train(model, ours, range(5, 12))
    _train(torch_model, ref, range(5, 12))
    _assert_same_params(model, torch_model)

    again_model = build_mlp(5, {"widths": [8, 3]}, seed=0)
    again_model.load_state_dict(torch_model.state_dict())
    again = spec.build(again_model.parameters())
    again.load_state_dict(copy.deepcopy(ref.state_dict()))
    _train(again_model, again, range(12, 20))
    _train(torch_model, ref, range(12, 20))
    _assert_same_params(again_model, torch_model)


def test_zero_grad_and_errors():
    model = build_mlp(5, {"widths": [3]}, seed=1)
    opt = SGD(model.parameters(), lr=0.1)
    _loss(model, 0).backward()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    opt.step()  # no gradients: nothing moves, no state
    assert opt.state == {} and opt.step(lambda: 7.0) == 7.0
    with pytest.raises(ValueError, match="empty parameter list"):
        Adam([])
    with pytest.raises(ValueError, match="Nesterov"):
        SGD(model.parameters(), nesterov=True)
    with pytest.raises(ValueError, match="different number of parameter groups"):
        opt.load_state_dict({"state": {}, "param_groups": []})
    adam = Adam(model.parameters())
    amsgrad = torch.optim.Adam(model.parameters(), amsgrad=True, foreach=False).state_dict()
    with pytest.raises(ValueError, match="amsgrad"):
        adam.load_state_dict(amsgrad)


@pytest.mark.parametrize("bad", [{"kind": "sgd", "momentum": -1}, {"kind": "adam", "betas": [0.9, 1.0]},
                                 {"kind": "adam", "eps": -1e-8}, {"kind": "sgd", "nesterov": True},
                                 {"kind": "sgd", "weight_decay": -0.1}])
def test_spec_rejects_what_the_optimizer_would(bad):
    with pytest.raises(ValueError):
        OptimizerSpec.from_dict(bad)


def test_specs_config_and_demo_need_neither_torch_nor_sklearn():
    code = ("import sys; import vfl.train, vfl.node.config, vfl.launch.demo; "
            "vfl.train.OptimizerSpec.from_dict({'kind': 'adam', 'lr': 0.01}); vfl.train.fingerprint({'a': 1}); "
            "bad = [m for m in ('torch', 'sklearn') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_training_imports_neither_dynamo_nor_sympy():
    """Each costs a node about half a second to a second of start-up (torch.optim imports torch._dynamo;
    nn.utils.skip_init and backward(grad) import sympy through torch.fx)."""
    code = ("import sys, torch; from vfl.train.models import build_mlp; from vfl.train.central import pullback; "
            "from vfl.train.specs import OptimizerSpec; m = build_mlp(4, {'widths': [3, 2]}, seed=0); "
            "opt = OptimizerSpec('adam', lr=0.01).build(m.parameters()); "
            "[(opt.zero_grad(), pullback(m(torch.ones(3, 4)), torch.ones(3, 2)).backward(), opt.step()) "
            "for _ in range(2)]; opt.load_state_dict(opt.state_dict()); "
            "bad = [m for m in ('torch._dynamo', 'sympy') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
