"""Model segments of the split network: bottom models, the top model, and the combiner at the cut layer.

A segment is described either by an :class:`MlpSpec` (built in) or by a ``"module:factory"`` string naming a callable
that takes ``in_features=`` and ``out_features=`` keyword arguments and returns a ``torch.nn.Module``.

Every party computes :func:`fingerprint` of :func:`architecture` from the shared config, so a HELLO can carry one
digest that proves all parties build the same network shape (it cannot prove that a factory's *code* is the same:
only its ``"module:factory"`` name is hashed).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import reduce
from typing import Any, Callable

import torch
from torch import nn

from .specs import canonical_json, fingerprint

__all__ = [
    "ACTIVATIONS",
    "COMBINE_MODES",
    "Combiner",
    "MlpSpec",
    "ModelError",
    "ModelSpec",
    "architecture",
    "build_mlp",
    "build_model",
    "canonical_json",
    "describe",
    "fingerprint",
    "resolve_factory",
    "spec_from_config",
]

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "sigmoid": nn.Sigmoid}
COMBINE_MODES = ("concat", "sum")


class ModelError(ValueError):
    """A model spec, factory or combiner cannot be used. ``str()`` is one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


# --------------------------------------------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class MlpSpec:
    """A plain MLP: ``Linear -> act [-> Dropout]`` per hidden layer, then a last ``Linear`` (``-> act`` if
    ``final_activation``). ``widths[-1]`` is the output width (the cut width for a bottom model)."""

    widths: tuple[int, ...]
    activation: str = "relu"
    dropout: float = 0.0
    final_activation: bool = False

    def __post_init__(self):
        widths = tuple(self.widths) if not isinstance(self.widths, int) else (self.widths,)
        if not widths:
            raise ModelError("MlpSpec.widths must name at least one layer width")
        for w in widths:
            if isinstance(w, bool) or not isinstance(w, int) or w < 1:
                raise ModelError(f"MlpSpec.widths must be positive integers, got {list(widths)!r}")
        object.__setattr__(self, "widths", widths)
        if self.activation not in ACTIVATIONS:
            raise ModelError(f"unknown activation {self.activation!r}; use one of {', '.join(ACTIVATIONS)}")
        dropout = float(self.dropout)
        if not 0.0 <= dropout < 1.0:
            raise ModelError(f"MlpSpec.dropout must be in [0, 1), got {self.dropout!r}")
        object.__setattr__(self, "dropout", dropout)
        if not isinstance(self.final_activation, bool):
            raise ModelError(f"MlpSpec.final_activation must be true or false, got {self.final_activation!r}")

    @property
    def out_features(self) -> int:
        return self.widths[-1]

    def to_dict(self) -> dict:
        return {"kind": "mlp", "widths": list(self.widths), "activation": self.activation,
                "dropout": self.dropout, "final_activation": self.final_activation}

    @classmethod
    def from_dict(cls, data: Mapping) -> MlpSpec:
        unknown = set(data) - {"kind", "widths", "activation", "dropout", "final_activation"}
        if unknown:
            raise ModelError(f"unknown MLP spec keys: {', '.join(sorted(map(str, unknown)))}")
        if data.get("kind", "mlp") != "mlp":
            raise ModelError(f"not an MLP spec: kind {data.get('kind')!r}")
        if "widths" not in data:
            raise ModelError("an MLP spec needs 'widths'")
        return cls(widths=tuple(data["widths"]), activation=data.get("activation", "relu"),
                   dropout=data.get("dropout", 0.0), final_activation=data.get("final_activation", False))


ModelSpec = MlpSpec | str  # a built-in MLP, or "module:factory"


def spec_from_config(value: Any) -> ModelSpec:
    """A spec from config data: an ``MlpSpec``, a mapping of its fields, or a ``"module:factory"`` string."""
    if isinstance(value, MlpSpec):
        return value
    if isinstance(value, str):
        _split_ref(value)
        return value
    if isinstance(value, Mapping):
        return MlpSpec.from_dict(value)
    raise ModelError(f"a model spec is an MLP table or a 'module:factory' string, got {type(value).__name__}")


def describe(spec: ModelSpec) -> dict:
    """The JSON-able description of a spec that goes into :func:`architecture`."""
    spec = spec_from_config(spec)
    if isinstance(spec, MlpSpec):
        return spec.to_dict()
    return {"kind": "factory", "ref": spec}


# ---------------------------------------------------------------------------------------------------------- building


def _init_linear(layer: nn.Linear, gen: torch.Generator) -> None:
    # the same distributions as nn.Linear.reset_parameters, drawn from a local generator
    nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=gen)
    bound = 1.0 / math.sqrt(layer.in_features) if layer.in_features > 0 else 0.0
    nn.init.uniform_(layer.bias, -bound, bound, generator=gen)


def _empty_linear(in_features: int, out_features: int) -> nn.Linear:
    """An ``nn.Linear`` with uninitialised weights: built on the meta device (no draw from the global RNG), then given
    real storage with ``torch.empty``. (``nn.utils.skip_init`` does the same through ``to_empty``, whose first call
    imports sympy via torch's reference ops: a third of a second per process.)"""
    layer = nn.Linear(in_features, out_features, device="meta")
    layer.weight = nn.Parameter(torch.empty(out_features, in_features))
    layer.bias = nn.Parameter(torch.empty(out_features))
    return layer


def _generator(seed: int | None) -> torch.Generator:
    gen = torch.Generator()
    if seed is None:
        gen.seed()  # fresh entropy; the global RNG is left alone
    else:
        gen.manual_seed(int(seed))
    return gen


def build_mlp(in_features: int, spec: MlpSpec | Mapping, *, seed: int | None = None) -> nn.Sequential:
    """Build the MLP of ``spec`` on ``in_features`` inputs, float32, initialised from a local generator seeded with
    ``seed`` (same seed -> same weights; the global torch RNG is neither used nor advanced)."""
    spec = spec if isinstance(spec, MlpSpec) else MlpSpec.from_dict(spec)
    if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
        raise ModelError(f"in_features must be a positive integer, got {in_features!r}")
    gen = _generator(seed)
    layers: list[nn.Module] = []
    prev = in_features
    last = len(spec.widths) - 1
    for i, width in enumerate(spec.widths):
        layer = _empty_linear(prev, width)
        with torch.no_grad():
            _init_linear(layer, gen)
        layers.append(layer)
        if i < last or spec.final_activation:
            layers.append(ACTIVATIONS[spec.activation]())
        if i < last and spec.dropout > 0:
            layers.append(nn.Dropout(spec.dropout))
        prev = width
    return nn.Sequential(*layers)


def _split_ref(ref: str) -> tuple[str, str]:
    module, sep, attr = ref.partition(":")
    if not sep or not module.strip() or not attr.strip() or ":" in attr:
        raise ModelError(f"model factory {ref!r} must look like 'package.module:factory'")
    return module.strip(), attr.strip()


def resolve_factory(ref: str) -> Callable[..., Any]:
    """Import ``"package.module:attr[.attr...]"`` and return the callable it names."""
    module_name, attr_path = _split_ref(ref)
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or whatever the module raises while importing
        raise ModelError(f"model factory {ref!r}: cannot import module {module_name!r}: "
                         f"{type(exc).__name__}: {exc}") from exc
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise ModelError(f"model factory {ref!r}: {getattr(obj, '__name__', module_name)!r} has no "
                             f"attribute {part!r}") from exc
    if not callable(obj):
        raise ModelError(f"model factory {ref!r} is a {type(obj).__name__}, not callable")
    return obj


def build_model(in_features: int, spec: ModelSpec | Mapping, *, out_features: int | None = None,
                seed: int | None = None) -> nn.Module:
    """Build one segment (a bottom or the top).

    MLP specs go to :func:`build_mlp` (``out_features``, when given, must equal ``widths[-1]``). A factory is called
    as ``factory(in_features=..., out_features=...)`` with the global torch RNG seeded with ``seed`` inside
    ``torch.random.fork_rng`` (so it is deterministic and the caller's RNG state is untouched); the result must be an
    ``nn.Module`` mapping a float32 ``[batch, in_features]`` input to ``[batch, out_features]``, which is checked
    with one dry forward pass in eval mode.
    """
    spec = spec_from_config(spec)
    if isinstance(spec, MlpSpec):
        if out_features is not None and out_features != spec.out_features:
            raise ModelError(f"MLP spec ends with width {spec.out_features}, but {out_features} outputs are "
                             "required here")
        return build_mlp(in_features, spec, seed=seed)
    if out_features is None:
        raise ModelError(f"model factory {spec!r}: out_features must be given")
    factory = resolve_factory(spec)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(int(seed))
        else:
            torch.seed()
        try:
            module = factory(in_features=in_features, out_features=out_features)
        except Exception as exc:
            raise ModelError(f"model factory {spec!r} raised {type(exc).__name__}: {exc}") from exc
        if not isinstance(module, nn.Module):
            raise ModelError(f"model factory {spec!r} returned {type(module).__name__}, expected a "
                             "torch.nn.Module")
        _check_shapes(spec, module, in_features, out_features)
    return module


def _check_shapes(ref: str, module: nn.Module, in_features: int, out_features: int) -> None:
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            out = module(torch.zeros(2, in_features, dtype=torch.float32))
    except Exception as exc:
        raise ModelError(f"model from {ref!r} fails on a float32 input of shape (2, {in_features}): "
                         f"{type(exc).__name__}: {exc}") from exc
    finally:
        module.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, out_features):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(f"model from {ref!r} maps shape (2, {in_features}) to {got}, expected "
                         f"(2, {out_features})")


def _shape_text(value: Any) -> str:
    return str(list(value.shape)) if isinstance(value, torch.Tensor) else f"a {type(value).__name__}, not a tensor"


def load_weights(module: nn.Module, state: Any, what: str, *keys: str) -> None:
    """Put the weights ``state[keys[0]][keys[1]]...`` (a ``state_dict`` in ``what``, e.g. a checkpoint file) into
    ``module`` if they fit.

    Every layer of ``module`` must be there with the same shape, and nothing else; otherwise ``ModelError`` names
    the first layer that differs and both shapes, and nothing is loaded (torch's own error is a multi-line dump
    raised halfway through the copy)."""
    for depth, key in enumerate(keys):
        if not isinstance(state, Mapping) or key not in state:
            raise ModelError(f"{what} has no {'/'.join(keys[:depth + 1])!r} weights, which the model in this config has")
        state = state[key]
    if not isinstance(state, Mapping):
        raise ModelError(f"{what} holds no weights at {'/'.join(keys)!r} (a {type(state).__name__})")
    own = module.state_dict()
    for name, tensor in own.items():
        if name not in state:
            raise ModelError(f"{what} has no layer {name!r}, which the model in this config has")
        theirs = state[name]
        if not isinstance(theirs, torch.Tensor) or tuple(theirs.shape) != tuple(tensor.shape):
            raise ModelError(
                f"layer {name!r} is {_shape_text(theirs)} in {what} but {list(tensor.shape)} in the model this config "
                "builds"
            )
    extra = [name for name in state if name not in own]
    if extra:
        raise ModelError(f"{what} has layer(s) {', '.join(map(repr, extra[:3]))} that the model in this config lacks")
    module.load_state_dict(state)


# -------------------------------------------------------------------------------------------------------- fingerprint


def architecture(bottoms: Mapping[str, ModelSpec | Mapping], top: ModelSpec | Mapping,
                 cut_widths: Mapping[str, int], combine: str = "concat",
                 order: Sequence[str] | None = None) -> dict:
    """The shared description of the split network: every party's bottom spec, the top spec, the cut widths, the
    combine mode and the party order at the cut layer (default: sorted party ids). The label holder appears here
    too if it has a bottom model of its own."""
    if combine not in COMBINE_MODES:
        raise ModelError(f"unknown combine mode {combine!r}; use one of {', '.join(COMBINE_MODES)}")
    parties = sorted(bottoms)
    if sorted(cut_widths) != parties:
        raise ModelError(f"bottom models are given for {parties} but cut widths for {sorted(cut_widths)}")
    order = list(order) if order is not None else parties
    if sorted(order) != parties:
        raise ModelError(f"order {order} must list each of {parties} once")
    widths = {}
    for p in parties:
        w = cut_widths[p]
        if isinstance(w, bool) or not isinstance(w, int) or w < 1:
            raise ModelError(f"cut width of {p!r} must be a positive integer, got {w!r}")
        spec = spec_from_config(bottoms[p])
        if isinstance(spec, MlpSpec) and spec.out_features != w:
            raise ModelError(f"bottom model of {p!r} ends with width {spec.out_features}, but its cut width is {w}")
        widths[p] = w
    Combiner([widths[p] for p in order], combine)  # validates sum-mode widths
    return {
        "bottoms": {p: describe(bottoms[p]) for p in parties},
        "top": describe(top),
        "cut_widths": widths,
        "combine": combine,
        "order": order,
    }


# ----------------------------------------------------------------------------------------------------------- combiner


class Combiner:
    """The cut layer: combines the holders' activations into the top model's input, and splits the gradient back.

    ``concat`` (default): ``cat(acts, dim=1)``; the top sees ``sum(widths)`` features; each holder gets its column
    slice of the gradient. ``sum``: ``acts[0] + acts[1] + ...`` (left to right); all widths equal; every holder gets
    the whole gradient. Activations are in ``widths`` order (the agreed party order).
    """

    def __init__(self, widths: Sequence[int], mode: str = "concat"):
        widths = tuple(int(w) for w in widths)
        if not widths or any(w < 1 for w in widths):
            raise ModelError(f"cut widths must be one or more positive integers, got {list(widths)}")
        if mode not in COMBINE_MODES:
            raise ModelError(f"unknown combine mode {mode!r}; use one of {', '.join(COMBINE_MODES)}")
        if mode == "sum" and len(set(widths)) != 1:
            raise ModelError(f"combine mode 'sum' needs equal cut widths, got {list(widths)}")
        self.widths = widths
        self.mode = mode

    def __repr__(self) -> str:
        return f"Combiner(widths={list(self.widths)}, mode={self.mode!r})"

    @property
    def out_features(self) -> int:
        """Width of the top model's input."""
        return sum(self.widths) if self.mode == "concat" else self.widths[0]

    def combine(self, activations: Sequence[torch.Tensor]) -> torch.Tensor:
        """``[batch, widths[i]]`` tensors -> ``[batch, out_features]`` (differentiable)."""
        if len(activations) != len(self.widths):
            raise ModelError(f"expected {len(self.widths)} activation tensors, got {len(activations)}")
        batch = None
        for i, (a, w) in enumerate(zip(activations, self.widths)):
            if a.dim() != 2 or a.shape[1] != w:
                raise ModelError(f"activations {i} have shape {tuple(a.shape)}, expected (batch, {w})")
            if batch is None:
                batch = a.shape[0]
            elif a.shape[0] != batch:
                raise ModelError(f"activations {i} have batch size {a.shape[0]}, expected {batch}")
        if self.mode == "concat":
            return torch.cat(list(activations), dim=1)
        return reduce(lambda x, y: x + y, activations)

    __call__ = combine

    def split(self, grad: torch.Tensor) -> list[torch.Tensor]:
        """d(loss)/d(combined) -> each holder's d(loss)/d(its activations), C-contiguous. In sum mode every holder
        gets the same tensor object (nothing is copied)."""
        if grad.dim() != 2 or grad.shape[1] != self.out_features:
            raise ModelError(f"gradient has shape {tuple(grad.shape)}, expected (batch, {self.out_features})")
        if self.mode == "sum":
            return [grad] * len(self.widths)
        return [g.contiguous() for g in torch.split(grad, list(self.widths), dim=1)]
