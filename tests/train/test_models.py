"""vfl.train.models: MLP building, seeding, factories, the architecture fingerprint and the Combiner."""

from __future__ import annotations

import textwrap

import pytest
import torch
from torch import nn

from vfl.train.models import (
    Combiner,
    MlpSpec,
    ModelError,
    architecture,
    build_mlp,
    build_model,
    canonical_json,
    fingerprint,
    resolve_factory,
    spec_from_config,
)

# ---------------------------------------------------------------------------------------------------------------- MLP


def test_mlp_layers_and_shapes():
    m = build_mlp(5, MlpSpec((16, 8, 4), activation="tanh", dropout=0.25), seed=0)
    kinds = [type(layer).__name__ for layer in m]
    assert kinds == ["Linear", "Tanh", "Dropout", "Linear", "Tanh", "Dropout", "Linear"]
    assert [(layer.in_features, layer.out_features) for layer in m if isinstance(layer, nn.Linear)] == [
        (5, 16), (16, 8), (8, 4)]
    assert m(torch.zeros(3, 5)).shape == (3, 4)
    assert all(p.dtype == torch.float32 for p in m.parameters())


@pytest.mark.parametrize("act, cls", [("relu", nn.ReLU), ("gelu", nn.GELU), ("sigmoid", nn.Sigmoid)])
def test_mlp_final_activation(act, cls):
    m = build_mlp(3, MlpSpec((4,), activation=act, final_activation=True), seed=1)
    assert [type(x) for x in m] == [nn.Linear, cls]
    assert [type(x) for x in build_mlp(3, MlpSpec((4,)), seed=1)] == [nn.Linear]


def test_mlp_seed_reproducible_and_global_rng_untouched():
    spec = MlpSpec((8, 3))
    state = torch.get_rng_state()
    a = build_mlp(4, spec, seed=7)
    b = build_mlp(4, spec, seed=7)
    c = build_mlp(4, spec, seed=8)
    d = build_mlp(4, spec)  # seed=None: fresh entropy, still not the global RNG
    assert torch.equal(torch.get_rng_state(), state)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert not torch.equal(a[0].weight, c[0].weight)
    assert not torch.equal(a[0].weight, d[0].weight)
    # default nn.Linear distribution: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases
    bound = 1 / 4 ** 0.5
    assert a[0].weight.abs().max() <= bound and a[0].bias.abs().max() <= bound
    assert a[0].weight.std() > bound / 4


def test_mlp_spec_validation():
    with pytest.raises(ModelError, match="at least one layer"):
        MlpSpec(())
    with pytest.raises(ModelError, match="positive integers"):
        MlpSpec((4, 0))
    with pytest.raises(ModelError, match="unknown activation 'swish'"):
        MlpSpec((4,), activation="swish")
    with pytest.raises(ModelError, match="dropout"):
        MlpSpec((4,), dropout=1.0)
    with pytest.raises(ModelError, match="in_features"):
        build_mlp(0, MlpSpec((4,)))
    with pytest.raises(ModelError, match="unknown MLP spec keys: width"):
        MlpSpec.from_dict({"width": [4]})
    assert MlpSpec.from_dict({"widths": [4, 2], "activation": "gelu"}) == MlpSpec((4, 2), "gelu")
    assert spec_from_config(MlpSpec((2,)).to_dict()) == MlpSpec((2,))


def test_build_model_mlp_checks_out_features():
    assert build_model(3, {"widths": [5, 2]}, out_features=2, seed=0)(torch.zeros(1, 3)).shape == (1, 2)
    with pytest.raises(ModelError, match="ends with width 2, but 3 outputs"):
        build_model(3, MlpSpec((5, 2)), out_features=3)


# ----------------------------------------------------------------------------------------------------------- factories


@pytest.fixture
def factories(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def linear(*, in_features, out_features):
            return nn.Linear(in_features, out_features)

        def wrong_width(*, in_features, out_features):
            return nn.Linear(in_features, out_features + 1)

        def not_a_module(*, in_features, out_features):
            return 42

        def broken(*, in_features, out_features):
            raise RuntimeError("boom")

        class Zoo:
            @staticmethod
            def deep(*, in_features, out_features):
                return nn.Sequential(nn.Linear(in_features, 3), nn.ReLU(), nn.Linear(3, out_features))

        NOT_CALLABLE = 3
        """))
    (tmp_path / "bad_import.py").write_text("import does_not_exist_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_models"


def test_factory_builds_deterministically(factories):
    state = torch.get_rng_state()
    a = build_model(4, "my_models:linear", out_features=2, seed=3)
    b = build_model(4, "my_models:linear", out_features=2, seed=3)
    c = build_model(4, "my_models:linear", out_features=2, seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    assert isinstance(a, nn.Linear) and torch.equal(a.weight, b.weight) and not torch.equal(a.weight, c.weight)
    assert build_model(4, "my_models:Zoo.deep", out_features=2, seed=0)(torch.zeros(5, 4)).shape == (5, 2)


@pytest.mark.parametrize("ref, pattern", [
    ("no_such_module_xyz:make", r"cannot import module 'no_such_module_xyz': ModuleNotFoundError"),
    ("bad_import:make", r"cannot import module 'bad_import': ModuleNotFoundError: .*does_not_exist_anywhere"),
    ("my_models:missing", r"'my_models' has no attribute 'missing'"),
    ("my_models:Zoo.nothing", r"has no attribute 'nothing'"),
    ("my_models:NOT_CALLABLE", r"is a int, not callable"),
    ("my_models:not_a_module", r"returned int, expected a torch.nn.Module"),
    ("my_models:broken", r"raised RuntimeError: boom"),
    ("my_models:wrong_width", r"maps shape \(2, 4\) to \(2, 3\), expected \(2, 2\)"),
    ("my_models", r"must look like 'package.module:factory'"),
    (":make", r"must look like"),
])
def test_factory_errors(factories, ref, pattern):
    with pytest.raises(ModelError, match=pattern) as e:
        build_model(4, ref, out_features=2, seed=0)
    assert "\n" not in str(e.value)


def test_factory_needs_out_features(factories):
    with pytest.raises(ModelError, match="out_features must be given"):
        build_model(4, "my_models:linear")
    assert callable(resolve_factory("my_models:linear"))


# --------------------------------------------------------------------------------------------------------- fingerprint


def _arch(**over):
    kw = dict(bottoms={"dh1": MlpSpec((8, 4)), "dh2": {"widths": [6, 4], "activation": "tanh"},
                       "bank": "my_models:linear"},
              top=MlpSpec((16, 3)), cut_widths={"dh1": 4, "dh2": 4, "bank": 4}, combine="concat")
    kw.update(over)
    return architecture(**kw)


def test_fingerprint_stable_and_key_order_independent():
    a = _arch()
    fp = fingerprint(a)
    assert fp == fingerprint(_arch()) and len(fp) == 64 and int(fp, 16) >= 0
    reversed_keys = {k: a[k] for k in reversed(list(a))}
    reversed_keys["bottoms"] = {k: dict(reversed(list(v.items()))) for k, v in reversed(list(a["bottoms"].items()))}
    reversed_keys["cut_widths"] = dict(reversed(list(a["cut_widths"].items())))
    assert fingerprint(reversed_keys) == fp
    # party order in the inputs does not matter either: the default cut order is sorted party ids
    again = _arch(bottoms={"bank": "my_models:linear", "dh2": MlpSpec((6, 4), "tanh"), "dh1": MlpSpec((8, 4))},
                  cut_widths={"bank": 4, "dh2": 4, "dh1": 4})
    assert fingerprint(again) == fp
    assert a["order"] == ["bank", "dh1", "dh2"]


def test_fingerprint_golden_value():
    # pins the canonical form: changing it breaks every deployed config, so do it on purpose only
    desc = architecture({"dh1": MlpSpec((8, 4))}, MlpSpec((2,)), {"dh1": 4})
    assert canonical_json(desc) == (
        b'{"bottoms":{"dh1":{"activation":"relu","dropout":0.0,"final_activation":false,"kind":"mlp",'
        b'"widths":[8,4]}},"combine":"concat","cut_widths":{"dh1":4},"order":["dh1"],'
        b'"top":{"activation":"relu","dropout":0.0,"final_activation":false,"kind":"mlp","widths":[2]}}')
    assert fingerprint(desc) == fingerprint({"top": {"widths": [2], "kind": "mlp", "dropout": 0.0,
                                                     "final_activation": False, "activation": "relu"},
                                             "order": ("dh1",), "cut_widths": {"dh1": 4}, "combine": "concat",
                                             "bottoms": {"dh1": MlpSpec((8, 4))}})


def test_fingerprint_changes_with_architecture():
    fp = fingerprint(_arch())
    assert fingerprint(_arch(combine="sum")) != fp
    assert fingerprint(_arch(top=MlpSpec((16, 2)))) != fp
    assert fingerprint(_arch(order=["dh1", "dh2", "bank"])) != fp
    assert fingerprint(_arch(bottoms={"dh1": MlpSpec((8, 4), dropout=0.1), "dh2": {"widths": [6, 4],
                             "activation": "tanh"}, "bank": "my_models:linear"})) != fp


def test_architecture_errors():
    with pytest.raises(ModelError, match="ends with width 4, but its cut width is 5"):
        _arch(cut_widths={"dh1": 5, "dh2": 4, "bank": 4})
    with pytest.raises(ModelError, match="cut widths for"):
        _arch(cut_widths={"dh1": 4, "dh2": 4})
    with pytest.raises(ModelError, match="'sum' needs equal cut widths"):
        architecture({"a": MlpSpec((3,)), "b": MlpSpec((4,))}, MlpSpec((1,)), {"a": 3, "b": 4}, "sum")
    with pytest.raises(ModelError, match="unknown combine mode"):
        _arch(combine="mean")
    with pytest.raises(TypeError):
        fingerprint({"x": object()})
    with pytest.raises(TypeError):
        fingerprint({"x": float("nan")})


# ------------------------------------------------------------------------------------------------------------ combiner


def test_concat_combiner_matches_autograd():
    torch.manual_seed(0)
    acts = [torch.randn(5, w, requires_grad=True) for w in (2, 3, 1)]
    comb = Combiner([2, 3, 1])
    assert comb.out_features == 6
    z = comb.combine(acts)
    assert z.shape == (5, 6)
    g = torch.randn(5, 6)
    z.backward(g)
    parts = comb.split(g)
    for a, p in zip(acts, parts):
        assert p.is_contiguous() and torch.equal(a.grad, p)


def test_sum_combiner_matches_autograd():
    torch.manual_seed(0)
    acts = [torch.randn(4, 3, requires_grad=True) for _ in range(3)]
    comb = Combiner([3, 3, 3], "sum")
    assert comb.out_features == 3
    z = comb(acts)
    torch.testing.assert_close(z, acts[0] + acts[1] + acts[2], rtol=0, atol=0)
    g = torch.randn(4, 3)
    z.backward(g)
    for a, p in zip(acts, comb.split(g)):
        assert torch.equal(a.grad, p) and torch.equal(p, g)


def test_combiner_shape_errors():
    comb = Combiner([2, 3])
    with pytest.raises(ModelError, match="expected 2 activation tensors, got 1"):
        comb.combine([torch.zeros(1, 2)])
    with pytest.raises(ModelError, match=r"activations 1 have shape \(1, 2\), expected \(batch, 3\)"):
        comb.combine([torch.zeros(1, 2), torch.zeros(1, 2)])
    with pytest.raises(ModelError, match="batch size 2, expected 1"):
        comb.combine([torch.zeros(1, 2), torch.zeros(2, 3)])
    with pytest.raises(ModelError, match=r"gradient has shape \(1, 4\)"):
        comb.split(torch.zeros(1, 4))
    with pytest.raises(ModelError, match="equal cut widths"):
        Combiner([2, 3], "sum")
    with pytest.raises(ModelError, match="positive"):
        Combiner([])
