"""PrivacySpec: the [privacy] table, the session config's privacy map, and a peer's garbage refused."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vfl.errors import ExitCode, VflError
from vfl.privacy.spec import DEFENCES, PARAMETERS, PrivacyError, PrivacySpec


def test_defaults_fill_every_parameter_the_defence_takes():
    assert PrivacySpec().defence == "none" and dict(PrivacySpec().params) == {}
    assert dict(PrivacySpec.from_table({"defence": "marvell"}).params) == {"sumkl": 4.0}
    assert dict(PrivacySpec.from_table({"defence": "label_dp"}).params) == {"epsilon": 1.0}
    assert dict(PrivacySpec.from_table({"defence": "gradient_noise"}).params) == {"clip": 1.0, "sigma": 1.0}
    assert dict(PrivacySpec.from_table({"defence": "max_norm"}).params) == {}
    assert PrivacySpec.from_table({}) == PrivacySpec()


def test_toml_ints_become_floats_and_params_are_read_only():
    spec = PrivacySpec.from_table({"defence": "gradient_noise", "clip": 2, "sigma": 0})
    assert spec.params == {"clip": 2.0, "sigma": 0.0}
    assert all(type(v) is float for v in spec.params.values())
    with pytest.raises(TypeError):
        spec.params["clip"] = 3.0  # type: ignore[index]
    assert hash(spec) == hash(PrivacySpec("gradient_noise", {"clip": 2.0, "sigma": 0.0}))


def test_to_wire_none_is_absent_and_others_carry_float_params():
    assert PrivacySpec().to_wire() is None
    assert PrivacySpec.from_table({"defence": "max_norm"}).to_wire() == {"defence": "max_norm"}
    wire = PrivacySpec.from_table({"defence": "marvell", "sumkl": 1}).to_wire()
    assert wire == {"defence": "marvell", "sumkl": 1.0} and type(wire["sumkl"]) is float


@pytest.mark.parametrize("spec, text", [
    (PrivacySpec(), "none"),
    (PrivacySpec("max_norm"), "max_norm"),
    (PrivacySpec("marvell"), "marvell (sumkl 4)"),
    (PrivacySpec("gradient_noise"), "gradient_noise (clip 1, sigma 1)"),
    (PrivacySpec("label_dp", {"epsilon": 0.5}), "label_dp (epsilon 0.5)"),
])
def test_describe(spec, text):
    assert spec.describe() == text


def test_a_table_error_lists_every_problem_and_is_a_setup_error():
    with pytest.raises(PrivacyError) as info:
        PrivacySpec.from_table({"defence": "marvell", "sumkl": -1, "epsilon": 2})
    text = str(info.value)
    assert "sumkl = -1" in text and "> 0" in text
    assert "'epsilon': not a parameter of defence 'marvell', which takes sumkl" in text
    assert "set defence = 'label_dp'" in text
    assert info.value.exit_code == ExitCode.SETUP
    assert isinstance(info.value, VflError) and isinstance(info.value, ValueError)


def test_an_unknown_defence_names_the_known_ones():
    with pytest.raises(PrivacyError, match="marvel.*unknown; use one of none, max_norm, marvell"):
        PrivacySpec.from_table({"defence": "marvel"})


@pytest.mark.parametrize("table", [
    {"defence": "gradient_noise", "clip": 0},
    {"defence": "gradient_noise", "sigma": -0.1},
    {"defence": "label_dp", "epsilon": math.inf},
    {"defence": "label_dp", "epsilon": "1"},
    {"defence": "marvell", "sumkl": True},
    {"defence": "marvell", "sumkl": math.nan},
    {"sumkl": 1.0},
])
def test_out_of_range_values_are_refused(table):
    with pytest.raises(PrivacyError):
        PrivacySpec.from_table(table)


def test_sigma_zero_is_allowed():
    assert PrivacySpec.from_table({"defence": "gradient_noise", "sigma": 0}).params["sigma"] == 0.0


def test_check_task():
    PrivacySpec("marvell").check_task("binary")
    PrivacySpec("label_dp").check_task("multiclass")
    for spec in (PrivacySpec(), PrivacySpec("max_norm"), PrivacySpec("gradient_noise")):
        for task in ("binary", "multiclass", "regression"):
            spec.check_task(task)
    with pytest.raises(PrivacyError, match="marvell.*binary.*'multiclass'") as info:
        PrivacySpec("marvell").check_task("multiclass")
    assert info.value.exit_code == ExitCode.SETUP
    with pytest.raises(PrivacyError, match="label_dp.*regression"):
        PrivacySpec("label_dp").check_task("regression")


positive = st.floats(min_value=1e-6, max_value=1e6, allow_nan=False)
specs = st.one_of(
    st.just(PrivacySpec()),
    st.just(PrivacySpec("max_norm")),
    st.builds(lambda s: PrivacySpec("marvell", {"sumkl": s}), positive),
    st.builds(lambda e: PrivacySpec("label_dp", {"epsilon": e}), positive),
    st.builds(lambda c, s: PrivacySpec("gradient_noise", {"clip": c, "sigma": s}), positive,
              st.floats(min_value=0, max_value=1e6)),
)


@given(specs)
def test_wire_round_trip(spec):
    assert PrivacySpec.from_wire(spec.to_wire()) == spec
    if spec.defence != "none":
        assert PrivacySpec.from_table(spec.to_wire()) == spec


garbage_scalar = st.one_of(st.none(), st.booleans(), st.text(max_size=20), st.binary(max_size=8),
                           st.floats(allow_nan=True, allow_infinity=True).filter(lambda x: not math.isfinite(x)),
                           st.floats(max_value=0, allow_nan=False), st.integers(max_value=0),
                           st.integers(min_value=2 ** 1100), st.lists(st.integers(), max_size=3),
                           st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@settings(max_examples=300)
@given(st.sampled_from([d for d in DEFENCES if PARAMETERS[d]]), st.data())
def test_a_peer_bad_parameter_value_is_refused(defence, data):
    wire = PrivacySpec(defence).to_wire()
    key = data.draw(st.sampled_from(sorted(PARAMETERS[defence])))
    bad = data.draw(garbage_scalar)
    if key == "sigma" and type(bad) in (int, float) and bad == 0:
        bad = -1.0  # sigma 0 is valid
    wire[key] = bad
    with pytest.raises(PrivacyError) as info:
        PrivacySpec.from_wire(wire)
    assert info.value.exit_code == ExitCode.FAILED and key in str(info.value)


@settings(max_examples=200)
@given(st.one_of(garbage_scalar, st.dictionaries(st.one_of(st.text(max_size=8), st.integers()), garbage_scalar,
                                                 max_size=4)))
def test_peer_garbage_of_any_shape_is_refused(value):
    if value is None:
        return  # no privacy key: the defence "none"
    with pytest.raises(PrivacyError):
        PrivacySpec.from_wire(value)


@pytest.mark.parametrize("wire, needle", [
    ({"defence": "marvell", "sumkl": 1.0, "extra": 1.0}, "'extra': not a parameter"),
    ({"defence": "marvell"}, "sumkl: missing"),
    ({"defence": "none"}, "sent as no privacy key"),
    ({"defence": 3}, "defence = 3: unknown"),
    ({"sumkl": 1.0}, "no key 'defence'"),
    ({"defence": "gradient_noise", "clip": 1.0, "sigma": False}, "sigma = False"),
    ({"defence": "max_norm", 7: 1}, "7: not a parameter"),
    ({"defence": "label_dp\x1b[2J", "epsilon": 1.0}, "\\x1b"),
])
def test_peer_config_errors_name_the_problem(wire, needle):
    with pytest.raises(PrivacyError) as info:
        PrivacySpec.from_wire(wire)
    assert needle in str(info.value) and "\x1b" not in str(info.value)


def test_a_peer_may_send_ints_and_a_long_value_is_shown_cut():
    assert PrivacySpec.from_wire({"defence": "marvell", "sumkl": 2}) == PrivacySpec("marvell", {"sumkl": 2.0})
    with pytest.raises(PrivacyError) as info:
        PrivacySpec.from_wire({"defence": "x" * 100_000})
    assert len(str(info.value)) < 300


def test_direct_construction_is_validated_too():
    with pytest.raises(PrivacyError):
        PrivacySpec("marvell", {"sumkl": 0.0})
    with pytest.raises(PrivacyError):
        PrivacySpec("nope")
