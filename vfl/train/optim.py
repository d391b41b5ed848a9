"""SGD and Adam for the segments: torch's single-tensor arithmetic, without torch.optim's start-up cost.

Every ``torch.optim`` optimizer imports ``torch._dynamo`` the first time it is built and on every ``step`` (about a
second of CPU per process; a node needs none of it). These two classes perform exactly the tensor operations of
``torch.optim.SGD`` / ``torch.optim.Adam`` with ``foreach=False`` (``_single_tensor_sgd`` / ``_single_tensor_adam``,
no AMSGrad, no ``maximize``, real floating-point parameters), in the same order, so results are bit-identical to them
(``tests/train/test_optim.py`` checks it step by step). They offer the part of the optimizer interface the nodes and
the central reference use: ``param_groups``, ``state``, ``zero_grad``, ``step``, ``state_dict`` and
``load_state_dict``, with state dicts in torch's layout (a checkpoint written by either loads into the other).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Callable

import torch

__all__ = ["Adam", "Optimizer", "SGD"]

# the param-group flags torch writes into its state dicts (so a state dict loads into either implementation)
_ADAM_FLAGS = {"amsgrad": False, "maximize": False, "foreach": False, "capturable": False, "differentiable": False,
               "fused": None, "decoupled_weight_decay": False}
_SGD_FLAGS = {"maximize": False, "foreach": False, "differentiable": False, "fused": None}
# the flags that change the arithmetic: a state dict that turns one on cannot be continued here
_UNSUPPORTED = ("amsgrad", "maximize", "decoupled_weight_decay")


class Optimizer:
    """The base of SGD and Adam: one parameter group; ``state`` maps each parameter that has stepped to its tensors
    (as in torch)."""

    _flags: dict[str, Any] = {}

    def __init__(self, params: Iterable[torch.Tensor], defaults: dict[str, Any]):
        if isinstance(params, torch.Tensor):
            raise TypeError("params must be an iterable of tensors, got a single tensor")
        params = list(params)
        if not params:
            raise ValueError("optimizer got an empty parameter list")
        for p in params:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"optimizer can only optimize tensors, got {type(p).__name__}")
            if not p.is_leaf:
                raise ValueError("can't optimize a non-leaf Tensor")
            if not p.is_floating_point():
                raise ValueError(f"{type(self).__name__} optimizes real floating-point tensors, got {p.dtype}")
        if len({id(p) for p in params}) != len(params):
            raise ValueError("optimizer got the same parameter twice")
        self.defaults = {**defaults, **self._flags}
        self.param_groups: list[dict[str, Any]] = [{**self.defaults, "params": params}]
        self.state: dict[torch.Tensor, dict[str, Any]] = {}

    def __repr__(self) -> str:
        group = {k: v for k, v in self.param_groups[0].items() if k != "params" and k not in self._flags}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in group.items())})"

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.param_groups[0]["params"]:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                if p.grad.grad_fn is not None:
                    p.grad.detach_()
                else:
                    p.grad.requires_grad_(False)
                p.grad.zero_()

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Update every parameter that has a gradient; returns ``closure()`` (evaluated first) if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            group = self.param_groups[0]
            for p in group["params"]:
                if p.grad is not None:
                    if p.grad.is_sparse:
                        raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                    self._update(p, p.grad, group)
        return loss

    def _update(self, param: torch.Tensor, grad: torch.Tensor, group: dict[str, Any]) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """``{"state": {index: {...}}, "param_groups": [{..., "params": [indices]}]}``; the state tensors are the
        live ones (not copies), as with torch."""
        params = self.param_groups[0]["params"]
        index = {id(p): i for i, p in enumerate(params)}
        group = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        group["params"] = list(range(len(params)))
        return {"state": {index[id(p)]: s for p, s in self.state.items()}, "param_groups": [group]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state dict of this optimizer (or of the torch optimizer it mirrors) over the same parameters."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != 1:
            raise ValueError("loaded state dict has a different number of parameter groups")
        params = self.param_groups[0]["params"]
        saved = saved_groups[0]
        if len(saved["params"]) != len(params):
            raise ValueError("loaded state dict contains a parameter group that doesn't match the size of "
                             "optimizer's group")
        for key in _UNSUPPORTED:
            if saved.get(key):
                raise ValueError(f"loaded state dict has {key}={saved[key]!r}, which {type(self).__name__} does not "
                                 "support")
        by_id = dict(zip(saved["params"], params))
        state: dict[torch.Tensor, dict[str, Any]] = {}
        for k, values in state_dict["state"].items():
            if k in by_id:
                p = by_id[k]
                state[p] = {name: _cast(p, name, v) for name, v in values.items()}
        group = {k: v for k, v in saved.items() if k != "params" and k != "param_names"}
        self.param_groups = [{**group, **self._flags, "params": params}]
        self.state = state


def _cast(param: torch.Tensor, name: str, value: Any) -> Any:
    # torch's policy: "step" stays as saved; other state tensors take the parameter's dtype and device
    if not isinstance(value, torch.Tensor) or name == "step":
        return value
    return value.to(dtype=param.dtype, device=param.device)


def _non_negative(**values: float) -> None:
    for name, value in values.items():
        if not value >= 0.0:
            raise ValueError(f"Invalid {name} value: {value}")


def _step_dtype() -> torch.dtype:
    # torch.optim.optimizer._get_scalar_dtype()
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class SGD(Optimizer):
    """``torch.optim.SGD(..., foreach=False)``: lr, momentum, dampening, weight_decay (L2), nesterov."""

    _flags = _SGD_FLAGS

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False):
        _non_negative(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        super().__init__(params, {"lr": lr, "momentum": momentum, "dampening": dampening,
                                  "weight_decay": weight_decay, "nesterov": nesterov})

    def _update(self, param: torch.Tensor, grad: torch.Tensor, group: dict[str, Any]) -> None:
        weight_decay, momentum, lr = group["weight_decay"], group["momentum"], group["lr"]
        if weight_decay != 0:
            grad = grad.add(param, alpha=weight_decay)
        if momentum != 0:
            state = self.state.setdefault(param, {})
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = grad.detach().clone()
                state["momentum_buffer"] = buf
            else:
                buf.mul_(momentum).add_(grad, alpha=1 - group["dampening"])
            grad = grad.add(buf, alpha=momentum) if group["nesterov"] else buf
        param.add_(grad, alpha=-lr)


class Adam(Optimizer):
    """``torch.optim.Adam(..., foreach=False)``: lr, betas, eps, weight_decay (L2 added to the gradient)."""

    _flags = _ADAM_FLAGS

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        _non_negative(lr=lr, eps=eps, weight_decay=weight_decay)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Invalid betas: {betas} (two numbers in [0, 1))")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    def _update(self, param: torch.Tensor, grad: torch.Tensor, group: dict[str, Any]) -> None:
        state = self.state.get(param)
        if not state:
            state = self.state[param] = {
                "step": torch.tensor(0.0, dtype=_step_dtype()),  # a CPU scalar tensor, as torch keeps it
                "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
            }
        lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        exp_avg, exp_avg_sq, step_t = state["exp_avg"], state["exp_avg_sq"], state["step"]
        step_t += 1
        if weight_decay != 0:
            grad = grad.add(param, alpha=weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step = step_t.item()
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = lr / bias_correction1
        bias_correction2_sqrt = bias_correction2**0.5
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        param.addcdiv_(exp_avg, denom, value=-step_size)
